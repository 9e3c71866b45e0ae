"""Pretrain a tiny SD1-architecture text-to-image model from scratch on the toy world.

    python -m bench.toyworld.pretrain                      # full run (the bundled model: docs/toyworld.md)
    python -m bench.toyworld.pretrain --resume             # continue an interrupted run from its checkpoint
    python -m bench.toyworld.pretrain --steps 200 --out /tmp/tw-test --work_dir /tmp/tw-work   # a short run

Four phases, each checkpointed in --work_dir (resume picks up where it stopped, with the same result as
an uninterrupted run: every batch, caption and noise draw is seeded by (seed, step)):
1. VAE: an AutoencoderKL (SD1 block types, 3 levels: 4x downsampling, 4 latent channels) trained briefly
   on generator images (L1 + MSE + a small KL). It is a generic codec, so it sees all patterns and priors
   off; the diffusion model never sees a pattern. Its scaling_factor is set to 1/std of the latents.
2. Latents: `--n_images` pretraining images (world priors: people with kites and backpacks, boats on water;
   plain objects) encoded once (mean and std of the latent distribution).
3. Text encoder: CLIPTextModel (small, real CLIP tokenizer) trained alone on the captions to state every
   attribute they name (`text_pretrain.py`), then frozen, as SD keeps a pretrained CLIP: trained jointly with
   the UNet from scratch it merged the position words (docs/toyworld.md).
4. Diffusion: UNet2DConditionModel (SD1 block layout: 3 CrossAttn down blocks + 1 plain, 2 layers per
   block, cross-attention mid block) trained from scratch, epsilon prediction on the SD noise schedule
   (`make_noise_scheduler`), captions re-drawn every step (random attribute subsets), 10% dropped to ""
   (classifier-free guidance), min-SNR-5 weighting, AdamW, EMA of the weights.

The EMA weights are written as fp16 safetensors in a diffusers folder (`save_diffusers`) that
`train_apt_lora.py` and `library.model_util.load_model` load like any SD1 checkpoint. See docs/toyworld.md.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.toyworld import world as W

DEFAULT_OUT = "examples/models/toyworld-sd1"
DEFAULT_WORK = "output/toyworld-pretrain"


# ------------------------------------------------------------------------------------------------ config
VAE_CHANNELS = {32: (16, 32, 64), 64: (16, 32, 64, 64)}  # image size -> VAE levels: 8x8 latents either way


@dataclass
class PretrainConfig:
    image_size: int = 32
    seed: int = 0
    # VAE
    vae_steps: int = 2500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_channels: Optional[tuple] = None  # None: VAE_CHANNELS[image_size]
    vae_kl_weight: float = 1e-6
    vae_fg_weight: float = 8.0
    # data
    n_images: int = 30000
    # diffusion
    steps: int = 5000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 500
    unet_channels: tuple = (32, 64, 64, 64)
    te_hidden: int = 64
    te_layers: int = 3
    # keep the (random) text encoder fixed, as SD keeps CLIP: trained jointly from scratch, it merges the position
    # words before the UNet learns to use them (docs/toyworld.md, "Position: the cause")
    freeze_text_encoder: bool = False
    # or train it gently: its learning rate is lr * te_lr_scale, and 0 for the first te_freeze_steps steps (the UNet
    # learns to read the random encoder first; the encoder's own warm-up starts when it is released)
    te_lr_scale: float = 1.0
    te_freeze_steps: int = 0
    # or pretrain it first on the captions alone (`text_pretrain.py`: it learns to state every named attribute),
    # then keep it frozen while the UNet trains, as SD keeps a pretrained CLIP (docs/toyworld.md, "Position: a
    # pretrained text encoder")
    text_pretrain_steps: int = 300
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # layout emphasis: the eps-loss weight is clamp(snr, snr_floor, min_snr_gamma) / snr, so the high-noise
    # steps where the layout (position) is decided are not weighted down to ~snr in x0 terms (None: min-SNR only)
    snr_floor: Optional[float] = None
    ema_decay: float = 0.999
    bf16: bool = False  # CPU/GPU autocast for the diffusion phase
    # where to train ("cpu", "cuda", "cuda:1"): not part of the key, a checkpoint resumes on another device.
    # All random draws are made on the CPU and moved, so a device changes only float rounding.
    device: str = "cpu"
    # continue from a model folder written by this script (its VAE, UNet and text encoder; no VAE phase)
    init_from: Optional[str] = None
    # take only the VAE (and its judge check) from a model folder written by this script: no VAE phase, a fresh
    # UNet and text encoder. Keeps a bundled VAE, and the judge fine-tuned on its round trips, when retraining
    init_vae_from: Optional[str] = None

    def __post_init__(self):
        if self.vae_channels is None:
            self.vae_channels = VAE_CHANNELS[self.image_size]
        self.vae_channels, self.unet_channels = tuple(self.vae_channels), tuple(self.unet_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def key(self) -> str:
        """Hash of everything that changes the result (a checkpoint from another config is refused)."""
        d = {k: v for k, v in asdict(self).items() if k != "device"}
        for k, neutral in LATER_FIELDS.items():  # added later: unset, they leave the keys of earlier checkpoints
            if d[k] == neutral:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


# fields added after models and checkpoints were written, with the value that means "as before"
LATER_FIELDS = {"snr_floor": None, "freeze_text_encoder": False, "init_vae_from": None, "te_lr_scale": 1.0,
                "te_freeze_steps": 0, "text_pretrain_steps": 0}


def model_configs(cfg: PretrainConfig) -> dict:
    """The architecture config dict (layout of library/configs/sd1.json) of the toy world model."""
    from library.model_util import arch_config

    c = arch_config("sd1")
    n = len(cfg.vae_channels)
    c["vae"].update(block_out_channels=list(cfg.vae_channels), down_block_types=["DownEncoderBlock2D"] * n,
                    up_block_types=["UpDecoderBlock2D"] * n, layers_per_block=1, norm_num_groups=16,
                    sample_size=cfg.image_size, scaling_factor=1.0)
    c["text_encoder"].update(hidden_size=cfg.te_hidden, intermediate_size=4 * cfg.te_hidden,
                             num_attention_heads=4, num_hidden_layers=cfg.te_layers, projection_dim=cfg.te_hidden)
    groups = 32 if min(cfg.unet_channels) >= 64 and all(ch % 32 == 0 for ch in cfg.unet_channels) else 16
    c["unet"].update(block_out_channels=list(cfg.unet_channels), cross_attention_dim=cfg.te_hidden,
                     attention_head_dim=max(1, cfg.unet_channels[0] // 8),  # SD1's naming: the number of heads
                     norm_num_groups=groups, sample_size=cfg.latent_size)
    return c


def build_model(cfg: PretrainConfig):
    """A randomly initialised StableDiffusionModel (seeded) with the bundled CLIP tokenizer."""
    from library.clip_tokenizer import bundled_clip_tokenizer
    from library.model_util import build_from_config

    torch.manual_seed(cfg.seed)
    model = build_from_config(model_configs(cfg), [bundled_clip_tokenizer()], v_parameterization=False)
    init_vae_logvar(model.vae)
    return model


# ------------------------------------------------------------------------------------------------ helpers
def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL 64x64 images -> (N, 3, size, size) in [-1, 1] (box-downsampled if size < 64)."""
    if size != W.SIZE:
        images = [im.resize((size, size), Image.BOX) for im in images]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _gen(*key) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(h)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up: decay = min(d, (1+n)/(10+n))."""

    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules) -> None:
        for p, s in zip([p for m in modules for p in m.parameters()], self.shadow):
            p.copy_(s)

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, sd):
        for s, v in zip(self.shadow, sd["shadow"]):
            s.copy_(v)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device ({torch.__version__}); "
                         "use --device cpu")


def _to_device(model, device: str):
    """UNet, VAE and text encoder on `device`."""
    _check_device(device)
    for m in (model.unet, model.vae, *model.text_encoders):
        m.to(device)
    return model


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# ------------------------------------------------------------------------------------------------ phase 1: VAE
def vae_batch(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic codec data: uniform attributes, patterns half of the time, people half of the time.
    Returns images (N, 3, s, s) in [-1, 1] and per-pixel loss weights (N, 1, s, s): 1 on the background,
    1 + `vae_fg_weight` on the object and the person (small, so plain MSE would learn them last)."""
    rng = np.random.default_rng([cfg.seed, step, 0xAE])
    ims, fgs = [], []
    for _ in range(cfg.vae_batch_size):
        pattern = "none" if rng.random() < 0.5 else str(rng.choice(W.PATTERNS[1:]))
        im, masks = W.render(W.sample_scene(rng, pattern=pattern, priors=False), rng, return_masks=True)
        ims.append(im)
        fgs.append(np.maximum(masks["object"], masks["context"]))
    fg = torch.from_numpy(np.stack(fgs))[:, None].float()
    if cfg.image_size != W.SIZE:
        fg = F.adaptive_max_pool2d(fg, cfg.image_size)
    return to_tensor(ims, cfg.image_size), 1.0 + cfg.vae_fg_weight * fg


