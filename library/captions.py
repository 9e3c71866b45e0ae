"""Caption files and per-sample caption processing with sd-scripts semantics (`BaseDataset.process_caption`)."""
from __future__ import annotations

import os
import random
import re

from library.config_util import ConfigError, SubsetBlueprint


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def decode_caption_bytes(data: bytes, path: str) -> str:
    """Caption file bytes -> text. UTF-8; a byte-order mark selects UTF-8-with-BOM or UTF-16 (Windows Notepad,
    PowerShell `>`) and is dropped. Anything else (cp1252, Shift-JIS, ...) is a ConfigError naming the file and the
    first bad byte: guessing a legacy code page would train mojibake without anyone noticing."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding).lstrip("\ufeff")
    except UnicodeDecodeError as e:
        what = "UTF-16 (it starts with a UTF-16 byte-order mark)" if encoding == "utf-16" else "UTF-8 text"
        raise ConfigError(f"caption file {path} is not UTF-8 text: it is not valid {what} at byte {e.start} "
                          f"(0x{data[e.start]:02x}); it was probably saved in a legacy encoding such as cp1252 or "
                          f"Shift-JIS. Re-save it as UTF-8 (in your editor: Save As, encoding UTF-8; or "
                          f"iconv -f cp1252 -t utf-8).") from None


def read_caption_file(image_path: str, caption_extension: str, enable_wildcard: bool) -> str | None:
    """The caption of `<stem><caption_extension>` beside the image, or None when there is no such file.

    The first non-empty line; with enable_wildcard every non-empty line, joined by newlines (one is picked per
    sample). Encodings: see `decode_caption_bytes`. A file with no text is a ConfigError (docs/dataset_config.md)."""
    path = os.path.splitext(image_path)[0] + caption_extension
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"caption file {path}: cannot read it ({e.strerror}).") from None
    lines = [line.strip() for line in decode_caption_bytes(data, path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"caption file {path} is empty. Write the caption in it, or delete it to use the "
                          f"subset's class_tokens as the caption.")
    if enable_wildcard:
        return "\n".join(lines)
    return lines[0]


def tag_frequency(captions, into: dict | None = None) -> dict:
    """sd-scripts `set_tag_frequency`: tags are the caption split on ',', stripped, lower-cased."""
    freq = {} if into is None else into
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _replace_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:  # multi-line caption: one random line
        caption = rng.choice(caption.split("\n"))
    # {a|b|c} -> one of them; {{ and }} are literal braces
    open_, close = "⦅", "⦆"
    while open_ in caption or close in caption:
        open_, close = open_ + "⦅", close + "⦆"
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def with_prefix_suffix(subset: SubsetBlueprint, caption: str) -> str:
    """The caption with the subset's caption_prefix and caption_suffix, space-joined (sd-scripts)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def process_caption(subset: SubsetBlueprint, caption: str, *, rng: random.Random, epoch: int) -> str:
    """The final training caption c* of one sample: prefix/suffix, caption dropout, wildcards, shuffle with
    keep_tokens / keep_tokens_separator, tag dropout, secondary separator (in that order, like sd-scripts).

    `epoch` counts from 1 (sd-scripts): with caption_dropout_every_n_epochs = n, epochs n, 2n, ... drop captions.
    """
    caption = with_prefix_suffix(subset, caption)

    drop = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    n = subset.caption_dropout_every_n_epochs
    if drop or (n > 0 and epoch % n == 0):
        return ""

    if subset.enable_wildcard:
        caption = _replace_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    sep = subset.caption_separator
    kts = subset.keep_tokens_separator
    has_kts = bool(kts) and kts in caption
    # sd-scripts only re-joins when shuffling or dropping tags; we also do it when keep_tokens_separator occurs, so
    # the separator ("|||") never reaches the text encoder (the order is unchanged without shuffle).
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or has_kts:
        fixed, flex, fixed_suffix = [], [], []
        if has_kts:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                fixed_suffix = _split(suffix_part, sep)
            fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tokens[: subset.keep_tokens], tokens[subset.keep_tokens:]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = f"{sep} ".join(fixed + flex + fixed_suffix)  # sd-scripts PR #2390: "{separator} "

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption
