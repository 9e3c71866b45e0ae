"""Aspect-ratio buckets, resize and crop: sd-scripts' BucketManager / trim_and_resize_if_required semantics.

Sizes are (width, height) everywhere in this module, like sd-scripts.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    # PIL's BOX resize is a pixel-area average as cv2.INTER_AREA (sd-scripts' default down) is; at non-integer
    # ratios they differ by a few levels (PIL rounds between its two passes): no OpenCV dependency for that
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """Buckets of about max_reso's area: the largest square, then every width from min_size to max_size in steps,
    each with the tallest height (multiple of `divisible`, <= max_size) that keeps the area; both orientations."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class BucketManager:
    """Assigns each image a bucket resolution and the size to resize it to before the crop.

    `predefined`: use exactly these resolutions (a single one when bucketing is off). Otherwise the buckets are
    made by `make_bucket_resolutions`, or, with `no_upscale`, derived from each image's own size.
    """

    def __init__(self, max_reso: tuple[int, int], *, min_size: int = 256, max_size: int = 1024, reso_steps: int = 64,
                 no_upscale: bool = False, predefined: list[tuple[int, int]] | None = None):
        self.max_area = max_reso[0] * max_reso[1]
        self.reso_steps = reso_steps
        self.no_upscale = no_upscale and predefined is None
        if predefined is None and not self.no_upscale:
            predefined = make_bucket_resolutions(max_reso, min_size, max_size, reso_steps)
        self.predefined = list(predefined) if predefined is not None else []
        self._predefined_set = set(self.predefined)
        self._ratios = np.array([w / h for w, h in self.predefined]) if self.predefined else None

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], float]:
        """-> (bucket (w, h), resized size (w, h) that covers the bucket, aspect-ratio error bucket - image)."""
        ar = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                reso = self.predefined[int(np.abs(self._ratios - ar).argmin())]
            # scale so the image covers the bucket: match the side that would otherwise fall short
            scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:  # too large: shrink to the max area, keep the aspect ratio
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                bw = self._round(rw)
                ar_w = bw / self._round(bw / ar) if self._round(bw / ar) else math.inf
                bh = self._round(rh)
                ar_h = self._round(bh * ar) / bh if bh else math.inf
                if abs(ar_w - ar) < abs(ar_h - ar):
                    resized = (bw, int(bw / ar + 0.5))
                else:
                    resized = (int(bh * ar + 0.5), bh)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        return reso, resized, reso[0] / reso[1] - ar if reso[1] else math.inf


def get_crop_ltrb(bucket_reso: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """SDXL crop conditioning exactly as sd-scripts computes it (`train_util.get_crop_ltrb`, "according to the
    preprocessing of Stability AI"): where the image, fitted *inside* the bucket with its aspect ratio, would sit
    when centred. Right is kept so that a flipped image gets left = bucket width - right."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        rw, rh = bucket_reso[0], bucket_reso[0] / image_ar
    left = (bucket_reso[0] - rw) // 2
    top = (bucket_reso[1] - rh) // 2
    return left, top, left + rw, top + rh


def resize_filter(size: tuple[int, int], target: tuple[int, int], interpolation: str | None):
    """sd-scripts default: area for downscaling (both sides shrink or stay), lanczos otherwise."""
    if interpolation is None:
        interpolation = "area" if size[0] >= target[0] and size[1] >= target[1] else "lanczos"
    return _PIL_FILTERS[interpolation]


def resize_and_crop(image: Image.Image, bucket_reso: tuple[int, int], resized_size: tuple[int, int], *,
                    random_crop: bool = False, rng: random.Random | None = None,
                    interpolation: str | None = None,
                    offset: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to `resized_size` (covers the bucket), then crop to `bucket_reso`: centred, or at a random offset
    with `random_crop`, or at `offset` (the image's own crop, for its alpha mask). Returns the crop and its
    (left, top) offset in the resized image."""
    if image.size != tuple(resized_size):
        image = image.resize(tuple(resized_size), resize_filter(image.size, resized_size, interpolation))
    w, h = image.size
    offsets = list(offset) if offset is not None else []
    for size, target in ((w, bucket_reso[0]), (h, bucket_reso[1])) if offset is None else ():
        trim = max(size - target, 0)
        offsets.append(rng.randint(0, trim) if random_crop and trim > 0 else trim // 2)
    left, top = offsets
    if (w, h) != tuple(bucket_reso):
        image = image.crop((left, top, left + bucket_reso[0], top + bucket_reso[1]))
    return image, (left, top)
