"""APT's cost: the reference LoRA step, this project's plain LoRA step and its APT step, side by side in one run.

    python -m bench.apt_overhead                     # tiny SD1 / SDXL on CPU (+ SD1.5, SDXL with CUDA)
    python -m bench.apt_overhead --configs sd15,sdxl --grad_ckpt off --out bench/results/apt_overhead-gpu.md
    python -m bench.apt_overhead --configs sdxl --extra_apt_args="--apt_cuda_graph --unet_cuda_graph"
                                                     # + "plain (fast)" and "APT (fast)" columns
    bash bench/gpu_check.sh        # on a GPU: sd15,sdxl at batch 1,4, gradient checkpointing off (APT_EXTRA=...)

Columns, per config (bench/common.py CONFIGS), batch size (`--batch_sizes`, default 1,4 on the GPU configs and 1 on
the tiny CPU ones) and gradient-checkpointing setting:
- reference: `bench/reference_step.py` (a byte-identical copy of `../shared/bench/reference_step.py`: a plain
  diffusers UNet + peft LoRA rank 32, eager, bf16 autocast, AdamW, random text conditioning, no text encoders). Its
  `run()` runs once per config and batch size in a fresh process (`--reference_worker`) on the matching architecture:
  sd15 -> SD15 at 512 px, sdxl -> SDXL at 1024 px, tiny-sd1 -> TINY_15 at 64 px, tiny-sdxl -> TINY_XL at 128 px; its
  JSON line gives the step (`train_s_gc0` / `train_s_gc1`, the mean over the timed steps) and the peak memory
  (`train_peakGiB_gc*`, max allocated over the timed steps; none on CPU). Its warm-up steps are timed by wrapping its
  `timeit` (the warm-up steps run first, each timed, then its own `timeit` with no warm-up: the timed part is its own).
- plain / APT / plain (fast) / APT (fast): the trainer's own loop body (`train_apt_lora.micro_batch`,
  bench/common.py) with no extra flags, with `--apt`, and (only when `--extra_apt_args` is given) with those flags,
  and with `--apt` and those flags, each in a fresh process, `--rounds` times alternating. Median step time, peak memory (CUDA max allocated over warm-up + timed steps, weights included;
  CPU: RSS growth). LoRA on the UNet and the text encoders (the captions go through them each step); `--unet_only`:
  on the UNet only with cached text-encoder outputs, the reference's setting.
- warm-up: the one-time cost of the first steps (graph capture, compilation, allocator and kernel caches): the
  warm-up steps' total wall time minus warm-up steps x the step time.
- ratios: APT/reference and plain/reference step time (same gradient-checkpointing setting), APT/plain step time and
  peak memory; with the fast columns: fast APT/reference, fast plain/reference (the targets' flags apply to these
  too), fast APT/fast plain time and memory.

Targets (issue 6), flagged ✓/✗ on the GPU configs only: SDXL 1024² batch 1 APT <= 0.5 x reference and plain <= 0.4 x
reference; SD1.5 512² batch 1 APT <= 0.5 x reference (these three with gradient checkpointing off, as the reference
was measured); APT/plain time <= 1.15 and peak memory <= 1.10; warm-up <= 60 s on SDXL. The tiny CPU configs check the
flow only: the project's tiny models (library.tiny_models, fp32) are not the reference's tiny ones (bf16, other sizes).
CPU workers run on 1 torch thread unless `--threads` says otherwise. Exit code 1 when a column failed (the table's
errors column says which).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# project config -> (bench/reference_step.py config, resolution in pixels)
REFERENCE = {"sd15": ("SD15", 512), "sdxl": ("SDXL", 1024), "tiny-sd1": ("TINY_15", 64), "tiny-sdxl": ("TINY_XL", 128)}
# targets (issue 6): ratios to the reference at (config, batch size), gradient checkpointing off
APT_VS_REFERENCE = {("sdxl", 1): 0.5, ("sd15", 1): 0.5}
PLAIN_VS_REFERENCE = {("sdxl", 1): 0.4}
TIME_TARGET, MEMORY_TARGET = 1.15, 1.10  # APT/plain, every GPU row
WARMUP_TARGET_S = {"sdxl": 60.0}  # one-time warm-up of each project step
REFERENCE_TIMEITS = ("train_gc0", "train_gc1", "prior_fwd", "apt_proto_gc1")  # the order of reference_step.run's timeit calls


# ------------------------------------------------------------------------------------------------ the reference
def _reference_worker(name: str, bs: int, warmup: int, steps: int, threads: int | None) -> int:
    """reference_step.run for config `name` at batch `bs` in this process; prints its row as one RESULT_PREFIX line."""
    import torch

    import bench.reference_step as R
    from bench.common import CONFIGS, RESULT_PREFIX, device_name

    if threads:
        torch.set_num_threads(threads)
    dev = CONFIGS[name].device
    if dev == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{name} needs CUDA, and torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = True  # as reference_step.main sets it for its GPU runs
    ref_cfg, res = REFERENCE[name]
    warm_log = []
    own_timeit = R.timeit

    def timeit(fn, dev_, warm, iters):  # time its warm-up steps, then its own timeit (no warm-up left)
        times = []
        for _ in range(warm):
            t0 = time.perf_counter()
            fn()
            if dev_ == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        warm_log.append(times)
        return own_timeit(fn, dev_, 0, iters)

    R.timeit = timeit
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        R.run(name, getattr(R, ref_cfg), res, bs, dev, torch.bfloat16, warmup, steps, None)
    wall = time.perf_counter() - t0
    sys.stdout.write(buf.getvalue())
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1])
    row.update(reference_config=ref_cfg, n_warmup=warmup, n_steps=steps, run_wall_s=wall,
               warmup_times_s=dict(zip(REFERENCE_TIMEITS, warm_log)), device_name=device_name(dev))
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


def measure_reference(name: str, bs: int, warmup: int, steps: int, timeout: float | None = None,
                      threads: int | None = None) -> dict:
    """The reference step (bench/reference_step.py `run`) for project config `name` at batch `bs`, in a fresh process:
    its JSON row (train_s_gc0/1, train_peakGiB_gc0/1, ...) plus `warmup_times_s`, or {"error": ...}."""
    from bench.common import REPO_ROOT, RESULT_PREFIX

    cmd = [sys.executable, "-m", "bench.apt_overhead", "--reference_worker", name, "--batch_sizes", str(bs),
           "--warmup", str(warmup), "--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    rows = [json.loads(ln[len(RESULT_PREFIX):]) for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not rows:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        sys.stderr.write(f"[reference {name} bs{bs}] failed:\n" + "\n".join(lines[-20:]) + "\n")
        return {"error": (lines[-1] if lines else f"exit code {proc.returncode}")[:200]}
    return rows[-1]


def reference_summary(row: dict, grad_ckpt: bool) -> dict | None:
    """(step s, peak bytes or None, warm-up s) of the reference's train step at one gradient-checkpointing setting."""
    if row is None or "error" in row:
        return None
    t = row[f"train_s_gc{int(grad_ckpt)}"]
    peak = row.get(f"train_peakGiB_gc{int(grad_ckpt)}")
    peak = None if peak is None or (isinstance(peak, float) and math.isnan(peak)) else peak * 2**30
    warm = row.get("warmup_times_s", {}).get(f"train_gc{int(grad_ckpt)}")
    return {"s": t, "peak": peak, "warmup": (sum(warm) - len(warm) * t) if warm else None}


