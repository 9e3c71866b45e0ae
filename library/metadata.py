"""Safetensors metadata of saved LoRAs: sd-scripts' ss_* keys and the modelspec.* keys (KOHYA_COMPAT.md §2).

A1111/Forge decide from `ss_base_model_version` / `ss_v2` whether to show a LoRA for the loaded checkpoint, LoRA
managers read `ss_tag_frequency` / `ss_output_name`, and sd-scripts' tools read `ss_network_*`, so these keys and
their exact string forms matter. Every value is a `str` (`None` → "None", bools → "True"/"False").
The `sshs_*` hashes are added by the LoRA writer (`networks/lora.py` via `library.safe_io`).
"""
from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import mimetypes
import os
import random
import subprocess
import time
from functools import lru_cache
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

IMPLEMENTATION = "apt-lora"
VERSION = "0.1.0"
NETWORK_MODULE = "networks.lora"

# sd-scripts train_util.SS_METADATA_MINIMUM_KEYS: what --no_metadata keeps
SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

MODEL_VERSION_SD_V1 = "sd_v1"
MODEL_VERSION_SD_V2 = "sd_v2"
MODEL_VERSION_SDXL_BASE_V1_0 = "sdxl_base_v1-0"

MODELSPEC_VERSION = "1.0.1"
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

# --metadata_* flags that become modelspec.* keys (title is handled separately)
MODELSPEC_OPTIONAL = (
    "author",
    "description",
    "license",
    "tags",
    "usage_hint",
    "thumbnail",
    "merged_from",
    "trigger_phrase",
    "preprocessor",
    "is_negative_embedding",
)

# ss_* keys taken straight from args (sd-scripts train_network.py), in its order
_ARGS_KEYS = (
    ("ss_output_name", "output_name"),
    ("ss_learning_rate", "learning_rate"),
    ("ss_unet_lr", "unet_lr"),
    ("ss_gradient_checkpointing", "gradient_checkpointing"),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("ss_lr_warmup_steps", "lr_warmup_steps"),
    ("ss_lr_scheduler", "lr_scheduler"),
    ("ss_network_dropout", "network_dropout"),
    ("ss_mixed_precision", "mixed_precision"),
    ("ss_clip_skip", "clip_skip"),
    ("ss_max_token_length", "max_token_length"),
    ("ss_seed", "seed"),
    ("ss_noise_offset", "noise_offset"),
    ("ss_multires_noise_iterations", "multires_noise_iterations"),
    ("ss_multires_noise_discount", "multires_noise_discount"),
    ("ss_adaptive_noise_scale", "adaptive_noise_scale"),
    ("ss_zero_terminal_snr", "zero_terminal_snr"),
    ("ss_training_comment", "training_comment"),
    ("ss_max_grad_norm", "max_grad_norm"),
    ("ss_caption_dropout_rate", "caption_dropout_rate"),
    ("ss_caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs"),
    ("ss_caption_tag_dropout_rate", "caption_tag_dropout_rate"),
    ("ss_face_crop_aug_range", "face_crop_aug_range"),
    ("ss_prior_loss_weight", "prior_loss_weight"),
    ("ss_min_snr_gamma", "min_snr_gamma"),
    ("ss_scale_weight_norms", "scale_weight_norms"),
    ("ss_ip_noise_gamma", "ip_noise_gamma"),
    ("ss_noise_offset_random_strength", "noise_offset_random_strength"),
    ("ss_ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength"),
    ("ss_loss_type", "loss_type"),
    ("ss_huber_schedule", "huber_schedule"),
    ("ss_huber_scale", "huber_scale"),
    ("ss_huber_c", "huber_c"),
    ("ss_validation_seed", "validation_seed"),
    ("ss_validation_split", "validation_split"),
    ("ss_max_validation_steps", "max_validation_steps"),
    ("ss_validate_every_n_epochs", "validate_every_n_epochs"),
    ("ss_validate_every_n_steps", "validate_every_n_steps"),
    ("ss_resize_interpolation", "resize_interpolation"),
)
# ss_* keys sd-scripts writes as bool(args.x)
_BOOL_ARGS_KEYS = (
    ("ss_lowram", "lowram"),
    ("ss_full_fp16", "full_fp16"),
    ("ss_cache_latents", "cache_latents"),
    ("ss_debiased_estimation", "debiased_estimation_loss"),
    ("ss_fp8_base", "fp8_base"),
    ("ss_fp8_base_unet", "fp8_base_unet"),
)


@lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """This checkout's git commit (None outside a git checkout); recorded like sd-scripts records its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else None


def implementation_version() -> str:
    """`apt-lora/<git sha>`, or `apt-lora/<version>` when not run from a git checkout."""
    return f"{IMPLEMENTATION}/{git_commit() or VERSION}"


def _str(value: Any) -> str:
    """sd-scripts stringifies with str(); containers that are not JSON yet are written as JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def base_model_version(model) -> str:
    """`ss_base_model_version`: sd_v1 / sd_v2 (+ "_v" for v-parameterization) or sdxl_base_v1-0."""
    if model.arch == "sdxl":
        return MODEL_VERSION_SDXL_BASE_V1_0
    version = MODEL_VERSION_SD_V2 if model.arch == "sd2" else MODEL_VERSION_SD_V1
    return version + ("_v" if model.v_parameterization else "")


def parse_resolution(value) -> Optional[tuple[int, int]]:
    """`--resolution` "512" / "512,768" / 512 / (w, h) → (w, h); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = [int(v) for v in value]
    if len(parts) == 1:
        parts = parts * 2
    return parts[0], parts[1]


def _network_args_dict(network_args) -> dict:
    """`--network_args k=v ...` → {k: v} with string values, as sd-scripts stores it in ss_network_args."""
    if network_args is None:
        return {}
    if isinstance(network_args, Mapping):
        return {str(k): str(v) for k, v in network_args.items()}
    out = {}
    for item in network_args:
        key, _, value = str(item).partition("=")
        out[key.strip()] = value.strip()
    return out


def _text_encoder_lr(args):
    lr = getattr(args, "text_encoder_lr", None)
    if isinstance(lr, (list, tuple)):
        return lr[0] if lr else None
    return lr


def build_training_metadata(
    args,
    model,
    network=None,
    dataset_group=None,
    *,
    network_dim=None,
    network_alpha=None,
    network_args=None,
    optimizer_name: Optional[str] = None,
    num_train_images: Optional[int] = None,
    num_reg_images: Optional[int] = None,
    num_validation_images: int = 0,
    num_batches_per_epoch: Optional[int] = None,
    num_epochs: Optional[int] = None,
    max_train_steps: Optional[int] = None,
    num_processes: int = 1,
    dataset_metadata: Optional[Mapping[str, Any]] = None,
    session_id: Optional[int] = None,
    training_started_at: Optional[float] = None,
    hash_model: bool = True,
) -> dict[str, str]:
    """The ss_* metadata sd-scripts' train_network.py writes, as str → str (KOHYA_COMPAT.md §2.1).

    `model` is a `StableDiffusionModel` (only `arch`, `v_parameterization` and `source` are read). Counts and
    dataset keys come from the keyword arguments, else from `network` (lora_dim, alpha) / `dataset_group`
    (num_train_images, num_reg_images, len(), metadata()) when given, else from `args`.
    `dataset_metadata` (`ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs`, `ss_bucket_info`, ...) is merged
    in as is. Model name and hashes are added when the base model path exists (hashes only for a file:
    `library.safe_io.model_hashes`; `hash_model=False` skips hashing a multi-GB file).
    """
    if network_dim is None:
        network_dim = getattr(network, "lora_dim", None) if network is not None else None
        if network_dim is None:
            network_dim = getattr(args, "network_dim", None)
    if network_alpha is None:
        network_alpha = getattr(network, "alpha", None) if network is not None else None
        if network_alpha is None:
            network_alpha = getattr(args, "network_alpha", None)
    if network_args is None:
        network_args = getattr(args, "network_args", None)
    batches_given = num_batches_per_epoch is not None  # the caller's (per process) wins over the dataset's total
    if dataset_group is not None:
        if num_train_images is None:
            num_train_images = getattr(dataset_group, "num_train_images", None)
        if num_reg_images is None:
            num_reg_images = getattr(dataset_group, "num_reg_images", None)
        if num_batches_per_epoch is None:
            try:
                num_batches_per_epoch = len(dataset_group)
            except TypeError:
                pass
        if dataset_metadata is None and callable(getattr(dataset_group, "metadata", None)):
            dataset_metadata = dataset_group.metadata()
    if max_train_steps is None:
        max_train_steps = getattr(args, "max_train_steps", None)
    if num_epochs is None:
        num_epochs = getattr(args, "max_train_epochs", None)
    if num_epochs is None and max_train_steps and num_batches_per_epoch:
        # sd-scripts: ceil(max_train_steps / optimizer steps per epoch)
        grad_acc = getattr(args, "gradient_accumulation_steps", None) or 1
        num_epochs = math.ceil(max_train_steps / math.ceil(num_batches_per_epoch / grad_acc))

    md: dict[str, Any] = {
        # from the OS, not the seeded stream: runs with the same --seed are different sessions (sd-scripts draws it
        # before set_seed)
        "ss_session_id": session_id if session_id is not None else random.SystemRandom().randint(0, 2**32),
        "ss_training_started_at": training_started_at if training_started_at is not None else time.time(),
        "ss_sd_scripts_commit_hash": git_commit() or f"{IMPLEMENTATION}/{VERSION}",
        "ss_text_encoder_lr": _text_encoder_lr(args),
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_train_steps,
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_v2": model.arch == "sd2",
        "ss_base_model_version": base_model_version(model),
        "ss_optimizer": optimizer_name if optimizer_name is not None else getattr(args, "optimizer_type", None),
    }
    for key, attr in _ARGS_KEYS:
        md[key] = getattr(args, attr, None)
    if isinstance(md.get("ss_face_crop_aug_range"), str):  # sd-scripts parses the flag into a tuple first
        text = md["ss_face_crop_aug_range"].strip()
        md["ss_face_crop_aug_range"] = tuple(float(r) for r in text.split(",")) if text else None
    if md.get("ss_validation_split") is None:  # sd-scripts' flag defaults to 0.0 (here None: the TOML decides)
        md["ss_validation_split"] = 0.0
    for key, attr in _BOOL_ARGS_KEYS:
        md[key] = bool(getattr(args, attr, False))
    if getattr(args, "full_bf16", False):
        md["ss_full_bf16"] = True

    if not getattr(args, "dataset_config", None):
        # legacy CLI dataset (--train_data_dir): sd-scripts describes the single dataset with flat keys
        batch = getattr(args, "train_batch_size", None)
        grad_acc = getattr(args, "gradient_accumulation_steps", None) or 1
        md.update(
            {
                "ss_batch_size_per_device": batch,
                "ss_total_batch_size": batch * num_processes * grad_acc if isinstance(batch, int) else None,
                "ss_resolution": parse_resolution(getattr(args, "resolution", None)),
                "ss_color_aug": bool(getattr(args, "color_aug", False)),
                "ss_flip_aug": bool(getattr(args, "flip_aug", False)),
                "ss_random_crop": bool(getattr(args, "random_crop", False)),
                "ss_shuffle_caption": bool(getattr(args, "shuffle_caption", False)),
                "ss_enable_bucket": bool(getattr(args, "enable_bucket", False)),
                "ss_bucket_no_upscale": bool(getattr(args, "bucket_no_upscale", False)),
                "ss_min_bucket_reso": getattr(args, "min_bucket_reso", None),
                "ss_max_bucket_reso": getattr(args, "max_bucket_reso", None),
                "ss_keep_tokens": getattr(args, "keep_tokens", None),
            }
        )
    if dataset_metadata:
        md.update({k: v for k, v in dataset_metadata.items() if not (batches_given and k == "ss_num_batches_per_epoch")})

    net_kwargs = _network_args_dict(network_args)
    if net_kwargs:
        if not getattr(args, "dim_from_weights", False):  # sd-scripts' LyCORIS workaround puts it in the kwargs
            net_kwargs.setdefault("dropout", getattr(args, "network_dropout", None))
        md["ss_network_args"] = json.dumps(net_kwargs)

    md.update(_file_identity("sd_model", getattr(args, "pretrained_model_name_or_path", None) or model.source, hash_model))
    vae = getattr(args, "vae", None)
    if vae:
        md.update(_file_identity("vae", vae, hash_model))

    return {k: _str(v) for k, v in md.items()}


def _file_identity(kind: str, path: Optional[str], hash_model: bool) -> dict:
    """ss_{kind}_name (basename, or the name/id as given) and, for an existing file, its two hashes."""
    if not path:
        return {}
    out = {f"ss_{kind}_name": os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path}
    if hash_model and os.path.isdir(path):  # a diffusers folder: sd-scripts' hash functions answer this
        out[f"ss_{kind}_hash"] = out[f"ss_new_{kind}_hash"] = "IsADirectory"
    if hash_model and os.path.isfile(path):
        from library.safe_io import model_hashes  # lazy: hashing lives with the other file I/O

        old_hash, new_hash = model_hashes(path)
        if old_hash is not None:
            out[f"ss_{kind}_hash"] = old_hash
        if new_hash is not None:
            out[f"ss_new_{kind}_hash"] = new_hash
    return out


def update_on_save(metadata: Mapping[str, str], steps: int, epoch: int, now: Optional[float] = None) -> dict[str, str]:
    """A copy of the metadata with the per-save keys: ss_training_finished_at (unix time), ss_steps, ss_epoch."""
    out = dict(metadata)
    out["ss_training_finished_at"] = str(time.time() if now is None else now)
    out["ss_steps"] = str(steps)
    out["ss_epoch"] = str(epoch)
    return out


def minimal(metadata: Mapping[str, str]) -> dict[str, str]:
    """`--no_metadata`: only SS_METADATA_MINIMUM_KEYS (those present) plus any modelspec.* keys.

    sd-scripts still writes modelspec (merge `modelspec(...)` after this) and the sshs_* hashes.
    """
    return {k: v for k, v in metadata.items() if k in SS_METADATA_MINIMUM_KEYS or k.startswith("modelspec.")}


def architecture(model) -> str:
    """modelspec.architecture of a LoRA for this base model (sd-scripts sai_model_spec.determine_architecture)."""
    if model.arch == "sdxl":
        arch = ARCH_SD_XL_V1_BASE
    elif model.arch == "sd2":
        arch = ARCH_SD_V2_768_V if model.v_parameterization else ARCH_SD_V2_512
    else:
        arch = ARCH_SD_V1
    return arch + "/lora"


def default_resolution(model) -> tuple[int, int]:
    """modelspec's default resolution: 1024 (SDXL), 768 (SD2 v-parameterization), else 512."""
    if model.arch == "sdxl":
        return 1024, 1024
    if model.arch == "sd2" and model.v_parameterization:
        return 768, 768
    return 512, 512


