"""sd-scripts command lines and config files carried over: flags not implemented fail with what to do, flags with
nothing to do are accepted and reported, and the dataset flags sd-scripts has on its command line reach the dataset."""
import datetime
import logging
from pathlib import Path

import pytest

import train_apt_lora
from library import config_file as cf
from library.args_check import verify_args
from library.config_util import SUBSET_DEFAULTS, generate_blueprint
from library.sd_scripts_flags import NO_EFFECT, NOT_IMPLEMENTED, no_effect_notes
from library.train_args import markdown_reference, setup_parser
from library.train_util import TrainingSetupError, accelerator_handlers


@pytest.mark.parametrize("argv", [["--train_inpainting"], ["--cpu_offload_checkpointing"], ["--full_fp16"],
                                  ["--huggingface_repo_id", "me/lora"], ["--deepspeed"],
                                  ["--dataset_class", "mine.data.Dataset"], ["--conditioning_data_dir", "masks"]])
def test_a_flag_not_implemented_is_an_error_saying_what_to_do(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cf.parse_args_with_config(setup_parser(), ["--output_dir", "out", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    flag = argv[0].lstrip("-")
    what, todo = NOT_IMPLEMENTED[flag].split("; ", 1)
    assert f"argument {argv[0]}: is an sd-scripts flag that APT-LoRA does not implement ({what}): {todo}" in err


def test_a_flag_not_implemented_in_a_config_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[training_arguments]\nmax_train_steps = 10\n[saving_arguments]\ncpu_offload_checkpointing = true\n', encoding="utf-8")
    with pytest.raises(TrainingSetupError) as e:
        cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)])
    assert str(path) in str(e.value) and "cpu_offload_checkpointing" in str(e.value)
    assert ("does not implement (checkpointed activations kept on the CPU): use --gradient_checkpointing"
            in str(e.value))


def test_flags_left_off_are_accepted_as_gui_config_files_write_them(tmp_path, capsys):
    """kohya_ss-style config files list every key, most at their default: those ask for nothing and pass."""
    path = tmp_path / "gui.toml"
    path.write_text('masked_loss = false\nscale_weight_norms = 0\nhuggingface_repo_id = ""\nfp8_base = false\n'
                    'base_weights = []\nlowram = false\nmax_train_steps = 5\n', encoding="utf-8")
    args = cf.parse_args_with_config(setup_parser(), ["--config_file", str(path), "--dataset_class",
                                                      "", "--huggingface_token", ""])
    assert args.max_train_steps == 5 and no_effect_notes(args) == [] and not args.scale_weight_norms
    with pytest.raises(SystemExit):
        cf.parse_args_with_config(setup_parser(), ["--config_file", str(path), "--dataset_class", "my.Data"])
    assert "argument --dataset_class: is an sd-scripts flag" in capsys.readouterr().err
    path.write_text('dataset_class = "my.Data"\n', encoding="utf-8")
    with pytest.raises(TrainingSetupError, match="dataset_class is an sd-scripts flag"):
        cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)])


@pytest.mark.parametrize("value", ["false", "False", "0", "0.0", "none", ""])
def test_a_flag_not_implemented_set_off_on_the_command_line_is_accepted(value):
    """Scripts and GUIs that write every flag pass `--full_fp16 false`, `--deepspeed 0`, `--huggingface_repo_id ""`:
    the value turns the feature off, so the run goes on (each of these stopped it with an error)."""
    args = cf.parse_args_with_config(setup_parser(), ["--output_dir", "out", "--full_fp16", value, "--deepspeed",
                                                      value, "--huggingface_repo_id", value])
    assert not hasattr(args, "full_fp16") and not hasattr(args, "deepspeed") and args.output_dir == "out"


def test_an_empty_list_for_a_flag_not_implemented_in_a_config_file_asks_for_nothing(tmp_path):
    """A GUI config lists every key, the list-valued ones as `[]`: an empty list turns the feature off and passes;
    a non-empty one is the error."""
    path = tmp_path / "gui.toml"
    path.write_text('conditioning_data_dir = []\nhuggingface_repo_id = []\nmax_train_steps = 5\n', encoding="utf-8")
    assert cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)]).max_train_steps == 5
    path.write_text('conditioning_data_dir = ["masks"]\n', encoding="utf-8")
    with pytest.raises(TrainingSetupError, match="conditioning_data_dir is an sd-scripts flag"):
        cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)])


