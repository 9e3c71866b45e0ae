"""APT's adaptive augmentation (DESIGN.md §2.2, paper Eq. 2).

A training sample whose timestep bin overfits (γ high) is, with probability p = min(γ, p_max), zoomed
out by s ~ U(1, 3) (content scaled by 1/s about the centre) and rotated by U(−15°, 15°), the uncovered
border black. Pixel space is the faithful version; latent space is for cached latents.

Resampling, one code path for both spaces (`_warp`):
1. Antialias: `F.interpolate(antialias=True)` of the sample to (round(H/s), round(W/s)). Zooming out by
   up to 3× needs a low-pass filter first, or fine texture aliases into moiré that the model would
   learn; the antialiased resize is that filter, and it leaves an image whose pixel pitch matches the
   output's, so the next step resamples at about 1:1.
2. Warp: one `grid_sample` (bilinear, align_corners=False) of the small image with the exact affine
   (scale s, rotation, aspect ratio accounted for). With align_corners=False, normalised coordinates
   cover the image extent whatever its resolution, so rounding the size in step 1 changes the filter
   width slightly but never the geometry.
3. Fill: the warp samples (x − fill) with zero padding and adds fill back, so outside the content the
   value is exactly `fill` (−1 in pixel space, the black latent in latent space) and the content edge is
   blended with it bilinearly (antialiased edge).
Samples not selected are returned bit-exact. The augmentation never touches SDXL's size conditioning.

No value is read back from the device (issue 6: the step never waits for the GPU): the scales and angles are
drawn on the host, every sample is warped with them, and the Bernoulli mask (on the device, from γ) picks
warped or original with `torch.where`. Warping a sample that is then not used costs a few small kernels, far
less than the stall a `mask.any()` or a per-sample index read would cost.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

P_MAX = 0.8
SCALE_RANGE = (1.0, 3.0)
ROTATION_DEG = 15.0


def aug_probability(gamma_per_sample: torch.Tensor, p_max: float = P_MAX) -> torch.Tensor:
    """Eq. 2: p_i = clamp(γ_i, 0, p_max)."""
    return gamma_per_sample.detach().float().clamp(0.0, p_max)


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """U[0, 1) on the generator's device (a CPU generator cannot draw CUDA tensors), then moved."""
    dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=dev).to(device)


