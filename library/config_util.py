"""Dataset config: the sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]).

Schema, validation with user-facing errors, and the value fallback subset -> dataset -> [general] -> CLI args ->
defaults that turns a config (or the CLI-only `--train_data_dir` layout) into `DatasetBlueprint`s for
`library.dataset.build_dataset_group`. See docs/dataset_config.md for every key.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.text_io import read_text

logger = logging.getLogger(__name__)


_WORKER_WRAPPED = re.compile(r"\ACaught ConfigError in DataLoader worker process \d+\.\nOriginal Traceback")
_WORKER_MESSAGE = re.compile(r"^[\w.]*ConfigError: ", re.M)


class ConfigError(Exception):
    """A user-facing config problem. The message names the file, key or flag and says what to do.

    Raised in a DataLoader worker (`--max_data_loader_n_workers`), torch re-raises it in the main process as
    `ConfigError("Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback ...")`; that wrapping is
    undone here, so the user still sees only the message (docs/reliability.md)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPED.match(args[0]):
            m = _WORKER_MESSAGE.search(args[0])
            if m is not None:
                args = (args[0][m.end():].rstrip("\n"),)
        super().__init__(*args)


# ---------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------

# value kinds: "int", "float" (int accepted), "bool", "str", "reso" (int or [w, h]), "float_pair", "table"
DATASET_KEYS = {  # [general] and [[datasets]] only
    "batch_size": "int",
    "resolution": "reso",
    "enable_bucket": "bool",
    "min_bucket_reso": "int",
    "max_bucket_reso": "int",
    "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool",
    "network_multiplier": "float",
    "validation_split": "float",
    "validation_seed": "int",
    "max_image_pixels": "int",  # APT-LoRA: decompression-bomb guard (docs/reliability.md)
    "skip_image_resolution": "reso",  # images whose original area is at most this one's are left out
}
SUBSET_KEYS = {  # all three levels; the subset's value wins
    "num_repeats": "int",
    "shuffle_caption": "bool",
    "caption_separator": "str",
    "keep_tokens": "int",
    "keep_tokens_separator": "str",
    "secondary_separator": "str",
    "enable_wildcard": "bool",
    "caption_prefix": "str",
    "caption_suffix": "str",
    "color_aug": "bool",
    "flip_aug": "bool",
    "random_crop": "bool",
    "face_crop_aug_range": "float_pair",
    "token_warmup_min": "int",
    "token_warmup_step": "float",
    "custom_attributes": "table",
    "resize_interpolation": "str",
    "caption_dropout_rate": "float",
    "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float",
}
DB_KEYS = {  # all three levels, DreamBooth datasets only
    "class_tokens": "str",
    "caption_extension": "str",
    "cache_info": "bool",
    "prior_class_tokens": "str",  # APT (DESIGN.md 2.6)
}
DB_SUBSET_ONLY = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool",
                  "conditioning_data_dir": "str"}  # loss masks for --masked_loss (library/loss_masks.py)
FT_SUBSET_ONLY = {"metadata_file": "str", "image_dir": "str", "alpha_mask": "bool"}
SUBSET_ONLY = {**DB_SUBSET_ONLY, **FT_SUBSET_ONLY}
CLI_ONLY = {"prior_loss_weight": "--prior_loss_weight", "debug_dataset": "--debug_dataset",
            "max_token_length": "--max_token_length"}
ALL_KEYS = {**DATASET_KEYS, **SUBSET_KEYS, **DB_KEYS, **SUBSET_ONLY}

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # sd-scripts' list (it adds .avif/.jxl with a plugin)
# files of these are images too, but not trained: a listing counts them in a warning rather than passing them over
OTHER_IMAGE_EXTENSIONS = (".avif", ".jxl", ".jfif", ".gif", ".tif", ".tiff", ".heic", ".heif")
# images with more pixels are refused (skipped with a warning): PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS),
# a guard against decompression bombs; `max_image_pixels` in [general] / [[datasets]] changes it
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# CLI (argparse) attribute names that differ from the config key
CLI_NAME = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
# keys that never come from the CLI namespace (their argparse namesakes, if any, mean something else: the trainer
# applies --network_multiplier to the whole network itself)
NOT_FROM_CLI = (set(SUBSET_ONLY) - {"alpha_mask"}) | {"network_multiplier"}

SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False,
    "caption_prefix": None, "caption_suffix": None, "color_aug": False, "flip_aug": False, "random_crop": False,
    "face_crop_aug_range": None, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "resize_interpolation": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "class_tokens": None, "caption_extension": ".caption", "cache_info": False,
    "prior_class_tokens": None, "image_dir": None, "is_reg": False, "alpha_mask": False, "metadata_file": None,
    "conditioning_data_dir": None,
}
DATASET_DEFAULTS: dict[str, Any] = {
    "batch_size": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "network_multiplier": 1.0, "validation_split": 0.0,
    "validation_seed": None, "resize_interpolation": None, "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
    "skip_image_resolution": None,
}


@dataclass
class SubsetBlueprint:
    """Resolved parameters of one subset (every fallback applied). `where` names it in messages."""
    image_dir: str | None = None
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    prior_class_tokens: str | None = None
    caption_extension: str = ".caption"
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # mask images for --masked_loss (library/loss_masks.py)
    cache_info: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict | None = None
    where: str = ""  # e.g. "datasets[0].subsets[1] in /path/dataset.toml" or "--train_data_dir subfolder '10_sks dog'"
    key_path: str = ""  # e.g. "datasets[0].subsets[1]" (config) or "" (CLI-only mode)


@dataclass
class DatasetBlueprint:
    """Resolved parameters of one dataset and its subsets."""
    is_dreambooth: bool
    subsets: list[SubsetBlueprint] = field(default_factory=list)
    batch_size: int = 1
    resolution: tuple[int, int] | None = None  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    skip_image_resolution: tuple[int, int] | None = None  # (width, height): smaller or equal areas are left out
    from_user_config: bool = True  # False in CLI-only mode (changes the ss_* metadata layout, like sd-scripts)
    where: str = ""
    key_path: str = ""
    bucket_reso_steps_from: str = ""  # where bucket_reso_steps came from (for the divisibility message)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


_BACKSLASH_IN_QUOTES = re.compile(r'"[^"]*\\')  # "C:\Users...": the usual TOML mistake on Windows


def not_found_hint(path: str) -> str:
    """For a "not found" message, what may have hidden a path that is there: a TOML escape ("D:\\train" in double
    quotes reads as D:<tab>rain, with \\t \\n \\r \\b \\f; other escapes are a syntax error, see load_toml), or
    Windows' path length limit (a longer path reads as missing unless long paths are enabled); else ""."""
    from library.safe_io import WINDOWS_MAX_PATH, _too_long_on_windows

    hint = ""
    if any(c in str(path) for c in "\t\n\r\b\f"):
        hint += (f" It reads {str(path)!r}: a backslash inside \"double quotes\" starts an escape in TOML (\\t is a "
                 "tab, \\b a backspace ...): write a Windows path in single quotes, 'C:\\Users\\me\\photos', or with "
                 "forward slashes, \"C:/Users/me/photos\".")
    if _too_long_on_windows(str(path)):
        hint += (f" Its full path is {len(os.path.abspath(path))} characters, over Windows' limit of "
                 f"{WINDOWS_MAX_PATH}: move it nearer the drive's root, or enable long paths (the LongPathsEnabled "
                 "registry setting).")
    return hint


