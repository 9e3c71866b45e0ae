"""`--config_file`: training arguments from a TOML file, and `--output_config` writing them back (sd-scripts'
`read_config_from_file`, KOHYA_COMPAT.md section 6).

Command line > file > defaults. Keys are flag names; nested tables are flattened; values are converted and checked
with each flag's own argparse action, so a wrong type or an unknown key is an error naming the file, the key and
what to do (`TrainingSetupError`).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
from typing import Optional, Sequence

from library.sd_scripts_flags import NO_EFFECT, NotImplementedFlag, asks_for_nothing
from library.train_util import TrainingSetupError

logger = logging.getLogger(__name__)


_CONFIG_NEVER_WRITTEN = ("config_file", "output_config", "wandb_api_key", "huggingface_token",
                         "overwrite")  # a file that replaces outputs on every later run: a command-line decision

# Keys the kohya_ss GUI writes into every LoRA config file that are no sd-scripts arguments (sd-scripts keeps unknown
# keys silently): accepted here with a note, where any other unknown key is an error naming the closest argument.
GUI_KEYS = {
    "epoch": "the GUI's epoch count (its --max_train_epochs sets the run's length)",
    "noise_offset_type": "the GUI's choice of noise offset or multires noise (the keys it writes with it apply)",
    "stop_text_encoder_training": "a DreamBooth (train_db.py) option; a LoRA's text encoder trains the whole run "
                                  "(--network_train_unet_only freezes it)",
    "lowvram": "nothing is moved off the device to save memory here",
}


def config_file_path(name: str) -> str:
    """`--config_file x` means `x.toml` (sd-scripts appends the extension when it is missing)."""
    return name if name.endswith(".toml") else name + ".toml"


def _load_toml(path: str) -> dict:
    """The training config, read by the one TOML reader (config_util.load_toml: file:line:col and the line shown)."""
    from library.config_util import ConfigError, load_toml

    if not os.path.isfile(path):
        raise TrainingSetupError(f"--config_file {path}: file not found; check the path (.toml is added when missing)")
    try:
        return load_toml(path, "training config (--config_file)")
    except ConfigError as e:
        raise TrainingSetupError(f"--config_file: {e}") from None


def _flatten_tables(data: dict, path: str, out: dict, where: dict, dup: list) -> None:
    """All tables (at any depth) are merged into one flat mapping: section names carry no meaning."""
    for key, value in data.items():
        here = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            _flatten_tables(value, here, out, where, dup)
            continue
        if key in out:
            dup.append((key, where[key], here))
        out[key] = value
        where[key] = here


def _toml_type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _convert_scalar(action: argparse.Action, value, where: str, path: str):
    """Check a TOML scalar against the argument's type; sd-scripts keeps TOML values as they are, which lets a
    quoted number slip through and fail much later, so mistakes are reported here by key instead."""
    t = action.type
    key = where.split(".")[-1]

    def bad(expected: str):
        example = {"an integer": "100", "a number": "0.0001", "a string": '"text"'}[expected]
        if isinstance(value, str) and expected != "a string":
            try:
                (int if expected == "an integer" else float)(value)
                example = value.strip()  # the quoted number itself, without the quotes
            except ValueError:
                pass
        raise TrainingSetupError(
            f"--config_file {path}: {where} must be {expected}, got {_toml_type_name(value)} {value!r}; "
            f"write it as {key} = {example}"
        )
    if t is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            bad("an integer")
        return int(value)
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
        return float(value)
    if t is None or t is str:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            bad("a string")
        return value if isinstance(value, str) else str(value)
    if callable(t) and isinstance(value, str):
        try:
            return t(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise TrainingSetupError(f"--config_file {path}: {where} = {value!r} is not valid: {e}") from None
    return value


_KEY_VALUE_LISTS = ("network_args", "optimizer_args", "lr_scheduler_args")  # lists of key=value words


def _convert_toml_value(action: argparse.Action, value, where: str, path: str):
    if action.nargs == 0:  # store_true / store_false / store_const
        if isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction):
            if type(value) is int and value in (0, 1):  # the kohya_ss GUI writes some switches as int(...)
                value = bool(value)
            if not isinstance(value, bool):
                raise TrainingSetupError(
                    f"--config_file {path}: {where} is a switch and must be true or false, got {value!r}"
                )
        return value
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise TrainingSetupError(f"--config_file {path}: {where} must be true or false, got {value!r}")
        return value
    is_list = action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    if is_list:
        if isinstance(value, str) and action.dest in _KEY_VALUE_LISTS:
            parts = value.split()  # "conv_dim=4 conv_alpha=1": the words the command line would give
            value = parts if len(parts) > 1 and all("=" in p for p in parts) else value
        items = value if isinstance(value, list) else [value]
        converted = [_convert_scalar(action, v, where, path) for v in items]
        values = converted
    else:
        if isinstance(value, list):
            raise TrainingSetupError(f"--config_file {path}: {where} takes a single value, got an array {value!r}")
        converted = _convert_scalar(action, value, where, path)
        values = [converted]
    if action.choices is not None:
        for v in values:
            if v not in action.choices:
                raise TrainingSetupError(
                    f"--config_file {path}: {where} = {v!r} is not one of {', '.join(map(str, action.choices))}"
                )
    return converted


def _dest_actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help") and a.option_strings}


def read_config_file(args, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """`--config_file x[.toml]`: sd-scripts semantics with checked keys. Returns the new args namespace.

    All tables are flattened (section names are irrelevant); each key is an argument name without `--`.
    Precedence: command line > TOML > defaults (the command line `argv`, default `sys.argv[1:]`, is parsed again
    on top of the TOML values, as sd-scripts does). Unlike sd-scripts, unknown keys are an error naming the
    closest argument, and values are checked against the argument's type (a quoted number for an int argument is
    an error; string values of custom-typed arguments such as `lr_warmup_steps = "10%"` go through the type).
    """
    name = getattr(args, "config_file", None)
    if not name:
        return args
    path = config_file_path(name)
    data = _load_toml(path)

    flat: dict = {}
    where: dict = {}
    dup: list = []
    _flatten_tables(data, "", flat, where, dup)
    if dup:
        key, first, second = dup[0]
        raise TrainingSetupError(f"--config_file {path}: {key} is set twice ({first} and {second}); keep one")

    actions = _dest_actions(parser)
    for key in [k for k in flat if k in GUI_KEYS and k not in actions]:
        logger.info(f"--config_file {path}: {key} has no effect here: {GUI_KEYS[key]}")
        del flat[key]
    unknown = [k for k in flat if k not in actions]
    if unknown:
        lines = []
        for k in unknown:
            close = difflib.get_close_matches(k.replace("-", "_").lstrip("_"), list(actions), n=1, cutoff=0.6)
            lines.append(f"{where[k]}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise TrainingSetupError(
            f"--config_file {path}: unknown key{'s' if len(unknown) > 1 else ''} {'; '.join(lines)}. "
            "Keys are argument names without '--' (see --help)"
        )

    values = {}
    for key, value in flat.items():
        if key in ("config_file", "output_config"):
            continue  # meaningless inside the file itself
        if isinstance(actions[key], NotImplementedFlag):
            if asks_for_nothing(value):
                continue  # e.g. masked_loss = false, as GUIs write it
            raise TrainingSetupError(f"--config_file {path}: {where[key]} {actions[key].message()}")
        if key in NO_EFFECT:  # accepted whatever its value; the trainer says it changes nothing
            values[key] = value
            continue
        values[key] = _convert_toml_value(actions[key], value, where[key], path)

    # arguments the file provides are no longer required on the command line
    relaxed = [a for a in actions.values() if a.required and a.dest in values]
    for a in relaxed:
        a.required = False
    try:
        new_args = parser.parse_args(argv, namespace=argparse.Namespace(**values))
    finally:
        for a in relaxed:
            a.required = True
    logger.info(f"loaded {len(values)} settings from {path}")
    return new_args


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """Parse the command line with `--config_file` support; the entry point for `train_apt_lora.py`.

    `--config_file` is looked up first, so that arguments the parser marks required may come from the file.
    With `--output_config` the file is not read (the caller writes it with `write_config_file` and exits).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", type=str, default=None)
    pre.add_argument("--output_config", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config_file and not known.output_config:
        return read_config_file(known, parser, argv)
    return parser.parse_args(argv)


def given_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> set:
    """The arguments the user set: on the command line or in `--config_file`, whatever the value (a GUI's config
    writes `learning_rate = 0.0001`, the default, on purpose). Parsed again against a marker namespace, so it
    needs `argv` to have parsed already (`parse_args_with_config`)."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    required = [a for a in parser._actions if a.required]
    for a in required:  # may come from the file
        a.required = False
    try:
        parser.parse_known_args(argv, namespace=namespace)
    finally:
        for a in required:
            a.required = True
    given = {k for k, v in vars(namespace).items() if v is not marker}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", type=str, default=None)
    pre.add_argument("--output_config", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config_file and not known.output_config:
        flat: dict = {}
        _flatten_tables(_load_toml(config_file_path(known.config_file)), "", flat, {}, [])
        given |= set(flat)
    return given


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _parser_defaults(parser: argparse.ArgumentParser) -> dict:
    defaults = {}
    for dest, action in _dest_actions(parser).items():
        default = action.default
        if isinstance(default, str) and callable(action.type) and action.type is not str:
            try:
                default = action.type(default)
            except Exception:
                pass
        defaults[dest] = default
    return defaults


def write_config_file(args, parser: argparse.ArgumentParser, path: str, overwrite: bool = False,
                      given: set = frozenset()) -> str:
    """`--output_config`: write the arguments that differ from their defaults, and those in `given` (the user set
    them: `given_dests`) at any value, as a flat TOML file: so `--apt_preset` leaves them alone when it is loaded.

    Secrets and the config flags themselves are never written. None values are left out (TOML has no null).
    Refuses to replace an existing file unless `overwrite`. Returns the path written.
    """
    path = config_file_path(path)
    if os.path.exists(path) and not overwrite:
        raise TrainingSetupError(f"--output_config: {path} already exists; remove it or choose another --config_file name")
    defaults = _parser_defaults(parser)
    lines = []
    for dest in defaults:
        if dest in _CONFIG_NEVER_WRITTEN or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or (value == defaults[dest] and dest not in given):
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        action = _dest_actions(parser)[dest]
        takes_list = action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
        if isinstance(value, (list, tuple)) and not takes_list:  # one value parsed from "A,B" (--apt_aug_scale 1,3)
            value = ",".join(map(str, value))
        lines.append(f"{dest} = {_toml_value(value)}")
    text = "# written by --output_config; load with --config_file\n" + "\n".join(lines) + "\n"
    from library.safe_io import atomic_write_bytes

    try:  # a temp file of its own (a fixed "<path>.tmp" followed a symlink there, or replaced a user's file)
        atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
    except (FileExistsError, IsADirectoryError, PermissionError) as e:
        raise TrainingSetupError(f"--output_config: {e}") from None
    return path
