"""Bad input battery (issue 5, point 5): every file is made by the test; each case gives its documented result
(docs/reliability.md), never a bare traceback, and the dataset folders are left as they were.

Already covered elsewhere (not repeated here, listed in docs/reliability.md): TOML syntax errors, wrong types and
unknown keys (tests/test_config_util.py), a missing or empty image_dir (tests/test_dataset.py), --network_weights
files for another model or in another format (tests/test_lora.py).
"""
import argparse
import hashlib
import io
import logging
import os
import re
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import train_apt_lora
from library.config_util import DEFAULT_MAX_IMAGE_PIXELS, ConfigError, generate_blueprint, load_dataset_config
from library.dataset import build_dataset_group
from library.tiny_models import write_tiny_model
from library.train_util import TrainingSetupError, check_output_location


# -- files ---------------------------------------------------------------------------------------------------------

def rgb(path, w=64, h=64, color=(200, 30, 60), fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path, fmt, **save)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(path, w, h, *, bit_depth=8, color_type=2, rows: bytes | None = None):
    """A PNG written byte by byte: header-only bombs (no pixel data behind a huge size) and 16-bit RGB images."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows) if rows is not None else zlib.compress(b"\0" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def snapshot(folder):
    """Every file under `folder` with its size, mtime and content hash."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def group(subsets, *, general=None, is_sdxl=False):
    cfg = {"general": {"resolution": 64, **(general or {})}, "datasets": [{"subsets": subsets}]}
    return build_dataset_group(generate_blueprint(cfg, argparse.Namespace(), config_path="test.toml"),
                               is_sdxl=is_sdxl, seed=0)


def samples(g):
    """{file name: (image (3,H,W), original (h, w), caption)} over one epoch."""
    out = {}
    for i in range(len(g)):
        b = g[i]
        for k, x, hw, c in zip(b["image_keys"], b["images"], b["original_sizes_hw"].tolist(), b["captions"]):
            out[os.path.basename(k)] = (x, tuple(hw), c)
    return out


def pixel(x, row, col):
    """(3,H,W) in [-1, 1] -> the 0..255 RGB triple at (row, col)."""
    return tuple(round(float(v)) for v in (x[:, row, col] + 1) * 127.5)


def close(a, b, tol=12):
    return all(abs(u - v) <= tol for u, v in zip(a, b))


# -- unreadable files: skipped with a warning naming them; all bad -> ConfigError ------------------------------------

def make_bad_files(d):
    rgb(d / "good.png")
    (d / "zero.png").write_bytes(b"")
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data, "JPEG")
    (d / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (d / "text.png").write_text("these are notes, not an image\n")
    raw_png(d / "bomb.png", 30000, 30000)  # 9e8 pixels announced, 60 bytes on disk


def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    d = tmp_path / "imgs"
    make_bad_files(d)
    before = snapshot(d)
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(d), "class_tokens": "x"}])
    assert list(samples(g)) == ["good.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    by_file = {name: next(m for m in warnings if name in m)
               for name in ("zero.png", "truncated.jpg", "text.png", "bomb.png")}
    assert "empty (0 bytes)" in by_file["zero.png"]
    assert "truncated" in by_file["truncated.jpg"]
    assert "not an image" in by_file["text.png"] and ".png" in by_file["text.png"]
    assert "30000x30000" in by_file["bomb.png"] and str(DEFAULT_MAX_IMAGE_PIXELS) in by_file["bomb.png"]
    assert "max_image_pixels" in by_file["bomb.png"]
    assert snapshot(d) == before

    os.remove(d / "good.png")
    with pytest.raises(ConfigError) as e:
        group([{"image_dir": str(d), "class_tokens": "x"}])
    assert "none of its 4 images can be read" in str(e.value) and str(d) in str(e.value)


