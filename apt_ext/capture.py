"""Capture of cross-attention probabilities and hidden-state statistics for APT (DESIGN.md §2.4, §2.5).

    layers = select_layers(unet, model.arch, args.apt_layers)
    cap = APTCapture(unet, layers, rs_hook="attn1", rs_stats="scalar").install()
    with torch.no_grad(), cap.capture("prior") as prior:      # LoRA off, prompt c
        pred_prior = unet(...)
    with cap.capture("ft") as ft:                              # LoRA on, prompt c*, with grad
        pred = unet(...)
    prior.attn[i], ft.attn[i]: (B, N_query, N_tokens) float32 head-summed probabilities of attn2 module i
    prior.stats[j], ft.stats[j]: (mu, sigma) float32, (B,) or (B, C), of hidden-state module j

Only the attn2 modules of the selected blocks get `ProbCaptureAttnProcessor`; every other attention keeps its
processor (SDPA / xformers). Outside `capture(...)` nothing is stored.

Gradient checkpointing (diffusers' default, non-reentrant): the checkpointed transformer block is re-run during
backward, so the processors and hooks fire a second time. A record slot is filled once per `capture(...)` and
calls made inside a backward pass (`torch._C._current_graph_task_id() != -1`) never capture. The capture-only
ops run under plain saved-tensor hooks, so they are not part of the checkpoint's recomputation (the
checkpoint requires the recomputation to save exactly the tensors the first run saved) and the tensors they
need for backward (one hidden state per hooked module, in its own dtype) are kept as in a non-checkpointed run.
The captured tensors keep their graph to the LoRA parameters through the checkpoint's recomputation.
"""
from __future__ import annotations


from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from apt_ext.losses import RS_STATS, hidden_stats

RS_HOOKS = ("attn1", "transformer")
TAGS = ("prior", "ft")

#: the two highest-resolution up blocks that contain attention, per architecture (DESIGN.md §2.4)
DEFAULT_LAYERS = {"sd1": ["up_blocks.2", "up_blocks.3"], "sd2": ["up_blocks.2", "up_blocks.3"],
                  "sdxl": ["up_blocks.0", "up_blocks.1"]}


def _has_cross_attention(module: nn.Module) -> bool:
    return any(isinstance(m, Attention) and n.endswith("attn2") for n, m in module.named_modules())