# ------------------------------------------------------------------------------------------------ the project
def measure(name: str, grad_ckpt: bool, train_args: list, warmup: int, steps: int, timeout: float,
            threads: int | None, batch_size: int = 1, unet_only: bool = False) -> dict:
    """One project step (train_apt_lora flags `train_args`) timed in a fresh process (bench.common.run_config)."""
    from bench.common import run_config_isolated

    overrides = {"grad_ckpt": [grad_ckpt], "train_args": list(train_args), "batch_size": batch_size}
    if unet_only:  # as the reference: no text-encoder LoRA, and no text encoder in the step (outputs cached)
        overrides["train_text_encoder"] = False
        overrides["train_args"] += ["--cache_text_encoder_outputs"]
    rows = run_config_isolated(name, warmup, steps, timeout=timeout, overrides=overrides, threads=threads)
    return rows[-1]


def project_summary(rows: list) -> dict | None:
    """(median step s, max peak bytes, median warm-up s) over the rounds of one project step."""
    if not rows or any("error" in r for r in rows):
        return None
    return {"s": statistics.median(r["median_s"] for r in rows), "peak": max(r["peak_bytes"] for r in rows),
            "warmup": statistics.median(sum(r.get("warmup_times_s", [])) - r["n_warmup"] * r["median_s"] for r in rows)}


