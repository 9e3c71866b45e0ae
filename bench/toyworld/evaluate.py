"""The toy-world benchmark: the paper's claims measured on the bundled model (issue 4, docs/toyworld.md).

    python -m bench.toyworld.evaluate                                  # all methods, 3 seeds -> bench/results/
    python -m bench.toyworld.evaluate --methods dreambooth,apt --seeds 0 --steps 100   # a quicker look

Every method trains a LoRA with `train_apt_lora.py` itself (same steps, learning rate, rank and seeds) on the
subject's few reference photos, then samples the same prompts at the same seeds; the judge reads every
image back. Methods: DreamBooth (plain loss; run with `--apt_components none` so that γ is logged too),
DreamBooth with prior preservation (reg images sampled from the prior model), DCO, +ATA, +ATA+RS, full APT.

Metrics (analogues of the paper's Table 1; `bench.toyworld.metrics`): text alignment (named attributes the
judge finds, subject prompts), identity (subject prompts showing the subject's pattern), prior preservation
(Fréchet distance and k-NN precision/recall in the judge's feature space against the prior model's images
for the same class prompts and seeds; the context rate of "a backpack" against the prior's), layout (mean
size and share at the centre: the "zoomed-in" effect), ΔNoise per timestep bin (the paper's Eq. 9) and γ.
Runs are cached in --work_dir by their arguments, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.toyworld import judge as J
from bench.toyworld import metrics as M
from bench.toyworld import world as W

DEFAULT_MODEL = "examples/models/toyworld-sd1"
DEFAULT_WORK = "output/toyworld-eval"
DEFAULT_RESULTS = "bench/results"

# name -> (label, trainer arguments, uses reg images)
METHODS = {
    "dreambooth": ("DreamBooth", ["--apt", "--apt_components", "none"], False),
    "dreambooth_pp": ("DreamBooth + prior pres.", ["--apt", "--apt_components", "none"], True),
    "dco": ("DCO", ["--loss_type", "dco"], False),
    "ata": ("+ATA", ["--apt", "--apt_components", "ata"], False),
    "ata_rs": ("+ATA+RS", ["--apt", "--apt_components", "ata,rs"], False),
    "apt": ("APT (ATA+RS+AA)", ["--apt"], False),
    # not a default: τ scaled to the toy model's loss gap (see docs/toyworld.md, "What the benchmark shows")
    "apt_tau10": ("APT, τ = 10", ["--apt", "--apt_gamma_temperature", "10"], False),
}
GRID_METHODS = ("dreambooth", "dco", "apt")


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    judge: str = J.DEFAULT_PATH
    methods: tuple = tuple(METHODS)
    seeds: tuple = (0, 1, 2)
    steps: int = 400
    learning_rate: float = 1e-3
    rank: int = 8
    batch_size: int = 1
    n_per_prompt: int = 4  # images per prompt (seeds 1000 * prompt + j, the same for every method)
    sample_steps: int = 25
    guidance: float = 4.0
    n_reg: int = 60  # prior-preservation images (prior model, class prompt)
    prior_loss_weight: float = 1.0
    noise_draws: int = 16  # ΔNoise: noise/timestep draws per reference image and bin
    quality_n: int = 320  # model quality: pretraining-style prompts
    context_n: int = 64  # model quality: images of each context prompt
    judge_n: int = 1000  # judge held-out accuracy
    subject: W.SubjectSpec = field(default_factory=W.SubjectSpec)
    text_encoder: bool = False  # a text-encoder LoRA too (sd-scripts' SD1 default); the benchmark's is UNet only
    reference_captions: str = "prompt"  # "prompt": "a sks backpack"; "tags": "sks, backpack" (booru-style captions)

    def trainer_args(self) -> list[str]:
        return ["--network_dim", str(self.rank), "--network_alpha", str(self.rank), "--learning_rate",
                str(self.learning_rate), "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
                "--max_train_steps", str(self.steps), *([] if self.text_encoder else ["--network_train_unet_only"]),
                "--cache_latents", "--save_state", "--overwrite"]


# ------------------------------------------------------------------------------------------------ model
def load(path: str):
    """The model in float32, eval mode, no grad (what the trainer reads is `path` itself)."""
    from library.model_util import load_model

    return for_inference(load_model(path))


def for_inference(model):
    """`model` with every module in float32, eval mode, no grad; returned for chaining."""
    for m in (model.unet, model.vae, *model.text_encoders):
        m.float().eval().requires_grad_(False)
    return model


def image_size(model) -> int:
    return int(model.vae.config.sample_size)


@torch.no_grad()
def sample(model, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
           batch: int = 256) -> torch.Tensor:
    """One image per (prompt, seed): DDIM with classifier-free guidance, batched. Returns (N, 3, H, W) in [0, 1].
    The initial noise of an image depends on its seed only, so methods compare at equal noise."""
    from library.conditioning import encode_prompts
    from library.sampling import make_sampler

    unet, vae = model.unet, model.vae
    h = int(unet.config.sample_size)
    uniq = sorted(set(prompts))
    ctx = encode_prompts(model, uniq).context
    index = torch.tensor([uniq.index(p) for p in prompts])
    uncond = encode_prompts(model, [""]).context
    out = []
    for s in range(0, len(prompts), batch):
        sel = index[s : s + batch]
        n = len(sel)
        lat = torch.stack([torch.randn(unet.config.in_channels, h, h, generator=torch.Generator().manual_seed(int(x)))
                           for x in seeds[s : s + batch]])
        sched = make_sampler("ddim", model.v_parameterization)
        sched.set_timesteps(steps)
        lat = lat * sched.init_noise_sigma
        cond = torch.cat([uncond.expand(n, -1, -1), ctx[sel]])
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps_u, eps_c = unet(inp, t, cond).sample.chunk(2)
            lat = sched.step(eps_u + guidance * (eps_c - eps_u), t, lat).prev_sample
        out.append(((vae.decode(lat / model.latent_scale).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def delta_noise(model, network, ref_latents: torch.Tensor, instance: str, cls_prompt: str, draws: int,
                num_bins: int = 10, seed: int = 0) -> list[float]:
    """ΔNoise per timestep bin (the paper's Eq. 9): mean ‖ε_θ(x_t, c*) − ε_φ(x_t, c)‖² over the reference
    latents, `draws` noise/timestep draws each, θ = LoRA on, φ = LoRA off; the same draws for every LoRA."""
    from library.conditioning import encode_prompts

    sched = model.noise_scheduler
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(num_bins):
        x0 = ref_latents.repeat(draws, 1, 1, 1)
        lo, hi = b * T // num_bins, (b + 1) * T // num_bins
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        c_star = encode_prompts(model, [instance]).context.expand(len(x0), -1, -1)
        eps_ft = model.unet(xt, t, c_star).sample
        with network.multiplier_override(0.0):
            c = encode_prompts(model, [cls_prompt]).context.expand(len(x0), -1, -1)
            eps_prior = model.unet(xt, t, c).sample
        out.append(float((eps_ft - eps_prior).pow(2).mean()))
    return out


# ------------------------------------------------------------------------------------------------ data
def write_references(subject: W.SubjectSpec, size: int, folder: str, seed: int = 0,
                     captions: str = "prompt") -> list[Image.Image]:
    """The reference photos at the model's size (box-downsampled like the pretraining data) + caption files:
    the instance prompt, or with `captions="tags"` the same words as tags ("sks, backpack"), which do not hold
    the subset's class_tokens "sks backpack" as one phrase (APT's class prompt c then drops the identifier tag)."""
    os.makedirs(folder, exist_ok=True)
    if captions not in ("prompt", "tags"):
        raise ValueError(f"reference captions {captions!r}: use 'prompt' or 'tags'")
    images, texts = W.reference_set(subject, seed)
    if captions == "tags":
        texts = [f"{subject.identifier}, {subject.cls}"] * len(texts)
    out = []
    for i, (im, cap) in enumerate(zip(images, texts)):
        im = im.resize((size, size), Image.BOX) if size != W.SIZE else im
        im.save(os.path.join(folder, f"ref_{i}.png"))
        with open(os.path.join(folder, f"ref_{i}.txt"), "w", encoding="utf-8") as f:
            f.write(cap + "\n")
        out.append(im)
    return out


def model_fingerprint(path: str) -> str:
    """sha256 of a model's files (a folder's, by relative path, or one file): cached runs and reg images of
    another model are not reused."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def write_reg_images(model, s: Settings, folder: str) -> None:
    """Prior-preservation images: the prior model's samples of the class prompt (DreamBooth's recipe)."""
    prompt = s.subject.class_prompt
    stamp = {"model": model_fingerprint(s.model), "n": s.n_reg, "prompt": prompt, "steps": s.sample_steps,
             "guidance": s.guidance}
    stamp_path = os.path.join(folder, "stamp.json")
    if os.path.isfile(stamp_path) and json.load(open(stamp_path, encoding="utf-8")) == stamp:
        return
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    x = sample(model, [prompt] * s.n_reg, [50_000 + i for i in range(s.n_reg)], steps=s.sample_steps,
               guidance=s.guidance)
    for i, im in enumerate(to_pil(x)):
        im.save(os.path.join(folder, f"reg_{i}.png"))
        with open(os.path.join(folder, f"reg_{i}.txt"), "w", encoding="utf-8") as f:
            f.write(prompt + "\n")
    with open(stamp_path, "w", encoding="utf-8") as f:
        json.dump(stamp, f)


