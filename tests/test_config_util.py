"""Dataset TOML: parsing errors, schema/levels, fallback subset > dataset > general > CLI > default, CLI-only mode."""
import argparse
import logging
import textwrap

import pytest

from library.config_util import (ConfigError, check_bucket_reso_steps, generate_blueprint, load_dataset_config,
                                 load_toml, validate_dataset_config)


def write(tmp_path, text, name="dataset.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def ns(**kw):
    return argparse.Namespace(**kw)


# -- parsing ---------------------------------------------------------------------------------------------------------

def test_toml_syntax_error_has_file_line_and_column(tmp_path):
    p = write(tmp_path, """\
        [general]
        shuffle_caption = true
        keep_tokens = = 1
        """)
    with pytest.raises(ConfigError) as e:
        load_toml(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "column" in msg and f"{p}:3:" in msg
    assert "keep_tokens = = 1" in msg  # the offending line is shown


@pytest.mark.parametrize("path", [r"C:\Users\me\imgs", "C:\\photos\\"])
def test_a_windows_path_in_double_quotes_is_explained(tmp_path, path):
    r""""C:\Users..." fails as an escape (\U wants hex digits; a trailing backslash escapes the quote): the message
    says how to write the path."""
    p = write(tmp_path, f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{path}"\n')
    with pytest.raises(ConfigError) as e:
        load_dataset_config(p)
    assert f"{p}:3:" in str(e.value) and str(e.value).endswith(
        'A backslash inside "double quotes" starts an escape in TOML (\\n, \\t, \\U...): write a Windows path in '
        "single quotes, 'C:\\Users\\me\\photos', or with forward slashes, \"C:/Users/me/photos\".")
    p.write_text(f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{path.rstrip(chr(92))}'\n")
    assert load_dataset_config(p)["datasets"][0]["subsets"][0]["image_dir"] == path.rstrip(chr(92))  # as advised


def test_a_windows_path_whose_escapes_are_valid_toml_is_explained_where_it_is_not_found(tmp_path):
    r""""D:	rainest" parses (	 and  are TOML escapes) into D:<tab>rain<backspace>est; "folder not found"
    said nothing of backslashes. It says how to write the path now."""
    import argparse

    from library.dataset import build_dataset_group

    p = write(tmp_path, '[[datasets]]\n  resolution = 64\n  [[datasets.subsets]]\n  image_dir = "D:\\train\\best"\n'
                        '  class_tokens = "sks dog"\n')
    config = load_dataset_config(p)
    assert config["datasets"][0]["subsets"][0]["image_dir"] == "D:\train\best"
    with pytest.raises(ConfigError) as e:
        build_dataset_group(generate_blueprint(config, argparse.Namespace(), config_path=str(p)), is_sdxl=False,
                            seed=0)
    assert "folder not found" in str(e.value) and str(e.value).endswith(
        "It reads 'D:\\train\\x08est': a backslash inside \"double quotes\" starts an escape in TOML (\\t is a "
        "tab, \\b a backspace ...): write a Windows path in single quotes, 'C:\\Users\\me\\photos', or with forward "
        "slashes, \"C:/Users/me/photos\".")


def test_load_dataset_config_syntax_error_and_missing_file(tmp_path):
    p = write(tmp_path, '[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "/x\n')
    with pytest.raises(ConfigError, match=r"line 4, column"):
        load_dataset_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_dataset_config(tmp_path / "nope.toml")


def test_json_config_syntax_error(tmp_path):
    p = write(tmp_path, '{"datasets": [{"subsets": [{"image_dir": "a",}]}]}', name="d.json")
    with pytest.raises(ConfigError, match=r"d.json:1:\d+: JSON syntax error"):
        load_dataset_config(p)


# -- schema ------------------------------------------------------------------------------------------------------------

def test_typo_names_key_path_and_closest_key(tmp_path):
    p = write(tmp_path, """\
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "/a"
          [[datasets.subsets]]
          imge_dir = "/b"
        """)
    with pytest.raises(ConfigError) as e:
        load_dataset_config(p)
    msg = str(e.value)
    assert "datasets[0].subsets[1].imge_dir" in msg
    assert "Did you mean `image_dir`?" in msg
    assert str(p) in msg


def test_unknown_keys_at_every_level_are_all_reported(tmp_path):
    cfg = {"genral": {}, "general": {"shufle_caption": True},
           "datasets": [{"resolutoin": 512, "subsets": [{"image_dir": "/a", "class_token": "x"}]}]}
    with pytest.raises(ConfigError) as e:
        validate_dataset_config(cfg, "cfg.toml")
    msg = str(e.value)
    assert "`genral`" in msg and "`general`?" in msg
    assert "general.shufle_caption" in msg and "`shuffle_caption`?" in msg
    assert "datasets[0].resolutoin" in msg and "`resolution`?" in msg
    assert "datasets[0].subsets[0].class_token" in msg and "`class_tokens`?" in msg


@pytest.mark.parametrize("value, expected", [('"4"', "an integer"), ("true", "an integer"), ("4.5", "an integer")])
def test_type_errors(tmp_path, value, expected):
    p = write(tmp_path, f"[general]\nbatch_size = {value}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/a'\n")
    with pytest.raises(ConfigError, match=rf"general.batch_size.*expected {expected}"):
        load_dataset_config(p)


def test_value_types_accepted():
    cfg = {"general": {"resolution": [768, 512], "caption_dropout_rate": 0, "flip_aug": True,
                       "face_crop_aug_range": [2, 4.0], "custom_attributes": {"a": 1}},
           "datasets": [{"resolution": 512, "subsets": [{"image_dir": "/a", "token_warmup_step": 0.5}]}]}
    validate_dataset_config(cfg)
    with pytest.raises(ConfigError, match=r"resolution.*\[width, height\]"):
        validate_dataset_config({"datasets": [{"resolution": [512], "subsets": [{"image_dir": "/a"}]}]})
    with pytest.raises(ConfigError, match="true or false"):
        validate_dataset_config({"datasets": [{"subsets": [{"image_dir": "/a", "flip_aug": "yes"}]}]})


@pytest.mark.parametrize("cfg, needle", [
    ({"datasets": [{"subsets": [{"image_dir": "/a", "batch_size": 2}]}]},
     "datasets[0].subsets[0].batch_size`: `batch_size` is a dataset-level key"),
    ({"general": {"image_dir": "/a"}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]},
     "general.image_dir`: `image_dir` is only allowed inside a [[datasets.subsets]]"),
    ({"datasets": [{"is_reg": True, "subsets": [{"image_dir": "/a"}]}]}, "datasets[0].is_reg`: `is_reg` is only"),
    ({"datasets": [{"caption_extension": ".txt", "subsets": [{"metadata_file": "m.json"}]}]},
     "datasets[0].caption_extension`: `caption_extension` is for DreamBooth"),
    ({"datasets": [{"subsets": [{"metadata_file": "m.json", "class_tokens": "x"}]}]},
     "datasets[0].subsets[0].class_tokens`: `class_tokens` is for DreamBooth"),
    ({"datasets": [{"subsets": [{"metadata_file": "m.json", "cache_info": True}]}]}, "`cache_info` is for DreamBooth"),
    ({"datasets": [{"subsets": [{"metadata_file": "m.json", "prior_class_tokens": "dog"}]}]},
     "`prior_class_tokens` is for DreamBooth"),
    ({"general": {"prior_loss_weight": 1.0}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]},
     "pass --prior_loss_weight instead"),
    ({"datasets": [{"subsets": [{"image_dir": "/a"}, {"metadata_file": "m.json"}]}]}, "cannot be mixed"),
    ({"datasets": [{"subsets": [{"class_tokens": "x"}]}]}, "required key `image_dir` is missing"),
    ({"datasets": [{"resolution": 512}]}, "datasets[0]`: the dataset has no subsets"),
    ({"general": {}}, "no [[datasets]] table"),
    ({"image_dir": "/a", "datasets": [{"subsets": [{"image_dir": "/a"}]}]}, "must be inside [general]"),
])
def test_level_and_structure_violations(cfg, needle):
    with pytest.raises(ConfigError) as e:
        validate_dataset_config(cfg, "x.toml")
    assert needle.replace("`: ", "` in x.toml: ") in str(e.value)


def test_full_sd_scripts_key_set_is_accepted():
    dataset_only = {"batch_size": 1, "resolution": 512, "enable_bucket": True, "min_bucket_reso": 256,
                    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
                    "network_multiplier": 1.0, "validation_split": 0.0, "validation_seed": 1}
    everywhere = {"resize_interpolation": "lanczos", "num_repeats": 1, "shuffle_caption": True,
                  "caption_separator": ",", "keep_tokens": 1, "keep_tokens_separator": "|||",
                  "secondary_separator": ";;;", "enable_wildcard": True, "caption_prefix": "a", "caption_suffix": "b",
                  "color_aug": False, "flip_aug": True, "random_crop": False, "face_crop_aug_range": [2.0, 4.0],
                  "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": {}, "caption_dropout_rate": 0.1,
                  "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.1}
    dreambooth = {"class_tokens": "x", "caption_extension": ".txt", "cache_info": False, "prior_class_tokens": "y"}
    validate_dataset_config({
        "general": {**dataset_only, **everywhere, **dreambooth},
        "datasets": [{**dataset_only, **everywhere, **dreambooth, "subsets": [
                         {"image_dir": "/a", "is_reg": False, "alpha_mask": False, **everywhere, **dreambooth}]},
                     {**dataset_only, **everywhere, "subsets": [
                         {"metadata_file": "m.json", "image_dir": "/b", "alpha_mask": False, **everywhere}]}]})


# -- fallback (KOHYA_COMPAT.md 4.3, Example 1) ------------------------------------------------------------------------

EXAMPLE_1 = """\
    [general]
    shuffle_caption = true
    caption_extension = ".txt"
    keep_tokens = 1

    [[datasets]]
    resolution = 512
    batch_size = 4
    keep_tokens = 2

      [[datasets.subsets]]
      image_dir = "{d}/hoge"
      class_tokens = "hoge girl"

      [[datasets.subsets]]
      image_dir = "{d}/fuga"
      class_tokens = "fuga boy"
      keep_tokens = 3

      [[datasets.subsets]]
      is_reg = true
      image_dir = "{d}/reg"
      class_tokens = "human"
      keep_tokens = 1

    [[datasets]]
    resolution = [768, 768]
    batch_size = 2

      [[datasets.subsets]]
      image_dir = "{d}/piyo"
      metadata_file = "{d}/piyo/piyo_md.json"
    """


def test_fallback_order_example_1(tmp_path):
    p = write(tmp_path, EXAMPLE_1.format(d=tmp_path.as_posix()))
    args = ns(train_batch_size=8, dataset_repeats=3, flip_aug=True, caption_extension=".cap", keep_tokens=7,
              min_bucket_reso=None, resolution="1024")
    db, ft = generate_blueprint(load_dataset_config(p), args, config_path=p)
    hoge, fuga, reg = db.subsets
    (piyo,) = ft.subsets
    assert db.is_dreambooth and not ft.is_dreambooth
    # subset > dataset > general
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens, piyo.keep_tokens) == (2, 3, 1, 1)
    assert hoge.caption_extension == ".txt"  # general beats CLI
    assert all(s.shuffle_caption for s in (hoge, fuga, reg, piyo))
    assert reg.is_reg and not hoge.is_reg and hoge.class_tokens == "hoge girl"
    assert (db.batch_size, ft.batch_size) == (4, 2)  # config beats --train_batch_size
    assert (db.resolution, ft.resolution) == ((512, 512), (768, 768))  # config beats --resolution
    # CLI beats defaults (with the name mapping dataset_repeats -> num_repeats)
    assert hoge.flip_aug and piyo.flip_aug
    assert hoge.num_repeats == 3 and piyo.num_repeats == 3
    # None counts as unset -> default
    assert db.min_bucket_reso == 256 and db.max_bucket_reso == 1024 and db.bucket_reso_steps == 64
    assert piyo.metadata_file.endswith("piyo_md.json") and piyo.class_tokens is None
    assert db.from_user_config and hoge.key_path == "datasets[0].subsets[0]"


def test_cli_values_and_defaults_when_config_is_silent(tmp_path):
    cfg = {"datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    (bp,) = generate_blueprint(cfg, ns(resolution="768,512", train_batch_size=3, enable_bucket=True))
    assert bp.resolution == (768, 512) and bp.batch_size == 3 and bp.enable_bucket
    (s,) = bp.subsets
    assert s.caption_extension == ".caption" and s.num_repeats == 1 and s.caption_separator == ","
    cfg["general"] = {"resolution": 64}
    (bp,) = generate_blueprint(cfg, object(), config_path="x.toml")  # args without any attribute
    assert bp.batch_size == 1


def test_resolution_required_for_dreambooth():
    with pytest.raises(ConfigError) as e:
        generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}, ns(resolution=None),
                           config_path="d.toml")
    msg = str(e.value)
    assert "resolution is required" in msg and "--resolution" in msg and "d.toml" in msg


def test_caption_extension_gets_a_dot():
    (bp,) = generate_blueprint({"general": {"resolution": 64, "caption_extension": "txt"},
                                "datasets": [{"subsets": [{"image_dir": "/a"}]}]}, ns())
    assert bp.subsets[0].caption_extension == ".txt"


def test_bad_cli_value_names_the_flag():
    with pytest.raises(ConfigError, match="--resolution"):
        generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}, ns(resolution="big"))