# ------------------------------------------------------------------------------------------------ table
def _fmt_s(s) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _fmt_warm(s) -> str:
    return "-" if s is None else f"{s:.2f} s"


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _ratio(a, b, target=None) -> str:
    if a is None or b is None or not b:
        return "-"
    r = a / b
    return f"{r:.2f}" + ("" if target is None else (" ✓" if r <= target else " ✗"))


def table_row(name: str, bs: int, gc: bool, res: int, ref: dict | None, cols: dict, gpu: bool, errors: list) -> str:
    """One markdown row: the steps' times, peaks and warm-ups, then the ratios (flags on GPU configs only)."""
    plain, apt, fast = cols.get("plain"), cols.get("APT"), cols.get("APT (fast)")
    fast_plain = cols.get("plain (fast)")
    variants = [("reference", ref), ("plain", plain), ("APT", apt)]
    variants += [(k, cols.get(k)) for k in ("plain (fast)", "APT (fast)") if k in cols]
    g = lambda v, k: None if v is None else v[k]  # noqa: E731
    off = gpu and not gc
    cells = [name, f"{res}²", str(bs), "on" if gc else "off"]
    cells += [_fmt_s(g(v, "s")) for _, v in variants]
    cells += [_fmt_bytes(g(v, "peak")) for _, v in variants]
    warm_target = WARMUP_TARGET_S.get(name) if gpu else None
    for label, v in variants:
        w = g(v, "warmup")
        flag = "" if (w is None or warm_target is None or label == "reference") else (" ✓" if w <= warm_target else " ✗")
        cells.append(_fmt_warm(w) + flag)
    ref_s = g(ref, "s")
    cells += [_ratio(g(apt, "s"), ref_s, APT_VS_REFERENCE.get((name, bs)) if off else None),
              _ratio(g(plain, "s"), ref_s, PLAIN_VS_REFERENCE.get((name, bs)) if off else None),
              _ratio(g(apt, "s"), g(plain, "s"), TIME_TARGET if gpu else None),
              _ratio(g(apt, "peak"), g(plain, "peak"), MEMORY_TARGET if gpu else None)]
    if "APT (fast)" in cols:
        cells += [_ratio(g(fast, "s"), ref_s, APT_VS_REFERENCE.get((name, bs)) if off else None),
                  _ratio(g(fast_plain, "s"), ref_s, PLAIN_VS_REFERENCE.get((name, bs)) if off else None),
                  _ratio(g(fast, "s"), g(fast_plain, "s"), TIME_TARGET if gpu else None),
                  _ratio(g(fast, "peak"), g(fast_plain, "peak"), MEMORY_TARGET if gpu else None)]
    cells.append("; ".join(errors))
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def table_head(fast: bool) -> list:
    names = ["reference", "plain", "APT"] + (["plain (fast)", "APT (fast)"] if fast else [])
    head = (["config", "res", "batch", "grad ckpt"] + [f"{n} step" for n in names] + [f"{n} peak" for n in names]
            + [f"{n} warm-up" for n in names] + ["APT/ref time", "plain/ref time", "APT/plain time", "APT/plain memory"]
            + (["fast APT/ref time", "fast plain/ref time", "fast APT/fast plain time", "fast APT/fast plain memory"]
               if fast else []) + ["errors"])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _progress(summary: dict | None) -> str:
    """A column's figures as soon as it is measured (a run cut short still shows them)."""
    if summary is None:
        return "failed"
    return f"step {_fmt_s(summary['s'])}, peak {_fmt_bytes(summary['peak'])}, warm-up {_fmt_warm(summary['warmup'])}"


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    from bench.common import CONFIGS

    p = argparse.ArgumentParser(prog="python -m bench.apt_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=str, default=None,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default: tiny ones, plus sd15,sdxl with CUDA)")
    p.add_argument("--batch_sizes", type=str, default=None,
                   help="comma-separated batch sizes, e.g. 1,4 (default: 1,4 on the GPU configs, 1 on the tiny CPU ones)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="plain/APT measurement pairs per setting (medians are combined)")
    p.add_argument("--grad_ckpt", type=str, default="off,on", help="off, on, or off,on")
    p.add_argument("--extra_apt_args", type=str, default="",
                   help='more train_apt_lora.py flags for two more project columns: "plain (fast)" with them, "APT '
                        '(fast)" with --apt and them (flags of APT only, like --apt_cuda_graph, change nothing in plain)')
    p.add_argument("--unet_only", action="store_true",
                   help="the project's LoRA on the UNet only, text-encoder outputs cached (--network_train_unet_only "
                        "--cache_text_encoder_outputs): no text encoder in the step, like the reference")
    p.add_argument("--no_reference", action="store_true", help="skip the reference column")
    p.add_argument("--timeout", type=float, default=900, help="seconds per process (each step kind, the reference)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each worker (default: 1 on the tiny CPU configs, where a shared machine's other "
                        "processes otherwise oversubscribe the cores; torch's default on the GPU configs)")
    p.add_argument("--out", type=str, default=None)
    p.add_argument("--reference_worker", type=str, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.reference_worker:
        return _reference_worker(a.reference_worker, _ints(a.batch_sizes)[0], a.warmup, a.steps, a.threads)

    import torch

    from bench.common import env_summary

    if a.configs:
        names = [n.strip() for n in a.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    else:
        names = [n for n, c in CONFIGS.items() if c.device == "cpu" or torch.cuda.is_available()]
    settings = [s.strip() == "on" for s in a.grad_ckpt.split(",") if s.strip()]
    extra = shlex.split(a.extra_apt_args or "")
    kinds = {"plain": [], "APT": ["--apt"]}
    if extra:
        kinds["plain (fast)"] = list(extra)
        kinds["APT (fast)"] = ["--apt", *extra]
    cmd = f"python -m bench.apt_overhead {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    lines = [f"# APT overhead: `{cmd}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, worker torch threads: {a.threads or '1 on CPU configs, default on GPU ones'}, "
             f"{a.steps} timed steps after {a.warmup} warm-up, {a.rounds} round(s)"
             + (f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
             + (f"; plain (fast) = `{' '.join(extra)}`, APT (fast) = `--apt {' '.join(extra)}`" if extra else "")
             + ("; project LoRA on the UNet only" if a.unet_only else ""), "", *table_head(bool(extra))]
    print("\n".join(lines), flush=True)
    all_rows, failed = [], False
    for name in names:
        gpu = CONFIGS[name].device == "cuda"
        threads = a.threads or (None if gpu else 1)
        for bs in _ints(a.batch_sizes) if a.batch_sizes else ([1, 4] if gpu else [1]):
            ref_row = None
            if not a.no_reference:
                t0 = time.perf_counter()
                ref_row = measure_reference(name, bs, a.warmup, a.steps, a.timeout, threads)
                all_rows.append(ref_row)
                print(f"[{name} bs{bs} reference] {time.perf_counter() - t0:.0f} s: {_progress(reference_summary(ref_row, False))}",
                      file=sys.stderr, flush=True)
            for gc in settings:
                measured = {k: [] for k in kinds}
                for _ in range(a.rounds):
                    for kind, targs in kinds.items():
                        t0 = time.perf_counter()
                        measured[kind].append(measure(name, gc, targs, a.warmup, a.steps, a.timeout, threads, bs,
                                                      a.unet_only))
                        print(f"[{name} bs{bs} gc {'on' if gc else 'off'} {kind}] {time.perf_counter() - t0:.0f} s: "
                              f"{_progress(project_summary(measured[kind][-1:]))}", file=sys.stderr, flush=True)
                errors = [f"{kind}: {r['error']}" for kind, rs in measured.items() for r in rs if "error" in r]
                if ref_row is not None and "error" in ref_row:
                    errors.insert(0, f"reference: {ref_row['error']}")
                failed |= bool(errors)
                all_rows += [r for rs in measured.values() for r in rs]
                cols = {kind: project_summary(rs) for kind, rs in measured.items()}
                row = table_row(name, bs, gc, CONFIGS[name].resolution, reference_summary(ref_row, gc), cols, gpu, errors)
                lines.append(row)
                print(row, flush=True)
    ref_res = ", ".join(f"{n} -> {REFERENCE[n][0]} at {REFERENCE[n][1]} px" for n in names)
    notes = [
        "",
        f"Reference: `bench/reference_step.py` (copy of `../shared/bench/reference_step.py`) `run()`, bf16 autocast, diffusers "
        f"UNet + peft LoRA rank 32 (alpha 32) on attention / proj / feed-forward, AdamW, random text conditioning, no text "
        f"encoders; {ref_res}; its step is the mean over the timed steps, its peak the max allocated over the timed steps only "
        "(none on CPU). The grad ckpt on rows use its `train_s_gc1`, measured after its gradient-checkpointing-off run in the same "
        "process (so its warm-up there is small).",
        f"Project: the trainer's loop body, LoRA rank 32 (alpha 16) on the UNet{' only, text-encoder outputs cached' if a.unet_only else ' and the text encoders (captions encoded each step; --unet_only: UNet only, outputs cached, as the reference)'}, "
        "AdamW; the median step; peak memory: CUDA max allocated over warm-up + timed steps (weights included), CPU: peak RSS "
        "growth during the steps (weights excluded). Project columns use the config's resolution (res column); the tiny configs "
        "are the project's tiny models (library.tiny_models, fp32, 64 px), not the reference's TINY_15 / TINY_XL (bf16, other "
        "widths, TINY_XL at 128 px): their ratios check the flow only; the ratios mean something on the GPU configs.",
        "Warm-up: the warm-up steps' wall time minus warm-up steps x the step time (one-time costs: capture, compile, caches). "
        "CPU times move with the machine's load.",
        f"Targets (GPU configs only, ✓/✗): SDXL batch 1 APT/ref <= {APT_VS_REFERENCE[('sdxl', 1)]} and plain/ref <= "
        f"{PLAIN_VS_REFERENCE[('sdxl', 1)]}, SD1.5 batch 1 APT/ref <= {APT_VS_REFERENCE[('sd15', 1)]} (grad ckpt off); "
        f"APT/plain time <= {TIME_TARGET}, memory <= {MEMORY_TARGET}; SDXL warm-up <= {WARMUP_TARGET_S['sdxl']:.0f} s.",
        "", *env_summary([r for r in all_rows if "error" not in r]),
    ]
    lines += notes
    print("\n".join(notes), flush=True)
    from bench.common import write_result

    write_result("\n".join(lines) + "\n", a.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
