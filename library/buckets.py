"""Aspect-ratio buckets, resize and crop: sd-scripts' BucketManager / trim_and_resize_if_required semantics.

Sizes are (width, height) everywhere in this module, like sd-scripts.
"""
from __future__ import annotations

import math
import os
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


def face_from_filename(path: str) -> tuple[int, int, int, int] | None:
    """The face box sd-scripts' tools/detect_face_rotate.py writes into the file name, `<name>_<cx>_<cy>_<w>_<h>.png`
    (centre and size in pixels): (cx, cy, w, h), or None when the name does not end with four integers, cx <= 0
    (sd-scripts' "no face information") or the box has no size."""
    tokens = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None  # a box of size 0 would divide by 0


def face_crop(size: tuple[int, int], face: tuple[int, int, int, int], target: tuple[int, int],
              aug_range: tuple[float, float], random_crop: bool,
              rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """sd-scripts' face_crop_aug_range (`BaseDataset.crop_target`): the (resized size, (left, top) crop offset) that
    scales the image so the face's larger side is between 1/aug_range[1] and 1/aug_range[0] of the target's shorter
    side (drawn uniformly, never below covering the target, never above 1 unless covering needs it), and crops the
    target around the face: with `random_crop` shifted by up to the longer distance from the face to an edge
    (a triangular draw, so the face stays near the centre more often); with a range (min != max) and a face above
    a tenth of the side and 40 px, by up to 1/20 of the face. Returns the size unchanged when it is the target."""
    (w, h), (tw, th) = size, target
    if (w, h) == (tw, th):
        return size, (0, 0)
    face_size = max(face[2], face[3])
    side = min(tw, th)
    cover = max(th / h, tw / w)
    cap = max(1.0, cover)  # sd-scripts caps at 1 and asserts the image is larger than the target
    lo = min(cap, max(cover, side / (face_size * aug_range[1])))
    hi = min(cap, max(lo, side / (face_size * aug_range[0])))
    scale = lo if lo >= hi else rng.uniform(lo, hi)
    nw, nh = max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5))
    offsets = []
    for target_len, length, face_p in ((th, nh, int(face[1] * scale + 0.5)), (tw, nw, int(face[0] * scale + 0.5))):
        p = face_p - target_len // 2  # the face in the middle
        if random_crop:
            reach = max(length - face_p, face_p)
            p += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif aug_range[0] != aug_range[1] and face_size > side // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(p, length - target_len)))
    top, left = offsets
    return (nw, nh), (left, top)
