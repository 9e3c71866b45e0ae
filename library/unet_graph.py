"""The training step's UNet (and text-encoder) forward and backward replayed as CUDA graphs, one pair per input
shape (issue 6).

A LoRA step at batch 1 on a GPU is bound by kernel launches and Python (docs/speed.md): SDXL dispatches ~13 000
ops per step, each a launch, for ~15 TFLOP of math. `torch.cuda.make_graphed_callables` records the forward and
the backward of a module once and replays each as one launch; autograd sees one node whose backward returns the
gradients of the trainable (LoRA) parameters, which then land in `.grad` as usual: the loss, clipping and the
optimizer stay eager and unchanged.

`unet_outputs` is the function recorded: the UNet prediction (float32) and, for APT, the capture record's tensors
(attention maps, (mu, sigma) pairs, `CaptureRecord.flat`), so what Python hooks collect while recording is
returned as graph outputs. `GraphedPass` keeps one recording per input signature (aspect bucket, batch size) up
to `max_graphs` and while GPU memory allows; further shapes run eagerly (same function, same results), so a
many-bucket dataset cannot fill the GPU with recorded activations. `text_outputs` is the text encoders'
function, recorded the same way when their LoRA trains (--text_encoder_cuda_graph): its context output then
carries gradients into the UNet's recording, whose backward returns the context's gradient. Backend "eager"
(`replay_without_cuda`) runs the function at each call but keeps a recording's structure and memory: one autograd
node, outputs and parameter gradients in buffers that the next call overwrites; the CPU tests check everything but
the recording itself.

What a recording fixes, and the trainer therefore refuses with the flag: a Python decision taken per call (LoRA
module dropout draws on the CPU), gradient checkpointing (untested inside a graph), and a `.grad` that a
replay overwrites: with gradient accumulation the gradients are kept allocated (`keep_grads`), so autograd adds
into them instead of adopting the graph's output buffer.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("cuda", "eager")


def signature(inputs: Sequence[Optional[torch.Tensor]]) -> tuple:
    """What a recorded graph is specific to: each input's shape, dtype and device (None stays None)."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, str(t.device)) for t in inputs)


# CUDA's capture mode for every recording. In its default "global" mode a CUDA call that may be unsafe during a
# capture is an error in ANY thread: the data loader's pin-memory thread allocating pinned memory while a new bucket
# shape is recorded mid-run would fail, or invalidate the recording. "thread_local" restricts only the recording
# thread, which is all a recording needs.
CAPTURE_ERROR_MODE = "thread_local"


@contextlib.contextmanager
def thread_local_capture():
    """`torch.cuda.graph` recording in CAPTURE_ERROR_MODE for the code inside (make_graphed_callables takes no
    mode in torch 2.13 and records with `torch.cuda.graph(g, pool=...)`; later versions take one, default
    "global", and pass it on explicitly: so the mode is replaced, not defaulted)."""
    original = torch.cuda.graph

    class graph(original):
        def __init__(self, *args, **kwargs):
            if len(args) >= 4:  # (cuda_graph, pool, stream, capture_error_mode)
                args = (*args[:3], CAPTURE_ERROR_MODE, *args[4:])
            else:
                kwargs["capture_error_mode"] = CAPTURE_ERROR_MODE
            super().__init__(*args, **kwargs)

    torch.cuda.graph = graph
    try:
        yield
    finally:
        torch.cuda.graph = original


