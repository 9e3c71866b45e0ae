"""APT's cost: the plain LoRA step and the APT step, measured side by side in one run, and their ratios.

    python -m bench.apt_overhead                                # tiny SD1 / SDXL on CPU (+ SD1.5, SDXL with CUDA)
    python -m bench.apt_overhead --configs sd15,sdxl --out bench/results/apt_overhead-gpu.md

For each config (bench/common.py CONFIGS) and gradient-checkpointing setting, the plain step and the APT step
(`--apt`: prior pass, adaptive augmentation and loss weight, RS and attention capture and losses, indicator update)
run in fresh processes one after the other (`--rounds` times, alternating, to spread machine-load drift over both),
with the trainer's own loop body (`train_apt_lora.micro_batch`). Reports the median step time and peak memory of each
and APT/plain. Targets on the GPU configs (issue 3): time <= 1.35, peak memory <= 1.10.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIME_TARGET, MEMORY_TARGET = 1.35, 1.10


def measure(name: str, grad_ckpt: bool, apt: bool, warmup: int, steps: int, timeout: float, threads: int | None) -> dict:
    from bench.common import run_config_isolated

    overrides = {"grad_ckpt": [grad_ckpt], "train_args": ["--apt"] if apt else []}
    rows = run_config_isolated(name, warmup, steps, timeout=timeout, overrides=overrides, threads=threads)
    return rows[-1]


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    from bench.common import CONFIGS, device_name

    p = argparse.ArgumentParser(prog="python -m bench.apt_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=str, default=None,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default: tiny ones, plus sd15,sdxl with CUDA)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="plain/APT measurement pairs per setting (medians are combined)")
    p.add_argument("--grad_ckpt", type=str, default="off,on", help="off, on, or off,on")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=str, default=None)
    a = p.parse_args(argv)

    import torch

    names = a.configs.split(",") if a.configs else [n for n, c in CONFIGS.items()
                                                      if c.device == "cpu" or torch.cuda.is_available()]
    settings = [s.strip() == "on" for s in a.grad_ckpt.split(",")]
    lines = [f"# APT overhead: `python -m bench.apt_overhead {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, device: {device_name('cuda' if torch.cuda.is_available() else 'cpu').split(', torch threads')[0]}, "
             f"worker torch threads: {a.threads or 'default'}, "
             f"torch {torch.__version__}, {a.steps} timed steps after {a.warmup} warm-up, {a.rounds} round(s); "
             f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "", "",
             "| config | grad ckpt | plain step | APT step | APT/plain time | plain peak | APT peak | APT/plain memory |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        for gc in settings:
            plain, apt = [], []
            for _ in range(a.rounds):
                plain.append(measure(name, gc, False, a.warmup, a.steps, a.timeout, a.threads))
                apt.append(measure(name, gc, True, a.warmup, a.steps, a.timeout, a.threads))
            errors = [r["error"] for r in plain + apt if "error" in r]
            if errors:
                row = f"| {name} | {'on' if gc else 'off'} | error: {errors[0]} | | | | | |"
            else:
                tp = statistics.median(r["median_s"] for r in plain)
                ta = statistics.median(r["median_s"] for r in apt)
                mp = max(r["peak_bytes"] for r in plain)
                ma = max(r["peak_bytes"] for r in apt)
                gpu = CONFIGS[name].device == "cuda"
                tflag = "" if not gpu else (" ✓" if ta / tp <= TIME_TARGET else " ✗")
                mflag = "" if not gpu else (" ✓" if mp and ma / mp <= MEMORY_TARGET else " ✗")
                row = (f"| {name} | {'on' if gc else 'off'} | {tp * 1e3:.1f} ms | {ta * 1e3:.1f} ms | {ta / tp:.2f}{tflag} | "
                       f"{_fmt_bytes(mp)} | {_fmt_bytes(ma)} | {(ma / mp if mp else float('nan')):.2f}{mflag} |")
            lines.append(row)
            print(row, flush=True)
    lines += ["", "Peak memory: CUDA max_memory_allocated (weights included); CPU: peak RSS growth during the steps "
              "(weights excluded, so the CPU ratio is of the step's own memory). CPU times move with the machine's load. "
              f"Targets (GPU configs): time <= {TIME_TARGET}, memory <= {MEMORY_TARGET}."]
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