def vae_loss(vae, batch, cfg: PretrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    x, weight = batch
    x, weight = x.to(vae.device), weight.to(vae.device)
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x.device)
    rec = vae.decode(z).sample
    err = rec - x
    rec_loss = ((err.abs() + err**2) * weight).mean() / weight.mean()
    kl = post.kl().mean()  # per image, summed over the latent
    return rec_loss + cfg.vae_kl_weight * kl, {"mse": float((err.detach() ** 2).mean())}


class _VAEBatches(torch.utils.data.IterableDataset):
    """VAE batches from `start` on, rendered in a worker process while the main process trains."""

    def __init__(self, cfg: PretrainConfig, start: int):
        self.cfg, self.start = cfg, start

    def __iter__(self):
        for step in range(self.start, self.cfg.vae_steps):
            yield vae_batch(self.cfg, step)


def _one_thread(_):
    torch.set_num_threads(1)


def init_vae_logvar(vae, logvar: float = -6.0) -> None:
    """Start the encoder's log-variance at `logvar` (std 0.05) instead of 0: with SD's tiny KL weight the
    posterior ends up narrow anyway, and unit-variance noise on the latents early on only slows training."""
    with torch.no_grad():
        c = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[c:] *= 0.1
        vae.quant_conv.bias[c:] = logvar


