"""The judge: a small CNN that reads the toy world's ground truth back from images.

One head per attribute (background, class, colour, position, size, context = a person present, pattern =
the subject's pattern or none), trained on fresh generator images every batch (`world.sample_scene` with
`priors=False`: every attribute uniform and independent, so the judge has no prior of its own), with light
blur/noise/resampling so that it also reads decoded (slightly soft) model samples. Its penultimate layer
(`Judge.features`, 128-d) is the feature space for Frechet distance and k-NN precision/recall.

    python -m bench.toyworld.judge --train --steps 1500 --out bench/toyworld/judge.safetensors
    python -m bench.toyworld.judge --eval bench/toyworld/judge.safetensors --n 2000

See docs/toyworld.md for its held-out accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.toyworld import world as W

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge.safetensors")
HEADS: dict[str, tuple] = {
    "background": W.BACKGROUNDS,
    "cls": W.CLASSES,
    "colour": W.COLOUR_NAMES,
    "position": W.POSITIONS,
    "size": W.SIZES,
    "context": (False, True),
    "pattern": W.PATTERNS,
}
FEATURE_DIM = 128
PATTERN_RATE = 0.5  # share of judge training images whose object carries a pattern


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """64x64 RGB (+2 coordinate channels) -> 6 conv layers -> 4x4x(3*width) -> 128-d features -> one linear
    head per attribute. Inputs of another size are resized to 64x64."""

    def __init__(self, width: int = 24, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        w = width
        self.body = nn.Sequential(
            _block(5, w),  # 64x64: full resolution for the patterns
            nn.MaxPool2d(2),  # 32x32
            _block(w, w),
            _block(w, 2 * w),
            nn.MaxPool2d(2),  # 16x16
            _block(2 * w, 2 * w),
            _block(2 * w, 3 * w),
            nn.MaxPool2d(2),  # 8x8
            _block(3 * w, 3 * w),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(3 * w * 16, feature_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in HEADS.items()})
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, W.SIZE), torch.linspace(-1, 1, W.SIZE), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    # ---------------------------------------------------------------------------------------- core
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 64, 64) in [0, 1]."""
        x = (x - 0.5) / 0.25
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict:
        f = self._features(x)
        return {k: h(f) for k, h in self.heads.items()}

    # ---------------------------------------------------------------------------------------- inference
    @staticmethod
    def to_tensor(images) -> torch.Tensor:
        """PIL images / (N, H, W, 3) uint8 array / (N, 3, H, W) float tensor in [0, 1] -> (N, 3, 64, 64) float."""
        if isinstance(images, torch.Tensor):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        elif isinstance(images, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(images)).float()
            x = x.permute(0, 3, 1, 2) / 255.0 if x.shape[-1] == 3 else x
        else:
            x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
            x = x.float() / 255.0
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"judge: expected (N, 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (W.SIZE, W.SIZE):
            x = F.interpolate(x, size=(W.SIZE, W.SIZE), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > W.SIZE)
        return x.clamp(0, 1)

    @torch.no_grad()
    def _run(self, images, fn, batch_size: int):
        was = self.training
        self.eval()
        try:
            x = self.to_tensor(images).to(next(self.parameters()).device)
            return [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was)

    def logits(self, images, batch_size: int = 256) -> dict:
        outs = self._run(images, self.forward, batch_size)
        return {k: torch.cat([o[k] for o in outs]).cpu() for k in HEADS}

    def predict(self, images, batch_size: int = 256) -> dict:
        """Per attribute, the list of predicted labels (strings; `context` as bool)."""
        return {k: [HEADS[k][i] for i in v.argmax(1).tolist()] for k, v in self.logits(images, batch_size).items()}

    def features(self, images, batch_size: int = 256) -> torch.Tensor:
        """(N, 128) penultimate-layer features (for Frechet distance, k-NN precision/recall)."""
        return torch.cat(self._run(images, self._features, batch_size)).cpu()


# ------------------------------------------------------------------------------------------------ data
def _judge_scene(rng: np.random.Generator) -> W.Scene:
    pattern = "none" if rng.random() >= PATTERN_RATE else str(rng.choice(W.PATTERNS[1:]))
    return W.sample_scene(rng, pattern=pattern, priors=False)


