"""Can the trainer's data loader keep a fast GPU step fed? Time per batch of the trainer's own DataLoader.

    python -m bench.data_loader                                   # 1024 px, batch 1 and 4, workers 0 and 2
    python -m bench.data_loader --resolution 512 --workers 0,4 --out bench/results/data_loader-cpu.md

A folder of `--images` random-content PNGs (photo-sized: 1.5x the training resolution, so every batch decodes,
resizes and crops, as with a user's photos) becomes a dataset through the trainer's own path (CLI dataset
arguments -> `config_util.generate_blueprint` -> `dataset.build_dataset_group` -> `dataset.make_loader`). For each
batch size and worker count it prints the first batch (worker start-up) and the mean time per later batch, next
to a GPU step to compare with (`--gpu_step_ms`, default 150: an SDXL batch-1 step with CUDA graphs is expected
around there, docs/speed.md). A loader slower than the step starves the GPU. Cached latents (`--cache_latents`)
read tensors from memory and are measured too (a tiny VAE encodes them; what is timed is the loader).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch


def write_images(folder: str, n: int, size: int, seed: int = 0) -> str:
    """`n` PNGs of 1.5·`size` x 1.875·`size` px with smooth random content (compresses like a photo, not noise)."""
    from PIL import Image

    sub = os.path.join(folder, "1_sks dog")
    os.makedirs(sub, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = int(size * 1.5), int(size * 1.5 * 1.25)
    for i in range(n):
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(os.path.join(sub, f"{i:03d}.png"))
        with open(os.path.join(sub, f"{i:03d}.caption"), "w", encoding="utf-8") as f:
            f.write(f"a photo of sks dog, number {i}")
    return folder


def build(folder: str, resolution: int, batch_size: int, workers: int, cache: bool, is_sdxl: bool):
    from library import config_util, dataset as dataset_lib
    from library.train_args import setup_parser

    args = setup_parser().parse_args([
        "--pretrained_model_name_or_path", "unused", "--output_dir", "unused", "--train_data_dir", folder,
        "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--enable_bucket",
        "--max_data_loader_n_workers", str(workers), "--persistent_data_loader_workers"])
    blueprints = config_util.generate_blueprint(None, args, is_sdxl=is_sdxl)
    data = dataset_lib.build_dataset_group(blueprints, is_sdxl=is_sdxl, seed=0, prior_loss_weight=1.0)
    if cache:
        from library.tiny_models import build_tiny_model

        model = build_tiny_model("sdxl" if is_sdxl else "sd1")
        with torch.no_grad():
            data.cache_latents(model.vae, model.latent_scale, vae_batch_size=4, to_disk=False, device="cpu")
    return data, dataset_lib.make_loader(data, args, seed=0)


def measure(loader, batches: int) -> tuple[float, float]:
    """(first batch s, mean s per later batch): epochs restart until `batches` later batches are done."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while n < batches:
        try:
            next(it)
            n += 1
        except StopIteration:
            it = iter(loader)
    return first, (time.perf_counter() - t1) / max(1, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_loader", description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch_sizes", default="1,4")
    p.add_argument("--workers", default="0,2")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batches", type=int, default=12, help="timed batches after the first")
    p.add_argument("--gpu_step_ms", type=float, default=150.0)
    p.add_argument("--sdxl", action="store_true", help="SDXL bucket steps (the default is SD1's)")
    p.add_argument("--no_cached", action="store_true", help="skip the --cache_latents rows")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = ["| source | batch | workers | first batch | per batch | batches/s | vs a {:.0f} ms GPU step |".format(
        a.gpu_step_ms), "|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_images(tmp, a.images, a.resolution)
        for cache in (False,) if a.no_cached else (False, True):
            for bs in (int(x) for x in a.batch_sizes.split(",")):
                for w in (int(x) for x in a.workers.split(",")):
                    _, loader = build(folder, a.resolution, bs, w, cache, a.sdxl)
                    first, per = measure(loader, a.batches)
                    ok = "keeps up" if per * 1000 <= a.gpu_step_ms else "**starves it**"
                    row = (f"| {'cached latents' if cache else 'images'} | {bs} | {w} | {first * 1000:.0f} ms "
                           f"| {per * 1000:.1f} ms | {1 / per:.1f} | {ok} |")
                    rows.append(row)
                    print(row, flush=True)
                    del loader
    text = (f"# Data loader: `python -m bench.data_loader {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            f"{a.images} PNGs of {int(a.resolution * 1.5)}x{int(a.resolution * 1.875)} px to {a.resolution}² buckets, "
            f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n\n" + "\n".join(rows) + "\n")
    from bench.common import write_result

    write_result(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
