"""Kohya (sd-scripts `networks.lora`) compatible LoRA for SD1.x / SD2.x / SDXL diffusers models.

How it works (the same as sd-scripts): every targeted `Linear`/`Conv2d` keeps its weights and its original `forward`;
`apply_to()` replaces the module's `forward` with `LoRAModule.forward`, which returns

    org_forward(x) + lora_up(lora_down(x)) * multiplier * alpha / rank

With `multiplier == 0` the LoRA branch is not computed at all, so the output is bit-identical to the base model
(APT's prior pass uses `with network.multiplier_override(0.0): ...`).

The network is an `nn.Module` whose `state_dict()` keys are exactly the kohya file keys
(`{lora_name}.lora_down.weight`, `{lora_name}.lora_up.weight`, `{lora_name}.alpha`); the names follow sd-scripts
(see docs/lora_format.md and KOHYA_COMPAT §1): SD1/SD2 UNet `lora_unet_<diffusers path>`, SDXL UNet
`lora_unet_<SGM path>`, text encoders `lora_te[1|2]_text_model_encoder_layers_{i}_{suffix}` whatever the installed
transformers version calls its modules.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]  # documentation; see _TE_RE
LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"  # SD1/SD2; SDXL uses lora_te1 / lora_te2

VARIANTS = ("lierla", "c3lier")
NETWORK_ARGS = {  # --network_args keys we accept -> parser
    "conv_dim": int,
    "conv_alpha": float,
    "rank_dropout": float,
    "module_dropout": float,
    "loraplus_lr_ratio": float,  # LoRA+ (Hayou et al. 2024): the up weights learn at lr x ratio
    "loraplus_unet_lr_ratio": float,
    "loraplus_text_encoder_lr_ratio": float,
    # block-wise ranks, alphas and lr weights (networks/lora_blocks.py): comma lists or presets, parsed there
    "block_dims": str, "block_alphas": str, "conv_block_dims": str, "conv_block_alphas": str,
    "down_lr_weight": str, "mid_lr_weight": str, "up_lr_weight": str,
    "block_lr_zero_threshold": float,
}

# A text-encoder Linear we adapt: encoder layer i, q/k/v/out projections of self-attention and the two MLP layers.
# Matched on the module path so that it works with and without transformers 4's `text_model.` wrapper.
_TE_RE = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")

_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_ARCH_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


class LoRAWeightsError(Exception):
    """A user-facing LoRA error (a --network_weights file that does not fit, bad --network_args); the message names
    the file or flag and says what to do."""


# --------------------------------------------------------------------------------------------------------------------
# module discovery and naming


@dataclass
class _Target:
    lora_name: str
    module: nn.Module
    uses_conv_dim: bool  # a 3x3 conv of a ResnetBlock2D/Downsample2D/Upsample2D (C3Lier): conv_dim / conv_alpha
    te_index: int | None  # None for the UNet


def _text_encoder_prefixes(arch: str, n: int) -> list[str]:
    if arch == "sdxl":
        return [f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}" for i in range(n)]
    return [LORA_PREFIX_TEXT_ENCODER] * n


def _text_encoder_targets(model) -> list[_Target]:
    targets = []
    for te_index, (prefix, te) in enumerate(zip(_text_encoder_prefixes(model.arch, len(model.text_encoders)),
                                                model.text_encoders)):
        seen = set()
        for path, child in te.named_modules():
            if not isinstance(child, nn.Linear):
                continue
            m = _TE_RE.search(path)
            if m is None:
                continue
            name = f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"
            if name in seen:
                raise RuntimeError(f"text encoder {te_index + 1}: two modules map to LoRA name {name} ({path})")
            seen.add(name)
            targets.append(_Target(name, child, False, te_index))
    return targets


def _sdxl_sgm_path(path: str, layers_per_block: int, up_has_attn: dict) -> str:
    """diffusers UNet module path -> SGM/LDM path (sd-scripts' SdxlUNet2DConditionModel names; KOHYA_COMPAT §1.4)."""
    n = layers_per_block

    def resnet_rest(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_SGM.get(head, head) + ("." + tail if tail else "")

    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = (n + 1) * i + j + 1
        return f"input_blocks.{idx}.1.{rest}" if kind == "attentions" else f"input_blocks.{idx}.0.{resnet_rest(rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", path)
    if m:
        return f"middle_block.{2 * int(m[1])}.{resnet_rest(m[2])}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = (n + 1) * i + j
        return f"output_blocks.{idx}.1.{rest}" if kind == "attentions" else f"output_blocks.{idx}.0.{resnet_rest(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{(n + 1) * i + n}.{2 if up_has_attn[i] else 1}.conv"
    raise ValueError(f"no SGM name for UNet module {path}")


def _sdxl_layout(unet) -> tuple[int, dict]:
    """What `_sdxl_sgm_path` needs of an SDXL UNet: layers per block, and which up blocks have attention."""
    lpb = unet.config.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"SDXL UNet with per-block layers_per_block={lpb} is not supported")
    return lpb, {i: hasattr(b, "attentions") and len(b.attentions) > 0 for i, b in enumerate(unet.up_blocks)}


_DIFFUSERS_BLOCK = re.compile(r"lora_unet_(?:(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)"
                              r"|mid_block_(attentions|resnets))_(\d+)_(.+)$")