# -- values ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    ({"face_crop_aug_range": [4.0, 2.0]}, "= [4.0, 2.0]: give [min, max] with 0 < min <= max"),
    ({"face_crop_aug_range": [0, 2.0]}, "= [0.0, 2.0]: give [min, max] with 0 < min <= max"),
])
def test_out_of_range_face_crop_aug_range_raises(extra, needle):
    cfg = {"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "/a", **extra}]}]}
    with pytest.raises(ConfigError) as e:
        generate_blueprint(cfg, ns(), config_path="d.toml")
    assert needle in str(e.value) and "datasets[0].subsets[0]" in str(e.value)


def test_token_warmup_keys_are_checked():
    cfg = {"general": {"resolution": 64, "token_warmup_min": 2},
           "datasets": [{"subsets": [{"image_dir": "/a", "token_warmup_step": 0.25}]}]}
    (sub,) = generate_blueprint(cfg, ns(), config_path="d.toml")[0].subsets
    assert (sub.token_warmup_step, sub.token_warmup_min) == (0.25, 2)
    for key, value, needle in (("token_warmup_step", -1, "must be 0 (off) or more"),
                               ("token_warmup_min", -2, "must be 0 or more")):
        cfg["datasets"][0]["subsets"][0][key] = value
        with pytest.raises(ConfigError) as e:
            generate_blueprint(cfg, ns(), config_path="d.toml")
        assert str(e.value).startswith(f"`datasets[0].subsets[0].{key}` in d.toml = {value}: {needle}")
        del cfg["datasets"][0]["subsets"][0][key]


def test_dataset_values_are_checked():
    cfg = {"general": {"resolution": 64}, "datasets": [{"network_multiplier": -0.5, "subsets": [{"image_dir": "/a"}]}]}
    assert generate_blueprint(cfg, ns())[0].network_multiplier == -0.5  # per-dataset LoRA strength (sd-scripts)
    cfg["datasets"][0]["network_multiplier"] = 0
    with pytest.raises(ConfigError, match=r"`datasets\[0\].network_multiplier` = 0: the LoRA would be off for this "
                                          "dataset's batches"):
        generate_blueprint(cfg, ns())
    cfg = {"general": {"resolution": 64}, "datasets": [{"validation_split": 1.5, "subsets": [{"image_dir": "/a"}]}]}
    with pytest.raises(ConfigError, match="validation_split` = 1.5: must be between 0 and 1"):
        generate_blueprint(cfg, ns())


def test_face_crop_aug_range_from_the_cli_is_two_numbers():
    (bp,) = generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]},
                               ns(resolution=64, face_crop_aug_range="2,4"))
    assert bp.subsets[0].face_crop_aug_range == (2.0, 4.0)
    with pytest.raises(ConfigError, match="--face_crop_aug_range: expected two numbers"):
        generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}, ns(resolution=64, face_crop_aug_range="x"))