def sample_aug_mask(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(p_i) per sample -> BoolTensor on p's device (u < p with u ~ U[0, 1): p = 0 never, p = 1 always)."""
    return _rand(p.numel(), generator, p.device).reshape(p.shape) < p


def zoom_rotate_params(n: int, scale_range: tuple[float, float] = SCALE_RANGE, rotation_deg: float = ROTATION_DEG,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """s ~ U(scale_range) and angle ~ U(−rotation_deg, rotation_deg) in degrees, (n,) float32 each, on the host
    (the warp's sizes and matrices are built from them there; a CPU generator, or none, keeps this sync-free).

    Drawn for every sample, augmented or not, so the random stream does not depend on the mask.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(f"scale_range must satisfy 1 <= low <= high (zoom-out only), got {scale_range}")
    scales = lo + (hi - lo) * _rand(n, generator, "cpu")
    angles = (2.0 * _rand(n, generator, "cpu") - 1.0) * float(rotation_deg)
    return scales, angles


def _theta(scale: float, angle_deg: float, h: int, w: int) -> torch.Tensor:
    """affine_grid matrix mapping output to input normalised coordinates: p_in = s · R(−a) · p_out,
    with the rotation done in pixel units (x·W/2, y·H/2) so non-square images rotate rigidly.
    Positive angles turn the content clockwise on screen (y points down)."""
    a = math.radians(angle_deg)
    c, sn = math.cos(a), math.sin(a)
    return torch.tensor([[scale * c, scale * sn * h / w, 0.0],
                         [-scale * sn * w / h, scale * c, 0.0]], dtype=torch.float32)


def _warp(x: torch.Tensor, scale: float, theta: torch.Tensor, fill: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """Zoom out by `scale` and rotate one sample x (1, C, H, W) float32 with `theta` (1, 2, 3) (`_theta` of that
    scale and angle, on x's device); outside the content: `fill` (1, C, 1, 1)."""
    _, _, h, w = x.shape
    src = x - fill
    small = (max(1, round(h / scale)), max(1, round(w / scale)))
    if antialias and small != (h, w):
        src = F.interpolate(src, size=small, mode="bilinear", align_corners=False, antialias=True)
    grid = F.affine_grid(theta, [1, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _apply(x: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor, fill: torch.Tensor,
           antialias: bool) -> torch.Tensor:
    """Every sample warped with its host (scale, angle), kept where `mask` (on x's device): nothing is read back."""
    from library.transfer import to_device

    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    if mask.numel() != x.shape[0] or scales.numel() != x.shape[0] or angles.numel() != x.shape[0]:
        raise ValueError(f"batch of {x.shape[0]}: mask, scales and angles need one value per sample, got "
                         f"{mask.numel()}, {scales.numel()}, {angles.numel()}")
    s, a = scales.reshape(-1).tolist(), angles.reshape(-1).tolist()  # host tensors (zoom_rotate_params)
    h, w = x.shape[-2:]
    theta = to_device(torch.stack([_theta(si, ai, h, w) for si, ai in zip(s, a)]), x.device)
    fill = fill.to(x.device, torch.float32)
    warped = torch.cat([_warp(x[i : i + 1].float(), s[i], theta[i : i + 1], fill, antialias) for i in range(len(s))])
    return torch.where(mask.reshape(-1, 1, 1, 1).to(x.device), warped.to(x.dtype), x)


def apply_pixel_aug(images: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor,
                    antialias: bool = True) -> torch.Tensor:
    """Zoom-out + rotation of the masked samples of [−1, 1] images (B, 3, H, W), border −1 (black)."""
    fill = torch.full((1, images.shape[1], 1, 1), -1.0, device=images.device)
    return _apply(images, mask, scales, angles, fill, antialias)


def apply_mask_aug(loss_mask: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor,
                   antialias: bool = True) -> torch.Tensor:
    """The same affine on per-pixel loss weights (B, H, W) or (B, 1, H, W) (alpha masks): the weights move with
    the content, and the uncovered border weighs 0 (it is not the subject; sd-scripts' masks are 0 there too)."""
    x = loss_mask.unsqueeze(1) if loss_mask.dim() == 3 else loss_mask
    out = _apply(x.float(), mask, scales, angles, torch.zeros(1, 1, 1, 1, device=x.device), antialias)
    return out.squeeze(1) if loss_mask.dim() == 3 else out


def apply_latent_aug(latents: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, angles: torch.Tensor,
                     fill_latent: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """The same affine on latents (B, C, h, w); border = `fill_latent` ((C,) or (C, 1, 1): the latent of an
    all-black image, see `black_latent`), not zeros: a zero latent decodes to mid-grey, not black."""
    fill = fill_latent.detach().reshape(1, -1, 1, 1)
    if fill.shape[1] != latents.shape[1]:
        raise ValueError(f"fill_latent has {fill.shape[1]} channels, latents have {latents.shape[1]}")
    return _apply(latents, mask, scales, angles, fill, antialias)


@torch.no_grad()
def black_latent(vae, latent_scale: float, size_hw: tuple[int, int] = (256, 256), device=None,
                 dtype=None) -> torch.Tensor:
    """Per-channel latent (C,) of an all-black (−1) image: the mean over the central half of its latent map (each
    side), × latent_scale, in `dtype`.

    Encoded once with the VAE where it is (its device; on a CPU in float32, its half precision is slow there: minutes
    for an fp16 VAE at 256²), using latent_dist.mean (the mode: a sample would add
    the posterior's noise to every fill). A constant per channel is what a fill at any position and bucket size
    needs. The map is constant only away from the image's edges, where the encoder's zero padding reaches in: at
    256² the central 16×16 of a 32×32 map is flat, while a 64² image (8×8 latents, the first version) has no
    position the edges leave alone (tests/test_apt_augment.py).
    """
    p = next(vae.parameters())
    vae_device, vae_dtype = p.device, p.dtype
    upcast = vae_device.type == "cpu" and vae_dtype != torch.float32
    if upcast:  # and back afterwards: fp16/bf16 -> fp32 -> fp16/bf16 is exact
        vae.float()
    try:
        img = torch.full((1, 3, int(size_hw[0]), int(size_hw[1])), -1.0, device=vae_device,
                         dtype=next(vae.parameters()).dtype)
        z = vae.encode(img).latent_dist.mean.float() * float(latent_scale)
    finally:
        if upcast:
            vae.to(vae_dtype)
    h, w = z.shape[-2:]
    fill = z[:, :, h // 4: h - h // 4, w // 4: w - w // 4].mean(dim=(0, 2, 3))
    return fill.to(device if device is not None else vae_device, dtype if dtype is not None else torch.float32)


class AdaptiveAugment:
    """p_max, zoom range, rotation range and resampling in one object; `__call__` does §2.2 for a batch.

    Random draws, in order: the mask (one U[0,1) per sample), then the scales, then the angles (one per
    sample each, augmented or not).
    """

    def __init__(self, p_max: float = P_MAX, scale_range: tuple[float, float] = SCALE_RANGE,
                 rotation_deg: float = ROTATION_DEG, antialias: bool = True):
        if not 0.0 <= p_max <= 1.0:
            raise ValueError(f"p_max must be in [0, 1], got {p_max}")
        self.p_max = float(p_max)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotation_deg = float(rotation_deg)
        self.antialias = bool(antialias)

    def __call__(self, x: torch.Tensor, gamma_per_sample: torch.Tensor, space: str,
                 fill_latent: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 loss_mask: torch.Tensor | None = None):
        """-> (x_aug, mask, loss_mask_aug): `loss_mask` (per-pixel loss weights such as alpha masks, any
        resolution, or None) warped with x. `space`: "pixel" ([−1, 1] images) or "latent" (needs `fill_latent`)."""
        if space not in ("pixel", "latent"):
            raise ValueError(f"space must be 'pixel' or 'latent' (resolve 'auto' before), got {space!r}")
        if space == "latent" and fill_latent is None:
            raise ValueError("latent-space augmentation needs fill_latent (black_latent(vae, ...))")
        gamma = gamma_per_sample.to(x.device)
        mask = sample_aug_mask(aug_probability(gamma, self.p_max), generator)
        scales, angles = zoom_rotate_params(x.shape[0], self.scale_range, self.rotation_deg, generator)
        if space == "pixel":
            x_aug = apply_pixel_aug(x, mask, scales, angles, self.antialias)
        else:
            x_aug = apply_latent_aug(x, mask, scales, angles, fill_latent, self.antialias)
        if loss_mask is not None:
            loss_mask = apply_mask_aug(loss_mask, mask.to(loss_mask.device), scales, angles, self.antialias)
        return x_aug, mask, loss_mask

    def __repr__(self) -> str:
        return (f"AdaptiveAugment(p_max={self.p_max}, scale_range={self.scale_range}, "
                f"rotation_deg={self.rotation_deg}, antialias={self.antialias})")
