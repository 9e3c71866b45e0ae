"""library/metadata.py: the ss_* and modelspec.* metadata of saved LoRAs (KOHYA_COMPAT.md section 2)."""
import argparse
import base64
import hashlib
import json
import re
import sys
import types
from types import SimpleNamespace

import pytest

from library import metadata as md

# KOHYA_COMPAT.md 2.1 "Always"
ALWAYS_KEYS = """
ss_session_id ss_training_started_at ss_output_name ss_sd_scripts_commit_hash ss_seed ss_training_comment
ss_learning_rate ss_text_encoder_lr ss_unet_lr ss_optimizer ss_max_grad_norm
ss_lr_warmup_steps ss_lr_scheduler
ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs
ss_max_train_steps ss_gradient_checkpointing ss_gradient_accumulation_steps
ss_network_module ss_network_dim ss_network_alpha ss_network_dropout
ss_mixed_precision ss_full_fp16 ss_fp8_base ss_fp8_base_unet ss_lowram ss_cache_latents
ss_v2 ss_base_model_version ss_clip_skip ss_max_token_length
ss_noise_offset ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_noise_offset_random_strength ss_ip_noise_gamma ss_ip_noise_gamma_random_strength
ss_caption_dropout_rate ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range
ss_resize_interpolation
ss_prior_loss_weight ss_min_snr_gamma ss_scale_weight_norms ss_debiased_estimation ss_loss_type ss_huber_schedule
ss_huber_scale ss_huber_c
ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs ss_validate_every_n_steps
""".split()

LEGACY_KEYS = """
ss_batch_size_per_device ss_total_batch_size ss_resolution ss_color_aug ss_flip_aug ss_random_crop
ss_shuffle_caption ss_enable_bucket ss_bucket_no_upscale ss_min_bucket_reso ss_max_bucket_reso ss_keep_tokens
""".split()


def model(arch="sd1", v=False, source=""):
    return SimpleNamespace(arch=arch, v_parameterization=v, source=source)


