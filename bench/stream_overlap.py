"""Can APT's prior pass hide behind a training step on a second CUDA stream? (issue 6: APT/plain <= 1.15)

    python -m bench.stream_overlap --configs sd15,sdxl        # CUDA: the real architectures, bf16, batch 1
    python -m bench.stream_overlap --configs tiny-sd1         # CPU: the flow only (no streams, nothing to hide)

The fast APT step replays its prior pass (a CUDA graph: 61 ms of a 186 ms SDXL step on an H200) before the
fine-tuned pass, on the same stream, and the step then costs 1.48x the fast plain step. The prior pass's inputs do
not depend on the LoRA weights, so step k+1's prior pass could run during step k's backward on a second stream,
if the GPU has room for both: at batch 1 a step uses a few percent of the chip's arithmetic. Before building that
pipeline, this measures the room. Per config, in one process, medians over `--rounds` alternating rounds of:
- step: the fast APT step (`--apt --apt_cuda_graph --unet_cuda_graph`, the trainer's loop body `micro_batch`);
- prior: one more prior pass alone (its own recording of the same pass, on the step's input shapes);
- concurrent: that prior pass queued on a second stream, then the step on the main one, until both are done;
and hidden = (step + prior - concurrent) / prior: 1 means the extra prior pass cost nothing, 0 that the two ran
one after the other. With a pipelined prior pass, APT/plain would be about
1 + (1 - hidden) x prior / (step - prior), the last column.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

FAST = ["--apt", "--apt_cuda_graph", "--unet_cuda_graph"]


def extra_prior(bench):
    """One more prior pass on the bench step's batch shapes (class prompt c, LoRA off, no grad), as its own
    recording on CUDA (one graph must never replay on two streams at once), eager elsewhere. Returns the pass
    (no arguments) and its inputs (x_t, t, the encoded c, SDXL's time ids)."""
    from apt_ext.prior_graph import StaticPass
    from apt_ext.step import prepare_step

    ctx, apt = bench.ctx, bench.ctx.apt
    device, dtype = ctx.accelerator.device, ctx.weight_dtype
    x = prepare_step(bench.args, ctx, bench.batch, apt)  # the step's own x_t, t and time ids
    noisy, timesteps, time_ids = x.noisy, x.timesteps, x.time_ids
    with torch.no_grad(), bench.network.multiplier_override(0.0):
        cond = ctx.encode_base_text(x.prior_captions)
    run = StaticPass(apt.prior_fn(ctx.model, dtype, device.type), "cuda" if device.type == "cuda" else "eager")

    def prior():
        with torch.no_grad(), bench.network.multiplier_override(0.0):
            return run(noisy, timesteps, cond.context, cond.pooled, time_ids)

    return prior, (noisy, timesteps, cond, time_ids)


def measure(step_fn, prior, cuda: bool, n_steps: int, rounds: int) -> dict:
    """Median seconds of the step, the extra prior pass, and both queued on two streams (CUDA) or in turn."""
    side = torch.cuda.Stream() if cuda else None

    def both():
        if side is None:
            prior()
        else:
            side.wait_stream(torch.cuda.current_stream())  # the inputs were made on the main stream
            with torch.cuda.stream(side):
                prior()
        step_fn()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    def timed(fn):
        out = []
        for _ in range(n_steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    times = {"step": [], "prior": [], "concurrent": []}
    for _ in range(rounds):  # alternating, so that clock or thermal drift falls on all three alike
        for name, fn in (("step", step_fn), ("prior", prior), ("concurrent", both)):
            times[name] += timed(fn)
    return {k: statistics.median(v) for k, v in times.items()}


def run(config: str, n_warmup: int, n_steps: int, rounds: int) -> dict:
    from bench.common import CONFIGS, DTYPES, MIXED_PRECISION, build_bench_model, build_step_fn, make_bench_args, make_batch

    cfg = CONFIGS[config]
    cuda = cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"{config} needs CUDA, and torch.cuda.is_available() is False")
    model = build_bench_model(cfg.arch, cfg.real, cfg.device, DTYPES[cfg.dtype])
    flags = FAST if cuda else ["--apt"]  # the CPU has no graphs: the flow only
    args = make_bench_args(cfg.rank, mixed_precision=MIXED_PRECISION[cfg.dtype],
                           extra=["--network_train_unet_only", "--cache_text_encoder_outputs", *flags])
    bench = build_step_fn(model, args, cfg.device, make_batch(model, 1, cfg.resolution))
    prior, _ = extra_prior(bench)
    for _ in range(n_warmup):  # the recordings happen here
        bench.step_fn()
        prior()
    t = measure(bench.step_fn, prior, cuda, n_steps, rounds)
    hidden = (t["step"] + t["prior"] - t["concurrent"]) / t["prior"]
    plain = t["step"] - t["prior"]  # the step without its own prior pass, about the fast plain step
    return {"config": config, **t, "hidden": hidden if cuda else None,
            "pipelined": 1 + (1 - min(max(hidden, 0.0), 1.0)) * t["prior"] / plain if cuda and plain > 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="sd15,sdxl")
    p.add_argument("--steps", type=int, default=10, help="timed calls of each kind per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    rows, status = [], 0
    for config in a.configs.split(","):
        print(f"{config} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run(config, a.warmup, a.steps, a.rounds))
        except Exception as e:  # one failing config must not hide the others
            rows.append({"config": config, "error": f"{e!r}"[:300]})
            status = 1
    print("| config | step | prior | concurrent | hidden | APT/plain if pipelined |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error']} | | | | |")
            continue
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        hidden = "n/a (no CUDA)" if r["hidden"] is None else f"{r['hidden']:.2f}"
        pipelined = "n/a" if r["pipelined"] is None else f"{r['pipelined']:.2f}"
        print(f"| {r['config']} | {ms(r['step'])} | {ms(r['prior'])} | {ms(r['concurrent'])} | {hidden} | {pipelined} |")
    return status


if __name__ == "__main__":
    sys.exit(main())