def judge_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict]:
    """n fresh generator images (N, 3, 64, 64) in [0, 1] and their labels (LongTensor index per head)."""
    scenes = [_judge_scene(rng) for _ in range(n)]
    imgs = np.stack([np.asarray(W.render(s, rng)) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    labels = {k: torch.tensor([HEADS[k].index(s.labels()[k]) for s in scenes]) for k in HEADS}
    return x, labels


class _Batches(torch.utils.data.IterableDataset):
    """Training batch `step` comes from generator [seed, step]: the same batches whatever the worker count."""

    def __init__(self, seed: int, steps: int, batch_size: int):
        self.seed, self.steps, self.batch_size = seed, steps, batch_size

    def __iter__(self):
        for step in range(self.steps):
            yield judge_batch(np.random.default_rng([self.seed, step, 0x1D]), self.batch_size)


def _one_thread(_):
    torch.set_num_threads(1)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gauss_kernel(sigma)
    p = len(k) // 2
    x = F.pad(x, (p, p, p, p), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light degradations like those of decoded samples: blur (p 0.4, sigma 0.4/0.7/1.0 px), 32-px
    resampling (p 0.2), Gaussian noise (p 0.4, sigma up to 0.03)."""
    x = x.clone()
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen)
    for j, sigma in enumerate((0.4, 0.7, 1.0)):
        sel = (u[:, 0] < 0.4) & ((u[:, 1] * 3).long() == j)
        if sel.any():
            x[sel] = _blur(x[sel], sigma)
    sel = u[:, 2] < 0.2
    if sel.any():
        small = F.interpolate(x[sel], size=W.SIZE // 2, mode="bilinear", antialias=True, align_corners=False)
        x[sel] = F.interpolate(small, size=W.SIZE, mode="bilinear", align_corners=False)
    scale = torch.where(u[:, 3] < 0.4, u[:, 3] / 0.4 * 0.03, torch.zeros(n))
    x = x + torch.randn(x.shape, generator=gen) * scale.view(-1, 1, 1, 1)
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ training
class VAERoundTrip:
    """Degrade images the way a model's samples are: resize to the model's image size, encode and decode
    with its VAE (posterior mean), resize back to 64. `model`: a model folder/file (`load_model`) or a
    StableDiffusionModel."""

    def __init__(self, model):
        if isinstance(model, (str, os.PathLike)):
            from library.model_util import load_model

            model = load_model(model)
        self.vae = model.vae.eval().requires_grad_(False)
        self.size = int(self.vae.config.sample_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != W.SIZE:
            x = F.interpolate(x, size=self.size, mode="area")
        y = (self.vae.decode(self.vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2
        if self.size != W.SIZE:
            y = F.interpolate(y, size=W.SIZE, mode="bilinear", align_corners=False)
        return y.clamp(0, 1)


def train_judge(steps: int = 1500, seed: int = 0, batch_size: int = 64, lr: float = 3e-3, log_every: int = 100,
                width: int = 24, workers: int = 1, vae=None, vae_rate: float = 0.5, log=print, init=None) -> Judge:
    """Train a judge from scratch on fresh generator batches; seeded (same seed, same weights). `workers`:
    processes that render the batches while the main process trains (0: render in the main process).
    `vae`: a model (folder, file or StableDiffusionModel) whose VAE round trip (`VAERoundTrip`) degrades
    `vae_rate` of each batch, so that the judge reads that model's decoded samples as well as clean images.
    `init`: a judge (or its file) to fine-tune instead of starting from scratch."""
    torch.manual_seed(seed)
    roundtrip = VAERoundTrip(vae) if vae is not None else None
    if init is None:
        judge = Judge(width=width)
    else:
        judge = load(init) if isinstance(init, (str, os.PathLike)) else copy.deepcopy(init)
        judge.requires_grad_(True)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    t0, run = time.time(), {}
    batches = torch.utils.data.DataLoader(_Batches(seed, steps, batch_size), batch_size=None, num_workers=workers,
                                          worker_init_fn=_one_thread)
    for step, (x, y) in enumerate(batches):
        if roundtrip is not None:
            sel = torch.rand(x.shape[0], generator=gen) < vae_rate
            if sel.any():
                x[sel] = roundtrip(x[sel])
        x = augment(x, gen)
        out = judge(x)
        losses = {k: F.cross_entropy(out[k], y[k]) for k in HEADS}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in losses.items():
            run[k] = 0.98 * run.get(k, v.item()) + 0.02 * v.item()
        if log and (step + 1) % log_every == 0:
            worst = max(run, key=run.get)
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  worst head {worst} {run[worst]:.3f}  "
                f"{time.time() - t0:.0f}s")
    judge.eval()
    return judge


@torch.no_grad()
def held_out_accuracy(judge: Judge, n: int = 1000, seed: int = 12345, batch_size: int = 250,
                      degrade=None) -> dict:
    """Accuracy per attribute on n fresh generator images (seed disjoint from training's [seed, step, 0x1D]).
    `degrade`: a function applied to each image batch first (e.g. a `VAERoundTrip`)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    correct = {k: 0 for k in HEADS}
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x, y = judge_batch(rng, b)
        logits = judge.logits(degrade(x) if degrade is not None else x)
        for k in HEADS:
            correct[k] += int((logits[k].argmax(1) == y[k]).sum())
        done += b
    return {k: correct[k] / n for k in HEADS}


def format_accuracy(acc: dict, n: Optional[int] = None) -> str:
    """A markdown table of per-attribute accuracy."""
    head = "| attribute | accuracy |" + ("" if n is None else f"  (n = {n})")
    rows = [head, "|---|---|"] + [f"| {k} | {100 * v:.1f}% |" for k, v in acc.items()]
    rows.append(f"| min | {100 * min(acc.values()):.1f}% |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ files
def save(judge: Judge, path: str = DEFAULT_PATH, metadata: Optional[dict] = None, dtype=torch.float16) -> str:
    """Write the judge as safetensors (floats in `dtype`); the header carries its config and label lists."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in judge.state_dict().items()}
    meta = {"format": "pt", "toyworld.judge.config": json.dumps({"width": judge.width,
                                                                  "feature_dim": judge.feature_dim}),
            "toyworld.judge.heads": json.dumps({k: [str(x) for x in v] for k, v in HEADS.items()})}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path


def load(path: str = DEFAULT_PATH, device="cpu") -> Judge:
    """Load a judge written by `save` (fp32, eval mode). Refuses a file whose label lists differ from the
    world's (the world changed: retrain the judge)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no judge weights; train them with "
                                f"`python -m bench.toyworld.judge --train --out {path}`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    heads = json.loads(meta.get("toyworld.judge.heads", "{}"))
    want = {k: [str(x) for x in v] for k, v in HEADS.items()}
    if heads != want:
        raise ValueError(f"{path}: the judge was trained for other labels than the current world's; retrain it")
    cfg = json.loads(meta.get("toyworld.judge.config", "{}"))
    judge = Judge(**cfg)
    sd = load_file(path)
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return judge.to(device).eval().requires_grad_(False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.judge", description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="train a judge and write --out")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_PATH)
    p.add_argument("--vae", metavar="MODEL", help="a model folder/file: train on its VAE round trips too "
                   "(half of each batch), so the judge reads that model's decoded samples")
    p.add_argument("--init", metavar="PATH", help="fine-tune this judge instead of training from scratch")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    p.add_argument("--eval", metavar="PATH", help="measure the held-out accuracy of a saved judge")
    p.add_argument("--eval_vae", metavar="MODEL", help="with --eval: also measure it on MODEL's VAE round trips")
    p.add_argument("--n", type=int, default=2000, help="held-out images for the accuracy table")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process (default 1)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering batches (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.train and not args.eval:
        p.error("give --train or --eval PATH")
    if args.train:
        t0 = time.time()
        judge = train_judge(args.steps, args.seed, args.batch_size, lr=args.lr, workers=args.workers, vae=args.vae,
                            init=args.init)
        train_s = time.time() - t0
        acc = held_out_accuracy(judge, args.n)
        meta = {"toyworld.judge.steps": args.steps, "toyworld.judge.seed": args.seed,
                "toyworld.judge.batch_size": args.batch_size, "toyworld.judge.train_seconds": f"{train_s:.0f}",
                "toyworld.judge.held_out_accuracy": json.dumps({k: round(v, 4) for k, v in acc.items()}),
                "toyworld.judge.held_out_n": args.n, "toyworld.judge.vae": args.vae or "",
                "toyworld.judge.init": args.init or "", "toyworld.judge.lr": args.lr}
        save(judge, args.out, meta)
        print(f"trained in {train_s:.0f}s ({args.steps} steps x {args.batch_size}); wrote {args.out} "
              f"({os.path.getsize(args.out) / 1e6:.2f} MB)")
        print(format_accuracy(acc, args.n))
    if args.eval:
        judge = load(args.eval)
        acc = held_out_accuracy(judge, args.n)
        print(format_accuracy(acc, args.n))
        if args.eval_vae:
            acc = held_out_accuracy(judge, args.n, degrade=VAERoundTrip(args.eval_vae))
            print(f"after the VAE round trip of {args.eval_vae}:")
            print(format_accuracy(acc, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