def train_vae(model, cfg: PretrainConfig, state: dict, save_ckpt, save_every: int, workers: int = 1) -> None:
    vae = model.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    start = state.get("vae_step", 0)
    t0, run = time.time(), None
    batches = torch.utils.data.DataLoader(_VAEBatches(cfg, start), batch_size=None, num_workers=workers,
                                          worker_init_fn=_one_thread)
    for step, batch in zip(range(start, cfg.vae_steps), batches):
        for g in opt.param_groups:  # cosine decay to 10%
            g["lr"] = cfg.vae_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)))
        loss, parts = vae_loss(vae, batch, cfg, _gen(cfg.seed, step, "vae"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run = parts["mse"] if run is None else 0.95 * run + 0.05 * parts["mse"]
        done = step + 1
        if done % 100 == 0 or done == cfg.vae_steps:
            el = time.time() - t0
            eta = el / (done - start) * (cfg.vae_steps - done)
            _log(f"[vae] step {done}/{cfg.vae_steps}  mse {run:.4f}  ({el:.0f}s, eta {eta:.0f}s)")
        if done % save_every == 0 and done < cfg.vae_steps:
            state.update(vae_step=done, vae=vae.state_dict(), vae_opt=opt.state_dict())
            save_ckpt(state)
    vae.eval().requires_grad_(False)
    state.pop("vae_opt", None)
    state.update(vae_step=cfg.vae_steps)


@torch.no_grad()
def vae_judge_check(vae, cfg: PretrainConfig, n: int = 400, judge_path: Optional[str] = None) -> Optional[dict]:
    """How much of the ground truth survives the image size and the VAE: the judge's accuracy per attribute
    on fresh images (judge distribution) at `image_size`, and on their VAE reconstructions. None without a
    judge file."""
    from bench.toyworld import judge as J

    judge_path = judge_path or J.DEFAULT_PATH
    if not os.path.isfile(judge_path):
        return None
    judge = J.load(judge_path)
    x, y = J.judge_batch(np.random.default_rng([cfg.seed, 0xC4EC]), n)
    if cfg.image_size != W.SIZE:
        x = F.interpolate(x, size=cfg.image_size, mode="area")
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 100].to(vae.device) * 2 - 1).latent_dist.mean).sample.cpu()
                     for i in range(0, n, 100)])
    out = {}
    for name, imgs in (("resized", x), ("vae", ((rec + 1) / 2).clamp(0, 1))):
        logits = judge.logits(imgs)
        out[name] = {k: round(float((logits[k].argmax(1) == y[k]).float().mean()), 4) for k in J.HEADS}
    return out


