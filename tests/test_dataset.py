"""DatasetGroup: images, captions, reg images, batches, size conditioning, latent caching, metadata."""
import argparse
import json
import random
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from library.config_util import ConfigError, generate_blueprint
from library.dataset import build_dataset_group, collate_batch


def img(path, w=64, h=64, color=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.empty((h, w, 3), np.uint8)
        arr[:] = color
    Image.fromarray(arr).save(path)
    return path


def group(subsets, *, general=None, dataset=None, is_sdxl=False, seed=0, prior_loss_weight=1.0, args=None):
    cfg = {"general": {"resolution": 64, **(general or {})},
           "datasets": [{**(dataset or {}), "subsets": subsets}]}
    bps = generate_blueprint(cfg, args or argparse.Namespace(), config_path="test.toml")
    return build_dataset_group(bps, is_sdxl=is_sdxl, seed=seed, prior_loss_weight=prior_loss_weight)


def cache_file(folder, stem, arch="sd"):
    """The one latent cache file `<stem>_<8 hex digits>_<arch>.safetensors` in `folder` (stem: name_WWWWxHHHH)."""
    import re

    found = [f for f in os.listdir(folder) if re.fullmatch(rf"{stem}_[0-9a-f]{{8}}_{arch}\.safetensors", f)]
    assert len(found) == 1, sorted(os.listdir(folder))
    return folder / found[0]


def all_samples(g):
    out = []
    for i in range(len(g)):
        b = g[i]
        out += list(zip(b["image_keys"], b["captions"], b["is_reg"].tolist(), b["loss_weights"].tolist()))
    return out


@pytest.fixture(scope="module")
def vae():
    from library.tiny_models import build_tiny_model
    return build_tiny_model("sd1").vae


# -- images and captions -----------------------------------------------------------------------------------------------

def test_caption_file_then_class_tokens_then_error(tmp_path):
    d = tmp_path / "train"
    img(d / "a.png"), img(d / "b.jpg", seed=1)
    (d / "a.txt").write_text("sks dog, on grass\n", encoding="utf-8")
    g = group([{"image_dir": str(d), "class_tokens": "sks dog", "caption_extension": ".txt"}])
    caps = {os.path.basename(k): c for k, c, *_ in all_samples(g)}
    assert caps == {"a.png": "sks dog, on grass", "b.jpg": "sks dog"}
    with pytest.raises(ConfigError) as e:
        group([{"image_dir": str(d), "caption_extension": ".txt"}])
    msg = str(e.value)
    assert "b.jpg" in msg and "class_tokens" in msg and "datasets[0].subsets[0]" in msg


def test_missing_or_empty_image_dir(tmp_path):
    with pytest.raises(ConfigError) as e:
        group([{"image_dir": str(tmp_path / "nope"), "class_tokens": "x"}])
    assert "`datasets[0].subsets[0].image_dir`" in str(e.value) and "folder not found" in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    img(tmp_path / "empty" / "sub" / "deep.png")  # not searched: non-recursive like sd-scripts
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"no images .* directly in this folder"):
        group([{"image_dir": str(tmp_path / "empty"), "class_tokens": "x"}])


def test_truncated_image_skipped_with_warning_then_all_bad_fails(tmp_path, caplog):
    d = tmp_path / "train"
    img(d / "good.png")
    bad = img(d / "bad.png", seed=3)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (d / "junk.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(d), "class_tokens": "x"}])
    assert "bad.png" in caplog.text and "junk.jpg" in caplog.text
    assert [os.path.basename(k) for k, *_ in all_samples(g)] == ["good.png"]
    os.remove(d / "good.png")
    with pytest.raises(ConfigError, match=r"none of its 2 images can be read"):
        group([{"image_dir": str(d), "class_tokens": "x"}])


def test_reg_images_repeated_to_match_train_count(tmp_path):
    for i in range(3):
        img(tmp_path / "train" / f"{i}.png", seed=i)
    for i in range(4):
        img(tmp_path / "reg" / f"{i}.png", seed=10 + i)
    g = group([{"image_dir": str(tmp_path / "train"), "class_tokens": "sks dog", "num_repeats": 2},
               {"image_dir": str(tmp_path / "reg"), "class_tokens": "dog", "is_reg": True}],
              prior_loss_weight=0.5)
    assert (g.num_train_images, g.num_reg_images) == (6, 4)
    samples = all_samples(g)
    counts = {}
    for key, cap, reg, w in samples:
        counts[os.path.relpath(key, tmp_path)] = counts.get(os.path.relpath(key, tmp_path), 0) + 1
        assert w == (0.5 if reg else 1.0) and cap == ("dog" if reg else "sks dog")
    # train: 3 x 2 = 6; reg: 4 registered once (4), then +1 round-robin until 6 -> [2, 2, 1, 1]
    assert counts == {"train/0.png": 2, "train/1.png": 2, "train/2.png": 2,
                      "reg/0.png": 2, "reg/1.png": 2, "reg/2.png": 1, "reg/3.png": 1}


def test_reg_images_truncated_when_more_than_train(tmp_path, caplog):
    img(tmp_path / "train" / "0.png")
    for i in range(4):
        img(tmp_path / "reg" / f"{i}.png", seed=10 + i)
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(tmp_path / "train"), "class_tokens": "x", "num_repeats": 2},
                   {"image_dir": str(tmp_path / "reg"), "class_tokens": "y", "is_reg": True}])
    reg_keys = sorted(os.path.basename(k) for k, _, reg, _ in all_samples(g) if reg)
    assert reg_keys == ["0.png", "1.png"] and "not used" in caplog.text


def test_reg_images_with_their_own_repeats_balance_as_sd_scripts(tmp_path):
    """Reg images with num_repeats > 1: sd-scripts counts each one's repeats in the first round, then adds one repeat
    per image round-robin until the train count is met, and reports num_reg_images = repeats x images. Counting the
    first round as one per image trains more reg samples than train samples (a stronger prior than asked) and
    writes a wrong ss_num_reg_images."""
    for i in range(3):
        img(tmp_path / "train" / f"{i}.png", seed=i)
    for i in range(2):
        img(tmp_path / "reg" / f"{i}.png", seed=10 + i)
    g = group([{"image_dir": str(tmp_path / "train"), "class_tokens": "sks dog", "num_repeats": 3},
               {"image_dir": str(tmp_path / "reg"), "class_tokens": "dog", "is_reg": True, "num_repeats": 2}])
    # train 3 x 3 = 9; reg 2 x 2 = 4 in the first round (n = 4), then +1 each: reg0 3 (5), reg1 3 (6), reg0 4 (7),
    # reg1 4 (8), reg0 5 (9): stop -> reg0 5, reg1 4, 9 reg samples for 9 train samples
    assert (g.num_train_images, g.num_reg_images) == (9, 4)
    counts = {}
    for key, _, reg, _ in all_samples(g):
        name = os.path.relpath(key, tmp_path)
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"train/0.png": 3, "train/1.png": 3, "train/2.png": 3, "reg/0.png": 5, "reg/1.png": 4}
    md = g.metadata()
    assert md["ss_num_train_images"] == "9" and md["ss_num_reg_images"] == "4"


def test_finetuning_num_repeats_count_in_the_epoch_and_the_metadata(tmp_path):
    """A fine-tuning (metadata_file) subset with num_repeats 3: each image trains 3 times per epoch and
    num_train_images (ss_num_train_images, the step count users read) is images x repeats, as in sd-scripts."""
    d = tmp_path / "ft"
    img(d / "one.png"), img(d / "two.png", seed=2)
    (tmp_path / "md.json").write_text(json.dumps({"one": {"caption": "a"}, "two": {"caption": "b"}}))
    g = group([{"image_dir": str(d), "metadata_file": str(tmp_path / "md.json"), "num_repeats": 3}])
    keys = [k for k, *_ in all_samples(g)]
    assert sorted(keys) == ["one"] * 3 + ["two"] * 3
    assert g.num_train_images == 6 and g.metadata()["ss_num_train_images"] == "6"


def test_finetuning_metadata(tmp_path):
    d = tmp_path / "ft"
    img(d / "one.png"), img(d / "two.jpg", seed=2)
    md = {"one": {"caption": "a photo", "tags": "red, car"}, str(d / "two.jpg"): {"tags": "blue, bike"},
          "missing": {"caption": "x"}}
    (tmp_path / "md.json").write_text(json.dumps(md))
    g = group([{"image_dir": str(d), "metadata_file": str(tmp_path / "md.json")}])
    caps = dict((k, c) for k, c, *_ in all_samples(g))
    assert caps == {"one": "a photo,red, car", str(d / "two.jpg"): "blue, bike"}  # caption + "," + tags: sd-scripts
    img(d / "one.jpg", seed=3)  # a key that names two files: the first in sorted order (sd-scripts' glob_images)
    g = group([{"image_dir": str(d), "metadata_file": str(tmp_path / "md.json")}])
    assert g.datasets[0].images["one"].path == str(d / "one.jpg")
    b = g[0]
    assert b["class_tokens"] == [None] and b["prior_class_tokens"] == [None]
    (tmp_path / "bad.json").write_text('{"one": {"caption": "x"},}')
    with pytest.raises(ConfigError, match=r"bad.json:1:\d+: JSON syntax error"):
        group([{"image_dir": str(d), "metadata_file": str(tmp_path / "bad.json")}])


