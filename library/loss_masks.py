"""Loss masks from mask images: sd-scripts' `conditioning_data_dir` subset key for `--masked_loss`.

Each training image has a mask image of the same file name (any image extension) and the same size in the subset's
`conditioning_data_dir`; its R channel weights the loss: white 1, black 0, grey in between (sd-scripts'
docs/masked_loss_README). Once read, a mask takes the path of an alpha mask (`alpha_mask = true`): resized and
cropped with its image, flipped with it, cached with its latents and turned into loss weights by the same code,
so the two kinds of mask cannot drift apart.
"""
from __future__ import annotations

import logging
import os

from PIL import Image

from library.config_util import ConfigError, not_found_hint
from library.image_io import describe_failure, exif_orientation, list_images, load_image_rgb

logger = logging.getLogger(__name__)


def find_masks(mask_dir: str, image_paths: list[str], where: str) -> dict[str, str]:
    """{image path: mask path} for every image, matched by file name without extension. A missing folder, an image
    without a mask or with two candidates is a ConfigError naming the subset, the folder and the first such image."""
    if not os.path.isdir(mask_dir):
        problem = "not a folder" if os.path.exists(mask_dir) else "folder not found"
        raise ConfigError(f"{where}: conditioning_data_dir {mask_dir}: {problem}. It holds the loss masks of "
                          f"--masked_loss, one per image with the image's file name.{not_found_hint(mask_dir)}")
    by_stem: dict[str, list[str]] = {}
    for path in list_images(mask_dir):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    masks, missing = {}, []
    for image in image_paths:
        stem = os.path.splitext(os.path.basename(image))[0]
        found = by_stem.get(stem, [])
        if len(found) > 1:
            raise ConfigError(f"{where}: image {image} has {len(found)} masks in conditioning_data_dir "
                              f"({', '.join(os.path.basename(p) for p in found)}); keep one.")
        if found:
            masks[image] = found[0]
        else:
            missing.append(image)
    if missing:
        stem = os.path.splitext(os.path.basename(missing[0]))[0]
        raise ConfigError(f"{where}: {len(missing)} of {len(image_paths)} images have no mask in conditioning_data_dir "
                          f"{mask_dir} (e.g. {missing[0]}: no {stem}.png, .jpg, .webp ... there). Every image needs "
                          f"a mask of its size with its file name: white where the loss counts, black where not.")
    return masks


# PIL's ImageOps.exif_transpose: the turn that makes an image of this EXIF orientation upright
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def mask_turns(masks: dict[str, str], sizes: dict[str, tuple[int, int]], max_pixels: int, where: str) -> dict[str, int]:
    """{image: its EXIF orientation} for the masks to turn upright with their photo. A photo is trained upright
    (its EXIF orientation applied); a mask image without an orientation tag of its own, of the photo's stored size,
    was drawn on the pixels as stored (sd-scripts reads both as stored; so do tools that ignore EXIF) and is turned
    with the photo. Where the sizes do not tell (a square photo, or one flipped or upside down), that is assumed,
    with a warning; a mask of the upright size is taken as drawn upright."""
    turns, unsure = {}, []
    for image, mask in masks.items():
        try:
            photo = exif_orientation(image, max_pixels)
            if photo not in _UPRIGHT or exif_orientation(mask, max_pixels) is not None:
                continue
            with Image.open(mask) as im:
                mask_size = im.size
        except Exception:  # noqa: BLE001 - an unreadable mask is load_mask's error, which names it
            continue
        upright = tuple(sizes[image])
        stored = upright[::-1] if photo in (5, 6, 7, 8) else upright
        if mask_size == stored:
            turns[image] = photo
            if stored == upright:
                unsure.append(image)
    if turns:
        logger.info(f"{where}: {len(turns)} mask(s) turned upright with their photo (EXIF orientation), e.g. "
                    f"{masks[next(iter(turns))]}")
    if unsure:
        logger.warning(f"{where}: {len(unsure)} photo(s) carry an EXIF orientation (they train upright) whose masks "
                       f"have none and the same size either way, e.g. {unsure[0]}: each mask is taken as drawn on the "
                       f"photo as stored, as sd-scripts reads both, and turned with it. If a mask was drawn on the "
                       f"upright photo, save the photo with its pixels upright (e.g. PIL's ImageOps.exif_transpose) "
                       f"or give the mask an EXIF orientation of 1 (exiftool -Orientation=1 -n MASK).")
    return turns


def load_mask(path: str, image_size: tuple[int, int], max_pixels: int, image: str, turn: int | None = None,
              transparent: list[str] | None = None) -> Image.Image:
    """The mask's R channel as an "L" image (its own EXIF orientation applied; with `turn`, its photo's: see
    `mask_turns`). A mask of another size than its image (upright, (w, h)) or an unreadable one is a ConfigError
    naming both files. `transparent`: a list to which the path is added when the mask has transparent pixels (its
    alpha is not read, as in sd-scripts: a mask drawn as alpha over white reads all white)."""
    try:
        rgb = load_image_rgb(path, max_pixels, with_alpha=transparent is not None)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ...
        raise ConfigError(f"mask {path} (of image {image}): {describe_failure(path, e)}.") from None
    if transparent is not None:
        rgb, alpha = rgb
        if alpha.getextrema()[0] < 255:
            transparent.append(path)
    if turn is not None:
        rgb = rgb.transpose(_UPRIGHT[turn])
    if rgb.size != tuple(image_size):
        swapped = rgb.size == tuple(image_size)[::-1]
        raise ConfigError(f"mask {path} is {rgb.size[0]}x{rgb.size[1]} but its image {image} is "
                          f"{image_size[0]}x{image_size[1]}: a mask must have its image's size (sd-scripts requires "
                          f"it too). " + ("The image is turned by its EXIF orientation and the mask is not: turn the "
                                          "mask the same way, or save the mask with the image's orientation tag."
                                          if swapped else "Resize the mask to the image."))
    return rgb.getchannel("R")