def test_pixel_limit_is_configurable_and_replaces_pils_own(tmp_path, caplog, monkeypatch):
    d = tmp_path / "imgs"
    rgb(d / "a.png", 64, 64)
    rgb(d / "b.png", 32, 32)
    with caplog.at_level(logging.WARNING):
        g = group([{"image_dir": str(d), "class_tokens": "x"}], general={"max_image_pixels": 2000})
    assert list(samples(g)) == ["b.png"]
    assert "a.png" in caplog.text and "64x64 = 4096 pixels" in caplog.text and "limit of 2000 pixels" in caplog.text
    # a limit above PIL's own guard wins over it (PIL refuses above 2 x Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    g = group([{"image_dir": str(d), "class_tokens": "x"}], general={"max_image_pixels": 10_000})
    assert sorted(samples(g)) == ["a.png", "b.png"]
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ConfigError, match="max_image_pixels.*at least 1"):
        group([{"image_dir": str(d), "class_tokens": "x"}], general={"max_image_pixels": 0})


# -- unusual but valid images: trained as documented ----------------------------------------------------------------

def make_odd_images(d):
    d.mkdir(parents=True, exist_ok=True)
    Image.new("L", (64, 64), 100).save(d / "gray.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:] = (10, 200, 30, 0)  # fully transparent; the stored colour is green
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red
    Image.fromarray(np.full((64, 64), 0x4000, np.uint16)).save(d / "gray16.png")  # I;16, a quarter of full scale
    rows = b"".join(b"\0" + struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000) * 64 for _ in range(64))
    raw_png(d / "rgb16.png", 64, 64, bit_depth=16, color_type=2, rows=rows)  # 48-bit RGB: orange
    stored = np.zeros((40, 60, 3), np.uint8)  # stored 60 wide x 40 high: left half red, right half blue
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": upright it is 40 wide x 60 high, red on top
    Image.fromarray(stored).save(d / "rotated.jpg", exif=exif, quality=95)
    rgb(d / "small.png", 20, 16, (0, 128, 255))


def test_unusual_images_are_converted_as_documented(tmp_path, caplog):
    d = tmp_path / "imgs"
    make_odd_images(d)
    assert Image.open(d / "gray16.png").mode == "I;16" and Image.open(d / "rgb16.png").mode == "RGB"
    before = snapshot(d)
    with caplog.at_level(logging.INFO):
        g = group([{"image_dir": str(d), "class_tokens": "x"}], general={"resolution": 64}, is_sdxl=True)
    s = samples(g)
    assert sorted(s) == ["cmyk.jpg", "gray.png", "gray16.png", "rgb16.png", "rgba.png", "rotated.jpg", "small.png"]
    assert all(x.shape == (3, 64, 64) for x, _, _ in s.values())
    assert pixel(s["gray.png"][0], 10, 10) == (100, 100, 100)
    assert pixel(s["rgba.png"][0], 5, 5) == (10, 200, 30)  # alpha dropped, like sd-scripts
    assert "rgba.png" in caplog.text and "transparent pixels" in caplog.text
    assert close(pixel(s["cmyk.jpg"][0], 30, 30), (255, 0, 0))
    assert pixel(s["gray16.png"][0], 30, 30) == (64, 64, 64)  # 0x4000 / 257, not clipped to white
    assert pixel(s["rgb16.png"][0], 30, 30) == (255, 128, 0)
    # EXIF orientation applied: upright 40x60 (original size for SDXL conditioning), red on top, blue below
    x, hw, _ = s["rotated.jpg"]
    assert hw == (60, 40)
    assert close(pixel(x, 2, 32), (255, 0, 0), 40) and close(pixel(x, 61, 32), (0, 0, 255), 40)
    # an image smaller than the training size is upscaled, and the log says so once
    assert pixel(s["small.png"][0], 32, 32) == (0, 128, 255)
    upscale_lines = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(upscale_lines) == 1 and "2 of 7 images" in upscale_lines[0] and "bucket_no_upscale" in upscale_lines[0]
    assert snapshot(d) == before


