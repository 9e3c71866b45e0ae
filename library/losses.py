"""Per-sample diffusion losses and their weighting with sd-scripts semantics (KOHYA_COMPAT.md section 6):
l2 / l1 / huber / smooth_l1, min-SNR, v-prediction scaling, debiased estimation; and the check that rejects the
noise and loss flag combinations sd-scripts rejects.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from library.noise import alphas_cumprod_on
from library.train_util import TrainingSetupError, _arg

logger = logging.getLogger(__name__)

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
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) (float32, on the timesteps' device), computed as sd-scripts' `all_snr` = (√ᾱ/√(1−ᾱ))²,
    with --zero_terminal_snr from the schedule before its rescale, as that table is (`snr_alphas_cumprod`)."""
    t = torch.as_tensor(timesteps).long()
    attr = "snr_alphas_cumprod" if getattr(noise_scheduler, "snr_alphas_cumprod", None) is not None else "alphas_cumprod"
    ac = alphas_cumprod_on(noise_scheduler, t.device, attr)[t]
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
# Flag validation
# ---------------------------------------------------------------------------------------------------------------


def check_noise_and_loss_args(args, v_prediction: bool, num_train_timesteps: int = 1000) -> None:
    """Reject the flag combinations sd-scripts rejects (`verify_training_args`), before any work is done.

    Why here: these mistakes otherwise surface as silently wrong training (or an index error mid-run).
    """
    adaptive, offset = getattr(args, "adaptive_noise_scale", None), getattr(args, "noise_offset", None)
    if adaptive is not None and offset is None:
        raise TrainingSetupError("--adaptive_noise_scale needs --noise_offset: set --noise_offset (e.g. 0.05) as well")
    if adaptive and not offset:  # a GUI config writes both keys, 0 when unused: accepted, as sd-scripts does
        logger.warning("--adaptive_noise_scale %g has no effect with --noise_offset 0 (the offset is off)", adaptive)
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
        if not float(_arg(args, "huber_c", 0.1)) > 0:  # exponential: log(c); constant: a huber loss of 0
            raise TrainingSetupError(f"--huber_c must be above 0 for --loss_type {loss_type}, got "
                                     f"{_arg(args, 'huber_c', 0.1)} (0.1 is the default)")
