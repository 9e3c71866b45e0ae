"""Training images: discovery, captions, regularisation images, aspect buckets, batches and latent caching.

`build_dataset_group(generate_blueprint(...), is_sdxl=..., seed=...)` gives a torch `Dataset` whose items are whole
batches (batches are formed inside one bucket, like sd-scripts). Use it with
`DataLoader(group, batch_size=1, collate_fn=collate_batch, shuffle=True)`. Batch dict: docs/architecture.md.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from PIL import Image
from tqdm import tqdm

from library.buckets import BucketManager, face_crop, face_from_filename, get_crop_ltrb, resize_and_crop
from library.captions import DeferredCaption, finish_captions, process_caption, read_caption_file, tag_frequency
from library.image_aug import color_aug
from library.image_io import describe_failure, list_images, load_image_rgb, probe_images
from library.loss_masks import find_masks, load_mask, mask_turns
from library.safe_io import atomic_save_safetensors
from library.text_io import read_text
from library.config_util import (DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, ConfigError, DatasetBlueprint,
                                 SubsetBlueprint, check_bucket_reso_steps, not_found_hint)

logger = logging.getLogger(__name__)

LATENT_STRIDE = 8  # VAE downsampling of SD1.x / SD2.x / SDXL


@dataclass
class ImageInfo:
    key: str  # the image path (DreamBooth) or the metadata key (fine-tuning); `image_keys` in batches
    path: str
    subset: SubsetBlueprint
    caption: str  # raw caption (before per-sample processing)
    is_reg: bool
    num_repeats: int
    size: tuple[int, int]  # original (width, height)
    bucket_reso: tuple[int, int] | None = None
    resized_size: tuple[int, int] | None = None
    latents: torch.Tensor | None = None  # (C, h, w), not scaled
    latents_flipped: torch.Tensor | None = None
    latents_cache: str | None = None  # disk cache (loaded per sample)
    cached_original_size: tuple[int, int] | None = None
    cached_crop_ltrb: tuple[float, float, float, float] | None = None
    alpha_mask: torch.Tensor | None = None  # (H, W) uint8 of the bucket, cached with the latents (alpha or file mask)
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    mask_path: str | None = None  # its loss mask in the subset's conditioning_data_dir (library/loss_masks.py)
    mask_turn: int | None = None  # the photo's EXIF orientation, applied to a mask drawn on its stored pixels
    face: tuple[int, int, int, int] | None = None  # face_crop_aug_range: (cx, cy, w, h) from the file name

    @property
    def masked(self) -> bool:
        """Whether a loss mask comes with it: its alpha channel (alpha_mask) or a mask image."""
        return self.subset.alpha_mask or self.mask_path is not None


def _dir_error(subset: SubsetBlueprint, image_dir: str, problem: str, fix: str) -> ConfigError:
    key = f"`{subset.key_path}.image_dir`" if subset.key_path else subset.where
    where = f" ({subset.where})" if subset.key_path else ""
    return ConfigError(f"{key}{where}: {problem}: {image_dir}. {fix}")


def _other_caption_ext(missing: list[str], caption_extension: str) -> str | None:
    """The extension of text files beside the first image without a caption that share its stem (a `.txt` caption
    read as `.caption`, the default), if any."""
    stem = os.path.splitext(os.path.basename(missing[0]))[0]
    names = (os.path.splitext(f) for f in os.listdir(os.path.dirname(missing[0])))
    others = sorted(ext for base, ext in names if base == stem and ext in _CAPTION_LIKE and ext != caption_extension)
    return others[0] if others else None


def _note_opaque_alpha_mask(subset: SubsetBlueprint, transparent: list[bool]) -> None:
    """`alpha_mask = true` on images without transparent pixels masks nothing (every pixel weighs 1, as in
    sd-scripts): say so, the user asked for a mask."""
    if subset.alpha_mask and transparent and not any(transparent):
        logger.warning(f"{subset.where}: alpha_mask = true, but none of its {len(transparent)} images has transparent "
                       f"pixels, so nothing is masked: every pixel counts in the loss. Save the images with an alpha "
                       f"channel (PNG or WebP, transparent where the loss should not count), or give the masks as "
                       f"images in conditioning_data_dir.")


_CAPTION_LIKE = (".txt", ".caption", ".tags", ".text", ".cap")


def _note_missing_captions(subset: SubsetBlueprint, missing: list[str], total: int) -> None:
    """sd-scripts' line for images without a caption file (they train with the class tokens): a warning with the
    fix when captions sit there under another extension (forgetting `--caption_extension .txt` trains every image
    on its class tokens alone), else an info line (class tokens alone is DreamBooth's usual way)."""
    other = _other_caption_ext(missing, subset.caption_extension)
    hint = (f" The folder has {other} files beside them: pass --caption_extension {other} (or caption_extension = "
            f"\"{other}\" in the dataset config) to read those." if other else "")
    (logger.warning if other else logger.info)(
        f"{subset.where}: {len(missing)} of {total} images have no caption file ({subset.caption_extension}), "
        f"e.g. {missing[0]}; they train with the class tokens {subset.class_tokens!r}.{hint}")


class _Dataset:
    """One [[datasets]] entry: its images, buckets and per-epoch batch order."""

    def __init__(self, bp: DatasetBlueprint, index: int, debug: bool, split: str | None = None, seed: int = 0):
        self.bp = bp
        self.index = index
        self.split = split  # None, "train" or "validation" (`build_dataset_group`)
        self.reports = split != "validation"  # the train side warns; the held-out side would say it all again
        self.split_seed = bp.validation_seed if bp.validation_seed is not None else seed
        self.images: dict[str, ImageInfo] = {}
        self.subset_counts: list[tuple[SubsetBlueprint, int]] = []  # (subset, images found)
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.num_train_images = 0
        self.num_reg_images = 0
        self.transparent: list[str] = []  # transparent images outside alpha_mask subsets (alpha dropped; said once)
        self.too_small = 0  # images left out by skip_image_resolution
        if bp.is_dreambooth:
            self._load_dreambooth()
        else:
            self._load_finetuning()
        if not self.images and self.reports:
            raise ConfigError(f"{bp.where}: no usable training image (see the warnings above).{self._skip_hint()}")
        if self.transparent:
            more = f" and {len(self.transparent) - 1} more images have" if len(self.transparent) > 1 else " has"
            logger.warning(f"{bp.where}: {self.transparent[0]}{more} transparent pixels. The alpha channel is "
                           f"dropped (like sd-scripts), so the colour stored under transparent pixels is trained "
                           f"(often black). Flatten them onto the background you want if that matters, or set "
                           f"alpha_mask = true in the subset to leave transparent pixels out of the loss.")
        self._make_buckets(debug)
        self.batches: list[tuple[int, int]] = []
        self.epoch_buckets: list[list[str]] = []

    # -- loading ---------------------------------------------------------------------------------------------------
    def _images_of(self, subset: SubsetBlueprint) -> list[tuple[str, tuple[int, int]]]:
        """(path, size) of the readable images of this side of the subset's split. The split is taken over the
        folder's files before any is opened, so the train and validation groups each open (and warn about) only
        their own images; with skip_image_resolution every file is opened first, so that the small ones leave
        before the split (as in sd-scripts) and the split's fraction is of the images kept."""
        image_dir = subset.image_dir
        if not os.path.isdir(image_dir):
            problem = "not a folder" if os.path.exists(image_dir) else "folder not found"
            raise _dir_error(subset, image_dir, problem, "Check the path (relative paths are relative to the "
                             f"current directory, {os.getcwd()})." + not_found_hint(image_dir))
        paths = list_images(image_dir, warn=self.reports)
        if not paths:
            raise _dir_error(subset, image_dir, "no images (png, jpg, jpeg, webp, bmp) directly in this folder",
                             "Put the images in it (subfolders are not searched), or remove this subset.")
        side = f" for {self.split}" if self.split and self.bp.validation_split > 0 and not subset.is_reg else ""
        take = (lambda items: items) if subset.is_reg else self._take
        if self.bp.skip_image_resolution is None:  # only this side's files are opened
            chosen = take(paths)
            probed = [(p, pr) for p, pr in zip(chosen, probe_images(chosen, self.bp.max_image_pixels)) if pr is not None]
            opened, kept = len(chosen), probed
        else:  # small images leave before the split, as in sd-scripts, so the split's fraction holds
            probed = [(p, pr) for p, pr in zip(paths, probe_images(paths, self.bp.max_image_pixels)) if pr is not None]
            opened, kept = len(paths), [(p, pr) for p, pr in probed if not self._too_small(pr[0])]
            self._note_skipped(subset, len(probed) - len(kept), len(probed))
            kept = take(kept)
        if opened and not probed:
            side = side if self.bp.skip_image_resolution is None else ""
            raise _dir_error(subset, image_dir, f"none of its {opened} images{side} can be read",
                             "See the warnings above; re-save the images.")
        for p, (_, transparent) in kept:
            if transparent and not (subset.alpha_mask or subset.conditioning_data_dir):
                self.transparent.append(p)
        if self.reports:  # (the held-out share alone may be all opaque)
            _note_opaque_alpha_mask(subset, [t for _, (_, t) in kept])
        return [(p, size) for p, (size, _) in kept]

    def _too_small(self, size: tuple[int, int]) -> bool:
        """skip_image_resolution (sd-scripts): an image whose original area is at most the key's is left out, so
        that datasets of several resolutions can share a folder and the high-resolution ones skip its small
        sources."""
        skip = self.bp.skip_image_resolution
        if skip is None or size[0] * size[1] > skip[0] * skip[1]:
            return False
        self.too_small += 1
        return True

    def _skipped_text(self, how_many: str) -> str:
        w, h = self.bp.skip_image_resolution
        return f"{how_many} left out by skip_image_resolution {w}x{h} (an original area of at most {w * h} pixels)"

    def _note_skipped(self, subset: SubsetBlueprint, n: int, total: int) -> None:
        if n:
            logger.info(f"{subset.where}: {self._skipped_text(f'{n} of its {total} images')}")

    def _skip_hint(self) -> str:
        return f" {self._skipped_text(f'{self.too_small} images were')}: lower it or remove it." if self.too_small else ""

    def _load_dreambooth(self) -> None:
        reg: list[ImageInfo] = []
        for subset in self.bp.subsets:
            if subset.is_reg and self.split == "validation":
                continue  # reg images only regularise training
            found = self._images_of(subset)
            if not found:
                continue  # nothing of this subset on this side of the split
            captions, caption_errors = [], []
            for p, _ in found:
                try:
                    captions.append(read_caption_file(p, subset.caption_extension, subset.enable_wildcard))
                except ConfigError as e:
                    caption_errors.append(str(e))
            if caption_errors:
                more = (f"\n({len(caption_errors) - 1} more caption files of {subset.where} have a problem too, "
                        f"e.g. {caption_errors[1]})" if len(caption_errors) > 1 else "")
                raise ConfigError(f"{caption_errors[0]}{more}")
            missing = [p for (p, _), c in zip(found, captions) if c is None]
            if missing and not subset.class_tokens:
                more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
                raise ConfigError(
                    f"image {missing[0]}{more} has no caption file ({os.path.splitext(os.path.basename(missing[0]))[0]}"
                    f"{subset.caption_extension}) and {subset.where} has no class_tokens. Set class_tokens (e.g. "
                    f"class_tokens = \"sks dog\") for the subset, or write a caption file for every image (check "
                    f"caption_extension, now {subset.caption_extension!r}).")
            if missing and self.reports:
                _note_missing_captions(subset, missing, len(found))
            captions = [subset.class_tokens if c is None else c for c in captions]
            masks, turns = {}, {}
            if subset.conditioning_data_dir:
                masks = find_masks(subset.conditioning_data_dir, [p for p, _ in found], subset.where)
                turns = mask_turns(masks, dict(found), self.bp.max_image_pixels, subset.where)
                transparent = []
                for path, size in found:  # read each once now: a bad mask fails here, not mid-training
                    load_mask(masks[path], size, self.bp.max_image_pixels, path, turns.get(path), transparent)
                if transparent:
                    logger.warning(f"{subset.where}: {len(transparent)} mask image(s) have transparent pixels, e.g. "
                                   f"{transparent[0]}; only a mask's R channel weights the loss (as in sd-scripts), "
                                   f"not its alpha. Save masks as greyscale (white counts, black not), or put the "
                                   f"mask in the image's alpha channel and set alpha_mask = true.")
            for (path, size), caption in zip(found, captions):
                info = ImageInfo(path, path, subset, caption, subset.is_reg, self._repeats(subset), size,
                                 max_pixels=self.bp.max_image_pixels, mask_path=masks.get(path),
                                 mask_turn=turns.get(path))
                if subset.is_reg:
                    reg.append(info)  # registered below, with repeats matched to the train images
                else:
                    self.images[path] = info
            dir_name = os.path.basename(os.path.normpath(subset.image_dir))
            tag_frequency(captions, self.tag_frequency.setdefault(dir_name, {}))
            if subset.is_reg:
                self.num_reg_images += subset.num_repeats * len(found)
            else:
                self.num_train_images += self._repeats(subset) * len(found)
            self.subset_counts.append((subset, len(found)))
        self._register_reg_images(reg)

    def _take(self, items: list) -> list:
        """This side of the subset's split (sd-scripts' `split_train_val`): the items (sorted paths, as sd-scripts
        lists them) shuffled as `random.seed(seed); random.shuffle(...)` does, so a `validation_seed` holds out the
        images sd-scripts holds out; the first ceil((1 - validation_split) · n) for training, the rest for
        validation (disjoint, unlike sd-scripts' rounding, which can give an image to both). All of them without a
        split."""
        fraction = self.bp.validation_split
        if self.split is None or fraction <= 0:
            return [] if self.split == "validation" else list(items)
        items = list(items)
        random.Random(self.split_seed).shuffle(items)
        cut = math.ceil(len(items) * (1 - fraction))
        return items[:cut] if self.split == "train" else items[cut:]

    def _repeats(self, subset: SubsetBlueprint) -> int:
        """num_repeats balances subsets in training; a held-out image is validated once."""
        return 1 if self.split == "validation" else subset.num_repeats

    def _register_reg_images(self, reg: list[ImageInfo]) -> None:
        """sd-scripts: reg images are repeated (round-robin, +1 repeat each) or cut off so that their count with
        repeats matches the train images with repeats."""
        if not reg:
            return
        if self.num_train_images == 0:
            raise ConfigError(f"{self.bp.where}: only regularisation subsets (is_reg = true); add a training subset."
                              f"{self._skip_hint()}")
        if self.num_train_images < self.num_reg_images:
            logger.warning(f"{self.bp.where}: more regularisation images ({self.num_reg_images} with repeats) than "
                           f"training images ({self.num_train_images}); some reg images are not used.")
        n, first = 0, True
        while n < self.num_train_images:
            for info in reg:
                if first:
                    self.images[info.key] = info
                    n += info.num_repeats
                else:
                    info.num_repeats += 1
                    n += 1
                if n >= self.num_train_images:
                    break
            first = False

    def _load_finetuning(self) -> None:
        for subset in self.bp.subsets:
            md_path = subset.metadata_file
            key = f"`{subset.key_path}.metadata_file` ({subset.where})" if subset.key_path else subset.where
            if not os.path.isfile(md_path):
                raise ConfigError(f"{key}: metadata file not found: {md_path}.{not_found_hint(md_path)}")
            try:
                metadata = json.loads(read_text(md_path, "metadata file", ConfigError))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{md_path}:{e.lineno}:{e.colno}: JSON syntax error in the metadata file ({key}): "
                                  f"{e.msg}.") from None
            if not isinstance(metadata, dict) or not metadata:
                raise ConfigError(f"{md_path}: the metadata file must be a non-empty JSON object "
                                  f'{{"image key": {{"caption": "...", "tags": "..."}}, ...}} ({key}).')
            tags_list, count, transparent = [], 0, []
            items = list(metadata.items())
            paths, probes = {k: self._find_ft_image(subset, k) for k, _ in items}, {}
            if self.bp.skip_image_resolution is not None:  # small images leave before the split, as in DreamBooth
                found = [p for p in paths.values() if p is not None]
                probes = dict(zip(found, probe_images(found, self.bp.max_image_pixels)))  # each image decoded once
                kept = [(k, m) for k, m in items
                        if probes.get(paths[k]) is None or not self._too_small(probes[paths[k]][0])]
                self._note_skipped(subset, len(items) - len(kept), len(items))
                items = kept
            items = self._take(items)
            if not items:
                continue  # nothing of this subset on this side of the split
            found = [paths[k] for k, _ in items if paths[k] is not None and paths[k] not in probes]
            probes.update(zip(found, probe_images(found, self.bp.max_image_pixels)))
            for image_key, md in items:
                path = paths[image_key]
                if path is None:
                    logger.warning(f"skipping {image_key!r} of {md_path}: image not found (looked for it as given "
                                   f"and in image_dir {subset.image_dir!r}).")
                    continue
                probed = probes[path]
                if probed is None:
                    continue
                size = probed[0]
                transparent.append(probed[1])
                if probed[1] and not subset.alpha_mask:
                    self.transparent.append(path)
                md = md if isinstance(md, dict) else {}
                caption, tags = md.get("caption"), md.get("tags")
                for name, value in (("caption", caption), ("tags", tags)):
                    if value is not None and not isinstance(value, str):
                        raise ConfigError(f"{md_path}: entry {image_key!r}: \"{name}\" must be a string, got "
                                          f"{type(value).__name__} ({value!r}).")
                if caption is not None and not caption.strip():
                    caption = None
                if tags is not None and not tags.strip():
                    tags = None
                if caption is None:
                    caption, tags = tags, None
                if caption is None:
                    raise ConfigError(f"{md_path}: entry {image_key!r} has neither \"caption\" nor \"tags\" (or "
                                      f"both are empty). Add one, or remove the entry.")
                sep = subset.caption_separator
                if subset.enable_wildcard:
                    if tags:
                        tags = tags.replace("\n", sep)
                        caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip())
                elif tags:
                    caption = f"{caption}{sep}{tags}"
                    tags_list.append(tags)
                self.images[image_key] = ImageInfo(image_key, path, subset, caption, False, self._repeats(subset),
                                                   size, max_pixels=self.bp.max_image_pixels)
                count += 1
            if count == 0:
                raise ConfigError(f"{key}: none of the {len(metadata)} images listed in {md_path} could be used "
                                  f"(see the warnings above). Check image_dir.")
            if self.reports:
                _note_opaque_alpha_mask(subset, transparent)
            self.num_train_images += count * self._repeats(subset)
            tag_frequency(tags_list, self.tag_frequency.setdefault(os.path.basename(md_path), {}))
            self.subset_counts.append((subset, count))

    @staticmethod
    def _find_ft_image(subset: SubsetBlueprint, image_key: str) -> str | None:
        """The key as a path, else `<image_dir>/<key>`, else the first in sorted order of `<image_dir>/<key><ext>`
        over the image extensions in both cases (sd-scripts' `glob_images`: with a.jpg and a.png, a.jpg)."""
        candidates = [image_key]
        if subset.image_dir:
            base = os.path.join(subset.image_dir, image_key)
            candidates += [base] + sorted(base + e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper()))
        return next((c for c in candidates if os.path.isfile(c)), None)

    # -- buckets ---------------------------------------------------------------------------------------------------
    def _make_buckets(self, debug: bool) -> None:
        bp = self.bp
        if bp.enable_bucket:
            if bp.bucket_no_upscale:
                logger.info(f"{bp.where}: bucket_no_upscale: buckets follow the image sizes; min_bucket_reso and "
                            f"max_bucket_reso are not used.")
            manager = BucketManager(bp.resolution, min_size=bp.min_bucket_reso, max_size=bp.max_bucket_reso,
                                    reso_steps=bp.bucket_reso_steps, no_upscale=bp.bucket_no_upscale)
        else:
            manager = BucketManager(bp.resolution, predefined=[bp.resolution])
        if bp.bucket_no_upscale and not bp.enable_bucket:
            logger.warning(f"{bp.where}: bucket_no_upscale has no effect without enable_bucket; every image is "
                           f"resized to cover the resolution {bp.resolution[0]}x{bp.resolution[1]}.")
        ar_errors, upscaled = [], []
        self._find_faces()
        for info in self.images.values():
            info.bucket_reso, info.resized_size, err = manager.select_bucket(*info.size)
            if min(info.bucket_reso) < 1:
                raise ConfigError(f"image {info.path} ({info.size[0]}x{info.size[1]}) gets an empty bucket "
                                  f"({info.bucket_reso[0]}x{info.bucket_reso[1]}) with bucket_no_upscale ({bp.where}): "
                                  f"the bucket is the image's size, shrunk to the resolution's area when larger, "
                                  f"rounded down to bucket_reso_steps ({bp.bucket_reso_steps}), and its short side "
                                  f"is below that. Crop or remove it, or turn bucket_no_upscale off.")
            rw, rh = info.resized_size
            if rw * rh > max(bp.max_image_pixels, info.bucket_reso[0] * info.bucket_reso[1]):
                raise ConfigError(f"image {info.path} ({info.size[0]}x{info.size[1]}) would be resized to {rw}x{rh} "
                                  f"to cover its bucket {info.bucket_reso[0]}x{info.bucket_reso[1]}, above the limit "
                                  f"of {bp.max_image_pixels} pixels (max_image_pixels): its aspect ratio is too "
                                  f"extreme{'' if bp.enable_bucket else ' without enable_bucket'}. Crop it, or "
                                  f"remove it ({bp.where}).")
            if rw > info.size[0] or rh > info.size[1]:
                upscaled.append(info)
            ar_errors.append(abs(err))
            if debug:
                logger.info(f"{info.path}: {info.size} -> resize {info.resized_size} -> bucket {info.bucket_reso}, "
                            f"caption {info.caption!r}")
        if upscaled:  # said once per dataset
            ex = upscaled[0]
            hint = ("; bucket_no_upscale = true trains them at their own size instead" if bp.enable_bucket else
                    "; enable_bucket with bucket_no_upscale = true trains them at their own size instead")
            logger.info(f"{bp.where}: {len(upscaled)} of {len(self.images)} images are smaller than their bucket and "
                        f"are upscaled, e.g. {ex.path} ({ex.size[0]}x{ex.size[1]} -> {ex.resized_size[0]}x"
                        f"{ex.resized_size[1]}, bucket {ex.bucket_reso[0]}x{ex.bucket_reso[1]})"
                        f"{hint}.")
        self.resos = sorted({info.bucket_reso for info in self.images.values()})
        reso_index = {r: i for i, r in enumerate(self.resos)}
        self.buckets: list[list[str]] = [[] for _ in self.resos]
        for info in self.images.values():
            self.buckets[reso_index[info.bucket_reso]].extend([info.key] * info.num_repeats)
        self.bucket_info = None
        if bp.enable_bucket:
            self.bucket_info = {"buckets": {i: {"resolution": list(r), "count": len(b)}
                                            for i, (r, b) in enumerate(zip(self.resos, self.buckets))},
                                "mean_img_ar_error": float(np.mean(ar_errors))}
        for i, (r, b) in enumerate(zip(self.resos, self.buckets)):
            logger.info(f"{bp.where}: bucket {i}: resolution {r}, {len(b)} images with repeats")
        self.num_batches = sum(math.ceil(len(b) / bp.batch_size) for b in self.buckets)

    def _find_faces(self) -> None:
        """face_crop_aug_range: each image's face box from its file name (sd-scripts' tools/detect_face_rotate.py
        names). As in sd-scripts it applies without enable_bucket only; an image without a box is resized and
        cropped as any other."""
        infos = [i for i in self.images.values() if i.subset.face_crop_aug_range is not None]
        if not infos:
            return
        if self.bp.enable_bucket:
            logger.warning(f"{self.bp.where}: face_crop_aug_range has no effect with enable_bucket (as in sd-scripts): "
                           f"turn enable_bucket off to crop around the faces.")
            return
        for info in infos:
            info.face = face_from_filename(info.path)
        for sub in {id(i.subset): i.subset for i in infos}.values():
            mine = [i for i in infos if i.subset is sub]
            without = [i for i in mine if i.face is None]
            if without:
                logger.warning(f"{sub.where}: face_crop_aug_range: {len(without)} of {len(mine)} images have no "
                               f"face box in their file name (<name>_<cx>_<cy>_<w>_<h>, e.g. from sd-scripts' "
                               f"tools/detect_face_rotate.py), e.g. {without[0].path}: they are resized and cropped "
                               f"as usual.")

    def arrange(self, seed: int, epoch: int) -> None:
        """The batch order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same batches."""
        rng = random.Random(f"apt-lora/{seed}/{epoch}/{self.index}")
        self.epoch_buckets = [rng.sample(b, len(b)) for b in self.buckets]
        bs = self.bp.batch_size
        self.batches = [(b, start) for b, keys in enumerate(self.epoch_buckets) for start in range(0, len(keys), bs)]
        rng.shuffle(self.batches)

    def batch_keys(self, i: int) -> list[str]:
        b, start = self.batches[i]
        return self.epoch_buckets[b][start:start + self.bp.batch_size]