def test_flags_without_effect_are_accepted_and_reported(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('highvram = true\ntokenizer_cache_dir = "/cache"\n', encoding="utf-8")
    args = cf.parse_args_with_config(setup_parser(), ["--config_file", str(path), "--lowram", "--mem_eff_attn"])
    notes = no_effect_notes(args)
    assert [n.split(" ")[0] for n in notes] == ["--lowram", "--highvram", "--mem_eff_attn", "--tokenizer_cache_dir"]
    assert notes[0] == f"--lowram has no effect here: {NO_EFFECT['lowram'][1]}"
    assert no_effect_notes(setup_parser().parse_args([])) == []  # not given: nothing said


def test_flags_without_effect_in_a_config_file_take_any_value(tmp_path):
    """A flag without effect is accepted whatever a config file gives it (it changes nothing, so its value is not
    checked): a hand-written `mem_eff_attn = "true"` or `zero_stage = 2.0` must not stop a run over a no-op, and the
    note still names it."""
    path = tmp_path / "run.toml"
    path.write_text('mem_eff_attn = "true"\nzero_stage = 2.0\nmax_train_steps = 5\n', encoding="utf-8")
    args = cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)])
    assert args.max_train_steps == 5 and (args.mem_eff_attn, args.zero_stage) == ("true", 2.0)
    assert [n.split(" ")[0] for n in no_effect_notes(args)] == ["--mem_eff_attn", "--zero_stage"]


def test_deepspeed_companion_flags_are_accepted_as_sd_scripts_configs_carry_them(tmp_path):
    """sd-scripts' add_deepspeed_arguments registers these beside --deepspeed; a config with them set (and
    --deepspeed off) trains, saying they do nothing."""
    path = tmp_path / "run.toml"
    path.write_text('deepspeed = false\nzero_stage = 2\noffload_optimizer_device = "cpu"\nzero3_init_flag = true\n',
                    encoding="utf-8")
    args = cf.parse_args_with_config(setup_parser(), [
        "--config_file", str(path), "--offload_param_device", "nvme", "--offload_param_nvme_path", "/nvme",
        "--offload_optimizer_nvme_path", "/nvme", "--zero3_save_16bit_model", "--fp16_master_weights_and_gradients"])
    said = {n.split(" ")[0] for n in no_effect_notes(args)}
    assert said == {f"--{f}" for f in ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                                       "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                                       "zero3_save_16bit_model", "fp16_master_weights_and_gradients")}


def test_the_trainer_logs_the_flags_without_effect(tmp_path, caplog):
    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                      "--train_data_dir", str(tmp_path), "--lowram", "--ddp_static_graph"])
    with caplog.at_level(logging.INFO):
        verify_args(args)
    assert "--lowram has no effect here" in caplog.text and "--ddp_static_graph has no effect here" in caplog.text


def test_empty_strings_of_a_gui_config_file_are_unset(tmp_path):
    """kohya_ss writes unset keys as "": face_crop_aug_range = "" was "expected two numbers, got a list ([])",
    in_json = "" a fine-tuning dataset with an empty metadata file name."""
    (tmp_path / "img" / "2_sks dog").mkdir(parents=True)
    cfg = tmp_path / "gui.toml"
    cfg.write_text(f'[dataset_arguments]\nresolution = "64"\nface_crop_aug_range = ""\nin_json = ""\nreg_data_dir = ""\n'
                   f'train_data_dir = "{(tmp_path / "img").as_posix()}"\n')
    args = cf.parse_args_with_config(setup_parser(), ["--config_file", str(cfg)])
    (bp,) = generate_blueprint(None, args)
    assert bp.is_dreambooth and [s.face_crop_aug_range for s in bp.subsets] == [None]
    assert [s.image_dir for s in bp.subsets] == [str(tmp_path / "img" / "2_sks dog")]