def dataset_toml(s: Settings, size: int, refs: str, reg: Optional[str]) -> str:
    subj = s.subject
    text = (f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = {size}\nbatch_size = {s.batch_size}\n\n'
            f'  [[datasets.subsets]]\n  image_dir = {json.dumps(refs)}\n  class_tokens = "{subj.identifier} {subj.cls}"\n'
            f'  prior_class_tokens = "{subj.cls}"\n  num_repeats = 1\n')
    if reg:
        text += (f'\n  [[datasets.subsets]]\n  image_dir = {json.dumps(reg)}\n  is_reg = true\n'
                 f'  class_tokens = "{subj.cls}"\n  num_repeats = 1\n')
    return text


# ------------------------------------------------------------------------------------------------ runs
def train_run(s: Settings, method: str, seed: int, work: str, log=print) -> str:
    """Train one LoRA with train_apt_lora.py (cached by its arguments). Returns the run folder."""
    import train_apt_lora

    _, extra, uses_reg = METHODS[method]
    run = os.path.join(work, "runs", f"{method}-s{seed}")
    argv = ["--pretrained_model_name_or_path", s.model, "--dataset_config",
            os.path.join(work, "dataset_pp.toml" if uses_reg else "dataset.toml"), "--output_dir", run,
            "--output_name", "lora", "--seed", str(seed), *s.trainer_args(), *extra]
    if uses_reg:
        argv += ["--prior_loss_weight", str(s.prior_loss_weight)]
    with open(argv[argv.index("--dataset_config") + 1], encoding="utf-8") as f:
        dataset = f.read()
    # another dataset, captions, model, or other pictures in its folders (--subject's pattern and colour, or reg
    # images sampled with other settings, keep the same TOML): train again
    folders = [json.loads(m) for m in re.findall(r"image_dir = (\".*\")", dataset)]
    key = {"argv": argv, "dataset": dataset, "model": model_fingerprint(s.model), "captions": s.reference_captions,
           "images": [model_fingerprint(d) for d in folders]}
    stamp = os.path.join(run, "argv.json")
    if os.path.isfile(os.path.join(run, "lora.safetensors")) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == key:
                log(f"[train] {method} seed {seed}: cached")
                return run
    t0 = time.time()
    code = train_apt_lora.main(argv)
    if code != 0:
        raise RuntimeError(f"train_apt_lora.py failed ({code}) for {method} seed {seed}: {' '.join(argv)}")
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(key, f)
    log(f"[train] {method} seed {seed}: {time.time() - t0:.0f}s")
    return run


