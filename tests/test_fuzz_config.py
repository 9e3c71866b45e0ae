"""Fuzz tests (issue 5, point 8): any dataset config gives blueprints or a ConfigError, any caption and caption
options give a string or a ConfigError; never another exception (docs/reliability.md).

The runs are derandomized (the same examples every run, no .hypothesis folder) so that the suite stays
deterministic; set FUZZ_EXAMPLES=2000 FUZZ_RANDOM=1 to explore new inputs locally.
"""
import argparse
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from library.captions import process_caption, read_caption_file
from library.text_io import decode_text
from library.config_util import (ALL_KEYS, CLI_ONLY, DATASET_KEYS, DB_KEYS, SUBSET_KEYS, ConfigError,
                                 DatasetBlueprint, SubsetBlueprint, generate_blueprint, load_dataset_config,
                                 validate_dataset_config)
from library.dataset import build_dataset_group

SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(n):
    return settings(max_examples=SCALE or n, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.filter_too_much])


# -- values ----------------------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3000), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["512", "512,768", ".txt", "txt", "lanczos", "area", "sks dog", "", "|||"]))
any_value = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                         max_leaves=6)

GOOD = {  # plausible values per kind, so that the fuzzer also gets past validation
    "int": st.one_of(st.integers(-2, 2048), st.sampled_from([0, 1, 64, 256, 1024])),
    "float": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 0.0, 1.0, 0.1])),
    "bool": st.booleans(), "str": st.sampled_from([".txt", "caption", "sks dog", "dog", ",", ";;;", "|||", "", "lanczos"]),
    "reso": st.one_of(st.integers(-1, 1024), st.lists(st.integers(0, 1024), min_size=1, max_size=3)),
    "float_pair": st.lists(st.floats(0, 4), min_size=2, max_size=2), "table": st.dictionaries(st.text(max_size=4),
                                                                                               scalars, max_size=2),
}
KEYS = sorted(ALL_KEYS) + sorted(CLI_ONLY) + ["imge_dir", "resolutoin", "foo", "subsets", "datasets", "general",
                                               "conditioning_data_dir"]


LEVEL_KEYS = {"general": sorted({**DATASET_KEYS, **SUBSET_KEYS, **DB_KEYS}),
              "dataset": sorted({**DATASET_KEYS, **SUBSET_KEYS, **DB_KEYS}),
              "subset": sorted({**SUBSET_KEYS, **DB_KEYS, "is_reg": 0})}


rare = st.sampled_from([False] * 9 + [True])  # hypothesis favours the first element: the common case


@st.composite
def entry(draw, level):
    """Mostly a key of this level with a value of its type (so that valid configs come up), sometimes anything."""
    key = draw(st.sampled_from(KEYS if draw(rare) else LEVEL_KEYS[level]))
    kind = ALL_KEYS.get(key)
    if key in ("image_dir", "metadata_file"):
        value = draw(st.one_of(st.sampled_from(["/data/a", "/data/b", "m.json", ""]), any_value))
    elif kind is not None and not draw(rare):
        value = draw(GOOD[kind])
    else:
        value = draw(any_value)
    return key, value


def table(level, max_size=4):
    return st.lists(entry(level), max_size=max_size).map(dict)


@st.composite
def subset(draw):
    sub = draw(table("subset", max_size=4))
    if not draw(rare):  # mostly DreamBooth subsets with an image_dir
        sub.setdefault("image_dir", draw(st.sampled_from(["/data/a", "/data/b"])))
    if draw(rare):
        sub = {"metadata_file": "m.json", **{k: v for k, v in sub.items() if k not in DB_KEYS}}
    return sub


@st.composite
def dataset(draw):
    ds = draw(table("dataset", max_size=3))
    if not draw(rare):
        ds["subsets"] = draw(st.lists(subset(), min_size=0 if draw(rare) else 1, max_size=3))
    elif not draw(rare):
        ds["subsets"] = draw(any_value)
    if not draw(rare):
        ds["resolution"] = draw(st.sampled_from([512, 64, [768, 512]]))
    return ds


