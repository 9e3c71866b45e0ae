"""Toy-world benchmark (issue 4): the metrics against hand-computed values, and a 2-step run of the whole
evaluation pipeline (train with train_apt_lora.py, sample, judge, report) on a reduced model."""
import json
import os

import numpy as np
import pytest
import torch

from bench.toyworld import evaluate as E
from bench.toyworld import metrics as M
from bench.toyworld import pretrain as P


def test_attribute_accuracy_counts_named_attributes_only():
    prompts = ["a sks backpack on grass", "a small red kite at the top left"]
    pred = {"cls": ["backpack", "kite"], "background": ["snow", "water"], "size": ["small", "large"],
            "colour": ["blue", "red"], "position": ["center", "top left"]}
    acc, per = M.attribute_accuracy(prompts, pred)
    # prompt 1 names cls (right) and background (wrong); prompt 2 cls, size (wrong), colour, position (right)
    assert acc == pytest.approx(4 / 6)
    assert per == {"cls": 1.0, "background": 0.0, "size": 0.0, "colour": 1.0, "position": 1.0}
    assert M.named_attributes("a sks backpack") == {"cls": "backpack"}  # not the subject's implied colour


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert M.frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    # k=1 radii: real 1,1,1,1; fake 9.5, 9.5. fake 0.5 is inside real balls, 10 is not -> precision 1/2;
    # every real point is within 9.5 of fake 0.5 -> recall 1
    assert M.precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_layout_and_rate():
    pred = {"size": ["small", "large", "large"], "position": ["center", "left", "center"]}
    assert M.layout(pred, [0, 1, 2]) == (pytest.approx(4 / 3), pytest.approx(2 / 3))
    assert M.rate([True, False, True], [0, 1]) == 0.5 and np.isnan(M.rate([True], []))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tw")
    cfg = P.PretrainConfig(image_size=32, vae_steps=2, vae_batch_size=4, vae_channels=(16, 16, 16), n_images=8,
                           steps=2, batch_size=4, warmup_steps=1, unet_channels=(32, 32, 32, 32), te_hidden=32,
                           te_layers=1)
    return P.pretrain(cfg, str(root / "model"), str(root / "work"), log_every=100, workers=0, vae_check_n=0)


def test_sampler_is_seeded_per_image(small_model):
    model = E.load(small_model)
    a = E.sample(model, ["a kite", "a boat"], [3, 4], steps=2, guidance=3.0)
    b = E.sample(model, ["a boat"], [4], steps=2, guidance=3.0, batch=1)
    assert a.shape == (2, 3, 32, 32) and 0 <= float(a.min()) and float(a.max()) <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # same (prompt, seed): same image, any batching