def test_cli_network_multiplier_is_not_a_dataset_value():
    (bp,) = generate_blueprint({"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]},
                               ns(network_multiplier=0.5))  # the trainer applies it to the whole network
    assert bp.network_multiplier == 1.0


def test_messages_name_args_dataset_config_when_no_path_is_given():
    with pytest.raises(ConfigError, match=r"datasets\[0\] in my/ds.toml: resolution is required"):
        generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}, ns(dataset_config="my/ds.toml"))


def test_ignored_keys_are_accepted(caplog):
    cfg = {"general": {"resolution": 64, "cache_info": True, "validation_seed": 3},
           "datasets": [{"subsets": [{"image_dir": "/a", "custom_attributes": {"x": 1}}]}]}
    with caplog.at_level(logging.WARNING):
        (bp,) = generate_blueprint(cfg, ns())
    assert "custom_attributes are ignored" in caplog.text
    assert bp.subsets[0].cache_info


def test_bucket_limits_snap_to_the_step_as_sd_scripts(caplog):
    """min_bucket_reso is rounded down and max_bucket_reso up to a multiple of bucket_reso_steps (with a warning),
    so every bucket side is one; the snapped min may then fit a resolution the raw value did not (520 at 512)."""
    cfg = {"general": {"resolution": 512, "enable_bucket": True, "min_bucket_reso": 520, "max_bucket_reso": 1000},
           "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    with caplog.at_level(logging.WARNING):
        (bp,) = generate_blueprint(cfg, ns(), config_path="d.toml")
    assert (bp.min_bucket_reso, bp.max_bucket_reso) == (512, 1024)
    assert "`general.min_bucket_reso` in d.toml = 520 is not a multiple of bucket_reso_steps (64): using 512" in caplog.text
    from library.buckets import make_bucket_resolutions

    cfg["general"].update(min_bucket_reso=300)
    (bp,) = generate_blueprint(cfg, ns())
    assert bp.min_bucket_reso == 256
    sides = lambda resos: {s for wh in resos for s in wh}  # noqa: E731
    assert 300 in sides(make_bucket_resolutions((512, 512), 300, 1024, 64))  # what the raw value would give
    assert all(s % 64 == 0 for s in sides(make_bucket_resolutions((512, 512), bp.min_bucket_reso,
                                                                  bp.max_bucket_reso, 64)))


@pytest.mark.parametrize("general, needle", [
    ({"enable_bucket": True, "min_bucket_reso": 1024}, "min_bucket_reso"),
    ({"enable_bucket": True, "max_bucket_reso": 256}, "max_bucket_reso"),
    ({"caption_dropout_rate": 1.5}, "between 0 and 1"),
    ({"keep_tokens": -1}, "0 or more"),
    ({"resize_interpolation": "hq"}, "unknown interpolation"),
    ({"batch_size": 0}, "at least 1"),
])
def test_bad_values(general, needle):
    cfg = {"general": {"resolution": 512, **general}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    with pytest.raises(ConfigError, match=needle):
        generate_blueprint(cfg, ns())


def test_duplicate_subset_ignored_with_warning(caplog):
    cfg = {"general": {"resolution": 64}, "datasets": [
        {"subsets": [{"image_dir": "/a/x", "num_repeats": 2}, {"image_dir": "/a/./x", "num_repeats": 5},
                     {"image_dir": "/a/y"}]},
        {"subsets": [{"image_dir": "/a/x"}]}]}  # the same dir in another dataset is fine
    with caplog.at_level(logging.WARNING):
        d0, d1 = generate_blueprint(cfg, ns(), config_path="d.toml")
    assert [s.num_repeats for s in d0.subsets] == [2, 1] and len(d1.subsets) == 1
    assert "datasets[0].subsets[1]" in caplog.text and "duplicate" in caplog.text


def test_zero_repeats_subset_skipped(caplog):
    cfg = {"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "/a", "num_repeats": 0},
                                                                     {"image_dir": "/b"}]}]}
    with caplog.at_level(logging.WARNING):
        (bp,) = generate_blueprint(cfg, ns())
    assert [s.image_dir for s in bp.subsets] == ["/b"] and "num_repeats is 0" in caplog.text