def sgm_module_names(modules: dict, model, where: str = "the LoRA file") -> dict:
    """An SDXL file's UNet module names written with diffusers' block names (`lora_unet_down_blocks_1_attentions_0_...`,
    as some other trainers write them) renamed to the SGM names sd-scripts uses (`lora_unet_input_blocks_4_1_...`), as
    sd-scripts' `convert_diffusers_to_sai_if_needed` does when it loads one; ComfyUI, A1111 and diffusers read both.
    Other names, and any file for SD1/SD2 (whose kohya names are diffusers'), are left as they are. A module under
    both names is a LoRAWeightsError naming `where` (which of the two to use cannot be told)."""
    if model.arch != "sdxl" or not any(_DIFFUSERS_BLOCK.match(n) for n in modules):
        return modules
    lpb, up_has_attn = _sdxl_layout(model.unet)

    def rename(name: str) -> str:
        m = _DIFFUSERS_BLOCK.match(name)
        if m is None:
            return name
        block = f"{m[1]}.{m[2]}.{m[3]}" if m[1] else f"mid_block.{m[4]}"
        try:
            return f"{LORA_PREFIX_UNET}.{_sdxl_sgm_path(f'{block}.{m[5]}.{m[6]}', lpb, up_has_attn)}".replace(".", "_")
        except ValueError:
            return name  # reported as a module this model does not have

    renamed = {}
    for name, value in modules.items():
        new = rename(name)
        if new in renamed:
            raise LoRAWeightsError(f"{where}: the module {new} is in it twice, once under its diffusers block name "
                                   f"({name if new != name else 'and once under the SGM name'}); which one to use "
                                   "cannot be told: keep one of the two in the file")
        renamed[new] = value
    return renamed


def _unet_targets(model, conv: bool) -> list[_Target]:
    unet = model.unet
    target_classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if conv else [])
    if model.arch == "sdxl":
        lpb, up_has_attn = _sdxl_layout(unet)
    targets, seen = [], set()
    for name, module in unet.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            is_linear = isinstance(child, nn.Linear)
            is_conv = isinstance(child, nn.Conv2d)
            if not (is_linear or is_conv) or not child_name:
                continue
            is_1x1 = is_conv and tuple(child.kernel_size) == (1, 1)
            if not (is_linear or is_1x1 or conv):
                continue  # LierLa: 3x3 convs are not adapted
            path = f"{name}.{child_name}"
            if model.arch == "sdxl":
                path = _sdxl_sgm_path(path, lpb, up_has_attn)
            lora_name = f"{LORA_PREFIX_UNET}.{path}".replace(".", "_")
            if lora_name in seen:
                continue
            seen.add(lora_name)
            targets.append(_Target(lora_name, child, not (is_linear or is_1x1), None))
    return targets


