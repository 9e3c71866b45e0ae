"""APT prompts (DESIGN.md §2.6) and the token alignment π between them (§2.5).

c* is the final training caption; c, the prompt of the prior pass, is derived from that same string by
replacing the subset's `class_tokens` ("sks dog") by its `prior_class_tokens` ("dog").

π maps every token column of c* to a column of c, so that the prior's cross-attention maps (computed with c)
can be compared column by column with the fine-tuned model's (computed with c*):
    D = Σ_h A_θ − (Σ_h A_φ)[..., π]
See docs/apt_capture.md for the rules and the reasons behind them.
"""
from __future__ import annotations

import difflib
import re
from typing import Sequence

import torch

from library.captions import wildcard_draws, with_prefix_suffix

#: π value of a c* column that takes no part in the attention loss (identifier columns in mode "drop").
DROPPED = -1

ALIGN_MODES = ("class", "drop")


class PromptError(ValueError):
    """A user-facing configuration error about class tokens / prior class tokens."""


# ----------------------------------------------------------------------------------------------------------------
# c* -> c
# ----------------------------------------------------------------------------------------------------------------


def resolve_prior_class_tokens(class_tokens: str | None, prior_class_tokens: str | None = None) -> str | None:
    """The words that replace `class_tokens` in the prior prompt c, or None when there are no class tokens.

    Call it at config time to fail early; `class_prompt` calls it too.
    """
    if class_tokens is None or not class_tokens.strip():
        return None
    if prior_class_tokens is not None:
        if not prior_class_tokens.strip():
            raise PromptError(
                f"prior_class_tokens is empty for class_tokens {class_tokens!r}: set `prior_class_tokens` in the "
                f'dataset TOML subset to the plain class, e.g. prior_class_tokens = "dog"'
            )
        return prior_class_tokens.strip()
    words = class_tokens.split()
    if len(words) < 2:
        raise PromptError(
            f"class_tokens {class_tokens!r} is a single word, so APT cannot tell the identifier from the class: "
            f'set `prior_class_tokens` in the dataset TOML subset (e.g. class_tokens = "sks dog", '
            f'prior_class_tokens = "dog"), or use "<identifier> <class>" class tokens'
        )
    return " ".join(words[1:])


def _class_pattern(class_tokens: str) -> re.Pattern:
    words = class_tokens.split()
    # whole words only; any run of whitespace between the words; case-insensitive (CLIP lowercases its input)
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def identifier_word(class_tokens: str, prior: str) -> str | None:
    """The identifier: the first word of `class_tokens` that is not a word of the prior class tokens `prior`
    ("sks dog" / "dog" -> sks; "ohwx man" / "person" -> ohwx; "sks" / "dog" -> sks)."""
    prior_words = {w.lower() for w in prior.split()}
    return next((w for w in class_tokens.split() if w.lower() not in prior_words), None)


def _drop_word(caption: str, word: str) -> str:
    """`caption` without the whole word `word`, and without the empty tag it leaves: "sks, dog, red" -> "dog, red",
    "red, sks, dog" -> "red, dog"; likewise between tags separated by ";" or "|" (a subset's caption_separator).
    Whitespace runs become one space (CLIP's tokens do not change)."""
    out = _whole_word(word).sub("", caption)
    if out == caption:
        return caption
    out = re.sub(r"\(\s*(?::\s*-?[\d.]+\s*)?\)|\[\s*\]", "", out)  # an emptied "(sks:1.2)" of --weighted_captions
    out = re.sub(r"([,;|])\s*(?=\1)", "", out)  # an emptied tag between two others
    out = re.sub(r"^\s*[,;|]|[,;|]\s*$", "", out.strip())  # an emptied first or last tag
    return re.sub(r"\s+", " ", out).strip()