def gamma_history(run: str) -> Optional[dict]:
    """γ per bin over steps, from the run's saved state (None for a run without the indicator)."""
    from safetensors.torch import load_file

    path = os.path.join(run, "lora-state", "apt.safetensors")
    if not os.path.isfile(path):
        return None
    st = load_file(path)
    if "history.steps" not in st:
        return None
    return {"steps": st["history.steps"].tolist(), "gamma": st["history.gamma"].tolist()}


def prepare_and_train(s: Settings, model, size: int, work: str, log=print):
    """Reference photos, reg images and dataset TOMLs in `work`, then every (method, seed) run.
    Returns (reference images, {(method, seed): run folder})."""
    os.makedirs(work, exist_ok=True)
    refs = write_references(s.subject, size, os.path.join(work, "refs"), captions=s.reference_captions)
    reg = None
    if any(METHODS[m][2] for m in s.methods):
        reg = os.path.join(work, "reg")
        write_reg_images(model, s, reg)
    ref_dir = os.path.abspath(os.path.join(work, "refs"))
    for name, reg_dir in (("dataset.toml", None), ("dataset_pp.toml", reg)):
        if name == "dataset_pp.toml" and reg_dir is None:
            continue  # only a process that trains with reg images writes it (parallel --train_only runs)
        text = dataset_toml(s, size, ref_dir, os.path.abspath(reg_dir) if reg_dir else None)
        path = os.path.join(work, name)
        if not (os.path.isfile(path) and open(path, encoding="utf-8").read() == text):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # a parallel train-only process may be reading it
    runs = {(m, sd): train_run(s, m, sd, work, log) for m in s.methods for sd in s.seeds}
    return refs, runs


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class ImageSet:
    """The benchmark's images of one model: prompts, kinds, seeds, images, the judge's reading, features."""
    prompts: list
    kinds: list
    seeds: list
    images: torch.Tensor
    pred: dict
    feats: torch.Tensor

    def idx(self, kind: str, prompt: Optional[str] = None) -> list[int]:
        return [i for i, (k, p) in enumerate(zip(self.kinds, self.prompts)) if k == kind and (prompt is None or p == prompt)]