def graph_pool(owner: str, backend: str):
    """The memory pool for `owner`'s recordings (None for the "eager" backend), after checking the backend."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner} backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("a CUDA graph needs a CUDA device; this torch sees none")
    return torch.cuda.graph_pool_handle() if backend == "cuda" else None


GRAPH_FLAGS = ("unet_cuda_graph", "text_encoder_cuda_graph", "apt_cuda_graph")

_ADVICE = {  # what a blocker means for a user who asked for the flag
    "APT is off": " speeds up APT's prior pass: it needs --apt (or --loss_type dco)",
    "LoRA dropout": ": LoRA dropout is drawn per call, which a recorded graph cannot do{detail}: leave out "
                    "--network_dropout and the rank/module dropout network_args, or the flag",
    "--gradient_checkpointing": " cannot be combined with --gradient_checkpointing yet: leave one of them out",
    "no CUDA device": " needs a CUDA device (this torch sees none): leave the flag out",
    "--torch_compile": " cannot be combined with --torch_compile yet (recording compiled blocks is untested): "
                       "leave one of them out",
    "no text-encoder LoRA trains": ": no text-encoder LoRA trains (--network_train_unet_only), so there is no "
                                   "training pass to record: leave the flag out (frozen text encoders are encoded "
                                   "once per caption with --cache_text_encoder_outputs)",
}


def graph_blockers(flag: str, *, cuda: bool, apt_on: bool, gradient_checkpointing: bool, trains_text_encoder: bool,
                   has_dropout: bool = False, torch_compile: bool = False) -> list[str]:
    """Why `flag`'s recording cannot be used in this run ([]: it can). The one list behind --cuda_graphs auto, the
    flag checks before the model loads and the LoRA checks once the network is built (dropout).

    The UNet's and the text encoders' recordings need CUDA, no LoRA dropout (drawn per call) and no gradient
    checkpointing (datasets with different `network_multiplier` values are fine: the LoRA then reads its
    multiplier from a device tensor, `LoRANetwork.keep_multiplier_on_device`); the text encoders' needs their LoRA
    to train; the prior pass's needs CUDA and APT (it runs with the LoRA off and without grad, so dropout and
    checkpointing do not touch it). None records compiled blocks (--torch_compile) yet."""
    if flag not in GRAPH_FLAGS:
        raise ValueError(f"unknown graph flag {flag!r}; one of {GRAPH_FLAGS}")
    compiled = ["--torch_compile"] if torch_compile else []
    if flag == "apt_cuda_graph":
        return ([] if apt_on else ["APT is off"]) + ([] if cuda else ["no CUDA device"]) + compiled
    reasons = ["LoRA dropout"] if has_dropout else []
    reasons += ["--gradient_checkpointing"] if gradient_checkpointing else []
    reasons += [] if cuda else ["no CUDA device"]
    if flag == "text_encoder_cuda_graph" and not trains_text_encoder:
        reasons.append("no text-encoder LoRA trains")
    return reasons + compiled


def blocker_message(flag: str, reason: str, detail: str = "") -> str:
    """The error for a user who set `flag` in a run that `reason` (from `graph_blockers`) rules out."""
    return f"--{flag}" + _ADVICE[reason].format(detail=detail)


def auto_cuda_graphs(args, device_type: str, has_dropout: bool, trains_text_encoder: bool, apt_on: bool) -> dict:
    """--cuda_graphs auto: which of the graph flags this run can use (`graph_blockers`). Sets those on `args` and
    returns {flag: "" if turned on, else why not}; a flag the user set already stays set ("" too)."""
    why = {}
    for flag in GRAPH_FLAGS:
        reasons = graph_blockers(flag, cuda=device_type == "cuda", apt_on=apt_on,
                                 gradient_checkpointing=args.gradient_checkpointing,
                                 trains_text_encoder=trains_text_encoder, has_dropout=has_dropout,
                                 torch_compile=args.torch_compile)
        if getattr(args, flag):
            reasons = []
        elif not reasons:
            setattr(args, flag, True)
        why[flag] = ", ".join(reasons)
    return why


def _autocast(device_type: str, weight_dtype: torch.dtype):
    """Autocast to `weight_dtype` with its weight-cast cache off (graph recording requires that; the cache only
    saves casts between repeated calls within one autocast region, so the results are the same); no context at
    float32 (then any device works, the meta device of the sync audit in tests/test_no_host_sync.py included)."""
    import contextlib

    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=weight_dtype, cache_enabled=False)


def unet_outputs(model, weight_dtype: torch.dtype, device_type: str, capture_ctx: Optional[Callable] = None,
                 tag: str = "ft") -> Callable:
    """fn(noisy, timesteps, context, pooled, time_ids) -> [pred (float32), *captured tensors]: the UNet forward
    under `_autocast`. `capture_ctx(tag)`: APT's capture context, whose record is returned flattened."""
    from library.conditioning import TextConditioning, unet_forward

    def fn(noisy, timesteps, context, pooled, time_ids):
        import contextlib

        cap = capture_ctx(tag) if capture_ctx is not None else contextlib.nullcontext()
        with cap as rec, _autocast(device_type, weight_dtype):
            pred = unet_forward(model, noisy, timesteps, TextConditioning(context, pooled), time_ids).float()
        return [pred] if rec is None else [pred, *rec.flat()]

    return fn


def text_outputs(model, weight_dtype: torch.dtype, device_type: str, clip_skip: Optional[int] = None,
                 max_token_length: Optional[int] = None) -> Callable:
    """fn(*ids) -> [context] (SD1/SD2) or [context, pooled] (SDXL), in `weight_dtype`: the text encoders on
    token ids (`conditioning.encode_ids`, one tensor per encoder) under `_autocast`. What the trainer's text
    encoding runs, eagerly or recorded by --text_encoder_cuda_graph."""
    from library.conditioning import encode_ids

    def fn(*ids):
        with _autocast(device_type, weight_dtype):
            cond = encode_ids(model, ids, clip_skip=clip_skip, max_token_length=max_token_length)
        return [t.to(weight_dtype) for t in (cond.context, cond.pooled) if t is not None]

    return fn


class _Call(torch.nn.Module):
    """`fn` as a module whose parameters are the trainable ones: `make_graphed_callables` returns gradients for
    a module's parameters only (the UNet's own weights are frozen and not in it). Inputs that are None are
    fixed per recording and put back here."""

    def __init__(self, fn: Callable, params: Sequence[torch.nn.Parameter], none_mask: tuple):
        super().__init__()
        self.fn, self.none_mask = fn, none_mask
        self.params = torch.nn.ParameterList(params)  # the same Parameter objects, not copies

    def forward(self, *tensors):
        it = iter(tensors)
        args = [None if is_none else next(it) for is_none in self.none_mask]
        return tuple(self.fn(*args))