def test_skip_image_resolution_leaves_out_small_originals(tmp_path, caplog):
    """sd-scripts' skip_image_resolution: an image whose original area is at most w*h is left out (reg images too);
    from the dataset table, [general] or --skip_image_resolution; everything left out is an error that names it."""
    d, r = tmp_path / "train", tmp_path / "reg"
    for name, (w, h) in {"big": (80, 72), "square": (64, 64), "small": (48, 48), "wide": (96, 40)}.items():
        img(d / f"{name}.png", w, h)  # areas 5760, 4096 (= 64 x 64: left out), 2304, 3840
    img(r / "r1.png", 64, 64), img(r / "r2.png", 72, 72, seed=3)
    subsets = [{"image_dir": str(d), "class_tokens": "sks dog"},
               {"image_dir": str(r), "class_tokens": "dog", "is_reg": True}]
    enlarge = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128}

    def names(g):
        return sorted(os.path.basename(k) for ds in g.datasets for k in ds.images)

    assert names(group(subsets, general=enlarge)) == ["big.png", "r1.png", "r2.png", "small.png", "square.png",
                                                      "wide.png"]
    with caplog.at_level(logging.INFO):
        g = group(subsets, general=enlarge, dataset={"skip_image_resolution": 64})
    assert names(g) == ["big.png", "r2.png"]
    assert "datasets[0].subsets[0] in test.toml: 3 of its 4 images left out by skip_image_resolution 64x64" in caplog.text
    assert json.loads(g.metadata()["ss_datasets"])[0]["skip_image_resolution"] == [64, 64]
    wide_only = group(subsets, general={**enlarge, "skip_image_resolution": [96, 40]})  # 3840: equal is left out
    assert names(wide_only) == ["big.png", "r1.png", "r2.png", "square.png"]
    cli = argparse.Namespace(skip_image_resolution="50,50")  # the flag: 2500 pixels
    assert names(group(subsets, general=enlarge, args=cli)) == ["big.png", "r1.png", "r2.png", "square.png", "wide.png"]
    assert json.loads(group(subsets, general=enlarge).metadata()["ss_datasets"])[0]["skip_image_resolution"] is None
    with pytest.raises(ConfigError) as e:
        group(subsets, general=enlarge, dataset={"skip_image_resolution": 100})
    assert "6 images were left out by skip_image_resolution 100x100" in str(e.value) and "lower it" in str(e.value)
    with pytest.raises(ConfigError, match="skip_image_resolution.*a positive integer or \\[width, height\\]"):
        group(subsets, dataset={"skip_image_resolution": "big"})
    with pytest.raises(ConfigError, match="skip_image_resolution"):
        group([{**subsets[0], "skip_image_resolution": 64}])  # a dataset key, as in sd-scripts


