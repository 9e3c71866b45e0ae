"""End to end: train_apt_lora.py on tiny models, and the LoRA it writes loaded back by diffusers."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_apt_lora
from library.tiny_models import write_tiny_model


def _dataset(tmp_path, images, **subset):
    lines = ["[[datasets]]", "resolution = 64", "batch_size = 1", "", "  [[datasets.subsets]]",
             f'  image_dir = "{images}"', '  class_tokens = "sks dog"']
    lines += [f"  {k} = {json.dumps(v)}" for k, v in subset.items()]
    path = tmp_path / "dataset.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _train(model, dataset, out, *extra):
    argv = ["--pretrained_model_name_or_path", model, "--dataset_config", dataset, "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "4", "--network_alpha", "4", "--max_train_steps", "3",
            "--learning_rate", "1e-2", "--seed", "1", *extra]
    return train_apt_lora.main(argv)


def test_train_sd1_single_file_writes_kohya_lora(tiny, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(tiny["sd1_single"], _dataset(tmp_path, images), out, "--save_every_n_steps", "2",
                  "--cuda_graphs", "auto") == 0
    if not torch.cuda.is_available():  # auto on a CPU: every graph off, each with its reason
        assert ("--cuda_graphs auto: on: none; off: --unet_cuda_graph (no CUDA device), --text_encoder_cuda_graph "
                "(no CUDA device), --apt_cuda_graph (APT is off, no CUDA device)") in capsys.readouterr().out
    final, step2 = out / "lora.safetensors", out / "lora-step00000002.safetensors"
    assert final.exists() and step2.exists()
    with safe_open(str(final), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.alpha")
        up = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")
    assert len(keys) == 3 * (192 + 6 * 3)  # 192 UNet modules + 6 per tiny text-encoder layer (3 layers)
    assert alpha.dtype == torch.float32 and alpha.item() == 4.0
    assert up.abs().sum() > 0  # trained: lora_up starts at zero
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_dim"] == "4" and md["ss_steps"] == "3"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and len(md["sshs_model_hash"]) == 64


def load_in_diffusers(pipe, path) -> None:
    """`pipe.load_lora_weights` as users should call it: folder + weight_name, the form every diffusers version
    takes (offline diffusers 0.33 refuses a bare file path)."""
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))


def _count_peft_lora_modules(module):
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_trained_lora_loads_in_diffusers_with_same_output(arch, tiny, images, tmp_path):
    """The real consumer: diffusers' load_lora_weights on the same tiny model gives the trainer's output."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from library.conditioning import encode_prompts, sdxl_time_ids, unet_forward
    from library.model_util import load_model
    from networks.lora import LoRANetwork

    out = tmp_path / "out"
    assert _train(tiny[arch], _dataset(tmp_path, images), out) == 0
    path = str(out / "lora.safetensors")

    model = load_model(tiny[arch])
    network = LoRANetwork(model, lora_dim=4, alpha=4.0)
    network.apply_to()
    network.load_weights(path)
    network.set_multiplier(1.0)

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny[arch], local_files_only=True)
    load_in_diffusers(pipe, path)
    with safe_open(path, "pt") as f:
        n_unet = len({k.split(".")[0] for k in f.keys() if k.startswith("lora_unet_")})
        n_te = len({k.split(".")[0] for k in f.keys() if k.startswith("lora_te")})
    # no key left unloaded: every module of the file became a PEFT LoRA layer
    assert _count_peft_lora_modules(pipe.unet) == n_unet
    te_modules = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    assert sum(_count_peft_lora_modules(te) for te in te_modules) == n_te

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = encode_prompts(model, ["a photo of sks dog", "sks dog on grass"])
        time_ids = sdxl_time_ids(torch.tensor([[64, 64]] * 2), torch.tensor([[0, 0]] * 2), torch.tensor([[64, 64]] * 2))
        ours = unet_forward(model, x, t, cond, time_ids if arch == "sdxl" else None)
        kw = {}
        if arch == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids}
        theirs = pipe.unet(x, t, encoder_hidden_states=cond.context, **kw).sample
        # the text encoders with their LoRA, compared through the prompts they encode
        ids = model.tokenizers[0](["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        te_ours = model.text_encoders[0](ids).last_hidden_state
        te_theirs = pipe.text_encoder(ids).last_hidden_state
    base = None
    with torch.no_grad(), network.multiplier_override(0.0):
        base = unet_forward(model, x, t, cond, time_ids if arch == "sdxl" else None)
    assert (ours - base).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(te_theirs, te_ours, atol=1e-5, rtol=1e-4)


def _run_err(capsys, argv):
    rc = train_apt_lora.main(argv)
    return rc, capsys.readouterr().err


def test_bad_inputs_give_one_clear_message(tiny, images, tmp_path, capsys):
    ds = _dataset(tmp_path, images)
    rc, err = _run_err(capsys, ["--pretrained_model_name_or_path", str(tmp_path / "nope.safetensors"),
                                "--dataset_config", ds, "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "nope.safetensors" in err and "Traceback" not in err

    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  imge_dir = "{images}"\n')
    rc, err = _run_err(capsys, ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", str(bad),
                                "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "imge_dir" in err and "image_dir" in err

    rc, err = _run_err(capsys, ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", ds,
                                "--output_dir", str(tmp_path / "o"), "--optimizer_type", "AdamW8bit"])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert rc == 2 and "bitsandbytes" in err and "requirements-gpu.txt" in err

    rc, err = _run_err(capsys, ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", ds,
                                "--output_dir", str(tmp_path / "o"), "--xformers"])
    try:
        import xformers  # noqa: F401
    except ImportError:
        assert rc == 2 and "xformers" in err and "requirements-gpu.txt" in err


def test_full_bf16_trains_and_keeps_the_lora_in_bf16_as_sd_scripts(tiny, images, tmp_path, capsys):
    """--full_bf16: LoRA weights and AdamW's states in bf16 (the state saved shows them), the file in bf16 unless
    --save_precision says otherwise, and alpha kept float32 in training, so a float file has the alpha given."""
    ds = _dataset(tmp_path, images)
    rc, err = _run_err(capsys, ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", ds,
                                "--output_dir", str(tmp_path / "o"), "--full_bf16"])
    assert rc == 2 and "--full_bf16 keeps the LoRA in bf16 and needs --mixed_precision bf16; it is 'no'" in err

    out = tmp_path / "bf16"
    assert _train(tiny["sd1"], ds, out, "--apt", "--full_bf16", "--mixed_precision", "bf16", "--save_state",
                  "--network_alpha", "0.3") == 0
    lora = load_file(str(out / "lora.safetensors"))
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}  # sd-scripts keeps the training dtype
    up = lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    assert up.abs().sum() > 0
    state = torch.load(str(out / "lora-state" / "optimizer.pt"), weights_only=True)["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.bfloat16}
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_full_bf16"] == "True"

    out = tmp_path / "float"
    assert _train(tiny["sd1"], ds, out, "--full_bf16", "--mixed_precision", "bf16", "--save_precision", "float",
                  "--network_alpha", "0.3") == 0
    lora = load_file(str(out / "lora.safetensors"))
    alpha = lora["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == pytest.approx(0.3, abs=1e-7)  # bf16 would give 0.30078
    w = lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, w.bfloat16().float())  # trained in bf16


def test_the_progress_bar_is_drawn_once_per_step_with_that_steps_loss(tiny, images, tmp_path, capsys, monkeypatch):
    """Piped to a log file, each step was drawn twice: by the update (with the last step's loss), then by the
    postfix. mininterval=0, miniters=1: tqdm's throttle cannot hide a frame."""
    import tqdm.auto

    class Unthrottled(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, mininterval=0, miniters=1, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", Unthrottled)
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out") == 0
    frames = [f for f in capsys.readouterr().err.replace("\n", "\r").split("\r") if f.startswith("steps:")]
    for n in (1, 2):
        drawn = [f for f in frames if f" {n}/3 " in f]
        assert len(drawn) == 1 and "loss=" in drawn[0], frames
    losses = [f.split("loss=")[1].split(",")[0] for f in frames if "loss=" in f]
    assert len(set(losses[:3])) == 3, frames  # each step's frame shows its own loss


def test_log_lines_during_training_go_above_the_progress_bar(tiny, images, tmp_path, capsys, caplog):
    """A log line written while the bar was drawn landed on the bar's line, in a terminal and in a log file
    ("...gamma=0.700]INFO library.sampling: sample: ..."): the loop now routes them through tqdm, which clears the
    bar, writes the line on its own and draws the bar again below it."""
    caplog.set_level(logging.INFO)
    console = logging.StreamHandler(sys.stderr)  # the console handler main() sets up outside pytest
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 1\n")
    try:
        assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "2") == 0
    finally:
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    at = [i for i in range(len(err)) if err.startswith("INFO library.sampling: sample:", i)]
    assert len(at) == 1 and err[at[0] - 1] in "\r\n", err  # at the start of a line, after the bar is cleared
    after = err[at[0]:].split("\n", 1)[1]
    assert after.lstrip("\r").startswith("steps:  67%"), after[:200]  # the bar drawn again below the line


def test_existing_output_is_never_overwritten(tiny, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "lora.safetensors"
    existing.write_bytes(b"user data")
    rc = _train(tiny["sd1"], _dataset(tmp_path, images), out)
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and str(existing) in err
    assert existing.read_bytes() == b"user data"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--overwrite") == 0
    assert existing.read_bytes() != b"user data"
    # the final state of --save_state_on_train_end is checked before training too (it failed after the run)
    (out / "lora-state").mkdir()
    (out / "lora-state" / "train_state.json").write_text("{}")
    os.remove(existing)
    rc = _train(tiny["sd1"], _dataset(tmp_path, images), out, "--save_state_on_train_end")
    assert rc == 2 and str(out / "lora-state") in capsys.readouterr().err and not existing.exists()


def test_config_file_of_arguments(tiny, images, tmp_path):
    """--config_file: TOML values apply, the command line wins over them."""
    cfg = tmp_path / "args.toml"
    cfg.write_text(f'[model]\npretrained_model_name_or_path = "{tiny["sd1"]}"\n[train]\nmax_train_steps = 50\n'
                   f'network_dim = 2\nnetwork_alpha = 2\noutput_name = "from_toml"\n')
    out = tmp_path / "out"
    rc = train_apt_lora.main(["--config_file", str(cfg), "--dataset_config", _dataset(tmp_path, images),
                              "--output_dir", str(out), "--max_train_steps", "2", "--network_train_unet_only"])
    assert rc == 0
    with safe_open(str(out / "from_toml.safetensors"), "pt") as f:
        md = f.metadata()
        assert not any(k.startswith("lora_te") for k in f.keys())
    assert md["ss_steps"] == "2" and md["ss_network_dim"] == "2"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_gradient_accumulation_and_text_encoder_cache(arch, tiny, images, tmp_path):
    out = tmp_path / "out"
    rc = _train(tiny[arch], _dataset(tmp_path, images), out, "--gradient_accumulation_steps", "2",
                "--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents", "--min_snr_gamma", "5",
                "--noise_offset", "0.05", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1")
    assert rc == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_text_encoder_only_trains_the_text_encoders_lora_with_apt(tiny, images, tmp_path, capsys):
    """--network_train_text_encoder_only: the file holds text-encoder modules only, all trained (APT's losses reach
    them through the UNet); combined with --network_train_unet_only it is refused."""
    out = tmp_path / "out"
    assert _train(tiny["sdxl"], _dataset(tmp_path, images), out, "--network_train_text_encoder_only", "--apt") == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        ups = [f.get_tensor(k) for k in keys if k.endswith("lora_up.weight")]
    assert keys and all(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    assert sum(bool(torch.count_nonzero(u)) for u in ups) > len(ups) // 2  # trained (up starts at 0)
    rc = _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "bad", "--network_train_text_encoder_only",
                "--network_train_unet_only")
    assert rc == 2 and "--network_train_unet_only and --network_train_text_encoder_only exclude each other" in \
        capsys.readouterr().err


def test_alpha_masked_runs_and_masked_loss_without_masks(tiny, images, tmp_path, capsys):
    """Transparent images with alpha_mask = true train (APT with cached latents, and plain from images);
    --masked_loss with no mask source is refused naming the key to set."""
    d = tmp_path / "rgba"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        alpha = np.zeros((64, 64), np.uint8)
        alpha[16:48, 16:48] = 255
        Image.fromarray(np.dstack([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), alpha]), "RGBA").save(d / f"{i}.png")
    dataset = _dataset(tmp_path, str(d), alpha_mask=True)
    assert _train(tiny["sd1"], dataset, tmp_path / "apt", "--apt", "--cache_latents", "--masked_loss") == 0
    assert _train(tiny["sd1"], dataset, tmp_path / "plain", "--masked_loss") == 0
    for out in ("apt", "plain"):
        with safe_open(str(tmp_path / out / "lora.safetensors"), "pt") as f:
            assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "bad", "--masked_loss") == 2
    assert "--masked_loss weights the loss by masks" in capsys.readouterr().err
    masks = tmp_path / "masks"  # sd-scripts' other source: a folder of mask images (conditioning_data_dir)
    masks.mkdir()
    for f in sorted(os.listdir(images)):
        Image.new("L", Image.open(os.path.join(images, f)).size, 255).save(masks / f)
    dataset = _dataset(tmp_path, images, conditioning_data_dir=str(masks))
    assert _train(tiny["sd1"], dataset, tmp_path / "files", "--apt", "--cache_latents", "--masked_loss") == 0
    assert _train(tiny["sd1"], dataset, tmp_path / "unread", "--apt") == 2
    assert "conditioning_data_dir holds loss masks, which weight the loss only with --masked_loss" in \
        capsys.readouterr().err


def test_uncacheable_subset_is_refused_before_the_model_loads(tiny, images, tmp_path, capsys, monkeypatch):
    """random_crop with --cache_latents: an error naming the subset and the key, before the model loads (it came
    after the load, from the cache itself)."""
    from library import model_util

    monkeypatch.setattr(model_util, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    dataset = _dataset(tmp_path, images, random_crop=True)
    assert _train(tiny["sd1"], dataset, tmp_path / "out", "--cache_latents") == 2
    err = capsys.readouterr().err
    assert f"datasets[0].subsets[0] in {dataset}: random_crop changes the image every step, so latents cannot be " \
           "cached" in err


def test_per_dataset_network_multiplier_sets_the_lora_strength_per_batch(tiny, images, tmp_path, capsys,
                                                                          monkeypatch):
    """network_multiplier per [[datasets]] (sd-scripts' key): each batch trains the LoRA at --network_multiplier x
    its dataset's value, read from a device tensor (so graphs and compiled blocks take it as an input, and
    --cuda_graphs auto does not rule them out); --network_multiplier 0 (nothing would train) is refused."""
    from networks.lora import LoRANetwork

    seen, read = [], []
    real = LoRANetwork.set_multiplier

    def spy(self, m):
        seen.append(m)
        real(self, m)
        read.append((m, self.loras[0].multiplier))

    monkeypatch.setattr(LoRANetwork, "set_multiplier", spy)
    toml = tmp_path / "two.toml"
    toml.write_text(f'[general]\nresolution = 64\nclass_tokens = "sks dog"\n\n'
                    f'[[datasets]]\nnetwork_multiplier = 0.5\n  [[datasets.subsets]]\n  image_dir = "{images}"\n\n'
                    f'[[datasets]]\nnetwork_multiplier = -1.0\n  [[datasets.subsets]]\n  image_dir = "{images}"\n')
    assert _train(tiny["sd1"], str(toml), tmp_path / "out", "--apt", "--network_multiplier", "2",
                  "--max_train_steps", "6", "--cuda_graphs", "auto") == 0
    assert seen[0] == 2.0 and seen.count(1.0) >= 1 and seen.count(-2.0) >= 1  # 2 x 0.5 and 2 x -1.0, per batch
    assert set(seen) <= {2.0, 1.0, -2.0, 0.0}  # 0.0: APT's prior pass (the LoRA off)
    tensors = {id(v) for m, v in read[1:] if m != 0}  # after the first (set before the network is on the device)
    assert len(tensors) == 1 and all(isinstance(v, torch.Tensor) for m, v in read[1:] if m != 0)
    assert all(v == 0.0 and not isinstance(v, torch.Tensor) for m, v in read if m == 0)
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "--unet_cuda_graph (no CUDA device)" in out
    assert _train(tiny["sd1"], str(toml), tmp_path / "off", "--network_multiplier", "0") == 2
    assert "--network_multiplier 0 turns the LoRA off, so nothing would train" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1, got 0"),
    (["--clip_skip", "0"], "--clip_skip must be at least 1, got 0"),
    (["--clip_skip", "13"], "--clip_skip 13 is more than the text encoder's 3 layers: use 1 (the last layer) to 3"),
    (["--max_data_loader_n_workers", "-1"], "--max_data_loader_n_workers must be at least 0, got -1"),
    (["--max_train_steps", "0"], "--max_train_steps 0: nothing would train"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1; leave it out for a random seed"),
    (["--validate_every_n_epochs", "0"], "--validate_every_n_epochs must be at least 1, got 0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be at least 0 (0 turns it off), got -1.0"),
    (["--save_every_n_steps", "-1"], "--save_every_n_steps must be at least 0 (0 turns it off), got -1"),
    (["--min_snr_gamma", "-5"], "--min_snr_gamma must be at least 0 (0 turns it off), got -5.0"),
    (["--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "0"], "--lr_scheduler_timescale must be at least 1"),
    (["--network_args", "loraplus_lr_ratio=0"], "--network_args loraplus_lr_ratio=0: must be above 0"),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "0"],
     "--lr_scheduler_num_cycles must be at least 1, got 0"),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "1.5"],
     "--lr_scheduler_min_lr_ratio is the lowest learning rate as a fraction of --learning_rate: give 0 to 1, got 1.5"),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "-0.1"],
     "--lr_scheduler_min_lr_ratio must be at least 0, got -0.1"),
])
def test_out_of_range_values_are_errors_naming_the_flag(tiny, images, tmp_path, capsys, extra, message):
    """Each of these was a raw exception (ZeroDivisionError, ValueError from numpy or the DataLoader, or the
    encoder's own) somewhere in the run, or did something else (a negative --max_grad_norm flips the gradients,
    --save_every_n_steps -1 saves at every step); now an error before training (exit code 2) that says what to
    give."""
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


