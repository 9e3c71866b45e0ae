"""Host-device synchronisations per optimizer step of the trainer's loop body, counted on a GPU (issue 6).

    python -m bench.sync_check --configs sd15,sdxl              # CUDA: the real architectures, bf16
    python -m bench.sync_check --configs tiny-sd1 --steps 2     # CPU: the same flow, nothing to count

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` warns at each op that makes the host wait for the device
(`.item()`, `nonzero`, a blocking copy, ...); waits on CUDA events, which it does not see, are counted when the
device had nothing queued behind the awaited event (`count_syncs`). For each config and setting this builds the
trainer's step (`bench.common.build_step_fn`: `train_apt_lora.micro_batch` around the plain or the APT step),
runs `--warmup` steps (graph recordings happen there), then counts the syncs of `--steps` steps and says where
they come from.
Expected: 0 per optimizer step with `--defer_step_read` (its default on CUDA with fused AdamW: a bad update is
dropped on the device, the step read back one step later); 1 with `--defer_step_read off` (the window's read).
Settings: `plain`, `apt` (`--apt`), `apt-fast` (`--apt --apt_cuda_graph --unet_cuda_graph`, CUDA only).
On a CPU there is no device to wait for; the CPU-side audit is tests/test_no_host_sync.py (the step on the meta
device). Prints a markdown table; exit code 1 if a setting syncs more than `expected_syncs` per step on CUDA.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import warnings

import torch

SETTINGS = {"plain": [], "apt": ["--apt"], "apt-fast": ["--apt", "--apt_cuda_graph", "--unet_cuda_graph"],
            "apt-read-each-step": ["--apt", "--defer_step_read", "off"]}


def expected_syncs(setting: str) -> int:
    """Per optimizer step: the window's read with --defer_step_read off, none with its default (on CUDA)."""
    return 1 if "off" in SETTINGS[setting] else 0


# what the sync debug mode warns at each synchronising op (its first use also warns, once, that the mode is a
# prototype "that does not yet detect all synchronizing operations": not a sync, not counted)
SYNC_WARNING = "called a synchronizing CUDA operation"


def count_syncs(step_fn, n_warmup: int, n_steps: int, cuda: bool) -> collections.Counter:
    """file:line -> synchronising ops in `n_steps` calls of `step_fn`, after `n_warmup` uncounted ones.

    Two kinds: the ops the sync debug mode warns at, and waits on a CUDA event (`Event.synchronize`, how
    `library.transfer.HostCopy` reads a step's flags and loss: the debug mode does not see it) after which the
    device had nothing more queued, so it idled until the host queued more. A wait on the previous step's event
    while this step is queued (`--defer_step_read`) leaves the device busy and is not counted."""
    for _ in range(n_warmup):
        step_fn()
    where = collections.Counter()
    if not cuda:
        for _ in range(n_steps):
            step_fn()
        return where
    torch.cuda.synchronize()
    real_wait = torch.cuda.Event.synchronize

    def counted_wait(event):
        behind = torch.cuda.Event()
        behind.record()  # the end of what the host has queued so far
        real_wait(event)
        if behind.query():  # done as soon as the awaited event: the queue was empty behind it
            caller = sys._getframe(1)
            where[f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno} (event wait)"] += 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.Event.synchronize = counted_wait
        try:
            for _ in range(n_steps):
                step_fn()
        finally:
            torch.cuda.Event.synchronize = real_wait
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if SYNC_WARNING in str(w.message):
            where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return where


def run(config: str, setting: str, n_warmup: int, n_steps: int) -> dict:
    from bench.common import CONFIGS, DTYPES, MIXED_PRECISION, build_bench_model, build_step_fn, make_bench_args, make_batch

    cfg = CONFIGS[config]
    cuda = cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"{config} needs CUDA, and torch.cuda.is_available() is False")
    flags = SETTINGS[setting]
    if not cuda and "--apt_cuda_graph" in flags:
        return {"config": config, "setting": setting, "per_step": None, "where": "needs CUDA"}
    model = build_bench_model(cfg.arch, cfg.real, cfg.device, DTYPES[cfg.dtype])
    args = make_bench_args(cfg.rank, mixed_precision=MIXED_PRECISION[cfg.dtype],
                           extra=["--network_train_unet_only", "--cache_text_encoder_outputs", *flags])
    bench = build_step_fn(model, args, cfg.device, make_batch(model, cfg.batch_size, cfg.resolution))
    where = count_syncs(bench.step_fn, n_warmup, n_steps, cuda)
    del bench, model  # held in reference cycles (hooks, graphed forwards): freed before the next row builds its own
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    per_step = sum(where.values()) / n_steps if cuda else None
    return {"config": config, "setting": setting, "per_step": per_step,
            "where": ", ".join(f"{k} ×{v}" for k, v in where.most_common(6)) if cuda else "no CUDA: nothing to count"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="sd15,sdxl")
    p.add_argument("--settings", default="plain,apt,apt-fast",
                   help=f"of {', '.join(SETTINGS)} (apt-read-each-step: --defer_step_read off, 1 sync expected)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    rows, status = [], 0
    for config in a.configs.split(","):
        for setting in a.settings.split(","):
            print(f"{config} {setting} ...", file=sys.stderr, flush=True)
            try:
                row = run(config, setting, a.warmup, a.steps)
            except Exception as e:  # one failing setting must not hide the others
                row = {"config": config, "setting": setting, "per_step": None, "where": f"error: {e!r}"[:300]}
                status = 1
            if row["per_step"] is not None and row["per_step"] > expected_syncs(setting):
                status = 1
            rows.append(row)
    print("| config | setting | syncs per optimizer step | expected | where (file:line × count) |")
    print("|---|---|---|---|---|")
    for r in rows:
        n = "n/a" if r["per_step"] is None else f"{r['per_step']:.2f}"
        print(f"| {r['config']} | {r['setting']} | {n} | {expected_syncs(r['setting'])} | {r['where']} |")
    return status


if __name__ == "__main__":
    sys.exit(main())
