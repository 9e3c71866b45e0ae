"""Load SD1.x / SD2.x / SDXL models: diffusers folders and single-file checkpoints, fully offline.

Everything the trainer needs from a base model is gathered in one `StableDiffusionModel`.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library import ldm_convert
from library.clip_tokenizer import bundled_clip_tokenizer
from library.safe_io import atomic_save_safetensors, check_writable

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


def _warn_once(msg: str, *args) -> None:
    """A warning about the model, once per process: probe_model and load_model both read the same configs."""
    text = msg % args
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning(text)

ARCHS = ("sd1", "sd2", "sdxl")
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
SUPPORTED = ("SD1.x, SD2.x (512 and 768-v) and SDXL base models, as a diffusers folder (model_index.json, unet/, "
             "vae/, text_encoder/ ...) or a single-file .safetensors in the LDM/SGM layout A1111 and ComfyUI use")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
CONFIGS_KEY = "apt_lora.configs"  # safetensors header: the architecture config dict, as JSON
PREDICTION_KEY = "apt_lora.prediction_type"  # safetensors header: "v" or "epsilon"
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
# Pad token per tokenizer slot: CLIP-L pads with EOS; OpenCLIP (SD2, SDXL's second encoder) pads with "!" (id 0).
PAD_TOKENS = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}


class ModelLoadError(Exception):
    """A user-facing model loading error; the message names the file or flag and what to do."""


@dataclass
class StableDiffusionModel:
    """A base model as the trainer sees it. `text_encoders`/`tokenizers` have 1 entry (SD) or 2 (SDXL)."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    v_parameterization: bool
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler
    source: str = ""  # path it was loaded from ("" for in-memory models)
    configs: dict = field(default_factory=dict)  # the architecture config dict it was built from

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def arch_config(arch: str) -> dict:
    """The real architecture's configs (see library/configs/README.md); a deep copy the caller may edit."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    with open(os.path.join(_CONFIG_DIR, f"{arch}.json"), encoding="utf-8") as f:
        return copy.deepcopy(json.load(f))


def make_noise_scheduler(v_parameterization: bool) -> DDPMScheduler:
    """The SD training schedule (sd-scripts: scaled_linear 0.00085..0.012, 1000 steps, no clipping)."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def _text_config(cfg: dict) -> CLIPTextConfig:
    cfg = {k: v for k, v in cfg.items() if k != "architectures"}
    return CLIPTextConfig(**cfg)