def eval_images(model, judge, s: Settings) -> ImageSet:
    eps = W.eval_prompts(s.subject)
    prompts, kinds, seeds = [], [], []
    for i, e in enumerate(eps):
        for j in range(s.n_per_prompt):
            prompts.append(e.prompt)
            kinds.append(e.kind)
            seeds.append(1000 * i + j)
    x = sample(model, prompts, seeds, steps=s.sample_steps, guidance=s.guidance)
    return ImageSet(prompts, kinds, seeds, x, judge.predict(x), judge.features(x))


def measure(ims: ImageSet, prior: ImageSet, s: Settings) -> dict:
    subj = s.subject
    si, ci = ims.idx("subject"), ims.idx("class")
    text, text_per = M.attribute_accuracy([ims.prompts[i] for i in si], {k: [v[i] for i in si] for k, v in ims.pred.items()})
    identity = M.rate([(c, p) for c, p in zip(ims.pred["cls"], ims.pred["pattern"])], si, (subj.cls, subj.pattern))
    fd = M.frechet_distance(prior.feats[ci], ims.feats[ci])
    precision, recall = M.precision_recall(prior.feats[ci], ims.feats[ci])
    # layout and context: prompts that leave size, position (and the context) unstated
    free = lambda idx: [i for i in idx if not ({"size", "position"} & set(M.named_attributes(ims.prompts[i])))]
    size_s, centre_s = M.layout(ims.pred, free(si))
    size_c, centre_c = M.layout(ims.pred, free(ci))
    out = {"text_alignment": text, "identity": identity, "fd": fd, "precision": precision, "recall": recall,
           "size_subject": size_s, "centre_subject": centre_s, "size_class": size_c, "centre_class": centre_c}
    out.update({f"text_{k}": v for k, v in text_per.items()})
    if subj.cls in W.CONTEXT_CLASSES:
        out["context_class"] = M.rate(ims.pred["context"], ims.idx("class", subj.class_prompt))
        out["context_subject"] = M.rate(ims.pred["context"], ims.idx("subject", subj.instance_prompt))
    out["pattern_leak_class"] = 1.0 - M.rate(ims.pred["pattern"], ci, "none")
    return out


def quality_prompts(n: int, seed: int = 4242) -> tuple[list[str], list[int]]:
    """The model-quality prompts (pretraining-style captions) and their sampling seeds: the first n of a fixed list."""
    return [W.pretraining_example(i, seed)[1] for i in range(n)], [70_000 + i for i in range(n)]


def model_quality(model, judge, s: Settings, seed: int = 4242) -> dict:
    """The prior model on its own prompts: pretraining-style captions (random attributes named), the share of
    named attributes the judge finds; and the unstated context of each context prompt ("a kite": a person)."""
    prompts, seeds = quality_prompts(s.quality_n, seed)
    x = sample(model, prompts, seeds, steps=s.sample_steps, guidance=s.guidance)
    acc, per = M.attribute_accuracy(prompts, judge.predict(x))
    out = {"named_attributes": acc, **{f"named_{k}": v for k, v in per.items()}}
    for cls in W.CONTEXT_CLASSES:
        y = sample(model, [f"a {cls}"] * s.context_n, [80_000 + i for i in range(s.context_n)], steps=s.sample_steps,
                   guidance=s.guidance)
        out[f"context_{cls}"] = float(np.mean(judge.predict(y)["context"]))
    y = sample(model, ["a boat"] * s.context_n, [90_000 + i for i in range(s.context_n)], steps=s.sample_steps,
               guidance=s.guidance)
    out["boat_on_water"] = float(np.mean([b == "water" for b in judge.predict(y)["background"]]))
    out["_images"] = x[:32]
    return out


