"""Training internals with sd-scripts semantics (KOHYA_COMPAT.md section 6).

Noise and timestep sampling, eps / v targets, per-sample losses and their weighting (min-SNR and friends),
optimizers, learning-rate schedules, output file names and dtypes (`--config_file`: library/config_file.py).

Everything reads the training flags from an `argparse.Namespace` with `getattr` defaults, so a namespace that
lacks a flag behaves as if the flag was not given (None / 0 / False = off). Errors the user can fix are raised
as `TrainingSetupError`, whose message names the flag and says what to do.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import logging
import math
import os
import re
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class TrainingSetupError(Exception):
    """A user-facing setup error (bad flag, missing optional package, bad config file).

    The message names the flag, key or file and says what to do; the CLI prints it without a traceback.
    """


def _arg(args, name: str, default=None):
    """`getattr` with a default that also applies when the attribute is None (a flag left unset)."""
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


# ---------------------------------------------------------------------------------------------------------------
# Flag validation
# ---------------------------------------------------------------------------------------------------------------


def check_noise_and_loss_args(args, v_prediction: bool, num_train_timesteps: int = 1000) -> None:
    """Reject the flag combinations sd-scripts rejects (`verify_training_args`), before any work is done.

    Why here: these mistakes otherwise surface as silently wrong training (or an index error mid-run).
    """
    if getattr(args, "adaptive_noise_scale", None) is not None and not getattr(args, "noise_offset", None):
        raise TrainingSetupError("--adaptive_noise_scale needs --noise_offset: set --noise_offset (e.g. 0.05) as well")
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False) and not v_prediction:
        raise TrainingSetupError(
            "--scale_v_pred_loss_like_noise_pred is only for v-prediction models: add --v_parameterization "
            "(SD2.x 768-v) or drop the flag"
        )
    if getattr(args, "v_pred_like_loss", None) and v_prediction:
        raise TrainingSetupError(
            "--v_pred_like_loss is only for epsilon-prediction models: drop it when training a v-prediction model"
        )
    if getattr(args, "zero_terminal_snr", False) and not v_prediction:
        logger.warning("--zero_terminal_snr without v-parameterization: training will behave unexpectedly")
    t_min = getattr(args, "min_timestep", None)
    t_max = getattr(args, "max_timestep", None)
    if t_min is not None and not 0 <= t_min <= num_train_timesteps:
        raise TrainingSetupError(f"--min_timestep must be in [0, {num_train_timesteps}], got {t_min}")
    if t_max is not None and not 0 <= t_max <= num_train_timesteps:
        raise TrainingSetupError(f"--max_timestep must be in [0, {num_train_timesteps}], got {t_max}")
    lo = 0 if t_min is None else t_min
    hi = num_train_timesteps if t_max is None else t_max
    if lo > hi:
        raise TrainingSetupError(f"--min_timestep ({lo}) must not exceed --max_timestep ({hi})")
    if lo == hi and hi >= num_train_timesteps:
        raise TrainingSetupError(
            f"--min_timestep == --max_timestep == {hi} gives the constant timestep {hi}, which does not exist "
            f"(timesteps are 0..{num_train_timesteps - 1}): lower --max_timestep"
        )
    loss_type = getattr(args, "loss_type", None)
    if loss_type is not None and loss_type not in LOSS_TYPES:
        raise TrainingSetupError(f"--loss_type {loss_type!r} is not known; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type in ("huber", "smooth_l1"):
        schedule = _arg(args, "huber_schedule", "snr")
        if schedule not in HUBER_SCHEDULES:
            raise TrainingSetupError(
                f"--huber_schedule {schedule!r} is not known; choose one of {', '.join(HUBER_SCHEDULES)}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Noise, timesteps, targets
# ---------------------------------------------------------------------------------------------------------------


def alphas_cumprod_on(noise_scheduler, device) -> torch.Tensor:
    """ᾱ (float32) on `device`, copied there once and kept beside the scheduler (rebuilt if its ᾱ is replaced, as
    --zero_terminal_snr does). The step indexes it with device timesteps: diffusers' add_noise moves ᾱ to the
    latents' device on every call and sd-scripts moves it back, two copies that each make the host wait (issue 6)."""
    from library.transfer import to_device

    device = torch.device(device)
    ac = noise_scheduler.alphas_cumprod
    source, copies = getattr(noise_scheduler, "_apt_alphas_cumprod", (None, {}))
    if source is not ac:
        source, copies = ac, {}
        noise_scheduler._apt_alphas_cumprod = (source, copies)
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
    """`--zero_terminal_snr` (arXiv 2305.08891): rescale betas so that ᾱ_T = 0, as sd-scripts does in place."""
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