def file_to_data_url(path: str) -> str:
    """A thumbnail file as a base64 data URL (modelspec.thumbnail)."""
    mime, _ = mimetypes.guess_type(path)
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f"data:{mime or 'application/octet-stream'};base64,{data}"


def modelspec(args, model, title: Optional[str] = None, resolution=None, timestamp: Optional[float] = None) -> dict[str, str]:
    """modelspec.* keys (ModelSpec 1.0.1, sd-scripts `get_sai_model_spec(..., lora=True)`), recomputed per save.

    title: `title`, else `--metadata_title`, else `--output_name`, else `LoRA@<timestamp>`.
    resolution: `resolution`, else `--resolution`, else the architecture default ("WxH").
    timestep_range only with `--min_timestep`/`--max_timestep`, encoder_layer only with `--clip_skip`.
    """
    ts = time.time() if timestamp is None else timestamp
    if title is None:
        title = getattr(args, "metadata_title", None) or getattr(args, "output_name", None) or f"LoRA@{ts}"
    reso = parse_resolution(resolution if resolution is not None else getattr(args, "resolution", None))
    if reso is None:
        reso = default_resolution(model)
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture(model),
        "modelspec.implementation": IMPL_STABILITY_AI if model.arch == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "v" if model.v_parameterization else "epsilon",
        "modelspec.implementation_version": implementation_version(),
    }
    t_min, t_max = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if t_min is not None or t_max is not None:
        out["modelspec.timestep_range"] = f"{0 if t_min is None else t_min},{1000 if t_max is None else t_max}"
    clip_skip = getattr(args, "clip_skip", None)
    if clip_skip is not None:
        out["modelspec.encoder_layer"] = str(clip_skip)
    for name in MODELSPEC_OPTIONAL:
        value = getattr(args, f"metadata_{name}", None)
        if value is None:
            continue
        value = str(value)
        if name == "thumbnail" and not value.startswith("data:"):
            if not os.path.isfile(value):
                logger.warning(f"--metadata_thumbnail {value}: file not found, not written")
                continue
            value = file_to_data_url(value)
        out[f"modelspec.{name}"] = value
    return out


__all__ = [
    "SS_METADATA_MINIMUM_KEYS",
    "build_training_metadata",
    "update_on_save",
    "minimal",
    "modelspec",
    "base_model_version",
    "architecture",
    "default_resolution",
    "parse_resolution",
    "git_commit",
    "implementation_version",
]