def test_skip_image_resolution_in_a_fine_tuning_subset_decodes_each_image_once(tmp_path, caplog, monkeypatch):
    """Fine-tuning subsets with skip_image_resolution: small images leave (before the split), a missing or
    unreadable one is reported once; every image is decoded once (it was twice, the first pass on one thread, and
    an unreadable file was warned about twice)."""
    import library.image_io as image_io

    d = tmp_path / "ft"
    img(d / "big.png", 80, 72), img(d / "small.png", 48, 48), img(d / "square.png", 64, 64)
    (d / "broken.png").write_bytes(b"not a png")
    md = {k: {"caption": f"a {k}"} for k in ("big", "small", "square", "broken", "gone")}
    (tmp_path / "md.json").write_text(json.dumps(md), encoding="utf-8")
    decoded, real = [], image_io.load_image_rgb
    monkeypatch.setattr(image_io, "load_image_rgb", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    with caplog.at_level(logging.INFO):
        g = group([{"image_dir": str(d), "metadata_file": str(tmp_path / "md.json")}],
                  general={"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128},
                  dataset={"skip_image_resolution": 64})
    assert sorted(k for ds in g.datasets for k in ds.images) == ["big"]
    assert sorted(os.path.basename(p) for p in decoded) == ["big.png", "broken.png", "small.png", "square.png"]
    assert caplog.text.count(f"skipping image {d / 'broken.png'}") == 1
    assert "2 of its 5 images left out by skip_image_resolution 64x64" in caplog.text
    assert "skipping 'gone'" in caplog.text


def test_skip_image_resolution_applies_before_the_validation_split(tmp_path):
    """Small images leave before the split (sd-scripts' order), so the held-out fraction is of the images kept:
    10 files, 5 small, split 0.2 -> 4 trained and 1 held out, a large one, for every seed."""
    d = tmp_path / "t"
    for i in range(10):
        img(d / f"{i}.png", *((80, 80) if i % 2 else (48, 48)), seed=i)
    for seed in range(6):
        cfg = {"general": {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128},
               "datasets": [{"validation_split": 0.2, "skip_image_resolution": 64,
                             "subsets": [{"image_dir": str(d), "class_tokens": "x"}]}]}
        bps = generate_blueprint(cfg, argparse.Namespace(), config_path="test.toml")
        train, val = (build_dataset_group(bps, is_sdxl=False, seed=seed, split=s) for s in ("train", "validation"))
        held = [k for ds in val.datasets for k in ds.images]
        kept = [k for ds in train.datasets for k in ds.images]
        assert (len(kept), len(held)) == (4, 1), seed
        assert all(int(os.path.basename(k)[0]) % 2 for k in kept + held)  # only the 80x80 ones


def test_skip_image_resolution_in_finetuning_datasets(tmp_path):
    d = tmp_path / "ft"
    img(d / "one.png", 80, 80), img(d / "two.png", 40, 40, seed=2)
    (tmp_path / "md.json").write_text(json.dumps({"one": {"caption": "a"}, "two": {"caption": "b"}}))
    sub = {"image_dir": str(d), "metadata_file": str(tmp_path / "md.json")}
    g = group([sub], general={"resolution": 64, "enable_bucket": True, "min_bucket_reso": 32},
              dataset={"skip_image_resolution": 40})
    assert sorted(k for ds in g.datasets for k in ds.images) == ["one"]
    with pytest.raises(ConfigError, match="2 images were left out by skip_image_resolution 80x80"):
        group([sub], dataset={"skip_image_resolution": 80})


# -- batches -----------------------------------------------------------------------------------------------------------

def test_batches_within_buckets_and_epoch_shuffle(tmp_path):
    d = tmp_path / "train"
    sizes = [(256, 128), (260, 120), (128, 256), (128, 128), (140, 132)]
    for i, (w, h) in enumerate(sizes):
        img(d / f"{i}.png", w, h, seed=i)
    kw = dict(general={"resolution": 128, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256,
                       "bucket_reso_steps": 64, "batch_size": 2, "num_repeats": 3})
    g = group([{"image_dir": str(d), "class_tokens": "x"}], **kw)
    # area 128*128, sides 64..256 in steps of 64 -> (64, 192), (64, 256), (128, 128), (192, 64), (256, 64);
    # by aspect ratio 128x256 goes to (64, 192), the wide pair splits between (192, 64) and (128, 128)
    assert g.datasets[0].resos == [(64, 192), (128, 128), (192, 64)]
    assert len(g) == sum(-(-n // 2) for n in [len(b) for b in g.datasets[0].buckets])
    seen = []
    for i in range(len(g)):
        b = g[i]
        assert b["latents"] is None and b["images"].dtype == torch.float32
        assert b["images"].shape[0] == len(b["captions"]) <= 2
        assert b["images"].min() >= -1 and b["images"].max() <= 1
        h, w = b["images"].shape[2:]
        assert (b["target_sizes_hw"] == torch.tensor([h, w])).all()
        seen += b["image_keys"]
    assert sorted(seen) == sorted([str(d / f"{i}.png") for i in range(5)] * 3)
    order1 = [tuple(g[i]["image_keys"]) for i in range(len(g))]
    g.set_current_epoch(2)
    order2 = [tuple(g[i]["image_keys"]) for i in range(len(g))]
    assert order1 != order2 and sorted(sum(map(list, order1), [])) == sorted(sum(map(list, order2), []))
    g2 = group([{"image_dir": str(d), "class_tokens": "x"}], **kw)
    g2.set_current_epoch(2)
    assert [tuple(g2[i]["image_keys"]) for i in range(len(g2))] == order2  # a function of (seed, epoch)
    loader = torch.utils.data.DataLoader(g, batch_size=1, collate_fn=collate_batch, shuffle=True)
    assert sum(len(b["captions"]) for b in loader) == 15


def test_dataloader_workers_follow_the_epoch(tmp_path):
    for i in range(6):
        img(tmp_path / "t" / f"{i}.png", seed=i)
    (tmp_path / "t" / "0.caption").write_text("a, b, c, d, e")
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "num_repeats": 2, "shuffle_caption": True}],
              general={"resolution": 64, "batch_size": 2})
    loader = torch.utils.data.DataLoader(g, batch_size=1, collate_fn=collate_batch, num_workers=2,
                                         persistent_workers=True)
    orders = []
    for epoch in (1, 2, 3):
        g.set_current_epoch(epoch)
        got = [(tuple(b["image_keys"]), tuple(b["captions"])) for b in loader]
        assert got == [(tuple(b["image_keys"]), tuple(b["captions"])) for b in (g[i] for i in range(len(g)))]
        orders.append(got)
    assert orders[0] != orders[1] != orders[2]


def _red_blue_flip_group(tmp_path, w, h, repeats):
    """One w x h image, red on its left half and blue on the rest, `repeats` times in an SDXL group at 128 px with
    flip_aug: a sample's colours tell whether it was flipped."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    p = tmp_path / "train" / "img.png"
    p.parent.mkdir()
    Image.fromarray(arr).save(p)
    return group([{"image_dir": str(p.parent), "class_tokens": "x", "num_repeats": repeats, "flip_aug": True}],
                 general={"resolution": 128}, is_sdxl=True)


def test_no_bucket_resize_crop_flip_and_sdxl_size_conditioning(tmp_path):
    g = _red_blue_flip_group(tmp_path, 300, 200, 40)
    flips = 0
    for i in range(len(g)):
        b = g[i]
        x = b["images"][0]
        assert x.shape == (3, 128, 128)  # 300x200 -> 192x128 (covers 128x128) -> centre crop
        assert b["original_sizes_hw"].tolist() == [[200, 300]]
        assert b["target_sizes_hw"].tolist() == [[128, 128]]
        # sd-scripts' crop_ltrb: the 300x200 image fitted inside 128x128 is 128x85.3, centred 21 px from the top
        assert b["crop_top_lefts"].tolist() == [[21, 0]]
        left_red = x[0, 64, 0] > 0.9 and x[2, 64, 0] < -0.9
        flips += not left_red
        assert (x[0, 64, 127] > 0.9) != bool(left_red)  # the other side has the other colour
    assert 10 < flips < 30


def test_flipped_sdxl_crop_left_is_the_bucket_width_less_the_right_edge(tmp_path):
    """SDXL crop conditioning of a flipped sample: sd-scripts mirrors crop_ltrb, left = bucket width - right. An
    85x128 image in a 128x128 bucket fits inside it as 85x128 at left (128 - 85) // 2 = 21, right 106: unflipped
    crop_top_lefts (0, 21), flipped (0, 128 - 106 = 22). Keeping 21 for flipped samples feeds the UNet a size
    condition sd-scripts never trains with."""
    g = _red_blue_flip_group(tmp_path, 85, 128, 30)
    seen = set()
    for i in range(len(g)):
        b = g[i]
        x = b["images"][0]
        flipped = bool(x[2, 64, 0] > 0.9)  # blue on the left: mirrored
        assert b["crop_top_lefts"].tolist() == [[0, 22 if flipped else 21]], flipped
        seen.add(flipped)
    assert seen == {True, False}


def test_random_crop_takes_a_random_window_of_the_resized_image(tmp_path):
    """random_crop: each sample is a bucket-sized window at a random offset of the resized image (sd-scripts), not
    the centre. A 256x64 image whose red channel is the column index x is already the size that covers the 64x64
    bucket, so a window's first red value is its offset: every sample is columns off..off+63 with off in [0, 192],
    the offsets vary; without random_crop it is the centre, off = (256 - 64) // 2 = 96."""
    arr = np.zeros((64, 256, 3), np.uint8)
    arr[:, :, 0] = np.arange(256, dtype=np.uint8)[None, :]
    p = tmp_path / "train" / "ramp.png"
    p.parent.mkdir()
    Image.fromarray(arr).save(p)

    def offsets(random_crop):
        g = group([{"image_dir": str(p.parent), "class_tokens": "x", "num_repeats": 20, "random_crop": random_crop}])
        out = []
        for i in range(len(g)):
            red = ((g[i]["images"][0, 0] + 1) * 127.5).round().long()  # back to 0..255
            off = int(red[0, 0])
            assert red.shape == (64, 64) and (red == torch.arange(off, off + 64)[None, :]).all(), off
            out.append(off)
        return out

    assert offsets(False) == [96] * 20
    got = offsets(True)
    assert all(0 <= o <= 192 for o in got) and len(set(got)) >= 5, got


def test_prior_class_tokens_pass_through(tmp_path):
    img(tmp_path / "a" / "0.png"), img(tmp_path / "b" / "0.png", seed=1)
    g = group([{"image_dir": str(tmp_path / "a"), "class_tokens": "sks dog", "prior_class_tokens": "dog"},
               {"image_dir": str(tmp_path / "b"), "class_tokens": "ohwx cat"}],
              general={"resolution": 64, "batch_size": 2})
    b = g[0]
    by_key = dict(zip([os.path.basename(os.path.dirname(k)) for k in b["image_keys"]],
                      zip(b["class_tokens"], b["prior_class_tokens"])))
    assert by_key == {"a": ("sks dog", "dog"), "b": ("ohwx cat", None)}
    assert b["is_reg"].dtype == torch.bool and b["loss_weights"].tolist() == [1.0, 1.0]


def test_reg_samples_prior_prompt_defaults_to_their_class_tokens(tmp_path):
    """A reg subset without prior_class_tokens gets its class tokens as prior class tokens, so APT's class prompt c
    of a reg image is its own caption (c = c*, docs/apt.md decision 24: it has no identifier to replace); a train
    image's stays None (the trainer derives it from its class tokens)."""
    img(tmp_path / "train" / "0.png"), img(tmp_path / "reg" / "0.png", seed=1)
    g = group([{"image_dir": str(tmp_path / "train"), "class_tokens": "sks dog"},
               {"image_dir": str(tmp_path / "reg"), "class_tokens": "dog", "is_reg": True}],
              general={"resolution": 64, "batch_size": 2})
    b = g[0]
    got = {bool(r): (c, p) for r, c, p in zip(b["is_reg"].tolist(), b["class_tokens"], b["prior_class_tokens"])}
    assert got == {False: ("sks dog", None), True: ("dog", "dog")}


def test_per_sample_randomness_changes_with_the_epoch(tmp_path):
    """Caption shuffles and flips are drawn anew each epoch (sd-scripts draws them per access): one image, one
    repeat, shuffle_caption and flip_aug over 12 epochs gives several orders of its 5 tags and both flips. Seeding
    them without the epoch would train the same augmented sample every epoch."""
    img(tmp_path / "t" / "0.png")
    (tmp_path / "t" / "0.caption").write_text("a, b, c, d, e")
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "shuffle_caption": True, "flip_aug": True}])
    captions, flips = set(), set()
    first = g[0]["images"][0]
    for epoch in range(1, 13):
        g.set_current_epoch(epoch)
        b = g[0]
        captions.add(b["captions"][0])
        flips.add(not torch.equal(b["images"][0], first))
    assert all(sorted(c.split(", ")) == list("abcde") for c in captions)
    assert len(captions) >= 4 and flips == {True, False}


def test_bucket_no_upscale_too_small_image(tmp_path):
    img(tmp_path / "t" / "tiny.png", 40, 40)
    with pytest.raises(ConfigError, match="tiny.png.*gets an empty bucket \\(0x0\\)"):
        group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x"}],
              general={"resolution": 128, "enable_bucket": True, "bucket_no_upscale": True, "min_bucket_reso": 64})


def test_metadata_config_mode(tmp_path):
    img(tmp_path / "train" / "0.png"), img(tmp_path / "reg" / "0.png", seed=1)
    (tmp_path / "train" / "0.caption").write_text("sks dog, Grass")
    g = group([{"image_dir": str(tmp_path / "train"), "class_tokens": "sks dog", "num_repeats": 3},
               {"image_dir": str(tmp_path / "reg"), "class_tokens": "dog", "is_reg": True}],
              general={"resolution": 64, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128})
    md = g.metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_num_train_images"] == "3" and md["ss_num_reg_images"] == "1"
    assert md["ss_num_batches_per_epoch"] == str(len(g))
    (ds,) = json.loads(md["ss_datasets"])
    assert ds["is_dreambooth"] and ds["resolution"] == [64, 64] and ds["bucket_info"]["buckets"]["0"]["count"] == 6
    assert [s["image_dir"] for s in ds["subsets"]] == ["train", "reg"] and ds["subsets"][1]["is_reg"]
    assert json.loads(md["ss_dataset_dirs"]) == {"train": {"n_repeats": 3, "img_count": 1}}  # reg dirs left out
    assert json.loads(md["ss_tag_frequency"]) == {"train": {"sks dog": 1, "grass": 1}, "reg": {"dog": 1}}


def test_metadata_cli_mode(tmp_path):
    img(tmp_path / "train" / "5_sks dog" / "0.png")
    bps = generate_blueprint(None, argparse.Namespace(train_data_dir=str(tmp_path / "train"), resolution="64"))
    md = build_dataset_group(bps, is_sdxl=False, seed=0).metadata()
    assert md["ss_dataset_dirs"] == '{"5_sks dog": {"n_repeats": 5, "img_count": 1}}'
    assert md["ss_resolution"] == "(64, 64)" and md["ss_reg_dataset_dirs"] == "{}" and "ss_datasets" not in md


# -- latent caching ----------------------------------------------------------------------------------------------------

def _direct_latents(vae, pixels, seed, scale):
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(seed)) * scale


