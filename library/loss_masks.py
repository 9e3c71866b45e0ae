"""Loss masks from mask images: sd-scripts' `conditioning_data_dir` subset key for `--masked_loss`.

Each training image has a mask image of the same file name (any image extension) and the same size in the subset's
`conditioning_data_dir`; its R channel weights the loss: white 1, black 0, grey in between (sd-scripts'
docs/masked_loss_README). Once read, a mask takes the path of an alpha mask (`alpha_mask = true`): resized and
cropped with its image, flipped with it, cached with its latents and turned into loss weights by the same code,
so the two kinds of mask cannot drift apart.
"""
from __future__ import annotations

import os

from PIL import Image

from library.config_util import IMAGE_EXTENSIONS, ConfigError
from library.image_io import describe_failure, load_image_rgb


def find_masks(mask_dir: str, image_paths: list[str], where: str) -> dict[str, str]:
    """{image path: mask path} for every image, matched by file name without extension. A missing folder, an image
    without a mask or with two candidates is a ConfigError naming the subset, the folder and the first such image."""
    if not os.path.isdir(mask_dir):
        problem = "not a folder" if os.path.exists(mask_dir) else "folder not found"
        raise ConfigError(f"{where}: conditioning_data_dir {mask_dir}: {problem}. It holds the loss masks of "
                          f"--masked_loss, one per image with the image's file name.")
    by_stem: dict[str, list[str]] = {}
    for f in sorted(os.listdir(mask_dir)):
        path = os.path.join(mask_dir, f)
        if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
            by_stem.setdefault(os.path.splitext(f)[0], []).append(path)
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


def load_mask(path: str, image_size: tuple[int, int], max_pixels: int, image: str) -> Image.Image:
    """The mask's R channel as an "L" image (EXIF orientation applied, as to its image). A mask of another size
    than its image (upright, (w, h)) or an unreadable one is a ConfigError naming both files."""
    try:
        rgb = load_image_rgb(path, max_pixels)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ...
        raise ConfigError(f"mask {path} (of image {image}): {describe_failure(path, e)}.") from None
    if rgb.size != tuple(image_size):
        raise ConfigError(f"mask {path} is {rgb.size[0]}x{rgb.size[1]} but its image {image} is "
                          f"{image_size[0]}x{image_size[1]}: a mask must have its image's size (sd-scripts requires "
                          f"it too). Resize the mask to the image.")
    return rgb.getchannel("R")