def load_toml(path, what: str = "dataset config") -> dict:
    """Parse a TOML file; a syntax error becomes a ConfigError with the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}. Check the path (relative paths are relative to the "
                          f"current directory, {os.getcwd()}).")
    text = read_text(path, what, ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS.search(msg)
        lines = text.splitlines() or [""]
        if m is not None:
            line, col = int(m.group(1)), int(m.group(2))
        else:  # "(at end of document)": point after the last character
            line, col = len(lines), len(lines[-1]) + 1
        reason = re.sub(r"\s*\(at [^)]*\)", "", msg).strip()
        tables = ", tables are [general], [[datasets]], [[datasets.subsets]]" if what == "dataset config" else ""
        bad = lines[line - 1] if 1 <= line <= len(lines) else ""
        fix = ('A backslash inside "double quotes" starts an escape in TOML (\\n, \\t, \\U...): write a Windows '
               "path in single quotes, 'C:\\Users\\me\\photos', or with forward slashes, \"C:/Users/me/photos\"."
               if _BACKSLASH_IN_QUOTES.search(bad) else
               f"Fix the syntax there (strings need quotes, lists need brackets{tables}).")
        raise ConfigError(f"{path}:{line}:{col}: TOML syntax error in the {what} (line {line}, column {col}): "
                          f"{reason}.{_show_line(text, line, col)}\n{fix}") from None


def _show_line(text: str, line: int, col: int) -> str:
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    return f"\n    {lines[line - 1]}\n    {' ' * max(col - 1, 0)}^"


def load_dataset_config(path) -> dict:
    """Load and validate a dataset config (`.toml`, or `.json` like sd-scripts). Returns the parsed dict."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise ConfigError(f"dataset config file not found: {path} (--dataset_config).")
        text = read_text(path, "dataset config", ConfigError)
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}:{e.colno}: JSON syntax error in the dataset config (line "
                              f"{e.lineno}, column {e.colno}): {e.msg}.{_show_line(text, e.lineno, e.colno)}") from None
    else:
        cfg = load_toml(path, "dataset config")
    validate_dataset_config(cfg, path)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def _type_name(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "a non-finite number"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table", type(None): "null"}.get(type(v), type(v).__name__)


def _check_value(kind: str, v) -> str | None:
    """None if `v` fits `kind`, else what was expected."""
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = is_int or isinstance(v, float)
    if kind == "int":
        return None if is_int else "an integer, e.g. 4"
    if kind == "float":
        return None if is_num and math.isfinite(v) else "a number, e.g. 0.1"
    if kind == "bool":
        return None if isinstance(v, bool) else "true or false (no quotes)"
    if kind == "str":
        return None if isinstance(v, str) else 'a string in quotes, e.g. "sks dog"'
    if kind == "reso":
        if is_int and v > 0:
            return None
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in v):
            return None
        return "a positive integer or [width, height], e.g. 512 or [768, 512]"
    if kind == "float_pair":
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v):
            return None
        return "two numbers, e.g. [2.0, 4.0]"
    if kind == "table":
        return None if isinstance(v, dict) else "a table, e.g. { key = value }"
    raise AssertionError(kind)


def _suggest(key: str, preferred, everything) -> str:
    """The closest known key (difflib's ratio, at least 0.6; a key the typo begins, an abbreviation, first), one
    allowed at this level winning a tie: `resoltion` in a subset is `resolution` (a [[datasets]] key, which the next
    run then says to move), not the subset key `resize_interpolation`; `caption_ext` is `caption_extension`."""
    preferred = set(preferred)
    scored = [(difflib.SequenceMatcher(None, key, k).ratio(), k) for k in preferred | set(everything)]
    ranked = [(k.startswith(key), ratio, k in preferred, k) for ratio, k in scored if ratio >= 0.6]
    return f" Did you mean `{max(ranked)[3]}`?" if ranked else ""


def _dataset_kind(ds: dict) -> str:
    subsets = ds.get("subsets") or []
    if not isinstance(subsets, list):
        return "db"
    has_md = [isinstance(s, dict) and "metadata_file" in s for s in subsets]
    if subsets and all(has_md):
        return "ft"
    if any(has_md):
        return "mixed"
    return "db"