def _lora_shapes(module: nn.Module, rank) -> tuple[tuple, tuple]:
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def kohya_module_names(model, variant: str = "lierla", *, rank="r", conv_rank=None) -> dict[str, tuple[tuple, tuple]]:
    """{lora_name: (lora_down shape, lora_up shape)} that sd-scripts would write for `model` (UNet and text encoders,
    every module trained). `variant`: "lierla" (default targets) or "c3lier" (with conv_dim). The rank entries of
    the shapes are `rank` ("r" by default, like tests/data/kohya_lora_keys.json) and `conv_rank` (default: `rank`)
    for the 3x3 convs. Works on weightless (meta) models."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    conv_rank = rank if conv_rank is None else conv_rank
    out = {}
    for t in _text_encoder_targets(model) + _unet_targets(model, conv=variant == "c3lier"):
        out[t.lora_name] = _lora_shapes(t.module, conv_rank if t.uses_conv_dim else rank)
    return out


# --------------------------------------------------------------------------------------------------------------------
# modules


class LoRAModule(nn.Module):
    """LoRA branch for one Linear/Conv2d. `org_module` is not registered as a submodule (only lora_down, lora_up and
    the `alpha` buffer are in the state dict)."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d, got {type(org_module).__name__}")
        self.is_conv3x3 = isinstance(org_module, nn.Conv2d) and tuple(org_module.kernel_size) != (1, 1)
        self.is_linear = isinstance(org_module, nn.Linear)
        self.fused = True  # Linear without dropout: up-projection, scale and sum in one addmm (see `_fused_linear`)
        if alpha is None or float(alpha) == 0:
            alpha = self.lora_dim
        self.configured_alpha = float(alpha)  # as created (the alpha buffer may be replaced by load_weights)
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.scale = float(alpha) / self.lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # a list keeps it out of this module's submodules / state_dict
        self.org_forward = None
        self._prev_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_applied(self) -> bool:
        return self.org_forward is not None

    def apply_to(self) -> None:
        if self.is_applied:
            raise RuntimeError(f"{self.lora_name}: LoRA is already applied")
        org = self.org_module
        self._prev_forward = org.__dict__.get("forward")
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Undo `apply_to()`: the original module's forward is put back."""
        if not self.is_applied:
            return
        org = self.org_module
        if self._prev_forward is None:
            org.__dict__.pop("forward", None)
        else:
            org.forward = self._prev_forward
        self.org_forward = None
        self._prev_forward = None

    def update_scale(self) -> None:
        """Recompute `scale` from the `alpha` buffer (after loading weights)."""
        self.scale = float(self.alpha.item()) / self.lora_dim

    def forward(self, x, *args, **kwargs):
        org_out = self.org_forward(x, *args, **kwargs)
        if isinstance(self.multiplier, (int, float)) and self.multiplier == 0:
            return org_out  # the branch is skipped entirely: bit-exact base output
        if self.fused and self.is_linear and not (self.training and self.has_dropout):
            out = self._fused_linear(x, org_out)
            if out is not None:
                return out
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out

        w = self.lora_down.weight
        lx = self.lora_down(x if x.dtype == w.dtype else x.to(w.dtype))
        if self.dropout is not None and self.training:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # (B, N, r): text encoder / transformer tokens
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)  # (B, r, H, W): conv
            lx = lx * mask.to(lx.dtype)
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))
        lx = self.lora_up(lx)
        return org_out + (lx * (self.multiplier * scale)).to(org_out.dtype)

    @property
    def has_dropout(self) -> bool:
        return bool(self.dropout or self.rank_dropout or self.module_dropout)

    def _fused_linear(self, x, org_out):
        """org_out + multiplier · scale · up(down(x)) as down and one addmm: 2 kernels instead of 4-5 (down, up,
        scale, cast, add; the input cast is also skipped under autocast, which casts again anyway). A GPU step is
        bound by kernel launches (docs/speed.md). None where dtypes would need casts outside autocast."""
        down, up = self.lora_down.weight, self.lora_up.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not (x.dtype == down.dtype == org_out.dtype):
            return None
        h = self.lora_down(x)
        m = self.multiplier
        if isinstance(m, torch.Tensor):  # read on the device (`LoRANetwork.keep_multiplier_on_device`)
            h, m = h * m, 1.0
        out = torch.addmm(org_out.reshape(-1, org_out.shape[-1]), h.reshape(-1, h.shape[-1]), up.t(),
                          alpha=m * self.scale)
        return out.view(org_out.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = multiplier · scale · up @ down in the original weight's layout (KOHYA_COMPAT §1.1)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.dim() == 2:
            d = up @ down
        elif down.shape[2:] == (1, 1):
            d = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            d = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return d * (self.multiplier * self.scale)


# --------------------------------------------------------------------------------------------------------------------
# network


def _save_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if str(dtype) not in names:
        raise ValueError(f"unknown save dtype {dtype!r}; expected a torch dtype or one of {sorted(names)}")
    return names[str(dtype)]


class LoRANetwork(nn.Module):
    """All LoRA modules of one model. Text-encoder LoRAs first, then UNet LoRAs (the order sd-scripts uses).

    Attributes: `arch`, `lora_dim`, `alpha`, `conv_lora_dim`, `conv_alpha`, `dropout`, `rank_dropout`,
    `module_dropout`, `multiplier`, `text_encoder_loras`, `unet_loras`, `network_args` (the --network_args dict with
    string values, set by `create_network`, for `ss_network_args`)."""

    def __init__(self, model, *, multiplier: float = 1.0, lora_dim: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, conv_lora_dim: int | None = None, conv_alpha: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None, train_unet: bool = True,
                 train_text_encoder: bool = True, block_plan=None, module_dims: dict | None = None):
        super().__init__()
        if lora_dim is None or int(lora_dim) < 1:
            raise LoRAWeightsError(f"--network_dim must be a positive integer, got {lora_dim!r}")
        if conv_lora_dim is not None and int(conv_lora_dim) < 0:
            raise LoRAWeightsError(f"--network_args conv_dim must be >= 0, got {conv_lora_dim!r}")
        for flag, p in (("--network_dropout", dropout), ("--network_args rank_dropout", rank_dropout),
                        ("--network_args module_dropout", module_dropout)):
            if p is not None and not 0.0 <= float(p) < 1.0:
                raise LoRAWeightsError(f"{flag} must be in [0, 1), got {p!r}")
        self.__dict__["_model"] = model  # not an nn.Module attribute: the base model stays out of state_dict()
        self.arch = model.arch
        self.multiplier = multiplier
        self._device_multiplier, self._device_value = None, None  # see keep_multiplier_on_device
        self.lora_dim = int(lora_dim)
        self.alpha = alpha
        # conv_dim given (0 too, as in sd-scripts): the ResNet/down/upsampler blocks are targeted, their Linear and
        # 1x1 layers at network_dim and their 3x3 convs at conv_dim (0: none); None: LierLa, attention blocks only
        self.conv_lora_dim = int(conv_lora_dim) if conv_lora_dim is not None else None
        self.conv_alpha = (1.0 if conv_alpha is None else conv_alpha) if self.conv_lora_dim is not None else None
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.train_unet = train_unet
        self.train_text_encoder = train_text_encoder
        self.network_args: dict[str, str] = {}
        if module_dims is not None:
            module_dims = sgm_module_names(module_dims, model, "--network_weights (--dim_from_weights)")
        self.loraplus: dict[str, float | None] = {}  # LoRA+ ratios: "all", "unet", "text_encoder" (create_network)

        def rank_alpha(t: _Target) -> tuple:
            """(rank, alpha) of a target; rank 0: no module (a block left out by `block_plan`). `module_dims`
            (--dim_from_weights: name -> (rank, alpha)) makes exactly the file's modules, each at its own rank, as
            sd-scripts' `create_network_from_weights` (a block-wise or UNet-only file is continued as it is)."""
            if module_dims is not None:
                return module_dims.get(t.lora_name, (0, None))
            if block_plan is not None and t.te_index is None:
                rank, a = block_plan.rank_alpha(t.lora_name, self.arch, t.uses_conv_dim)
            else:
                rank, a = (self.conv_lora_dim, self.conv_alpha) if t.uses_conv_dim else (self.lora_dim, alpha)
            return rank, a

        def make(t: _Target) -> LoRAModule:
            return LoRAModule(t.lora_name, t.module, multiplier, *rank_alpha(t), dropout, rank_dropout, module_dropout)

        self.text_encoder_loras: list[LoRAModule] = []
        self._te_index: dict[str, int] = {}
        if train_text_encoder:
            for t in _text_encoder_targets(model):
                if rank_alpha(t)[0]:
                    self.text_encoder_loras.append(make(t))
                    self._te_index[t.lora_name] = t.te_index
        self.block_plan = block_plan  # networks.lora_blocks.BlockPlan: a rank, alpha and lr weight per UNet block
        self.unet_loras: list[LoRAModule] = []
        if train_unet:
            conv = module_dims is not None or (block_plan.conv_dims if block_plan is not None
                                               else self.conv_lora_dim) is not None
            self.unet_loras = [make(t) for t in _unet_targets(model, conv=conv) if rank_alpha(t)[0]]
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        if module_dims is not None and train_text_encoder and not self.text_encoder_loras:
            logger.warning("--dim_from_weights: the file has no text-encoder modules, so this run trains none (as "
                           "sd-scripts); pass --network_train_unet_only to say so, or leave --dim_from_weights out "
                           "to add text-encoder LoRA at --network_dim")
        logger.info("LoRA network: %d text-encoder modules, %d UNet modules (rank %d, alpha %s%s)",
                    len(self.text_encoder_loras), len(self.unet_loras), self.lora_dim, alpha,
                    f", conv rank {self.conv_lora_dim}, conv alpha {self.conv_alpha}" if self.conv_lora_dim else "")

    @property
    def model(self):
        return self.__dict__["_model"]

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    @property
    def has_dropout(self) -> bool:
        """Whether any module drops out in training (its forward draws random numbers: no CUDA graph records it)."""
        return any(lora.has_dropout for lora in self.loras)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether a text-encoder LoRA trains (after `prepare_optimizer_params`, a learning rate of 0 freezes it)."""
        return any(p.requires_grad for lora in self.text_encoder_loras for p in lora.parameters())

    # -- patching ------------------------------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Patch the model's targeted modules (their forward now adds the LoRA branch)."""
        for lora in self.loras:
            lora.apply_to()

    def restore(self) -> None:
        """Undo `apply_to()` (the model is the base model again)."""
        for lora in self.loras:
            lora.restore()

    @property
    def is_applied(self) -> bool:
        return any(lora.is_applied for lora in self.loras)

    def cast_weights(self, dtype) -> None:
        """`--full_bf16`: every up/down weight in `dtype`, and so its gradient and optimizer states. Each `alpha`
        stays float32: training scales by the alpha given, and a file saved as float keeps it exactly."""
        for lora in self.loras:
            lora.lora_down.to(dtype)
            lora.lora_up.to(dtype)

    def set_fused(self, fused: bool) -> None:
        """Linear LoRA branches as down + one addmm (True, the default) or as separate ops (`--no_fused_lora`)."""
        for lora in self.loras:
            lora.fused = bool(fused)

    # -- multiplier ----------------------------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        """The LoRA's strength in every module. 0 skips the branches (the base model, bit-exact). After
        `keep_multiplier_on_device` any other value is written into the device tensor the modules read."""
        self.multiplier = multiplier
        value = multiplier
        if self._device_multiplier is not None and multiplier != 0:
            value = self._device_multiplier
            if multiplier != self._device_value:  # unchanged: no write (a pending backward may hold the tensor)
                value.fill_(multiplier)
                self._device_value = multiplier
        for lora in self.loras:
            lora.multiplier = value

    def keep_multiplier_on_device(self, device) -> None:
        """Let the modules read a non-zero multiplier from one 0-dim tensor on `device`, which `set_multiplier`
        fills in place, instead of a Python number. For runs whose datasets train at different `network_multiplier`
        values (set per batch): a number is a constant to a recorded CUDA graph (--unet_cuda_graph) and a guard
        to torch.compile (one graph per value); a tensor is an input to both. Costs one small multiply per Linear
        LoRA module, so runs with one multiplier keep the number."""
        self._device_multiplier = torch.tensor(float(self.multiplier or 1.0), device=device)
        self._device_value = float(self.multiplier or 1.0)
        self.set_multiplier(self.multiplier)

    @contextlib.contextmanager
    def multiplier_override(self, multiplier: float):
        """`with network.multiplier_override(0.0): ...` runs the base model (bit-exact); restores on exit."""
        saved = self.multiplier
        self.set_multiplier(multiplier)
        try:
            yield self
        finally:
            self.set_multiplier(saved)

    # -- optimiser -----------------------------------------------------------------------------------------------
    def loraplus_ratio(self, group_name: str) -> float | None:
        """LoRA+'s lr ratio of the up weights for the "unet" or a "textencoder..." group (sd-scripts: the specific
        ratio, else `loraplus_lr_ratio`, else None: no LoRA+)."""
        specific = self.loraplus.get("unet" if group_name.startswith("unet") else "text_encoder")
        return specific if specific is not None else self.loraplus.get("all")

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
        """Parameter groups as sd-scripts builds them: text encoder(s) then UNet, each with its "lr"
        (None → default_lr); groups whose lr is 0 are dropped (and their parameters frozen). `text_encoder_lr` may be
        a list of one or two values (SDXL: TE1, TE2), which gives one group per text encoder. Each group also has a
        "name" ("textencoder", "textencoder1", "textencoder2", "unet") for logging; torch optimisers keep extra
        group keys."""
        self.requires_grad_(True)
        groups: list[dict] = []

        def add(name, loras, lr):
            params = [p for lora in loras for p in lora.parameters()]
            if not params:
                return
            lr = default_lr if lr is None else lr
            if lr == 0:
                logger.info("LoRA: learning rate 0 for %s, its parameters are not trained", name)
                for p in params:
                    p.requires_grad_(False)
                return
            ratio = self.loraplus_ratio(name)
            ups = {id(lora.lora_up.weight) for lora in loras} if ratio is not None else set()
            for suffix, mine, factor in (("", [p for p in params if id(p) not in ups], 1.0),
                                         (" plus", [p for p in params if id(p) in ups], ratio)):
                if mine:  # LoRA+: the up weights in a group of their own, "<name> plus", at lr x ratio
                    group = {"params": mine, "name": name + suffix}
                    if lr is not None:
                        group["lr"] = lr * factor
                    groups.append(group)

        if isinstance(text_encoder_lr, (list, tuple)):
            lrs = list(text_encoder_lr)
            if len(lrs) == 0:
                lrs = [None]
            n_te = len(self.model.text_encoders)
            if len(lrs) == 1:
                lrs = lrs * n_te
            if len(lrs) != n_te:
                raise LoRAWeightsError(
                    f"--text_encoder_lr got {len(lrs)} values; this model has {n_te} text encoder(s)")
            if n_te == 1:
                add("textencoder", self.text_encoder_loras, lrs[0])
            else:
                for i, lr in enumerate(lrs):
                    add(f"textencoder{i + 1}", [m for m in self.text_encoder_loras if self._te_index[m.lora_name] == i],
                        lr)
        else:
            add("textencoder", self.text_encoder_loras, text_encoder_lr)
        weights = self.block_plan.lr_weight if self.block_plan is not None else None
        if weights is None:
            add("unet", self.unet_loras, unet_lr)
            return groups
        from networks.lora_blocks import block_index

        by_block: dict[int, list] = {}  # sd-scripts: a group per UNet block at lr x its weight, "unet_block<i>"
        for lora in self.unet_loras:
            by_block.setdefault(block_index(lora.lora_name, self.arch), []).append(lora)
        for i, loras in by_block.items():
            lr = default_lr if unet_lr is None else unet_lr
            add(f"unet_block{i}", loras, None if lr is None else lr * weights[i])
        return groups

    # -- save / load ---------------------------------------------------------------------------------------------
    def kohya_state_dict(self, dtype=None) -> dict[str, torch.Tensor]:
        """The tensors save_weights writes: CPU copies, cast to `dtype` (None: kept), alpha as a 0-dim float tensor in
        the same dtype as the weights."""
        dtype = _save_dtype(dtype)
        out = {}
        for lora in self.loras:
            down = lora.lora_down.weight.detach().clone().to("cpu")
            up = lora.lora_up.weight.detach().clone().to("cpu")
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            fdtype = down.dtype if down.dtype.is_floating_point else torch.float32
            out[f"{lora.lora_name}.lora_down.weight"] = down
            out[f"{lora.lora_name}.lora_up.weight"] = up
            out[f"{lora.lora_name}.alpha"] = lora.alpha.detach().to("cpu", torch.float32).reshape(()).to(fdtype)
        return out

    def save_weights(self, path, dtype=None, metadata: dict | None = None, overwrite: bool = False) -> dict:
        """Write the kohya .safetensors atomically. `dtype`: torch dtype or "float"/"fp16"/"bf16" (None: as trained).
        Metadata values are str()-ed; `sshs_model_hash`/`sshs_legacy_hash` are added. Returns the metadata written.
        Refuses an existing file unless `overwrite` (FileExistsError that names the --overwrite flag)."""
        from library.safe_io import atomic_save_safetensors, check_writable, safetensors_hashes

        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise LoRAWeightsError(f"{path}: LoRA weights are written as .safetensors only; use that extension")
        check_writable(path, overwrite)
        tensors = self.kohya_state_dict(dtype)
        md = {str(k): str(v) for k, v in (metadata or {}).items()}
        md["sshs_model_hash"], md["sshs_legacy_hash"] = safetensors_hashes(tensors, md)
        atomic_save_safetensors(tensors, path, md, overwrite=overwrite)
        return md

    def load_weights(self, path) -> dict:
        """Load a kohya LoRA file (--network_weights) into this network. Raises `LoRAWeightsError` (naming the file,
        what it seems to be made for, and the flag to change) when it does not fit. A file without text-encoder (or
        without UNet, or without the C3Lier conv) modules loads the rest with a warning; a missing `.alpha` means
        alpha = rank (so does 0); the file's alpha is used for training and saving. Returns {"loaded", "missing", "ignored"} lists of
        module names."""
        path = os.fspath(path)
        sd = _read_lora_file(path)
        modules, extra = _group_kohya_keys(sd)
        modules = sgm_module_names(modules, self.model, path)
        if extra:
            ex = ", ".join(sorted(extra)[:3])
            raise LoRAWeightsError(
                f"{path}: not a plain kohya LoRA (networks.lora): unexpected keys such as {ex}. "
                f"{_describe_file(sd, modules)} LyCORIS (LoCon/LoHa/LoKr), DoRA and diffusers/PEFT files cannot be "
                "used as --network_weights; pass a file written by sd-scripts' networks.lora or this trainer.")
        if not modules:
            raise LoRAWeightsError(f"{path}: no LoRA tensors found (expected keys like "
                                   "lora_unet_..._to_q.lora_down.weight)")
        ours = {lora.lora_name: lora for lora in self.loras}
        arch_te = {t.lora_name for t in _text_encoder_targets(self.model)}
        arch_unet = set(_unet_names(self.model, False))
        arch_conv = set(_unet_names(self.model, True)) - arch_unet
        file_names = set(modules)
        unknown = file_names - set(ours)

        foreign = unknown - arch_te - arch_unet - arch_conv
        if foreign:
            ex = ", ".join(sorted(foreign)[:3])
            raise LoRAWeightsError(
                f"{path}: {len(foreign)} of its {len(modules)} LoRA modules do not exist in this "
                f"{_ARCH_LABEL[self.arch]} model (e.g. {ex}). {_describe_file(sd, modules)} Use a LoRA made for "
                f"this base model, or load the base model it was trained on (--pretrained_model_name_or_path, "
                f"--v2/--sdxl).")
        if unknown & arch_conv and self.train_unet and self.conv_lora_dim is None:
            conv_rank, conv_alpha = _conv_rank_alpha(modules, arch_conv)
            raise LoRAWeightsError(
                f"{path} is a LoRA-C3Lier file (it has {len(unknown & arch_conv)} ResNet/down/upsampler modules) "
                f"but this network was created without conv_dim; pass --network_args conv_dim={conv_rank} "
                f"conv_alpha={conv_alpha}.")
        ignored = sorted(unknown)  # what is left: a whole part this network does not train
        if unknown & arch_te:
            logger.warning("%s: has %d text-encoder LoRA modules but this network does not train the text encoder "
                           "(--network_train_unet_only); they are ignored", path, len(unknown & arch_te))
        if unknown - arch_te:
            why = ("this network leaves them out (its block_dims, conv_dim or a block learning rate of 0)"
                   if self.train_unet else "this network does not train the UNet")
            logger.warning("%s: has %d UNet LoRA modules but %s; they are ignored", path, len(unknown - arch_te), why)
        file_names -= unknown

        # shapes: first anything that is not just the rank (another base model), then the rank
        def rank_only(t, want, part):
            t, want = tuple(t.shape), tuple(want)
            if len(t) != len(want):
                return False
            return t[1:] == want[1:] if part == "lora_down" else (t[0] == want[0] and t[2:] == want[2:])

        bad = [(n, part) for n in sorted(file_names) for part in ("lora_down", "lora_up")
               if not _fits(modules[n][part], getattr(ours[n], part).weight.shape)]
        for name, part in bad:
            want = getattr(ours[name], part).weight.shape
            if not rank_only(modules[name][part], want, part):
                raise LoRAWeightsError(
                    f"{path}: shape mismatch: {name}.{part}.weight is {list(modules[name][part].shape)}, this "
                    f"{_ARCH_LABEL[self.arch]} model needs {list(want)}. {_describe_file(sd, modules)} Use a LoRA "
                    f"made for this base model.")
        for name, part in bad:
            lora, want = ours[name], getattr(ours[name], part).weight.shape
            rank = int(modules[name]["lora_down"].shape[0])
            if lora.is_conv3x3:
                have, fix = f"--network_args conv_dim={lora.lora_dim}", f"--network_args conv_dim={rank}"
            else:
                have, fix = f"--network_dim {lora.lora_dim}", f"--network_dim {rank}"
            raise LoRAWeightsError(
                f"{path}: rank mismatch: {name}.{part}.weight has shape {list(modules[name][part].shape)} (rank "
                f"{rank}) but this network was created with {have} (expects {list(want)}); pass {fix} (and the "
                f"file's alpha as --network_alpha / conv_alpha) to continue training this file.")

        # parts of the network absent from the file
        missing = sorted(set(ours) - file_names)
        groups = (
            ("text-encoder", {m.lora_name for m in self.text_encoder_loras}, "pass --network_train_unet_only to "
             "train the UNet only"),
            ("UNet", {m.lora_name for m in self.unet_loras} & arch_unet, "pass --network_train_text_encoder_only"),
            ("C3Lier conv", {m.lora_name for m in self.unet_loras} & arch_conv, "drop conv_dim from --network_args"),
        )
        for label, group, hint in groups:
            absent = group & set(missing)
            if not absent:
                continue
            if absent != group:
                ex = ", ".join(sorted(absent)[:3])
                raise LoRAWeightsError(
                    f"{path}: lacks {len(absent)} of the {len(group)} {label} LoRA modules this network has "
                    f"(e.g. {ex}); partial LoRAs (block-limited, or for another base model) cannot be used as "
                    f"--network_weights. {_describe_file(sd, modules)}")
            logger.warning("%s: has no %s LoRA modules; those %d modules of this network start from scratch "
                           "(or %s)", path, label, len(absent), hint)

        # copy
        alpha_diff = set()
        with torch.no_grad():
            for name in sorted(file_names):
                lora, entry = ours[name], modules[name]
                for part in ("lora_down", "lora_up"):
                    p = getattr(lora, part).weight
                    p.copy_(entry[part].reshape(p.shape).to(p.dtype))
                a = file_alpha(entry)
                if not math.isclose(a, lora.configured_alpha, rel_tol=1e-3):
                    alpha_diff.add((a, lora.configured_alpha))
                lora.alpha.fill_(a)
                lora.update_scale()
        if alpha_diff:
            pairs = ", ".join(f"{a:g} (network: {c:g})" for a, c in sorted(alpha_diff))
            logger.warning("%s: alpha in the file differs from --network_alpha/conv_alpha: %s; the file's alpha is "
                           "used, for training and in the saved file (sd-scripts trains at --network_alpha but saves "
                           "the file's)", path, pairs)
        logger.info("%s: loaded %d LoRA modules", path, len(file_names))
        return {"loaded": sorted(file_names), "missing": missing, "ignored": ignored}


def _fits(t: torch.Tensor, want) -> bool:
    """A file's tensor fits a LoRA weight of shape `want`: the same shape, or 2D vs 4D [o, i, 1, 1]."""
    return tuple(t.shape) == tuple(want) or _squeezable(t.shape, want)