def class_prompt(caption: str, class_tokens: str | None, prior_class_tokens: str | None = None) -> str:
    """c from c*: every whole-word occurrence of `class_tokens` in `caption` replaced by the prior class tokens.

    - `prior_class_tokens` given: used as is ("ohwx man" -> "person").
    - not given and `class_tokens` has >= 2 words: the first word is the identifier and is dropped
      ("sks dog" -> "dog"; "sks teddy bear" -> "teddy bear").
    - not given and a single word: `PromptError` (set prior_class_tokens in the dataset TOML subset).
    - `class_tokens` None or empty (fine-tuning / caption-file images): c = c* unchanged (π is then the identity).
    - **[ours]** a caption without the class tokens but with the identifier as a word of its own (tag captions,
      "sks, dog, red" for "sks dog"): the identifier is dropped, with the tag it was ("dog, red"), when a class
      word (of the class tokens or the prior's) is in the caption; else it is replaced by the prior class tokens
      ("sks, red" -> "dog, red": the prior prompt names the class, as it does for class tokens "sks" + prior "dog").
    - **[ours]** an identifier left over beside the class tokens ("sks dog, sks, red"; "sks dogs") is dropped the
      same way ("dog, red"; "dogs"): c never shows the prior pass the identifier.
    A caption with neither (e.g. caption dropout to "") is returned unchanged.
    """
    prior = resolve_prior_class_tokens(class_tokens, prior_class_tokens)
    if prior is None:
        return caption
    pattern = _class_pattern(class_tokens)
    ident = identifier_word(class_tokens, prior)
    if pattern.search(caption) is not None:
        out = pattern.sub(lambda _m: prior, caption)
        return _drop_word(out, ident) if ident is not None else out
    if ident is None:
        return caption
    class_words = {w.lower() for w in class_tokens.split() + prior.split()} - {ident.lower()}
    if any(_whole_word(w).search(caption) for w in class_words):
        return _drop_word(caption, ident)
    return _whole_word(ident).sub(lambda _m: prior, caption)


def _whole_word(word: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)


def captions_without_class_tokens(images) -> list[str]:
    """One warning per subset with captions that name neither its `class_tokens` nor its identifier (in any line
    or {a|b} choice a wildcard caption can draw), or without class tokens at all (images:
    objects with `key`, `caption`, `is_reg` and `subset`, as the dataset's ImageInfo). For such a caption
    `class_prompt` changes nothing: c = c*, the prior and fine-tuned passes read the same prompt, and APT's
    stabilisation and attention losses hold the LoRA to what the base model makes of the subject's own captions."""
    by_subset: dict[int, list] = {}
    for info in images:
        sub = info.subset
        if info.is_reg:
            continue
        text = with_prefix_suffix(sub, info.caption)
        entry = by_subset.setdefault(id(sub), [sub, 0, []])
        entry[1] += 1
        draws = wildcard_draws(text) if sub.enable_wildcard else [text]  # each line, each {a|b} choice
        if any(class_prompt(t, sub.class_tokens, sub.prior_class_tokens) == t for t in draws):
            entry[2].append(info)
    lines = []
    for sub, total, missing in by_subset.values():
        if not missing:
            continue
        if not (sub.class_tokens and sub.class_tokens.strip()):
            fix = ("put its images in a DreamBooth subset (image_dir with caption files) that sets them"
                   if getattr(sub, "metadata_file", None) else "set them for the subset")
            lines.append(
                f"{sub.where}: no class_tokens, so APT cannot tell the subject's identifier in its {total} captions: "
                f"its class prompt c is each caption itself, the prior and fine-tuned passes read the same prompt, "
                f"and APT holds the LoRA to what the base model makes of it. APT needs class_tokens and "
                f"prior_class_tokens (e.g. \"sks dog\" and \"dog\"): {fix}.")
            continue
        ct, first = sub.class_tokens.strip(), missing[0]
        ident = identifier_word(ct, resolve_prior_class_tokens(ct, sub.prior_class_tokens))
        lines.append(
            f"{sub.where}: {len(missing)} of {total} captions name neither class_tokens {ct!r} nor the identifier "
            f"{ident!r} (e.g. {first.key}: {first.caption[:80]!r}). For these APT's class prompt c is the caption "
            f"itself, so the prior and fine-tuned passes read the same prompt and APT holds the LoRA to what the "
            f"base model makes of it. Write {ct!r} in those captions (tag captions: as one tag, first with "
            f"keep_tokens = 1), or set caption_prefix = \"{ct},\" for the subset.")
    return lines


