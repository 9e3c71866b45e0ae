"""Sample images during training, sd-scripts style (`--sample_prompts`, `--sample_sampler`; see docs/sampling.md).

* `parse_prompt_file(path)`: .txt (one prompt per line with `--n --w --h --d --s --l --ss`), .toml
  (`[prompt]` defaults + `[[prompt.subset]]`), .json (a list of dicts or strings).
* `make_sampler(name, v_parameterization)`: the diffusers scheduler for an sd-scripts sampler name.
* `sample_images(model, prompts, ...)`: runs a diffusers pipeline around the live (LoRA-patched) UNet and VAE,
  with prompt embeddings from our own `encode_prompts` (clip_skip as in training; attention weights and up to
  225 tokens, as sd-scripts' sampling pipelines read prompts), and writes
  `{output_dir}/sample/{output_name}_{e%06d|%06d}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png`.
  Training randomness is unaffected (RNG states saved and restored), and train/eval modes are restored.
* `fixed_seed_grid(rows, labels)`: a labelled grid image (rows = models, columns = seeds).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from library.conditioning import encode_prompts
from library.rng import preserved_rng_state
from library.text_io import read_text

logger = logging.getLogger(__name__)


class SamplingError(ValueError):
    """A user-facing error in a sample prompt file or sampling option; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: Optional[str] = None  # None: "" (unconditional), as sd-scripts
    width: int = 512
    height: int = 512
    seed: Optional[int] = None  # None: a fresh random seed each time (not in the file name)
    steps: int = 30
    scale: float = 7.5
    sampler: Optional[str] = None  # None: the run's --sample_sampler


# inline options of .txt lines -> SamplePrompt fields
_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "scale", "ss": "sampler"}
# sd-scripts options for other model families (Flux, SD3, ControlNet ...): ignored here
_TXT_OTHER_MODEL_OPTIONS = {"g", "cn", "ctr", "rcfg", "fs"}
# keys of .toml/.json entries (sd-scripts names, plus our field names) -> SamplePrompt fields
_DICT_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height", "seed": "seed",
    "sample_steps": "steps", "steps": "steps", "scale": "scale", "guidance_scale": "scale",
    "sample_sampler": "sampler", "sampler": "sampler",
}
_DICT_IGNORED = {"enum", "subset"}