def _squeezable(a, b) -> bool:
    """2D [o,i] vs 4D [o,i,1,1]: the same weights (sd-scripts' single-file SD2 proj_in/out are 4D)."""
    a, b = tuple(a), tuple(b)
    if len(a) == 4 and len(b) == 2:
        a, b = b, a
    return len(a) == 2 and len(b) == 4 and b[2:] == (1, 1) and a == b[:2]


def _unet_names(model, conv: bool) -> list[str]:
    return [t.lora_name for t in _unet_targets(model, conv)]


def _read_lora_file(path: str, flag: str = "--network_weights") -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise LoRAWeightsError(f"{flag} {path}: file not found")
    if not path.endswith(".safetensors"):
        raise LoRAWeightsError(f"{flag} {path}: only .safetensors LoRA files are supported (pickled "
                               ".ckpt/.pt files are not loaded); convert it to .safetensors first")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - report any parse failure as a user-facing error
        raise LoRAWeightsError(f"{flag} {path}: cannot read it as safetensors ({e})") from e


_SUFFIXES = {".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up", ".alpha": "alpha"}


def file_alpha(entry: dict) -> float:
    """A module's alpha in a kohya file: missing or 0 means alpha = rank, as sd-scripts' LoRAModule reads it (a 0
    taken as is would train and apply the LoRA at scale 0)."""
    alpha = float(entry["alpha"].float().item()) if "alpha" in entry else 0.0
    return alpha or float(entry["lora_down"].shape[0])


