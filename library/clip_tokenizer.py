"""CLIP tokenizers built offline from the bundled BPE vocabulary.

A bare single-file checkpoint carries no tokenizer. Rather than download one, we rebuild the exact
`vocab.json`/`merges.txt` of openai/clip-vit-large-patch14 from the merge list shipped in
`library/clip/` (see its README for the licence).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache

from transformers import CLIPTokenizer

_VOCAB_GZ = os.path.join(os.path.dirname(__file__), "clip", "bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """The byte-level alphabet of CLIP/GPT-2: 256 printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def _vocab_texts() -> tuple[str, str]:
    """The text of vocab.json and merges.txt, built once per process from the bundled merge list."""
    with gzip.open(_VOCAB_GZ, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : _N_MERGES + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    return vocab_json, "#version: 0.2\n" + "\n".join(merges) + "\n"


def bundled_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """The SD CLIP tokenizer. SDXL's second tokenizer (OpenCLIP bigG) pads with "!" instead.

    CLIPTokenizer reads its vocabulary from files (transformers 4.x), so they are written to a temporary
    folder that is removed once the tokenizer has read them: a run leaves nothing behind in the temp dir.
    """
    vocab_json, merges_txt = _vocab_texts()
    with tempfile.TemporaryDirectory(prefix="apt_lora_clip_") as d:
        for name, text in (("vocab.json", vocab_json), ("merges.txt", merges_txt)):
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)
        return CLIPTokenizer(
            os.path.join(d, "vocab.json"),
            os.path.join(d, "merges.txt"),
            pad_token=pad_token,
            model_max_length=model_max_length,
        )