def _int_value(value, what: str, where: str) -> int:
    if isinstance(value, bool):
        raise SamplingError(f"{where}: {what} expects an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise SamplingError(f"{where}: {what} expects an integer, got {value!r}")


def _float_value(value, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise SamplingError(f"{where}: {what} expects a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SamplingError(f"{where}: {what} expects a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise SamplingError(f"{where}: {what} expects a finite number, got {value!r}")
    return out


def _size_value(value, what: str, where: str) -> int:
    v = _int_value(value, what, where)
    if v <= 0:
        raise SamplingError(f"{where}: {what} must be positive, got {v}")
    # floored to a multiple of 8 as in sd-scripts, at least 8 (sd-scripts: 64; small models such as the toy
    # world's draw 32x32 images)
    return max(8, v - v % 8)


def _set_field(fields: dict, field_name: str, value, what: str, where: str) -> None:
    if field_name == "prompt" or field_name == "negative_prompt":
        if not isinstance(value, str):
            raise SamplingError(f"{where}: {what} expects a string, got {value!r}")
        fields[field_name] = value.strip()
    elif field_name in ("width", "height"):
        fields[field_name] = _size_value(value, what, where)
    elif field_name == "seed":
        if value is None:
            fields["seed"] = None
        else:
            seed = _int_value(value, what, where)
            fields["seed"] = seed if seed >= 0 else None  # -1 (A1111 style): random
    elif field_name == "steps":
        fields["steps"] = max(1, min(1000, _int_value(value, what, where)))
    elif field_name == "scale":
        fields["scale"] = _float_value(value, what, where)
    elif field_name == "sampler":
        if not isinstance(value, str):
            raise SamplingError(f"{where}: {what} expects a sampler name, got {value!r}")
        name = value.strip().lower()
        if name not in SAMPLERS:
            raise SamplingError(f"{where}: unknown sampler {value!r}; choose one of {', '.join(SAMPLERS)}")
        problem = missing_sampler_package(name)
        if problem:
            raise SamplingError(f"{where}: {problem}")
        fields["sampler"] = name
    else:  # pragma: no cover - internal
        raise KeyError(field_name)


def _defaults(default_size: int, default_steps: int, default_scale: float) -> dict:
    return dict(negative_prompt=None, width=default_size, height=default_size, seed=None, steps=default_steps,
                scale=default_scale, sampler=None)


def parse_prompt_line(line: str, *, where: str = "<prompt>", default_size: int = 512, default_steps: int = 30,
                      default_scale: float = 7.5) -> SamplePrompt:
    """One sd-scripts prompt line: `prompt text --n negative --w 512 --h 768 --d 42 --s 28 --l 7 --ss euler_a`.
    Options are split on " --" as sd-scripts does (so a prompt must not contain " --"); names are
    case-insensitive. Unknown options are ignored with a warning; a bad value raises SamplingError."""
    line = line.strip()
    if line.startswith("--"):
        line = " " + line  # no prompt text, only options
    pieces = line.split(" --")
    fields = _defaults(default_size, default_steps, default_scale)
    fields["prompt"] = pieces[0].strip()
    for piece in pieces[1:]:
        name, _, value = piece.strip().partition(" ")
        key = name.lower()
        value = value.strip()
        if key in _TXT_OPTIONS:
            if value == "" and key != "n":
                raise SamplingError(f"{where}: option --{name} needs a value")
            _set_field(fields, _TXT_OPTIONS[key], value, f"--{name}", where)
        elif key in _TXT_OTHER_MODEL_OPTIONS:
            logger.warning("%s: option --%s is for other model types in sd-scripts; ignored", where, name)
        else:
            logger.warning("%s: unknown option --%s ignored (known: --n --w --h --d --s --l --ss)", where, piece.strip())
    return SamplePrompt(**fields)


def _prompt_from_dict(entry: dict, where: str, base: dict) -> SamplePrompt:
    fields = dict(base)
    if "prompt" not in entry:
        raise SamplingError(f"{where}: entry has no 'prompt'")
    for key, value in entry.items():
        if key in _DICT_KEYS:
            _set_field(fields, _DICT_KEYS[key], value, f"'{key}'", where)
        elif key not in _DICT_IGNORED:
            logger.warning("%s: unknown key %r ignored (known: %s)", where, key, ", ".join(sorted(_DICT_KEYS)))
    return SamplePrompt(**fields)


def parse_prompt_file(path: Union[str, os.PathLike], *, default_size: int = 512, default_steps: int = 30,
                      default_scale: float = 7.5) -> list[SamplePrompt]:
    """Read an sd-scripts sample prompt file (.txt, .toml or .json; see docs/sampling.md).

    Defaults are sd-scripts' (512x512, 30 steps, CFG 7.5); pass `default_size=1024` for SDXL-sized samples.
    Raises SamplingError naming the file (and line or entry) for a missing file or a bad entry.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".toml", ".json"):
        raise SamplingError(f"{path}: sample prompt files must be .txt, .toml or .json")
    if not os.path.isfile(path):
        raise SamplingError(f"{path}: sample prompt file not found (check --sample_prompts)")
    base = _defaults(default_size, default_steps, default_scale)
    prompts: list[SamplePrompt] = []

    if ext == ".txt":
        for lineno, line in enumerate(read_text(path, "sample prompt file", SamplingError).splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            prompts.append(parse_prompt_line(text, where=f"{path}:{lineno}", default_size=default_size,
                                             default_steps=default_steps, default_scale=default_scale))
    elif ext == ".toml":
        from library.config_util import ConfigError, load_toml

        try:
            data = load_toml(path, "sample prompt file")
        except ConfigError as e:  # file:line:col, the line shown
            raise SamplingError(str(e)) from None
        table = data.get("prompt")
        if not isinstance(table, dict):
            raise SamplingError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
        subsets = table.get("subset")
        if not isinstance(subsets, list) or not subsets:
            raise SamplingError(f"{path}: [prompt] has no [[prompt.subset]] entries")
        defaults = {k: v for k, v in table.items() if k != "subset"}
        for i, subset in enumerate(subsets):
            where = f"{path}: [[prompt.subset]] #{i + 1}"
            if not isinstance(subset, dict):
                raise SamplingError(f"{where}: expected a table")
            prompts.append(_prompt_from_dict({**defaults, **subset}, where, base))  # subset overrides [prompt]
    else:
        try:
            data = json.loads(read_text(path, "sample prompt file", SamplingError))
        except json.JSONDecodeError as e:
            raise SamplingError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise SamplingError(f"{path}: expected a JSON list of prompts (strings or objects)")
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            if isinstance(entry, str):
                prompts.append(parse_prompt_line(entry, where=where, default_size=default_size,
                                                 default_steps=default_steps, default_scale=default_scale))
            elif isinstance(entry, dict):
                prompts.append(_prompt_from_dict(entry, where, base))
            else:
                raise SamplingError(f"{where}: expected a string or an object, got {type(entry).__name__}")
    if not prompts:
        logger.warning("%s: no prompts found", path)
    return prompts


# ----------------------------------------------------------------------------------------------------------
# Samplers

SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


# samplers whose diffusers scheduler needs a package requirements.txt does not install
SAMPLER_PACKAGES = {"lms": "scipy", "k_lms": "scipy"}


def missing_sampler_package(name: str) -> Optional[str]:
    """Why sampler `name` cannot run here (its package is not installed, with the pip command), or None."""
    import importlib.util

    package = SAMPLER_PACKAGES.get(name)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (f"the {name} sampler (diffusers' {_scheduler_class(name).__name__}) needs {package}, which is not "
            f"installed: pip install {package}, or choose another sampler (euler_a and ddim need nothing more)")


def _scheduler_class(name: str):
    import diffusers as d

    table = {
        "ddim": d.DDIMScheduler, "pndm": d.PNDMScheduler,
        "lms": d.LMSDiscreteScheduler, "k_lms": d.LMSDiscreteScheduler,
        "euler": d.EulerDiscreteScheduler, "k_euler": d.EulerDiscreteScheduler,
        "euler_a": d.EulerAncestralDiscreteScheduler, "k_euler_a": d.EulerAncestralDiscreteScheduler,
        "heun": d.HeunDiscreteScheduler,
        "dpm_2": d.KDPM2DiscreteScheduler, "k_dpm_2": d.KDPM2DiscreteScheduler,
        "dpm_2_a": d.KDPM2AncestralDiscreteScheduler, "k_dpm_2_a": d.KDPM2AncestralDiscreteScheduler,
        "dpmsolver": d.DPMSolverMultistepScheduler, "dpmsolver++": d.DPMSolverMultistepScheduler,
        "dpmsingle": d.DPMSolverSinglestepScheduler,
    }
    return table[name]


def make_sampler(name: str, v_parameterization: bool = False, *, clip_sample: bool = False):
    """A diffusers scheduler for an sd-scripts sampler name, on the SD training schedule (scaled_linear
    0.00085..0.012, 1000 steps, steps_offset 1, epsilon or v_prediction).

    `clip_sample=True` reproduces sd-scripts' own sampling, which turns x0 clipping to [-1, 1] on for DDIM after
    building the scheduler; the default (False) matches the SD scheduler config that diffusers/A1111 use.
    """
    key = (name or "ddim").strip().lower()
    if key not in SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r} (--sample_sampler / --ss); choose one of {', '.join(SAMPLERS)}")
    problem = missing_sampler_package(key)
    if problem:
        raise SamplingError(problem)
    cls = _scheduler_class(key)
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        clip_sample=clip_sample, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
    )
    if key in ("dpmsolver", "dpmsolver++"):
        config["algorithm_type"] = key
        if key == "dpmsolver":  # recent diffusers refuse the default final_sigmas_type "zero" for it
            config["final_sigmas_type"] = "sigma_min"
    accepted = inspect.signature(cls.__init__).parameters
    with warnings.catch_warnings():  # algorithm_type "dpmsolver" is deprecated in diffusers; sd-scripts uses it
        warnings.simplefilter("ignore", FutureWarning)
        return cls(**{k: v for k, v in config.items() if k in accepted})


# ----------------------------------------------------------------------------------------------------------
# Generation


@contextlib.contextmanager
def eval_mode(modules: Iterable[torch.nn.Module]):
    """Put modules (and all their children) in eval mode; restore every child's own flag on exit."""
    saved = []
    for m in modules:
        if m is None:
            continue
        saved.extend((sub, sub.training) for sub in m.modules())
        m.eval()
    try:
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def _module_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _build_pipeline(model, scheduler):
    """A diffusers pipeline around the live UNet and VAE. Text encoders are left out: prompt embeddings come
    from `encode_prompts` over the live (LoRA-patched) text encoders, so they may stay on another device."""
    if model.is_sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=model.unet, scheduler=scheduler, add_watermarker=False,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(vae, latents: torch.Tensor):
    """Latents -> list of PIL images (the pipeline's own decode, done here so a VAE in another dtype works)."""
    from PIL import Image

    latents = latents.to(device=_module_device(vae), dtype=vae.dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in image]


SAMPLE_MAX_CHUNKS = 3  # sd-scripts' sampling pipelines: max_embeddings_multiples=3, prompts of up to 225 tokens


def prompt_chunks(model, texts: Sequence[str]) -> int:
    """The 75-token chunks a sample's prompt and negative prompt are encoded in: as many as the longer one needs,
    1 to 3 (sd-scripts' lpw pipelines; the run's --max_token_length does not apply to samples there either)."""
    from library.prompt_weights import token_count

    longest = max(token_count(model.tokenizers[0], t) for t in texts)
    return max(1, min(SAMPLE_MAX_CHUNKS, -(-longest // 75)))


def encode_sample_prompts(model, prompt: str, negative_prompt: str, clip_skip: Optional[int] = None):
    """(positive, negative) conditioning of one sample, read as sd-scripts' sampling pipelines read it: A1111
    attention weights (`(word:1.3)`, `[word]`) with the context's mean kept, both in the chunks the longer needs,
    every chunk with its own BOS and EOS (77 states a chunk, as A1111 and ComfyUI read a long prompt too)."""
    n = prompt_chunks(model, [prompt, negative_prompt])
    length = None if n == 1 else 75 * n
    return tuple(encode_prompts(model, [text], clip_skip=clip_skip, max_token_length=length, weighted=True,
                                keep_mean=True, keep_chunk_ends=True) for text in (prompt, negative_prompt))


def generate_images(model, prompts: Sequence[SamplePrompt], *, device=None, clip_skip: Optional[int] = None,
                    sampler: str = "ddim",
                    v_parameterization: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                    extra_modules: Sequence[torch.nn.Module] = (), clip_sample: bool = False):
    """Generate one image per prompt; returns a list of (PIL image, seed used). See `sample_images`."""
    unet = model.unet
    unet_device = _module_device(unet)
    dev = torch.device(device) if device is not None else unet_device
    if not _same_device(dev, unet_device):
        raise ValueError(f"sampling device {dev} differs from the UNet's device {unet_device}; move the UNet "
                         "(and the LoRA network) there first or pass device=None")
    dev = unet_device
    v = model.v_parameterization if v_parameterization is None else v_parameterization
    for p in prompts:  # fail before touching any state
        make_sampler(p.sampler or sampler, v)
    autocast = (torch.autocast(device_type=dev.type, dtype=dtype)
                if dtype in (torch.float16, torch.bfloat16) and dtype != unet.dtype else contextlib.nullcontext())
    vae = model.vae
    vae_device = _module_device(vae)
    results = []
    with preserved_rng_state(), eval_mode([unet, vae, *model.text_encoders, *extra_modules]), torch.no_grad():
        if not _same_device(vae_device, dev):
            vae.to(dev)
        try:
            pipe = _build_pipeline(model, make_sampler(sampler, v, clip_sample=clip_sample))
            for p in prompts:
                pipe.scheduler = make_sampler(p.sampler or sampler, v, clip_sample=clip_sample)
                seed = p.seed if p.seed is not None else secrets.randbelow(2**31)
                logger.info("sample: %r (negative %r, %dx%d, seed %d, %d steps, scale %s, %s)", p.prompt,
                            p.negative_prompt, p.width, p.height, seed, p.steps, p.scale, p.sampler or sampler)
                pos, neg = encode_sample_prompts(model, p.prompt, p.negative_prompt or "", clip_skip)
                pos, neg = pos.to(dev, unet.dtype), neg.to(dev, unet.dtype)
                kwargs = dict(prompt_embeds=pos.context, negative_prompt_embeds=neg.context)
                if model.is_sdxl:
                    kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
                generator = torch.Generator("cpu").manual_seed(seed)  # same noise on any device
                with autocast:
                    latents = pipe(height=p.height, width=p.width, num_inference_steps=p.steps,
                                   guidance_scale=p.scale, generator=generator, output_type="latent",
                                   **kwargs).images
                    image = _decode(vae, latents)[0]
                results.append((image, seed))
        finally:
            if not _same_device(vae_device, dev):
                vae.to(vae_device)
    return results


def sample_image_path(output_dir: str, output_name: Optional[str], index: int, *, epoch: Optional[int] = None,
                      step: Optional[int] = None, seed: Optional[int] = None, timestamp: Optional[str] = None) -> str:
    """`{output_dir}/sample/{output_name}_{e%06d | %06d}_{index:02d}_{YYYYmmddHHMMSS}[_{seed}].png` (sd-scripts)."""
    ts = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    num = f"e{epoch:06d}" if epoch is not None else f"{step or 0:06d}"
    prefix = f"{output_name}_" if output_name else ""
    suffix = "" if seed is None else f"_{seed}"
    return os.path.join(output_dir, "sample", f"{prefix}{num}_{index:02d}_{ts}{suffix}.png")


def sample_images(model, prompts: Union[Sequence[SamplePrompt], str, os.PathLike], *, output_dir: str,
                  output_name: Optional[str], epoch: Optional[int] = None, step: Optional[int] = None, device=None,
                  clip_skip: Optional[int] = None, sampler: str = "ddim",
                  v_parameterization: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                  extra_modules: Sequence[torch.nn.Module] = (), clip_sample: bool = False) -> list[str]:
    """Sample one image per prompt with the live model and save PNGs; returns their paths.

    `prompts`: SamplePrompt list or a prompt file path. `device`: where the UNet is (None: wherever it is; the
    VAE is moved there for sampling and back). `dtype`: an fp16/bf16 autocast dtype for mixed-precision runs (the
    modules keep their own dtypes). `extra_modules` (e.g. the LoRA network, so its dropout is off) are put in
    eval mode with the UNet, VAE and text encoders; every module's train/eval flag is restored afterwards, as are
    the torch/CUDA/Python/NumPy RNG states. The file name carries `epoch` when given, else `step`; the seed is
    appended only when the prompt fixes one (sd-scripts).
    """
    if isinstance(prompts, (str, os.PathLike)):
        prompts = parse_prompt_file(prompts)
    prompts = list(prompts)
    if not prompts:
        return []
    images = generate_images(model, prompts, device=device, clip_skip=clip_skip, sampler=sampler,
                             v_parameterization=v_parameterization, dtype=dtype, extra_modules=extra_modules,
                             clip_sample=clip_sample)
    import io

    from library.safe_io import atomic_write_bytes

    paths = []
    for index, (p, (image, _seed)) in enumerate(zip(prompts, images)):
        path = sample_image_path(output_dir, output_name, index, epoch=epoch, step=step, seed=p.seed)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue(), overwrite=True)  # a time-stamped name; a kill leaves no half PNG
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Grid


LABEL_FONTS = ("DejaVuSans.ttf", "arial.ttf", "Arial.ttf")  # with Greek and accents, which Pillow's default lacks


def label_font(size: int = 11):
    """A TrueType font from the system (Pillow looks in its font folders) that draws more than ASCII (τ, é), else
    Pillow's default, which draws those as boxes."""
    from PIL import ImageFont

    for name in LABEL_FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def fixed_seed_grid(images_rows, labels: Sequence[str], col_labels: Optional[Sequence[str]] = None, pad: int = 6):
    """A white grid image: one row per model (`labels` drawn on the left), one column per seed (optional
    `col_labels` on top). Cells are the size of the largest image; smaller images are centred."""
    from PIL import Image, ImageDraw

    rows = [list(r) for r in images_rows]
    if len(labels) != len(rows):
        raise ValueError(f"fixed_seed_grid: {len(rows)} rows but {len(labels)} labels")
    if not rows or not any(rows):
        raise ValueError("fixed_seed_grid: no images")
    ncols = max(len(r) for r in rows)
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"fixed_seed_grid: {ncols} columns but {len(col_labels)} column labels")
    cw = max(im.width for r in rows for im in r)
    ch = max(im.height for r in rows for im in r)
    font = label_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text):
        box = measure.textbbox((0, 0), str(text), font=font)
        return box[2] - box[0], box[3] - box[1]

    label_w = max(size(t)[0] for t in labels) + 2 * pad
    header_h = (max(size(t)[1] for t in col_labels) + 2 * pad) if col_labels is not None else 0
    grid = Image.new("RGB", (label_w + ncols * cw, header_h + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y0 = header_h + r * ch
        tw, th = size(labels[r])
        draw.text((pad, y0 + (ch - th) // 2), str(labels[r]), fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (label_w + c * cw + (cw - im.width) // 2, y0 + (ch - im.height) // 2))
    if col_labels is not None:
        for c, text in enumerate(col_labels):
            tw, _ = size(text)
            draw.text((label_w + c * cw + (cw - tw) // 2, pad), str(text), fill="black", font=font)
    return grid


def prior_vs_lora_grid(model, network, prompts: Sequence[SamplePrompt], *, seed: int = 0, multipliers=(0.0, 1.0),
                       upscale_to: int = 0, **generate_kwargs):
    """The fixed-seed comparison a LoRA user wants: one row per LoRA multiplier (0 = the prior model, the base
    model as it was before training), one column per prompt, every row at the same seed per prompt (the prompt's
    own `--d` seed, else `seed + column`). `upscale_to`: enlarge small images (nearest) to this side for viewing.
    `generate_kwargs` go to `generate_images`. Returns a PIL image."""
    from dataclasses import replace

    from PIL import Image

    fixed = [replace(p, seed=p.seed if p.seed is not None else seed + i) for i, p in enumerate(prompts)]
    rows = []
    for m in multipliers:
        with network.multiplier_override(m):
            ims = [im for im, _ in generate_images(model, fixed, extra_modules=[network], **generate_kwargs)]
        if upscale_to:
            ims = [im.resize((upscale_to, upscale_to * im.height // im.width), Image.NEAREST) if im.width < upscale_to
                   else im for im in ims]
        rows.append(ims)
    labels = ["prior (LoRA off)" if m == 0 else f"LoRA x{m:g}" for m in multipliers]
    return fixed_seed_grid(rows, labels, [f"{i + 1}: seed {p.seed}" for i, p in enumerate(fixed)])