def _group_kohya_keys(sd: dict) -> tuple[dict[str, dict], list[str]]:
    modules: dict[str, dict] = {}
    extra = []
    for k, v in sd.items():
        for suf, part in _SUFFIXES.items():
            if k.endswith(suf):
                name = k[: -len(suf)]
                if name.startswith(LORA_PREFIX_UNET + "_") or name.startswith(LORA_PREFIX_TEXT_ENCODER):
                    modules.setdefault(name, {})[part] = v
                    break
        else:
            extra.append(k)
    incomplete = [n for n, e in modules.items() if "lora_down" not in e or "lora_up" not in e]
    extra += [f"{n}.<lora_down/lora_up missing>" for n in incomplete]
    for n in incomplete:
        del modules[n]
    return modules, extra


def dims_from_weights(path) -> dict:
    """--dim_from_weights: the ranks and alphas of a kohya LoRA file, for a network that continues it. "modules" maps
    each module name to its (rank, alpha), as sd-scripts' `create_network_from_weights` reads them, so a file with
    per-module ranks (a resized LoRA, a block-wise one) is continued module for module; `network_dim` /
    `network_alpha` (Linear and 1x1 modules) and `conv_dim` / `conv_alpha` (3x3 convs, C3Lier) are the most common
    values of each kind, for the metadata and for modules the file lacks. A missing alpha means alpha = rank."""
    path = os.fspath(path)
    modules, extra = _group_kohya_keys(_read_lora_file(path))
    if extra or not modules:
        raise LoRAWeightsError(f"--dim_from_weights: {path} is not a plain kohya LoRA (networks.lora)")
    found: dict[str, Counter] = {"network": Counter(), "conv": Counter()}
    out: dict = {"modules": {}}
    for name, e in modules.items():
        d = e["lora_down"]
        rank_alpha = (int(d.shape[0]), file_alpha(e))
        found["conv" if d.dim() == 4 and tuple(d.shape[2:]) != (1, 1) else "network"][rank_alpha] += 1
        out["modules"][name] = rank_alpha
    for kind, counts in found.items():
        if counts:
            (rank, alpha), _ = counts.most_common(1)[0]
            out.update({f"{kind}_dim": rank, f"{kind}_alpha": alpha})
    return out