def class_prompt_examples(images) -> list[str]:
    """One line per training subset with class tokens: what its c* -> c replacement is, where the prior class
    tokens come from, and its first caption before and after (the start-of-run log; a wrong guess, e.g.
    class_tokens "dog sks" read as identifier "dog", shows there before any step). `images` as for
    `captions_without_class_tokens`."""
    seen, lines = set(), []
    for info in images:
        sub = info.subset
        if info.is_reg or id(sub) in seen or not (sub.class_tokens and sub.class_tokens.strip()):
            continue
        seen.add(id(sub))
        ct = sub.class_tokens.strip()
        prior = resolve_prior_class_tokens(ct, sub.prior_class_tokens)
        origin = ("prior_class_tokens" if sub.prior_class_tokens is not None else
                  f"the words after the identifier {identifier_word(ct, prior)!r}; set prior_class_tokens if not")
        text = with_prefix_suffix(sub, info.caption)
        lines.append(f"APT: {sub.where}: class prompt c replaces {ct!r} by {prior!r} ({origin}), e.g. "
                     f"{text[:80]!r} -> {class_prompt(text, ct, sub.prior_class_tokens)[:80]!r}")
    return lines


def class_prompts(captions: Sequence[str], class_tokens: Sequence[str | None],
                  prior_class_tokens: Sequence[str | None] | None = None) -> list[str]:
    """`class_prompt` over a batch (the dataset batch's `captions`, `class_tokens`, `prior_class_tokens`)."""
    if prior_class_tokens is None:
        prior_class_tokens = [None] * len(captions)
    if not (len(captions) == len(class_tokens) == len(prior_class_tokens)):
        raise ValueError("captions, class_tokens and prior_class_tokens must have the same length")
    return [class_prompt(c, ct, pct) for c, ct, pct in zip(captions, class_tokens, prior_class_tokens)]


# ----------------------------------------------------------------------------------------------------------------
# token alignment π
# ----------------------------------------------------------------------------------------------------------------


def _find(seq: list[int], sub: list[int], start: int, stop: int) -> list[int]:
    """Start positions of `sub` inside seq[start:stop]."""
    n = len(sub)
    return [i for i in range(start, stop - n + 1) if seq[i:i + n] == sub]