def check_latents_cacheable(blueprints) -> None:
    """A ConfigError naming the subset and key when a subset changes its image every step (random_crop, color_aug,
    face_crop_aug_range without buckets): a cached latent cannot follow. Called before the model loads."""
    for bp in blueprints:
        for sub in bp.subsets:
            for name in ("random_crop", "color_aug", "face_crop_aug_range"):
                if name == "face_crop_aug_range" and bp.enable_bucket:
                    continue  # ignored under buckets (a warning says so), as in sd-scripts
                if getattr(sub, name):
                    theirs = ("sd-scripts' cache ignores the key" if name == "face_crop_aug_range" else
                              "sd-scripts refuses it too")
                    raise ConfigError(f"{sub.where}: {name} changes the image every step, so latents cannot be "
                                      f"cached ({theirs}). Turn {name} off or drop "
                                      f"--cache_latents/--cache_latents_to_disk.")


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a config. Item i is a whole batch (batch dict of docs/architecture.md)."""

    def __init__(self, datasets: list[_Dataset], *, is_sdxl: bool, seed: int, prior_loss_weight: float = 1.0):
        self.datasets = datasets
        self.is_sdxl = is_sdxl
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.latent_scale: float | None = None
        self._offsets = np.cumsum([0] + [d.num_batches for d in datasets])
        # the epoch lives in shared memory so that DataLoader workers (persistent ones too) follow set_current_epoch
        self._epoch = torch.ones((), dtype=torch.long).share_memory_()
        self._arranged_epoch = None
        self._arrange()

    def _arrange(self) -> None:
        epoch = self.current_epoch
        if epoch != self._arranged_epoch:
            for d in self.datasets:
                d.arrange(self.seed, epoch)
            self._arranged_epoch = epoch

    # -- basic API -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def has_token_warmup(self) -> bool:
        """Whether some subset has token_warmup_step: its captions come as `DeferredCaption`s, which the trainer
        finishes at each batch's optimizer step (`captions_at_steps`)."""
        return any(s.token_warmup_step > 0 for d in self.datasets for s in d.bp.subsets)

    @property
    def current_epoch(self) -> int:
        return int(self._epoch.item())

    def set_current_epoch(self, epoch: int) -> None:
        """Epochs count from 1, like sd-scripts (the first epoch is 1). Re-shuffles the buckets for that epoch and
        drives caption_dropout_every_n_epochs. Call it before iterating the epoch's DataLoader; workers (persistent
        ones too) see it through shared memory."""
        self._epoch.fill_(int(epoch))
        self._arrange()

    def _locate(self, index: int) -> tuple[_Dataset, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        d = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.datasets[d], index - int(self._offsets[d])

    # -- items -----------------------------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        self._arrange()  # in a DataLoader worker, the epoch may have moved on
        ds, local = self._locate(index)
        epoch = self._arranged_epoch
        rng = random.Random(f"apt-lora/{self.seed}/{epoch}/{ds.index}/{local}/item")
        images, latents, captions, classes, priors, is_reg, weights = [], [], [], [], [], [], []
        original_hw, crop_tl, target_hw, keys, alphas = [], [], [], [], []
        for key in ds.batch_keys(local):
            info = ds.images[key]
            sub = info.subset
            flipped = sub.flip_aug and rng.random() < 0.5
            if info.latents is not None or info.latents_cache is not None:
                lat, original_size, crop_ltrb, alpha = self._cached(info, flipped)
                latents.append(lat)
                target = (lat.shape[2] * LATENT_STRIDE, lat.shape[1] * LATENT_STRIDE)
            else:
                img, original_size, crop_ltrb, alpha = self._load_image(info, rng)
                if flipped:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    alpha = None if alpha is None else alpha.flip(-1)
                images.append(_to_tensor(img))
                target = img.size
            alphas.append(alpha)
            left = target[0] - crop_ltrb[2] if flipped else crop_ltrb[0]
            original_hw.append((int(original_size[1]), int(original_size[0])))
            crop_tl.append((int(crop_ltrb[1]), int(left)))
            target_hw.append((int(target[1]), int(target[0])))
            if sub.token_warmup_step > 0:  # its length depends on the step: finished in the main process
                seed = f"apt-lora/{self.seed}/{epoch}/{ds.index}/{local}/caption/{len(captions)}"
                captions.append(DeferredCaption(sub, info.caption, epoch, seed))
            else:
                captions.append(process_caption(sub, info.caption, rng=rng, epoch=epoch))
            classes.append(sub.class_tokens)
            # a reg image's caption is already the class prompt (no identifier): c = c* unless told otherwise
            priors.append(sub.class_tokens if info.is_reg and sub.prior_class_tokens is None else sub.prior_class_tokens)
            is_reg.append(info.is_reg)
            weights.append(self.prior_loss_weight if info.is_reg else 1.0)
            keys.append(key)
        if images and latents:
            raise RuntimeError("internal error: a batch mixes cached latents and images")
        return {
            "images": torch.stack(images) if images else None,
            "latents": torch.stack(latents) * self.latent_scale if latents else None,
            "captions": captions,
            "class_tokens": classes,
            "prior_class_tokens": priors,
            "is_reg": torch.tensor(is_reg, dtype=torch.bool),
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "original_sizes_hw": torch.tensor(original_hw, dtype=torch.long),
            "crop_top_lefts": torch.tensor(crop_tl, dtype=torch.long),
            "target_sizes_hw": torch.tensor(target_hw, dtype=torch.long),
            "image_keys": keys,
            "alpha_masks": _loss_masks(alphas, target_hw),
            "network_multiplier": float(ds.bp.network_multiplier),  # the dataset key: one value per batch
        }

    def _load_image(self, info: ImageInfo, rng: random.Random | None):
        """Resized and cropped to the bucket -> (PIL image, original size (w, h), sd-scripts crop_ltrb, loss mask):
        with the subset's `alpha_mask` the alpha channel, with a mask image its R channel, resized and cropped as
        the image, (H, W) uint8; else None."""
        try:
            img = load_image_rgb(info.path, info.max_pixels, with_alpha=info.subset.alpha_mask)
        except Exception as e:  # noqa: BLE001 - it was readable when the dataset was built
            raise ConfigError(f"image {info.path} cannot be read any more ({describe_failure(info.path, e)}); it was "
                              f"readable when the dataset was built. Do not change the dataset while training.") from None
        img, alpha = img if info.subset.alpha_mask else (img, None)
        if info.mask_path is not None:
            alpha = load_mask(info.mask_path, info.size, info.max_pixels, info.path, info.mask_turn)
        if img.size != info.size:
            raise ConfigError(f"image {info.path} changed size during training ({info.size} -> {img.size}). "
                              f"Do not edit the images while training.")
        interpolation = info.subset.resize_interpolation
        resized, offset = info.resized_size, None
        original, crop_ltrb = info.size, get_crop_ltrb(info.bucket_reso, info.size)
        if info.face is not None:  # sd-scripts: the crop is the whole picture the UNet is told about
            resized, offset = face_crop(info.size, info.face, info.bucket_reso, info.subset.face_crop_aug_range,
                                        info.subset.random_crop, rng)
            original, crop_ltrb = info.bucket_reso, (0, 0, *info.bucket_reso)
        img, offset = resize_and_crop(img, info.bucket_reso, resized, random_crop=info.subset.random_crop,
                                      rng=rng, interpolation=interpolation, offset=offset)
        if info.subset.color_aug and rng is not None:
            img = color_aug(img, rng)
        if alpha is not None:
            alpha, _ = resize_and_crop(alpha, info.bucket_reso, resized, interpolation=interpolation, offset=offset)
            alpha = torch.from_numpy(np.asarray(alpha, dtype=np.uint8).copy())
        return img, original, crop_ltrb, alpha

    def _cached(self, info: ImageInfo, flipped: bool):
        """-> (latents, original size, crop_ltrb, alpha mask or None), flipped when asked."""
        if info.latents is not None:
            lat, alpha = (info.latents_flipped if flipped else info.latents), info.alpha_mask
            size, crop = info.cached_original_size, info.cached_crop_ltrb
        else:
            t = load_file(info.latents_cache)
            lat, alpha = t["latents_flipped" if flipped else "latents"].float(), t.get("alpha_mask")
            size, crop = tuple(t["original_size"].tolist()), tuple(t["crop_ltrb"].tolist())
        if alpha is not None and flipped:
            alpha = alpha.flip(-1)
        return lat, size, crop, (alpha if info.masked else None)

    # -- latent caching --------------------------------------------------------------------------------------------
    def cache_latents(self, vae, latent_scale: float, *, vae_batch_size: int = 1, to_disk: bool = False,
                      device="cpu", generator: torch.Generator | None = None) -> None:
        """Encode every image once: `latent_dist.sample(generator)` (NaN -> 0); with flip_aug also the flipped image.

        In memory, or with `to_disk` in `latent_cache_path`'s file beside the image (tensors latents, original_size,
        crop_ltrb, latents_flipped, alpha_mask: sd-scripts' npz layout in safetensors, so a cache file can never
        carry a pickle; latents not scaled), written atomically. A valid existing file is reused. Batches then
        carry `latents` (x latent_scale) and `images` None. The VAE must already be on `device`."""
        check_latents_cacheable([d.bp for d in self.datasets])
        self.latent_scale = float(latent_scale)
        todo: list[ImageInfo] = []
        infos = sorted({id(i): i for d in self.datasets for i in d.images.values()}.values(),
                       key=lambda i: (i.bucket_reso, i.subset.flip_aug, i.path))
        planned: set[str] = set()
        if to_disk:  # temp files of a cache write that a kill interrupted, beside the images
            from library.safe_io import remove_stale_temp_files

            for folder in sorted({os.path.dirname(i.path) for i in infos}):
                for what in remove_stale_temp_files(folder):
                    logger.info("cleanup: %s", what)
        for info in infos:
            if to_disk:
                info.latents_cache = latent_cache_path(info, self.is_sdxl)
                if info.latents_cache in planned or _cache_valid(
                        info.latents_cache, info.bucket_reso, info.subset.flip_aug, info.masked,
                        sources=(info.path, info.mask_path)):
                    continue  # one image used alike by two datasets is encoded once
                planned.add(info.latents_cache)
            todo.append(info)
        batches, batch = [], []
        for info in todo:
            if batch and (batch[-1].bucket_reso, batch[-1].subset.flip_aug) != (info.bucket_reso, info.subset.flip_aug):
                batches.append(batch)
                batch = []
            batch.append(info)
            if len(batch) >= vae_batch_size:
                batches.append(batch)
                batch = []
        if batch:
            batches.append(batch)
        first_in = {os.path.dirname(i.path): i for i in reversed(todo)} if to_disk else {}
        for folder, info in sorted(first_in.items()):  # before minutes of encoding (valid caches need no write)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise _unwritable_cache_folder(info, "not writable")
        logger.info(f"caching latents: {len(todo)} of {len(infos)} images to encode"
                    f"{' (the others have valid cache files)' if to_disk else ''}")
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            for batch in tqdm(batches, desc="caching latents", smoothing=1):
                loaded = [self._load_image(i, None) for i in batch]
                pixels = torch.stack([_to_tensor(x[0]) for x in loaded])
                pixels = pixels.to(device=device, dtype=dtype)
                lat = self._encode(vae, pixels, generator, batch)
                lat_flip = (self._encode(vae, torch.flip(pixels, dims=[3]), generator, batch)
                            if batch[0].subset.flip_aug else [None] * len(batch))
                for info, l, lf, (*_, alpha) in zip(batch, lat, lat_flip, loaded):
                    crop = get_crop_ltrb(info.bucket_reso, info.size)
                    if to_disk:
                        tensors = {"latents": l.contiguous(), "original_size": torch.tensor(info.size),
                                   "crop_ltrb": torch.tensor(crop, dtype=torch.float64)}
                        if lf is not None:
                            tensors["latents_flipped"] = lf.contiguous()
                        if alpha is not None:
                            tensors["alpha_mask"] = alpha.contiguous()
                        try:
                            atomic_save_safetensors(tensors, info.latents_cache, overwrite=True,
                                                    metadata={"apt_lora_cache": json.dumps(cache_settings(info))})
                        except OSError as e:
                            if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                                raise _unwritable_cache_folder(info, str(e)) from None
                            raise
                    else:
                        info.latents, info.latents_flipped, info.alpha_mask = l, lf, alpha
                        info.cached_original_size, info.cached_crop_ltrb = info.size, crop

    @staticmethod
    def _encode(vae, pixels: torch.Tensor, generator, batch: list[ImageInfo]) -> torch.Tensor:
        lat = vae.encode(pixels).latent_dist.sample(generator=generator).float().cpu()
        bad = torch.isnan(lat).flatten(1).any(1)
        if bad.any():
            names = ", ".join(i.path for i, b in zip(batch, bad) if b)
            logger.warning(f"NaN in the VAE latents of {names}; replaced by 0. Use a fp32 VAE (--no_half_vae) or a "
                           f"fixed VAE (--vae).")
            lat = torch.nan_to_num(lat, nan=0.0)
        return lat

    # -- metadata --------------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """The dataset part of sd-scripts' ss_* metadata (KOHYA_COMPAT.md 2.1), values already strings."""
        md: dict = {"ss_num_train_images": self.num_train_images, "ss_num_reg_images": self.num_reg_images,
                    "ss_num_batches_per_epoch": len(self)}
        if all(d.bp.from_user_config for d in self.datasets):
            datasets_md, tag_freq, dirs = [], {}, {}
            for d in self.datasets:
                bp = d.bp
                subsets_md = []
                for sub, count in d.subset_counts:
                    smd = {"img_count": count, "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
                           "flip_aug": sub.flip_aug, "random_crop": sub.random_crop,
                           "shuffle_caption": sub.shuffle_caption, "keep_tokens": sub.keep_tokens,
                           "keep_tokens_separator": sub.keep_tokens_separator,
                           "secondary_separator": sub.secondary_separator, "enable_wildcard": sub.enable_wildcard,
                           "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
                           "resize_interpolation": sub.resize_interpolation}
                    name = None
                    if sub.image_dir:
                        name = smd["image_dir"] = os.path.basename(os.path.normpath(sub.image_dir))
                    if bp.is_dreambooth:
                        smd["class_tokens"] = sub.class_tokens
                        smd["is_reg"] = sub.is_reg
                        if sub.prior_class_tokens is not None:
                            smd["prior_class_tokens"] = sub.prior_class_tokens
                        if sub.is_reg:
                            name = None
                    else:
                        name = smd["metadata_file"] = os.path.basename(sub.metadata_file)
                    subsets_md.append(smd)
                    if name is not None:
                        unique, n = name, 2
                        while unique in dirs:
                            unique, n = f"{name} ({n})", n + 1
                        dirs[unique] = {"n_repeats": sub.num_repeats, "img_count": count}
                datasets_md.append({
                    "is_dreambooth": bp.is_dreambooth, "batch_size_per_device": bp.batch_size,
                    "num_train_images": d.num_train_images, "num_reg_images": d.num_reg_images,
                    "resolution": list(bp.resolution), "enable_bucket": bp.enable_bucket,
                    "min_bucket_reso": bp.min_bucket_reso if bp.enable_bucket else None,
                    "max_bucket_reso": bp.max_bucket_reso if bp.enable_bucket else None,
                    "tag_frequency": d.tag_frequency, "bucket_info": d.bucket_info,
                    "resize_interpolation": bp.resize_interpolation,
                    "skip_image_resolution": list(bp.skip_image_resolution) if bp.skip_image_resolution else None,
                    "subsets": subsets_md})
                for name, freq in d.tag_frequency.items():
                    tag_freq.setdefault(name, freq)
            md.update(ss_datasets=json.dumps(datasets_md), ss_tag_frequency=json.dumps(tag_freq),
                      ss_dataset_dirs=json.dumps(dirs))
        else:  # CLI-only mode: sd-scripts' legacy flat keys
            d = self.datasets[0]
            bp = d.bp
            sub0 = bp.subsets[0]
            dirs, reg_dirs = {}, {}
            for sub, count in d.subset_counts:
                name = os.path.basename(os.path.normpath(sub.image_dir if bp.is_dreambooth else sub.metadata_file))
                (reg_dirs if sub.is_reg else dirs)[name] = {"n_repeats": sub.num_repeats, "img_count": count}
            md.update(ss_batch_size_per_device=bp.batch_size, ss_resolution=tuple(bp.resolution),
                      ss_color_aug=sub0.color_aug, ss_flip_aug=sub0.flip_aug, ss_random_crop=sub0.random_crop,
                      ss_shuffle_caption=sub0.shuffle_caption, ss_enable_bucket=bp.enable_bucket,
                      ss_bucket_no_upscale=bp.bucket_no_upscale if bp.enable_bucket else False,
                      ss_min_bucket_reso=bp.min_bucket_reso if bp.enable_bucket else None,
                      ss_max_bucket_reso=bp.max_bucket_reso if bp.enable_bucket else None,
                      ss_keep_tokens=sub0.keep_tokens, ss_dataset_dirs=json.dumps(dirs),
                      ss_reg_dataset_dirs=json.dumps(reg_dirs), ss_tag_frequency=json.dumps(d.tag_frequency),
                      ss_bucket_info=json.dumps(d.bucket_info))
        return {k: str(v) for k, v in md.items()}


def _unwritable_cache_folder(info: ImageInfo, why: str) -> ConfigError:
    """The error for a disk cache that cannot be written beside `info`'s image."""
    return ConfigError(f"{info.subset.where}: --cache_latents_to_disk writes the latent caches beside the images, and "
                      f"{os.path.dirname(info.path)} cannot be written ({why}). Use --cache_latents (in memory) "
                      f"instead, or make the folder writable.")


def cache_settings(info: ImageInfo) -> dict:
    """Everything besides the image's pixels that decides a latent cache file's contents: the image file (`a.png`
    and `a.jpg` are two images), the bucket and the size it is resized to before the crop (bucket_no_upscale,
    resolution), the resampling, flip_aug (the flipped latents) and where the loss mask comes from."""
    mask = "alpha channel" if info.subset.alpha_mask else os.path.abspath(info.mask_path) if info.mask_path else None
    if info.mask_turn is not None:  # (only then: the files of every other mask keep their names)
        mask += f" turned as EXIF orientation {info.mask_turn}"
    return {"image": os.path.basename(info.path), "bucket": list(info.bucket_reso),
            "resized": list(info.resized_size), "interpolation": info.subset.resize_interpolation,
            "flip_aug": bool(info.subset.flip_aug), "mask": mask}


def latent_cache_path(info: ImageInfo, is_sdxl: bool) -> str:
    """`<stem>_<WWWW>x<HHHH>_<settings hash>_sd.safetensors` (`_sdxl`) beside the image, WWWW x HHHH its original
    size as in sd-scripts' names, plus 8 hex digits of `cache_settings`. **[ours]** sd-scripts' name alone is
    shared by a.png and a.jpg, by two datasets that use one image at two resolutions (or one with flip_aug or a
    mask and one without: each run overwrote the other's file, or trained from it), and it kept a file made with
    another mask folder or resize: each of these is a file of its own here."""
    try:
        info.path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"image {info.path!r}: its file name is not valid UTF-8, and safetensors cannot open a cache "
                          f"file of that name: rename the image, or cache with --cache_latents (in memory)") from None
    w, h = info.size
    digest = hashlib.sha256(json.dumps(cache_settings(info), sort_keys=True).encode()).hexdigest()[:8]
    return f"{os.path.splitext(info.path)[0]}_{w:04d}x{h:04d}_{digest}{'_sdxl' if is_sdxl else '_sd'}.safetensors"