@st.composite
def config(draw):
    cfg = {}
    if draw(st.booleans()):
        cfg["general"] = draw(any_value) if draw(rare) else draw(table("general"))
    if not draw(rare):
        cfg["datasets"] = draw(st.lists(dataset(), min_size=0 if draw(rare) else 1, max_size=3))
    elif not draw(rare):
        cfg["datasets"] = draw(any_value)
    if draw(rare):
        key, value = draw(entry("general"))
        cfg[key] = value
    return cfg


cli_args = st.fixed_dictionaries({}, optional={
    "resolution": st.sampled_from(["512", "512,768", "768x512", "abc", "0", "1,2,3", ""]),
    "train_batch_size": st.integers(-1, 8), "enable_bucket": st.booleans(), "keep_tokens": st.integers(-1, 4),
    "caption_extension": st.sampled_from([".txt", "txt", ""]), "shuffle_caption": st.booleans(),
    "dataset_repeats": st.integers(-1, 3), "face_crop_aug_range": st.sampled_from(["2.0,4.0", "x", None]),
    "network_multiplier": st.floats(0, 2), "caption_dropout_rate": st.floats(-1, 2, allow_nan=False),
}).map(lambda d: argparse.Namespace(**d))


def check_blueprints(bps):
    assert isinstance(bps, list) and bps
    for bp in bps:
        assert isinstance(bp, DatasetBlueprint) and bp.subsets
        w, h = bp.resolution
        assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
        assert bp.batch_size >= 1 and bp.bucket_reso_steps >= 1 and bp.max_image_pixels >= 1
        for s in bp.subsets:
            assert isinstance(s, SubsetBlueprint) and s.num_repeats >= 1 and s.caption_separator
            assert 0 <= s.caption_dropout_rate <= 1 and 0 <= s.caption_tag_dropout_rate <= 1 and s.keep_tokens >= 0
            assert s.image_dir if bp.is_dreambooth else s.metadata_file


# -- dataset config --------------------------------------------------------------------------------------------------

@fuzz_settings(400)
@given(cfg=config(), args=cli_args, is_sdxl=st.sampled_from([None, False, True]))
def test_any_config_gives_blueprints_or_config_error(cfg, args, is_sdxl):
    try:
        validate_dataset_config(cfg, "fuzz.toml")
        valid = True
    except ConfigError as e:
        assert str(e).strip()
        valid = False
    try:
        bps = generate_blueprint(cfg, args, config_path="fuzz.toml", is_sdxl=is_sdxl)
    except ConfigError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        event(f"ConfigError ({'valid schema' if valid else 'invalid schema'})")
        return
    event("blueprints")
    assert valid  # generate_blueprint validates too
    check_blueprints(bps)


VALID_TOML = """\
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [512, 768]
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "/data/sks_dog"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "/data/reg"
  is_reg = true
"""


@fuzz_settings(250)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_TOML)), st.integers(0, 3),
                                st.sampled_from(list('[]="., \n#{}01x') + ["\\", "'''", "\x00", "é", "\ufeff"])),
                      min_size=0, max_size=3),
       suffix=st.sampled_from([".toml", ".json"]))
def test_mutated_config_files_give_a_config_or_a_config_error(tmp_path_factory, edits, suffix):
    text = VALID_TOML
    for pos, cut, ins in edits:
        pos = min(pos, len(text))
        text = text[:pos] + ins + text[pos + cut:]
    path = tmp_path_factory.getbasetemp() / f"mutated{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_dataset_config(path)
    except ConfigError as e:
        event("ConfigError")
        msg = str(e)
        assert str(path) in msg or "datasets" in msg or "`" in msg
        return
    try:
        check_blueprints(generate_blueprint(cfg, argparse.Namespace(), config_path=str(path)))
        event("blueprints")
    except ConfigError:
        event("ConfigError (blueprint)")