def test_cache_latents_in_memory_equals_direct_encoding(tmp_path, vae):
    img(tmp_path / "t" / "a.png", 80, 64)
    subsets = [{"image_dir": str(tmp_path / "t"), "class_tokens": "x"}]
    pixels = group(subsets)[0]["images"]
    scale = vae.config.scaling_factor
    g = group(subsets)
    g.cache_latents(vae, scale, generator=torch.Generator().manual_seed(3))
    b = g[0]
    assert b["images"] is None and b["latents"].shape == (1, 4, 8, 8)
    torch.testing.assert_close(b["latents"], _direct_latents(vae, pixels, 3, scale))
    assert b["original_sizes_hw"].tolist() == [[64, 80]] and b["target_sizes_hw"].tolist() == [[64, 64]]


def test_cache_latents_to_disk_written_and_reused(tmp_path, vae, monkeypatch):
    img(tmp_path / "t" / "a.png", 80, 64)
    subsets = [{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "flip_aug": True}]
    scale = vae.config.scaling_factor
    g = group(subsets)
    g.cache_latents(vae, scale, to_disk=True, generator=torch.Generator().manual_seed(0))
    cache_path = cache_file(tmp_path / "t", "a_0080x0064")
    cached = load_file(str(cache_path))  # safetensors: a cache file can never carry a pickle
    assert set(cached) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
    assert cached["latents"].shape == (4, 8, 8) and cached["original_size"].tolist() == [80, 64]
    variants = [cached[k][None] * scale for k in ("latents", "latents_flipped")]
    first = g[0]["latents"]
    assert any(torch.allclose(first, v) for v in variants)  # latents are stored unscaled, like sd-scripts

    calls = []
    real_encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(x.shape) or real_encode(x))
    g2 = group(subsets)
    g2.cache_latents(vae, scale, to_disk=True)
    assert calls == []  # valid file reused
    torch.testing.assert_close(g2[0]["latents"], first)  # same seed and epoch -> same flip decision

    g3 = group(subsets, general={"resolution": 32})  # another bucket: a file of its own
    g3.cache_latents(vae, scale, to_disk=True)
    assert len(calls) == 2  # image + flipped image
    assert load_file(str(cache_path))["latents"].shape == (4, 8, 8)
    (other,) = set(os.listdir(tmp_path / "t")) - {"a.png", cache_path.name}
    assert load_file(str(tmp_path / "t" / other))["latents"].shape == (4, 4, 4)
    sdxl = group(subsets, is_sdxl=True)
    sdxl.cache_latents(vae, scale, to_disk=True)
    assert cache_file(tmp_path / "t", "a_0080x0064", "sdxl").is_file()
    assert not [f for f in os.listdir(tmp_path / "t") if f.endswith(".tmp")]  # atomic writes leave no temp file


def test_flip_aug_with_cached_latents(tmp_path, vae):
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 255
    p = tmp_path / "t" / "half.png"
    p.parent.mkdir()
    Image.fromarray(arr).save(p)
    subsets = [{"image_dir": str(p.parent), "class_tokens": "x", "flip_aug": True, "num_repeats": 30}]
    pixels = group([{**subsets[0], "flip_aug": False, "num_repeats": 1}])[0]["images"]
    scale = vae.config.scaling_factor
    g = group(subsets)
    g.cache_latents(vae, scale, generator=torch.Generator().manual_seed(5))
    plain = _direct_latents(vae, pixels, 5, scale)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        vae.encode(pixels).latent_dist.sample(generator=gen)
        flipped = vae.encode(torch.flip(pixels, dims=[3])).latent_dist.sample(generator=gen) * scale
    variants = {"plain": 0, "flipped": 0}
    for i in range(len(g)):
        lat = g[i]["latents"]
        if torch.allclose(lat, plain):
            variants["plain"] += 1
        else:
            torch.testing.assert_close(lat, flipped)
            variants["flipped"] += 1
    assert variants["plain"] > 5 and variants["flipped"] > 5