def test_dim_from_weights_continues_a_lora_of_another_rank(tiny, images, tmp_path, capsys):
    dataset = _dataset(tmp_path, images)
    first = tmp_path / "first"
    assert _train(tiny["sd1"], dataset, first, "--network_dim", "3", "--network_alpha", "1.5",
                  "--network_args", "conv_dim=2", "conv_alpha=0.5") == 0
    weights = str(first / "lora.safetensors")
    assert _train(tiny["sd1"], dataset, tmp_path / "no", "--network_weights", weights) == 2
    assert "pass --network_args conv_dim=2 conv_alpha=0.5" in capsys.readouterr().err  # what the flag does for you
    assert _train(tiny["sd1"], dataset, tmp_path / "yes", "--network_weights", weights, "--dim_from_weights") == 0
    with safe_open(str(tmp_path / "yes" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        shapes = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")}
    assert shapes == {3, 2} and meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert _train(tiny["sd1"], dataset, tmp_path / "bad", "--dim_from_weights") == 2
    assert "--dim_from_weights reads the rank from the LoRA being continued" in capsys.readouterr().err

    sd = load_file(weights)  # resized: one Linear module cut to rank 1, and the file keeps its per-module ranks
    name = sorted(k for k in sd if k.endswith("lora_down.weight") and sd[k].dim() == 2)[0]
    up = name.replace("lora_down", "lora_up")
    sd[name], sd[up] = sd[name][:1].contiguous(), sd[up][:, :1].contiguous()
    save_file(sd, str(tmp_path / "resized.safetensors"))
    resized = str(tmp_path / "resized.safetensors")
    assert _train(tiny["sd1"], dataset, tmp_path / "res", "--network_weights", resized, "--dim_from_weights") == 0
    out = load_file(str(tmp_path / "res" / "lora.safetensors"))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in sd.items()}
    assert _train(tiny["sd1"], dataset, tmp_path / "clash", "--network_weights", resized, "--dim_from_weights",
                  "--network_args", "block_dims=" + ",".join(["2"] * 25)) == 2
    assert "--dim_from_weights takes every module's rank and alpha from the file: drop block_dims" in \
        capsys.readouterr().err


@pytest.mark.parametrize("first_args", [
    ["--network_args", "block_dims=" + ",".join(["4"] * 12 + ["0"] + ["4"] * 12)],  # no mid-block modules
    ["--network_train_unet_only"],
], ids=["block-wise", "unet-only"])
def test_dim_from_weights_continues_a_partial_lora_as_it_is(tiny, images, tmp_path, first_args):
    """A file without some of the network's modules (a block-wise one, a UNet-only one): --dim_from_weights makes
    exactly the file's modules, as sd-scripts' create_network_from_weights, and the saved file has its keys (it was
    refused: "lacks 12 of the 192 UNet LoRA modules")."""
    dataset = _dataset(tmp_path, images)
    assert _train(tiny["sd1"], dataset, tmp_path / "first", *first_args) == 0
    weights = load_file(str(tmp_path / "first" / "lora.safetensors"))
    assert _train(tiny["sd1"], dataset, tmp_path / "cont", "--network_weights", str(tmp_path / "first" / "lora.safetensors"),
                  "--dim_from_weights") == 0
    cont = load_file(str(tmp_path / "cont" / "lora.safetensors"))
    assert {k: v.shape for k, v in cont.items()} == {k: v.shape for k, v in weights.items()}
    changed = [k for k in cont if k.endswith("lora_up.weight") and not torch.equal(cont[k], weights[k])]
    assert changed  # it trained


def test_nan_steps_are_skipped_then_the_run_stops_with_the_likely_cause(tiny, images, tmp_path, capsys, nan_steps):
    """A NaN loss skips the step (no weight update); after --max_bad_steps the run stops and names the causes."""
    nan_steps(lambda n: n % 2 == 0)
    out = tmp_path / "out"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--max_bad_steps", "3") == 0  # 3 good steps, 2 bad
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    calls = nan_steps(lambda n: True)
    rc = _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out2", "--max_bad_steps", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "--no_half_vae" in err and "learning rate" in err and "--max_bad_steps 2" in err
    assert calls["n"] == 2  # it stops at the 2nd skipped step, not after one more


def test_micro_batch_reads_nothing_from_the_device_before_the_window_ends():
    """Issue 6: no host-device sync inside the step. On the meta device any read (bool, .item()) raises, so a
    micro-batch that only accumulates runs there: loss, finiteness flag and backward stay on the device."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = torch.nn.Linear(3, 1, device="meta")
    ctx = SimpleNamespace(accelerator=accelerator, network=net, window_losses=[], window_keys=[], keep_grads=False)
    opt = accelerator.prepare(torch.optim.SGD(net.parameters(), lr=0.1))  # as the trainer's: keeps grads while accumulating
    step = lambda args, ctx, batch: ((net(torch.ones(2, 3, device="meta")) ** 2).mean(), {})  # noqa: E731
    res = train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=1.0), ctx, {"image_keys": ["a", "b"]},
                                     opt, None, list(net.parameters()), step_fn=step)
    assert res.status == "accumulating" and res.loss.device.type == "meta" and res.values is None
    assert len(ctx.window_losses) == 1 and ctx.window_keys == ["a", "b"] and net.weight.grad is not None


def test_batches_reach_the_device_by_non_blocking_copies(tiny, images, tmp_path, monkeypatch):
    """Issue 6: accelerate moves each batch to the device; with blocking copies (its default) every tensor of every
    batch would make the host wait for the GPU. The prepared loader copies non-blocking, from memory the loader
    pins on CUDA (pinning needs CUDA; on a CPU there is no copy)."""
    from accelerate import Accelerator
    from accelerate.data_loader import DataLoaderShard

    prepared = []
    real = Accelerator.prepare
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *a, **k: prepared.extend(out := real(self, *a, **k)) or out)
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--max_train_steps", "1") == 0
    (loader,) = [x for x in prepared if isinstance(x, DataLoaderShard)]
    assert loader._non_blocking is True and loader.pin_memory == torch.cuda.is_available()


def test_sd2_v_prediction_with_the_usual_options(images, tmp_path):
    """SD2 768-v style (v-prediction) with bf16 autocast, gradient checkpointing, clip_skip, reg images with
    prior_loss_weight, per-epoch saves, sample images and TensorBoard logs, in one run."""
    model = str(tmp_path / "sd2v")
    write_tiny_model("sd2", model, v_parameterization=True)
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(reg / "r.png")
    ds = tmp_path / "ds.toml"
    ds.write_text(f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{images}"\n'
                  f'  class_tokens = "sks dog"\n  [[datasets.subsets]]\n  image_dir = "{reg}"\n'
                  f'  class_tokens = "dog"\n  is_reg = true\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 3 --s 2 --l 5\n")
    out = tmp_path / "out"
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", model, "--dataset_config", str(ds),
                              "--output_dir", str(out), "--output_name", "v", "--network_dim", "4",
                              "--max_train_epochs", "2", "--save_every_n_epochs", "1", "--mixed_precision", "bf16",
                              "--gradient_checkpointing", "--clip_skip", "2", "--prior_loss_weight", "0.5",
                              "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1",
                              "--logging_dir", str(tmp_path / "logs"), "--seed", "0"])
    assert rc == 0
    assert (out / "v-000001.safetensors").exists() and (out / "v.safetensors").exists()
    with safe_open(str(out / "v.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.prediction_type"] == "v"
    assert md["ss_num_reg_images"] == "1" and md["ss_prior_loss_weight"] == "0.5" and md["ss_clip_skip"] == "2"
    assert md["ss_mixed_precision"] == "bf16" and md["ss_gradient_checkpointing"] == "True"
    samples = os.listdir(out / "sample")
    assert len(samples) == 2 and all(s.startswith("v_e00000") and s.endswith("_3.png") for s in samples)
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(tmp_path / "logs") for f in fs)


def test_sample_prompts_are_read_again_at_each_sampling(tiny, images, tmp_path, monkeypatch, caplog, capsys):
    """As in sd-scripts: the prompt file is read at every sampling (edits during a run apply; a file broken mid-run
    keeps the last good prompts, with a warning); a sampler typo fails before training; a non-positive interval
    turns interval sampling off with a warning."""
    import library.sampling as sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first --w 64 --h 64 --s 1\n")
    seen = []

    edits = [b"second --w 64 --h 64 --s 1\n", b"broken --w abc\n", b"caf\xe9 --w 64\n", b"# all commented out\n"]

    def record(model, sample_prompts, **kw):
        seen.append([p.prompt for p in sample_prompts])
        if edits:
            prompts.write_bytes(edits.pop(0))  # an edit, a mistake, a non-UTF-8 save, an empty file
        return []

    monkeypatch.setattr(sampling, "sample_images", record)
    with caplog.at_level(logging.WARNING):
        assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "1", "--max_train_steps", "5") == 0
    assert seen == [["first"], ["second"], ["second"], ["second"], ["second"]]
    assert "--w expects an integer" in caplog.text and "holds no prompt now" in caplog.text
    assert caplog.text.count("sampling with the prompts read before") == 3
    prompts.write_text("first --w 64 --h 64 --s 1\n")
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "o2", "--sample_prompts", str(prompts),
                  "--sample_sampler", "eulr_a") == 2
    assert "--sample_sampler" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    seen.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "o3", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "0") == 0
    assert seen == [] and "--sample_every_n_steps 0 is not positive: sampling at intervals is off" in caplog.text


def test_sample_at_first_samples_before_the_first_step_of_each_run_resumed_too(tiny, images, tmp_path, monkeypatch):
    """--sample_at_first samples before step 1 (named epoch 0: sd-scripts' NAME_e000000_...), and on --resume before
    the first resumed step (named by the step it resumes from); the interval sampling of the resumed step is not
    repeated (the first run made it)."""
    import library.sampling as sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 1\n")
    seen = []
    monkeypatch.setattr(sampling, "sample_images",
                        lambda *a, step=None, epoch=None, **k: seen.append(step if epoch is None else f"e{epoch}") or [])
    common = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first")
    out = tmp_path / "out"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--save_state", "--save_every_n_steps", "2",
                  *common) == 0
    assert seen == ["e0", 2]
    seen.clear()
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--max_train_steps", "5", "--overwrite",
                  "--resume", str(out / "lora-step00000002-state"), *common) == 0
    assert seen == [2, 4]
    seen.clear()
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "o2", *common[:-1]) == 0
    assert seen == [2]  # without the flag: the intervals only


def test_schedule_free_optimizer_steps_in_train_mode_and_saves_and_samples_in_eval(tiny, images, tmp_path,
                                                                                    monkeypatch, caplog):
    """A schedule-free optimizer (here a stand-in, `--optimizer_type module.ClassScheduleFree`) is put in train mode
    before the first step, and every save, sampling and validation sees its eval weights (sd-scripts'
    optimizer_eval_fn / optimizer_train_fn); its learning rate is not scheduled."""
    from networks.lora import LoRANetwork
    import library.sampling as sampling

    (tmp_path / "fake_sf.py").write_text(
        "import torch\n"
        "MODES = []\n"
        "class FakeScheduleFree(torch.optim.SGD):\n"
        "    mode = 'eval'\n"
        "    def train(self):\n"
        "        self.mode = 'train'; MODES.append('train')\n"
        "    def eval(self):\n"
        "        self.mode = 'eval'; MODES.append('eval')\n"
        "    def step(self, closure=None):\n"
        "        assert self.mode == 'train', 'stepped in eval mode'\n"
        "        return super().step(closure)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_sf

    seen = []
    save = LoRANetwork.save_weights
    monkeypatch.setattr(LoRANetwork, "save_weights",
                        lambda self, *a, **k: (seen.append(("save", fake_sf.MODES[-1])), save(self, *a, **k))[1])
    monkeypatch.setattr(sampling, "sample_images", lambda *a, **k: seen.append(("sample", fake_sf.MODES[-1])) or [])
    import library.validation as validation

    monkeypatch.setattr(validation, "validation_loss", lambda *a, **k: seen.append(("validate", fake_sf.MODES[-1])) or 0.0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 1\n")
    with caplog.at_level(logging.WARNING):  # 3 images, 1 held out: 2 steps an epoch, validated at each epoch's end
        assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--validation_split", "0.4",
                      "--optimizer_type", "fake_sf.FakeScheduleFree", "--lr_scheduler", "cosine",
                      "--save_every_n_steps", "2", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1") == 0
    assert seen == [("sample", "eval"), ("save", "eval"), ("sample", "eval"), ("validate", "eval"),
                    ("sample", "eval"), ("validate", "eval"), ("save", "eval")]
    assert fake_sf.MODES[0] == "train" and fake_sf.MODES[-1] == "train"  # trained in train mode, left in it
    assert "sets its learning rate itself" in caplog.text


def test_sample_prior_grid_shows_prior_and_lora_at_the_same_seeds(tiny, images, tmp_path):
    """--sample_prior_grid: row 1 is the base model (LoRA off), row 2 the trained LoRA, same seed per column;
    the prior row equals a sample of the untouched base model; an existing grid needs --overwrite."""
    from library.model_util import load_model
    from library.sampling import SamplePrompt, generate_images

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --d 5 --s 2 --l 5\nsks dog --w 64 --h 64 --s 2 --l 5\n")
    out = tmp_path / "out"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--sample_prompts", str(prompts),
                  "--sample_prior_grid") == 0
    grid = Image.open(out / "lora_grid.png").convert("RGB")
    # 2 rows x 2 columns of 128-px cells (64-px samples upscaled) plus the label column and header
    assert grid.height > 2 * 128 and grid.width > 2 * 128
    base = load_model(tiny["sd1"])
    (prior_img, seed), = generate_images(base, [SamplePrompt("a photo of sks dog", width=64, height=64, seed=5,
                                                             steps=2, scale=5.0)])
    expected = np.asarray(prior_img.resize((128, 128), Image.NEAREST)).astype(int)
    g = np.asarray(grid).astype(int)
    # find the prior cell of column 1: the first 128x128 block right of the labels, in the first row
    hits = [(y, x) for y in range(0, g.shape[0] - 127) for x in range(0, g.shape[1] - 127, 1)
            if abs(g[y, x] - expected[0, 0]).sum() == 0 and abs(g[y:y + 128, x:x + 128] - expected).max() <= 1][:1]
    assert hits, "the prior row is not the base model's sample at the prompt's seed"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--sample_prompts", str(prompts),
                  "--sample_prior_grid") == 2  # lora.safetensors and the grid exist: refused without --overwrite
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "o2", "--sample_prior_grid") == 2


def test_prior_grid_shows_the_lora_at_the_network_multiplier(tiny, images, tmp_path, monkeypatch):
    """The grid's LoRA row is at --network_multiplier, as the samples are (it was always x1)."""
    import library.sampling as sampling

    seen = []
    real = sampling.prior_vs_lora_grid
    monkeypatch.setattr(sampling, "prior_vs_lora_grid",
                        lambda *a, multipliers=(0.0, 1.0), **k: (seen.append(multipliers), real(*a, multipliers=multipliers, **k))[1])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 1\n")
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--sample_prompts", str(prompts),
                  "--sample_prior_grid", "--network_multiplier", "0.5") == 0
    assert seen == [(0.0, 0.5)]


@pytest.mark.parametrize("extra, shuffle", [((), True), (("--apt", "--apt_prior_ahead"), True),
                                            (("--network_train_unet_only", "--cache_text_encoder_outputs"), False),
                                            (("--max_data_loader_n_workers", "1", "--persistent_data_loader_workers"),
                                             True)],
                         ids=["plain", "apt-prior-ahead", "text-encoder-cache", "loader-worker"])
def test_token_warmup_captions_follow_the_optimizer_step(tiny, images, tmp_path, monkeypatch, extra, shuffle):
    """token_warmup_step = 4, token_warmup_min = 1, keep_tokens = 1 on "sks dog , a, b, c, d": the caption the text
    encoder reads at step s keeps floor(s * 3 / 4) + 1 of a, b, c, d (in caption order, shuffled after): 1, 1, 2, 3,
    then all. With --apt_prior_ahead the next batch's class prompt c is made a step early, from its final caption."""
    from apt_ext.prompts import class_prompts

    seen, priors = [], []
    real_text, real_base = train_apt_lora.TrainContext.encode_text, train_apt_lora.TrainContext.encode_base_text

    def encode_text(self, captions):
        if torch.is_grad_enabled():  # c*: the plain or fine-tuned pass (the prior pass runs without grad)
            seen.append(list(captions))
        return real_text(self, captions)

    def encode_base_text(self, captions):
        priors.append(list(captions))
        return real_base(self, captions)

    monkeypatch.setattr(train_apt_lora.TrainContext, "encode_text", encode_text)
    monkeypatch.setattr(train_apt_lora.TrainContext, "encode_base_text", encode_base_text)
    dataset = _dataset(tmp_path, images, caption_suffix=", a, b, c, d", keep_tokens=1, token_warmup_step=4,
                       shuffle_caption=shuffle)
    assert _train(tiny["sd1"], dataset, tmp_path / "out", "--max_train_steps", "5", *extra) == 0
    assert len(seen) == 5 and all(len(c) == 1 for c in seen)
    tags = [c[0].split(", ") for c in seen]
    assert all(t[0] == "sks dog" for t in tags)
    assert [sorted(t[1:]) for t in tags] == [["a"], ["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]]
    if not shuffle:
        assert [c[0] for c in seen] == ["sks dog, a", "sks dog, a", "sks dog, a, b", "sks dog, a, b, c",
                                        "sks dog, a, b, c, d"]
    if "--apt" in extra:  # c of each step from that step's c* ("sks dog" -> "dog"), c of steps 1-5 made a step early
        assert priors[:5] == [class_prompts(c, ["sks dog"]) for c in seen]
        assert priors[0] == [seen[0][0].replace("sks dog", "dog")]
        (peeked,) = priors[5]  # step 5's batch, prepared at step 4 (the last), never trained: all its tags
        assert sorted(peeked.split(", ")) == ["a", "b", "c", "d", "dog"]


def test_token_warmup_steps_count_accumulation_and_resume_exactly(tiny, images, tmp_path, monkeypatch):
    """--gradient_accumulation_steps 2 over 3 batches an epoch: 2 optimizer steps an epoch, micro-batches at steps
    0 0 1 | 2 2 3 | 4 4, so their flex tags (floor(s * 3 / 4) + 1, all from step 4) are 1 1 1 | 2 2 3 | 4 4; a run
    resumed from the state saved at step 3 (mid-epoch: after 2 micro-batches of epoch 2) sees the same captions as
    the uninterrupted run from there on."""
    seen = []
    real = train_apt_lora.TrainContext.encode_text

    def encode_text(self, captions):
        seen.append(captions[0])
        return real(self, captions)

    monkeypatch.setattr(train_apt_lora.TrainContext, "encode_text", encode_text)
    dataset = _dataset(tmp_path, images, caption_suffix=", a, b, c, d", keep_tokens=1, token_warmup_step=4,
                       shuffle_caption=True)
    common = ("--max_train_steps", "5", "--gradient_accumulation_steps", "2")
    assert _train(tiny["sd1"], dataset, tmp_path / "out", *common, "--save_every_n_steps", "3", "--save_state") == 0
    straight, seen[:] = list(seen), []
    assert [len(c.split(", ")) - 1 for c in straight] == [1, 1, 1, 2, 2, 3, 4, 4]
    assert _train(tiny["sd1"], dataset, tmp_path / "resumed", *common, "--resume",
                  str(tmp_path / "out" / "lora-step00000003-state")) == 0
    assert seen == straight[5:]


def test_fp16_on_the_cpu_trains_and_says_it_is_slow_there(tiny, images, tmp_path, caplog):
    """--mixed_precision fp16 without a GPU (a GPU command line run on a CPU machine) trains, with a warning that
    fp16 is slow on a CPU and what to use instead (it ran without a word)."""
    import logging

    with caplog.at_level(logging.WARNING):
        assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--mixed_precision", "fp16",
                      "--max_train_steps", "1") == 0
    assert "--mixed_precision fp16 on the CPU" in caplog.text and "--mixed_precision no (or bf16)" in caplog.text


@pytest.mark.parametrize("flags, said, enabled", [
    (["--text_encoder_lr", "0"], "on: --unet_cuda_graph; off: --text_encoder_cuda_graph (no text-encoder LoRA trains), "
                                 "--apt_cuda_graph (APT is off)", ["unet"]),
    (["--network_dropout", "0.1"], "on: none; off: --unet_cuda_graph (LoRA dropout), --text_encoder_cuda_graph "
                                   "(LoRA dropout), --apt_cuda_graph (APT is off)", [])])
def test_cuda_graphs_auto_decides_on_what_the_run_really_trains(tiny, images, tmp_path, capsys, monkeypatch, flags,
                                                                said, enabled):
    """--cuda_graphs auto on CUDA turns on only the recordings this run can use, and their set-up must not stop it:
    - it decided before the learning rates froze the LoRA of --text_encoder_lr 0, so it turned on the text-encoder
      graph, whose set-up then stopped the run ("no text-encoder LoRA trains");
    - with --network_dropout the UNet and text-encoder recordings cannot draw dropout per call: both stay off (the
      prior pass runs with the LoRA off: unaffected), else their set-up blames a flag the user never set.
    The decision is made as on CUDA here; recording graphs is left out (CPU)."""
    import library.unet_graph as unet_graph

    real = unet_graph.auto_cuda_graphs
    monkeypatch.setattr(unet_graph, "auto_cuda_graphs", lambda args, device_type, *rest: real(args, "cuda", *rest))
    got = []
    monkeypatch.setattr(train_apt_lora.TrainContext, "enable_unet_graph", lambda self, *a, **k: got.append("unet"))
    monkeypatch.setattr(train_apt_lora.TrainContext, "enable_te_graph", lambda self, *a, **k: got.append("te"))
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--cuda_graphs", "auto", *flags,
                  "--max_train_steps", "1") == 0
    assert f"--cuda_graphs auto: {said}" in capsys.readouterr().out
    assert got == enabled


def test_a_path_the_console_cannot_encode_is_printed_escaped(tiny_world, tmp_path, monkeypatch):
    """stdout in a legacy code page (a Windows console or a pipe in cp1252) could not encode "saved .../Дом/..."
    and the UnicodeEncodeError stopped the run after its first save. Such characters print escaped now."""
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                tiny_world.dataset, "--output_dir", str(tmp_path / "Дом"), "--max_train_steps", "2",
                                "--save_every_n_steps", "1"]) == 0
    out.flush()
    assert "saved " + str(tmp_path / "\\u0414\\u043e\\u043c") in out.buffer.getvalue().decode("cp1252")