def build_from_config(configs: dict, tokenizers: list, v_parameterization: bool = False) -> StableDiffusionModel:
    """Instantiate randomly initialised modules from an architecture config dict (weights loaded later).

    Call under `torch.device("meta")` to get a weightless model (used for key checks on full-size models).
    """
    arch = configs["arch"]
    unet = UNet2DConditionModel.from_config({k: v for k, v in configs["unet"].items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    text_encoders = [CLIPTextModel(_text_config(configs["text_encoder"]))]
    if arch == "sdxl":
        text_encoders.append(CLIPTextModelWithProjection(_text_config(configs["text_encoder_2"])))
    return StableDiffusionModel(
        arch=arch,
        v_parameterization=v_parameterization,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=make_noise_scheduler(v_parameterization),
        configs=configs,
    )


# ------------------------------------------------------------------------------------------------ detection
def _error_with_keys(name: str, keys, why: str) -> ModelLoadError:
    sample = ", ".join(sorted(keys)[:5]) or "(none)"
    return ModelLoadError(f"{name}: {why}. Supported: {SUPPORTED}. First keys in the file: {sample}")


def detect_arch(shapes: dict, path: str | None = None) -> str:
    """Return "sd1" | "sd2" | "sdxl" from a single-file checkpoint's keys (and shapes where keys are not enough).

    `shapes` maps each key to its tensor's shape: the header alone is enough, no weight needs reading. Anything
    else (SDXL refiner, inpainting, SD3, Flux, a LoRA, an unrelated file) raises ModelLoadError."""
    name = path or "the checkpoint"
    keys = list(shapes.keys())

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if not keys:
        raise ModelLoadError(f"{name} contains no tensors. Supported: {SUPPORTED}.")
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise _error_with_keys(name, keys, "this is a LoRA / network file, not a base model; pass it to the "
                                           "LoRA options (e.g. --network_weights) and give the base model here")
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        raise _error_with_keys(name, keys, "this looks like an SD3 model, which is not supported")
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        raise _error_with_keys(name, keys, "this looks like a Flux model, which is not supported")
    if not has(ldm_convert.UNET_PREFIX + "input_blocks."):
        if has("down_blocks.") or has("conv_in."):
            raise _error_with_keys(name, keys, "this is a single diffusers component (e.g. a unet/ weights file); "
                                               "pass the whole diffusers model folder instead")
        raise _error_with_keys(name, keys, "no Stable Diffusion UNet (model.diffusion_model.input_blocks.*) found")
    conv_in = shapes.get(ldm_convert.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise _error_with_keys(name, keys, f"the UNet takes {conv_in[1]} input channels (inpainting, "
                                           "instruct-pix2pix or upscaler model); only 4-channel base models are supported")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise _error_with_keys(name, keys, "this looks like the SDXL refiner, which is not supported")
    if has("conditioner."):
        raise _error_with_keys(name, keys, "unknown SGM text-conditioning layout")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    # no text encoder in the file: fall back to the UNet's shapes
    if has(ldm_convert.UNET_PREFIX + "label_emb."):
        return "sdxl"
    ctx = {shape[-1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight")}
    for dim, arch in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl")):
        if ctx == {dim}:
            return arch
    raise _error_with_keys(name, keys, "cannot tell SD1/SD2/SDXL apart: no text encoder and an unknown context size")


def _check_flags(arch: str, v2, sdxl, path: str, how: str) -> None:
    """--v2 / --sdxl as in sd-scripts: None = auto-detect; True/False must agree with the file."""
    what = f"{path} is an {ARCH_NAMES[arch]} model ({how})"
    if sdxl is True and arch != "sdxl":
        raise ModelLoadError(f"--sdxl was given, but {what}. Remove --sdxl, or pass an SDXL base model.")
    if sdxl is False and arch == "sdxl":
        raise ModelLoadError(f"{what}, but sdxl=False was requested. Pass --sdxl, or leave it unset to auto-detect.")
    if v2 is True and arch != "sd2":
        raise ModelLoadError(f"--v2 was given, but {what}; --v2 is only for SD2.x models. Remove --v2.")
    if v2 is False and arch == "sd2":
        raise ModelLoadError(f"{what}, but v2=False was requested. Pass --v2, or leave it unset to auto-detect.")


# ------------------------------------------------------------------------------------------------ file reading
def _checked_ext(path: str, allow_pickle: bool, what: str) -> str:
    """The checkpoint's extension, once the file is known to exist and to be of a type that may be read."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{what} not found: {path}. Loading is offline: give a local diffusers folder or a "
                             ".safetensors file (hub model ids are not downloaded; one already in the local Hugging "
                             "Face cache is used).")
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_EXTS and not allow_pickle:
        raise ModelLoadError(f"{path} is a pickle checkpoint ({ext}). Pickle files can run code when loaded, so "
                             "they are refused: convert it to .safetensors, or pass --allow_pickle_checkpoint to "
                             "load it with torch.load(weights_only=True).")
    if ext != ".safetensors" and ext not in PICKLE_EXTS:
        raise ModelLoadError(f"{path}: unsupported model file type {ext!r}. Supported: {SUPPORTED}.")
    return ext


def _unreadable(what: str, path: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot read {what} {path} as safetensors ({e}). The file is truncated, corrupt or not a "
                          "safetensors file: download or convert it again.")


def read_state_dict(path: str, allow_pickle: bool = False, what: str = "model") -> tuple[dict, dict]:
    """(tensors, safetensors header metadata) of a checkpoint file. Pickles only with `allow_pickle`."""
    if _checked_ext(path, allow_pickle, what) == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(path, device="cpu"), metadata
        except Exception as e:  # SafetensorError, OSError: truncated or not a safetensors file
            raise _unreadable(what, path, e) from e
    try:  # mapped, not read into memory (SD1.5 .ckpt: 3.9 -> 2.4 GiB private), where the file allows it: a zip
        try:  # archive, as torch.save writes since torch 1.6; older files are read whole
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load {path} with torch.load(weights_only=True) ({e}). The file is corrupt "
                             "or holds non-tensor objects: convert it to .safetensors with a tool you trust.") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (got {type(obj).__name__}).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def _read_shapes(path: str, allow_pickle: bool) -> tuple[dict, dict]:
    """({key: shape}, header metadata) of a checkpoint, from the safetensors header alone (a pickle is loaded)."""
    if _checked_ext(path, allow_pickle, "model") != ".safetensors":
        sd, metadata = read_state_dict(path, allow_pickle)
        return {k: tuple(v.shape) for k, v in sd.items()}, metadata
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise _unreadable("model", path, e) from e


def _read_tensor(path: str, key: str):
    """One tensor of a safetensors checkpoint, without reading the rest (None for a pickle: not loaded twice)."""
    if not path.lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


_EDM_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max")  # ComfyUI's markers: Playground v2.5, CosXL (EDM)


# ComfyUI's guess for SD2 files that do not say (model_detection.py): the spread of this norm's bias
_SD2_V_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_STD = 0.09


def _sd2_guess(read_tensor) -> str:
    """What ComfyUI's test says of an SD2 file's prediction type ("" when the tensor is not there), for the warning
    only: a guess cannot be overridden back to epsilon, so the flag stays the user's."""
    tensor = read_tensor(_SD2_V_KEY) if read_tensor is not None else None
    if tensor is None:
        return ""
    std = float(tensor.float().std(unbiased=False))
    if std > _SD2_V_STD:
        return (f" Its weights look like a 768-v model's: ComfyUI's test (the spread of output_blocks.11's first "
                f"norm bias, {std:.3f} > {_SD2_V_STD}) loads it as v-prediction, so train it with "
                f"--v_parameterization.")
    return f" Its weights look like an epsilon model's (ComfyUI's test: {std:.3f} <= {_SD2_V_STD})."


def _file_arch(shapes: dict, metadata: dict, path: str, v2, v_param, sdxl, read_tensor=None) -> tuple[str, bool]:
    """(arch, v-prediction) of a single-file checkpoint; --v2/--sdxl checked against what the keys say.

    The prediction type, without --v_parameterization: our header key, `modelspec.prediction_type`, ComfyUI's
    `modelspec.predict_key`, or ComfyUI's empty `v_pred` tensor (NoobAI-style v-prediction SDXL files and ComfyUI
    saves carry it; ComfyUI reads it too). An EDM model (ComfyUI's `edm_*` keys) is refused: its noise schedule is not
    the DDPM one trained here. `read_tensor(key)` (a tensor or None) lets the SD2 warning say what the weights
    look like."""
    arch = detect_arch(shapes, path)
    edm = [k for k in _EDM_KEYS if k in shapes]
    if edm:
        raise ModelLoadError(f"{path} is an EDM model ({edm[0]} key: Playground v2.5, CosXL or similar), whose noise "
                             f"schedule is not the DDPM one this trainer uses; only DDPM (epsilon or v-prediction) "
                             f"SD1.x/SD2.x/SDXL models are supported")
    _check_flags(arch, v2, sdxl, path, "detected from the checkpoint's keys")
    if v_param is None:
        declared = next((metadata[k] for k in (PREDICTION_KEY, "modelspec.prediction_type", "modelspec.predict_key")
                         if metadata.get(k)), None)  # the first that says, ours first
        v_param = declared == "v" if declared is not None else "v_pred" in shapes
        if arch == "sd2" and not v_param:
            _warn_once("%s: SD2 single files do not say whether they are v-prediction (768-v) models; using "
                       "epsilon. Pass --v_parameterization for 768-v models.%s", path, _sd2_guess(read_tensor))
    return arch, bool(v_param)


def _finish(module, dtype=torch.float32):
    """Every loaded module: CPU, `dtype` (fp32 unless the caller asks for its training dtype), eval, frozen."""
    module.to(device="cpu")
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def _assign(module, sd: dict, what: str, path: str, dtype=torch.float32):
    """Load converted weights into a module built on the meta device; mismatches become a ModelLoadError."""
    expected = module.state_dict()
    fixed, bad = {}, []
    for k, v in sd.items():
        if k not in expected:
            continue
        want = expected[k].shape
        if v.shape != want and [n for n in v.shape if n != 1] == [n for n in want if n != 1]:
            v = v.reshape(want)  # Conv2d 1x1 <-> Linear (proj_in/out, VAE attention); never a transpose
        if v.shape != want:
            bad.append(f"{k}: file {tuple(v.shape)} vs model {tuple(want)}")
        fixed[k] = v.to(dtype).contiguous() if v.is_floating_point() else v
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected or bad:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(bad)} of another shape (e.g. {bad[:2]})" if bad else ""]
        raise ModelLoadError(f"{path}: the {what} weights do not fit the architecture config: "
                             + "; ".join(p for p in parts if p)
                             + ". The file is damaged, or not a standard-size base model of this architecture "
                             "(non-standard sizes load from a diffusers folder, which carries its configs).")
    module.load_state_dict(fixed, strict=True, assign=True)
    return _finish(module, dtype)


def _empty_model(configs: dict, v_parameterization: bool) -> StableDiffusionModel:
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta: no random init of ~1-3 G weights
        return build_from_config(configs, [], v_parameterization)


def _configs_from_header(metadata: dict, arch: str, path: str) -> dict | None:
    """The architecture configs that save_single_file stores in the header (non-standard sizes), if valid."""
    raw = metadata.get(CONFIGS_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("%s: ignoring unreadable %s metadata", path, CONFIGS_KEY)
        return None
    need = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    if not isinstance(cfg, dict) or cfg.get("arch") != arch or any(k not in cfg for k in need):
        logger.warning("%s: ignoring %s metadata that does not describe an %s model", path, CONFIGS_KEY, arch)
        return None
    return cfg


# ------------------------------------------------------------------------------------------------ loading
def load_model(path, *, v2=None, v_parameterization=None, sdxl=None, tokenizer_path=None, vae_path=None,
               allow_pickle=False, dtype=torch.float32, vae_dtype=None) -> StableDiffusionModel:
    """Load a base model from a diffusers folder or a single-file checkpoint, offline, on CPU (frozen), in `dtype`
    (fp32 unless given; `vae_dtype`: the VAE's, default `dtype`). The trainer passes the dtypes it trains in, so no
    fp32 copy of the whole model is ever held (SDXL from an fp16 file: 13.6 -> 7.1 GiB of private memory in bf16;
    in fp16 the weights stay the file's mapped pages); the values equal a load in fp32 cast afterwards.

    `v2`/`sdxl`: None = detect; True/False must agree with the file. `v_parameterization`: None = the folder's
    scheduler config, or for a single file its header (else epsilon; SD2 768-v single files need True)."""
    path = local_model_path(os.fspath(path))
    if tokenizer_path is not None and not os.path.isdir(tokenizer_path):
        raise ModelLoadError(f"--tokenizer_path {tokenizer_path} is not a folder. Give a folder with tokenizer files "
                             "(tokenizer.json, or vocab.json + merges.txt), or with tokenizer/ and tokenizer_2/.")
    if os.path.isdir(path):
        model = _load_folder(path, v2, v_parameterization, sdxl, tokenizer_path, allow_pickle, vae_path is not None,
                             dtype, vae_dtype)
    else:
        model = _load_single_file(path, v2, v_parameterization, sdxl, tokenizer_path, vae_path is not None,
                                  allow_pickle, dtype, vae_dtype)
    if vae_path is not None:
        model.vae = _replacement_vae(load_vae(vae_path, model.configs["vae"], allow_pickle, vae_dtype or dtype),
                                     vae_path, model)
        model.configs = model_configs(model)
    model.source = path
    return model


def local_model_path(path: str) -> str:
    """A Hugging Face cache entry as the model folder it holds: `models--org--name/` (the snapshot its refs/main
    names, else its only one), its `snapshots/` (the only one), or a hub id `org/name` that is in the local cache
    (`snapshot_download(local_files_only=True)`: never a download). Anything else is returned as given."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        snapshots = path if os.path.basename(os.path.normpath(path)) == "snapshots" else os.path.join(path, "snapshots")
        if os.path.isdir(snapshots):
            ref = os.path.join(os.path.dirname(os.path.normpath(snapshots)), "refs", "main")
            named = None
            if os.path.isfile(ref):
                with open(ref, encoding="utf-8") as f:
                    named = f.read().strip()
            subs = sorted(os.listdir(snapshots))
            pick = named if named in subs else subs[0] if len(subs) == 1 else None
            if pick is not None:
                logger.info("%s: a Hugging Face cache entry; loading its snapshot %s", path, pick)
                return os.path.join(snapshots, pick)
        return path
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        try:
            from huggingface_hub import snapshot_download

            found = snapshot_download(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub): "not found" says what to do
            return path
        logger.info("%s: loading it from the local Hugging Face cache, %s", path, found)
        return found
    return path


def probe_model(path, *, v2=None, v_parameterization=None, sdxl=None, allow_pickle=False,
                zero_terminal_snr=False) -> tuple[str, bool]:
    """(arch, v-prediction) of the model `load_model` would load, from the file's header or the folder's configs:
    no weights are read (but for a pickle checkpoint, which has no header and is loaded whole), so a run can check
    its dataset (and --debug_dataset can run) before the multi-GB load. A single file marked as trained with zero
    terminal SNR (ComfyUI's `ztsnr` key) gets a warning naming --zero_terminal_snr unless it is given.
    Raises the same ModelLoadError as load_model for a missing, refused or unsupported model."""
    path = local_model_path(os.fspath(path))
    if os.path.isdir(path):
        arch_v = _folder_arch(path, v2, v_parameterization, sdxl)
        if _component_config(path, os.path.join("scheduler", "scheduler_config.json")).get("rescale_betas_zero_snr") \
                and not zero_terminal_snr:
            logger.warning("%s: its scheduler config says rescale_betas_zero_snr (trained with zero terminal SNR): "
                           "pass --zero_terminal_snr to train it the same way", path)
        return arch_v
    shapes, metadata = _read_shapes(path, allow_pickle)
    arch_v = _file_arch(shapes, metadata, path, v2, v_parameterization, sdxl,
                        read_tensor=lambda key: _read_tensor(path, key) if key in shapes else None)
    if "ztsnr" in shapes and not zero_terminal_snr:
        logger.warning("%s is marked as trained with zero terminal SNR (its ztsnr key): pass --zero_terminal_snr to "
                       "train it the same way", path)
    return arch_v


def _drop(sd: dict, prefix) -> None:
    """Forget the file's tensors under `prefix` once converted: with a copying reader (safetensors < 0.7, pread,
    pickles) or a cast, this frees them before the next component is built."""
    for k in [k for k in sd if k.startswith(prefix)]:
        del sd[k]


def _load_single_file(path, v2, v_param, sdxl, tokenizer_path, external_vae, allow_pickle, dtype=torch.float32,
                      vae_dtype=None) -> StableDiffusionModel:
    sd, metadata = read_state_dict(path, allow_pickle)
    arch, v_param = _file_arch({k: tuple(v.shape) for k, v in sd.items()}, metadata, path, v2, v_param, sdxl,
                               read_tensor=sd.get)
    configs = _configs_from_header(metadata, arch, path) or arch_config(arch)
    model = _empty_model(configs, v_param)
    model.unet = _assign(model.unet, ldm_convert.unet_to_diffusers(sd, configs["unet"]), "UNet", path, dtype)
    _drop(sd, ldm_convert.UNET_PREFIX)
    if not external_vae:
        if not any(k.startswith(ldm_convert.VAE_PREFIX) for k in sd):
            raise ModelLoadError(f"{path} has no VAE (first_stage_model.* keys). Pass a VAE with --vae.")
        model.vae = _assign(model.vae, ldm_convert.vae_to_diffusers(sd, configs["vae"]), "VAE", path, vae_dtype or dtype)
        _drop(sd, ldm_convert.VAE_PREFIX)
    for i, (prefix, kind) in enumerate(ldm_convert.TE_PREFIXES[arch]):
        if not any(k.startswith(prefix) for k in sd):
            raise ModelLoadError(f"{path} has no text encoder {i + 1} ({prefix}* keys); a complete base model "
                                 "checkpoint is needed.")
        te = model.text_encoders[i]
        model.text_encoders[i] = _assign(te, ldm_convert.text_encoder_to_diffusers(sd, prefix, kind, te),
                                         f"text encoder {i + 1}", path, dtype)
        _drop(sd, prefix)
    model.tokenizers = _load_tokenizers(arch, None, tokenizer_path)
    return model


# weight files of a component folder: model.safetensors, model.fp16.safetensors, sharded model-00001-of-00002
# .safetensors with its model.safetensors.index.json; sharded variants as diffusers and transformers write them
# (model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json) or as older versions did
# (model-00001-of-00002.fp16.safetensors)
_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(\w+))?(?:-\d+-of-\d+)?(?:\.(\w+))?"
                      r"\.(safetensors|bin)(?:\.index(?:\.(\w+))?\.json)?$")


def _weights_kwargs(folder: str, allow_pickle: bool) -> dict:
    """from_pretrained kwargs for a component folder: safetensors first; the plain weights, else the fp16
    variant, else the first other variant by name (not the directory's order); pickles only if allowed."""
    names = sorted(os.listdir(folder))
    found = {(a or b or c, ext) for a, b, ext, c in (m.groups() for m in map(_WEIGHTS.match, names) if m)}
    for variant, ext in sorted(found, key=lambda g: (g[1] != "safetensors", g[0] is not None, g[0] != "fp16",
                                                     g[0] or "")):
        if ext == "safetensors":
            if not allow_pickle:
                _check_index_shards(folder, [n for n in names if re.search(r"\.safetensors\.index(\.\w+)?\.json$", n)])
            others = sorted({v for v, e in found if e == "safetensors" and v != variant and v is not None})
            if variant is not None and others:
                logger.info("%s: loading the %s weights (also there: %s)", folder, variant, ", ".join(others))
            return {"use_safetensors": True, "variant": variant}
        if allow_pickle:
            return {"use_safetensors": False, "variant": variant}
        raise ModelLoadError(f"{folder} holds only pickle weights (.bin). Pickle files can run code when loaded, so "
                             "they are refused: convert the model to safetensors, or pass --allow_pickle_checkpoint.")
    raise ModelLoadError(f"{folder} holds no model weights (model.safetensors, diffusion_pytorch_model"
                         f".safetensors, their fp16 variants or shards){_listing(names)}.")


def _listing(names: list[str]) -> str:
    return f"; it holds: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}" if names else "; it is empty"


def _check_index_shards(folder: str, indexes: list[str]) -> None:
    """A `*.safetensors.index.json` names its shard files, which diffusers and transformers load whatever their kind:
    a shard that is not safetensors (a pickle) needs --allow_pickle_checkpoint like any other."""
    import json

    for name in indexes:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                shards = set(json.load(f).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{os.path.join(folder, name)} cannot be read ({e}); the model folder is damaged") from None
        pickles = sorted(s for s in shards if not str(s).endswith(".safetensors"))
        if pickles:
            raise ModelLoadError(f"{os.path.join(folder, name)} names shard files that are not safetensors ({pickles[0]}). "
                                 "Pickle files can run code when loaded, so they are refused: convert the model to "
                                 "safetensors, or pass --allow_pickle_checkpoint.")


def _dtype_keyword(cls) -> str:
    """from_pretrained's dtype keyword: `torch_dtype` in diffusers and in transformers before 4.56, which knows no
    `dtype`; `dtype` in later transformers, which warn on the old name."""
    if issubclass(cls, (UNet2DConditionModel, AutoencoderKL)):
        return "torch_dtype"
    import transformers

    major, minor = (int(re.match(r"\d+", p).group()) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _from_pretrained(cls, folder: str, allow_pickle: bool, dtype=torch.float32):
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelLoadError(f"{folder}/config.json is missing: the diffusers model folder is incomplete.")
    kwargs = _weights_kwargs(folder, allow_pickle)
    kwargs[_dtype_keyword(cls)] = dtype
    try:
        return _finish(cls.from_pretrained(folder, local_files_only=True, **kwargs), dtype)
    except Exception as e:
        raise ModelLoadError(f"cannot load {cls.__name__} from {folder}: {e}") from e


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path}: a JSON object is expected, not {type(data).__name__}")
    return data


def _component_config(path: str, name: str) -> dict:
    """`<path>/<name>` as a dict ({} when the file is not there)."""
    file = os.path.join(path, name)
    return _read_json(file) if os.path.isfile(file) else {}


def _folder_arch(path, v2, v_param, sdxl) -> tuple[str, bool]:
    """(arch, v-prediction) of a diffusers folder, from its configs; --v2/--sdxl checked against them. The
    prediction type: --v_parameterization, else the scheduler config's (epsilon without one, with a warning for
    SD2). EDM folders (Playground v2.5: an EDM scheduler, a VAE with latents_mean) are refused as EDM single files
    are; so are Flux/SD3 folders (a transformer/, no unet/), by name."""
    if not os.path.isfile(os.path.join(path, "unet", "config.json")):
        pipeline = _component_config(path, "model_index.json").get("_class_name")
        transformer = os.path.isdir(os.path.join(path, "transformer"))  # Flux, SD3, PixArt ...
        what = (f" It is a {pipeline or 'transformer-based'} model folder, not an SD1.x/SD2.x/SDXL one. Supported: "
                f"{SUPPORTED}." if pipeline or transformer else
                " Give the folder that holds model_index.json, unet/, vae/ and text_encoder/, or a single-file "
                "checkpoint.")
        raise ModelLoadError(f"{path} is not a diffusers model folder of a supported kind (no unet/config.json).{what}")
    sched = _component_config(path, os.path.join("scheduler", "scheduler_config.json"))
    vae_cfg = _component_config(path, os.path.join("vae", "config.json"))
    edm = (f"scheduler {sched['_class_name']}" if str(sched.get("_class_name", "")).startswith("EDM") else
           "sigma_data in its scheduler config" if "sigma_data" in sched else
           "latents_mean in vae/config.json" if vae_cfg.get("latents_mean") is not None else None)
    if edm:
        raise ModelLoadError(f"{path} is an EDM model ({edm}: Playground v2.5 or similar), whose noise schedule is "
                             f"not the DDPM one this trainer uses; only DDPM (epsilon or v-prediction) "
                             f"SD1.x/SD2.x/SDXL models are supported")
    prediction = sched.get("prediction_type")
    if prediction not in (None, "epsilon", "v_prediction"):
        raise ModelLoadError(f"{path}/scheduler/scheduler_config.json: prediction_type {prediction!r} is not "
                             f"supported (epsilon or v_prediction)")
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"))
    te_cfg_path = os.path.join(path, "text_encoder", "config.json")
    te_cfg = _read_json(te_cfg_path) if os.path.isfile(te_cfg_path) else {}
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(f"{path}: the UNet takes {unet_cfg.get('in_channels')} input channels (inpainting, "
                             f"instruct-pix2pix or upscaler model). Supported: {SUPPORTED}.")
    if not te_cfg and os.path.isdir(os.path.join(path, "text_encoder_2")):
        raise ModelLoadError(f"{path} looks like the SDXL refiner (text_encoder_2/ only), which is not supported. "
                             f"Supported: {SUPPORTED}.")
    if os.path.isdir(os.path.join(path, "text_encoder_2")) or unet_cfg.get("addition_embed_type") == "text_time":
        arch = "sdxl"
    elif unet_cfg.get("cross_attention_dim") == 1024 or te_cfg.get("hidden_act") == "gelu":
        arch = "sd2"  # OpenCLIP-H uses gelu, CLIP-L quick_gelu (also tells tiny SD2 models apart)
    else:
        arch = "sd1"
    _check_flags(arch, v2, sdxl, path, "detected from its unet/text_encoder configs")
    if v_param is None:
        v_param = prediction == "v_prediction"
        if arch == "sd2" and prediction is None:
            _warn_once("%s has no scheduler/scheduler_config.json to say whether it is a v-prediction (768-v) "
                       "model; using epsilon. Pass --v_parameterization for 768-v models.", path)
    elif v_param and prediction == "epsilon":
        _warn_once("--v_parameterization: %s/scheduler/scheduler_config.json says prediction_type epsilon; "
                   "training as v-prediction as asked (an SD2 512 base model is epsilon: drop the flag for it)", path)
    return arch, bool(v_param)


def _folder_vae(path: str, arch: str, allow_pickle: bool, load: bool, dtype=torch.float32) -> AutoencoderKL:
    """The folder's VAE; with `load` False (a --vae replaces it) only its architecture, without weights, from
    vae/config.json or the architecture's (a folder without vae/ works with --vae). A config without
    scaling_factor gets the architecture's (SDXL 0.13025), not diffusers' default 0.18215."""
    cfg = _component_config(path, os.path.join("vae", "config.json"))
    if load:
        vae = _from_pretrained(AutoencoderKL, os.path.join(path, "vae"), allow_pickle, dtype)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            vae = AutoencoderKL.from_config({k: v for k, v in (cfg or arch_config(arch)["vae"]).items()
                                             if not k.startswith("_")})
    if "scaling_factor" not in cfg:
        vae.register_to_config(scaling_factor=arch_config(arch)["vae"]["scaling_factor"])
    return vae


def _load_folder(path, v2, v_param, sdxl, tokenizer_path, allow_pickle, external_vae=False, dtype=torch.float32,
                 vae_dtype=None) -> StableDiffusionModel:
    arch, v_param = _folder_arch(path, v2, v_param, sdxl)
    te_classes = [CLIPTextModel] + ([CLIPTextModelWithProjection] if arch == "sdxl" else [])
    vae = _folder_vae(path, arch, allow_pickle, not external_vae, vae_dtype or dtype)
    model = StableDiffusionModel(
        arch=arch,
        v_parameterization=bool(v_param),
        unet=_from_pretrained(UNet2DConditionModel, os.path.join(path, "unet"), allow_pickle, dtype),
        vae=vae,
        text_encoders=[_from_pretrained(cls, os.path.join(path, sub), allow_pickle, dtype)
                       for cls, sub in zip(te_classes, ["text_encoder", "text_encoder_2"])],
        tokenizers=_load_tokenizers(arch, path, tokenizer_path),
        noise_scheduler=make_noise_scheduler(bool(v_param)),
    )
    model.configs = model_configs(model)
    return model


def _replacement_vae(vae: AutoencoderKL, vae_path: str, model: StableDiffusionModel) -> AutoencoderKL:
    """A --vae checked against the model: latents of the UNet's channels (a Flux/SD3 VAE has 16: a raw shape error
    at the first step before), no EDM-style latent statistics; it keeps the model's latent scale, as sd-scripts
    (one factor per architecture: 0.18215, SDXL 0.13025), where a VAE folder's own config brought its own."""
    channels, wanted = vae.config.latent_channels, model.unet.config.in_channels
    if channels != wanted:
        raise ModelLoadError(f"--vae {vae_path}: its latents have {channels} channels and this {model.arch} UNet takes "
                             f"{wanted}: it is not an SD1.x/SD2.x/SDXL VAE (Flux and SD3 VAEs have 16). Give the "
                             f"VAE of the model's family, or leave --vae out.")
    if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "shift_factor", None):
        raise ModelLoadError(f"--vae {vae_path}: its config has latents_mean/shift_factor (an EDM or SD3-style VAE): "
                             f"not an SD1.x/SD2.x/SDXL VAE")
    scale = model.latent_scale
    if float(vae.config.scaling_factor) != scale:
        if "scaling_factor" in _component_config(_vae_folder(vae_path), "config.json"):  # else diffusers' default
            logger.warning("--vae %s: its config's scaling_factor %g is not this %s model's %g; latents are scaled by "
                           "the model's, as sd-scripts does", vae_path, vae.config.scaling_factor, model.arch, scale)
        vae.register_to_config(scaling_factor=scale)
    return vae


def _vae_folder(vae_path: str) -> str:
    """The folder a --vae folder names: itself when it holds the VAE's config.json, else a model folder's vae/."""
    return vae_path if os.path.isfile(os.path.join(vae_path, "config.json")) else os.path.join(vae_path, "vae")


def load_vae(vae_path: str, vae_config: dict, allow_pickle: bool = False, dtype=torch.float32) -> AutoencoderKL:
    """A replacement VAE: diffusers folder (or a model folder's vae/), or a single file (LDM keys with or without
    `first_stage_model.`, or diffusers keys). A single file gets `vae_config` (the model's VAE architecture)."""
    vae_path = os.fspath(vae_path)
    if os.path.isdir(vae_path):
        sub = _vae_folder(vae_path)
        kind = _component_config(sub, "config.json").get("_class_name", "AutoencoderKL")
        if kind != "AutoencoderKL":
            raise ModelLoadError(f"--vae {vae_path}: {os.path.join(sub, 'config.json')} is a {kind}, not a VAE "
                                 f"(AutoencoderKL). Give a VAE folder, a model folder (its vae/ is used) or a VAE file.")
        return _from_pretrained(AutoencoderKL, sub, allow_pickle, dtype)
    sd, _ = read_state_dict(vae_path, allow_pickle, what="VAE")
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    try:
        converted = ldm_convert.vae_to_diffusers(sd, vae_config)
    except Exception as e:
        raise ModelLoadError(f"--vae {vae_path}: not an SD VAE checkpoint ({e}).") from e
    return _assign(vae, converted, "VAE", vae_path, dtype)


# ------------------------------------------------------------------------------------------------ tokenizers
def _has_tokenizer(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "tokenizer.json")) or (
        os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")))


def _load_tokenizers(arch: str, model_dir: str | None, tokenizer_path: str | None) -> list:
    """One tokenizer per text encoder: the model folder's, else --tokenizer_path's, else the bundled CLIP BPE.

    A --tokenizer_path tokenizer gets the pad token of the slot's encoder, whichever folder it came from (an SD1
    model's tokenizer/ for an SD2 model pads with "!"), since that is a property of the model, not of the
    vocabulary; a model folder's own tokenizers keep theirs."""
    subs = ["tokenizer", "tokenizer_2"][: len(PAD_TOKENS[arch])]
    out = []
    for sub, pad in zip(subs, PAD_TOKENS[arch]):
        cands = [(os.path.join(model_dir, sub), None)] if model_dir else []
        if tokenizer_path:
            folders = [os.path.join(tokenizer_path, sub), os.path.join(tokenizer_path, "tokenizer"), tokenizer_path]
            cands += [(d, pad) for d in dict.fromkeys(folders)]  # (tokenizer/ twice for the first slot)
        found = next(((d, p) for d, p in cands if _has_tokenizer(d)), None)
        if found is None:
            if tokenizer_path:
                raise ModelLoadError(f"--tokenizer_path {tokenizer_path}: no tokenizer files (tokenizer.json, or "
                                     f"vocab.json + merges.txt) in it or in its {sub}/ subfolder.")
            out.append(bundled_clip_tokenizer(pad_token=pad))
            continue
        d, p = found
        try:
            tok = CLIPTokenizer.from_pretrained(d, local_files_only=True, **({"pad_token": p} if p else {}))
        except Exception as e:
            raise ModelLoadError(f"cannot load the CLIP tokenizer from {d}: {e}") from e
        if tok.model_max_length > 77:  # some folders omit it; SD prompts are 77-token windows
            tok.model_max_length = 77
        out.append(tok)
    return out


# ------------------------------------------------------------------------------------------------ saving
def model_configs(model: StableDiffusionModel) -> dict:
    """The architecture config dict (layout of library/configs/*.json) of the model's actual modules."""
    ref = arch_config(model.arch)

    def diffusers_cfg(m, cls_name):
        return {"_class_name": cls_name, **{k: v for k, v in m.config.items() if not k.startswith("_")}}

    def te_cfg(te, ref_te):
        return {"architectures": [type(te).__name__],
                **{k: getattr(te.config, k) for k in ref_te if k != "architectures"}}

    cfg = {"arch": model.arch, "unet": diffusers_cfg(model.unet, "UNet2DConditionModel"),
           "vae": diffusers_cfg(model.vae, "AutoencoderKL")}
    for i, name in enumerate(["text_encoder", "text_encoder_2"][: len(model.text_encoders)]):
        cfg[name] = te_cfg(model.text_encoders[i], ref[name])
    cfg["scheduler"] = dict(ref["scheduler"], prediction_type="v_prediction" if model.v_parameterization else "epsilon")
    return json.loads(json.dumps(cfg))  # plain lists/dicts only


def _umask_mode(mode: int) -> int:
    """The permissions a plain open()/mkdir would give; mkstemp/mkdtemp create private (0600/0700) entries."""
    um = os.umask(0)
    os.umask(um)
    return mode & ~um


def _refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")


def save_single_file(model: StableDiffusionModel, path, dtype=None, overwrite: bool = False) -> str:
    """Write the model as one .safetensors in the LDM (SD1/SD2) / SGM (SDXL) layout that A1111 and ComfyUI load.

    The header carries the architecture configs (so non-standard sizes load back) and the prediction type.
    The write is atomic (library.safe_io); an existing file is refused unless `overwrite`."""
    path = os.fspath(path)
    check_writable(path, overwrite)  # fail before the (long) conversion
    configs = model_configs(model)
    sd = ldm_convert.to_ldm(model.arch, model.unet.state_dict(), model.vae.state_dict(),
                            [te.state_dict() for te in model.text_encoders], configs)
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    if model.v_parameterization:  # ComfyUI's marker, which it reads (our header key is ours alone)
        out["v_pred"] = torch.tensor([])
    metadata = {"format": "pt", CONFIGS_KEY: json.dumps(configs),
                PREDICTION_KEY: "v" if model.v_parameterization else "epsilon"}
    atomic_save_safetensors(out, path, metadata, overwrite=overwrite)
    return path


def _model_index(model: StableDiffusionModel) -> dict:
    import diffusers

    idx = {"_class_name": "StableDiffusionXLPipeline" if model.is_sdxl else "StableDiffusionPipeline",
           "_diffusers_version": diffusers.__version__,
           "scheduler": ["diffusers", type(model.noise_scheduler).__name__],
           "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if model.is_sdxl:
        idx.update(force_zeros_for_empty_prompt=True,
                   text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                   tokenizer_2=["transformers", "CLIPTokenizer"])
    else:
        idx.update(requires_safety_checker=False,
                   safety_checker=[None, None], feature_extractor=[None, None])
    return idx


def save_diffusers(model: StableDiffusionModel, folder, overwrite: bool = False) -> str:
    """Write a diffusers model folder that load_model and diffusers' pipelines read (local_files_only).

    Built in a temp folder beside the target, then renamed into place. Tokenizers also get vocab.json +
    merges.txt, so readers that use the slow CLIPTokenizer work too."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)  # an empty folder is free to use
    _refuse_existing(folder, overwrite)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".tmp-")
    os.chmod(tmp, _umask_mode(0o777))
    try:
        model.unet.save_pretrained(os.path.join(tmp, "unet"))
        model.vae.save_pretrained(os.path.join(tmp, "vae"))
        for te, sub in zip(model.text_encoders, ["text_encoder", "text_encoder_2"]):
            te.save_pretrained(os.path.join(tmp, sub))
        for tok, sub in zip(model.tokenizers, ["tokenizer", "tokenizer_2"]):
            tok.save_pretrained(os.path.join(tmp, sub))
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None and not os.path.exists(os.path.join(tmp, sub, "vocab.json")):
                backend.model.save(os.path.join(tmp, sub))
        # steps_offset=1 as in real SD folders (inference only; pipelines warn on 0)
        # (a keyword: from_config drops a config's steps_offset as a default value)
        type(model.noise_scheduler).from_config(dict(model.noise_scheduler.config), steps_offset=1).save_pretrained(
            os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(_model_index(model), f, indent=2)
        old = None
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(folder) + ".old-")
            os.replace(folder, os.path.join(old, "x"))
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