def _rgba(path, w, h, alpha):
    """An RGBA PNG: random colours, `alpha` (h, w) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return path


def test_alpha_masks_follow_resize_crop_and_flip(tmp_path, caplog):
    """alpha_mask = true: the alpha channel becomes the batch's loss weights, resized and cropped as the image
    (300x200 -> 192x128 -> centre crop 128x128, like the colours) and flipped with it; the RGB is the one without
    masks. Subsets without alpha_mask weigh 1; a batch without any alpha_mask subset has no masks."""
    alpha = np.zeros((200, 300), np.uint8)
    alpha[:, :150] = 255  # the left half is the subject
    p = _rgba(tmp_path / "t" / "wide.png", 300, 200, alpha)
    sub = {"image_dir": str(p.parent), "class_tokens": "x", "num_repeats": 40, "flip_aug": True}
    g = group([{**sub, "alpha_mask": True}], general={"resolution": 128})
    plain = group([sub], general={"resolution": 128})
    flips = 0
    for i in range(len(g)):
        b, ref = g[i], plain[i]
        m = b["alpha_masks"]
        assert m.shape == (1, 128, 128) and m.dtype == torch.float32 and ref["alpha_masks"] is None
        assert torch.equal(b["images"], ref["images"])  # the colours are what they are without masks
        left = bool(m[0, 64, 0] == 1.0)
        assert m[0, 64, 127] == (0.0 if left else 1.0) and 0 <= float(m.min()) and float(m.max()) <= 1
        assert float(m.mean()) == pytest.approx(0.5, abs=0.02)
        flips += not left
    assert 10 < flips < 30

    opaque = img(tmp_path / "o" / "opaque.png", 128, 128)
    mixed = group([{"image_dir": str(p.parent), "class_tokens": "x", "alpha_mask": True},
                   {"image_dir": str(opaque.parent), "class_tokens": "y"}], general={"resolution": 128},
                  dataset={"batch_size": 2})
    (b,) = [mixed[i] for i in range(len(mixed))]
    by_key = dict(zip(b["image_keys"], b["alpha_masks"]))
    assert torch.equal(by_key[str(opaque)], torch.ones(128, 128))  # no alpha_mask: weight 1 everywhere
    assert float(by_key[str(p)].mean()) == pytest.approx(0.5, abs=0.02)
    assert "nothing is masked" not in caplog.text
    no_alpha = group([{"image_dir": str(opaque.parent), "class_tokens": "y", "alpha_mask": True}],
                     general={"resolution": 128})
    assert torch.equal(no_alpha[0]["alpha_masks"], torch.ones(1, 128, 128))  # an image without alpha: all in
    assert "alpha_mask = true, but none of its 1 images has transparent pixels, so nothing is masked" in caplog.text


@pytest.mark.parametrize("to_disk", [False, True])
def test_alpha_masks_are_cached_with_the_latents(tmp_path, vae, to_disk):
    alpha = np.zeros((64, 80), np.uint8)
    alpha[:, 40:] = 200
    p = _rgba(tmp_path / "t" / "a.png", 80, 64, alpha)
    subsets = [{"image_dir": str(p.parent), "class_tokens": "x", "alpha_mask": True, "flip_aug": True,
                "num_repeats": 20}]
    direct = group(subsets)
    g = group(subsets)
    g.cache_latents(vae, vae.config.scaling_factor, to_disk=to_disk)
    for i in range(len(g)):
        assert g[i]["images"] is None and torch.equal(g[i]["alpha_masks"], direct[i]["alpha_masks"])
    if to_disk:
        cache = cache_file(tmp_path / "t", "a_0080x0064")
        assert load_file(str(cache))["alpha_mask"].shape == (64, 64)
        os.remove(cache)  # a run without masks writes a file of its own, which the masked run does not take
        plain = group([{**subsets[0], "alpha_mask": False}])
        plain.cache_latents(vae, vae.config.scaling_factor, to_disk=True)
        assert "alpha_mask" not in load_file(str(cache_file(tmp_path / "t", "a_0080x0064")))
        again = group(subsets)
        again.cache_latents(vae, vae.config.scaling_factor, to_disk=True)
        assert load_file(str(cache))["alpha_mask"].shape == (64, 64)
        assert torch.equal(again[0]["alpha_masks"], direct[0]["alpha_masks"])


def test_mask_images_weigh_the_loss_exactly_as_alpha_masks(tmp_path, caplog):
    """conditioning_data_dir (sd-scripts' mask folders for --masked_loss): the mask of the image's file name and
    size; its R channel (not G, B or its alpha) becomes the loss weights, resized and cropped with the image as an
    alpha mask is: the same tensors as the same mask in the image's alpha channel. A greyscale mask reads the same;
    with flip_aug a mask flips with its image."""
    alpha = np.zeros((200, 300), np.uint8)
    alpha[:, :150] = 255
    alpha[50:100, 200:250] = 127  # grey: half weight
    p = _rgba(tmp_path / "rgba" / "wide.png", 300, 200, alpha)
    rgb = tmp_path / "rgb" / "wide.png"
    rgb.parent.mkdir()
    Image.open(p).convert("RGB").save(rgb)
    masks = tmp_path / "masks"
    masks.mkdir()
    noise = np.random.default_rng(2).integers(0, 256, (200, 300, 2), dtype=np.uint8)
    Image.fromarray(np.dstack([alpha, noise, np.zeros_like(alpha)]), "RGBA").save(masks / "wide.png")  # alpha 0
    sub = {"class_tokens": "x", "num_repeats": 3}
    by_alpha = group([{**sub, "image_dir": str(p.parent), "alpha_mask": True}], general={"resolution": 128})

    def by_file(**extra):
        return group([{**sub, "image_dir": str(rgb.parent), "conditioning_data_dir": str(masks), **extra}],
                     general={"resolution": 128})

    g = by_file()
    for i in range(len(g)):
        a, f = by_alpha[i], g[i]
        assert torch.equal(a["images"], f["images"]) and torch.equal(a["alpha_masks"], f["alpha_masks"])
    weights = set(torch.unique(g[0]["alpha_masks"]).tolist())
    assert {0.0, 1.0} <= weights and any(abs(w - 127 / 255) < 1e-6 for w in weights)
    assert "transparent pixels" in caplog.text and "only a mask's R channel weights the loss" in caplog.text
    caplog.clear()
    Image.fromarray(alpha, "L").save(masks / "wide.png")  # greyscale
    assert torch.equal(by_file()[0]["alpha_masks"], g[0]["alpha_masks"])
    assert "transparent pixels" not in caplog.text
    flips = by_file(flip_aug=True, num_repeats=40)
    ref, seen = g[0]["alpha_masks"], set()
    for i in range(len(flips)):
        m = flips[i]["alpha_masks"]
        flipped = torch.equal(m, ref.flip(-1))
        assert flipped or torch.equal(m, ref)
        seen.add(flipped)
    assert seen == {True, False}


def test_mask_folder_errors_name_the_image_and_what_to_do(tmp_path):
    img(tmp_path / "i" / "a.png", 64, 48)
    img(tmp_path / "i" / "b.png")
    masks = tmp_path / "m"
    masks.mkdir()
    Image.new("L", (64, 48), 255).save(masks / "a.png")
    sub = {"image_dir": str(tmp_path / "i"), "class_tokens": "x", "conditioning_data_dir": str(masks)}

    def error(**extra):
        with pytest.raises(ConfigError) as e:
            group([{**sub, **extra}])
        return str(e.value)

    msg = error()
    assert "datasets[0].subsets[0] in test.toml: 1 of 2 images have no mask in conditioning_data_dir" in msg
    assert f"(e.g. {tmp_path / 'i' / 'b.png'}: no b.png, .jpg, .webp ... there)" in msg
    Image.new("L", (32, 32)).save(masks / "b.jpg")
    assert (f"mask {masks / 'b.jpg'} is 32x32 but its image {tmp_path / 'i' / 'b.png'} is 64x64: a mask must have "
            "its image's size") in error()
    Image.new("L", (64, 64)).save(masks / "b.png")
    assert "has 2 masks in conditioning_data_dir (b.jpg, b.png); keep one." in error()
    os.remove(masks / "b.jpg")
    assert len(group([sub])) == 2
    (masks / "b.png").write_bytes(b"not a png")
    assert f"mask {masks / 'b.png'} (of image {tmp_path / 'i' / 'b.png'}): not an image PIL can read" in error()
    Image.new("L", (64, 64)).save(masks / "b.png")
    assert "conditioning_data_dir " + str(tmp_path / "nope") + ": folder not found" in error(
        conditioning_data_dir=str(tmp_path / "nope"))
    assert "both alpha_mask" in error(alpha_mask=True) and "Keep one" in error(alpha_mask=True)
    assert "conditioning_data_dir is empty" in error(conditioning_data_dir="")
    ft = {"metadata_file": "m.json", "conditioning_data_dir": str(masks)}
    with pytest.raises(ConfigError, match="`conditioning_data_dir` is for DreamBooth datasets"):
        group([ft])


def test_masks_of_photos_with_an_exif_orientation_turn_with_them(tmp_path, caplog):
    """A phone photo trains upright (its EXIF orientation applied); a mask without an orientation tag, of the
    photo's stored size, was drawn on the stored pixels (as sd-scripts reads both) and turns with the photo: it
    was an error for a non-square photo ("resize the mask") and, for a square one, trained half the subject and
    half the background without a word. A mask of the upright size is taken as it is."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turned 90 degrees clockwise to show

    def world(name, w, h, mask_size):
        images, masks = tmp_path / name / "i", tmp_path / name / "m"
        images.mkdir(parents=True), masks.mkdir()
        stored = np.zeros((h, w, 3), np.uint8)
        stored[:, : w // 2] = (255, 0, 0)  # the subject: the left half as stored
        Image.fromarray(stored).save(images / "p.png", exif=exif)
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        mask = Image.fromarray(mask, "L")
        if mask_size != (w, h):  # drawn on the upright photo
            mask = mask.transpose(Image.Transpose.ROTATE_270)
        mask.save(masks / "p.png")
        return group([{"image_dir": str(images), "class_tokens": "x", "conditioning_data_dir": str(masks)}],
                     general={"resolution": 64}, args=argparse.Namespace(masked_loss=True))

    for name, size, mask_size in (("square", (64, 64), (64, 64)), ("wide", (96, 64), (96, 64)),
                                  ("upright_mask", (96, 64), (64, 96))):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            sample = world(name, *size, mask_size)[0]
        red = (sample["images"][0, 0] > 0.5) & (sample["images"][0, 1] < -0.5)
        weights = sample["alpha_masks"][0]
        assert red.float().mean() > 0.3 and torch.all(weights[red] == 1) and torch.all(weights[~red] == 0), name
        assert ("turned upright with their photo" in caplog.text) == (name != "upright_mask"), name
        assert ("same size either way" in caplog.text) == (name == "square"), name
    # a tagged mask is read by its own tag: of the stored size, the error says why the sizes are swapped
    Image.open(tmp_path / "wide" / "m" / "p.png").save(tmp_path / "wide" / "m" / "p.png", exif=Image.Exif())
    e = Image.Exif()
    e[0x0112] = 1
    Image.open(tmp_path / "wide" / "m" / "p.png").save(tmp_path / "wide" / "m" / "p.png", exif=e)
    with pytest.raises(ConfigError, match="turned by its EXIF orientation and the mask is not"):
        group([{"image_dir": str(tmp_path / "wide" / "i"), "class_tokens": "x",
                "conditioning_data_dir": str(tmp_path / "wide" / "m")}], general={"resolution": 64},
              args=argparse.Namespace(masked_loss=True))


@pytest.mark.parametrize("orientation, corner", [(2, "tr"), (3, "br"), (4, "bl"), (5, "tl"), (6, "tr"), (7, "br"),
                                                 (8, "bl")])
def test_a_mask_of_the_stored_photo_weighs_the_subject_upright_for_every_exif_orientation(tmp_path, orientation,
                                                                                           corner):
    """Every EXIF orientation (mirrors and transposes too, not only the 90-degree turns of most phones): the photo
    trains upright and its untagged mask, drawn on the stored pixels, turns with it, so the loss weighs the subject
    and not another quadrant of the picture. Stored 96x64 with the subject in its top-left 48x32; upright it lands
    in the corner written out here (the EXIF spec's table), a 32x32 quadrant of the 64x64 centre crop."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    images, masks = tmp_path / "i", tmp_path / "m"
    images.mkdir(), masks.mkdir()
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:32, :48] = (255, 0, 0)
    Image.fromarray(stored).save(images / "p.png", exif=exif)
    mask = np.zeros((64, 96), np.uint8)
    mask[:32, :48] = 255
    Image.fromarray(mask, "L").save(masks / "p.png")
    sample = group([{"image_dir": str(images), "class_tokens": "x", "conditioning_data_dir": str(masks)}],
                   general={"resolution": 64}, args=argparse.Namespace(masked_loss=True))[0]
    expected = torch.zeros(64, 64)
    rows = slice(0, 32) if corner[0] == "t" else slice(32, 64)
    cols = slice(0, 32) if corner[1] == "l" else slice(32, 64)
    expected[rows, cols] = 1
    red = ((sample["images"][0, 0] > 0.5) & (sample["images"][0, 1] < -0.5)).float()
    assert torch.equal(red, expected)  # the photo upright
    assert torch.equal(sample["alpha_masks"][0], expected)  # its mask with it


def test_listing_passes_over_hidden_files_and_names_broken_links_and_other_formats(tmp_path, caplog):
    """As sd-scripts' glob: `._a.png` (a Mac's metadata beside every image on exFAT/SMB/zip) and `.hidden.png` are
    not images of the set; they were listed, took validation slots and could leave the held-out side unreadable
    (an error). A link to a moved image and files of other image formats are named in a warning."""
    folder = tmp_path / "i"
    for i in range(4):
        img(folder / f"a{i}.png", seed=i)
        (folder / f"._a{i}.png").write_bytes(b"\x00\x05\x16\x07" + bytes(100))  # AppleDouble
    img(folder / ".hidden.png")
    img(folder / "photo.gif")
    (folder / "moved.png").symlink_to(tmp_path / "gone.png")
    sub = {"image_dir": str(folder), "class_tokens": "x"}
    with caplog.at_level(logging.WARNING):
        g = group([sub])
    assert g.num_train_images == 4
    assert "1 image link(s) point to nothing" in caplog.text and f"{folder / 'moved.png'} -> " in caplog.text
    assert "1 file(s) of other image formats (.gif) are left out, e.g. photo.gif" in caplog.text
    assert "._a0.png" not in caplog.text and ".hidden" not in caplog.text
    for seed in range(8):  # the held-out quarter is one of the four images, whatever the seed
        cfg = {"general": {"resolution": 64}, "datasets": [{"validation_split": 0.25, "validation_seed": seed,
                                                              "subsets": [sub]}]}
        bps = generate_blueprint(cfg, argparse.Namespace(), config_path="test.toml")
        caplog.clear()
        train, held = (build_dataset_group(bps, is_sdxl=False, seed=0, split=s) for s in ("train", "validation"))
        assert (train.num_train_images, held.num_train_images) == (3, 1), seed
        assert caplog.text.count("of other image formats") == 1  # the train build says it, not the held-out one


def test_image_extensions_are_matched_in_any_case(tmp_path):
    """Cameras and phones name files IMG_0001.JPG: an upper- or mixed-case extension is an image as its lower-case
    spelling is (sd-scripts globs both); matched by case, a camera's folder trained on nothing or on a part."""
    from library.image_io import list_images

    folder = tmp_path / "i"
    for name in ("IMG_0001.JPG", "b.Png", "c.jpeg", "d.WEBP"):
        img(folder / name)
    (folder / "notes.TXT").write_text("x")
    assert [os.path.basename(p) for p in list_images(str(folder))] == ["IMG_0001.JPG", "b.Png", "c.jpeg", "d.WEBP"]
    assert group([{"image_dir": str(folder), "class_tokens": "x"}]).num_train_images == 4


def test_latent_cache_is_recomputed_when_its_image_or_mask_is_newer(tmp_path, vae):
    """[ours] A cache file older than its image or mask image (edited in place, same size) is recomputed; an
    untouched one is reused, not rewritten."""
    p = img(tmp_path / "t" / "a.png", seed=1)
    masks = tmp_path / "m"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "a.png")
    sub = {"image_dir": str(p.parent), "class_tokens": "x", "conditioning_data_dir": str(masks)}
    scale = vae.config.scaling_factor
    group([sub]).cache_latents(vae, scale, to_disk=True)
    cache = cache_file(tmp_path / "t", "a_0064x0064")
    first = load_file(str(cache))
    assert float(first["alpha_mask"].min()) == 255
    Image.new("L", (64, 64), 0).save(masks / "a.png")  # the mask edited after the cache was written
    old = os.path.getmtime(masks / "a.png") - 10
    os.utime(cache, (old, old))
    g = group([sub])
    g.cache_latents(vae, scale, to_disk=True)
    assert float(load_file(str(cache))["alpha_mask"].max()) == 0 and float(g[0]["alpha_masks"].max()) == 0
    stamp = os.path.getmtime(cache)
    group([sub]).cache_latents(vae, scale, to_disk=True)
    assert os.path.getmtime(cache) == stamp  # nothing newer: reused
    img(p, seed=2)  # the image edited
    old = os.path.getmtime(p) - 10
    os.utime(cache, (old, old))
    group([sub]).cache_latents(vae, scale, to_disk=True)
    assert not torch.equal(load_file(str(cache))["latents"], first["latents"])