@pytest.mark.parametrize("max_grad_norm, expected", [(0.0, [0.85, 1.8]), (1.0, [0.94, 1.92])])
def test_accumulated_micro_batches_step_once_on_the_mean_gradient_clipped_to_max_grad_norm(max_grad_norm, expected):
    """--gradient_accumulation_steps 2: one optimizer step on the mean of the two micro-batches' gradients (not their
    sum, which would double the step of an SGD-style optimizer), that mean clipped to --max_grad_norm (0: not at all).
    Hand-computed: loss w·x with x = (3, 0) then (0, 4): mean gradient (1.5, 2), norm 2.5; SGD at lr 0.1 from
    w = (1, 2) gives (0.85, 1.8), clipped to norm 1 the gradient is (0.6, 0.8) and w = (0.94, 1.92)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ctx = SimpleNamespace(accelerator=accelerator, network=net, window_losses=[], window_keys=[], keep_grads=False)
    opt = accelerator.prepare(torch.optim.SGD(net.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    statuses = []
    for x in ([3.0, 0.0], [0.0, 4.0]):
        step = lambda args, ctx, batch, x=x: (net(torch.tensor([x])).sum(), {})  # noqa: E731
        res = train_apt_lora.micro_batch(SimpleNamespace(max_grad_norm=max_grad_norm), ctx, {"image_keys": ["a"]},
                                         opt, sched, list(net.parameters()), step_fn=step)
        statuses.append(res.status)
    assert statuses == ["accumulating", "stepped"]
    assert net.weight.detach()[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_sample_every_n_epochs_samples_at_those_epochs_ends(tiny, images, tmp_path, monkeypatch):
    """--sample_every_n_epochs 2 over 3 epochs: one sampling, at the end of epoch 2, named by that epoch
    (sd-scripts' NAME_e000002_...). (Batch 3 of the 3 images: one step an epoch.)"""
    import library.sampling as sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 1\n")
    seen = []
    monkeypatch.setattr(sampling, "sample_images",
                        lambda *a, step=None, epoch=None, **k: seen.append(step if epoch is None else f"e{epoch}") or [])
    dataset = _dataset(tmp_path, images)
    with open(dataset) as f:
        text = f.read()
    with open(dataset, "w") as f:
        f.write(text.replace("batch_size = 1", "batch_size = 3"))
    assert _train(tiny["sd1"], dataset, tmp_path / "out", "--sample_prompts", str(prompts),
                  "--sample_every_n_epochs", "2") == 0
    assert seen == ["e2"]
