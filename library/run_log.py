"""The run's log and tracker settings from sd-scripts' flags: `--console_log_level`, `--console_log_file` (the log
also appended to a file: a file someone made is never replaced, unlike sd-scripts' mode "w") and
`--log_tracker_config` (a TOML of per-tracker init settings, as sd-scripts passes it to accelerate)."""
from __future__ import annotations

import contextlib
import logging
import os

from library.text_io import read_text
from library.train_util import TrainingSetupError


@contextlib.contextmanager
def console_log(args):
    """Set the root log level (default INFO) and add the log file for the duration of the run; both undone on
    exit. With several processes only the first writes the file (the launcher's RANK, known before accelerate
    starts), so each line is there once."""
    root = logging.getLogger()
    level, handler = root.level, None
    root.setLevel(getattr(logging, getattr(args, "console_log_level", None) or "INFO"))
    if getattr(args, "console_log_file", None) and os.environ.get("RANK", "0") in ("", "0"):
        try:
            handler = logging.FileHandler(args.console_log_file, mode="a", encoding="utf-8")
        except OSError as e:
            raise TrainingSetupError(f"--console_log_file {args.console_log_file}: cannot open it for writing "
                                     f"({e.strerror}); give a writable path") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    try:
        yield
    finally:
        root.setLevel(level)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()


def tracker_init_kwargs(args) -> dict:
    """accelerate's `init_trackers(init_kwargs=...)`: the --log_tracker_config tables, and --wandb_run_name as
    wandb's run name where the [wandb] table names none (sd-scripts: the file replaces it)."""
    kwargs: dict = {}
    path = getattr(args, "log_tracker_config", None)
    if path:
        import toml

        if not os.path.isfile(path):
            raise TrainingSetupError(f"--log_tracker_config {path}: file not found")
        try:
            kwargs = toml.loads(read_text(path, "--log_tracker_config", TrainingSetupError))
        except toml.TomlDecodeError as e:
            raise TrainingSetupError(f"--log_tracker_config {path}: not a valid TOML file ({e})") from None
        bad = [k for k, v in kwargs.items() if not isinstance(v, dict)]
        if bad:
            raise TrainingSetupError(f"--log_tracker_config {path}: {bad[0]!r} must be a table of one tracker's "
                                     "settings, e.g. [wandb] with entity = \"me\"")
    if getattr(args, "wandb_run_name", None):  # a name in the file's [wandb] table wins, as in sd-scripts
        kwargs.setdefault("wandb", {}).setdefault("name", args.wandb_run_name)
    return kwargs


# sd-scripts' get_sanitized_config_or_none leaves these out, and the paths this trainer adds
_NOT_LOGGED = {"wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
               "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir", "config_file",
               "dataset_config", "sample_prompts", "network_weights", "base_weights", "resume", "in_json",
               "log_tracker_config", "console_log_file", "debug_dataset_dir", "tokenizer_path", "metadata_thumbnail",
               # sd-scripts flags accepted without effect that hold paths (its own list misses them)
               "offload_optimizer_nvme_path", "offload_param_nvme_path", "huggingface_path_in_repo"}


def tracker_config(args) -> dict | None:
    """The arguments logged to the trackers: with --log_config only, and never a path or a secret (sd-scripts'
    rule; wandb uploads them). Lists become strings and unset ones are left out (TensorBoard's hparams take
    scalars only)."""
    if not getattr(args, "log_config", False):
        return None
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in vars(args).items() if k not in _NOT_LOGGED and v is not None}