# ------------------------------------------------------------------------------------------------ phase 2: latents
@torch.no_grad()
def encode_dataset(model, cfg: PretrainConfig, chunk: int = 250) -> dict:
    """Encode the pretraining set: {"mean", "std"} (N, 4, h, w) fp16 and the scenes (for re-captioning)."""
    vae = model.vae.eval()
    means, stds, scenes = [], [], []
    t0 = time.time()
    for start in range(0, cfg.n_images, chunk):
        ims = []
        for i in range(start, min(cfg.n_images, start + chunk)):
            im, _, scene = W.pretraining_example(i, cfg.seed)
            ims.append(im)
            scenes.append(asdict(scene))
        post = vae.encode(to_tensor(ims, cfg.image_size).to(vae.device)).latent_dist
        means.append(post.mean.half().cpu())
        stds.append(post.std.half().cpu())
        done = min(cfg.n_images, start + chunk)
        if done % 5000 < chunk or done == cfg.n_images:
            _log(f"[latents] {done}/{cfg.n_images} images encoded ({time.time() - t0:.0f}s)")
    mean, std = torch.cat(means), torch.cat(stds)
    # SD's scaling factor: latents * scale have unit variance
    sample = mean.float() + std.float() * torch.randn(mean.shape, generator=_gen(cfg.seed, "scale"))
    scale = float(1.0 / sample.std())
    return {"mean": mean, "std": std, "scenes": scenes, "scaling_factor": scale}