def _cache_valid(path: str, bucket_reso: tuple[int, int], flip_aug: bool, alpha_mask: bool = False,
                 sources: tuple = ()) -> bool:
    """sd-scripts' check: the file has latents / original_size / crop_ltrb of the bucket's latent size (and the
    flipped latents with flip_aug, the bucket-sized loss mask with `alpha_mask`). An unreadable file is recomputed.
    **[ours]** So is a file older than one of its `sources` (the image, its mask image): an image or mask edited
    in place, at the same size, would otherwise train from its old latents or mask."""
    if not os.path.isfile(path):
        return False
    cached_at = os.path.getmtime(path)
    stale = [src for src in sources if src and os.path.getmtime(src) > cached_at]
    if stale:
        logger.info(f"latent cache {path} is older than {stale[0]}: recomputed.")
        return False
    expected = (bucket_reso[1] // LATENT_STRIDE, bucket_reso[0] // LATENT_STRIDE)
    try:
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(f.get_slice("latents").get_shape()[1:3]) != expected:
                return False
            if flip_aug and ("latents_flipped" not in keys
                             or tuple(f.get_slice("latents_flipped").get_shape()[1:3]) != expected):
                return False
            if alpha_mask and ("alpha_mask" not in keys
                               or tuple(f.get_slice("alpha_mask").get_shape()) != (bucket_reso[1], bucket_reso[0])):
                return False
    except Exception as e:
        logger.warning(f"latent cache {path} cannot be read ({e}); it will be recomputed.")
        return False
    return True


def _loss_masks(alphas: list, sizes_hw: list) -> torch.Tensor | None:
    """A batch's alpha masks as loss weights (B, H, W) float32 in [0, 1]; 1 for the samples of subsets without
    alpha_mask (sd-scripts); None when no sample has one."""
    if all(a is None for a in alphas):
        return None
    return torch.stack([torch.ones(hw) if a is None else a.float() / 255.0 for a, hw in zip(alphas, sizes_hw)])


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def collate_batch(items: list[dict]) -> dict:
    """collate_fn for DataLoader(batch_size=1): each dataset item is already a whole batch."""
    if len(items) != 1:
        raise ValueError(f"DatasetGroup items are whole batches: use DataLoader(batch_size=1), not {len(items)}.")
    return items[0]


def captions_at_steps(batches, args, *, epoch_start: int, position: int):
    """The epoch's `batches` with their token warm-up captions finished (`finish_captions`) at the optimizer step
    each trains in: `epoch_start + p // args.gradient_accumulation_steps` for the batch at micro-batch position p of
    the epoch on this process (`position`: the first one's, after the batches a resume skips). The step comes from
    the batch's place in the run, not from a counter read when a worker loads it (sd-scripts), so it is exact with
    loader workers, with --apt_prior_ahead (which reads the next batch a step early) and on --resume."""
    for p, batch in enumerate(batches, position):
        yield finish_captions(batch, epoch_start + p // args.gradient_accumulation_steps, args.max_train_steps)


AUTO_WORKERS = 4  # worker processes by default where images are decoded during training on CUDA


def loader_workers(args, device_type: str) -> tuple[int, bool]:
    """(worker processes, persistent) of the trainer's loader. `--max_data_loader_n_workers` when given (with
    `--persistent_data_loader_workers`). By default (None): where a CUDA step would wait for images decoded in the
    main process (latents not cached: ~90 ms per 1024² photo on one core, bench/results/data_loader-cpu.md, against
    a fast SDXL step near 150 ms), `AUTO_WORKERS` persistent workers, at most the cores less one; otherwise none:
    a cached batch costs < 1 ms in the main process, and workers add start-up time and memory."""
    given = getattr(args, "max_data_loader_n_workers", None)
    if given is not None:
        return int(given), bool(getattr(args, "persistent_data_loader_workers", False)) and given > 0
    if device_type != "cuda" or getattr(args, "cache_latents", False):
        return 0, False
    return min(AUTO_WORKERS, max(1, (os.cpu_count() or 2) - 1)), True


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """A loader worker ignores SIGINT/SIGTERM: a terminal's Ctrl-C and a SIGTERM to the process group or cgroup
    (kill -- -PGID, systemd, SLURM) reach the workers too; torch's worker SIGTERM handler then kills the worker,
    whose SIGCHLD makes the main process raise "DataLoader worker ... killed by signal" mid-step or mid-save.
    The main process stops them itself (done event, then the watchdog when it is gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(data: "DatasetGroup", args, seed: int, device_type: str = "cpu") -> torch.utils.data.DataLoader:
    """The trainer's DataLoader over `data` (items are whole batches): shuffled by its own generator, so starting
    an epoch's iterator draws nothing from the global RNG (exact resume); `loader_workers` processes (each item's
    randomness is seeded by (seed, epoch, item), so workers change no result). On CUDA batches are pinned by the
    loader's thread, so their copy to the GPU is queued without the host waiting (library/transfer.py).
    The batch order per epoch is (seed, epoch)'s once `accelerator.prepare` has put its seedable sampler in (the
    trainer); used directly with persistent workers, epochs after the first take another order (each new iterator
    draws from the generator; a persistent one does not). bench/data_loader.py times it."""
    workers, persistent = loader_workers(args, device_type)
    return torch.utils.data.DataLoader(data, batch_size=1, shuffle=True, collate_fn=collate_batch,
                                       pin_memory=device_type == "cuda", generator=torch.Generator().manual_seed(seed),
                                       num_workers=workers, persistent_workers=persistent,
                                       worker_init_fn=_worker_ignores_stop_signals if workers else None)


def loader_advice(args, device_type: str) -> str | None:
    """A warning when a CUDA step will wait for images decoded in the main process because the user asked for no
    workers (`loader_workers` picks some by default). None when latents are cached or workers load ahead."""
    if device_type != "cuda" or getattr(args, "cache_latents", False) or loader_workers(args, device_type)[0] > 0:
        return None
    return ("images are decoded and resized in the main process between steps (~90 ms per 1024² photo): a fast GPU "
            "step waits for them. Pass --cache_latents (each image encoded once), or load ahead with "
            f"--max_data_loader_n_workers {AUTO_WORKERS} --persistent_data_loader_workers (the default here)")


def build_dataset_group(blueprints: list[DatasetBlueprint], *, is_sdxl: bool, seed: int | None,
                        prior_loss_weight: float = 1.0, debug: bool = False,
                        split: str | None = None) -> DatasetGroup | None:
    """Read images and captions of every blueprint, assign buckets, and return the DatasetGroup.

    `seed` drives the batch order and every per-sample random choice (with the epoch); None picks one at random.
    `debug` logs each image's size, bucket and caption. `split`: "train" or "validation" side of each dataset's
    `validation_split` (`_Dataset._take`, shuffled by its `validation_seed`, else by `seed`); the validation group
    holds the datasets with a split, no reg images and no repeats, and is None when that leaves no image."""
    check_bucket_reso_steps(blueprints, is_sdxl)
    if seed is None:
        seed = random.randrange(2**31)
        logger.info(f"no seed given: the dataset uses seed {seed}")
    datasets = [_Dataset(bp, i, debug, split, seed) for i, bp in enumerate(blueprints)
                if split != "validation" or bp.validation_split > 0]
    if split == "validation":
        datasets = [d for d in datasets if d.images]
        if not datasets:
            return None
    group = DatasetGroup(datasets, is_sdxl=is_sdxl, seed=seed, prior_loss_weight=prior_loss_weight)
    kind = "validation" if split == "validation" else "train"
    for d in datasets:
        logger.info(f"{d.bp.where}: {d.num_train_images} {kind} images and {d.num_reg_images} reg images with "
                    f"repeats, {d.num_batches} batches of up to {d.bp.batch_size}")
    return group