def validate_dataset_config(cfg: dict, path=None) -> None:
    """Check structure, key names, levels and value types. Raises one ConfigError listing every problem."""
    src = f" in {path}" if path is not None else ""
    errors: list[str] = []

    def check_keys(table: dict, prefix: str, level: str, kind: str) -> None:
        if level == "general":
            allowed = {**DATASET_KEYS, **SUBSET_KEYS, **DB_KEYS}
        elif level == "dataset":
            allowed = {**DATASET_KEYS, **SUBSET_KEYS, **(DB_KEYS if kind != "ft" else {})}
        else:
            allowed = {**SUBSET_KEYS, **(DB_KEYS if kind != "ft" else {}),
                       **(FT_SUBSET_ONLY if kind == "ft" else DB_SUBSET_ONLY)}
        for key, value in table.items():
            if level == "dataset" and key == "subsets":
                continue
            kp = f"{prefix}.{key}"
            if key in allowed:
                expected = _check_value(allowed[key], value)
                if expected is not None:
                    errors.append(f"`{kp}`{src}: expected {expected}, got {_type_name(value)} ({value!r}).")
                continue
            if key in CLI_ONLY:
                errors.append(f"`{kp}`{src}: `{key}` is not a dataset config key; it is a command-line option "
                              f"only. Remove it here and pass {CLI_ONLY[key]} instead.")
            elif key in SUBSET_ONLY and level != "subset":
                errors.append(f"`{kp}`{src}: `{key}` is only allowed inside a [[datasets.subsets]] table. "
                              f"Move it into each subset.")
            elif key in DATASET_KEYS and level == "subset":
                errors.append(f"`{kp}`{src}: `{key}` is a dataset-level key and is not allowed in a subset. "
                              f"Move it to the [[datasets]] table (or [general]).")
            elif kind == "ft" and (key in DB_KEYS or key in DB_SUBSET_ONLY):
                errors.append(f"`{kp}`{src}: `{key}` is for DreamBooth datasets; this dataset is a fine-tuning "
                              f"dataset (its subsets have metadata_file), so captions come from the metadata file. "
                              f"Remove `{key}` here, or put DreamBooth subsets in a separate [[datasets]].")
            elif kind != "ft" and key == "metadata_file":
                errors.append(f"`{kp}`{src}: `metadata_file` is only for fine-tuning subsets.")
            else:
                errors.append(f"`{kp}`{src}: unknown key `{key}`.{_suggest(key, allowed, ALL_KEYS)}")

    if not isinstance(cfg, dict):
        raise ConfigError(f"dataset config{src}: the top level must be a table with [general] and [[datasets]].")
    for key in cfg:
        if key not in ("general", "datasets"):
            hint = _suggest(key, ("general", "datasets"), ())
            if not hint and key in ALL_KEYS:
                hint = f" `{key}` must be inside [general], [[datasets]] or [[datasets.subsets]]."
            errors.append(f"`{key}`{src}: unknown top-level key; only [general] and [[datasets]] are allowed.{hint}")
    general = cfg.get("general", {})
    if not isinstance(general, dict):
        errors.append(f"`general`{src}: must be a table: write [general] followed by key = value lines.")
    else:
        check_keys(general, "general", "general", "any")
    datasets = cfg.get("datasets")
    if datasets is None or datasets == []:
        errors.append(f"dataset config{src}: no [[datasets]] table. Add one with at least one [[datasets.subsets]] "
                      f"that has image_dir (see docs/dataset_config.md).")
        datasets = []
    elif not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        errors.append(f"`datasets`{src}: must be an array of tables: write [[datasets]] (double brackets).")
        datasets = []
    for i, ds in enumerate(datasets):
        dp = f"datasets[{i}]"
        subsets = ds.get("subsets")
        if subsets is None or subsets == []:
            errors.append(f"`{dp}`{src}: the dataset has no subsets. Add a [[datasets.subsets]] table with "
                          f"image_dir = \"...\" after this [[datasets]].")
            subsets = []
        elif not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            errors.append(f"`{dp}.subsets`{src}: must be an array of tables: write [[datasets.subsets]].")
            subsets = []
        kind = _dataset_kind(ds)
        if kind == "mixed":
            ft = [j for j, s in enumerate(subsets) if "metadata_file" in s]
            db = [j for j, s in enumerate(subsets) if "metadata_file" not in s]
            errors.append(f"`{dp}`{src}: DreamBooth subsets ({', '.join(f'subsets[{j}]' for j in db)}: no "
                          f"metadata_file) and fine-tuning subsets ({', '.join(f'subsets[{j}]' for j in ft)}: with "
                          f"metadata_file) cannot be mixed in one dataset. Split them into two [[datasets]].")
        check_keys(ds, dp, "dataset", kind)
        for j, sub in enumerate(subsets):
            sp = f"{dp}.subsets[{j}]"
            check_keys(sub, sp, "subset", "ft" if kind == "ft" else "db")
            misspelt = any(difflib.get_close_matches(k, ["image_dir"], cutoff=0.6) for k in sub if k != "image_dir")
            if kind == "db" and "image_dir" not in sub and not misspelt:
                errors.append(f"`{sp}`{src}: required key `image_dir` is missing. Add image_dir = \"/path/to/"
                              f"images\" (or metadata_file = \"...\" for a fine-tuning subset).")
    if errors:
        raise ConfigError("invalid dataset config:\n  - " + "\n  - ".join(errors) if len(errors) > 1 else errors[0])


# ---------------------------------------------------------------------------------------------------------------
# Blueprints
# ---------------------------------------------------------------------------------------------------------------