def test_images_are_probed_on_threads_with_warnings_in_order(tmp_path, caplog, monkeypatch):
    """A dataset's images are decoded once at build time (a 12-megapixel JPEG: ~90 ms, 5000 of them minutes on
    one core): on threads now, with results and warnings in the order of the files."""
    import threading

    from library import image_io

    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        if i in (2, 5):
            p.write_bytes(b"not a png")
        else:
            rgb(p, 16 + i, 16, (i, 0, 0))
        paths.append(str(p))
    threads, real = set(), image_io.load_image_rgb

    def spy(*a, **k):
        threads.add(threading.get_ident())
        time.sleep(0.02)  # a decode takes time: every thread gets some of the files
        return real(*a, **k)

    monkeypatch.setattr(image_io, "load_image_rgb", spy)
    monkeypatch.setattr(image_io.os, "cpu_count", lambda: 4)
    results = image_io.probe_images(paths)
    assert [r if r is None else r[0] for r in results] == [(16 + i, 16) if i not in (2, 5) else None for i in range(8)]
    assert len(threads) > 1
    assert [m.split(":")[0] for m in caplog.messages] == [f"skipping image {paths[2]}", f"skipping image {paths[5]}"]


def test_a_floating_point_image_is_refused_by_name(tmp_path, caplog):
    """A float TIFF (mode F, values 0-1; reachable through a fine-tuning metadata key) trained as 0-1 out of 255,
    almost black, without a word; it has no known scale, so it is skipped with the reason."""
    from library.image_io import probe_images

    path = tmp_path / "depth.tif"
    Image.fromarray(np.full((64, 64), 0.5, np.float32), "F").save(path)
    assert Image.open(path).mode == "F"
    assert probe_images([str(path)]) == [None]
    assert f"skipping image {path}: a 32-bit floating-point image (mode F)" in caplog.text


def test_a_palette_images_transparency_is_its_alpha_mask(tmp_path):
    """alpha_mask = true with a palette PNG (transparency by colour index, as GIMP and pngquant save cutouts): the
    transparent index weighs 0, the rest 1. Read as "no alpha", the whole picture weighed 1 and the background
    trained as the subject without a word."""
    from library.image_io import load_image_rgb

    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1  # the right half in colour 1, the transparent one
    p = Image.fromarray(idx, "P")
    p.putpalette([200, 30, 60, 0, 0, 255] + [0] * 762)
    p.save(tmp_path / "cutout.png", transparency=1)
    assert Image.open(tmp_path / "cutout.png").mode == "P"
    image, alpha = load_image_rgb(str(tmp_path / "cutout.png"), with_alpha=True)
    expected = np.full((8, 8), 255, np.uint8)
    expected[:, 4:] = 0
    assert np.array_equal(np.asarray(alpha), expected)
    assert np.asarray(image)[0, 0].tolist() == [200, 30, 60] and np.asarray(image)[0, 7].tolist() == [0, 0, 255]


def test_32_bit_integer_greyscale_is_clipped_to_the_16_bit_scale(tmp_path):
    """A 32-bit integer TIFF (mode "I") can hold values outside 0-65535: they clip to black and white. Without the
    clip a negative value wrapped around to white and 70000 to near black."""
    from library.image_io import load_image_rgb

    arr = np.array([[-5, 70000, 257 * 100, 0]], np.int32)
    Image.fromarray(arr, "I").save(tmp_path / "depth.tif")
    assert Image.open(tmp_path / "depth.tif").mode == "I"
    got = np.asarray(load_image_rgb(str(tmp_path / "depth.tif")))
    assert got[0, :, 0].tolist() == [0, 255, 100, 0] and (got[..., 0] == got[..., 2]).all()


def test_an_image_of_exactly_max_image_pixels_is_kept(tmp_path):
    """The limit is the largest size allowed ("above the limit" is refused): a dataset sized to it keeps its
    images."""
    from library.image_io import probe_images

    paths = [str(rgb(tmp_path / "at.png", 50, 40)), str(rgb(tmp_path / "over.png", 51, 40))]
    assert probe_images(paths, max_pixels=2000) == [((50, 40), False), None]