def test_a_missing_optimizer_package_is_found_before_the_model_loads(tmp_path):
    """verify_args (the first thing a run does) imports the optimizer's package: a missing one was found after the
    model, the network and the latent cache were loaded."""
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir", str(tmp_path)]
    with pytest.raises(TrainingSetupError, match="--optimizer_type no_such_pkg.Opt needs the module no_such_pkg"):
        verify_args(setup_parser().parse_args(base + ["--optimizer_type", "no_such_pkg.Opt"]))
    with pytest.raises(TrainingSetupError, match="--optimizer_args: the value of 'betas=x' is not a Python literal"):
        verify_args(setup_parser().parse_args(base + ["--optimizer_args", "betas=x"]))


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_save_model_as_a_pickle_is_refused_with_the_reason(tmp_path, kind):
    """sd-scripts writes LoRAs as ckpt/pt on request; here argparse printed its whole usage and 'invalid choice'."""
    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                      "--train_data_dir", str(tmp_path), "--save_model_as", kind])
    with pytest.raises(TrainingSetupError, match=f"--save_model_as {kind}: LoRA files are written as .safetensors "
                                                 "only .*leave the flag out"):
        verify_args(args)
    verify_args(setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir",
                                           str(tmp_path / "o"), "--train_data_dir", str(tmp_path),
                                           "--save_model_as", "safetensors"]))


def test_the_reference_lists_the_flags_not_implemented():
    text = markdown_reference()
    assert "## sd-scripts flags not implemented" in text and "| `--full_fp16` |" in text
    assert "SUPPRESS" not in text
    assert "| `--lowram` (flag) |" in text  # the accepted ones are in their own group


def test_ddp_timeout_reaches_accelerate_and_is_checked(tmp_path):
    (handler,) = accelerator_handlers(setup_parser().parse_args(["--ddp_timeout", "90"]))
    assert handler.timeout == datetime.timedelta(minutes=90)
    assert accelerator_handlers(setup_parser().parse_args([])) == []
    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                      "--train_data_dir", str(tmp_path), "--ddp_timeout", "0"])
    with pytest.raises(TrainingSetupError, match="--ddp_timeout is in minutes and must be at least 1, got 0"):
        verify_args(args)


def test_range_checks_hold_at_their_edges(tmp_path):
    """The edges of the ranges: --seed 2**32 (numpy's and the dataloader workers' seeds stop at 2**32 - 1) and
    --max_validation_steps 0 (no held-out batch: a validation loss of 0.0 logged at every validation) and
    --full_bf16 with fp16 are refused before the model loads, and so is --save_last_n_steps_state without the
    step saves it would keep the last of (it kept nothing without a word); the last valid values pass."""
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir", str(tmp_path)]
    verify_args(setup_parser().parse_args(base + ["--seed", str(2**32 - 1), "--max_validation_steps", "1"]))
    with pytest.raises(TrainingSetupError, match=r"--seed must be between 0 and 2\*\*32 - 1, got 4294967296"):
        verify_args(setup_parser().parse_args(base + ["--seed", str(2**32)]))
    with pytest.raises(TrainingSetupError, match="--max_validation_steps must be at least 1, got 0"):
        verify_args(setup_parser().parse_args(base + ["--max_validation_steps", "0"]))
    # bf16 weights under fp16 autocast: sd-scripts asserts the same
    with pytest.raises(TrainingSetupError, match="--full_bf16 keeps the LoRA in bf16 and needs --mixed_precision bf16; "
                                                 "it is 'fp16'"):
        verify_args(setup_parser().parse_args(base + ["--full_bf16", "--mixed_precision", "fp16"]))
    with pytest.raises(TrainingSetupError, match="--save_last_n_steps_state keeps the last of the saves that "
                                                 "--save_every_n_steps makes: add --save_every_n_steps"):
        verify_args(setup_parser().parse_args(base + ["--save_state", "--save_last_n_steps_state", "2"]))


