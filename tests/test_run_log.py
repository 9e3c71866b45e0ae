"""--console_log_level / --console_log_file / --log_tracker_config (library/run_log.py)."""
import logging
from argparse import Namespace

import pytest

import train_apt_lora
from library.run_log import tracker_init_kwargs
from library.train_util import TrainingSetupError
from tests.test_train_e2e import _dataset, _train


def test_log_file_is_appended_to_at_the_level_asked(tiny, images, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("my notes\n")
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "a", "--console_log_file", str(log)) == 0
    text = log.read_text()
    assert text.startswith("my notes\n") and " INFO networks.lora: LoRA network: " in text
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "b", "--console_log_file", str(log),
                  "--console_log_level", "warning") == 0
    assert log.read_text() == text  # nothing at WARNING or above in a clean run
    assert not [h for h in logging.getLogger().handlers  # removed after the run
                if getattr(h, "baseFilename", None) == str(log)]


def test_tracker_config_tables_reach_the_tracker(tiny, images, tmp_path):
    cfg = tmp_path / "trackers.toml"
    cfg.write_text('[tensorboard]\nfilename_suffix = ".apt"\n[wandb]\ntags = ["apt"]\n')
    assert tracker_init_kwargs(Namespace(log_tracker_config=str(cfg), wandb_run_name="r1")) == {
        "tensorboard": {"filename_suffix": ".apt"}, "wandb": {"tags": ["apt"], "name": "r1"}}
    cfg.write_text('[wandb]\nname = "from-file"\n')  # the file's name wins (sd-scripts: the file replaces it)
    assert tracker_init_kwargs(Namespace(log_tracker_config=str(cfg), wandb_run_name="r1")) == {
        "wandb": {"name": "from-file"}}
    cfg.write_text('[tensorboard]\nfilename_suffix = ".apt"\n')
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--logging_dir", str(tmp_path / "logs"),
                  "--log_tracker_config", str(cfg)) == 0
    (run,) = (tmp_path / "logs").glob("*/network_train")
    (events,) = run.glob("events.out.tfevents.*")  # the scalars' writer (the hparams below have their own)
    assert events.name.endswith(".apt")


def test_arguments_reach_the_tracker_with_log_config_only_and_without_paths(tmp_path):
    """The run's arguments go to the trackers (wandb uploads them) only with --log_config, and never a path or a
    secret: sd-scripts' rule. They were always sent, the model, data and output paths included."""
    from library import train_args
    from library.run_log import tracker_config

    argv = ["--pretrained_model_name_or_path", "/home/me/models/x.safetensors", "--output_dir", "/home/me/out",
            "--train_data_dir", "/home/me/photos", "--network_args", "conv_dim=4", "--learning_rate", "2e-4"]
    assert tracker_config(train_args.setup_parser().parse_args(argv)) is None
    config = tracker_config(train_args.setup_parser().parse_args(argv + ["--log_config"]))
    assert config["learning_rate"] == 2e-4 and config["network_args"] == "['conv_dim=4']"
    assert not any("/home/me" in str(v) for v in config.values()) and None not in config.values()


@pytest.mark.parametrize("text, message", [
    (None, "file not found"),
    ("[wandb\n", "not a valid TOML file"),
    ('entity = "me"\n', "'entity' must be a table of one tracker's settings"),
    (b'[wandb]\nentity = "caf\xe9"\n', r"is not UTF-8 text: .* at byte 21 \(0xe9\)"),  # a cp1252 save
])
def test_bad_tracker_config_is_named(tmp_path, text, message):
    path = tmp_path / "t.toml"
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TrainingSetupError, match=f"--log_tracker_config {path}:? {message}"):
        tracker_init_kwargs(Namespace(log_tracker_config=str(path)))


def test_a_tracker_config_saved_by_a_windows_editor_is_read(tmp_path):
    """Notepad's UTF-8 byte-order mark and PowerShell's UTF-16 made toml fail on the first character."""
    path = tmp_path / "t.toml"
    for data in ('\ufeff[wandb]\nentity = "me"\n'.encode("utf-8"), '[wandb]\nentity = "me"\n'.encode("utf-16")):
        path.write_bytes(data)
        assert tracker_init_kwargs(Namespace(log_tracker_config=str(path))) == {"wandb": {"entity": "me"}}


def test_only_the_first_process_writes_the_log_file(tmp_path, monkeypatch):
    """With several processes every rank ran the same setup and each appended its lines to the file."""
    from library.run_log import console_log

    log = tmp_path / "run.log"
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with console_log(Namespace(console_log_file=str(log), console_log_level=None)):
            logging.getLogger("apt_lora").info("rank %s here", rank)
    assert "rank 0 here" in log.read_text() and "rank 1" not in log.read_text()


def test_unwritable_log_file_is_an_error(tiny, images, tmp_path, capsys):
    bad = tmp_path / "no" / "such" / "dir" / "run.log"
    rc = train_apt_lora.main(["--pretrained_model_name_or_path", tiny["sd1"], "--dataset_config",
                              _dataset(tmp_path, images), "--output_dir", str(tmp_path / "o"), "--console_log_file",
                              str(bad)])
    assert rc == 2 and f"--console_log_file {bad}: cannot open it for writing" in capsys.readouterr().err


def test_no_path_flag_reaches_the_tracker_with_log_config(tmp_path):
    """--log_config sends the arguments to the trackers (wandb uploads them): every flag that holds a path of the
    user's machine (model, VAE, data, outputs, states, prompts, weights, logs) is left out, not only the few above;
    a dropped name sent e.g. the --network_weights or --resume path to wandb, and the DeepSpeed NVMe paths (flags
    accepted without effect) were sent."""
    from library import train_args
    from library.run_log import tracker_config

    paths = ["pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "output_dir", "logging_dir",
             "dataset_config", "sample_prompts", "network_weights", "resume", "in_json", "log_tracker_config",
             "console_log_file", "debug_dataset_dir", "tokenizer_path", "metadata_thumbnail"]
    argv = ["--log_config", "--learning_rate", "2e-4", "--base_weights", "/home/me/b1.safetensors",
            "--tokenizer_cache_dir", "/home/me/cache", "--offload_param_nvme_path", "/home/me/nvme",
            "--offload_optimizer_nvme_path", "/home/me/nvme2", "--huggingface_path_in_repo", "/home/me/repo"]
    for flag in paths:
        argv += [f"--{flag}", f"/home/me/{flag}"]
    args = train_args.setup_parser().parse_args(argv)
    assert all(getattr(args, flag) == f"/home/me/{flag}" for flag in paths)  # each one was given
    config = tracker_config(args)
    assert config["learning_rate"] == 2e-4
    assert [k for k, v in config.items() if "/home/me" in str(v)] == []