def token_alignment(ids_ft: Sequence[int] | torch.Tensor, ids_prior: Sequence[int] | torch.Tensor,
                    identifier_ids: Sequence[int] | None = None, class_ids: Sequence[int] | None = None,
                    mode: str = "class") -> torch.LongTensor:
    """π (LongTensor of len(ids_ft)): column of c (ids_prior) for every column of c* (ids_ft).

    1. Identical sequences: the identity.
    2. Otherwise a diff of the two whole id sequences (BOS, EOS and padding included;
       `difflib.SequenceMatcher(autojunk=False)`): tokens common to both align in order.
    3. Identifier columns of c*: the occurrences of `identifier_ids` among the c* tokens the diff left unmatched;
       when `identifier_ids` is None, every c* token the diff deleted outright (c is c* minus the identifier, so
       a pure deletion is the identifier). Mode "class": they map to the class token's column in c, that is the
       last token of the `class_ids` occurrence in c nearest to the deletion point (when `class_ids` is None: the
       c column right after the deletion point, i.e. the first class token, or the last token of the replacement
       span when the diff replaced tokens). Mode "drop": they map to `DROPPED` (-1) and are left out of L_attn
       (`losses.attn_loss` leaves those columns out).
    4. Other c* tokens of a replaced span (e.g. "man" of "ohwx man" -> "person") map in order onto the
       replacement span, stretched to its length (k-th of n tokens -> floor(k*m/n)-th of m).
    5. Any remaining unmatched column (deleted tokens that are not the identifier) maps to the nearest preceding
       aligned column (the nearest following one if there is none before it).
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"apt_identifier_align must be one of {ALIGN_MODES}, got {mode!r}")
    a = [int(x) for x in (ids_ft.tolist() if torch.is_tensor(ids_ft) else ids_ft)]
    b = [int(x) for x in (ids_prior.tolist() if torch.is_tensor(ids_prior) else ids_prior)]
    n = len(a)
    if a == b:
        return torch.arange(n, dtype=torch.long)
    ident = [int(x) for x in identifier_ids] if identifier_ids else None
    cls = [int(x) for x in class_ids] if class_ids else None

    UNSET = -2
    pi = [UNSET] * n
    ident_cols: list[tuple[int, int]] = []  # (c* column, class column in c)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                pi[i1 + k] = j1 + k
            continue
        if tag == "insert":
            continue
        # "delete" (j1 == j2) or "replace": c* columns i1..i2-1 have no identical counterpart
        if ident is not None:
            id_cols = {s + k for s in _find(a, ident, i1, i2) for k in range(len(ident))}
        else:
            id_cols = set(range(i1, i2)) if tag == "delete" else set()
        if id_cols:
            cls_col = _class_column(b, cls, tag, j1, j2)
            ident_cols += [(i, cls_col) for i in sorted(id_cols)]
        if tag == "replace":
            rest = [i for i in range(i1, i2) if i not in id_cols]
            m = j2 - j1
            for k, i in enumerate(rest):
                pi[i] = j1 + (k * m) // len(rest)
    for i, col in ident_cols:
        pi[i] = col if mode == "class" else DROPPED
    # remaining unmatched: nearest preceding aligned column
    last = UNSET
    for i in range(n):
        if pi[i] == UNSET:
            pi[i] = last
        elif pi[i] >= 0:
            last = pi[i]
    if UNSET in pi:  # nothing aligned before: nearest following aligned column (or 0)
        nxt = 0
        for i in range(n - 1, -1, -1):
            if pi[i] == UNSET:
                pi[i] = nxt
            elif pi[i] >= 0:
                nxt = pi[i]
    return torch.tensor(pi, dtype=torch.long)


def _class_column(b: list[int], cls: list[int] | None, tag: str, j1: int, j2: int) -> int:
    """Column of the class token in c for an identifier removed at c position j1 (span j1..j2-1 if replaced)."""
    if cls is not None:
        starts = _find(b, cls, 0, len(b))
        if starts:
            # the class occurrence nearest to the deletion point, preferring one at or after it
            s = min(starts, key=lambda s: (abs(s - j1), s < j1))
            return s + len(cls) - 1
    if tag == "replace":
        return j2 - 1
    return min(j1, len(b) - 1)


# ----------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------


def num_token_columns(tokenizer, max_token_length: int | None = None) -> int:
    """Token columns the UNet sees: 77, or BOS + max_token_length + EOS (152 / 227) for long prompts.

    sd-scripts encodes long prompts as 77-token chunks <BOS> 75 tokens <EOS> and re-stitches the hidden states
    as BOS + the 75 middle states of every chunk + the last chunk's final state, i.e. max_token_length + 2 columns.
    """
    model_max = int(tokenizer.model_max_length)
    if max_token_length is None or max_token_length + 2 <= model_max:
        return model_max
    if max_token_length % (model_max - 2):
        raise ValueError(f"max_token_length must be a multiple of {model_max - 2} (75, 150 or 225), "
                         f"got {max_token_length}")
    return max_token_length + 2


def stitched_token_ids(tokenizer, captions: Sequence[str], max_token_length: int | None = None,
                       weighted: bool = False) -> torch.LongTensor:
    """(B, N) token ids in the order of the UNet's token axis (N from `num_token_columns`).

    Equal to sd-scripts' re-stitched view of its chunked ids: the first chunk's BOS, the 75 middle ids of every
    chunk and the last id of the last chunk are exactly the tokenizer's output at max_length = N (a truncated
    prompt ends in EOS). One difference, on purpose: for a tokenizer whose pad is not EOS (SD2 "!", SDXL's
    second), sd-scripts feeds an all-padding chunk to the text encoder as <BOS> <EOS> <PAD>...; that column keeps
    its PAD id here, so that both SDXL tokenizers give the same π (it is a padding column either way).
    """
    from library.conditioning import flat_ids

    return flat_ids(tokenizer, captions, num_token_columns(tokenizer, max_token_length), weighted)


def _word_ids(tokenizer, words: str | None) -> list[int] | None:
    if not words or not words.strip():
        return None
    return list(tokenizer(words, add_special_tokens=False).input_ids)


def alignment_for_batch(tokenizers: Sequence, captions_ft: Sequence[str], captions_prior: Sequence[str],
                        mode: str = "class", max_token_length: int | None = None,
                        class_tokens: Sequence[str | None] | None = None,
                        prior_class_tokens: Sequence[str | None] | None = None,
                        weighted: bool = False) -> list[torch.LongTensor]:
    """One π (B, N) per tokenizer, on the token ids as the model sees them (see `stitched_token_ids`; `weighted`:
    the captions' --weighted_captions segments tokenized as the text encoders get them).

    `class_tokens` / `prior_class_tokens` (the batch's per-sample lists) are optional: with them the identifier
    (the first word of class_tokens that is not a word of the prior class tokens) and the class tokens (the
    prior class tokens) are known exactly; without them the identifier is whatever the diff
    deleted (exact for the default "<identifier> <class>" -> "<class>" derivation).

    SDXL: the UNet's cross-attention sees both encoders' states concatenated along channels, so the token axis is
    shared. Both tokenizers are CLIP BPE and differ in the pad id, and the diff gives the same π for both (but
    after a run of "!", which the second splits out as its pad token: docs/apt.md); the UNet maps use `pis[0]`
    (tokenizer 1; the training step memoises those rows per sample, `apt_ext.step.APT.alignment`).
    """
    if len(captions_ft) != len(captions_prior):
        raise ValueError("captions_ft and captions_prior must have the same length")
    bsz = len(captions_ft)
    ct = list(class_tokens) if class_tokens is not None else [None] * bsz
    pct = list(prior_class_tokens) if prior_class_tokens is not None else [None] * bsz
    from library.conditioning import _chunked, num_chunks

    n_chunks = num_chunks(max_token_length)
    out = []
    for tok in tokenizers:
        ids_ft = stitched_token_ids(tok, captions_ft, max_token_length, weighted)
        ids_pr = stitched_token_ids(tok, captions_prior, max_token_length, weighted)
        chunks = (_chunked(tok, ids_ft, n_chunks), _chunked(tok, ids_pr, n_chunks)) if n_chunks > 1 else None
        rows = []
        for i in range(bsz):
            ident_ids, cls_ids = _identifier_and_class_ids(tok, ct[i], pct[i])
            pi = token_alignment(ids_ft[i], ids_pr[i], ident_ids, cls_ids, mode=mode)
            rows.append(pi if chunks is None else _identity_on_equal_chunks(pi, chunks[0][i], chunks[1][i], n_chunks))
        out.append(torch.stack(rows) if rows else torch.zeros(0, ids_ft.shape[1], dtype=torch.long))
    return out


def _identity_on_equal_chunks(pi: torch.LongTensor, chunks_ft: torch.Tensor, chunks_pr: torch.Tensor,
                              n: int) -> torch.LongTensor:
    """**[ours]** Long prompts (--max_token_length 150/225) are encoded in 77-token chunks, each on its own: a
    chunk whose ids (as the encoder gets them, `chunks_*`: (n * 77,)) are the same in c* and c gives the same
    states at the same columns, so its columns map to themselves. The diff of the whole sequences shifted them by
    the identifier's removal (a short caption's padding chunks, half or two thirds of the token axis, were compared
    with their neighbours). The last chunk also owns the context's final column."""
    from library.conditioning import CHUNK_LEN

    width = CHUNK_LEN - 2
    for k in range(n):
        if torch.equal(chunks_ft[k * CHUNK_LEN:(k + 1) * CHUNK_LEN], chunks_pr[k * CHUNK_LEN:(k + 1) * CHUNK_LEN]):
            start, stop = (0 if k == 0 else 1 + width * k), 1 + width * (k + 1)
            pi[start:stop] = torch.arange(start, stop)
            if k == n - 1:
                pi[-1] = len(pi) - 1
    return pi


def _identifier_and_class_ids(tok, class_tokens: str | None, prior_class_tokens: str | None):
    if class_tokens is None or not class_tokens.strip():
        return None, None
    prior = resolve_prior_class_tokens(class_tokens, prior_class_tokens)
    return _word_ids(tok, identifier_word(class_tokens, prior)), _word_ids(tok, prior)

