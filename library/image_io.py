"""Image decoding: one function for the probe at build time and for every load in training (docs/reliability.md).

The pixel limit is checked from the header before anything is decoded, the EXIF orientation is applied, and every
mode (16-bit greyscale, CMYK, palette, alpha) becomes 8-bit RGB the same way at build time and in training, so an
image that passed the probe decodes the same later. Training images and loss-mask images both go through it.
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
from PIL import ExifTags, Image, ImageOps

from library.config_util import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, OTHER_IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


class ImageRefused(Exception):
    """An image that cannot be used; the message says why (without the path, which the caller adds)."""


_PIL_GUARD_LOCK = threading.Lock()
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _open_checked(path: str, max_pixels: int) -> Image.Image:
    """`Image.open` (reads the header only) with PIL's own decompression-bomb guard replaced by `max_pixels`, so
    that the limit is ours, configurable, and refused before anything is decoded."""
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageRefused(f"{w}x{h} = {w * h} pixels is above the limit of {max_pixels} pixels (a guard against "
                           f"decompression bombs). Shrink the image, or raise the limit with max_image_pixels = "
                           f"{w * h} in [general] of the dataset config if the image is genuine")
    return im


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are often stored sideways with an orientation tag)."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: use the pixels as stored
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def exif_orientation(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int | None:
    """The image's EXIF orientation tag (1-8), or None when it has none (or unreadable EXIF). From the header; a
    PNG without one there is decoded, as it may store its EXIF after the pixels."""
    with _open_checked(path, max_pixels) as im:
        try:
            found = im.getexif().get(ExifTags.Base.Orientation)
            if found is None and im.format == "PNG":
                im.load()
                found = im.getexif().get(ExifTags.Base.Orientation)
            return found
        except Exception:  # noqa: BLE001 - malformed EXIF: as _upright, the pixels as stored
            return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (PNG "I;16", "I") is scaled by 1/257 (PIL's convert would clip it to white);
    alpha is dropped like sd-scripts (the colour stored under transparent pixels is kept); CMYK, palette and
    greyscale images use PIL's conversion."""
    if im.mode == "F":  # no scale to read it by: values 0-1 trained as 0-1 of 255 (black) before
        raise ImageRefused("a 32-bit floating-point image (mode F), whose value range is not known. Save it as an "
                           "8- or 16-bit PNG")
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        return Image.fromarray(((arr + 128) // 257).astype(np.uint8), "L").convert("RGB")  # rounded x / 257
    return im if im.mode == "RGB" else im.convert("RGB")


def _has_transparency(im: Image.Image) -> bool:
    if "A" not in im.getbands() and "transparency" not in im.info:
        return False
    alpha = im.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


def describe_failure(path: str, e: Exception) -> str:
    """Why `path` could not be used, for a message that names the file (empty, not an image, over the limit...)."""
    if isinstance(e, ImageRefused):
        return str(e)
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    if isinstance(e, Image.UnidentifiedImageError):
        return (f"not an image PIL can read (its content does not match the {os.path.splitext(path)[1]} "
                f"extension, or the format is not supported). Re-save or remove it")
    return f"cannot be read ({type(e).__name__}: {e}). Re-save or remove it"


def load_image_rgb(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, probe: bool = False,
                   with_alpha: bool = False):
    """Decode an image fully: pixel limit, EXIF orientation applied, 8-bit RGB. Returns the PIL RGB image, or with
    `probe` (size (w, h) of the upright image, has transparency), or `with_alpha` (RGB image, its alpha channel as
    an "L" image: 255 everywhere for an image without one). Raises ImageRefused or PIL/OS errors."""
    with _open_checked(path, max_pixels) as im:
        im.load()
        up = _upright(im)
        if probe:
            transparent = _has_transparency(up)
            return _to_rgb(up).size, transparent
        rgb = _to_rgb(up)
        if rgb is im:
            rgb = im.copy()  # the file is closed on leaving the with block
        if with_alpha:
            has_alpha = "A" in up.getbands() or "transparency" in up.info
            return rgb, (up.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", rgb.size, 255))
        return rgb


PROBE_THREADS = 8  # PIL decodes with the GIL released: a 12-megapixel JPEG takes ~90 ms, 5000 of them 7 minutes


def probe_images(paths: list[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[tuple[tuple[int, int], bool] | None]:
    """Fully decode each image once, so unreadable and truncated files are found now, not mid-training; on up to
    PROBE_THREADS threads (a large dataset took minutes on one), results and warnings in the order of `paths`.
    -> per path ((width, height) upright, has transparency), or None (skipped, with a warning naming the file)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        try:
            return load_image_rgb(path, max_pixels, probe=True), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            return None, f"skipping image {path}: {describe_failure(path, e)}."

    workers = min(PROBE_THREADS, os.cpu_count() or 1, len(paths))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    for _, message in results:
        if message:
            logger.warning(message)
    return [r for r, _ in results]


def list_images(folder: str, warn: bool = True) -> list[str]:
    """The image files directly in `folder`, sorted, as sd-scripts' glob of the image extensions finds them: hidden
    files are passed over (the `._name.png` a Mac writes beside every image on exFAT, SMB or in a zip are not
    images; listed, they took validation slots and each got a warning). A link whose target is gone and files of
    other image formats (.avif, .gif, .tif ...), which are not trained, are named in a warning (with `warn`)."""
    images, broken, others = [], [], []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        ext = os.path.splitext(name)[1].lower()
        if name.startswith(".") or ext not in IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS:
            continue
        if os.path.islink(path) and not os.path.exists(path):
            broken.append(path)
        elif os.path.isfile(path):
            (others if ext in OTHER_IMAGE_EXTENSIONS else images).append(path)
    if broken and warn:
        logger.warning(f"{folder}: {len(broken)} image link(s) point to nothing (their target was moved or its drive "
                       f"is not mounted) and are left out, e.g. {sorted(broken)[0]} -> {os.readlink(sorted(broken)[0])}")
    if others and warn:
        kinds = ", ".join(sorted({os.path.splitext(p)[1].lower() for p in others}))
        logger.warning(f"{folder}: {len(others)} file(s) of other image formats ({kinds}) are left out, e.g. "
                       f"{os.path.basename(sorted(others)[0])}: only {', '.join(IMAGE_EXTENSIONS)} files are read (as in "
                       f"sd-scripts); convert them to PNG or JPEG to use them")
    return sorted(images)
