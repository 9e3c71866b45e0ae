"""--debug_dataset: what the trainer would get from the dataset, batch by batch, printed without loading anything
onto a device or training (sd-scripts' flag). sd-scripts shows each image in an OpenCV window; a headless machine
is the common case here, so the batch's images can be written as PNGs instead (`--debug_dataset_dir`)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _png(tensor, path: str) -> None:
    """A (3, H, W) image in [-1, 1] -> 8-bit PNG."""
    arr = ((tensor.permute(1, 2, 0).clamp(-1, 1).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def debug_dataset(data, *, epochs: int = 1, apt: bool = False, image_dir: str | None = None, out=print) -> int:
    """Print every batch of `epochs` epochs (in index order; training shuffles the batch order): bucket, and per
    image its key, original size, crop, reg flag and loss weight, the caption as processed this epoch (shuffle,
    dropout, wildcards; as after the token warm-up) and, with `apt`, the class prompt c APT derives from it. With
    `image_dir`, each image as the UNet's VAE would get it (resized, cropped, flipped) is written there as
    `e<epoch>-b<batch>-<i>.png`.
    Returns the number of batches shown."""
    from apt_ext.prompts import class_prompt
    from library.captions import finish_captions

    if image_dir:
        os.makedirs(image_dir, exist_ok=True)
    shown = 0
    for epoch in range(1, epochs + 1):
        data.set_current_epoch(epoch)
        for b in range(len(data)):
            batch = finish_captions(data[b])  # token warm-up: the captions after it
            h, w = (int(v) for v in batch["target_sizes_hw"][0])
            out(f"epoch {epoch}, batch {b + 1}/{len(data)}: bucket {w}x{h} (w x h), {len(batch['captions'])} image(s)")
            for i, key in enumerate(batch["image_keys"]):
                oh, ow = (int(v) for v in batch["original_sizes_hw"][i])
                top, left = (int(v) for v in batch["crop_top_lefts"][i])
                reg = " reg" if bool(batch["is_reg"][i]) else ""
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")  # a name that is not UTF-8
                out(f"  [{i}] {name}: original {ow}x{oh}, SDXL crop conditioning (top, left) ({top}, {left}), "
                    f"loss weight {float(batch['loss_weights'][i]):g}{reg}")
                out(f"      caption: {batch['captions'][i]!r}")
                if apt:
                    c = class_prompt(batch["captions"][i], batch["class_tokens"][i], batch["prior_class_tokens"][i])
                    out(f"      APT class prompt c: {c!r}")
                if image_dir and batch["images"] is not None:
                    path = os.path.join(image_dir, f"e{epoch}-b{b + 1}-{i}.png")
                    _png(batch["images"][i], path)
                    out(f"      image: {path}")
            shown += 1
    return shown