def test_bucket_reso_steps_divisibility():
    cfg = {"general": {"resolution": 512, "enable_bucket": True, "bucket_reso_steps": 32},
           "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    bps = generate_blueprint(cfg, ns(), is_sdxl=True)  # 32 is fine for SDXL
    with pytest.raises(ConfigError) as e:
        check_bucket_reso_steps(bps, is_sdxl=False)
    assert "general.bucket_reso_steps" in str(e.value) and "multiple of 64" in str(e.value)
    with pytest.raises(ConfigError, match="--bucket_reso_steps = 48.*multiple of 32"):
        generate_blueprint({"datasets": [{"subsets": [{"image_dir": "/a"}]}]},
                           ns(resolution=512, enable_bucket=True, bucket_reso_steps=48), is_sdxl=True)


def test_prior_class_tokens_levels_and_requirements():
    cfg = {"general": {"resolution": 64, "prior_class_tokens": "dog"}, "datasets": [
        {"subsets": [{"image_dir": "/a", "class_tokens": "sks dog"},
                     {"image_dir": "/b", "class_tokens": "ohwx cat", "prior_class_tokens": "cat"}]},
        {"subsets": [{"metadata_file": "/m.json"}]}]}
    db, ft = generate_blueprint(cfg, ns())
    assert [s.prior_class_tokens for s in db.subsets] == ["dog", "cat"]
    assert ft.subsets[0].prior_class_tokens is None  # DreamBooth only: [general] does not reach FT datasets
    with pytest.raises(ConfigError, match="prior_class_tokens needs class_tokens"):
        generate_blueprint({"general": {"resolution": 64}, "datasets": [
            {"subsets": [{"image_dir": "/a", "prior_class_tokens": "dog"}]}]}, ns())


# -- CLI-only mode -----------------------------------------------------------------------------------------------------

def test_cli_only_mode_from_subfolders(tmp_path, caplog):
    for d in ("train/10_sks dog", "train/2_a_b", "train/misc", "reg/1_dog"):
        (tmp_path / d).mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        (bp,) = generate_blueprint(None, ns(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                                            resolution="512", train_batch_size=2, shuffle_caption=True))
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in bp.subsets] == \
        [(10, "sks dog", False), (2, "a_b", False), (1, "dog", True)]
    assert bp.batch_size == 2 and bp.resolution == (512, 512) and not bp.from_user_config
    assert all(s.shuffle_caption for s in bp.subsets)
    assert "misc" in caplog.text  # skipped with a warning


