"""--torch_compile's cost and gain: graphs compiled, warm-up seconds and step time against the eager step, side by
side in one process per row.

Each row builds the trainer's step (`bench.common.build_step_fn`), times it eagerly, then compiles the UNet's
blocks in place (`library.torch_compile.compile_unet_blocks`, what --torch_compile does) and runs steps until two
in a row compile nothing: that is the warm-up (its wall time, and dynamo's own compile seconds); then it times the
compiled step. Inductor's on-disk cache is pointed at a fresh folder, so the warm-up is a first run's.

On the CPU the models are the *narrow* real layouts of bench/op_count.py (SD1.5's and SDXL's depths, blocks and
LoRA targets, small widths) at a 16x16 latent: the number of graphs, and dynamo's tracing time, depend on the
layout, not on the widths, so the warm-up column is the real layout's on this CPU; the step times are not a GPU's.
With CUDA, `--real` builds the full-size models (bf16) at 512 / 1024 px, the issue's settings.

    python -m bench.compile_time                                   # narrow SD1.5 + SDXL, APT, aot_eager + inductor
    python -m bench.compile_time --archs sdxl --backends inductor --real --out bench/results/compile_time-H100.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

RESULT = "COMPILE_RESULT "


def worker(arch: str, backend: str, apt: bool, real: bool, steps: int, max_warmup: int) -> dict:
    from bench.common import build_bench_model, build_step_fn, make_batch, make_bench_args, time_steps
    from bench.op_count import LATENT, build_narrow_model
    from library.torch_compile import CompileReport, compile_unet_blocks

    cuda = torch.cuda.is_available() and real
    device = "cuda" if cuda else "cpu"
    if real:
        model = build_bench_model(arch, real=True, device=device, dtype=torch.bfloat16)
        resolution, precision = (1024 if arch == "sdxl" else 512), "bf16"
    else:
        model = build_narrow_model(arch)
        resolution, precision = LATENT * 8, "no"
    extra = ["--cache_text_encoder_outputs", "--network_train_unet_only"] + (["--apt"] if apt else [])
    args = make_bench_args(rank=32, mixed_precision=precision, extra=extra)
    bench = build_step_fn(model, args, device=device, batch=make_batch(model, 1, resolution=resolution))
    eager_s, _ = time_steps(bench.step_fn, 2, steps, device)

    report = CompileReport()
    compile_unet_blocks(model.unet, backend)
    warm, graphs, quiet = [], [], 0
    while quiet < 2 and len(warm) < max_warmup:
        t0 = time.perf_counter()
        bench.step_fn()
        if cuda:
            torch.cuda.synchronize()
        warm.append(time.perf_counter() - t0)
        graphs.append(report.delta()["graphs"])
        quiet = quiet + 1 if len(graphs) > 1 and graphs[-1] == graphs[-2] else 0
    compiled_s, _ = time_steps(bench.step_fn, 0, steps, device)
    d = report.delta()
    return {"arch": arch, "backend": backend, "apt": apt, "real": real, "device": device,
            "lora_modules": len(bench.network.unet_loras), "graphs": d["graphs"], "graph_breaks": d["graph_breaks"],
            "compile_s": d["compile_s"], "warmup_steps": len(warm), "warmup_s": sum(warm),
            "settled": quiet >= 2, "eager_s": eager_s, "compiled_s": compiled_s}


def run_row(arch: str, backend: str, apt: bool, real: bool, steps: int, max_warmup: int, timeout: float) -> dict:
    """`worker` in a fresh process (dynamo's caches and counters are per process) with an empty inductor cache."""
    base = {"arch": arch, "backend": backend, "apt": apt, "real": real}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "bench.compile_time", "--worker", json.dumps(
            {"arch": arch, "backend": backend, "apt": apt, "real": real, "steps": steps, "max_warmup": max_warmup})]
        try:
            proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {**base, "error": (proc.stderr.strip().splitlines() or ["no result"])[-1][:200]}


def table(rows: list[dict]) -> str:
    out = ["| layout | step | backend | graphs | graph breaks | warm-up (steps) | of which compiling | eager step "
           "| compiled step | compiled / eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layout = f"{r['arch']} ({'real' if r['real'] else 'narrow'})"
        step = "APT" if r["apt"] else "plain"
        if "error" in r:
            out.append(f"| {layout} | {step} | {r['backend']} | error: {r['error']} | | | | | | |")
            continue
        settled = "" if r["settled"] else ", still compiling"
        out.append(f"| {layout} | {step} | {r['backend']} | {r['graphs']} | {r['graph_breaks']} "
                   f"| {r['warmup_s']:.1f} s ({r['warmup_steps']}{settled}) | {r['compile_s']:.1f} s "
                   f"| {r['eager_s'] * 1e3:.0f} ms | {r['compiled_s'] * 1e3:.0f} ms "
                   f"| {r['compiled_s'] / r['eager_s']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--archs", default="sd1,sdxl")
    p.add_argument("--backends", default="aot_eager,inductor")
    p.add_argument("--steps", default="apt", help="apt, plain or apt,plain")
    p.add_argument("--real", action="store_true", help="full-size models on CUDA (default: narrow layouts)")
    p.add_argument("--timed_steps", type=int, default=5)
    p.add_argument("--max_warmup", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = p.parse_args(argv)
    if a.worker:
        kw = json.loads(a.worker)
        print(RESULT + json.dumps(worker(kw["arch"], kw["backend"], kw["apt"], kw["real"], kw["steps"],
                                         kw["max_warmup"])), flush=True)
        return 0
    if a.real and not torch.cuda.is_available():
        p.error("--real needs CUDA (full-size models); leave it out for the narrow layouts on this CPU")
    rows = []
    for arch in a.archs.split(","):
        for step in a.steps.split(","):
            for backend in a.backends.split(","):
                rows.append(run_row(arch, backend, step == "apt", a.real, a.timed_steps, a.max_warmup, a.timeout))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from bench.common import device_name

    text = (f"{table(rows)}\n\nDevice: {device_name('cuda' if a.real else 'cpu')}; torch {torch.__version__}; "
            f"batch 1, LoRA rank 32 on the UNet (text-encoder outputs cached); warm-up: steps until two in a row "
            f"compile nothing, inductor's cache empty.\n")
    print(text)
    from bench.common import write_result

    write_result(text, a.out)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
