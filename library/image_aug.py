"""sd-scripts' `color_aug` subset option: a small random colour change of the training image, drawn per image and
step from the item's own generator (so it is the same in every run with the same seed, with any number of workers).

With probability 0.33: half the time a hue shift of up to ±8 of OpenCV's 180 hue steps (±16°), else a gamma in
[0.95, 1.05]. sd-scripts computes its gamma as `pixel ** gamma` on 0-255 values, which scales bright pixels by up to
255^0.05 = 1.32 (then clips): a brightness jump, not the ±5 % gamma that albumentations' RandomGamma (95, 105) it
replaced gives. Here the gamma is applied to values in [0, 1], as intended (docs/dataset_config.md).
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image

HUE_SHIFT_LIMIT = 8 / 180  # of the hue circle
GAMMA_RANGE = (0.95, 1.05)


def color_aug(img: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() > 0.33:
        return img
    if rng.random() > 0.5:
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + shift * 256) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    lut = [min(255, round(255 * (v / 255) ** gamma)) for v in range(256)]
    return img.point(lut * len(img.getbands()))