def _conv_rank_alpha(modules: dict, conv_names: set) -> tuple[int, str]:
    ranks, alphas = Counter(), Counter()
    for name, e in modules.items():
        d = e["lora_down"]
        if name in conv_names and d.dim() == 4 and tuple(d.shape[2:]) != (1, 1):
            ranks[d.shape[0]] += 1
            alphas[f"{file_alpha(e):g}"] += 1
    return (ranks.most_common(1)[0][0] if ranks else 0), (alphas.most_common(1)[0][0] if alphas else "1")


def _describe_file(sd: dict, modules: dict | None = None) -> str:
    """One sentence on what a LoRA file seems to be made for (base model, rank, variant)."""
    keys = list(sd)
    if modules is None:
        modules, _ = _group_kohya_keys(sd)
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) or ".lora_A." in k
           or ".lora.down." in k for k in keys):
        return "It looks like a diffusers/PEFT-format LoRA (not kohya keys)."
    if any("lora_mid" in k or "hada_" in k or "lokr_" in k for k in keys):
        return "It looks like a LyCORIS file."
    if any("dora_scale" in k for k in keys):
        return "It looks like a DoRA file."
    arch = None
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        arch = "SDXL"
    ctx = None
    for n, e in modules.items():
        if n.endswith("attn2_to_k") and n.startswith(LORA_PREFIX_UNET):
            ctx = e["lora_down"].shape[-1]
            break
    if arch is None and ctx is not None:
        arch = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(int(ctx))
    if arch is None:
        for n, e in modules.items():
            if n.startswith("lora_te_") and n.endswith("self_attn_q_proj"):
                arch = {768: "SD1.x", 1024: "SD2.x"}.get(int(e["lora_down"].shape[-1]))
                break
    if arch is None and any(n.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks")) for n in names):
        arch = "an LDM/SGM-named UNet (SDXL or LDM-named SD1)"
    ranks = Counter(int(e["lora_down"].shape[0]) for e in modules.values())
    rank_txt = ", ".join(f"{r}" for r, _ in ranks.most_common(3))
    n_te = sum(n.startswith(LORA_PREFIX_TEXT_ENCODER) for n in names)
    conv = any(e["lora_down"].dim() == 4 and tuple(e["lora_down"].shape[2:]) != (1, 1) for e in modules.values())
    what = arch or "an unknown base model"
    return (f"The file appears to be made for {what} (rank {rank_txt}; {n_te} text-encoder and "
            f"{len(names) - n_te} UNet modules{'; C3Lier conv modules' if conv else ''}).")


def describe_lora_file(path) -> str:
    """What a kohya LoRA file seems to be for, in one sentence (used in error messages and by tools)."""
    return _describe_file(_read_lora_file(os.fspath(path)))


# --------------------------------------------------------------------------------------------------------------------
# construction from CLI args


def parse_network_args(network_args) -> dict:
    """["conv_dim=8", "conv_alpha=4"] -> {"conv_dim": 8, "conv_alpha": 4.0}; unknown keys and bad values raise
    LoRAWeightsError naming the key."""
    out = {}
    for item in network_args or []:
        if "=" not in str(item):
            raise LoRAWeightsError(f"--network_args {item!r}: expected key=value (e.g. conv_dim=8)")
        key, value = (s.strip() for s in str(item).split("=", 1))
        if key not in NETWORK_ARGS:
            raise LoRAWeightsError(
                f"--network_args: unknown key {key!r}; supported keys for networks.lora here: "
                f"{', '.join(NETWORK_ARGS)}")
        if value.lower() == "none":
            out[key] = None
            continue
        if NETWORK_ARGS[key] is str:
            out[key] = value
            continue
        try:
            out[key] = NETWORK_ARGS[key](float(value)) if NETWORK_ARGS[key] is int else float(value)
            if NETWORK_ARGS[key] is int and float(value) != int(float(value)):
                raise ValueError
        except ValueError:
            raise LoRAWeightsError(
                f"--network_args {key}={value!r}: expected {'an integer' if NETWORK_ARGS[key] is int else 'a number'}"
            ) from None
        if key.startswith("loraplus") and not out[key] > 0:  # 0: the up weights, and so the LoRA, never train
            raise LoRAWeightsError(f"--network_args {key}={value}: must be above 0 (the up weights learn at lr x "
                                   f"ratio; 16 is LoRA+'s usual value), or leave it out")
    return out


def create_network(model, args, module_dims: dict | None = None) -> LoRANetwork:
    """Build the network from trainer args (argparse Namespace): network_dim (None → 4), network_alpha (None → 1.0),
    network_dropout, network_args ("k=v" list: conv_dim, conv_alpha (1.0 when conv_dim is set), rank_dropout,
    module_dropout, the LoRA+ ratios loraplus_lr_ratio / loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio,
    the block-wise keys of networks/lora_blocks.py),
    network_train_unet_only, network_train_text_encoder_only. `module_dims`: a (rank, alpha) per module name, from
    `dims_from_weights` (--dim_from_weights). Does not apply it (call apply_to())."""
    dim = getattr(args, "network_dim", None)
    dim = 4 if dim is None else dim
    alpha = getattr(args, "network_alpha", None)
    alpha = 1.0 if alpha is None else float(alpha)
    raw = getattr(args, "network_args", None) or []
    if isinstance(raw, str):
        raw = raw.split()
    kw = parse_network_args(raw)
    conv_dim = kw.get("conv_dim")
    conv_alpha = kw.get("conv_alpha")
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    unet_only = bool(getattr(args, "network_train_unet_only", False))
    te_only = bool(getattr(args, "network_train_text_encoder_only", False))
    if unet_only and te_only:
        raise LoRAWeightsError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    from networks.lora_blocks import BlockArgsError, parse_block_args

    try:
        plan = parse_block_args(kw, model.arch, int(dim), alpha, conv_dim, conv_alpha)
    except BlockArgsError as e:
        raise LoRAWeightsError(str(e)) from None
    network = LoRANetwork(
        model,
        multiplier=1.0,
        lora_dim=dim,
        alpha=alpha,
        dropout=getattr(args, "network_dropout", None),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        rank_dropout=kw.get("rank_dropout"),
        module_dropout=kw.get("module_dropout"),
        train_unet=not te_only,
        train_text_encoder=not unet_only,
        block_plan=plan,
        module_dims=module_dims,
    )
    network.set_fused(not getattr(args, "no_fused_lora", False))
    network.loraplus = {"all": kw.get("loraplus_lr_ratio"), "unet": kw.get("loraplus_unet_lr_ratio"),
                        "text_encoder": kw.get("loraplus_text_encoder_lr_ratio")}
    network.network_args = {str(item).split("=", 1)[0].strip(): str(item).split("=", 1)[1].strip() for item in raw}
    return network