def test_only_the_requested_latent_caches_are_written(tmp_path):
    from library.tiny_models import build_tiny_model

    d = tmp_path / "imgs"
    make_odd_images(d)
    make_bad_files(d)
    before = snapshot(d)
    g = group([{"image_dir": str(d), "class_tokens": "x"}])
    with torch.no_grad():
        g.cache_latents(build_tiny_model("sd1").vae, 0.18215, to_disk=True)
    after = snapshot(d)
    assert {k: after[k] for k in before} == before
    assert sorted(re.sub(r"_[0-9a-f]{8}_sd\.", "_sd.", f) for f in set(after) - set(before)) == [
        "cmyk_0064x0064_sd.safetensors", "good_0064x0064_sd.safetensors", "gray16_0064x0064_sd.safetensors", "gray_0064x0064_sd.safetensors",
        "rgb16_0064x0064_sd.safetensors", "rgba_0064x0064_sd.safetensors", "rotated_0040x0060_sd.safetensors",  # the upright size
        "small_0020x0016_sd.safetensors"]


def test_malformed_exif_is_ignored(tmp_path):
    d = tmp_path / "imgs"
    rgb(d / "bad_exif.jpg", 30, 20, (0, 255, 0), exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL: "Corrupt EXIF data"
        x, hw, _ = samples(group([{"image_dir": str(d), "class_tokens": "x"}]))["bad_exif.jpg"]
    assert hw == (20, 30) and close(pixel(x, 32, 32), (0, 255, 0))


def test_small_images_with_buckets_and_bucket_no_upscale(tmp_path, caplog):
    d = tmp_path / "imgs"
    rgb(d / "small.png", 100, 70)
    rgb(d / "big.png", 256, 256)
    buckets = {"resolution": 128, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256}
    with caplog.at_level(logging.INFO):
        g = group([{"image_dir": str(d), "class_tokens": "x"}], general=buckets)
    assert samples(g)["small.png"][0].shape[1:] == (128, 128)  # nearest bucket 128x128: 100x70 upscaled to 183x128
    assert sum("upscaled" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        g = group([{"image_dir": str(d), "class_tokens": "x"}], general={**buckets, "bucket_no_upscale": True})
    s = samples(g)
    assert s["small.png"][0].shape[1:] == (64, 64)  # 100x70 rounded down to 64: never enlarged
    assert s["big.png"][0].shape[1:] == (128, 128)  # larger than the area: shrunk to it
    assert not any("upscaled" in r.getMessage() for r in caplog.records)
    assert sum("bucket_no_upscale" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        group([{"image_dir": str(d), "class_tokens": "x"}], general={"resolution": 128, "bucket_no_upscale": True})
    assert "bucket_no_upscale has no effect without enable_bucket" in caplog.text


def test_extreme_aspect_ratio_is_refused_before_allocating(tmp_path):
    d = tmp_path / "imgs"
    rgb(d / "banner.png", 4000, 1)  # to cover 512x512 it would become 2048000x512
    with pytest.raises(ConfigError) as e:
        group([{"image_dir": str(d), "class_tokens": "x"}], general={"resolution": 512})
    assert "banner.png" in str(e.value) and "max_image_pixels" in str(e.value)


def test_image_changed_during_training_is_one_clear_error(tmp_path):
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    g = group([{"image_dir": str(d), "class_tokens": "x"}])
    (d / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"a\.png cannot be read any more .*empty"):
        g[0]
    # in a DataLoader worker (--max_data_loader_n_workers) the message stays the same, without torch's traceback
    from library.dataset import collate_batch
    with pytest.raises(ConfigError) as e:
        list(torch.utils.data.DataLoader(g, batch_size=1, collate_fn=collate_batch, num_workers=1))
    assert str(e.value).startswith(f"image {d / 'a.png'} cannot be read any more") and "Traceback" not in str(e.value)


# -- captions ---------------------------------------------------------------------------------------------------------

def test_caption_encodings(tmp_path):
    d = tmp_path / "imgs"
    for name in ("bom8", "bom16", "plain"):
        rgb(d / f"{name}.png")
    (d / "bom8.txt").write_bytes("\ufeffcafé, sks dog".encode("utf-8"))
    (d / "bom16.txt").write_bytes("café, sks dog\r\n".encode("utf-16"))  # PowerShell 5 `>`
    (d / "plain.txt").write_bytes("café, sks dog".encode("utf-8"))
    g = group([{"image_dir": str(d), "caption_extension": ".txt"}])
    assert {k: c for k, (_, _, c) in samples(g).items()} == {
        "bom8.png": "café, sks dog", "bom16.png": "café, sks dog", "plain.png": "café, sks dog"}

    rgb(d / "legacy.png")
    rgb(d / "legacy2.png")
    (d / "legacy.txt").write_bytes("café, sks dog".encode("cp1252"))
    (d / "legacy2.txt").write_bytes("犬".encode("shift_jis"))
    before = snapshot(d)
    with pytest.raises(ConfigError) as e:
        group([{"image_dir": str(d), "caption_extension": ".txt"}])
    msg = str(e.value)
    assert str(d / "legacy.txt") in msg and "not UTF-8" in msg and "byte 3 (0xe9)" in msg and "Re-save" in msg
    assert "1 more caption files" in msg and "legacy2.txt" in msg
    assert snapshot(d) == before  # never rewritten for the user


def test_empty_captions(tmp_path):
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    (d / "a.txt").write_text("\n  \nsks dog, grass\n", encoding="utf-8")  # leading blank lines: first text line
    g = group([{"image_dir": str(d), "caption_extension": ".txt"}])
    assert samples(g)["a.png"][2] == "sks dog, grass"
    (d / "a.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a\.txt is empty.*class_tokens"):
        group([{"image_dir": str(d), "caption_extension": ".txt", "class_tokens": "sks dog"}])
    os.remove(d / "a.txt")
    with pytest.raises(ConfigError, match=r"a\.png has no caption file .*class_tokens"):
        group([{"image_dir": str(d), "caption_extension": ".txt", "class_tokens": ""}])


def test_empty_or_non_string_fine_tuning_captions(tmp_path):
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    md = tmp_path / "meta.json"

    def run(entry):
        md.write_text(__import__("json").dumps({"a.png": entry}), encoding="utf-8")
        return group([{"image_dir": str(d), "metadata_file": str(md)}])

    assert samples(run({"caption": "", "tags": "dog, grass"}))["a.png"][2] == "dog, grass"
    for entry in ({"caption": " ", "tags": ""}, {"caption": None}, {}):
        with pytest.raises(ConfigError, match=r"'a\.png' has neither \"caption\" nor \"tags\""):
            run(entry)
    with pytest.raises(ConfigError, match=r"\"caption\" must be a string, got int"):
        run({"caption": 5})
    md.write_bytes(b'\xef\xbb\xbf{"a.png": {"caption": "sks dog"}}')  # UTF-8 BOM
    assert samples(group([{"image_dir": str(d), "metadata_file": str(md)}]))["a.png"][2] == "sks dog"


# -- dataset config files (the rest: tests/test_config_util.py) -------------------------------------------------------

def test_dataset_toml_with_bom_and_structural_mistakes(tmp_path):
    p = tmp_path / "d.toml"
    p.write_bytes(b'\xef\xbb\xbf[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "x"\n')
    assert load_dataset_config(p)["general"]["resolution"] == 64  # Notepad's UTF-8 BOM is fine
    p.write_bytes("[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'x'\n".encode("utf-16"))
    assert load_dataset_config(p)["general"]["resolution"] == 64  # so is PowerShell 5's UTF-16 (`>`, Out-File)
    with pytest.raises(ConfigError, match="no \\[\\[datasets\\]\\] table"):
        generate_blueprint({"general": {"resolution": 64}, "datasets": []}, argparse.Namespace())
    with pytest.raises(ConfigError, match="image_dir is empty"):
        generate_blueprint({"datasets": [{"resolution": 64, "subsets": [{"image_dir": ""}]}]}, argparse.Namespace())
    with pytest.raises(ConfigError, match="bucket_reso_steps .* larger than the resolution's smaller side"):
        generate_blueprint({"datasets": [{"resolution": 512, "enable_bucket": True, "bucket_reso_steps": 1024,
                                          "min_bucket_reso": 256, "max_bucket_reso": 1024,
                                          "subsets": [{"image_dir": "x"}]}]}, argparse.Namespace())
    p.write_bytes("[general]\nclass_tokens = \"caf\xe9\"\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"dataset config {p} is not UTF-8 text: .* at byte 29 \(0xe9\)"):
        load_dataset_config(p)


# -- output location ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, needle", [
    ("sub/lora", "path separator"), ("sub\\lora", "path separator"), ("../lora", "path separator"),
    ("..", "contains '..'"), ("lora..v2", "contains '..'"), ("", "empty"), ("  ", "empty"),
    ("lo\nra", "control character"), ("x" * 250, "too long"),
    # names Windows refuses (a run there failed at its first save; a file copied there cannot keep its name)
    ("style:v2", "the character :"), ('a?b*"c"', 'the characters " * ?'), ("a<b>|c", "the characters < > |"),
    ("CON", "the device name CON"), ("nul.v2", "the device name NUL"), ("com1", "the device name COM1"),
])
def test_output_name_refused(name, needle, tmp_path):
    with pytest.raises(TrainingSetupError) as e:
        check_output_location(argparse.Namespace(output_name=name, output_dir=str(tmp_path)))
    assert "--output_name" in str(e.value) and needle in str(e.value)


def test_the_longest_accepted_output_name_can_be_saved(tmp_path):
    """The limit counts the temporary name a save is first written under: a name 1 byte under the limit used to
    pass the check and fail the first step save with ENAMETOOLONG (hours into a run)."""
    from library.safe_io import atomic_save_safetensors
    from library.train_util import ckpt_name

    n = 1
    while True:  # the longest name the check accepts
        try:
            check_output_location(argparse.Namespace(output_name="n" * (n + 1), output_dir=str(tmp_path)))
        except TrainingSetupError:
            break
        n += 1
    path = tmp_path / ckpt_name("n" * n, step=99999999).replace(".safetensors", "-20261207-220000.safetensors")
    atomic_save_safetensors({"x": torch.zeros(1)}, str(path))  # an interrupt's time-stamped name, the longest
    assert path.is_file()


def test_the_name_limit_counts_bytes_not_characters(tmp_path):
    """File names are limited to 255 bytes, not characters: a name in Japanese or Chinese (3 bytes a character in
    UTF-8) counted by characters passed the check and failed the first save with ENAMETOOLONG, hours into the run.
    The longest suffix is 63 bytes ("-step00000000-20261207-220000.safetensors" and ".<pid>.<8>.tmp", 41 + 22), so
    255 - 63 = 192 bytes: 64 three-byte characters pass, 65 do not, and the longest file of the 64 saves."""
    from library.safe_io import atomic_save_safetensors
    from library.train_util import ckpt_name

    check_output_location(argparse.Namespace(output_name="名" * 64, output_dir=str(tmp_path)))
    check_output_location(argparse.Namespace(output_name="n" * 192, output_dir=str(tmp_path)))
    for name in ("名" * 65, "n" * 191 + "é"):
        with pytest.raises(TrainingSetupError, match="--output_name is too long"):
            check_output_location(argparse.Namespace(output_name=name, output_dir=str(tmp_path)))
    path = tmp_path / ckpt_name("名" * 64, step=99999999).replace(".safetensors", "-20261207-220000.safetensors")
    atomic_save_safetensors({"x": torch.zeros(1)}, str(path))
    assert path.is_file()


def test_output_name_and_dir_accepted(tmp_path):
    for name in (None, "my_lora", "sks dog v1.5", "ünïcode-名前", "style_v1.", "my lora ", "com0", "console"):
        check_output_location(argparse.Namespace(output_name=name, output_dir=str(tmp_path / "new" / "deeper")))
    assert not (tmp_path / "new").exists()  # nothing created by the check
    assert os.listdir(tmp_path) == []  # and nothing left behind


def test_output_dir_that_cannot_be_created_or_written(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, needle in ((f, "it is a file, not a folder"), (f / "sub", f"{f} is a file, not a folder")):
        with pytest.raises(TrainingSetupError) as e:
            check_output_location(argparse.Namespace(output_name="lora", output_dir=str(out)))
        assert f"--output_dir {out}" in str(e.value) and needle in str(e.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores permission bits (the file-in-the-way case above covers root)")
def test_output_dir_without_write_permission(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro, ro / "sub"):
            with pytest.raises(TrainingSetupError, match="cannot write in .*Permission denied"):
                check_output_location(argparse.Namespace(output_name="lora", output_dir=str(out)))
    finally:
        ro.chmod(0o755)


# -- the trainer: one "error: ..." line, exit code 2, no traceback -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "sd1")
    write_tiny_model("sd1", path)
    return path


def _toml(tmp_path, image_dir, **subset):
    lines = ["[[datasets]]", "resolution = 64", "", "  [[datasets.subsets]]", f"  image_dir = '{image_dir}'",
             "  class_tokens = 'sks dog'"] + [f"  {k} = {v!r}".replace("'", '"') for k, v in subset.items()]
    path = tmp_path / "dataset.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _main(capsys, model, dataset, out, *extra):
    argv = ["--pretrained_model_name_or_path", model, "--dataset_config", dataset, "--output_dir", str(out),
            "--output_name", "lora", "--network_dim", "2", "--network_alpha", "2", "--max_train_steps", "2",
            "--seed", "1", *extra]
    rc = train_apt_lora.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == (rc != 0)  # one "error: ..." line (before it: progress bars of model loading)
    return rc, err[err.index("error: "):] if errors else err


def test_trainer_trains_on_the_battery_folder_and_leaves_it_untouched(tiny_sd1, tmp_path, capsys, caplog):
    d = tmp_path / "imgs"
    make_bad_files(d)
    make_odd_images(d)
    before = snapshot(d)
    with caplog.at_level(logging.WARNING):
        rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--cache_latents")
    assert rc == 0, err
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    for name in ("zero.png", "truncated.jpg", "text.png", "bomb.png"):
        assert f"skipping image {d / name}" in caplog.text
    assert snapshot(d) == before  # in-memory latent cache: nothing written beside the images


def test_trainer_bad_data_gives_one_clear_error(tiny_sd1, tmp_path, capsys):
    d = tmp_path / "imgs"
    make_bad_files(d)
    os.remove(d / "good.png")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out")
    assert rc == 2 and err.startswith("error: ") and "none of its 4 images can be read" in err

    rgb(d / "good.png")
    (d / "good.txt").write_bytes("caf\xe9".encode("latin-1"))
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d, caption_extension=".txt"), tmp_path / "out")
    assert rc == 2 and err.startswith("error: ") and str(d / "good.txt") in err and "not UTF-8" in err

    bad = tmp_path / "syntax.toml"
    bad.write_text("[[datasets]]\nresolution = = 64\n")
    rc, err = _main(capsys, tiny_sd1, str(bad), tmp_path / "out")
    assert rc == 2 and err.startswith("error: ") and f"{bad}:2:" in err
    assert not (tmp_path / "out").exists()


def test_text_encoder_cache_refuses_captions_that_change_every_step(tiny_sd1, tmp_path, capsys):
    """--cache_text_encoder_outputs keeps one encoding per caption string: shuffled or tag-dropped captions would
    make it grow without bound, so (as sd-scripts) the run is refused before the model loads, naming the subset."""
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    cache = ("--network_train_unet_only", "--cache_text_encoder_outputs")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d, caption_tag_dropout_rate=0.1), tmp_path / "out", *cache)
    assert rc == 2 and "datasets[0].subsets[0]" in err and "caption_tag_dropout_rate makes a new caption" in err
    toml = _toml(tmp_path, d)
    with open(toml, "a", encoding="utf-8") as f:
        f.write("  shuffle_caption = true\n")
    rc, err = _main(capsys, tiny_sd1, toml, tmp_path / "out", *cache)
    assert rc == 2 and "shuffle_caption makes a new caption" in err and not (tmp_path / "out").exists()
    assert _main(capsys, tiny_sd1, toml, tmp_path / "out")[0] == 0  # without the cache it trains


