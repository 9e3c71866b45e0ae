"""bench/common.py still drives the trainer's step (a smoke test: the benchmark itself is not run here)."""
import math

import torch

from bench.common import (CONFIGS, build_bench_model, build_step_fn, make_batch, make_bench_args, markdown_table,
                          time_steps)


def test_bench_step_trains_tiny_sd1_and_reports_time_and_memory():
    model = build_bench_model("sd1", real=False, device="cpu", dtype=torch.float32)
    batch = make_batch(model, batch_size=1, resolution=64)
    assert batch["latents"].shape == (1, 4, 8, 8) and batch["images"] is None and len(batch["captions"]) == 1
    bench = build_step_fn(model, make_bench_args(rank=4), device="cpu", batch=batch)
    ups = [m.lora_up.weight for m in bench.network.unet_loras]
    assert all(u.abs().sum() == 0 for u in ups)  # lora_up starts at zero
    assert math.isfinite(bench.step_fn())
    median_s, peak = time_steps(bench.step_fn, n_warmup=0, n_steps=2, device="cpu")
    assert median_s > 0 and peak >= 0 and len(time_steps.last_times) == 2
    assert all(u.abs().sum() > 0 for u in ups)  # the optimizer stepped
    assert bench.lora_params == sum(p.numel() for p in bench.network.parameters() if p.requires_grad)

    row = {**vars(CONFIGS["tiny-sd1"]), "grad_ckpt": False, "median_s": median_s, "times_s": [median_s],
           "peak_bytes": peak, "lora_params": bench.lora_params}
    table = markdown_table([row, {"name": "sdxl", "grad_ckpt": [True], "error": "timeout after 240 s"}])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "tiny-sd1 | CPU | fp32 | 64²" in lines[2] and "error: timeout after 240 s" in lines[3]