def replay_without_cuda(module: _Call, n_args: int) -> Callable:
    """What `make_graphed_callables(module, ...)` returns, run eagerly: one autograd node whose outputs are views of
    buffers that the next call overwrites, and whose backward returns the parameters' gradients as views of
    buffers that the next backward overwrites — a recording's static memory. The CPU tests meet the aliasing a
    replay has (a `.grad` that adopts the gradient buffer, outputs kept past the next call)."""
    params = tuple(module.parameters())
    state: dict = {}

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            user = [a.detach().requires_grad_(a.requires_grad) for a in args[:n_args]]
            with torch.enable_grad():
                outs = module(*user)
            state["user"], state["outs"] = user, outs
            bufs = state.setdefault("out_bufs", [torch.empty_like(o) for o in outs])
            for b, o in zip(bufs, outs):
                b.copy_(o.detach())
            return tuple(b.detach() for b in bufs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            surface = [*state["user"], *params]
            wanted = [i for i, t in enumerate(surface) if t.requires_grad]
            got = torch.autograd.grad(state["outs"], [surface[i] for i in wanted], grads, allow_unused=True)
            bufs = state.setdefault("grad_bufs", {})
            out: list = [None] * len(surface)
            for i, g in zip(wanted, got):
                if g is not None:
                    buf = bufs.setdefault(i, torch.empty_like(g))
                    buf.copy_(g)
                    out[i] = buf.detach()
            return tuple(out)

    return lambda *args: Replay.apply(*args, *params)


def cuda_memory() -> tuple[int, int]:
    """(bytes allocated by torch, bytes still available to it: free on the device plus its cached blocks)."""
    free, _total = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    return allocated, free + torch.cuda.memory_reserved() - allocated


class GraphedPass:
    """`fn(*inputs) -> list of tensors` with autograd to `params`, replayed from CUDA graphs per input signature.

    `fn` must take every per-call tensor as an argument and touch nothing else that changes between calls except
    the parameters' values (updated in place by the optimizer, as graphs need).

    A recording keeps its activations for good, so a new shape is recorded only while `max_graphs` allows and
    the memory still available holds `headroom` times the largest recording so far (one for the new recording,
    the rest for the eager passes of the shapes without one); otherwise it runs eagerly, with one warning.
    `memory() -> (allocated, available)` bytes: `cuda_memory` on CUDA, none (no check) for the eager backend
    unless given."""

    def __init__(self, fn: Callable, params: Sequence[torch.nn.Parameter], backend: str = "cuda",
                 max_graphs: int = 2, warmup: int = 3, memory: Optional[Callable[[], tuple]] = None,
                 headroom: float = 2.0):
        self.pool = graph_pool("GraphedPass", backend)
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.fn, self.params, self.backend = fn, [p for p in params if p.requires_grad], backend
        self.max_graphs, self.warmup = max_graphs, warmup
        self.memory = memory if memory is not None else (cuda_memory if backend == "cuda" else None)
        self.headroom, self.cost = headroom, 0  # cost: the largest recording's memory (bytes)
        self.recorded: dict[tuple, Callable] = {}  # signature -> graphed callable (or the eager one)
        self.eager_calls = 0  # calls of shapes left without a recording

    def __len__(self) -> int:
        return len(self.recorded)

    def __call__(self, *inputs: Optional[torch.Tensor]) -> list[torch.Tensor]:
        key = signature(inputs)
        call = self.recorded.get(key)
        if call is not None:
            return list(call(*(x for x in inputs if x is not None)))
        why = self._why_not_record()
        if why:
            if self.eager_calls == 0:
                logger.warning("shape %s runs without a CUDA graph: %s", key, why)
            self.eager_calls += 1
            return list(self.fn(*inputs))
        before = self.memory()[0] if self.memory is not None else 0
        call = self.recorded[key] = self._record(inputs)
        out = list(call(*(x for x in inputs if x is not None)))
        if self.memory is not None:  # what the recording (its static outputs and saved activations) holds
            self.cost = max(self.cost, self.memory()[0] - before)
        return out

    def _why_not_record(self) -> str:
        """Why a new shape gets no recording ("" if it does)."""
        if len(self.recorded) >= self.max_graphs:
            return (f"{self.max_graphs} shapes are recorded already (raise the limit with --unet_cuda_graph_max, at "
                    "the cost of GPU memory)")
        if self.memory is not None and self.recorded:
            available = self.memory()[1]
            if self.headroom * self.cost > available:
                return (f"a recording holds ~{self.cost / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available "
                        f"(needed: {self.headroom:g}x, to leave room for the passes without a recording)")
        return ""

    def module_for(self, inputs) -> _Call:
        """The module recorded for `inputs`' signature (its None inputs fixed)."""
        return _Call(self.fn, self.params, tuple(x is None for x in inputs))

    def _record(self, inputs) -> Callable:
        module = self.module_for(inputs)
        if self.backend == "eager":
            return replay_without_cuda(module, sum(x is not None for x in inputs))
        sample = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs if x is not None)
        with thread_local_capture():
            return torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=self.warmup,
                                                     allow_unused_input=True, pool=self.pool)
