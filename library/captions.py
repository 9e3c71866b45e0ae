"""Caption files and per-sample caption processing with sd-scripts semantics (`BaseDataset.process_caption`)."""
from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass

from library.config_util import ConfigError, SubsetBlueprint
from library.text_io import read_text


def caption_paths(image_path: str, caption_extension: str) -> list[str]:
    """Where an image's caption may be: `<stem><ext>`, then for a face-box name `<name>_<cx>_<cy>_<w>_<h>` (sd-scripts'
    tools/detect_face_rotate.py) the original's `<name><ext>`, as sd-scripts' `read_caption` looks (it takes any
    name with four `_` parts at the end; here they must be integers)."""
    stem = os.path.splitext(image_path)[0]
    paths = [stem + caption_extension]
    folder, name = os.path.split(stem)
    parts = name.split("_")
    if len(parts) >= 5 and all(p.lstrip("-").isdigit() for p in parts[-4:]):
        paths.append(os.path.join(folder, "_".join(parts[:-4])) + caption_extension)
    return paths


def read_caption_file(image_path: str, caption_extension: str, enable_wildcard: bool) -> str | None:
    """The caption of `<stem><caption_extension>` beside the image (or a face crop's original, `caption_paths`), or
    None when there is no such file.

    The first non-empty line; with enable_wildcard every non-empty line, joined by newlines (one is picked per
    sample). Lines end at \\n, \\r\\n or \\r only, as Python's text mode reads them in sd-scripts (not at other Unicode
    line separators, which CLIP's tokenizer reads as spaces). Encodings: see `library.text_io`. A file with no
    text is a ConfigError (docs/dataset_config.md)."""
    path = next((p for p in caption_paths(image_path, caption_extension) if os.path.isfile(p)), None)
    if path is None:
        return None
    text = read_text(path, "caption file", ConfigError).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.strip() for line in text.split("\n")]
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


def wildcard_draws(caption: str, limit: int = 64) -> list[str]:
    """The texts `_replace_wildcards` can draw from `caption`: each line, each {a|b} choice. Beyond `limit`
    combinations per line, one group varies at a time (the others at their first choice): enough to find a draw
    that lacks a word, which is what it is for (APT's warning before training)."""
    import itertools

    out = []
    for line in caption.split("\n"):
        parts = re.split(r"(?<!\{)\{([^{}]+)\}(?!\})", line)  # text, choices, text, ...
        fixed, groups = parts[0::2], [g.split("|") for g in parts[1::2]]
        if math.prod(len(g) for g in groups) <= limit:
            combos = list(itertools.product(*groups))
        else:
            firsts = [g[0] for g in groups]
            combos = [tuple(firsts[:i]) + (c,) + tuple(firsts[i + 1:]) for i, g in enumerate(groups) for c in g]
        for combo in combos:
            text = fixed[0] + "".join(c + f for c, f in zip(combo, fixed[1:]))
            out.append(text.replace("{{", "{").replace("}}", "}"))
    return out


def with_prefix_suffix(subset: SubsetBlueprint, caption: str) -> str:
    """The caption with the subset's caption_prefix and caption_suffix, space-joined (sd-scripts)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    return caption


def token_warmup_steps(subset: SubsetBlueprint, max_train_steps: int | None) -> float:
    """The subset's token warm-up in optimizer steps: `token_warmup_step`, or below 1 that fraction of the run
    (floored, as sd-scripts); 0 is off."""
    n = subset.token_warmup_step
    if 0 < n < 1:
        if max_train_steps is None:
            raise ValueError(f"{subset.where}: token_warmup_step = {n} is a fraction of the run: its length in steps "
                             f"needs max_train_steps")
        return math.floor(n * max_train_steps)
    return n


def _warm_up(flex: list[str], subset: SubsetBlueprint, step: int | None, max_train_steps: int | None) -> list[str]:
    """sd-scripts' caption token warm-up: before the warm-up's end only the first flex tokens, in caption order,
    from token_warmup_min at step 0 growing linearly to all (the same float expression as sd-scripts, so the same
    lengths). `step` None: after the warm-up."""
    n = token_warmup_steps(subset, max_train_steps) if step is not None else 0
    if n and step < n:
        tokens_len = math.floor(step * ((len(flex) - subset.token_warmup_min) / n)) + subset.token_warmup_min
        return flex[:tokens_len]
    return flex


def process_caption(subset: SubsetBlueprint, caption: str, *, rng: random.Random, epoch: int,
                    step: int | None = None, max_train_steps: int | None = None) -> str:
    """The final training caption c* of one sample: prefix/suffix, caption dropout, wildcards, token warm-up,
    shuffle with keep_tokens / keep_tokens_separator, tag dropout, secondary separator (in that order, like
    sd-scripts).

    `epoch` counts from 1 (sd-scripts): with caption_dropout_every_n_epochs = n, epochs n, 2n, ... drop captions.
    `step`: the optimizer step (0-based) the sample trains at, for token_warmup_step; None is after the warm-up
    (full captions). `max_train_steps`: the run's length, for a token_warmup_step below 1 (a fraction of it).
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
    # sd-scripts only re-joins when shuffling, dropping tags or warming up tokens; we also do it when
    # keep_tokens_separator occurs, so the separator ("|||") never reaches the text encoder (the order is unchanged
    # without shuffle).
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or has_kts or subset.token_warmup_step > 0:
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
        flex = _warm_up(flex, subset, step, max_train_steps)  # before shuffle and tag dropout, as sd-scripts
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = f"{sep} ".join(fixed + flex + fixed_suffix)  # sd-scripts PR #2390: "{separator} "

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


@dataclass(frozen=True)
class DeferredCaption:
    """A caption of a subset with token warm-up, left unprocessed by the dataset: its length depends on the optimizer
    step its batch trains at, which a DataLoader worker cannot know exactly (docs/dataset_config.md, 'Token
    warm-up'). `finish_captions` processes it in the main process. Its randomness (shuffle, dropout, wildcards)
    comes from its own `random.Random(seed)`, so the caption is the same whichever process finishes it."""
    subset: SubsetBlueprint
    caption: str  # raw (before per-sample processing)
    epoch: int
    seed: str

    def finish(self, step: int | None, max_train_steps: int | None = None) -> str:
        """c* at optimizer `step` (None: after the warm-up)."""
        return process_caption(self.subset, self.caption, rng=random.Random(self.seed), epoch=self.epoch, step=step,
                               max_train_steps=max_train_steps)


def finish_captions(batch: dict, step: int | None = None, max_train_steps: int | None = None) -> dict:
    """The batch with its `DeferredCaption`s processed at optimizer `step` (0-based; None: after the token warm-up,
    for validation and --debug_dataset), in place; other captions are final already. Returns the batch."""
    batch["captions"] = [c.finish(step, max_train_steps) if isinstance(c, DeferredCaption) else c
                         for c in batch["captions"]]
    return batch
