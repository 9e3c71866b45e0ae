"""`--weighted_captions`: A1111-style attention in captions, as sd-scripts reads it.

`(words)` weighs the words' tokens x1.1, `[words]` /1.1, `(words:1.5)` x1.5; brackets nest and multiply;
`\\(`, `\\)`, `\\[`, `\\]` are literal brackets. Each weighted segment is tokenized on its own (so "a (red)dog"
gives the tokens of "red" and "dog", as in sd-scripts), and the text encoders' output at each token position is
multiplied by that token's weight (sd-scripts' current rule: no renormalisation of the mean; BOS, EOS and padding
keep 1). The pooled output (SDXL) is left as it is.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

# sd-scripts' re_attention (captions and sampling): `(word:1.5)` only; A1111 also reads `(word: 1.5 )`, which
# sd-scripts trains as the text "word: 1.5" at x1.1, and so does this
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_weights(text: str) -> list[tuple[str, float]]:
    """"a (b:1.5) [c]" -> [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]: segments and their weights, runs of
    equal weight merged. An unclosed bracket weighs everything after it; a stray closing one is kept as text."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for seg in res[start:]:
            seg[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_number(weight):
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            res.append([tok, 1.0])
    for pos in round_open:
        multiply(pos, ROUND)
    for pos in square_open:
        multiply(pos, SQUARE)
    merged: list[list] = []
    for seg in res:
        if merged and merged[-1][1] == seg[1]:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def weighted_ids(tokenizer, captions: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), each (B, length): BOS, the tokens of every segment (cut at length - 2), EOS, then padding,
    laid out as the tokenizer lays out the plain caption with padding="max_length" and truncation; weights are 1
    at BOS, EOS and padding."""
    ids = torch.full((len(captions), length), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.ones((len(captions), length), dtype=torch.float32)
    for row, caption in enumerate(captions):
        toks: list[int] = []
        ws: list[float] = []
        for text, w in parse_weights(caption):
            t = tokenizer(text, add_special_tokens=False).input_ids if text else []
            toks += t
            ws += [w] * len(t)
        toks, ws = toks[: length - 2], ws[: length - 2]
        ids[row, 0] = tokenizer.bos_token_id
        ids[row, 1 : 1 + len(toks)] = torch.tensor(toks, dtype=torch.long)
        ids[row, 1 + len(toks)] = tokenizer.eos_token_id
        weights[row, 1 : 1 + len(ws)] = torch.tensor(ws, dtype=torch.float32)
    return ids, weights


def token_count(tokenizer, caption: str) -> int:
    """How many tokens the caption's text takes once its attention syntax is read (BOS/EOS not counted)."""
    return sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text, _ in parse_weights(caption) if text)
