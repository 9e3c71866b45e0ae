"""Noise, timesteps and targets with sd-scripts semantics (KOHYA_COMPAT.md section 6): noise offset, pyramid
noise, timestep ranges, input perturbation, eps / v targets, zero terminal SNR.

Flags are read from an `argparse.Namespace` with `getattr` defaults (library/train_util.py `_arg`), so a namespace
that lacks a flag behaves as if it was not given.
"""
from __future__ import annotations

from typing import Optional

import torch

from library.train_util import TrainingSetupError, _arg

# ---------------------------------------------------------------------------------------------------------------
# Noise, timesteps, targets
# ---------------------------------------------------------------------------------------------------------------


def alphas_cumprod_on(noise_scheduler, device, attr: str = "alphas_cumprod") -> torch.Tensor:
    """ᾱ (float32) on `device`, copied there once and kept beside the scheduler (rebuilt if its ᾱ is replaced, as
    --zero_terminal_snr does). The step indexes it with device timesteps: diffusers' add_noise moves ᾱ to the
    latents' device on every call and sd-scripts moves it back, two copies that each make the host wait (issue 6).
    `attr="snr_alphas_cumprod"`: the ᾱ the SNR loss weights use (`snr_alphas_cumprod`)."""
    from library.transfer import to_device

    device = torch.device(device)
    ac = getattr(noise_scheduler, attr)
    source, copies = getattr(noise_scheduler, f"_apt_{attr}", (None, {}))
    if source is not ac:
        source, copies = ac, {}
        setattr(noise_scheduler, f"_apt_{attr}", (source, copies))
    if device not in copies:
        copies[device] = to_device(ac.detach(), device, torch.float32)
    return copies[device]


def _sqrt_alpha_terms(noise_scheduler, like: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)) per sample, shaped to broadcast over `like`, in its dtype: diffusers' DDPMScheduler
    add_noise/get_velocity arithmetic, on the device."""
    ac = alphas_cumprod_on(noise_scheduler, like.device).to(like.dtype)[timesteps]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (ac**0.5).reshape(shape), ((1 - ac) ** 0.5).reshape(shape)


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """randn on the generator's device (a CPU generator can serve CUDA latents), then moved to `like`."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _rand1(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.rand(1, device=like.device)
    return torch.rand(1, generator=generator, device=generator.device).to(like.device)


def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale=None, generator=None):
    """sd-scripts `apply_noise_offset`: noise += offset · randn(B, C, 1, 1).

    With `adaptive_noise_scale`, offset += scale · |mean over H,W of the latents| per channel, clamped at 0.
    Shifting the per-channel mean lets the model learn very dark / very bright images.
    """
    if noise_offset is None:
        return noise
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = noise_offset + adaptive_noise_scale * latent_mean
        noise_offset = torch.clamp(noise_offset, 0.0, None)
    return noise + noise_offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)


def pyramid_noise_like(noise, iterations: int = 6, discount: float = 0.4, generator=None):
    """sd-scripts multires ("pyramid") noise: add upsampled low-resolution noise, then renormalise by std.

    Differs from sd-scripts only in drawing the random scale factor r ~ U(2, 4) from torch (seedable via
    `generator`) instead of Python's `random`.
    """
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    host = generator if generator is not None and generator.device.type == "cpu" else None
    for i in range(iterations):
        r = float(torch.rand(1, generator=host)) * 2 + 2  # on the host: the sizes below need it there
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        noise = noise + up(_randn((b, c, hn, wn), noise, generator)) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def timestep_range(args, noise_scheduler) -> tuple[int, int]:
    """[min, max) of the sampled timesteps: `--min_timestep` (0) and `--max_timestep` (num_train_timesteps)."""
    t_min = getattr(args, "min_timestep", None)
    t_max = getattr(args, "max_timestep", None)
    lo = 0 if t_min is None else int(t_min)
    hi = int(noise_scheduler.config.num_train_timesteps) if t_max is None else int(t_max)
    return lo, hi