def select_layers(unet: nn.Module, arch: str | None = None, layers: list[str] | None = None) -> list[str]:
    """Names of the UNet blocks whose attention APT uses.

    Default: the two highest-resolution up blocks that contain cross-attention, chosen by block, not pixel size
    (SD1/SD2: up_blocks.2, up_blocks.3; SDXL: up_blocks.0, up_blocks.1). With `arch` None they are found from the
    structure (up blocks run from low to high resolution: the last two with attention). `layers` (`apt_layers`)
    overrides: any module names containing cross-attention (e.g. "up_blocks.1", "mid_block").
    """
    modules = dict(unet.named_modules())
    if layers:
        out = []
        valid = [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if _has_cross_attention(b)]
        for name in layers:
            if name not in modules or not name:
                raise ValueError(f"apt_layers: no module {name!r} in the UNet; up blocks with attention: {valid}")
            if not _has_cross_attention(modules[name]):
                raise ValueError(f"apt_layers: {name!r} contains no cross-attention; up blocks with attention: {valid}")
            if name not in out:
                out.append(name)
        return out
    if arch is not None:
        if arch not in DEFAULT_LAYERS:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {tuple(DEFAULT_LAYERS)}")
        out = list(DEFAULT_LAYERS[arch])
        for name in out:
            if name not in modules or not _has_cross_attention(modules[name]):
                raise ValueError(f"{name} of this UNet has no cross-attention: is it really a {arch} UNet? "
                                 f"Set apt_layers explicitly")
        return out
    with_attn = [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if _has_cross_attention(b)]
    if len(with_attn) < 2:
        raise ValueError(f"the UNet has {len(with_attn)} up blocks with attention; set apt_layers explicitly")
    return with_attn[-2:]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (e.g. a checkpoint's recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


@contextmanager
def _plain_saved_tensors():
    """Save tensors for backward normally, even inside a non-reentrant checkpoint's forward (innermost hooks win)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


# ----------------------------------------------------------------------------------------------------------------
# attention processor
# ----------------------------------------------------------------------------------------------------------------


class ProbCaptureAttnProcessor:
    """Attention with an explicit float32 softmax(Q Kᵀ · scale), for the selected attn2 modules.

    The output is probs @ V computed in float32 and cast to the query's dtype: equal to `AttnProcessor2_0` (SDPA)
    within float32 rounding (about 1e-6 relative in fp32; closer to the exact result than SDPA in bf16/fp16).
    After computing the probabilities (B, H, N_query, N_tokens) it calls `sink(index, attn, probs)` if set.
    """

    def __init__(self, sink=None, index: int | None = None):
        self.sink = sink
        self.index = index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # autocast off: under --mixed_precision it would run these matmuls in bf16/fp16 despite the .float()
        device = query.device.type
        available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))  # False on meta
        autocast = available(device) and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if autocast else nullcontext():
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)  # (B, H, Nq, Nt) float32
            if self.sink is not None:
                self._emit(attn, probs)
            hidden_states = torch.matmul(probs, value.float()).to(query.dtype)  # Nt is 77..227: V is tiny

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    @torch.compiler.disable
    def _emit(self, attn: Attention, probs: torch.Tensor) -> None:
        """Hand the probabilities to the sink, outside any torch.compile graph (--torch_compile): the sink's
        bookkeeping (which record, which slot) is Python state that a traced graph would specialise on, one
        recompilation per layer and per filled slot."""
        self.sink(self.index, attn, probs)


# ----------------------------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CaptureRecord:
    """What one armed forward captured. Lists follow module order (`attn_names`, `stats_names`)."""

    tag: str
    attn_names: list[str]
    stats_names: list[str]
    attn: list = field(default_factory=list)  # (B, Nq, Nt) float32, head-summed; None until captured
    stats: list = field(default_factory=list)  # (mu, sigma) float32, (B,) or (B, C); None until captured
    num_heads: list = field(default_factory=list)  # H of each attn2 module

    def __post_init__(self):
        self.attn = [None] * len(self.attn_names)
        self.stats = [None] * len(self.stats_names)
        self.num_heads = [None] * len(self.attn_names)

    @property
    def complete(self) -> bool:
        return all(a is not None for a in self.attn) and all(s is not None for s in self.stats)

    def missing(self) -> list[str]:
        return ([n for n, a in zip(self.attn_names, self.attn) if a is None]
                + [n for n, s in zip(self.stats_names, self.stats) if s is None])

    def flat(self) -> list:
        """The captured tensors as one flat list (attention maps, then mu, sigma of each stats module): the
        outputs of a static pass (apt_ext/prior_graph.py). Inverse of `from_flat`."""
        return [*self.attn, *(x for mu_sigma in self.stats for x in mu_sigma)]

    @classmethod
    def from_flat(cls, tag: str, attn_names: list, stats_names: list, num_heads: list, tensors) -> "CaptureRecord":
        """The record whose `flat()` is `tensors`."""
        rec = cls(tag, list(attn_names), list(stats_names))
        n = len(rec.attn)
        if len(tensors) != n + 2 * len(rec.stats):
            raise ValueError(f"CaptureRecord.from_flat: {len(tensors)} tensors for {n} attention maps and "
                             f"{len(rec.stats)} (mu, sigma) pairs")
        rec.attn, rec.stats = list(tensors[:n]), list(zip(tensors[n::2], tensors[n + 1 :: 2]))
        rec.num_heads = list(num_heads)
        return rec


class APTCapture:
    """Installs the probability processors (attn2) and hidden-state hooks (attn1 or Transformer2DModel) on the
    selected blocks of a UNet, and captures into a `CaptureRecord` for one forward per `capture(tag)`."""

    def __init__(self, unet: nn.Module, layers: list[str], rs_hook: str = "attn1", rs_stats: str = "scalar"):
        if rs_hook not in RS_HOOKS:
            raise ValueError(f"apt_rs_hook must be one of {RS_HOOKS}, got {rs_hook!r}")
        if rs_stats not in RS_STATS:
            raise ValueError(f"apt_rs_stats must be one of {RS_STATS}, got {rs_stats!r}")
        if not layers:
            raise ValueError("APTCapture needs at least one layer (see select_layers)")
        self.unet, self.layers, self.rs_hook, self.rs_stats = unet, list(layers), rs_hook, rs_stats
        self.attn_modules: list[tuple[str, Attention]] = []
        self.stats_modules: list[tuple[str, nn.Module]] = []
        for layer in self.layers:
            block = unet.get_submodule(layer)
            for name, m in block.named_modules():
                full = f"{layer}.{name}" if name else layer
                if isinstance(m, Attention) and name.endswith("attn2"):
                    self.attn_modules.append((full, m))
                if rs_hook == "attn1" and isinstance(m, Attention) and name.endswith("attn1"):
                    self.stats_modules.append((full, m))
                if rs_hook == "transformer" and isinstance(m, Transformer2DModel):
                    self.stats_modules.append((full, m))
        if not self.attn_modules or not self.stats_modules:
            raise ValueError(f"no attn2 / {rs_hook} modules in {self.layers}")
        self._orig_processors: list | None = None
        self._hooks: list = []
        self._active: CaptureRecord | None = None
        self._armed_with_grad = False

    @property
    def attn_names(self) -> list[str]:
        return [n for n, _ in self.attn_modules]

    @property
    def stats_names(self) -> list[str]:
        return [n for n, _ in self.stats_modules]

    @property
    def installed(self) -> bool:
        return self._orig_processors is not None

    def install(self) -> "APTCapture":
        """Set the processors and register the hooks. Call it after anything that resets the UNet's attention
        processors (`enable_xformers_memory_efficient_attention`, `set_attn_processor`); LoRA may be applied
        before or after (the processor calls attn.to_q/to_k/to_v/to_out)."""
        if self.installed:
            return self
        self._orig_processors = [m.processor for _, m in self.attn_modules]
        for i, (_, m) in enumerate(self.attn_modules):
            m.set_processor(ProbCaptureAttnProcessor(self._on_attn, i))
        self._stats_index = {id(m): j for j, (_, m) in enumerate(self.stats_modules)}
        for _, m in self.stats_modules:
            self._hooks.append(m.register_forward_hook(self._on_stats))
        return self

    def remove(self) -> None:
        """Restore the original processors and remove the hooks."""
        if not self.installed:
            return
        for (_, m), proc in zip(self.attn_modules, self._orig_processors):
            m.set_processor(proc)
        for h in self._hooks:
            h.remove()
        self._hooks, self._orig_processors = [], None

    @contextmanager
    def capture(self, tag: str):
        """Arm capturing for one UNet forward; yields the `CaptureRecord` it fills.

        "prior": tensors are detached. "ft": tensors keep their graph (run the forward with grad enabled).
        On a normal exit every module must have been captured (else RuntimeError: e.g. the processors were
        replaced after `install()`)."""
        if tag not in TAGS:
            raise ValueError(f"capture tag must be one of {TAGS}, got {tag!r}")
        if not self.installed:
            raise RuntimeError("APTCapture.capture() before install()")
        if self._active is not None:
            raise RuntimeError(f"capture({tag!r}) while capture({self._active.tag!r}) is armed")
        rec = CaptureRecord(tag, self.attn_names, self.stats_names)
        self._active, self._armed_with_grad = rec, torch.is_grad_enabled()
        try:
            yield rec
        finally:
            self._active = None
        if not rec.complete:
            raise RuntimeError(
                f"APT capture({tag!r}) missed {rec.missing()[:4]}...: was the UNet called inside the `with` block, "
                f"and were its attention processors reset after APTCapture.install()?")

    # -- callbacks ---------------------------------------------------------------------------------------------

    def _slot_open(self, slots, index: int, name: str) -> CaptureRecord | None:
        """The armed record if module `index` should capture now, else None. `slots(rec)` is its slot list."""
        rec = self._active
        if rec is None or _in_backward():  # not armed, or a checkpoint's recomputation during backward
            return None
        if slots(rec)[index] is not None:
            raise RuntimeError(f"APT capture({rec.tag!r}): {name} ran twice in one armed forward; "
                               f"use one capture(...) per UNet call")
        if rec.tag == "ft" and self._armed_with_grad and not torch.is_grad_enabled():
            raise RuntimeError("APT capture('ft') ran without grad inside a grad-enabled forward: reentrant "
                               "gradient checkpointing is not supported (use diffusers' default, non-reentrant)")
        return rec

    def _on_attn(self, index: int, attn: Attention, probs: torch.Tensor) -> None:
        rec = self._slot_open(lambda r: r.attn, index, self.attn_modules[index][0])
        if rec is None:
            return
        with _plain_saved_tensors():
            a = probs.sum(dim=1)  # (B, Nq, Nt)
        rec.attn[index] = a.detach() if rec.tag == "prior" else a
        rec.num_heads[index] = int(probs.shape[1])

    @torch.compiler.disable
    def _on_stats(self, module, inputs, output):
        """The forward hook of every stats module (one callable for all, the index looked up here, outside any
        torch.compile graph, like `ProbCaptureAttnProcessor._emit`)."""
        index = self._stats_index[id(module)]
        rec = self._slot_open(lambda r: r.stats, index, self.stats_modules[index][0])
        if rec is None:
            return None
        x = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        with _plain_saved_tensors():
            mu, sigma = hidden_stats(x, self.rs_stats)
        if rec.tag == "prior":
            mu, sigma = mu.detach(), sigma.detach()
        rec.stats[index] = (mu, sigma)
        return None