class _Layers:
    """Value lookup through subset -> dataset -> general -> CLI namespace -> defaults; remembers where from."""

    def __init__(self, tables: list[tuple[dict, str]], args, src: str):
        self.tables = tables  # (table, key path prefix) from most to least specific
        self.args = args
        self.src = src

    def get(self, name: str, default) -> tuple[Any, str]:
        for table, prefix in self.tables:
            value = table.get(name)
            if value is not None:
                if prefix.startswith("--"):  # CLI-only mode: a value derived from a folder name
                    return value, f"{name} of {prefix}"
                return value, f"`{prefix}.{name}`{self.src}"
        if self.args is not None and name not in NOT_FROM_CLI:
            flag = CLI_NAME.get(name, name)
            value = getattr(self.args, flag, None)
            if value is not None and value != "":  # "": unset, as GUIs write unset keys in a --config_file
                return _from_cli(name, flag, value), f"--{flag}"
        return default, f"`{name}` (default)"


def _parse_pair(flag: str, value, conv, expected: str):
    if isinstance(value, str):
        try:
            parts = [conv(p) for p in value.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise ConfigError(f"--{flag} {value!r}: expected {expected}.") from None
        return parts[0] if len(parts) == 1 else parts
    if isinstance(value, tuple):
        return list(value)
    return value


def _from_cli(name: str, flag: str, value):
    kind = ALL_KEYS.get(name)
    if kind == "reso":
        value = _parse_pair(flag, value, int, "an integer or WIDTH,HEIGHT, e.g. 512 or 768,512")
    elif kind == "float_pair":
        value = _parse_pair(flag, value, float, "two numbers, e.g. 2.0,4.0")
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is not None:
        expected = _check_value(kind, value)
        if expected is not None:
            raise ConfigError(f"--{flag}: expected {expected}, got {_type_name(value)} ({value!r}).")
    return value


def _norm_path(p: str) -> str:
    return os.path.normcase(os.path.abspath(os.path.expanduser(p)))


def _subdir_subsets(base: str, is_reg: bool, flag: str) -> list[dict]:
    """CLI-only mode: one subset per `<repeats>_<class tokens>` subfolder (sd-scripts)."""
    if not os.path.isdir(base):
        raise ConfigError(f"{flag} {base}: folder not found. Give the folder that holds `<repeats>_<class tokens>` "
                          f"subfolders (e.g. {os.path.join(base, '10_sks dog')}), or use --dataset_config.")
    subsets = []
    for name in sorted(os.listdir(base)):
        sub = os.path.join(base, name)
        if not os.path.isdir(sub):
            continue
        head, _, rest = name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            logger.warning(f"{flag}: ignoring subfolder '{name}' in {base}: its name does not start with a number "
                           f"of repeats (expected `<repeats>_<class tokens>`, e.g. '10_sks dog').")
            continue
        if repeats < 1:
            logger.warning(f"{flag}: ignoring subfolder '{name}' in {base}: repeats must be at least 1.")
            continue
        subsets.append({"image_dir": sub, "num_repeats": repeats, "is_reg": is_reg,
                        "class_tokens": rest if rest else None, "_where": f"{flag} subfolder '{name}'"})
    if not subsets:
        has_images = any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(base))
        hint = (" The images are directly in it: move them into a subfolder named like '10_sks dog' (10 repeats, "
                "class tokens 'sks dog')." if has_images else "")
        raise ConfigError(f"{flag} {base}: no `<repeats>_<class tokens>` subfolder found (e.g. '10_sks dog').{hint}")
    return subsets


def _cli_only_config(args) -> dict:
    train_dir = getattr(args, "train_data_dir", None) or None  # "": unset (GUI config files write it so)
    in_json = getattr(args, "in_json", None) or None
    if train_dir is None and in_json is None:
        raise ConfigError("no training data: pass --dataset_config with a dataset TOML, or --train_data_dir with "
                          "`<repeats>_<class tokens>` subfolders (see docs/dataset_config.md).")
    if in_json is not None:  # sd-scripts fine-tuning from the CLI: --in_json metadata + --train_data_dir
        return {"datasets": [{"subsets": [{"metadata_file": in_json, "image_dir": train_dir,
                                           "_where": f"--in_json {in_json}"}]}]}
    subsets = _subdir_subsets(train_dir, False, "--train_data_dir")
    reg_dir = getattr(args, "reg_data_dir", None) or None
    if reg_dir is not None:
        subsets += _subdir_subsets(reg_dir, True, "--reg_data_dir")
    return {"datasets": [{"subsets": subsets}]}