def test_sd_scripts_caption_flags_reach_the_subsets(tmp_path):
    (tmp_path / "train" / "5_sks dog").mkdir(parents=True)
    base = ["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"]
    ((plain,),) = [bp.subsets for bp in generate_blueprint(None, setup_parser().parse_args(base))]
    for key in ("caption_separator", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                "caption_prefix", "caption_suffix", "resize_interpolation", "token_warmup_step", "token_warmup_min"):
        assert getattr(plain, key) == SUBSET_DEFAULTS[key], key  # flags left out: the TOML defaults
    args = setup_parser().parse_args(base + [
        "--caption_separator", ";", "--keep_tokens_separator", "|||", "--secondary_separator", ";;;",
        "--enable_wildcard", "--caption_prefix", "photo, ", "--caption_suffix", ", 4k", "--resize_interpolation",
        "bicubic", "--token_warmup_step", "0.5", "--token_warmup_min", "3"])
    ((sub,),) = [bp.subsets for bp in generate_blueprint(None, args)]
    assert (sub.caption_separator, sub.keep_tokens_separator, sub.secondary_separator, sub.enable_wildcard,
            sub.caption_prefix, sub.caption_suffix, sub.resize_interpolation, sub.token_warmup_step,
            sub.token_warmup_min) == (";", "|||", ";;;", True, "photo, ", ", 4k", "bicubic", 0.5, 3)
    # a dataset TOML's subsets without the keys take the flags as defaults; the TOML's own values win
    cfg = {"general": {"resolution": 64}, "datasets": [{"subsets": [
        {"image_dir": str(tmp_path / "train" / "5_sks dog")},
        {"image_dir": str(tmp_path / "train"), "token_warmup_step": 10}]}]}
    ((a, b),) = [bp.subsets for bp in generate_blueprint(cfg, args)]
    assert (a.token_warmup_step, a.token_warmup_min, b.token_warmup_step, b.token_warmup_min) == (0.5, 3, 10, 3)


def test_text_encoder_disk_cache_means_the_memory_cache(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir",
            str(tmp_path), "--cache_text_encoder_outputs_to_disk"]
    args = setup_parser().parse_args(base + ["--network_train_unet_only"])
    verify_args(args)
    assert args.cache_text_encoder_outputs
    with pytest.raises(TrainingSetupError, match="--cache_text_encoder_outputs_to_disk needs --network_train_unet_only"):
        verify_args(setup_parser().parse_args(base))


def test_latent_disk_cache_and_logging_dir_imply_their_flags(tmp_path):
    """As sd-scripts: --cache_latents_to_disk alone caches the latents (the trainer reads --cache_latents: without
    it nothing was cached, in memory or on disk, and every step ran the VAE) and --logging_dir alone logs to
    TensorBoard (without it no log was written there); without --output_name the LoRA is last.safetensors, the
    name scripts and GUIs built for sd-scripts look for."""
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir", str(tmp_path)]
    args = setup_parser().parse_args(base + ["--cache_latents_to_disk", "--logging_dir", str(tmp_path / "logs")])
    assert not args.cache_latents and args.log_with is None
    verify_args(args)
    assert args.cache_latents and args.cache_latents_to_disk and args.log_with == "tensorboard"
    args = setup_parser().parse_args(base)
    verify_args(args)
    assert args.log_with is None and not args.cache_latents  # neither flag: neither implied
    assert args.output_name == "last"  # sd-scripts' file name without --output_name: last.safetensors


def test_wandb_logging_without_the_package_says_how(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for choice in ("wandb", "all"):
        args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                          "--train_data_dir", str(tmp_path), "--log_with", choice,
                                          "--wandb_run_name", "run1"])
        with pytest.raises(TrainingSetupError, match=f"--log_with {choice} needs the wandb package: pip install wandb"):
            verify_args(args)


