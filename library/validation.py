"""Validation loss on held-out images (sd-scripts' `validation_split`): how well the LoRA denoises images it does
not train on, the plain overfitting signal to set beside APT's γ.

Each run sees the same noise at the same timesteps (a fixed seed, the training's random stream put back after), so
the curve over training compares like with like: 4 timesteps evenly inside [min_timestep, max_timestep], as
sd-scripts picks them. The loss is the per-sample loss of `--loss_type` (MSE for DCO), alpha masks included,
without the timestep weightings (min-SNR, debiased ...) and without APT's terms: the denoising error itself.
"""
from __future__ import annotations

import numpy as np
import torch

from library.captions import finish_captions
from library.rng import preserved_rng_state

NUM_TIMESTEPS = 4


def validation_timesteps(args, noise_scheduler) -> list[int]:
    """sd-scripts' choice: NUM_TIMESTEPS evenly spaced in [min_timestep, max_timestep], the ends left out."""
    lo = getattr(args, "min_timestep", None) or 0
    hi = getattr(args, "max_timestep", None) or noise_scheduler.config.num_train_timesteps
    return [int(t) for t in np.linspace(lo, hi, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


def batch_seed(seed: int, index: int) -> int:
    """The seed of held-out batch `index`: its noise (and VAE sample) do not depend on which process validates it."""
    return (seed * 1_000_003 + index) % 2**63


@torch.no_grad()
def validation_loss(args, ctx, loader, seed: int, max_batches: int | None = None) -> float:
    """The mean loss over the held-out batches of `loader` and `validation_timesteps`, with the LoRA as it is
    (eval mode: no dropout). With several processes each validates every N-th batch and one all-reduce sums their
    losses, so the value is the same for any number of processes (every batch is seeded by `batch_seed`); every
    process must call it. One read of the device at the end."""
    from library.conditioning import sdxl_time_ids
    from library.losses import get_huber_c, per_sample_loss
    from library.noise import add_noise, get_target
    from library.unet_graph import unet_outputs

    model, device, acc = ctx.model, ctx.accelerator.device, ctx.accelerator
    unet = unet_outputs(model, ctx.weight_dtype, device.type)  # eager, no capture: APT's hooks stay unarmed
    loss_type = "l2" if args.loss_type == "dco" else args.loss_type
    timesteps = validation_timesteps(args, model.noise_scheduler)
    was_training = ctx.network.training
    ctx.network.eval()
    sums = torch.zeros(2, device=device)  # loss sum, samples
    try:
        with preserved_rng_state():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                if i % acc.num_processes != acc.process_index:
                    continue
                torch.manual_seed(batch_seed(seed, i))  # the same noise in every validation run
                finish_captions(batch)  # token warm-up: validated on the full captions
                ctx.set_batch_multiplier(batch)
                batch = ctx.batch_to_device(batch)
                latents = ctx.encode_latents(batch)
                cond = ctx.encode_text(batch["captions"])
                time_ids = None
                if model.is_sdxl:
                    time_ids = sdxl_time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"],
                                             batch["target_sizes_hw"]).to(device)
                bsz = latents.shape[0]
                for t in timesteps:
                    t = torch.full((bsz,), t, dtype=torch.long, device=device)
                    noise = torch.randn_like(latents)
                    noisy = add_noise(None, model.noise_scheduler, latents, noise, t).to(ctx.weight_dtype)
                    pred = unet(noisy, t, cond.context, cond.pooled, time_ids)[0]
                    target = get_target(model.noise_scheduler, latents, noise, t)
                    loss = per_sample_loss(pred, target, loss_type, get_huber_c(args, t, model.noise_scheduler),
                                           mask=batch.get("alpha_masks"))
                    sums[0] += loss.sum()
                    sums[1] += bsz
    finally:
        ctx.network.train(was_training)
    if acc.num_processes > 1:
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    total, count = sums.tolist()
    return total / max(count, 1)