# ---------------------------------------------------------------------------------------------------------------
# Losses and their weighting
# ---------------------------------------------------------------------------------------------------------------

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1", "dco")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def get_huber_c(args, timesteps: torch.Tensor, noise_scheduler) -> Optional[torch.Tensor]:
    """Per-sample huber_c for `--loss_type huber|smooth_l1` (sd-scripts `get_huber_threshold_if_needed`).

    constant: c·scale; exponential: exp(ln(c)·t/T)·scale; snr (default): (1−c)/(1+σ_t)² + c with σ_t = √((1−ᾱ)/ᾱ).
    None for the other loss types.
    """
    loss_type = _arg(args, "loss_type", "l2")
    if loss_type not in ("huber", "smooth_l1"):
        return None
    huber_c = float(_arg(args, "huber_c", 0.1))
    huber_scale = float(_arg(args, "huber_scale", 1.0))
    schedule = _arg(args, "huber_schedule", "snr")
    b = timesteps.shape[0]
    if schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        ac = alphas_cumprod_on(noise_scheduler, timesteps.device)[timesteps]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full((b,), huber_c * huber_scale, device=timesteps.device)
    raise TrainingSetupError(f"--huber_schedule {schedule!r} is not known; choose one of {', '.join(HUBER_SCHEDULES)}")


