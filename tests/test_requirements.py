"""requirements.txt's lower bounds are the versions .ci/run_min_versions tests (.ci/min_versions.txt): a bound
raised or lowered in one file and not the other would make that run test something the requirements do not say."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _specs(path: str, op: str) -> dict:
    out = {}
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"([A-Za-z0-9_.-]+)\s*" + re.escape(op) + r"\s*([0-9][0-9.]*)", line.split("#")[0].strip())
            if m:
                out[m.group(1).lower()] = m.group(2)
    return out


def _norm(v: str) -> tuple:
    parts = [int(p) for p in v.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_min_versions_are_the_lower_bounds():
    lower = _specs("requirements.txt", ">=")
    pinned = _specs(".ci/min_versions.txt", "==")
    assert lower and pinned
    assert {k: _norm(v) for k, v in pinned.items()} == {k: _norm(v) for k, v in lower.items()}