# ------------------------------------------------------------------------------------------------ phase 3: diffusion
def diffusion_batch(data: dict, cfg: PretrainConfig, step: int, latent_scale: float):
    """(latents * scale, captions) of one step, drawn from (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step, 0xD1])
    idx = rng.integers(0, len(data["scenes"]), cfg.batch_size)
    captions = []
    for i in idx:
        if rng.random() < cfg.caption_dropout:
            captions.append("")
        else:
            captions.append(W.caption(W.Scene(**data["scenes"][i]), rng=rng))
    t = torch.from_numpy(idx)
    mean, std = data["mean"][t].float(), data["std"][t].float()
    lat = mean + std * torch.randn(mean.shape, generator=_gen(cfg.seed, step, "lat"))
    return lat * latent_scale, captions


def diffusion_loss(model, latents: torch.Tensor, captions: list, cfg: PretrainConfig, gen: torch.Generator):
    from library.conditioning import encode_prompts
    from library.transfer import to_device

    sched = model.noise_scheduler
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen)  # drawn on the CPU: the same on every device
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
    dev = model.unet.device
    latents, noise, t = (to_device(x, dev) for x in (latents, noise, t))  # pinned, non-blocking on CUDA
    noisy = sched.add_noise(latents, noise, t)
    ctx = encode_prompts(model, captions).context
    pred = model.unet(noisy, t, ctx).sample
    per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma or cfg.snr_floor:
        ac = sched.alphas_cumprod.to(dev)[t]
        snr = ac / (1 - ac)
        per = per * torch.clamp(snr, min=cfg.snr_floor, max=cfg.min_snr_gamma or None) / snr
    return per.mean()


class Interrupted(Exception):
    """Raised by `stop_after`: the run stopped early with its checkpoint written (tests of --resume)."""


def train_diffusion(model, data: dict, cfg: PretrainConfig, state: dict, save_ckpt, save_every: int,
                    log_every: int = 50, stop_after: Optional[int] = None) -> EMA:
    unet, te = model.unet, model.text_encoders[0]
    mods = [unet, te]
    for m in mods:
        m.train().requires_grad_(True)
    frozen = cfg.freeze_text_encoder or cfg.text_pretrain_steps > 0
    if frozen:
        te.eval().requires_grad_(False)
    groups = [{"params": list(unet.parameters()), "scale": 1.0, "start": 0}]
    if not frozen:
        groups.append({"params": list(te.parameters()), "scale": cfg.te_lr_scale, "start": cfg.te_freeze_steps})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    ema = EMA(mods, cfg.ema_decay)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
    start = state.get("step", 0)
    scale = data["scaling_factor"]
    t0, run = time.time(), None
    autocast = torch.autocast(unet.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    for step in range(start, cfg.steps):
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            warm = max(0.0, min(1.0, (step + 1 - g["start"]) / max(1, cfg.warmup_steps)))
            g["lr"] = cfg.lr * g["scale"] * warm * (0.1 + 0.9 * decay)
        lat, caps = diffusion_batch(data, cfg, step, scale)
        with autocast:
            loss = diffusion_loss(model, lat, caps, cfg, _gen(cfg.seed, step, "noise"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        run = loss.detach() if run is None else 0.98 * run + 0.02 * loss.detach()  # on the device: read to log
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            el = time.time() - t0
            eta = el / (done - start) * (cfg.steps - done)
            _log(f"[diffusion] step {done}/{cfg.steps}  loss {float(run):.4f}  ({el:.0f}s, {el / (done - start):.2f}s/step, "
                 f"eta {eta / 60:.1f} min)")
        if (done % save_every == 0 or done == stop_after) and done < cfg.steps:
            state.update(step=done, unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(),
                         ema=ema.state_dict())
            save_ckpt(state)
        if done == stop_after and done < cfg.steps:
            raise Interrupted(f"stopped after diffusion step {done}")
    for m in mods:
        m.eval().requires_grad_(False)
    return ema


# ------------------------------------------------------------------------------------------------ output
def export(model, cfg: PretrainConfig, out: str, info: dict, overwrite: bool) -> str:
    """Write the model as fp16 safetensors in a diffusers folder (+ toyworld.json with how it was made)."""
    from library.model_util import save_diffusers

    m = copy.copy(model)
    m.unet = copy.deepcopy(model.unet).half().cpu()
    m.vae = copy.deepcopy(model.vae).half().cpu()
    m.text_encoders = [copy.deepcopy(model.text_encoders[0]).half().cpu()]
    path = save_diffusers(m, out, overwrite=overwrite)
    with open(os.path.join(path, "toyworld.json"), "w", encoding="utf-8") as f:
        json.dump({"config": asdict(cfg), **info}, f, indent=2, default=list)
    return path


def folder_megabytes(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


# ------------------------------------------------------------------------------------------------ driver
def pretrain(cfg: PretrainConfig, out: str = DEFAULT_OUT, work_dir: str = DEFAULT_WORK, resume: bool = False,
             overwrite: bool = False, save_every: int = 500, log_every: int = 50,
             stop_after: Optional[int] = None, workers: int = 1, vae_check_n: int = 400) -> str:
    """Run (or resume) every phase and write the model folder `out`. Returns its path.
    `stop_after`: raise `Interrupted` after that diffusion step, its checkpoint written (resume tests).
    `workers`: processes rendering the VAE phase's batches (0: in the main process). `vae_check_n`: images
    for the judge check of the VAE (`vae_judge_check`; 0 skips it)."""
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    _check_device(cfg.device)
    os.makedirs(work_dir, exist_ok=True)
    ckpt_path = os.path.join(work_dir, "checkpoint.pt")
    lat_path = os.path.join(work_dir, "latents.pt")
    state: dict = {"key": cfg.key(), "config": asdict(cfg), "phase": "vae", "seconds": {}}
    if os.path.exists(ckpt_path):
        if not resume:
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or remove {work_dir}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("key") != cfg.key():
            raise ValueError(f"{ckpt_path} was written with other settings ({state.get('config')}); use the same "
                             "arguments to resume, or remove the work dir to start over")
        _log(f"resuming from {ckpt_path}: phase {state['phase']}, vae step {state.get('vae_step', 0)}, "
             f"diffusion step {state.get('step', 0)}")

    def save_ckpt(s):
        _atomic_torch_save(s, ckpt_path)

    model = build_model(cfg)
    if cfg.init_from and cfg.init_vae_from:
        raise ValueError("--init_from and --init_vae_from exclude each other: --init_from already takes the VAE")
    if cfg.init_from and cfg.text_pretrain_steps:
        raise ValueError("--text_pretrain_steps trains a fresh text encoder and --init_from continues a trained one: "
                         "use --init_vae_from to keep only the VAE")
    if cfg.init_from and state["phase"] == "vae":
        state.update(init_weights(model, cfg.init_from), phase="latents")
    elif cfg.init_vae_from and state["phase"] == "vae":
        got = init_weights(model, cfg.init_vae_from, parts=("vae",))
        state.update(vae=got["vae"], vae_judge=got["vae_judge"], vae_from=got["init"], phase="latents")
    if "vae" in state:
        model.vae.load_state_dict(state["vae"])
    _to_device(model, cfg.device)
    t_all = time.time()
    secs = state.setdefault("seconds", {})
    if state["phase"] == "vae":
        t0 = time.time()
        train_vae(model, cfg, state, save_ckpt, save_every, workers)
        secs["vae"] = secs.get("vae", 0) + time.time() - t0
        model.vae.eval()
        check = vae_judge_check(model.vae, cfg, vae_check_n) if vae_check_n else None
        if check:
            _log(f"[vae] judge accuracy at {cfg.image_size}px: {check['resized']}; "
                 f"after the VAE: {check['vae']}")
        state.update(phase="latents", vae=model.vae.state_dict(), vae_judge=check)
        save_ckpt(state)
    model.vae.eval().requires_grad_(False)
    if state["phase"] == "latents":
        t0 = time.time()
        data = encode_dataset(model, cfg)
        if cfg.init_from:  # the UNet was trained on latents at this scale
            data["scaling_factor"] = state["init"]["latent_scaling_factor"]
        _atomic_torch_save(data, lat_path)
        secs["latents"] = time.time() - t0
        state.update(phase="diffusion")
        save_ckpt(state)
    else:
        data = torch.load(lat_path, map_location="cpu", weights_only=True)
    model.vae.register_to_config(scaling_factor=data["scaling_factor"])
    if "unet" in state:
        model.unet.load_state_dict(state["unet"])
    if "te" in state:  # trained, or pretrained on the captions (below) before the first diffusion step
        model.text_encoders[0].load_state_dict(state["te"])
    elif cfg.text_pretrain_steps and state["phase"] == "diffusion":
        from bench.toyworld.text_pretrain import pretrain_text_encoder

        t0 = time.time()
        state["text_pretrain"] = pretrain_text_encoder(model, cfg.text_pretrain_steps, cfg.seed, log=_log)
        _log(f"[text] held-out accuracy per attribute: {state['text_pretrain']['accuracy']}")
        secs["text"] = time.time() - t0
        state["te"] = model.text_encoders[0].state_dict()
        save_ckpt(state)
    t0 = time.time()
    if state["phase"] == "diffusion":
        ema = train_diffusion(model, data, cfg, state, save_ckpt, save_every, log_every, stop_after)
        secs["diffusion"] = secs.get("diffusion", 0) + time.time() - t0
        ema.copy_to([model.unet, model.text_encoders[0]])
        state = {k: v for k, v in state.items() if k not in ("opt", "ema")}
        state.update(phase="done", step=cfg.steps, unet=model.unet.state_dict(),
                     te=model.text_encoders[0].state_dict())
        save_ckpt(state)
    elif state["phase"] == "done":
        model.unet.load_state_dict(state["unet"])
        model.text_encoders[0].load_state_dict(state["te"])
    info = {"seconds": {k: round(v) for k, v in secs.items()}, "torch_threads": torch.get_num_threads(),
            "device": _device_name(cfg.device),
            "latent_scaling_factor": data["scaling_factor"], "vae_judge_accuracy": state.get("vae_judge")}
    if cfg.init_from:
        info["init"] = state["init"]  # how the starting model was made (its toyworld.json)
    if cfg.init_vae_from:
        info["vae_from"] = state["vae_from"]
    if cfg.text_pretrain_steps:
        info["text_pretrain"] = state["text_pretrain"]
    path = export(model, cfg, out, info, overwrite=True)
    _log(f"wrote {path} ({folder_megabytes(path):.1f} MB); phases: {info['seconds']} s; "
         f"this session {time.time() - t_all:.0f}s")
    return path


def init_weights(model, folder: str, parts: Sequence[str] = ("vae", "unet", "text_encoder")) -> dict:
    """Load `parts` (of the VAE, UNet and text encoder) of a model folder written by this script into `model`
    (same architecture, else ValueError). Returns the checkpoint-state entries: weights, its VAE check, its
    toyworld.json."""
    from library.model_util import load_model

    flag = "--init_from" if len(parts) == 3 else "--init_vae_from"
    info_path = os.path.join(folder, "toyworld.json")
    if not os.path.isfile(info_path):
        raise ValueError(f"{flag} {folder}: no toyworld.json there; give a folder written by this script")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    src = load_model(folder)
    pairs = ((model.vae, src.vae, "vae"), (model.unet, src.unet, "unet"), (model.text_encoders[0], src.text_encoders[0],
                                                                          "text_encoder"))
    for dst, s, name in pairs:
        if name not in parts:
            continue
        try:
            dst.load_state_dict(s.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{flag} {folder}: its {name} does not match these settings (give the same "
                             f"--image_size, --vae_channels, --unet_channels, --te_hidden as its toyworld.json): "
                             f"{str(e).splitlines()[0]}") from None
    return {"vae": model.vae.state_dict(), "unet": model.unet.state_dict(), "te": model.text_encoders[0].state_dict(),
            "vae_judge": info.get("vae_judge_accuracy"), "init": {"folder": folder, **info}}


def time_steps(cfg: PretrainConfig, n: int = 20, warmup: int = 2) -> dict:
    """Seconds per step of each phase at this config (random weights; for the time estimate)."""
    model = _to_device(build_model(cfg), cfg.device)
    out = {}
    vae = model.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    ts = []
    for s in range(warmup + max(3, n // 4)):
        t0 = time.time()
        loss, _ = vae_loss(vae, vae_batch(cfg, s), cfg, _gen(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(cfg.device)
        ts.append(time.time() - t0)
    out["vae_step_s"] = float(np.median(ts[warmup:]))
    vae.eval().requires_grad_(False)
    t0 = time.time()
    small = PretrainConfig(**{**asdict(cfg), "n_images": 250})
    data = encode_dataset(model, small)
    out["encode_image_s"] = (time.time() - t0) / 250
    data["scaling_factor"] = 1.0
    unet, te = model.unet.train().requires_grad_(True), model.text_encoders[0].train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    ema = EMA([unet, te], cfg.ema_decay)
    autocast = torch.autocast(unet.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    ts = []
    for s in range(warmup + n):
        t0 = time.time()
        lat, caps = diffusion_batch(data, small, s, 1.0)
        with autocast:
            loss = diffusion_loss(model, lat, caps, cfg, _gen(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(s)
        _sync(cfg.device)
        ts.append(time.time() - t0)
    out["diffusion_step_s"] = float(np.median(ts[warmup:]))
    est = cfg.vae_steps * out["vae_step_s"] + cfg.n_images * out["encode_image_s"] + \
        cfg.steps * out["diffusion_step_s"]
    out["estimate_min"] = est / 60
    out["params"] = {"unet": sum(p.numel() for p in unet.parameters()),
                     "text_encoder": sum(p.numel() for p in te.parameters()),
                     "vae": sum(p.numel() for p in model.vae.parameters())}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=d.steps, help="diffusion steps")
    p.add_argument("--vae_steps", type=int, default=d.vae_steps)
    p.add_argument("--n_images", type=int, default=d.n_images, help="pretraining images (encoded once)")
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help="linear LR warm-up of the diffusion phase")
    p.add_argument("--snr_floor", type=float, default=d.snr_floor,
                   help="weight the high-noise steps as if their SNR were at least this (eps-loss weight "
                        "clamp(snr, floor, 5) / snr): the steps that decide the layout (default: min-SNR-5 only)")
    p.add_argument("--freeze_text_encoder", action="store_true",
                   help="keep the text encoder fixed (as SD keeps CLIP): the random one, or the --init_from one. "
                        "Trained jointly from scratch, it merges the position words before the UNet learns them "
                        "(docs/toyworld.md)")
    p.add_argument("--te_lr_scale", type=float, default=d.te_lr_scale,
                   help="the text encoder's learning rate as a multiple of --lr (without --freeze_text_encoder)")
    p.add_argument("--te_freeze_steps", type=int, default=d.te_freeze_steps,
                   help="keep the text encoder fixed for the first N diffusion steps, then train it (its own warm-up)")
    p.add_argument("--text_pretrain_steps", type=int, default=None,
                   help="first train the text encoder alone for N steps to state each caption's attributes "
                        "(bench/toyworld/text_pretrain.py), then keep it frozen while the UNet trains, as SD keeps "
                        f"CLIP (default {d.text_pretrain_steps}, and 0 with --init_from, whose encoder is trained; "
                        "0: train it jointly with the UNet, or see --freeze_text_encoder)")
    p.add_argument("--image_size", type=int, default=d.image_size, choices=[32, 64])
    p.add_argument("--unet_channels", type=str, default=",".join(map(str, d.unet_channels)),
                   help="UNet block_out_channels (4 values; SD1 layout)")
    p.add_argument("--vae_channels", type=str, default=None,
                   help="VAE block_out_channels, one per level (n levels: 2^(n-1) downsampling); default "
                        + "; ".join(f"{k} px: {','.join(map(str, v))}" for k, v in VAE_CHANNELS.items()))
    p.add_argument("--te_hidden", type=int, default=d.te_hidden)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the diffusion phase (fast on CPUs "
                   "with AMX and on GPUs; results differ slightly from fp32)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (random draws stay on the CPU, so a "
                   "device changes only rounding; a checkpoint resumes on any device)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--work_dir", default=DEFAULT_WORK, help="checkpoints and the latent cache")
    p.add_argument("--resume", action="store_true", help="continue from --work_dir's checkpoint")
    p.add_argument("--init_from", default=None, metavar="FOLDER",
                   help="start from a model folder written by this script (VAE, UNet, text encoder): the VAE phase "
                        "is skipped and --steps more diffusion steps run with a fresh optimizer and LR schedule")
    p.add_argument("--init_vae_from", default=None, metavar="FOLDER",
                   help="take only the VAE from a model folder written by this script (no VAE phase; fresh UNet and "
                        "text encoder): retrains the bundled model on the VAE its judge was fine-tuned on")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (each phase)")
    p.add_argument("--vae_check", type=int, default=400, metavar="N",
                   help="images for the judge's check of the VAE after its phase (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--time_only", type=int, default=0, metavar="N",
                   help="only time N steps of each phase at these settings and print the estimate")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unet_ch = tuple(int(x) for x in args.unet_channels.split(","))
    if len(unet_ch) != 4:
        p.error("--unet_channels needs 4 comma-separated values (the SD1 layout has 4 blocks)")
    text_steps = args.text_pretrain_steps
    if text_steps is None:
        text_steps = 0 if args.init_from else d.text_pretrain_steps
    cfg = PretrainConfig(image_size=args.image_size, seed=args.seed, vae_steps=args.vae_steps,
                         n_images=args.n_images, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, snr_floor=args.snr_floor,
                         freeze_text_encoder=args.freeze_text_encoder, te_lr_scale=args.te_lr_scale,
                         te_freeze_steps=args.te_freeze_steps, text_pretrain_steps=text_steps,
                         unet_channels=unet_ch, te_hidden=args.te_hidden, bf16=args.bf16, device=args.device,
                         init_from=args.init_from, init_vae_from=args.init_vae_from,
                         vae_channels=tuple(int(x) for x in args.vae_channels.split(",")) if args.vae_channels
                         else None)
    if args.time_only:
        r = time_steps(cfg, args.time_only)
        print(json.dumps(r, indent=2))
        return 0
    try:
        pretrain(cfg, args.out, args.work_dir, resume=args.resume, overwrite=args.overwrite,
                 save_every=args.save_every, vae_check_n=args.vae_check)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
