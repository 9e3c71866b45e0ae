"""--debug_dataset (library/debug_dataset.py): every batch printed with its processed caption and APT's class
prompt, the images written as the trainer gets them, nothing trained; a used folder is not written over."""
import numpy as np
from PIL import Image

import train_apt_lora
from tests.test_train_e2e import _dataset


def test_debug_dataset_prints_batches_and_writes_images(tiny, images, tmp_path, capsys, monkeypatch):
    from library import model_util

    def no_load(*a, **k):
        raise AssertionError("--debug_dataset loaded the model")

    monkeypatch.setattr(model_util, "load_model", no_load)  # as in sd-scripts: the dataset only, in seconds
    ds = _dataset(tmp_path, images, flip_aug=True)
    png = tmp_path / "png"
    argv = ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", ds, "--debug_dataset", "--apt",
            "--debug_dataset_dir", str(png), "--seed", "3"]
    assert train_apt_lora.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("epoch 1, batch ") == 3 and "epoch 1, batch 3/3: bucket 64x64 (w x h), 1 image(s)" in out
    assert out.count("      caption: 'sks dog'") == 3  # no caption files: the class tokens
    assert out.count("      APT class prompt c: 'dog'") == 3
    assert "original 72x80, SDXL crop conditioning (top, left) (" in out  # sd-scripts' value, not the pixel crop
    files = sorted(p.name for p in png.iterdir())
    assert files == ["e1-b1-0.png", "e1-b2-0.png", "e1-b3-0.png"]
    arr = np.asarray(Image.open(png / files[0]))
    assert arr.shape == (64, 64, 3) and arr.std() > 20  # the random photo, not a blank
    assert not (tmp_path / "out").exists()

    assert train_apt_lora.main(argv) == 2  # the folder has images now
    assert f"--debug_dataset_dir {png} is not empty: choose a new folder, or pass --overwrite" in capsys.readouterr().err
    assert train_apt_lora.main(argv + ["--overwrite"]) == 0
    assert train_apt_lora.main(argv[:4] + ["--debug_dataset_dir", str(tmp_path / "new")]) == 2
    assert "--debug_dataset_dir is where --debug_dataset writes the images: add --debug_dataset" in \
        capsys.readouterr().err


def test_debug_dataset_shows_captions_as_after_the_token_warmup(tiny, images, tmp_path, capsys):
    ds = _dataset(tmp_path, images, caption_suffix=", a, b, c", keep_tokens=1, token_warmup_step=100)
    argv = ["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config", ds, "--debug_dataset", "--apt"]
    assert train_apt_lora.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("      caption: 'sks dog, a, b, c'") == 3  # whole (re-joined), not the step-0 'sks dog, a'
    assert out.count("      APT class prompt c: 'dog, a, b, c'") == 3