def test_trainer_foreign_network_weights(tiny_sd1, tmp_path, capsys):
    import safetensors.torch

    d = tmp_path / "imgs"
    rgb(d / "a.png")
    peft = tmp_path / "peft.safetensors"
    safetensors.torch.save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4)},
                                str(peft))
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--network_weights", str(peft))
    assert rc == 2 and err.startswith("error: ") and str(peft) in err and "diffusers/PEFT" in err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--network_weights", str(garbage))
    assert rc == 2 and err.startswith("error: ") and "cannot read it as safetensors" in err


def test_trainer_refuses_bad_output_location_before_training(tiny_sd1, tmp_path, capsys):
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--output_name", "../escape")
    assert rc == 2 and err.startswith("error: ") and "--output_name" in err and "path separator" in err
    assert not (tmp_path / "escape.safetensors").exists() and not (tmp_path / "out").exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), blocker / "sub")
    assert rc == 2 and err.startswith("error: ") and "--output_dir" in err and "not a folder" in err


def test_mixed_precision_the_device_lacks_is_one_clear_error(tiny_sd1, tmp_path, capsys, monkeypatch):
    """accelerate refuses fp16 where the device has no fp16 autocast (Apple's mps with torch < 2.8) with a bare
    ValueError from its constructor: the run ends with one error naming the flag and what to use instead."""
    import accelerate

    real = accelerate.Accelerator

    def accelerator(*a, mixed_precision=None, **kw):
        if mixed_precision == "fp16":  # what accelerate 1.x raises there
            raise ValueError("fp16 mixed precision is not supported on 'mps'.")
        return real(*a, mixed_precision=mixed_precision, **kw)

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    d = tmp_path / "imgs"
    rgb(d / "a.png")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--mixed_precision", "fp16")
    assert rc == 2 and err.startswith("error: --mixed_precision fp16: accelerate refuses it on this device")
    assert "not supported on 'mps'" in err and "--mixed_precision bf16 or no" in err
    assert not (tmp_path / "out").exists()