def per_sample_loss(pred, target, loss_type: str = "l2", huber_c=0.1, mask=None) -> torch.Tensor:
    """Per-sample loss (B,) in float32: the element loss averaged over every non-batch dimension.

    Element losses as sd-scripts' `conditional_loss(..., reduction="none")`: l2 (d²), l1 (|d|),
    huber (2c(√(d²+c²) − c)), smooth_l1 (2(√(d²+c²) − c)); `huber_c` is a float or a (B,) tensor
    (see `get_huber_c`). "dco" gives the l2 error that DCO compares between the two passes.
    `mask` (B,1,h,w) or (B,h,w), e.g. an alpha mask, is area-resized to the prediction and multiplied in
    before the mean (sd-scripts `apply_masked_loss`).
    """
    pred = pred.float()
    target = target.float()
    diff = pred - target
    if loss_type in ("l2", "dco"):
        loss = diff**2
    elif loss_type == "l1":
        loss = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        c = huber_c
        if not torch.is_tensor(c):
            c = torch.tensor(float(c), device=pred.device)
        c = c.float().to(pred.device)
        if c.ndim > 0:
            c = c.view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt(diff**2 + c**2) - c
        loss = 2 * c * root if loss_type == "huber" else 2 * root
    else:
        raise TrainingSetupError(f"--loss_type {loss_type!r} is not known; choose one of {', '.join(LOSS_TYPES)}")
    if mask is not None:
        mask = mask.float().to(pred.device)
        if mask.ndim == pred.ndim - 1:
            mask = mask.unsqueeze(1)
        if mask.shape[-2:] != pred.shape[-2:]:
            mask = F.interpolate(mask, size=pred.shape[-2:], mode="area")
        loss = loss * mask
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def snr_of(noise_scheduler, timesteps) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) (float32, on the timesteps' device), computed as sd-scripts' `all_snr` = (√ᾱ/√(1−ᾱ))²."""
    t = torch.as_tensor(timesteps).long()
    ac = alphas_cumprod_on(noise_scheduler, t.device)[t]
    return (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2


def apply_snr_weight(loss, timesteps, noise_scheduler, gamma: float, v_prediction: bool = False):
    """Min-SNR-γ weighting (arXiv 2303.09556): × min(snr, γ)/snr (eps) or × min(snr, γ)/(snr + 1) (v).

    Evens out the loss scale across timesteps so the easy, low-noise ones stop dominating.
    """
    snr = snr_of(noise_scheduler, timesteps)
    min_snr = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if v_prediction:
        weight = min_snr / (snr + 1)
    else:
        # snr = 0 only with --zero_terminal_snr; min(snr, γ)/snr tends to 1 there
        weight = torch.where(snr > 0, min_snr / snr.clamp_min(1e-20), torch.ones_like(snr))
    return loss * weight.float().to(loss.device)


def _snr_capped(noise_scheduler, timesteps) -> torch.Tensor:
    return snr_of(noise_scheduler, timesteps).clamp(max=1000.0)


def scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler):
    """`--scale_v_pred_loss_like_noise_pred`: × snr/(snr+1) (snr capped at 1000), making v-loss scale like eps-loss."""
    snr = _snr_capped(noise_scheduler, timesteps)
    return loss * (snr / (snr + 1)).to(loss.device)


def add_v_prediction_like_loss(loss, timesteps, noise_scheduler, v_pred_like_loss: float):
    """`--v_pred_like_loss k`: loss + k · loss / (snr/(snr+1)), an eps-model loss with a v-like term added."""
    snr = _snr_capped(noise_scheduler, timesteps)
    scale = (snr / (snr + 1)).to(loss.device)
    return loss + loss / scale * v_pred_like_loss


def apply_debiased_estimation(loss, timesteps, noise_scheduler, v_prediction: bool = False):
    """`--debiased_estimation_loss` (arXiv 2310.08442): × 1/√snr (eps) or × 1/(snr+1) (v), snr capped at 1000."""
    snr = _snr_capped(noise_scheduler, timesteps)
    weight = 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)
    return loss * weight.to(loss.device)


def post_process_loss(loss, args, timesteps, noise_scheduler):
    """Apply the per-sample loss weightings the flags ask for, in sd-scripts' order.

    min_snr_gamma → scale_v_pred_loss_like_noise_pred → v_pred_like_loss → debiased_estimation_loss.
    Whether the model is v-prediction is read from the scheduler (it is the source of truth for the target).
    """
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    if getattr(args, "min_snr_gamma", None):
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, v_prediction)
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False):
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if getattr(args, "v_pred_like_loss", None):
        loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if getattr(args, "debiased_estimation_loss", False):
        loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, v_prediction)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------------

OPTIMIZER_CHOICES = ("AdamW", "AdamW8bit", "SGDNesterov", "Adafactor")
BNB_HINT = "a GPU extra: pip install -r requirements-gpu.txt, or use --optimizer_type AdamW"
# sd-scripts optimizer names we do not build in, and the module path that gives the same class
_SD_SCRIPTS_ONLY = {
    "lion": ("lion_pytorch.Lion", "pip install lion-pytorch"),
    "prodigy": ("prodigyopt.Prodigy", "pip install prodigyopt"),
    "dadaptation": ("dadaptation.DAdaptAdamPreprint", "pip install dadaptation"),
    "dadaptadam": ("dadaptation.DAdaptAdam", "pip install dadaptation"),
    "dadaptadagrad": ("dadaptation.DAdaptAdaGrad", "pip install dadaptation"),
    "dadaptadan": ("dadaptation.DAdaptAdan", "pip install dadaptation"),
    "dadaptadanip": ("dadaptation.experimental.DAdaptAdanIP", "pip install dadaptation"),
    "dadaptlion": ("dadaptation.DAdaptLion", "pip install dadaptation"),
    "dadaptsgd": ("dadaptation.DAdaptSGD", "pip install dadaptation"),
    "lion8bit": ("bitsandbytes.optim.Lion8bit", BNB_HINT),
    "pagedlion8bit": ("bitsandbytes.optim.PagedLion8bit", BNB_HINT),
    "pagedadamw": ("bitsandbytes.optim.PagedAdamW", BNB_HINT),
    "pagedadamw8bit": ("bitsandbytes.optim.PagedAdamW8bit", BNB_HINT),
    "pagedadamw32bit": ("bitsandbytes.optim.PagedAdamW32bit", BNB_HINT),
    "sgdnesterov8bit": ("bitsandbytes.optim.SGD8bit --optimizer_args momentum=0.9 nesterov=True", BNB_HINT),
    "radamschedulefree": ("schedulefree.RAdamScheduleFree", "pip install schedulefree"),
    "adamwschedulefree": ("schedulefree.AdamWScheduleFree", "pip install schedulefree"),
    "sgdschedulefree": ("schedulefree.SGDScheduleFree", "pip install schedulefree"),
}


def parse_kv_args(values: Optional[Iterable[str]], flag: str) -> dict:
    """Parse `k=v` strings with `ast.literal_eval` values (sd-scripts `--optimizer_args` / `--lr_scheduler_args`)."""
    kwargs = {}
    for item in values or []:
        if "=" not in item:
            raise TrainingSetupError(f"{flag}: {item!r} is not key=value (e.g. {flag} weight_decay=0.01 betas=0.9,0.999)")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise TrainingSetupError(
                f"{flag}: the value of {item!r} is not a Python literal; numbers, True/False, tuples (0.9,0.999) "
                f"work as they are, strings need quotes: {key}='{value.strip()}'"
            ) from None
    return kwargs


def _import_optimizer_class(path: str):
    """`torch.optim` class name (no dot) or a `module.ClassName` path, with a usable error when it is missing."""
    if "." not in path:
        cls = getattr(torch.optim, path, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
        torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                       and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)]
        close = difflib.get_close_matches(path.lower(), [n.lower() for n in (*OPTIMIZER_CHOICES, *torch_names)], n=1)
        spelled = {n.lower(): n for n in (*OPTIMIZER_CHOICES, *torch_names)}
        hint = f" (did you mean {spelled[close[0]]}?)" if close else ""
        raise TrainingSetupError(
            f"--optimizer_type {path!r} is not known{hint}; choose one of {', '.join(OPTIMIZER_CHOICES)}, "
            "a torch.optim class name (e.g. RAdam), or a module path such as mypackage.MyOptimizer"
        )
    module_name, class_name = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = BNB_HINT if module_name.split(".")[0] == "bitsandbytes" else f"install the package that provides {module_name}"
        raise TrainingSetupError(f"--optimizer_type {path} needs the module {module_name} ({e}): {hint}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TrainingSetupError(f"--optimizer_type {path}: the module {module_name} has no class {class_name}")
    return cls


def set_unet_layout(unet, args) -> None:
    """--channels_last: the UNet's 4-d weights in channels_last (NHWC) layout; convolutions then run NHWC and
    pass that layout on. The LoRA weights keep theirs (their convs are 1x1 or small)."""
    if getattr(args, "channels_last", False):
        unet.to(memory_format=torch.channels_last)


def _all_on_cuda(params) -> bool:
    """Whether every tensor of `params` (tensors or param-group dicts) is on a CUDA device."""
    tensors = []
    for p in params:
        group = p["params"] if isinstance(p, dict) else [p]
        if not isinstance(group, (list, tuple)):
            return False  # a generator: do not consume it
        tensors.extend(group)
    return bool(tensors) and all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def get_optimizer(args, trainable_params) -> tuple[str, torch.optim.Optimizer]:
    """Build the optimizer the flags ask for; returns (description, optimizer).

    The description is sd-scripts' `ss_optimizer` string: `module.Class(k=v,...)`, e.g.
    `torch.optim.adamw.AdamW(weight_decay=0.01)`. Built in: AdamW (default; fused=True when every parameter is on
    CUDA and --optimizer_args names neither fused nor foreach), AdamW8bit (bitsandbytes, optional),
    SGDNesterov (torch SGD, nesterov, momentum 0.9 unless given), Adafactor (transformers); also any torch.optim
    class name or `module.ClassName`. `--use_8bit_adam` is the legacy spelling of AdamW8bit.
    As in sd-scripts, Adafactor with relative_step (its default) ignores the learning rates and switches
    `args.lr_scheduler` to `adafactor:<lr>`.
    """
    optimizer_type = getattr(args, "optimizer_type", None) or ""
    if getattr(args, "use_8bit_adam", False):
        # "AdamW" is accepted too: it is the parser default, so it cannot be told apart from an unset flag
        if optimizer_type and optimizer_type.lower() not in ("adamw", "adamw8bit"):
            raise TrainingSetupError(
                f"--use_8bit_adam and --optimizer_type {optimizer_type} disagree: use only --optimizer_type"
            )
        optimizer_type = "AdamW8bit"
    if getattr(args, "use_lion_optimizer", False):
        raise TrainingSetupError("--use_lion_optimizer is not built in: use --optimizer_type lion_pytorch.Lion (pip install lion-pytorch)")
    if not optimizer_type:
        optimizer_type = "AdamW"
    kind = optimizer_type.lower()
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    lr = getattr(args, "learning_rate", None)
    extra: dict = {}  # constructor arguments that are not part of the description (sd-scripts' convention)

    if not isinstance(trainable_params, (list, tuple)):
        trainable_params = list(trainable_params)

    if kind == "adamw":
        optimizer_class = torch.optim.AdamW
        if "fused" not in kwargs and "foreach" not in kwargs and _all_on_cuda(trainable_params):
            extra["fused"] = True  # one kernel per step instead of ~12 per tensor list; torch's default is foreach
    elif kind == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: F401  (optional GPU extra)
        except ImportError:
            raise TrainingSetupError(f"--optimizer_type AdamW8bit needs bitsandbytes, {BNB_HINT}") from None
        optimizer_class = bnb.optim.AdamW8bit
    elif kind == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        optimizer_class = torch.optim.SGD
        extra["nesterov"] = True
    elif kind == "adafactor":
        from transformers.optimization import Adafactor

        optimizer_class = Adafactor
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # relative_step computes its own lr: the schedule becomes AdafactorSchedule, group lrs are dropped
            if lr:
                logger.warning("Adafactor with relative_step: --learning_rate is used only as the initial lr")
            if trainable_params and isinstance(trainable_params[0], dict):
                had_group_lr = False
                for group in trainable_params:
                    had_group_lr = (group.pop("lr", None) is not None) or had_group_lr
                if had_group_lr:
                    logger.warning("Adafactor with relative_step ignores --unet_lr and --text_encoder_lr")
            args.lr_scheduler = f"adafactor:{lr}"
            lr = None
    elif kind in _SD_SCRIPTS_ONLY:
        path, hint = _SD_SCRIPTS_ONLY[kind]
        raise TrainingSetupError(
            f"--optimizer_type {optimizer_type} is an sd-scripts optimizer APT-LoRA does not build in; "
            f"use --optimizer_type {path} ({hint}), or one of {', '.join(OPTIMIZER_CHOICES)}"
        )
    else:
        optimizer_class = _import_optimizer_class(optimizer_type)

    if lr is not None or kind == "adafactor":
        extra["lr"] = lr  # without --learning_rate the optimizer's own default applies
    try:
        optimizer = optimizer_class(trainable_params, **kwargs, **extra)
    except TypeError as e:
        raise TrainingSetupError(
            f"--optimizer_type {optimizer_type} rejected --optimizer_args {kwargs}: {e}; check the argument names"
        ) from None
    except (ValueError, IndexError, KeyError, AssertionError) as e:
        raise TrainingSetupError(
            f"--optimizer_type {optimizer_type} rejected its settings ({type(e).__name__}: {e}); "
            f"check --learning_rate ({lr}) and --optimizer_args {kwargs}"
        ) from None

    name = optimizer_class.__module__ + "." + optimizer_class.__name__
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return name + (f"({args_str})" if args_str else ""), optimizer


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------

SCHEDULER_CHOICES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
)


def int_or_float(value: str):
    """argparse type of `--lr_warmup_steps` (sd-scripts): "N%" → N/100, "0.1" → 0.1 (a ratio), "100" → 100."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
        if number >= 1:
            return int(text) if re.fullmatch(r"[+-]?\d+", text) else _integral_or_fail(number, text)
        return number
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio < 1 or a percentage like 10%") from None


def _integral_or_fail(number: float, text: str) -> int:
    if number.is_integer():
        return int(number)
    raise ValueError(text)


def resolve_warmup_steps(value, num_training_steps: int) -> int:
    """`--lr_warmup_steps` as optimizer steps: an int, a ratio in [0, 1) of the total, or "N%"."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except argparse.ArgumentTypeError as e:
            raise TrainingSetupError(f"--lr_warmup_steps: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingSetupError(f"--lr_warmup_steps must be a number or a percentage, got {value!r}")
    if value < 0:
        raise TrainingSetupError(f"--lr_warmup_steps must not be negative, got {value}")
    if isinstance(value, float):
        if value < 1:
            return int(value * num_training_steps)
        if not value.is_integer():
            raise TrainingSetupError(
                f"--lr_warmup_steps {value}: use a whole number of steps, a ratio below 1 (0.1) or a percentage (10%)"
            )
    return int(value)


def get_lr_scheduler(args, optimizer, num_training_steps: int, num_processes: int = 1):
    """The LR schedule (sd-scripts `get_scheduler_fix`), built with diffusers' schedule functions.

    `--lr_scheduler` constant | constant_with_warmup | linear | cosine | cosine_with_restarts
    (`--lr_scheduler_num_cycles`) | polynomial (`--lr_scheduler_power`) | adafactor[:lr] (with Adafactor);
    `--lr_scheduler_args k=v` go to the schedule function; `--lr_scheduler_type module.Class` builds any
    scheduler class from `--lr_scheduler_args`.
    `num_processes`: how often the schedule is stepped per optimizer step. accelerate's prepared scheduler
    steps once per process, so like sd-scripts every step count is multiplied by it. Unlike sd-scripts, an
    integer `--lr_warmup_steps` is multiplied too, so it always means optimizer steps (sd-scripts' integer
    warmup shrinks with the number of GPUs; identical on one GPU).
    Warmup with `constant` is an error, as in sd-scripts.
    """
    name = _arg(args, "lr_scheduler", "constant")
    num_processes = max(1, int(num_processes))
    total = int(num_training_steps) * num_processes
    warmup_arg = getattr(args, "lr_warmup_steps", None)
    warmup_value = warmup_arg
    if isinstance(warmup_value, str):
        try:
            warmup_value = int_or_float(warmup_value)
        except argparse.ArgumentTypeError as e:
            raise TrainingSetupError(f"--lr_warmup_steps: {e}") from None
    if isinstance(warmup_value, float) and warmup_value < 1:
        warmup = resolve_warmup_steps(warmup_value, total)  # a ratio of the scheduler's own step count
    else:
        warmup = resolve_warmup_steps(warmup_value, total) * num_processes
    if warmup > total:
        logger.warning(f"--lr_warmup_steps ({warmup_arg}) is longer than the training ({num_training_steps} steps)")
    sched_kwargs = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")

    custom = getattr(args, "lr_scheduler_type", None)
    if custom:
        if "." in custom:
            module_name, class_name = custom.rsplit(".", 1)
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as e:
                raise TrainingSetupError(f"--lr_scheduler_type {custom}: cannot import it ({e})") from None
        else:
            cls = getattr(torch.optim.lr_scheduler, custom, None)
            if cls is None:
                raise TrainingSetupError(f"--lr_scheduler_type {custom} is not a torch.optim.lr_scheduler class")
        try:
            return cls(optimizer, **sched_kwargs)
        except TypeError as e:
            raise TrainingSetupError(f"--lr_scheduler_type {custom} rejected --lr_scheduler_args {sched_kwargs}: {e}") from None

    def no_warmup(what: str):
        if warmup:
            raise TrainingSetupError(
                f"--lr_scheduler {what} does not use --lr_warmup_steps (got {warmup_arg}): use --lr_scheduler "
                "constant_with_warmup (or linear/cosine/...), or set --lr_warmup_steps 0"
            )

    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise TrainingSetupError("--lr_scheduler adafactor only works with --optimizer_type Adafactor")
        no_warmup(name)
        initial_lr = name.split(":", 1)[1] if ":" in name else None
        initial_lr = float(initial_lr) if initial_lr not in (None, "", "None") else 0.0
        return AdafactorSchedule(optimizer, initial_lr)

    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    if name not in SCHEDULER_CHOICES:
        close = difflib.get_close_matches(name, SCHEDULER_CHOICES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TrainingSetupError(
            f"--lr_scheduler {name!r} is not supported{hint}; choose one of {', '.join(SCHEDULER_CHOICES)}"
        )
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    try:
        if name == "constant":
            no_warmup(name)
            return fn(optimizer, **sched_kwargs)
        if name == "constant_with_warmup":
            return fn(optimizer, num_warmup_steps=warmup, **sched_kwargs)
        common = dict(num_warmup_steps=warmup, num_training_steps=total)
        if name == "cosine_with_restarts":
            return fn(optimizer, num_cycles=int(_arg(args, "lr_scheduler_num_cycles", 1)), **common, **sched_kwargs)
        if name == "polynomial":
            return fn(optimizer, power=float(_arg(args, "lr_scheduler_power", 1.0)), **common, **sched_kwargs)
        return fn(optimizer, **common, **sched_kwargs)
    except (TypeError, ValueError) as e:
        raise TrainingSetupError(f"--lr_scheduler {name}: {e}; check --lr_scheduler_args and --learning_rate") from None


# ---------------------------------------------------------------------------------------------------------------
# File names and dtypes
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_LAST_OUTPUT_NAME = "last"
DEFAULT_STEP_NAME = "at"


def _ext(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def ckpt_name(output_name: Optional[str], ext: str = ".safetensors", epoch: Optional[int] = None,
              step: Optional[int] = None) -> str:
    """sd-scripts file names: `{name}.safetensors`, `{name}-{epoch:06d}...`, `{name}-step{step:08d}...`.

    Without `--output_name` sd-scripts names them `last`, `epoch-000001` and `at-step00000100`; so do we.
    """
    if epoch is not None and step is not None:
        raise ValueError("ckpt_name: give epoch or step, not both")
    if epoch is not None:
        return f"{output_name or DEFAULT_EPOCH_NAME}-{int(epoch):06d}{_ext(ext)}"
    if step is not None:
        return f"{output_name or DEFAULT_STEP_NAME}-step{int(step):08d}{_ext(ext)}"
    return f"{output_name or DEFAULT_LAST_OUTPUT_NAME}{_ext(ext)}"


def state_dir_name(output_name: Optional[str], epoch: Optional[int] = None, step: Optional[int] = None) -> str:
    """Training-state folder names: `{name}-{epoch:06d}-state`, `{name}-step{step:08d}-state`, `{name}-state`."""
    return ckpt_name(output_name, ext="", epoch=epoch, step=step) + "-state"


_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: Optional[str]) -> torch.dtype:
    """The dtype of the frozen base weights: fp16 / bf16 under `--mixed_precision`, else float32."""
    if mixed_precision in (None, "no", "fp32", "float"):
        return torch.float32
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    raise TrainingSetupError(f"--mixed_precision {mixed_precision!r} is not known; choose no, fp16 or bf16")


def save_dtype(args) -> torch.dtype:
    """The dtype LoRA files are written in: `--save_precision` (float / fp16 / bf16).

    Without it sd-scripts keeps the training dtype of the network: fp16 / bf16 under `--full_fp16` /
    `--full_bf16`, otherwise float32.
    """
    precision = getattr(args, "save_precision", None)
    if precision is None:
        if getattr(args, "full_fp16", False):
            return torch.float16
        if getattr(args, "full_bf16", False):
            return torch.bfloat16
        return torch.float32
    if precision not in _PRECISIONS:
        raise TrainingSetupError(f"--save_precision {precision!r} is not known; choose float, fp16 or bf16")
    return _PRECISIONS[precision]


__all__ = [
    "TrainingSetupError",
    "check_noise_and_loss_args",
    "apply_noise_offset",
    "pyramid_noise_like",
    "timestep_range",
    "sample_timesteps",
    "sample_noise",
    "add_noise",
    "get_noise_noisy_latents_and_timesteps",
    "get_target",
    "fix_noise_scheduler_betas_for_zero_terminal_snr",
    "LOSS_TYPES",
    "get_huber_c",
    "per_sample_loss",
    "snr_of",
    "apply_snr_weight",
    "scale_v_prediction_loss_like_noise_prediction",
    "add_v_prediction_like_loss",
    "apply_debiased_estimation",
    "post_process_loss",
    "OPTIMIZER_CHOICES",
    "parse_kv_args",
    "get_optimizer",
    "SCHEDULER_CHOICES",
    "int_or_float",
    "resolve_warmup_steps",
    "get_lr_scheduler",
    "ckpt_name",
    "state_dir_name",
    "weight_dtype",
    "save_dtype",
]


# ---------------------------------------------------------------------------------------------------------------
# Output location (checked before anything is loaded or trained; docs/reliability.md)
# ---------------------------------------------------------------------------------------------------------------

# the longest suffix a run adds to --output_name: "-step00000000-state" folders, "-step00000000.safetensors" files
_LONGEST_OUTPUT_SUFFIX = len("-step00000000-state.safetensors")
_NAME_MAX = 255  # bytes per file name on ext4, NTFS, APFS


def check_output_location(args) -> None:
    """Refuse an `--output_name` that is not a plain file name stem and an `--output_dir` that cannot be written,
    before training starts (not after hours of it). Raises TrainingSetupError naming the flag.

    `--output_name`: not empty, no path separator (`/` or `\\`), no `..`, no control characters, short enough for
    the longest file name a run writes. `--output_dir`: the folder, or the nearest existing folder above it (it is
    created later), must be a folder in which a file can be created (probed with a temporary file that is removed at
    once; as root this is the real test, permission bits do not stop root). Nothing is created or left behind.
    """
    import tempfile

    name = getattr(args, "output_name", None)
    if name is not None:
        if not str(name).strip():
            raise TrainingSetupError('--output_name is empty: give a file name stem such as "my_lora" (or leave the '
                                     'flag out, which names the files "last", "epoch-000001", ...)')
        seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
        if any(s in name for s in seps):
            raise TrainingSetupError(
                f"--output_name {name!r} contains a path separator: it is a file name stem, not a path. Put the "
                f"folder in --output_dir and only the name in --output_name (e.g. --output_dir out/sub --output_name "
                f"my_lora)")
        if ".." in name:
            raise TrainingSetupError(f"--output_name {name!r} contains '..'; use a plain file name stem such as "
                                     f"\"my_lora\" (the folder goes in --output_dir)")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise TrainingSetupError(f"--output_name {name!r} contains a control character; use a plain file name "
                                     f"stem such as \"my_lora\"")
        if len(name.encode("utf-8", "surrogateescape")) + _LONGEST_OUTPUT_SUFFIX > _NAME_MAX:
            raise TrainingSetupError(f"--output_name is too long ({len(name)} characters): with the suffixes a run "
                                     f"adds (e.g. -step00000100.safetensors) file names must stay under "
                                     f"{_NAME_MAX} bytes; use at most {_NAME_MAX - _LONGEST_OUTPUT_SUFFIX}")

    out = getattr(args, "output_dir", None)
    if not out:
        return  # required elsewhere (verify_args)
    from library.safe_io import nearest_existing

    path = os.path.abspath(os.fspath(out))
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        what = "a broken link" if os.path.islink(existing) else "a file, not a folder"
        problem = f"it is {what}" if existing == path else f"cannot create the folder: {existing} is {what}"
        raise TrainingSetupError(f"--output_dir {out}: {problem}; choose another --output_dir")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".apt-lora-write-test-"):
            pass
    except OSError as e:
        where = "it" if existing == path else f"{existing} (where it would be created)"
        raise TrainingSetupError(f"--output_dir {out}: cannot write in {where}: {e.strerror or e}. Choose a folder you "
                                 f"can write to, or fix its permissions") from None


__all__.append("check_output_location")