# ------------------------------------------------------------------------------------------------ pictures
def upscale(im: Image.Image, size: int = 96) -> Image.Image:
    return im.resize((size, size), Image.NEAREST) if im.width < size else im


def grid(sets: dict, cols: list[int], labels: dict) -> Image.Image:
    from library.sampling import fixed_seed_grid

    rows = [[upscale(im) for im in to_pil(ims.images[cols])] for ims in sets.values()]
    return fixed_seed_grid(rows, [labels[k] for k in sets], [str(c + 1) for c in range(len(cols))])


def line_plot(series: dict, title: str, xlabel: str, size=(520, 300)) -> Image.Image:
    """A small PIL line chart (no plotting dependency): one line per series over x = 0..n-1."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    w, h = size
    left, right, top, bottom = 50, 150, 24, 34
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    vals = [v for ys in series.values() for v in ys if v == v]
    lo, hi = 0.0, (max(vals) if vals else 1.0) * 1.05 or 1.0
    n = max(len(ys) for ys in series.values())
    px = lambda i: left + (w - left - right) * i / max(1, n - 1)
    py = lambda v: top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, 4), title, fill="black")
    d.text((left, h - 14), xlabel, fill="black")
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        d.text((4, py(v) - 5), f"{v:.3g}", fill="black")
    for c, (name, ys) in enumerate(series.items()):
        col = colours[c % len(colours)]
        pts = [(px(i), py(v)) for i, v in enumerate(ys) if v == v]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.text((w - right + 8, top + 14 * c), name, fill=col)
    return im


# ------------------------------------------------------------------------------------------------ report
def mean_std(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    m = float(np.mean(xs))
    return f"{m:.3f} ± {float(np.std(xs)):.3f}" if len(xs) > 1 else f"{m:.3f}"


COLUMNS = [("text_alignment", "text align. ↑"), ("identity", "identity ↑"), ("fd", "FD ↓"),
           ("precision", "precision ↑"), ("recall", "recall ↑"), ("context_class", "person, \"a backpack\""),
           ("context_subject", "person, \"a sks backpack\""), ("size_subject", "size (subject)"),
           ("centre_subject", "at centre (subject)"), ("pattern_leak_class", "pattern leak (class) ↓")]


def report(s: Settings, results: dict, prior_row: dict, quality: dict, judge_acc: dict, judge_vae: dict,
           dnoise: dict, gammas: dict, seconds: dict, files: dict) -> str:
    label = {k: METHODS[k][0] for k in METHODS}
    cols = [(k, t) for k, t in COLUMNS if k in prior_row or any(k in r for rs in results.values() for r in rs)]
    lines = ["# Toy world benchmark", "",
             f"Written by `python -m bench.toyworld.evaluate` on {time.strftime('%Y-%m-%d')} (CPU, "
             f"{torch.get_num_threads()} torch threads; {seconds['total'] / 60:.1f} min). See docs/toyworld.md for what "
             "each number means and what it shows.", "", "## Settings", "",
             f"- model `{s.model}`, judge `{os.path.relpath(s.judge)}`; subject: {s.subject.colour} {s.subject.cls} with "
             f"the {s.subject.pattern} pattern, identifier `{s.subject.identifier}`, {s.subject.n_refs} references "
             f"({s.subject.ref_size}, centred, {s.subject.ref_background} background, no person), captioned "
             + (f'"{s.subject.identifier}, {s.subject.cls}" (tags)' if s.reference_captions == "tags"
                else f'"{s.subject.instance_prompt}"'),
             f"- every method: {s.steps} steps, batch {s.batch_size}, AdamW lr {s.learning_rate:g} constant, LoRA rank "
             f"{s.rank} / alpha {s.rank} on the UNet, cached latents, seeds {', '.join(map(str, s.seeds))}; APT and DCO "
             "at their defaults (no tuning); prior preservation: "
             f"{s.n_reg} prior images of \"{s.subject.class_prompt}\", weight {s.prior_loss_weight:g}",
             f"- sampling: DDIM {s.sample_steps} steps, CFG {s.guidance:g}, {s.n_per_prompt} images per prompt at fixed "
             f"seeds, {len(W.eval_prompts(s.subject))} prompts ({sum(e.kind == 'subject' for e in W.eval_prompts(s.subject))} "
             "subject, the same without the identifier, other classes)", "",
             "## The judge", "", f"Held-out accuracy on {s.judge_n} fresh generator images, clean and through the "
             "model's VAE (encode, decode) — the ceiling of what any sample can score:", "",
             "| attribute | clean | VAE round trip |", "|---|---|---|"]
    lines += [f"| {k} | {100 * judge_acc[k]:.1f}% | {100 * judge_vae[k]:.1f}% |" for k in judge_acc]
    lines += ["", "## The prior model on its own prompts", "",
              f"{s.quality_n} pretraining-style prompts (random attributes named): named attributes found "
              f"**{100 * quality['named_attributes']:.1f}%** (target ≥ 90%): " +
              ", ".join(f"{k[6:]} {100 * v:.1f}%" for k, v in quality.items() if k.startswith("named_") and k != "named_attributes") +
              ". Unstated context, " + f"{s.context_n} images each: person with \"a kite\" "
              f"**{100 * quality['context_kite']:.1f}%** (target ≥ 70%; pretraining rate 85%), with \"a backpack\" "
              f"{100 * quality['context_backpack']:.1f}%, \"a boat\" on water {100 * quality['boat_on_water']:.1f}% "
              f"(85%).", "", f"![prior samples]({files['quality']})", "",
              "## Results (mean ± std over seeds)", "",
              "| method | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|",
              "| prior model | " + " | ".join(mean_std([prior_row.get(k, float('nan'))]) for k, _ in cols) + " |"]
    for m, rs in results.items():
        lines.append(f"| {label[m]} | " + " | ".join(mean_std([r.get(k, float("nan")) for r in rs]) for k, _ in cols) + " |")
    lines += ["", "Text alignment per attribute (subject prompts):", "",
              "| method | " + " | ".join(k[5:] for k in sorted(next(iter(results.values()))[0]) if k.startswith("text_") and k != "text_alignment") + " |"]
    keys = [k for k in sorted(next(iter(results.values()))[0]) if k.startswith("text_") and k != "text_alignment"]
    lines.append("|---" * (len(keys) + 1) + "|")
    lines.append("| prior model | " + " | ".join(mean_std([prior_row.get(k, float('nan'))]) for k in keys) + " |")
    for m, rs in results.items():
        lines.append(f"| {label[m]} | " + " | ".join(mean_std([r[k] for r in rs]) for k in keys) + " |")
    nb = len(next(iter(dnoise.values()))[0])
    lines += ["", "## ΔNoise per timestep bin at the end of training (Eq. 9; mean over seeds)", "",
              "| method | " + " | ".join(f"t {i * 100}–{i * 100 + 99}" for i in range(nb)) + " |", "|---" * (nb + 1) + "|"]
    for m, rs in dnoise.items():
        lines.append(f"| {label[m]} | " + " | ".join(f"{np.mean([r[b] for r in rs]):.4f}" for b in range(nb)) + " |")
    lines += ["", f"![ΔNoise]({files['dnoise']})", "", "## γ per bin at the end of training (mean over seeds)", ""]
    if gammas:
        lines += ["| method | " + " | ".join(f"bin {i}" for i in range(nb)) + " |", "|---" * (nb + 1) + "|"]
        for m, gs in gammas.items():
            finals = [g["gamma"][-1] for g in gs]
            lines.append(f"| {label[m]} | " + " | ".join(f"{np.nanmean([f[b] for f in finals]):.3f}" for b in range(nb)) + " |")
        lines += [""] + [f"![γ {label[m]}]({p})" for m, p in files["gamma"].items()]
    lines += ["", "## Samples at the same seeds", "", f"![grid]({files['grid']})", "", "Columns:"]
    lines += [f"{i + 1}. \"{p}\" (seed {sd})" for i, (p, sd) in enumerate(files["grid_cols"])]
    lines += ["", "## Time", ""] + [f"- {k}: {v:.0f} s" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"


def grid_columns(prior: ImageSet, subject: W.SubjectSpec) -> list[int]:
    want = [subject.instance_prompt, subject.instance_prompt, f"a {subject.identifier} {subject.cls} on grass",
            f"a {subject.identifier} {subject.cls} on snow", f"a {subject.identifier} {subject.cls} at the top left",
            f"a small {subject.identifier} {subject.cls}", subject.class_prompt, subject.class_prompt]
    cols, used = [], set()
    for p in want:
        for i, q in enumerate(prior.prompts):
            if q == p and i not in used:
                cols.append(i)
                used.add(i)
                break
    return cols


# ------------------------------------------------------------------------------------------------ driver
def evaluate(s: Settings, work: str = DEFAULT_WORK, results_dir: str = DEFAULT_RESULTS, name: str = "toyworld",
             log=print, train_only: bool = False) -> Optional[str]:
    """Run the whole benchmark; returns the path of the markdown report. `train_only`: train (or find cached)
    the LoRAs and stop (several such processes, on disjoint methods, fill one work dir in parallel)."""
    from networks.lora import LoRANetwork

    t_start = time.time()
    seconds = {}
    os.makedirs(work, exist_ok=True)
    fig_dir = os.path.join(results_dir, name)
    os.makedirs(fig_dir, exist_ok=True)
    model = load(s.model)
    judge = J.load(s.judge)
    size = image_size(model)

    if train_only:
        prepare_and_train(s, model, size, work, log)
        return None
    t0 = time.time()
    judge_acc = J.held_out_accuracy(judge, s.judge_n)
    judge_vae = J.held_out_accuracy(judge, s.judge_n, degrade=J.VAERoundTrip(model))
    log("[judge] clean " + ", ".join(f"{k} {v:.3f}" for k, v in judge_acc.items()))
    log("[judge] VAE   " + ", ".join(f"{k} {v:.3f}" for k, v in judge_vae.items()))
    quality = model_quality(model, judge, s)
    log(f"[prior] named attributes {quality['named_attributes']:.3f}, person | kite {quality['context_kite']:.3f}")
    seconds["judge and prior quality"] = time.time() - t0

    t0 = time.time()
    refs, runs = prepare_and_train(s, model, size, work, log)
    seconds["training"] = time.time() - t0

    t0 = time.time()
    prior = eval_images(model, judge, s)
    prior_row = measure(prior, prior, s)
    prior_row.update(fd=float("nan"), precision=float("nan"), recall=float("nan"))  # against itself: no information
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in refs])
        ref_lat = model.vae.encode(x).latent_dist.mean * model.latent_scale
    network = LoRANetwork(model, lora_dim=s.rank, alpha=float(s.rank), train_text_encoder=s.text_encoder)
    network.apply_to()
    network.requires_grad_(False)
    results, dnoise, gammas, sets0 = {}, {}, {}, {"prior": prior}
    for (m, sd), run in runs.items():
        network.load_weights(os.path.join(run, "lora.safetensors"))
        ims = eval_images(model, judge, s)
        r = measure(ims, prior, s)
        results.setdefault(m, []).append(r)
        dnoise.setdefault(m, []).append(delta_noise(model, network, ref_lat, s.subject.instance_prompt,
                                                    s.subject.class_prompt, s.noise_draws))
        g = gamma_history(run)
        if g is not None:
            gammas.setdefault(m, []).append(g)
        if sd == s.seeds[0]:
            sets0[m] = ims
        log(f"[eval] {m} seed {sd}: " + ", ".join(f"{k} {r[k]:.3f}" for k in ("text_alignment", "identity", "fd")
                                                   if k in r) + f", person|class {r.get('context_class', float('nan')):.3f}")
    network.restore()
    seconds["sampling and judging"] = time.time() - t0

    files = {}
    labels = {"prior": "prior", **{k: v[0] for k, v in METHODS.items()}}
    cols = grid_columns(prior, s.subject)
    shown = {k: v for k, v in sets0.items() if k == "prior" or k in GRID_METHODS} or sets0
    grid(shown, cols, labels).save(os.path.join(fig_dir, "grid.png"))
    files["grid"], files["grid_cols"] = f"{name}/grid.png", [(prior.prompts[c], prior.seeds[c]) for c in cols]
    all_grid = grid(sets0, cols, labels)
    all_grid.save(os.path.join(fig_dir, "grid_all_methods.png"))
    qual = quality.pop("_images")
    from library.sampling import fixed_seed_grid

    fixed_seed_grid([[upscale(im, 64) for im in to_pil(qual[i : i + 16])] for i in (0, 16)], ["prior", "prior"]).save(
        os.path.join(fig_dir, "prior_samples.png"))
    files["quality"] = f"{name}/prior_samples.png"
    series = {METHODS[m][0]: list(np.mean(rs, axis=0)) for m, rs in dnoise.items()}
    line_plot(series, "ΔNoise per timestep bin (end of training)", "timestep bin (0 = t<100 ... 9)").save(
        os.path.join(fig_dir, "delta_noise.png"))
    files["dnoise"] = f"{name}/delta_noise.png"
    files["gamma"] = {}
    for m in gammas:
        src = os.path.join(runs[(m, s.seeds[0])], "lora_gamma.png")
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(fig_dir, f"gamma_{m}.png"))
            files["gamma"][m] = f"{name}/gamma_{m}.png"
    seconds["total"] = time.time() - t_start
    md = report(s, results, prior_row, quality, judge_acc, judge_vae, dnoise, gammas, seconds, files)
    path = os.path.join(results_dir, f"{name}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(md)
    raw = {"settings": {**asdict(s), "subject": asdict(s.subject)}, "results": results, "prior": prior_row,
           "quality": quality, "judge": judge_acc, "judge_vae": judge_vae, "delta_noise": dnoise,
           "gamma_final": {m: [g["gamma"][-1] for g in gs] for m, gs in gammas.items()}, "seconds": seconds}
    with open(os.path.join(results_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, default=list)
    log(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--judge", default=d.judge)
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of every method")
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--n_per_prompt", type=int, default=d.n_per_prompt)
    p.add_argument("--sample_steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--n_reg", type=int, default=d.n_reg)
    p.add_argument("--quality_n", type=int, default=d.quality_n)
    p.add_argument("--context_n", type=int, default=d.context_n)
    p.add_argument("--judge_n", type=int, default=d.judge_n)
    p.add_argument("--noise_draws", type=int, default=d.noise_draws)
    p.add_argument("--train_text_encoder", action="store_true",
                   help="train a text-encoder LoRA too (default: UNet only, --network_train_unet_only)")
    p.add_argument("--subject", default=None, help='the subject as "class,colour,pattern" (default backpack,blue,checker)')
    p.add_argument("--reference_captions", choices=("prompt", "tags"), default=d.reference_captions,
                   help='the references\' captions: the instance prompt "a sks backpack" (default) or tags '
                        '"sks, backpack"')
    p.add_argument("--work_dir", default=DEFAULT_WORK)
    p.add_argument("--results_dir", default=DEFAULT_RESULTS)
    p.add_argument("--name", default="toyworld", help="report name: RESULTS_DIR/NAME.md and RESULTS_DIR/NAME/*.png")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train_only", action="store_true", help="train the LoRAs into --work_dir and stop (run "
                   "several on disjoint --methods in parallel, then once without it to measure)")
    a = p.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if not os.path.exists(a.model):
        p.error(f"--model {a.model}: not found (the bundled model is {DEFAULT_MODEL}; "
                "python -m bench.toyworld.pretrain makes it)")
    subject = W.SubjectSpec()
    if a.subject:
        cls, colour, pattern = (x.strip() for x in a.subject.split(","))
        subject = W.SubjectSpec(cls=cls, colour=colour, pattern=pattern)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = Settings(model=a.model, judge=a.judge, methods=methods, seeds=tuple(int(x) for x in a.seeds.split(",")),
                 steps=a.steps, learning_rate=a.learning_rate, rank=a.rank, batch_size=a.batch_size,
                 n_per_prompt=a.n_per_prompt, sample_steps=a.sample_steps, guidance=a.guidance, n_reg=a.n_reg,
                 quality_n=a.quality_n, context_n=a.context_n, judge_n=a.judge_n, noise_draws=a.noise_draws,
                 subject=subject, text_encoder=a.train_text_encoder, reference_captions=a.reference_captions)
    os.environ.setdefault("TQDM_DISABLE", "1")
    evaluate(s, a.work_dir, a.results_dir, a.name, train_only=a.train_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