def test_a_latent_cache_path_over_windows_max_path_ends_the_run_with_the_way_out(tiny_sd1, tmp_path, capsys,
                                                                                  windows_path_limit):
    """--cache_latents_to_disk beside images in a deep folder (Windows without long paths): one error naming the
    cache file, the length and long paths, not "free space or fix the folder's permissions"."""
    d = tmp_path / ("p" * max(1, 235 - len(str(tmp_path))))
    rgb(d / "a.png")
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, d), tmp_path / "out", "--cache_latents", "--cache_latents_to_disk")
    assert rc == 1 and err.startswith(f"error: cannot write {d / 'a'}") and "over Windows' limit of 259" in err
    assert "LongPathsEnabled" in err and "Free space" not in err


def test_an_image_folder_deeper_than_windows_max_path_is_named_with_the_limit(tiny_sd1, tmp_path, capsys,
                                                                             windows_path_limit):
    """Windows without long paths sees a folder past 259 characters as missing: "folder not found" alone sent users
    checking a path that is there. The message says the length and the two ways out (a short path: no such hint)."""
    deep = tmp_path / ("p" * max(1, 270 - len(str(tmp_path))))  # not created: what Windows reports for it
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, deep), tmp_path / "out")
    assert rc == 2 and "folder not found" in err and str(deep) in err
    assert f"Its full path is {len(str(deep))} characters, over Windows' limit of 259" in err and "LongPathsEnabled" in err
    rc, err = _main(capsys, tiny_sd1, _toml(tmp_path, tmp_path / "nope"), tmp_path / "out")
    assert rc == 2 and "folder not found" in err and "Windows' limit" not in err