def sample_timesteps(args, noise_scheduler, batch_size: int, device=None, generator=None) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (sd-scripts `get_timesteps`); min == max → constant.

    Separate from the noise so that APT can draw t before its t-dependent augmentation.
    Drawn on the CPU (or the generator's device) like sd-scripts, then moved to `device` without a stream sync.
    """
    from library.transfer import to_device

    lo, hi = timestep_range(args, noise_scheduler)
    gen_device = generator.device if generator is not None else "cpu"
    if lo < hi:
        t = torch.randint(lo, hi, (batch_size,), generator=generator, device=gen_device)
    else:
        t = torch.full((batch_size,), hi, device=gen_device)
    return to_device(t.long(), device if device is not None else "cpu")


def sample_noise(args, latents: torch.Tensor, generator=None) -> torch.Tensor:
    """The training noise ε: randn, plus noise offset (adaptive, random strength) or multires noise."""
    noise = _randn(latents.shape, latents, generator)
    offset = getattr(args, "noise_offset", None)
    if offset:
        if getattr(args, "noise_offset_random_strength", False):
            offset = _rand1(latents, generator) * offset
        noise = apply_noise_offset(latents, noise, offset, getattr(args, "adaptive_noise_scale", None), generator)
    iterations = getattr(args, "multires_noise_iterations", None)
    if iterations:
        noise = pyramid_noise_like(noise, int(iterations), float(_arg(args, "multires_noise_discount", 0.3)), generator)
    return noise


def add_noise(args, noise_scheduler, latents, noise, timesteps, generator=None) -> torch.Tensor:
    """x_t = scheduler.add_noise(x0, ε (+ ip_noise_gamma · randn), t); the target keeps the unperturbed ε.

    Input perturbation (`--ip_noise_gamma`, arXiv 2301.11706) only changes what the model sees.
    """
    gamma = getattr(args, "ip_noise_gamma", None)
    if gamma:
        strength = _rand1(latents, generator) * gamma if getattr(args, "ip_noise_gamma_random_strength", False) else gamma
        noise = noise + strength * _randn(latents.shape, latents, generator)
    sqrt_ac, sqrt_one_minus_ac = _sqrt_alpha_terms(noise_scheduler, latents, timesteps)
    return sqrt_ac * latents + sqrt_one_minus_ac * noise


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents, generator=None, timesteps=None):
    """sd-scripts' per-step sampling: returns (noise, noisy_latents, timesteps).

    `timesteps` may be given (drawn earlier with `sample_timesteps`, e.g. by APT); otherwise they are drawn here.
    `generator` (optional) makes the draw reproducible.
    """
    noise = sample_noise(args, latents, generator)
    if timesteps is None:
        timesteps = sample_timesteps(args, noise_scheduler, latents.shape[0], latents.device, generator)
    else:
        timesteps = timesteps.long().to(latents.device)
    noisy = add_noise(args, noise_scheduler, latents, noise, timesteps, generator)
    return noise, noisy, timesteps


def get_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The regression target: ε for epsilon models, v = √ᾱ·ε − √(1−ᾱ)·x0 for v-prediction models."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        sqrt_ac, sqrt_one_minus_ac = _sqrt_alpha_terms(noise_scheduler, latents, timesteps)
        return sqrt_ac * noise - sqrt_one_minus_ac * latents
    raise TrainingSetupError(
        f"noise scheduler prediction_type {prediction_type!r} is not supported; LoRA training supports "
        "epsilon and v_prediction (--v_parameterization)"
    )


def fix_noise_scheduler_betas_for_zero_terminal_snr(noise_scheduler) -> None:
    """`--zero_terminal_snr` (arXiv 2305.08891): rescale betas so that ᾱ_T = 0, as sd-scripts does in place.

    The SNR loss weights (min-SNR, debiased, v-pred-like, scale-v) keep the schedule's ᾱ from before the rescale
    (`snr_alphas_cumprod`), as in sd-scripts, whose `all_snr` table is made before it: the weights users tuned
    there, and finite at t = T where the rescaled SNR is 0 (1/√SNR would be infinite)."""
    if getattr(noise_scheduler, "snr_alphas_cumprod", None) is None:
        noise_scheduler.snr_alphas_cumprod = noise_scheduler.alphas_cumprod.clone()
    betas = noise_scheduler.betas
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    a_t = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    betas = 1 - alphas
    noise_scheduler.betas = betas
    noise_scheduler.alphas = 1.0 - betas
    noise_scheduler.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
