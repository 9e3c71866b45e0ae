"""--torch_compile / --dynamo_backend (sd-scripts' flags): the UNet's repeated blocks compiled with torch.compile.

sd-scripts hands the whole UNet to accelerate, which wraps it in one `torch.compile`. Here each ResnetBlock2D and
BasicTransformerBlock is compiled in place instead ("regional compilation", diffusers' `compile_repeated_blocks`):
blocks of the same shape share one compiled graph, so the compile time follows the number of *distinct* blocks,
not the UNet's depth (SDXL's 70 transformer blocks come in two widths). Measured on the tiny SD1 model on CPU
(bench/compile_time.py): the whole UNet traces for ~4x longer than its blocks for the same steps.

What still multiplies the graphs, each compiled once and reused after: every bucket shape (after the second shape
of a block, dynamo's automatic dynamic shapes make one graph for the rest), grad mode (APT's prior pass runs
without grad) and the LoRA's multiplier (0 in the prior pass). A graph is compiled the first time its shape is met,
so the first steps of a run are slow; `compile_report` says how many graphs and how long they took. APT's capture
(apt_ext/capture.py) hands its tensors over outside the graphs (`torch.compiler.disable`), so it does not
specialise a graph per captured layer.

Not compiled: the text encoders (their LoRA trains in the default setting; they are a small part of a step), the
VAE (cached latents) and APT's loss arithmetic. Compile time is paid per run (inductor keeps an on-disk cache of
generated code in its cache dir, so a later run with the same shapes compiles faster). The fast path of issue 6 is
the CUDA graphs (docs/speed.md); the two are not combined yet.
"""
from __future__ import annotations

import importlib.util
import logging
import time

import torch

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256  # graphs per block type: distinct shapes x buckets x passes; torch's default (8) falls back
# to eager without an error once a block type has been compiled 8 times


def compiled_block_types() -> tuple:
    """The module classes compiled in place: the UNet's repeated blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, BasicTransformerBlock)


def available_backends() -> list[str]:
    """Backends torch.compile accepts here, the debugging ones ("eager", "aot_eager") included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def backend_problem(backend: str, cuda: bool) -> str | None:
    """Why `backend` cannot be used in this environment (None: it can), as the message for the user. Inductor is
    refused on the CPU: its C++ code gives a wrong input gradient where a LayerNorm of a transposed input feeds four
    matmuls, which a LoRA'd transformer block is at batch 1 (LoRA gradients 10% off; `python -m
    bench.inductor_grad_check` shows it), where "aot_eager_decomp_partition" (the same decompositions and
    partitioning, no generated code) is exact."""
    known = available_backends()
    if backend not in known:
        return f"--dynamo_backend {backend!r} is not a torch.compile backend of this torch; one of {', '.join(known)}"
    if backend == "inductor":
        if cuda and importlib.util.find_spec("triton") is None:
            return ("--dynamo_backend inductor on CUDA needs the triton package (installed with CUDA builds of "
                    "torch): install it, or pick another backend, or leave out --torch_compile")
        if not cuda:
            return (f"--dynamo_backend inductor on the CPU computes wrong LoRA gradients with torch "
                    f"{torch.__version__.split('+')[0]} (measured here: 10% off a float64 reference once the batch "
                    f"size changes; `python -m bench.inductor_grad_check` checks it, docs/speed.md): use "
                    f"--dynamo_backend aot_eager on the CPU, or leave out --torch_compile")
    return None


def fresh_backend_per_graph(backend: str):
    """An aot_autograd backend by name ("aot_eager", ...) as a callable that builds it anew for each graph. The
    object older torch registers (2.4 here) wraps its own backward compiler again at every graph it compiles
    (pytorch#93935), so the wrappers nest with every recompilation; with a LoRA'd UNet's ~60 graphs the nesting
    passed Python's recursion limit on torch 2.4 (RecursionError in `_wrapped_bw_compiler`). Newer torch (2.13)
    registers a function that builds one per graph already, and inductor builds its own each time: those are
    returned as they are."""
    from torch._dynamo import lookup_backend
    from torch._dynamo.backends.common import AotAutograd

    registered = lookup_backend(backend)
    if not isinstance(registered, AotAutograd):
        return backend
    kwargs = dict(registered.kwargs)

    def build_and_compile(gm, example_inputs, **kw):
        return AotAutograd(**kwargs)(gm, example_inputs, **kw)

    return build_and_compile


def compile_unet_blocks(unet: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile every repeated block of `unet` in place (`nn.Module.compile`: the module object, its parameters,
    hooks and attention processors stay as they are). Returns how many blocks were compiled."""
    import torch._dynamo

    config = torch._dynamo.config
    # torch < 2.6 names them cache_size_limit and accumulated_cache_size_limit
    for name, limit in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit", 16 * RECOMPILE_LIMIT)):
        name = name if hasattr(config, name) else name.replace("recompile", "cache_size")
        setattr(config, name, max(getattr(config, name), limit))
    blocks = [m for m in unet.modules() if isinstance(m, compiled_block_types())]
    compile_with = fresh_backend_per_graph(backend)
    for m in blocks:
        m.compile(backend=compile_with)
    return len(blocks)


class CompileReport:
    """Graphs compiled, graph breaks and seconds spent compiling since it was made (dynamo's own counters)."""

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, float]:
        from torch._dynamo.utils import counters

        seconds = sum(sum(v) for v in _compile_time_metrics().values())
        return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), seconds

    def delta(self) -> dict:
        now = self._read()
        return {"graphs": now[0] - self._start[0], "graph_breaks": now[1] - self._start[1],
                "compile_s": now[2] - self._start[2]}

    def __str__(self) -> str:
        d = self.delta()
        return (f"torch.compile: {d['graphs']} graphs compiled in {d['compile_s']:.1f}s "
                f"({d['graph_breaks']} graph breaks)")


def _compile_time_metrics() -> dict:
    """dynamo's per-phase compile times ({name: [seconds, ...]}); only the outermost phase is summed."""
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", {})
    return {k: v for k, v in metrics.items() if k == "_compile.compile_inner"}


def maybe_compile(args, unet: torch.nn.Module) -> CompileReport | None:
    """--torch_compile: compile the UNet's blocks with --dynamo_backend and return the report to print once the
    run has compiled (None without the flag)."""
    if not getattr(args, "torch_compile", False):
        return None
    report = CompileReport()
    t0 = time.perf_counter()
    n = compile_unet_blocks(unet, args.dynamo_backend)
    logger.info("--torch_compile: %d UNet blocks wrapped for torch.compile (backend %s, %.2fs); the first steps of "
                "each bucket shape compile, later ones reuse the graphs", n, args.dynamo_backend,
                time.perf_counter() - t0)
    return report