def generate_blueprint(user_config, args, *, config_path=None, is_sdxl: bool | None = None) -> list[DatasetBlueprint]:
    """Resolve every dataset/subset parameter: subset -> dataset -> [general] -> CLI args -> defaults.

    `user_config`: a dict from `load_dataset_config`, a path to a config file, or None for CLI-only mode
    (`args.train_data_dir` / `args.reg_data_dir` with `<repeats>_<class tokens>` subfolders, or `args.in_json`).
    `args`: the argparse namespace (or any object; missing attributes count as unset; None counts as unset).
    `is_sdxl`: when given, bucket_reso_steps is checked here (else `build_dataset_group` checks it).
    """
    if isinstance(user_config, (str, os.PathLike)):
        config_path = user_config
        user_config = load_dataset_config(user_config)
    from_config = user_config is not None
    if from_config and config_path is None:
        config_path = getattr(args, "dataset_config", None)  # for messages
    if from_config:
        validate_dataset_config(user_config, config_path)
        for flag in ("train_data_dir", "reg_data_dir", "in_json"):
            if getattr(args, flag, None) not in (None, ""):
                logger.warning(f"--{flag} is ignored because a dataset config is given"
                               f"{f' ({config_path})' if config_path else ''}; put the folders in the config.")
        cfg = user_config
    else:
        cfg = _cli_only_config(args)
    src = f" in {config_path}" if config_path is not None else ""
    general = cfg.get("general", {}) if from_config else {}

    blueprints: list[DatasetBlueprint] = []
    for i, ds in enumerate(cfg["datasets"]):
        subsets_cfg = ds["subsets"]
        is_db = all("metadata_file" not in s for s in subsets_cfg)
        dp = f"datasets[{i}]"
        layers = _Layers([(ds, dp), (general, "general")] if from_config else [], args, src)
        dvals, dwhere = {}, {}
        for name, default in DATASET_DEFAULTS.items():
            dvals[name], dwhere[name] = layers.get(name, default)
        bp = DatasetBlueprint(is_dreambooth=is_db, from_user_config=from_config,
                              where=f"{dp}{src}" if from_config else "the command-line dataset",
                              key_path=dp if from_config else "", bucket_reso_steps_from=dwhere["bucket_reso_steps"],
                              **{k: v for k, v in dvals.items() if k not in ("resolution", "skip_image_resolution")})
        bp.resolution = _resolution(dvals["resolution"], bp, from_config)
        if dvals["skip_image_resolution"] is not None:
            bp.skip_image_resolution = _pair(dvals["skip_image_resolution"])
        _check_dataset_values(bp, dvals, dwhere)

        seen: dict[str, str] = {}
        for j, sub in enumerate(subsets_cfg):
            sp = f"{dp}.subsets[{j}]"
            s_layers = _Layers([(sub, sp), (ds, dp), (general, "general")] if from_config else [(sub, sub["_where"])],
                               args, src)
            svals, swhere = {}, {}
            for name, default in SUBSET_DEFAULTS.items():
                if not is_db and name in DB_KEYS:
                    svals[name], swhere[name] = default, "default"
                    continue
                svals[name], swhere[name] = s_layers.get(name, default)
            where = f"{sp}{src}" if from_config else sub["_where"]
            sbp = SubsetBlueprint(where=where, key_path=sp if from_config else "", **svals)
            if sbp.caption_extension and not sbp.caption_extension.startswith("."):
                sbp.caption_extension = "." + sbp.caption_extension
            if sbp.face_crop_aug_range is not None:
                sbp.face_crop_aug_range = tuple(float(x) for x in sbp.face_crop_aug_range)
            if sbp.num_repeats < 1:
                logger.warning(f"{where}: ignoring this subset because num_repeats is {sbp.num_repeats} "
                               f"({swhere['num_repeats']}); set it to 1 or more to use it.")
                continue
            _check_subset_values(sbp, swhere, is_db)
            ident = sbp.image_dir if is_db else sbp.metadata_file
            norm = _norm_path(ident)
            if norm in seen:
                logger.warning(f"{where}: ignoring duplicate subset: {'image_dir' if is_db else 'metadata_file'} "
                               f"{ident!r} is already used by {seen[norm]} in the same dataset (the first one is "
                               f"used, like sd-scripts).")
                continue
            seen[norm] = where
            bp.subsets.append(sbp)
        if not bp.subsets:
            raise ConfigError(f"{bp.where}: no usable subset left (see the warnings above).")
        blueprints.append(bp)

    if is_sdxl is not None:
        check_bucket_reso_steps(blueprints, is_sdxl)
    return blueprints