def test_cli_only_mode_errors(tmp_path):
    with pytest.raises(ConfigError, match="--dataset_config.*--train_data_dir"):
        generate_blueprint(None, ns(resolution=512))
    with pytest.raises(ConfigError, match="--train_data_dir .*folder not found"):
        generate_blueprint(None, ns(train_data_dir=str(tmp_path / "nope"), resolution=512))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="directly in it"):
        generate_blueprint(None, ns(train_data_dir=str(tmp_path / "flat"), resolution=512))
    (tmp_path / "t" / "3_x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--resolution 512"):
        generate_blueprint(None, ns(train_data_dir=str(tmp_path / "t")))


def test_config_warns_that_cli_folders_are_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        generate_blueprint({"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]},
                           ns(train_data_dir="/t", reg_data_dir="/r", in_json=None))
    assert "--train_data_dir is ignored" in caplog.text and "--reg_data_dir is ignored" in caplog.text


def test_generate_blueprint_accepts_a_path(tmp_path):
    p = write(tmp_path, EXAMPLE_1.format(d=tmp_path.as_posix()))
    assert len(generate_blueprint(str(p), ns())) == 2


def test_cli_only_fine_tuning_from_in_json():
    (bp,) = generate_blueprint(None, ns(in_json="meta.json", train_data_dir="/imgs", resolution="64"))
    assert not bp.is_dreambooth and bp.subsets[0].metadata_file == "meta.json"
    assert bp.subsets[0].image_dir == "/imgs"


# -- boundaries of the bucket and resolution checks (mutation-testing round 5) -----------------------------------------

def test_bucket_limits_at_the_resolution_itself_are_accepted():
    """The bucket checks are strict inequalities: SDXL's usual `resolution = 1024` with the default max_bucket_reso
    1024, and a 64-pixel run whose bucket_reso_steps, min and max all equal the resolution, are valid configs
    (sd-scripts trains them); an off-by-one refused every SDXL bucketed run."""
    cfg = {"general": {"resolution": 1024, "enable_bucket": True}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    (bp,) = generate_blueprint(cfg, ns(), config_path="d.toml")
    limits = (bp.resolution, bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps)
    assert limits == ((1024, 1024), 256, 1024, 64)
    cfg["general"] = {"resolution": 64, "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 64,
                      "bucket_reso_steps": 64}
    (bp,) = generate_blueprint(cfg, ns(), config_path="d.toml")
    assert (bp.resolution, bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps) == ((64, 64), 64, 64, 64)
    cfg["general"]["bucket_reso_steps"] = 128  # one step larger than the side: no bucket fits
    cfg["general"]["max_bucket_reso"] = 128
    with pytest.raises(ConfigError) as e:
        generate_blueprint(cfg, ns(), config_path="d.toml")
    assert str(e.value).startswith("datasets[0] in d.toml: bucket_reso_steps (128, `general.bucket_reso_steps` in "
                                   "d.toml) is larger than the resolution's smaller side (64)")


def test_min_bucket_reso_below_one_step_snaps_up_to_the_step():
    """min_bucket_reso = 30 with bucket_reso_steps 64 rounds down to 0 by the modulo alone; sd-scripts (and this
    code) keep it at one step, 64, since a 0-pixel bucket side cannot be trained."""
    cfg = {"general": {"resolution": 512, "enable_bucket": True, "min_bucket_reso": 30},
           "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    (bp,) = generate_blueprint(cfg, ns())
    assert bp.min_bucket_reso == 64  # max(64, 30 - 30 % 64) = max(64, 0)


def _config_error(tmp_path, general="", subset="") -> tuple:
    """(path, message) of the ConfigError for a one-subset config with these extra lines in [general] / the subset."""
    p = write(tmp_path, f'[general]\n{general}\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "/a"\n  {subset}\n')
    with pytest.raises(ConfigError) as e:
        load_dataset_config(p)
    return p, str(e.value)


def test_a_zero_resolution_is_a_type_error_naming_the_key(tmp_path):
    """`resolution = 0` (or a 0 side) is refused when the config is read, naming the key, instead of building a
    dataset of 0-pixel images that fails deep in the loader."""
    for value, shown in (("0", "0"), ("[512, 0]", "[512, 0]")):
        p, message = _config_error(tmp_path, general=f"resolution = {value}")
        assert message == (f"`general.resolution` in {p}: expected a positive integer or [width, height], e.g. "
                           f"512 or [768, 512], got {'an integer' if value == '0' else 'a list'} ({shown}).")


def test_cli_alpha_mask_reaches_every_subset_unless_a_subset_says_otherwise():
    """--alpha_mask is documented as `alpha_mask` for every subset (docs/dataset_config.md); a subset's own
    `alpha_mask = false` still wins (subset > CLI)."""
    cfg = {"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": "/a"},
                                                                     {"image_dir": "/b", "alpha_mask": False}]}]}
    (bp,) = generate_blueprint(cfg, ns(alpha_mask=True))
    assert [s.alpha_mask for s in bp.subsets] == [True, False]
    (bp,) = generate_blueprint(cfg, ns(alpha_mask=False))
    assert [s.alpha_mask for s in bp.subsets] == [False, False]