def test_validation_split_holds_out_images_disjointly(tmp_path):
    """validation_split: per subset, the images shuffled by the seed (validation_seed, else the dataset seed),
    ceil(0.7 n) trained on and the rest held out (disjoint, together all); reg images and repeats stay in
    training; another seed gives another split; too small a split holds out nothing (None)."""
    for i in range(10):
        img(tmp_path / "t" / f"{i}.png", seed=i)
    for i in range(3):
        img(tmp_path / "r" / f"{i}.png", seed=20 + i)
    subsets = [{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "num_repeats": 3},
               {"image_dir": str(tmp_path / "r"), "class_tokens": "y", "is_reg": True}]

    def keys(g):
        return {k for d in g.datasets for k in d.images}

    def split(seed=0, **dataset):
        cfg = {"general": {"resolution": 64}, "datasets": [{"validation_split": 0.3, **dataset, "subsets": subsets}]}
        bps = generate_blueprint(cfg, argparse.Namespace(), config_path="test.toml")
        return [build_dataset_group(bps, is_sdxl=False, seed=seed, split=s) for s in ("train", "validation")]

    train, val = split()
    subject = {str(tmp_path / "t" / f"{i}.png") for i in range(10)}
    reg = {str(tmp_path / "r" / f"{i}.png") for i in range(3)}
    assert len(keys(val)) == 3 and keys(val) <= subject and not keys(val) & keys(train)
    assert keys(train) == (subject - keys(val)) | reg  # the reg images all train
    assert train.num_train_images == 7 * 3 and val.num_train_images == 3 and val.num_reg_images == 0
    assert keys(split()[1]) == keys(val)  # the same seed: the same split
    assert keys(split(seed=1)[1]) != keys(val) and keys(split(seed=1, validation_seed=0)[1]) == keys(val)
    assert split(validation_split=0.05)[1] is None  # ceil(0.95 * 10) = 10: none held out
    # sd-scripts' split_train_val with validation_seed 42: random.seed(42); random.shuffle(sorted paths); the tail
    paths = sorted(subject)
    random.seed(42)
    random.shuffle(paths)
    assert keys(split(validation_seed=42)[1]) == set(paths[-3:])  # round(0.3 * 10) = 3 held out there too
    everything = build_dataset_group(generate_blueprint({"general": {"resolution": 64}, "datasets": [
        {"subsets": subsets}]}, argparse.Namespace(), config_path="t.toml"), is_sdxl=False, seed=0, split="train")
    assert keys(everything) == subject | reg


def test_the_split_opens_each_image_once(tmp_path, monkeypatch, caplog):
    """The train and validation groups each open only their side of the split (an image is opened once, and a
    transparent one is reported once); an unreadable image costs only its side one image."""
    import library.dataset as dataset_lib

    for i in range(5):
        img(tmp_path / "t" / f"{i}.png", seed=i)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(tmp_path / "t" / "5.png")  # transparent
    (tmp_path / "t" / "6.png").write_bytes(b"not a png")
    opened = []
    probe = dataset_lib.probe_images
    monkeypatch.setattr(dataset_lib, "probe_images", lambda ps, m: opened.extend(ps) or probe(ps, m))
    cfg = {"general": {"resolution": 64}, "datasets": [{"validation_split": 0.3, "subsets": [
        {"image_dir": str(tmp_path / "t"), "class_tokens": "x"}]}]}
    bps = generate_blueprint(cfg, argparse.Namespace(), config_path="test.toml")
    with caplog.at_level(logging.WARNING):
        train, val = (build_dataset_group(bps, is_sdxl=False, seed=0, split=s) for s in ("train", "validation"))
    assert sorted(opened) == sorted(str(tmp_path / "t" / f"{i}.png") for i in range(7))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("transparent pixels" in m for m in messages) == 1
    assert sum("6.png" in m for m in messages) == 1
    held = {k for d in val.datasets for k in d.images}
    assert len(held) + sum(len(d.images) for d in train.datasets) == 6  # 7 files, one unreadable
    assert len(held) in (1, 2)  # ceil(0.7 * 7) = 5 train files: 2 held out, less the unreadable one if it is here


def test_cache_latents_refuses_random_crop(tmp_path, vae):
    img(tmp_path / "t" / "a.png", 80, 64)
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "random_crop": True}])
    with pytest.raises(ConfigError, match=r"datasets\[0\].subsets\[0\].*random_crop.*cannot be cached"):
        g.cache_latents(vae, 0.18215)