def make_args(**kw):
    base = dict(
        output_name="my_lora", learning_rate=1e-4, unet_lr=None, text_encoder_lr=[5e-5], seed=42,
        training_comment=None, max_grad_norm=1.0, lr_warmup_steps=0, lr_scheduler="constant",
        gradient_checkpointing=False, gradient_accumulation_steps=1, max_train_steps=100,
        network_dim=8, network_alpha=4.0, network_dropout=None, network_args=None,
        mixed_precision="no", full_fp16=False, cache_latents=True, clip_skip=None, max_token_length=None,
        noise_offset=None, multires_noise_discount=0.3, loss_type="l2", huber_c=0.1, prior_loss_weight=1.0,
        min_snr_gamma=5.0, debiased_estimation_loss=False, optimizer_type="AdamW", resolution="512",
        train_batch_size=2, pretrained_model_name_or_path=None, vae=None, dataset_config=None,
        min_timestep=None, max_timestep=None,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def build(args=None, m=None, **kw):
    kw.setdefault("optimizer_name", "torch.optim.adamw.AdamW")
    kw.setdefault("num_train_images", 10)
    kw.setdefault("num_reg_images", 0)
    kw.setdefault("num_batches_per_epoch", 5)
    kw.setdefault("session_id", 1234)
    kw.setdefault("training_started_at", 1700000000.5)
    return md.build_training_metadata(args or make_args(), m or model(), **kw)


def test_required_keys_present_and_strings():
    meta = build()
    missing = [k for k in ALWAYS_KEYS + LEGACY_KEYS if k not in meta]
    assert not missing, missing
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_output_name"] == "my_lora"
    assert meta["ss_session_id"] == "1234" and meta["ss_training_started_at"] == "1700000000.5"
    assert meta["ss_text_encoder_lr"] == "5e-05"  # first value of the list, like sd-scripts
    assert meta["ss_unet_lr"] == "None" and meta["ss_clip_skip"] == "None"  # None → "None"
    assert meta["ss_cache_latents"] == "True" and meta["ss_full_fp16"] == "False"  # bools
    assert meta["ss_debiased_estimation"] == "False" and meta["ss_fp8_base"] == "False"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_num_epochs"] == "20"  # ceil(100 steps / 5 batches per epoch)
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_total_batch_size"] == "2"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert meta["ss_sd_scripts_commit_hash"]
    assert "ss_network_args" not in meta and "ss_sd_model_name" not in meta
    # sd-scripts' typed defaults where our flag has none: --lowram (no effect here), --validation_split (TOML's)
    assert meta["ss_lowram"] == "False" and meta["ss_validation_split"] == "0.0"
    assert build(make_args(lowram=True, validation_split=0.25))["ss_validation_split"] == "0.25"


def test_session_id_is_not_the_seeds_and_face_crop_range_reads_as_sd_scripts():
    """ss_session_id was drawn after set_seed, so every run with --seed 1 had the same one; sd-scripts draws it
    before. --face_crop_aug_range 2.0,4.0 is written as the tuple sd-scripts parses it into."""
    import random

    ids = set()
    for _ in range(2):
        random.seed(1)
        ids.add(md.build_training_metadata(make_args(), model(), optimizer_name="AdamW", num_train_images=1,
                                           num_reg_images=0, num_batches_per_epoch=1)["ss_session_id"])
    assert len(ids) == 2
    assert build(make_args(face_crop_aug_range="2.0,4.0"))["ss_face_crop_aug_range"] == "(2.0, 4.0)"
    assert build(make_args(face_crop_aug_range=None))["ss_face_crop_aug_range"] == "None"


@pytest.mark.parametrize(
    "arch,v,version,v2",
    [
        ("sd1", False, "sd_v1", "False"),
        ("sd2", False, "sd_v2", "True"),
        ("sd1", True, "sd_v1_v", "False"),
        ("sd2", True, "sd_v2_v", "True"),
        ("sdxl", False, "sdxl_base_v1-0", "False"),
    ],
)
def test_base_model_version(arch, v, version, v2):
    meta = build(m=model(arch, v))
    assert meta["ss_base_model_version"] == version
    assert meta["ss_v2"] == v2


def test_network_and_dataset_from_objects():
    network = SimpleNamespace(lora_dim=32, alpha=32.0)

    class Group:
        num_train_images = 7
        num_reg_images = 3

        def __len__(self):
            return 4

        def metadata(self):
            return {"ss_tag_frequency": json.dumps({"5_sks dog": {"sks dog": 5}}), "ss_datasets": [{"a": 1}]}

    meta = md.build_training_metadata(make_args(network_args=["conv_dim=4", "conv_alpha=1.5"]), model("sdxl"),
                                      network, Group(), max_train_steps=8)
    assert meta["ss_network_dim"] == "32" and meta["ss_network_alpha"] == "32.0"
    assert meta["ss_num_train_images"] == "7" and meta["ss_num_reg_images"] == "3"
    assert meta["ss_num_batches_per_epoch"] == "4" and meta["ss_num_epochs"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"5_sks dog": {"sks dog": 5}}
    assert json.loads(meta["ss_datasets"]) == [{"a": 1}]  # containers become JSON, not Python repr
    # the trainer's per-process count wins over the dataset's own total (several GPUs, as sd-scripts writes it)
    Group.metadata = lambda self: {"ss_num_batches_per_epoch": "4"}
    per_process = md.build_training_metadata(make_args(), model("sd1"), network, Group(), num_batches_per_epoch=2)
    assert per_process["ss_num_batches_per_epoch"] == "2"
    # sd-scripts adds the dropout (its LyCORIS workaround), null when --network_dropout is not given
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.5", "dropout": None}
    meta = md.build_training_metadata(make_args(network_args=["conv_dim=4"], network_dropout=0.1), model("sd1"))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "dropout": 0.1}
    meta = md.build_training_metadata(make_args(network_args=["conv_dim=4"], dim_from_weights=True), model("sd1"))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4"}