def test_old_spellings_and_text_encoder_lr_lists(tmp_path):
    base = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--train_data_dir",
            str(tmp_path)]
    args = setup_parser().parse_args(base + ["--caption_extention", ".txt", "--text_encoder_lr", "1e-5"])
    verify_args(args)
    assert args.caption_extension == ".txt" and args.text_encoder_lr == 1e-5  # one value: every text encoder
    args = setup_parser().parse_args(base + ["--text_encoder_lr", "1e-5", "2e-5"])
    verify_args(args)
    assert args.text_encoder_lr == [1e-5, 2e-5]  # SDXL: TE1, TE2 (networks/lora.py makes a group each)
    path = tmp_path / "run.toml"
    path.write_text("text_encoder_lr = 3e-6\nlr_scheduler_args = ['step_rules=\"1:2,0.1\"']\n", encoding="utf-8")
    args = cf.parse_args_with_config(setup_parser(), ["--config_file", str(path)] + base)
    verify_args(args)
    assert args.text_encoder_lr == 3e-6 and args.lr_scheduler_args == ['step_rules="1:2,0.1"']


def test_modelspec_metadata_flags_reach_the_file(tiny_world, tmp_path, capsys):
    from safetensors import safe_open

    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG")
    base = ["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config", tiny_world.dataset,
            "--output_name", "lora", "--max_train_steps", "1"]
    assert train_apt_lora.main(base + ["--output_dir", str(tmp_path / "o"), "--metadata_trigger_phrase", "sks dog",
                                       "--metadata_usage_hint", "weight 0.8", "--metadata_thumbnail",
                                       str(thumb)]) == 0
    with safe_open(str(tmp_path / "o" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks dog" and meta["modelspec.usage_hint"] == "weight 0.8"
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
    rc = train_apt_lora.main(base + ["--output_dir", str(tmp_path / "bad"), "--metadata_thumbnail", "nope.png"])
    assert rc == 2 and "--metadata_thumbnail nope.png: no such image file" in capsys.readouterr().err


def test_save_n_epoch_ratio_spreads_the_saves(tiny_world, tmp_path):
    # 3 images, batch 1: 3 steps an epoch, 12 steps = 4 epochs; ratio 2 -> a LoRA every 2 epochs (epoch 4 is the end)
    assert train_apt_lora.main(["--pretrained_model_name_or_path", tiny_world.model("sd1"), "--dataset_config",
                                tiny_world.dataset, "--output_dir", str(tmp_path), "--output_name", "lora",
                                "--max_train_steps", "12", "--save_n_epoch_ratio", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["lora-000002.safetensors", "lora.safetensors"]


def _listed(name: str) -> list[str]:
    path = Path(__file__).parent / "data" / name
    return [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")]


def test_every_sd_scripts_lora_flag_is_handled():
    """Each flag of sd-scripts' train_network.py / sdxl_train_network.py parsers is implemented, accepted without
    effect or refused with advice: none fails as argparse's bare "unrecognized arguments"."""
    flags = _listed("sd_scripts_flags.txt")
    ours = {o[2:] for a in setup_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert len(flags) == 198 and [f for f in flags if f not in ours] == []


def test_every_sd_scripts_dataset_key_is_known():
    from library.config_util import ALL_KEYS

    keys = _listed("sd_scripts_dataset_keys.txt")
    assert len(keys) == 39 and [k for k in keys if k not in ALL_KEYS] == []


@pytest.mark.parametrize("module, says", [
    ("lycoris.kohya", "not LyCORIS (LoCon, LoHa, LoKr, ...): the nearest to its LoCon is this LoRA with 3x3 convs: "
                      "--network_module networks.lora --network_args conv_dim=N conv_alpha=A"),
    ("networks.dylora", "not DyLoRA (every rank up to --network_dim in one file): train the one rank you want"),
    ("my.network", "only (SD1.x, SD2.x, SDXL): leave --network_module out, or set it to networks.lora"),
])
def test_another_network_module_is_an_error_saying_what_to_use(tmp_path, module, says):
    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                      "--train_data_dir", str(tmp_path), "--network_module", module])
    with pytest.raises(TrainingSetupError) as e:
        verify_args(args)
    assert str(e.value).startswith(f"--network_module {module}: APT-LoRA trains kohya's networks.lora ")
    assert says in str(e.value)