def test_make_loader_workers_give_the_batches_of_the_main_process(tmp_path):
    """The trainer's loader: the same batches, captions included (per-item seeds), with 0 or 2 worker processes;
    starting an epoch draws nothing from the global RNG."""
    from types import SimpleNamespace

    from library.dataset import make_loader

    for i in range(5):
        img(tmp_path / "t" / f"{i}.png", seed=i)
    (tmp_path / "t" / "0.caption").write_text("a, b, c, d, e")
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "num_repeats": 2, "shuffle_caption": True}],
              general={"resolution": 64, "batch_size": 2})
    runs = []
    for workers in (0, 2):
        args = SimpleNamespace(max_data_loader_n_workers=workers, persistent_data_loader_workers=True)
        loader = make_loader(g, args, seed=3)
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        g.set_current_epoch(1)
        torch.manual_seed(0)
        runs.append([(tuple(b["image_keys"]), tuple(b["captions"]), b["images"].sum().item()) for b in loader])
        assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    assert runs[0] == runs[1] and len(runs[0]) == 5
    # Windows and macOS start workers by spawn, which pickles the dataset: a copy gives the same batches
    import pickle

    copy = pickle.loads(pickle.dumps(g))
    for i in range(len(g)):
        a, b = g[i], copy[i]
        assert a["image_keys"] == b["image_keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["images"], b["images"])


def test_workers_by_default_only_where_a_cuda_step_would_wait_for_images(monkeypatch):
    from types import SimpleNamespace

    from library.dataset import loader_advice, loader_workers

    a = lambda cache, workers, persistent=False: SimpleNamespace(  # noqa: E731
        cache_latents=cache, max_data_loader_n_workers=workers, persistent_data_loader_workers=persistent)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(a(False, None), "cuda") == (4, True)  # images decoded ahead, workers kept across epochs
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(a(False, None), "cuda") == (1, True)  # a core left for the training loop
    assert loader_workers(a(True, None), "cuda") == (0, False) and loader_workers(a(False, None), "cpu") == (0, False)
    assert loader_workers(a(False, 0), "cuda") == (0, False)  # what the user asked for
    assert loader_workers(a(True, 2, True), "cpu") == (2, True) and loader_workers(a(True, 2), "cpu") == (2, False)
    assert loader_workers(a(False, 0, True), "cuda") == (0, False)  # persistent needs workers
    # the warning only when the user turned the workers off
    assert "--cache_latents" in loader_advice(a(False, 0), "cuda")
    assert "--max_data_loader_n_workers 4" in loader_advice(a(False, 0), "cuda")
    assert loader_advice(a(False, None), "cuda") is None
    assert loader_advice(a(True, 0), "cuda") is None and loader_advice(a(False, 2), "cuda") is None
    assert loader_advice(a(False, 0), "cpu") is None


# -- token warm-up -----------------------------------------------------------------------------------------------------

def _warmup_group(tmp_path, n=4, **subset):
    """n images whose caption is "t0, t1, ..., t99": with token_warmup_step 100 and token_warmup_min 0 a caption
    finished at step s has s tags (floor(s * 100 / 100) + 0)."""
    d = tmp_path / "warm"
    for i in range(n):
        img(d / f"{i}.png", seed=i)
        (d / f"{i}.caption").write_text(", ".join(f"t{j}" for j in range(100)))
    return group([{"image_dir": str(d), "token_warmup_step": 100, "token_warmup_min": 0, **subset}],
                 general={"resolution": 64, "batch_size": 2})


def _tags(caption):
    return len(caption.split(", ")) if caption else 0


def test_token_warmup_captions_are_deferred_to_the_main_process(tmp_path):
    from library.captions import DeferredCaption, finish_captions

    warm, plain = img(tmp_path / "warm" / "w.png"), img(tmp_path / "plain" / "p.png", seed=1)
    (tmp_path / "warm" / "w.caption").write_text("a, b, c, d, e")
    g = group([{"image_dir": str(warm.parent), "keep_tokens": 1, "token_warmup_step": 4},
               {"image_dir": str(plain.parent), "class_tokens": "x, y", "shuffle_caption": True}])
    assert g.has_token_warmup
    batches = {b["image_keys"][0]: b for b in (g[i] for i in range(len(g)))}
    assert batches[str(plain)]["captions"] in (["x, y"], ["y, x"])  # no warm-up: processed as before
    batch = batches[str(warm)]
    assert isinstance(batch["captions"][0], DeferredCaption)
    assert finish_captions(dict(batch), 0)["captions"] == ["a, b"]  # floor(0 * 3 / 4) + 1 flex tags
    assert finish_captions(dict(batch), 2)["captions"] == ["a, b, c"]  # floor(2 * 3 / 4) + 1
    assert finish_captions(dict(batch))["captions"] == ["a, b, c, d, e"]  # None: after the warm-up
    no_warmup = group([{"image_dir": str(plain.parent), "class_tokens": "x"}])
    assert not no_warmup.has_token_warmup


def test_captions_at_steps_finish_each_batch_at_its_optimizer_step(tmp_path):
    """Step of the batch at micro-batch position p of epoch e: (e - 1) x steps_per_epoch + p // accumulation; a
    resumed epoch starts at the position its state saved (the skipped batches come before it)."""
    from types import SimpleNamespace

    from library.dataset import captions_at_steps

    g = _warmup_group(tmp_path, n=10)
    g.set_current_epoch(2)
    batches = [g[i] for i in range(len(g))]  # 5 batches of 2
    args = SimpleNamespace(gradient_accumulation_steps=2, max_train_steps=1000)
    # epoch 2 of a run with 3 optimizer steps an epoch, resumed after 3 micro-batches: positions 3, 4 of 5
    it = captions_at_steps(batches[3:], args, epoch_start=3, position=3)
    assert not hasattr(it, "__len__")  # lazy: one batch at a time, as the loop (and LookAhead) asks
    assert [[_tags(c) for c in b["captions"]] for b in it] == [[4, 4], [5, 5]]  # steps 3 + 3 // 2, 3 + 4 // 2
    args.gradient_accumulation_steps = 1
    steps = [[_tags(c) for c in b["captions"]] for b in captions_at_steps(
        [g[i] for i in range(len(g))], args, epoch_start=10, position=0)]
    assert steps == [[10, 10], [11, 11], [12, 12], [13, 13], [14, 14]]


def test_token_warmup_captions_are_the_same_with_loader_workers(tmp_path):
    """Deferred captions carry their own seed: finished in the main process they do not depend on which process
    loaded the batch (0 or 1 workers), and they equal the dataset's own items finished alike."""
    from library.captions import finish_captions

    g = _warmup_group(tmp_path, n=6, shuffle_caption=True, caption_tag_dropout_rate=0.2)
    runs = []
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(g, batch_size=1, collate_fn=collate_batch, num_workers=workers)
        g.set_current_epoch(1)
        runs.append([tuple(finish_captions(b, 30)["captions"]) for b in loader])
    direct = [tuple(finish_captions(g[i], 30)["captions"]) for i in range(len(g))]
    assert runs[0] == runs[1] == direct and len(direct) == 3
    assert all(_tags(c) <= 30 for b in direct for c in b) and len({c for b in direct for c in b}) == 6


def test_face_crop_aug_range_crops_around_the_face_in_the_file_name(tmp_path, caplog):
    """sd-scripts' face_crop_aug_range without buckets: 400x300, face 40x40 at (200, 150), range [2, 2] -> scaled
    by 0.8 to 320x240 and cropped at (128, 88) (tests/test_buckets.py); the UNet is told the crop is the whole
    picture (original size = the crop, top-left 0, as sd-scripts). An image without a face box is cropped as usual."""
    d = tmp_path / "t"
    face = img(d / "p_200_150_40_40.png", 400, 300)
    plain = img(d / "q.png", 400, 300, seed=1)
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(d), "class_tokens": "x", "face_crop_aug_range": [2.0, 2.0]}],
                  dataset={"enable_bucket": False}, is_sdxl=True)
    assert "1 of 2 images have no face box in their file name" in caplog.text and str(plain) in caplog.text
    caplog.clear()
    other = tmp_path / "u"  # a second subset of boxed images only: the count is the named subset's own
    img(other / "r_20_20_10_10.png", 400, 300, seed=2)
    with caplog.at_level(logging.WARNING):
        group([{"image_dir": str(other), "class_tokens": "x", "face_crop_aug_range": [2.0, 2.0]},
               {"image_dir": str(d), "class_tokens": "x", "face_crop_aug_range": [2.0, 2.0]}],
              dataset={"enable_bucket": False})
    assert "subsets[1] in test.toml: face_crop_aug_range: 1 of 2 images have no face box" in caplog.text
    assert "subsets[0]" not in caplog.text
    from library.buckets import resize_filter

    want = Image.open(face).resize((320, 240), resize_filter((400, 300), (320, 240), None)).crop((128, 88, 192, 152))
    want = torch.from_numpy(np.asarray(want, np.float32) / 127.5 - 1).permute(2, 0, 1)
    batches = {b["image_keys"][0]: b for b in (g[i] for i in range(len(g)))}
    b = batches[str(face)]
    torch.testing.assert_close(b["images"][0], want, rtol=0, atol=1e-6)
    assert b["original_sizes_hw"].tolist() == [[64, 64]] and b["crop_top_lefts"].tolist() == [[0, 0]]
    assert batches[str(plain)]["original_sizes_hw"].tolist() == [[300, 400]]  # resized and centre-cropped as usual

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(d), "class_tokens": "x", "face_crop_aug_range": [2.0, 4.0]}],
                  dataset={"enable_bucket": True, "min_bucket_reso": 64})
    assert "face_crop_aug_range has no effect with enable_bucket (as in sd-scripts)" in caplog.text
    with pytest.raises(ConfigError, match=r"face_crop_aug_range` in test.toml = \[4.0, 2.0\]: give \[min, max\] with "
                                          r"0 < min <= max"):
        group([{"image_dir": str(d), "class_tokens": "x", "face_crop_aug_range": [4.0, 2.0]}])


def test_cache_latents_refuses_face_crop_aug_range(tmp_path, vae):
    img(tmp_path / "t" / "a_40_32_20_20.png", 80, 64)
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "face_crop_aug_range": [2.0, 2.0]}],
              dataset={"enable_bucket": False})
    with pytest.raises(ConfigError, match=r"face_crop_aug_range changes the image every step"):
        g.cache_latents(vae, 0.18215)
    # under buckets the key does nothing (a warning says so), so the latents can be cached, as in sd-scripts
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x", "face_crop_aug_range": [2.0, 2.0]}],
              dataset={"enable_bucket": True, "min_bucket_reso": 64})
    g.cache_latents(vae, 0.18215)
    assert g[0]["latents"] is not None


