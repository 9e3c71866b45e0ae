"""APT: Adaptive Personalized Training (Chae et al., CVPR 2025) as LoRA-trainer components.

Pure modules re-exported here: the overfitting indicator, the losses, the adaptive augmentation.
The model-facing parts (capture.py, prompts.py, step.py) are imported from their own modules, so that
importing `apt_ext` stays cheap and free of model code. See docs/apt.md.
"""
from apt_ext.augment import (
    P_MAX,
    ROTATION_DEG,
    SCALE_RANGE,
    AdaptiveAugment,
    apply_latent_aug,
    apply_pixel_aug,
    aug_probability,
    black_latent,
    sample_aug_mask,
    zoom_rotate_params,
)
from apt_ext.indicator import EMA_ALPHA, NUM_BINS, OverfittingIndicator, default_temperature
from apt_ext.losses import (
    DCO_BETA,
    LAMBDA_ATTN,
    LAMBDA_DIST,
    adaptive_weights,
    attn_loss,
    dco_loss,
    hidden_stats,
    rs_losses,
    total_loss,
)

__all__ = [
    "AdaptiveAugment", "apply_latent_aug", "apply_pixel_aug", "aug_probability", "black_latent",
    "sample_aug_mask", "zoom_rotate_params", "P_MAX", "ROTATION_DEG", "SCALE_RANGE",
    "OverfittingIndicator", "default_temperature", "EMA_ALPHA", "NUM_BINS",
    "adaptive_weights", "attn_loss", "dco_loss", "hidden_stats", "rs_losses", "total_loss",
    "DCO_BETA", "LAMBDA_ATTN", "LAMBDA_DIST",
]
