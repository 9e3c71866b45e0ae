"""Tiny models: real block layouts, working tokenizers, and the writer CLI."""
import os
import subprocess
import sys

import pytest
import torch

from library.model_util import arch_config, load_model
from library.tiny_models import build_tiny_model, main, tiny_config, write_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_keeps_real_block_layout(arch):
    real, tiny = arch_config(arch), tiny_config(arch)
    for k in ["down_block_types", "up_block_types", "mid_block_type", "layers_per_block", "use_linear_projection",
              "addition_embed_type"]:
        assert real["unet"].get(k) == tiny["unet"].get(k), k
    assert real["text_encoder"]["hidden_act"] == tiny["text_encoder"]["hidden_act"]
    m = build_tiny_model(arch)
    assert len(m.text_encoders) == (2 if arch == "sdxl" else 1)
    assert sum(p.numel() for p in m.unet.parameters()) < 5_000_000
    if arch == "sdxl":
        assert len(m.unet.down_blocks[0].attentions if hasattr(m.unet.down_blocks[0], "attentions") else []) == 0
        assert len(m.unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert m.tokenizers[0]("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert all(not p.requires_grad for p in m.unet.parameters())


def test_the_bundled_tokenizer_leaves_no_temp_folder_behind(tmp_path, monkeypatch):
    """Every run with a single-file checkpoint builds it: each used to leave 1.5 MB in the temp dir for good."""
    import tempfile

    from library.clip_tokenizer import bundled_clip_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok = bundled_clip_tokenizer(pad_token="!")
    assert os.listdir(tmp_path) == []
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # read before removal
    assert tok.pad_token == "!"
    tok.save_pretrained(tmp_path / "saved")  # a pipeline save still writes the vocabulary
    assert tok.__class__.from_pretrained(tmp_path / "saved")("a dog").input_ids == [49406, 320, 1929, 49407]


def test_same_seed_same_weights():
    a, b = build_tiny_model("sd1", seed=3), build_tiny_model("sd1", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_write_tiny_model_v_prediction_both_forms(tmp_path):
    folder = write_tiny_model("sd2", tmp_path / "sd2v", v_parameterization=True)
    file = write_tiny_model("sd2", tmp_path / "sd2v.safetensors", single_file=True, v_parameterization=True)
    for p in [folder, file]:
        m = load_model(p)
        assert m.arch == "sd2" and m.v_parameterization


def test_cli_main(tmp_path, capsys):
    out = str(tmp_path / "sdxl.safetensors")
    assert main(["--arch", "sdxl", "--out", out, "--single_file", "--seed", "5"]) == 0
    assert "wrote tiny sdxl model" in capsys.readouterr().out and os.path.isfile(out)
    assert main(["--arch", "sdxl", "--out", out, "--single_file"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--arch", "sd1", "--out", out, "--single_file", "--overwrite", "--v_parameterization"]) == 0
    m = load_model(out)
    assert m.arch == "sd1" and m.v_parameterization
    with pytest.raises(SystemExit):
        main(["--arch", "sd1", "--out", str(tmp_path / "x"), "--single_file"])  # needs .safetensors
    with pytest.raises(SystemExit):
        main(["--arch", "sd1", "--out", str(tmp_path / "x.safetensors")])  # a file path without --single_file
    with pytest.raises(SystemExit):
        main(["--arch", "sd3", "--out", str(tmp_path / "x")])


def test_cli_as_module(tmp_path):
    """`python -m library.tiny_models` writes a diffusers folder."""
    out = tmp_path / "sd1"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "library.tiny_models", "--arch", "sd1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote tiny sd1 model (diffusers folder" in r.stdout
    for sub in ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        assert os.path.exists(out / sub)
    assert load_model(str(out)).arch == "sd1"
