"""`--fp8_base` / `--fp8_base_unet`: the frozen base model's Linear and Conv2d weights stored in float8_e4m3fn.

One byte a weight instead of bf16's two: SDXL's UNet takes 2.6 GB instead of 5.1 GB. Each layer casts its weight
to the compute dtype (`--mixed_precision`) when it runs, in the forward and again in the backward.

Why not sd-scripts' way (`unet.to(float8)` and autocast):
- autocast's bf16 copy of a frozen weight is saved for the backward of every layer the LoRA gradient flows
  through, so without gradient checkpointing a step holds every weight in fp8 *and* in bf16; the functions below
  save the fp8 weight and cast it again in the backward;
- CPU autocast does not cast fp8 parameters of group_norm, layer_norm or embeddings (they fail there); norms,
  embeddings and biases stay in the compute dtype here (a few MB).
The results equal a bf16 model whose Linear/Conv2d weights were rounded to fp8 (tests/test_fp8_base.py).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: larger weights would become NaN


class _LinearFp8(torch.autograd.Function):
    """F.linear with an fp8 weight: cast in the forward, cast again in the backward (only the fp8 weight is saved).
    The weight and bias are frozen: no gradients for them."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = grad.to(ctx.dtype)
        gx = torch.mm(g.reshape(-1, g.shape[-1]), weight.to(ctx.dtype)).view(*g.shape[:-1], weight.shape[1])
        return gx.to(ctx.x_dtype), None, None, None


class _Conv2dFp8(torch.autograd.Function):
    """F.conv2d with an fp8 weight, as `_LinearFp8`."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, groups = ctx.conv
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, weight.to(ctx.dtype), grad.to(ctx.dtype), stride, padding,
                                            dilation, groups).to(ctx.x_dtype)
        return gx, None, None, None, None, None, None, None


def _linear_forward(self, x):
    return _LinearFp8.apply(x, self.weight, self.bias, self.fp8_compute_dtype)


def _conv2d_forward(self, x):
    return _Conv2dFp8.apply(x, self.weight, self.bias, self.fp8_compute_dtype, self.stride, self.padding,
                            self.dilation, self.groups)


def _eligible(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype, what: str = "model") -> tuple[int, int]:
    """Cast the weight of every nn.Linear / nn.Conv2d in `model` to float8_e4m3fn and give the layer a forward that
    computes in `compute_dtype` (fp16 / bf16). Call it before the LoRA is applied (the LoRA wraps this forward).
    Returns (layers, bytes saved). A weight beyond fp8's range (±448) is an error that names the layer."""
    if compute_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp8 base weights need an fp16 or bf16 compute dtype, got {compute_dtype}")
    layers = saved = 0
    for name, module in model.named_modules():
        if not _eligible(module) or module.weight.dtype == FP8:
            continue
        w = module.weight
        if w.requires_grad:
            raise ValueError(f"{what}.{name}: fp8 storage is for frozen weights; this one requires grad")
        peak = float(w.detach().abs().max()) if w.numel() else 0.0
        if not peak <= FP8_MAX:
            raise ValueError(f"{what}.{name}: weights up to {peak:g} do not fit float8_e4m3fn (max {FP8_MAX:g}); "
                             "leave out --fp8_base / --fp8_base_unet for this model")
        saved += w.numel() * (w.element_size() - 1)
        module.weight = nn.Parameter(w.detach().to(FP8), requires_grad=False)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(compute_dtype)
        module.fp8_compute_dtype = compute_dtype
        module.forward = types.MethodType(_linear_forward if type(module) is nn.Linear else _conv2d_forward, module)
        layers += 1
    _report_compute_dtype(model)
    return layers, saved


def apply_fp8_flags(model, args, compute_dtype: torch.dtype) -> list[str]:
    """--fp8_base (UNet and text encoders) / --fp8_base_unet (UNet only; it wins over --fp8_base, as in sd-scripts)
    on a loaded model, after every `.to(dtype)` and before the LoRA is applied. Returns a line per part to print."""
    if not (getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False)):
        return []
    parts = [("UNet", model.unet)]
    if not getattr(args, "fp8_base_unet", False):
        parts += [(f"text encoder {i + 1}", te) for i, te in enumerate(model.text_encoders)]
    lines = []
    for what, module in parts:
        layers, saved = store_in_fp8(module, compute_dtype, what)
        lines.append(f"fp8 base weights: {what}, {layers} Linear/Conv2d layers in float8_e4m3fn "
                     f"({saved / 2**20:.1f} MiB less)")
    return lines


def _report_compute_dtype(model: nn.Module) -> None:
    """diffusers' and transformers' `.dtype` is the first floating parameter's: fp8 for the UNet (conv_in), which
    pipelines would then cast prompt embeddings and latents to. The instance gets a subclass whose `.dtype` is the
    compute dtype (same class name; isinstance holds)."""
    cls = type(model)
    if isinstance(getattr(cls, "dtype", None), property) and not getattr(cls, "_fp8_storage", False):
        model.__class__ = type(cls.__name__, (cls,), {"dtype": property(compute_dtype), "_fp8_storage": True,
                                                      "__module__": cls.__module__})


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its first floating parameter that is not fp8 (diffusers' `.dtype` is the
    first parameter's, which is fp8 once `store_in_fp8` ran)."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != FP8:
            return p.dtype
    return torch.float32
