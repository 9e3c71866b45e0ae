"""Time the plain LoRA training step (train_apt_lora.training_step + the loop's optimizer step).

    python -m bench.step_time                                   # tiny SD1 / SDXL on CPU (+ SD1.5, SDXL on CUDA)
    python -m bench.step_time --configs sd15,sdxl --out bench/results/step_time-gpu.md

Configs (bench/common.py CONFIGS): tiny-sd1, tiny-sdxl (library.tiny_models, CPU, fp32, 64 px); sd15 (the real SD1.5
architecture with random weights, CUDA, bf16, 512 px) and sdxl (SDXL base, CUDA, bf16, 1024 px). LoRA rank 32 on the
UNet and the text encoders, AdamW, batch 1, with and without gradient checkpointing. Each config runs in its own
process per gradient-checkpointing setting (`--timeout` seconds at most). Prints a markdown table; `--out` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _worker(args) -> int:
    """One config in this process: print one RESULT_PREFIX JSON line per gradient-checkpointing setting."""
    import dataclasses
    import logging

    import torch

    from bench.common import CONFIGS, RESULT_PREFIX, run_config

    logging.basicConfig(level=logging.WARNING)
    from train_apt_lora import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.worker]
    if args.override_json:
        overrides = json.loads(args.override_json)
        for key in ("grad_ckpt", "train_args"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        cfg = dataclasses.replace(cfg, **overrides)
    for row in run_config(cfg, args.warmup, args.steps):
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


def main(argv=None) -> int:
    from bench.common import CONFIGS

    p = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per config (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per config")
    p.add_argument("--configs", type=str, default=None,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default: the tiny ones, plus sd15,sdxl with CUDA)")
    p.add_argument("--out", type=str, default=None, help="also write the table here (e.g. bench/results/step_time-cpu.md)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per config process (default 900)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each config (default: torch's)")
    p.add_argument("--device", type=str, default=None, choices=["cpu", "cuda"],
                   help="run every config on this device (e.g. cpu: a dry run of sd15/sdxl without a GPU)")
    p.add_argument("--dtype", type=str, default=None, choices=["fp32", "bf16", "fp16"], help="override every config's dtype")
    p.add_argument("--resolution", type=int, default=None, help="override every config's resolution (pixels)")
    p.add_argument("--grad_ckpt", type=str, default=None, choices=["off", "on", "both"],
                   help="gradient checkpointing settings to time (default: both)")
    p.add_argument("--train_args", type=str, default=None,
                   help='more train_apt_lora.py flags for every config, e.g. --train_args="--apt" to time the APT step')
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--override_json", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)

    import torch

    from bench.common import env_summary, markdown_table, run_config_isolated, write_result

    if args.configs:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    else:
        names = ["tiny-sd1", "tiny-sdxl"] + (["sd15", "sdxl"] if torch.cuda.is_available() else [])
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("resolution", args.resolution)) if v}
    if args.train_args:
        overrides["train_args"] = shlex.split(args.train_args)
    wanted = {"off": (False,), "on": (True,), "both": (False, True)}.get(args.grad_ckpt)

    rows = []
    for name in names:  # one process per config and gradient-checkpointing setting: fresh memory peaks
        for gc_on in wanted or CONFIGS[name].grad_ckpt:
            t0 = time.perf_counter()
            rows += run_config_isolated(name, args.warmup, args.steps, timeout=args.timeout,
                                        overrides={**overrides, "grad_ckpt": [gc_on]}, threads=args.threads)
            print(f"[{name}, gradient checkpointing {'on' if gc_on else 'off'}] {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    measures = sorted({r["memory_measure"] for r in rows if "memory_measure" in r})
    lines = ["# Plain LoRA training step: time and peak memory", "",
             f"`python -m bench.step_time {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
             f"({time.strftime('%Y-%m-%d')}). Median of {args.steps} timed steps after {args.warmup} warm-up steps; "
             "LoRA on UNet and text encoders, AdamW, random latents and captions, "
             "`train_apt_lora.training_step` + the loop's backward / clip / optimizer step.", "",
             *env_summary(rows), "", markdown_table(rows), "", "Peak memory:",
             *[f"- {m}" for m in measures], ""]
    text = "\n".join(lines)
    print(text)
    write_result(text, args.out)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