def _resolution(value, bp: DatasetBlueprint, from_config: bool) -> tuple[int, int]:
    if value is None:
        where = ("add `resolution = 512` (or [width, height]) to this [[datasets]] table or to [general], or pass "
                 "--resolution" if from_config else "pass --resolution 512 (or WIDTH,HEIGHT)")
        kind = "DreamBooth" if bp.is_dreambooth else "fine-tuning"
        raise ConfigError(f"{bp.where}: resolution is required for {kind} datasets: {where}.")
    return _pair(value)


def _pair(value) -> tuple[int, int]:
    """A "reso" value (checked already) as (width, height)."""
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _check_dataset_values(bp: DatasetBlueprint, v: dict, w: dict) -> None:
    for name in ("batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "max_image_pixels"):
        if v[name] < 1:
            raise ConfigError(f"{w[name]} = {v[name]}: must be at least 1.")
    if bp.enable_bucket:
        _snap_bucket_limits(bp, w)
        if bp.bucket_reso_steps > min(bp.resolution):
            raise ConfigError(f"{bp.where}: bucket_reso_steps ({bp.bucket_reso_steps}, {w['bucket_reso_steps']}) is "
                              f"larger than the resolution's smaller side ({min(bp.resolution)}), so no bucket fits. "
                              f"Use bucket_reso_steps = 64 (32 is allowed for SDXL).")
        if min(bp.resolution) < bp.min_bucket_reso:
            raise ConfigError(f"{bp.where}: min_bucket_reso ({bp.min_bucket_reso}, {w['min_bucket_reso']}) is larger "
                              f"than the resolution's smaller side ({min(bp.resolution)}). Lower min_bucket_reso or "
                              f"raise resolution.")
        if max(bp.resolution) > bp.max_bucket_reso:
            raise ConfigError(f"{bp.where}: max_bucket_reso ({bp.max_bucket_reso}, {w['max_bucket_reso']}) is smaller "
                              f"than the resolution's larger side ({max(bp.resolution)}). Raise max_bucket_reso or "
                              f"lower resolution.")
    if bp.network_multiplier == 0:
        raise ConfigError(f"{w['network_multiplier']} = 0: the LoRA would be off for this dataset's batches, so they "
                          f"would train nothing. Give it a non-zero value (the LoRA's strength on its batches: 1.0, "
                          f"or -1.0 to train away from it), or remove the dataset.")
    if not 0.0 <= bp.validation_split <= 1.0:
        raise ConfigError(f"{w['validation_split']} = {bp.validation_split}: must be between 0 and 1.")
    if bp.resize_interpolation is not None and bp.resize_interpolation not in RESIZE_INTERPOLATIONS:
        raise ConfigError(f"{w['resize_interpolation']} = {bp.resize_interpolation!r}: unknown interpolation; use one "
                          f"of {', '.join(RESIZE_INTERPOLATIONS)}.")


def _snap_bucket_limits(bp: DatasetBlueprint, w: dict) -> None:
    """sd-scripts' adjust_min_max_bucket_reso_by_steps: min_bucket_reso rounded down and max_bucket_reso up to a
    multiple of bucket_reso_steps, with a warning, so that every bucket side is one (300 would give 300-wide
    buckets, which latents cannot have)."""
    steps = bp.bucket_reso_steps
    if bp.min_bucket_reso % steps:
        snapped = max(steps, bp.min_bucket_reso - bp.min_bucket_reso % steps)
        logger.warning(f"{w['min_bucket_reso']} = {bp.min_bucket_reso} is not a multiple of bucket_reso_steps "
                       f"({steps}): using {snapped}, as sd-scripts does.")
        bp.min_bucket_reso = snapped
    if bp.max_bucket_reso % steps:
        snapped = bp.max_bucket_reso + steps - bp.max_bucket_reso % steps
        logger.warning(f"{w['max_bucket_reso']} = {bp.max_bucket_reso} is not a multiple of bucket_reso_steps "
                       f"({steps}): using {snapped}, as sd-scripts does.")
        bp.max_bucket_reso = snapped


def _check_subset_values(s: SubsetBlueprint, w: dict, is_db: bool) -> None:
    if s.keep_tokens < 0:
        raise ConfigError(f"{w['keep_tokens']} = {s.keep_tokens}: must be 0 or more.")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"{w[name]} = {getattr(s, name)}: must be between 0 and 1.")
    if s.caption_dropout_every_n_epochs < 0:
        raise ConfigError(f"{w['caption_dropout_every_n_epochs']} = {s.caption_dropout_every_n_epochs}: must be 0 "
                          f"(off) or more.")
    if s.caption_separator == "":
        raise ConfigError(f"{w['caption_separator']}: must not be empty (the default is \",\").")
    if s.resize_interpolation is not None and s.resize_interpolation not in RESIZE_INTERPOLATIONS:
        raise ConfigError(f"{w['resize_interpolation']} = {s.resize_interpolation!r}: unknown interpolation; use one "
                          f"of {', '.join(RESIZE_INTERPOLATIONS)}.")
    if s.face_crop_aug_range is not None and not 0 < s.face_crop_aug_range[0] <= s.face_crop_aug_range[1]:
        raise ConfigError(f"{w['face_crop_aug_range']} = {list(s.face_crop_aug_range)}: give [min, max] with "
                          f"0 < min <= max: the crop's side as a multiple of the face's size, e.g. [2.0, 4.0] (the "
                          f"face takes a quarter to a half of the side).")
    if s.token_warmup_step < 0:
        raise ConfigError(f"{w['token_warmup_step']} = {s.token_warmup_step}: must be 0 (off) or more: the caption "
                          f"token warm-up's length in optimizer steps, or below 1 a fraction of the run.")
    if s.token_warmup_min < 0:
        raise ConfigError(f"{w['token_warmup_min']} = {s.token_warmup_min}: must be 0 or more (the caption tokens "
                          f"kept at the first step of the token warm-up).")
    if s.custom_attributes:
        logger.warning(f"{w['custom_attributes']}: custom_attributes are ignored (sd-scripts' LoRA trainer for SD "
                       f"does not use them either).")
    if is_db:
        if not s.image_dir:
            raise ConfigError(f"{w['image_dir']}: image_dir is empty. Give the folder that holds the images.")
        if s.conditioning_data_dir is not None:
            if not s.conditioning_data_dir:
                raise ConfigError(f"{w['conditioning_data_dir']}: conditioning_data_dir is empty. Give the folder "
                                  f"that holds the masks, or remove the key.")
            if s.alpha_mask:
                raise ConfigError(f"{s.where}: both alpha_mask ({w['alpha_mask']}) and conditioning_data_dir: a "
                                  f"subset's loss masks come from one place. Keep one.")
        if s.prior_class_tokens is not None and not s.class_tokens:
            raise ConfigError(f"{w['prior_class_tokens']} = {s.prior_class_tokens!r}: prior_class_tokens needs "
                              f"class_tokens in the same subset (the identifier phrase it replaces, e.g. class_tokens "
                              f"= \"sks dog\" with prior_class_tokens = \"dog\"). Set class_tokens.")
    else:
        if not s.metadata_file:
            raise ConfigError(f"{s.where}: metadata_file is empty.")


def check_bucket_reso_steps(blueprints: list[DatasetBlueprint], is_sdxl: bool) -> None:
    """sd-scripts asserts bucket_reso_steps % 64 == 0 (SD1.x/2.x) or % 32 == 0 (SDXL): latent sides must divide by
    the UNet's total downsampling (8 latent pixels for SD, 4 for SDXL)."""
    step = 32 if is_sdxl else 64
    for bp in blueprints:
        if bp.enable_bucket and bp.bucket_reso_steps % step != 0:
            raise ConfigError(f"{bp.bucket_reso_steps_from} = {bp.bucket_reso_steps}: bucket_reso_steps must be a "
                              f"multiple of {step} for {'SDXL' if is_sdxl else 'SD1.x/SD2.x'} models (use "
                              f"{step if is_sdxl else 64}).")