def test_model_name_and_hashes(tmp_path, monkeypatch):
    ckpt = tmp_path / "base.safetensors"
    ckpt.write_bytes(b"x" * 100)
    stub = types.ModuleType("library.safe_io")
    stub.model_hashes = lambda path: ("abcd1234", "f" * 64)
    monkeypatch.setitem(sys.modules, "library.safe_io", stub)
    meta = build(make_args(pretrained_model_name_or_path=str(ckpt)))
    assert meta["ss_sd_model_name"] == "base.safetensors"
    assert meta["ss_sd_model_hash"] == "abcd1234" and meta["ss_new_sd_model_hash"] == "f" * 64
    # a diffusers folder: its name, and the value sd-scripts' hash functions give a folder; a hub id: as given
    meta = build(make_args(pretrained_model_name_or_path=str(tmp_path) + "/"))
    assert meta["ss_sd_model_name"] == tmp_path.name
    assert meta["ss_sd_model_hash"] == meta["ss_new_sd_model_hash"] == "IsADirectory"
    meta = build(make_args(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5"))
    assert meta["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5"
    # the model's source is used when the flag is absent; --vae gets its own keys
    meta = build(make_args(vae=str(ckpt)), m=model(source=str(ckpt)))
    assert meta["ss_sd_model_name"] == "base.safetensors" and meta["ss_vae_hash"] == "abcd1234"
    assert "ss_sd_model_hash" not in build(make_args(pretrained_model_name_or_path=str(ckpt)), hash_model=False)


def test_real_model_hashes(tmp_path):
    from library import safe_io
    data = bytes(range(256)) * 8192  # 2 MiB
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(data)
    meta = build(make_args(pretrained_model_name_or_path=str(ckpt)))
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == safe_io.model_hashes(str(ckpt))
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize(
    "arch,v,architecture,impl,reso,pred",
    [
        ("sd1", False, "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
        ("sd2", False, "stable-diffusion-v2-512/lora", "diffusers", "512x512", "epsilon"),
        ("sd2", True, "stable-diffusion-v2-768-v/lora", "diffusers", "768x768", "v"),
        ("sdxl", False, "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models",
         "1024x1024", "epsilon"),
    ],
)
def test_modelspec_architecture(arch, v, architecture, impl, reso, pred):
    spec = md.modelspec(make_args(resolution=None), model(arch, v), timestamp=1700000000.0)
    assert spec["modelspec.sai_model_spec"] == "1.0.1"
    assert spec["modelspec.architecture"] == architecture
    assert spec["modelspec.implementation"] == impl
    assert spec["modelspec.resolution"] == reso
    assert spec["modelspec.prediction_type"] == pred
    assert spec["modelspec.title"] == "my_lora"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", spec["modelspec.date"])  # local time, no timezone
    assert spec["modelspec.implementation_version"].startswith("apt-lora/")
    assert "modelspec.timestep_range" not in spec and "modelspec.encoder_layer" not in spec
    assert all(isinstance(x, str) for x in spec.values())


def test_modelspec_options(tmp_path):
    thumb = tmp_path / "t.png"
    thumb.write_bytes(b"\x89PNG")
    args = make_args(resolution="768,512", clip_skip=2, min_timestep=100, metadata_title="Dog", metadata_author="me",
                     metadata_tags="dog,photo", metadata_thumbnail=str(thumb))
    spec = md.modelspec(args, model(), timestamp=1700000000.0)
    assert spec["modelspec.resolution"] == "768x512"
    assert spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.timestep_range"] == "100,1000"
    assert spec["modelspec.title"] == "Dog" and spec["modelspec.author"] == "me"
    assert spec["modelspec.tags"] == "dog,photo"
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    spec = md.modelspec(make_args(output_name=None), model(), timestamp=1700000000.0)
    assert spec["modelspec.title"] == "LoRA@1700000000.0"
    assert md.modelspec(make_args(), model(), resolution=(640, 448))["modelspec.resolution"] == "640x448"


def test_no_metadata_minimal_set():
    full = build(make_args(network_args=["conv_dim=4"]))
    full.update(md.modelspec(make_args(), model()))
    small = md.minimal(md.update_on_save(full, steps=10, epoch=1))
    ss_keys = {k for k in small if not k.startswith("modelspec.")}
    assert ss_keys == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                       "ss_network_args"}
    assert small["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert all(k.startswith("modelspec.") or k in md.SS_METADATA_MINIMUM_KEYS for k in small)


def test_update_on_save():
    meta = build()
    saved = md.update_on_save(meta, steps=120, epoch=3, now=1700000100.25)
    assert saved["ss_steps"] == "120" and saved["ss_epoch"] == "3"
    assert saved["ss_training_finished_at"] == "1700000100.25"
    assert "ss_steps" not in meta  # the base metadata is left as it was
    assert all(isinstance(v, str) for v in saved.values())


# sd-scripts train_network.py writes these straight from the flag of the same name (KOHYA_COMPAT.md 2.1)
FLAG_KEYS = """
output_name learning_rate unet_lr gradient_checkpointing gradient_accumulation_steps lr_warmup_steps lr_scheduler
network_dropout mixed_precision clip_skip max_token_length seed noise_offset multires_noise_iterations
multires_noise_discount adaptive_noise_scale zero_terminal_snr training_comment max_grad_norm caption_dropout_rate
caption_dropout_every_n_epochs caption_tag_dropout_rate prior_loss_weight min_snr_gamma scale_weight_norms
ip_noise_gamma noise_offset_random_strength ip_noise_gamma_random_strength loss_type huber_schedule huber_scale
huber_c validation_seed validation_split max_validation_steps validate_every_n_epochs validate_every_n_steps
resize_interpolation
""".split()


def test_every_flag_key_holds_its_own_flags_value():
    """Each ss_<flag> key holds that flag's value, not a neighbour's (ss_huber_c read from --huber_scale would show a
    LoRA manager, and anyone reproducing the run, the wrong setting); the bool keys likewise, and ss_full_bf16 only
    with --full_bf16, as sd-scripts writes it."""
    values = {flag: f"value-{i}" for i, flag in enumerate(FLAG_KEYS)}
    values["gradient_accumulation_steps"] = 7  # (a number: the epoch count is computed from it)
    args = make_args(**values, debiased_estimation_loss=True, fp8_base=True, lowram=False, full_fp16=False,
                     cache_latents=False, fp8_base_unet=False, full_bf16=True)
    meta = build(args)
    assert {f: meta[f"ss_{f}"] for f in FLAG_KEYS} == {f: str(v) for f, v in values.items()}
    assert (meta["ss_debiased_estimation"], meta["ss_fp8_base"]) == ("True", "True")
    assert [meta[k] for k in ("ss_lowram", "ss_full_fp16", "ss_cache_latents", "ss_fp8_base_unet")] == ["False"] * 4
    assert meta["ss_full_bf16"] == "True"
    assert "ss_full_bf16" not in build(make_args(full_bf16=False))


def test_gradient_accumulation_in_epochs_and_total_batch_size():
    """With --gradient_accumulation_steps 4 on 2 processes, batch 2, 10 batches per epoch and 100 steps: an epoch is
    ceil(10 / 4) = 3 optimizer steps, so ss_num_epochs = ceil(100 / 3) = 34, and ss_total_batch_size = 2 * 2 * 4 = 16
    (sd-scripts' formulas; without the accumulation both would read 10 and 4)."""
    meta = build(make_args(gradient_accumulation_steps=4, train_batch_size=2, max_train_steps=100),
                 num_batches_per_epoch=10, num_processes=2)
    assert meta["ss_num_epochs"] == "34"
    assert meta["ss_total_batch_size"] == "16" and meta["ss_batch_size_per_device"] == "2"


def test_first_text_encoder_lr_and_a_timestep_range_with_only_a_maximum():
    """--text_encoder_lr 5e-5 1e-5 (one per SDXL text encoder): networks.lora trains both at the first, and
    ss_text_encoder_lr says so. --max_timestep 500 alone is the range 0,500 (the minimum defaults to 0)."""
    assert build(make_args(text_encoder_lr=[5e-5, 1e-5]))["ss_text_encoder_lr"] == "5e-05"
    spec = md.modelspec(make_args(max_timestep=500), model(), timestamp=1700000000.0)
    assert spec["modelspec.timestep_range"] == "0,500"


def test_a_thumbnail_given_as_a_data_url_is_kept():
    """--metadata_thumbnail accepts a data URL as well as an image file (sd-scripts does): it is written unchanged,
    not looked up as a file name and dropped with a "file not found" warning."""
    url = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff").decode()
    spec = md.modelspec(make_args(metadata_thumbnail=url), model(), timestamp=1700000000.0)
    assert spec["modelspec.thumbnail"] == url