def test_two_step_pipeline_writes_the_report(small_model, tmp_path):
    s = E.Settings(model=small_model, methods=("dreambooth", "dreambooth_pp", "dco", "apt"), seeds=(0, 1), steps=2,
                   n_per_prompt=1, sample_steps=2, n_reg=2, quality_n=4, context_n=2, judge_n=8, noise_draws=1)
    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    from dataclasses import replace

    # a train-only process (as several run in parallel) fills the work dir; the full run then finds its LoRAs
    assert E.evaluate(replace(s, methods=("dco",)), work, res, "tw", log=lambda *_: None, train_only=True) is None
    assert not os.path.exists(os.path.join(res, "tw.md"))
    first = []
    path = E.evaluate(s, work, res, "tw", log=first.append)
    assert sum("cached" in line for line in first) == 2  # dco, seeds 0 and 1
    md = open(path, encoding="utf-8").read()
    for label in ("DreamBooth", "DreamBooth + prior pres.", "DCO", "APT (ATA+RS+AA)", "ΔNoise", "γ per bin"):
        assert label in md
    raw = json.load(open(os.path.join(res, "tw.json")))
    assert set(raw["results"]) == {"dreambooth", "dreambooth_pp", "dco", "apt"}
    assert all(len(v) == 2 for v in raw["results"].values())  # one row per seed
    assert len(raw["delta_noise"]["apt"][0]) == 10 and set(raw["gamma_final"]) == set(raw["results"])
    for f in ("grid.png", "delta_noise.png", "gamma_apt.png", "prior_samples.png"):
        assert os.path.getsize(os.path.join(res, "tw", f)) > 0
    # the LoRAs are real trainer outputs: kohya keys, the method's APT metadata
    from safetensors import safe_open

    with safe_open(os.path.join(work, "runs", "apt-s0", "lora.safetensors"), "pt") as f:
        assert f.metadata()["apt_components"] == "ata,rs,aa"
        assert any(k.startswith("lora_unet_") for k in f.keys())
    with safe_open(os.path.join(work, "runs", "dco-s1", "lora.safetensors"), "pt") as f:
        assert f.metadata()["apt_loss_type"] == "dco"
    assert len([f for f in os.listdir(os.path.join(work, "reg")) if f.endswith((".png", ".txt"))]) == 4  # 2 + 2
    with safe_open(os.path.join(work, "runs", "dreambooth_pp-s0", "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "2"  # prior preservation really trained with the reg images
    with safe_open(os.path.join(work, "runs", "dreambooth-s0", "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "0"
    # a second run reuses the trained LoRAs (cached by their arguments)
    logs = []
    E.evaluate(s, work, res, "tw", log=logs.append)
    assert sum("cached" in line for line in logs) == 8
    # ... and by the model's content: runs and reg images of another model (same path) are not reused
    fp = E.model_fingerprint(small_model)
    assert json.load(open(os.path.join(work, "runs", "apt-s0", "argv.json")))["model"] == fp
    assert json.load(open(os.path.join(work, "reg", "stamp.json")))["model"] == fp
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(small_model, other)
    assert E.model_fingerprint(other) == fp  # where it lies does not count, what it holds does
    with open(os.path.join(other, "toyworld.json"), "a", encoding="utf-8") as f:
        f.write("\n")
    assert E.model_fingerprint(other) != fp


def test_text_encoder_lora_is_trained_and_applied_when_asked(small_model, tmp_path, caplog):
    """--train_text_encoder: the runs train a text-encoder LoRA too, and the evaluation applies it (it was once
    loaded into a UNet-only network, which drops those weights with a warning)."""
    import logging

    from safetensors import safe_open

    s = E.Settings(model=small_model, methods=("dreambooth",), seeds=(0,), steps=2, n_per_prompt=1, sample_steps=2,
                   quality_n=4, context_n=2, judge_n=8, noise_draws=1, text_encoder=True)
    assert "--network_train_unet_only" not in s.trainer_args()
    assert "--network_train_unet_only" in E.Settings().trainer_args()
    work = str(tmp_path / "work")
    with caplog.at_level(logging.WARNING):
        E.evaluate(s, work, str(tmp_path / "res"), "te", log=lambda *_: None)
    with safe_open(os.path.join(work, "runs", "dreambooth-s0", "lora.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys())
    assert "they are ignored" not in caplog.text


def test_tag_captions_are_written_and_trained_apart_from_the_prompt_captions(small_model, tmp_path):
    """--reference_captions tags: the references say "sks, backpack", and a LoRA trained on "a sks backpack" is
    not served from the cache for them (the captions are in the run's key, not only the dataset TOML)."""
    from dataclasses import replace

    s = E.Settings(model=small_model, methods=("apt",), seeds=(0,), steps=1, n_per_prompt=1, sample_steps=2,
                   quality_n=4, context_n=2, judge_n=8, noise_draws=1)
    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    caption = os.path.join(work, "refs", "ref_0.txt")
    E.evaluate(s, work, res, "p", log=lambda *_: None, train_only=True)
    assert open(caption, encoding="utf-8").read() == "a sks backpack\n"
    logs = []
    E.evaluate(replace(s, reference_captions="tags"), work, res, "t", log=logs.append, train_only=True)
    assert open(caption, encoding="utf-8").read() == "sks, backpack\n"
    assert not any("cached" in line for line in logs) and any("[train] apt seed 0" in line for line in logs)
    with pytest.raises(ValueError, match="'tag'.*'prompt' or 'tags'"):
        E.write_references(s.subject, 32, str(tmp_path / "x"), captions="tag")


def test_another_subject_in_the_same_work_dir_trains_again(small_model, tmp_path):
    """The run cache's key held the dataset TOML, which names the reference folder but not what is in it: with
    --subject backpack,blue,stripes in a work dir of checker runs, the checker LoRAs were reused without a word."""
    from dataclasses import replace

    from bench.toyworld import world as W

    s = E.Settings(model=small_model, methods=("dreambooth",), seeds=(0,), steps=1, n_per_prompt=1, sample_steps=2,
                   quality_n=4, context_n=2, judge_n=8, noise_draws=1)
    work, res = str(tmp_path / "work"), str(tmp_path / "res")
    E.evaluate(s, work, res, "c", log=lambda *_: None, train_only=True)
    logs = []
    E.evaluate(replace(s, subject=W.SubjectSpec(pattern="stripes")), work, res, "s", log=logs.append, train_only=True)
    assert not any("cached" in line for line in logs) and any("[train] dreambooth seed 0" in line for line in logs)
    logs = []
    E.evaluate(replace(s, subject=W.SubjectSpec(pattern="stripes")), work, res, "s", log=logs.append, train_only=True)
    assert any("cached" in line for line in logs)  # the same pictures again: reused


BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "models", "toyworld-sd1")


def test_bundled_model_loads_as_sd1_from_folder_and_single_file(tmp_path):
    """The README's model: examples/models/toyworld-sd1 (fp16 diffusers folder, <= 30 MB) read by the trainer's
    loader as SD1, and the same weights through the single-file (LDM) path."""
    from library.model_util import load_model, save_single_file

    assert P.folder_megabytes(BUNDLED) <= 30
    info = json.load(open(os.path.join(BUNDLED, "toyworld.json")))
    assert info["config"]["image_size"] == 32
    from safetensors import safe_open

    for part in ("unet", "vae", "text_encoder"):  # shipped in fp16 ...
        folder = os.path.join(BUNDLED, part)
        (name,) = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        with safe_open(os.path.join(folder, name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, part
    m = load_model(BUNDLED)  # ... and loaded in fp32, as the loader does for every checkpoint (train_apt_lora casts later)
    assert m.arch == "sd1" and not m.v_parameterization and m.unet.dtype == torch.float32
    assert m.latent_scale == pytest.approx(info["latent_scaling_factor"], rel=1e-6) and m.latent_scale != 1.0
    f = save_single_file(m, str(tmp_path / "toyworld.safetensors"))
    m2 = load_model(f)
    assert m2.arch == "sd1"
    for a, b in ((m.unet, m2.unet), (m.vae, m2.vae), (m.text_encoders[0], m2.text_encoders[0])):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    assert m2.tokenizers[0]("a sks backpack").input_ids == m.tokenizers[0]("a sks backpack").input_ids