def test_bucket_reso_steps_is_only_checked_with_buckets():
    """Without enable_bucket every image is resized to the resolution itself, so bucket_reso_steps is unused: a GUI
    config's `bucket_reso_steps = 32` for an SD1.5 run without buckets must not stop the run."""
    cfg = {"general": {"resolution": 512, "bucket_reso_steps": 32}, "datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    (bp,) = generate_blueprint(cfg, ns(), is_sdxl=False)
    assert bp.bucket_reso_steps == 32 and not bp.enable_bucket


def test_dataset_level_beats_general_and_subset_beats_both(tmp_path):
    """The precedence subset > [[datasets]] > [general] (sd-scripts'): a dataset's own batch_size, resolution and
    shuffle_caption = false win over [general] for that dataset only, a second dataset silent on them gets
    [general]'s, and a subset's keep_tokens wins over both. An error names the level the value came from."""
    p = write(tmp_path, """\
        [general]
        resolution = 512
        batch_size = 2
        shuffle_caption = true
        keep_tokens = 1

        [[datasets]]
        resolution = [768, 512]
        batch_size = 4
        shuffle_caption = false
        keep_tokens = 2
          [[datasets.subsets]]
          image_dir = "/a"
          [[datasets.subsets]]
          image_dir = "/b"
          keep_tokens = 3

        [[datasets]]
          [[datasets.subsets]]
          image_dir = "/c"
        """)
    d0, d1 = generate_blueprint(str(p), ns(train_batch_size=8, resolution="1024", keep_tokens=7))
    assert (d0.batch_size, d0.resolution, d1.batch_size, d1.resolution) == (4, (768, 512), 2, (512, 512))
    assert [(s.shuffle_caption, s.keep_tokens) for s in d0.subsets + d1.subsets] == [(False, 2), (False, 3), (True, 1)]
    text = p.read_text().replace("batch_size = 4", "batch_size = 0")
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        generate_blueprint(str(p), ns())
    assert str(e.value) == f"`datasets[0].batch_size` in {p} = 0: must be at least 1."


def test_a_misspelt_image_dir_is_one_error_with_the_fix(tmp_path):
    """`imge_dir` is reported once, as the typo with its fix; the "image_dir is missing" that follows from it would
    only send the user looking for a key they think they wrote."""
    p = write(tmp_path, '[general]\nresolution = 512\n[[datasets]]\n  [[datasets.subsets]]\n  imge_dir = "/b"\n')
    with pytest.raises(ConfigError) as e:
        load_dataset_config(p)
    assert str(e.value) == (f"`datasets[0].subsets[0].imge_dir` in {p}: unknown key `imge_dir`. "
                            "Did you mean `image_dir`?")


def test_short_forms_of_keys_get_a_suggestion(tmp_path):
    """`repeats = 10` (the folder name's word) is what users write for num_repeats; it is far enough from the key
    (difflib similarity 2*7/18 = 0.78) that only the 0.6 cutoff finds it."""
    p, message = _config_error(tmp_path, "resolution = 512", subset="repeats = 10")
    assert message == f"`datasets[0].subsets[0].repeats` in {p}: unknown key `repeats`. Did you mean `num_repeats`?"


@pytest.mark.parametrize("line, shown", [("network_multiplier = nan", "nan"), ("caption_dropout_rate = inf", "inf"),
                                         ("token_warmup_step = -inf", "-inf")])
def test_non_finite_numbers_are_type_errors(tmp_path, line, shown):
    """TOML has nan and inf; a nan network_multiplier or dropout rate would turn every loss into NaN (a lost run),
    so a number key takes finite numbers only, and the error names the key."""
    p, message = _config_error(tmp_path, f"resolution = 512\n{line}")
    key = line.split(" ")[0]
    assert message == f"`general.{key}` in {p}: expected a number, e.g. 0.1, got a non-finite number ({shown})."


@pytest.mark.parametrize("level, typo, fix", [("subset", "resoltion", "resolution"),
                                             ("subset", "caption_ext", "caption_extension"),
                                             ("general", "image_dirs", "image_dir")])
def test_a_typo_is_matched_to_the_closest_key_of_any_level(tmp_path, level, typo, fix):
    """The suggestion was the first close key allowed at the typo's level: `resoltion` in a subset got "Did you mean
    `resize_interpolation`?", `caption_ext` got `caption_prefix`, `image_dirs` in [general] `max_image_pixels`. Now the
    closest key wins (one of this level on a tie); a key of another level is then reported where it belongs."""
    _, message = _config_error(tmp_path, **{level: f"{typo} = 1"})
    assert f"unknown key `{typo}`. Did you mean `{fix}`?" in message