def _two_dataset_group(datasets, is_sdxl=False):
    bps = generate_blueprint({"datasets": datasets}, argparse.Namespace(), config_path="test.toml")
    return build_dataset_group(bps, is_sdxl=is_sdxl, seed=0)


def test_one_image_in_two_datasets_gets_a_cache_file_for_each(tmp_path, vae):
    """[ours] One folder used by a dataset at 64 px with flip_aug and one at 128 px with the alpha mask (or at the
    same size without it): sd-scripts' one file name per image made the datasets overwrite each other's file, so
    one trained at the other's resolution, the flipped latents went missing (KeyError) or the mask was dropped.
    Disk-cached batches must have what in-memory ones have, and a second run encodes nothing."""
    alpha = np.full((128, 128), 128, np.uint8)
    p = _rgba(tmp_path / "t" / "a.png", 128, 128, alpha)
    datasets = [{"resolution": 64, "subsets": [{"image_dir": str(p.parent), "class_tokens": "x", "flip_aug": True}]},
                {"resolution": 128, "subsets": [{"image_dir": str(p.parent), "class_tokens": "x", "alpha_mask": True}]},
                {"resolution": 128, "subsets": [{"image_dir": str(p.parent), "class_tokens": "x"}]}]
    scale = vae.config.scaling_factor
    memory = _two_dataset_group(datasets)
    memory.cache_latents(vae, scale)
    want = sorted((tuple(b["latents"].shape), b["alpha_masks"] is not None) for b in (memory[i] for i in range(len(memory))))
    assert want == [((1, 4, 8, 8), False), ((1, 4, 16, 16), False), ((1, 4, 16, 16), True)]
    for run in (1, 2):
        disk = _two_dataset_group(datasets)
        calls = []
        real = vae.encode
        vae.encode = lambda x: calls.append(tuple(x.shape)) or real(x)
        try:
            disk.cache_latents(vae, scale, to_disk=True)
        finally:
            vae.encode = real
        assert len(calls) == (4 if run == 1 else 0)  # 64 px and its flip, 128 px with and without the mask
        disk.set_current_epoch(1)
        got = [(tuple(b["latents"].shape), b["alpha_masks"] is not None, b["alpha_masks"])
               for b in (disk[i] for i in range(len(disk)))]
        assert sorted(g[:2] for g in got) == want
        masks = [g[2] for g in got if g[1]]
        assert float(masks[0].mean()) == pytest.approx(128 / 255, abs=1e-3)
    assert len([f for f in os.listdir(p.parent) if f.endswith("_sd.safetensors")]) == 3


def test_cache_files_follow_the_image_file_and_the_mask_folder(tmp_path, vae):
    """[ours] a.png and a.jpg are two images with two cache files (sd-scripts' name is the stem's: one trained on
    the other's latents); a subset pointed at another conditioning_data_dir does not take the masks cached from the
    first folder, however old its files are."""
    img(tmp_path / "t" / "a.png", color=(255, 255, 255))
    img(tmp_path / "t" / "a.jpg", color=(0, 0, 0))
    scale = vae.config.scaling_factor
    g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x"}])
    g.cache_latents(vae, scale, to_disk=True)
    lat = {k: b["latents"] for b in (g[i] for i in range(len(g))) for k in b["image_keys"]}
    assert len(lat) == 2 and not torch.allclose(*lat.values())  # one shared file gave both the same latents
    from safetensors import safe_open

    sources = set()
    for f in os.listdir(tmp_path / "t"):
        if f.endswith("_sd.safetensors"):
            with safe_open(str(tmp_path / "t" / f), "pt") as fh:
                sources.add(json.loads(fh.metadata()["apt_lora_cache"])["image"])
    assert sources == {"a.png", "a.jpg"}

    for name, value in (("white", 255), ("black", 0)):
        (tmp_path / name).mkdir()
        Image.new("L", (64, 64), value).save(tmp_path / name / "m.png")
    old = os.path.getmtime(tmp_path / "white" / "m.png") - 100
    os.utime(tmp_path / "black" / "m.png", (old, old))  # the second folder's mask predates the first's cache
    img(tmp_path / "m" / "m.png", seed=3)
    for name, want in (("white", 1.0), ("black", 0.0)):
        g = group([{"image_dir": str(tmp_path / "m"), "class_tokens": "x", "conditioning_data_dir": str(tmp_path / name)}])
        g.cache_latents(vae, scale, to_disk=True)
        assert float(g[0]["alpha_masks"].mean()) == want


def test_an_image_left_with_an_empty_bucket_is_named(tmp_path):
    """bucket_no_upscale shrinks a 5000x40 strip to the resolution's area, leaving a short side under
    bucket_reso_steps: the error says why the bucket is empty (it said the image was smaller than the step)."""
    img(tmp_path / "t" / "strip.png", 5000, 40)
    with pytest.raises(ConfigError, match=r"strip.png \(5000x40\) gets an empty bucket \(\d+x0\) with bucket_no_upscale"):
        group([{"image_dir": str(tmp_path / "t"), "class_tokens": "x"}],
              general={"resolution": 128, "enable_bucket": True, "bucket_no_upscale": True, "min_bucket_reso": 64})


def test_images_without_caption_files_are_warned_of_with_the_extension_there(tmp_path, caplog):
    """Images without a caption file train with the class tokens (sd-scripts says so); forgetting
    --caption_extension .txt (the default is .caption) trained every image on "sks dog" without a word here: now a
    warning names the extension the folder has."""
    for name in ("a", "b"):
        img(tmp_path / "t" / f"{name}.png")
        (tmp_path / "t" / f"{name}.txt").write_text(f"a photo of {name}")
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "sks dog"}])
    assert {c for i in range(len(g)) for c in g[i]["captions"]} == {"sks dog"}
    assert "2 of 2 images have no caption file (.caption)" in caplog.text
    assert "pass --caption_extension .txt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(tmp_path / "t"), "class_tokens": "sks dog", "caption_extension": ".txt"}])
        img(tmp_path / "reg" / "r.png")  # class tokens alone (DreamBooth's usual way): an info line, no warning
        group([{"image_dir": str(tmp_path / "t"), "class_tokens": "sks dog", "caption_extension": ".txt"},
               {"image_dir": str(tmp_path / "reg"), "class_tokens": "dog", "is_reg": True}])
    assert "no caption file" not in caplog.text
    assert {c for i in range(len(g)) for c in g[i]["captions"]} == {"a photo of a", "a photo of b"}


def test_an_image_folder_that_cannot_be_written_is_named_for_the_disk_cache(tmp_path, vae, monkeypatch):
    """--cache_latents_to_disk beside read-only images: a raw PermissionError. Now a ConfigError naming the subset,
    the folder and the in-memory --cache_latents, before the encoding when a cache must be written (folders whose
    caches are all valid, e.g. a dataset mounted read-only after they were made, are fine), and at the write (as
    root on an immutable folder, or a read-only file system, where the check cannot see it)."""
    import errno

    import library.dataset as dataset_lib

    img(tmp_path / "t" / "a.png")
    sub = {"image_dir": str(tmp_path / "t"), "class_tokens": "x"}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "t") else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"subsets\[0\].*cannot be written \(not writable\)\. Use --cache_latents"):
        group([sub]).cache_latents(vae, 0.18215, to_disk=True)
    monkeypatch.undo()
    group([sub]).cache_latents(vae, 0.18215, to_disk=True)  # the caches made ...
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "t") else real_access(p, mode))
    group([sub]).cache_latents(vae, 0.18215, to_disk=True)  # ... are read from a folder that is read-only now
    monkeypatch.undo()

    def read_only_fs(tensors, path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(dataset_lib, "atomic_save_safetensors", read_only_fs)
    with pytest.raises(ConfigError, match=r"cannot be written \(\[Errno 30\] Read-only file system.*--cache_latents"):
        group([sub], general={"resolution": 32}).cache_latents(vae, 0.18215, to_disk=True)


def test_disk_cache_names_and_leftovers_beside_the_images(tmp_path, vae):
    """An image whose file name is not UTF-8 cannot have a safetensors cache file (every run rewrote it, then the
    first batch crashed): a ConfigError names it. A cache write's temp file that a kill left beside the images is
    removed (the start-up cleanup only looked at --output_dir)."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "t"
    img(folder / "a.png")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    left = folder / f".a_0064x0064_0123abcd_sd.safetensors.{p.pid}.abcd1234.tmp"
    left.write_bytes(b"half a cache file")
    old = time.time() - 3600
    os.utime(left, (old, old))
    group([{"image_dir": str(folder), "class_tokens": "x"}]).cache_latents(vae, 0.18215, to_disk=True)
    assert not left.exists()

    odd = tmp_path / "odd"
    odd.mkdir()
    img(tmp_path / "ok.png")
    os.rename(tmp_path / "ok.png", os.path.join(os.fsencode(odd), b"caf\xe9.png"))
    g = group([{"image_dir": str(odd), "class_tokens": "x"}])
    with pytest.raises(ConfigError, match="its file name is not valid UTF-8.*--cache_latents \\(in memory\\)"):
        g.cache_latents(vae, 0.18215, to_disk=True)
    g.cache_latents(vae, 0.18215)  # in memory it trains