# -- the whole pipeline on a small real folder ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzdata")
    rng = np.random.default_rng(0)
    a = root / "a"
    a.mkdir()
    for name, (w, h) in {"wide.png": (96, 48), "tall.jpg": (40, 90), "sq.png": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(a / name)
    (a / "wide.txt").write_text("sks dog, {red|blue} ball, grass\nsecond line", encoding="utf-8")
    (a / "sq.txt").write_text("a ||| b, c ||| d", encoding="utf-8")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("x")
    return {"a": str(a), "empty": str(root / "empty"), "missing": str(root / "missing"),
            "file": str(root / "file.txt")}


small_values = {  # mostly workable values, some bad ones
    "resolution": st.sampled_from([64, 64, 128, [64, 128], [96, 64], 100, 1]),
    "batch_size": st.sampled_from([1, 2, 3, 0]), "enable_bucket": st.booleans(), "bucket_no_upscale": st.booleans(),
    "min_bucket_reso": st.sampled_from([32, 64, 64, 256]), "max_bucket_reso": st.sampled_from([128, 256, 256, 64]),
    "bucket_reso_steps": st.sampled_from([64, 64, 32, 128, 7]), "num_repeats": st.sampled_from([1, 2, 1, 0]),
    "flip_aug": st.booleans(), "random_crop": st.booleans(), "shuffle_caption": st.booleans(),
    "keep_tokens": st.integers(0, 3), "keep_tokens_separator": st.sampled_from(["", "|||"]),
    "enable_wildcard": st.booleans(), "caption_extension": st.sampled_from([".txt", ".txt", ".caption"]),
    "class_tokens": st.sampled_from(["sks dog", "sks dog", None, ""]),
    "caption_tag_dropout_rate": st.sampled_from([0, 0.5]), "max_image_pixels": st.sampled_from([10**9, 10**9, 3000, 1]),
    "is_reg": st.sampled_from([False, False, True]),
    "resize_interpolation": st.sampled_from([None, "area", "nearest", "lanczos", "bogus"]),
}


@fuzz_settings(60)
@given(data=st.data(), is_sdxl=st.booleans(),
       folder=st.sampled_from(["a", "a", "a", "a", "a", "empty", "missing", "file"]))
def test_any_small_config_builds_a_dataset_or_gives_a_config_error(folders, data, is_sdxl, folder):
    general = data.draw(st.fixed_dictionaries({"resolution": small_values["resolution"]}, optional={
        k: v for k, v in small_values.items() if k not in ("is_reg", "resolution")}))
    sub = data.draw(st.fixed_dictionaries({"class_tokens": small_values["class_tokens"]}, optional={
        k: small_values[k] for k in ("num_repeats", "is_reg", "caption_extension", "enable_wildcard", "flip_aug")}))
    sub = {k: v for k, v in sub.items() if v is not None}
    general = {k: v for k, v in general.items() if v is not None}
    subsets = [{"image_dir": folders[folder], **sub}]
    if data.draw(st.booleans()):
        subsets.append({"image_dir": folders["a"], "class_tokens": "x"})  # a second subset (duplicate folder)
    cfg = {"general": general, "datasets": [{"subsets": subsets}]}
    try:
        group = build_dataset_group(generate_blueprint(cfg, argparse.Namespace(), config_path="fuzz.toml"),
                                    is_sdxl=is_sdxl, seed=0)
        for epoch in (1, 2):
            group.set_current_epoch(epoch)
            for i in range(min(len(group), 3)):
                b = group[i]
                n = len(b["captions"])
                assert b["images"].shape[0] == n and all(isinstance(c, str) for c in b["captions"])
                assert np.isfinite(b["images"].numpy()).all()
                assert b["target_sizes_hw"].tolist() == [list(b["images"].shape[2:])] * n
        event("dataset built")
    except ConfigError as e:
        event("ConfigError")
        assert str(e).strip()


# -- captions ----------------------------------------------------------------------------------------------------------

caption_text = st.lists(st.sampled_from(list("ab ,;|{}\n\t.") + ["sks", "dog", "||", ";;;", "é", "⦅", "⦆", "\r"]),
                        max_size=24).map("".join)
separators = st.sampled_from(["", ",", ", ", ";", "|", "|||", " ", "\n", "a", "{", "⦅"])
caption_options = st.fixed_dictionaries({}, optional={
    "shuffle_caption": st.booleans(), "keep_tokens": st.one_of(st.integers(0, 5), st.integers(-2, 10**6)),
    "caption_separator": separators, "keep_tokens_separator": separators,
    "secondary_separator": separators, "enable_wildcard": st.booleans(),
    "caption_prefix": st.one_of(caption_text, st.integers()), "caption_suffix": caption_text,
    "caption_dropout_rate": st.one_of(st.sampled_from([0, 0.0, 0.5, 1, 1.0]), st.floats(-1, 2)),
    "caption_tag_dropout_rate": st.one_of(st.sampled_from([0, 0.3, 1.0]), st.floats(allow_nan=True)),
    "caption_dropout_every_n_epochs": st.integers(-1, 4),
    "token_warmup_step": st.one_of(st.sampled_from([0, 0.5, 3]), st.floats(-1, 12)),
    "token_warmup_min": st.integers(-1, 6),
})


@fuzz_settings(400)
@given(caption=caption_text, options=caption_options, seed=st.integers(0, 2**32), epoch=st.integers(1, 10),
       step=st.one_of(st.none(), st.integers(0, 15)))
def test_any_caption_and_options_give_a_string_or_a_config_error(caption, options, seed, epoch, step):
    cfg = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": "/data/a", **options}]}]}
    try:
        sub = generate_blueprint(cfg, argparse.Namespace(), config_path="fuzz.toml")[0].subsets[0]
    except ConfigError as e:
        assert str(e).strip()
        event("ConfigError")
        return
    event("caption processed")
    out = process_caption(sub, caption, rng=random.Random(seed), epoch=epoch, step=step, max_train_steps=10)
    assert isinstance(out, str)
    assert out == process_caption(sub, caption, rng=random.Random(seed), epoch=epoch, step=step,
                                  max_train_steps=10)  # a function of the seed and the step
    plain = not (sub.shuffle_caption or sub.caption_tag_dropout_rate or sub.caption_dropout_rate
                 or sub.caption_dropout_every_n_epochs or sub.enable_wildcard or sub.keep_tokens_separator
                 or sub.secondary_separator or sub.caption_prefix or sub.caption_suffix or sub.token_warmup_step)
    if plain:
        assert out == caption.split("\n")[0]
    if sub.caption_dropout_rate == 1 or (sub.caption_dropout_every_n_epochs and
                                         epoch % sub.caption_dropout_every_n_epochs == 0):
        assert out == ""


@fuzz_settings(300)
@given(data=st.one_of(st.binary(max_size=40), caption_text.map(lambda t: t.encode("utf-8")),
                      caption_text.map(lambda t: t.encode("utf-16")),
                      caption_text.map(lambda t: b"\xef\xbb\xbf" + t.encode("utf-8")),
                      st.text(max_size=20).map(lambda t: t.encode("cp1252", "ignore"))),
       wildcard=st.booleans())
def test_any_caption_file_gives_text_or_a_config_error(tmp_path_factory, data, wildcard):
    folder = tmp_path_factory.getbasetemp()
    image = str(folder / "img.png")
    (folder / "img.txt").write_bytes(data)
    try:
        text = read_caption_file(image, ".txt", wildcard)
    except ConfigError as e:
        assert str(folder / "img.txt") in str(e) and ("UTF-8" in str(e) or "empty" in str(e))
        return
    assert isinstance(text, str) and text.strip() and "\ufeff" not in text[:1]
    assert text == text.strip() and ("\n" not in text or wildcard)
    assert decode_text(data, "x", "caption file").strip()  # the same decoding
