"""The one reader of the text files users write: dataset configs, captions, prompt files, metadata JSON.

Windows editors save UTF-8 with a byte-order mark and PowerShell 5's `>` saves UTF-16: both are read, the mark
dropped. Anything else (cp1252, Shift-JIS, ...) is an error naming the file and the first bad byte: guessing a legacy
code page would train on mojibake without anyone noticing.
"""
from __future__ import annotations

import os

_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def decode_text(data: bytes, path, what: str, error: type[Exception] = ValueError) -> str:
    """A file's bytes -> text (see the module docstring); `error` is raised, naming `what` and `path`."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding).lstrip("\ufeff")
    except UnicodeDecodeError as e:
        kind = "UTF-16 (it starts with a UTF-16 byte-order mark)" if encoding == "utf-16" else "UTF-8 text"
        raise error(f"{what} {path} is not UTF-8 text: it is not valid {kind} at byte {e.start} "
                    f"(0x{data[e.start]:02x}); it was probably saved in a legacy encoding such as cp1252 or "
                    f"Shift-JIS. Re-save it as UTF-8 (in your editor: Save As, encoding UTF-8; or "
                    f"iconv -f cp1252 -t utf-8).") from None


def read_text(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> str:
    """The text of a user's file; unreadable or undecodable, `error` naming `what` and `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"{what} {path}: cannot read it ({e.strerror}).") from None
    return decode_text(data, path, what, error)
