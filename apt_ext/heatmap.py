"""γ over timestep bins × training steps as a PNG (the paper's Fig. 6), drawn with PIL only.

Rows are bins (bin 0, the least noisy, at the top), columns are steps (resampled to at most `width`
columns), colour runs from dark blue (γ = 0, no overfitting) through green to yellow (γ = 1).
"""
from __future__ import annotations


import numpy as np
from PIL import Image, ImageDraw

_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """A viridis-like map of values in [0, 1] to uint8 RGB."""
    v = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    frac = (v - lo)[..., None]
    return (_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).round().astype(np.uint8)


def render_gamma_heatmap(history: list[tuple[int, list[float]]], width: int = 400, row_height: int = 18) -> Image.Image:
    """history: [(step, γ per bin), ...] in step order."""
    if not history:
        raise ValueError("no γ history to draw")
    steps = np.array([s for s, _ in history])
    gam = np.array([g for _, g in history], dtype=np.float64).T  # (bins, steps)
    n_bins, n = gam.shape
    cols = min(width, n)
    idx = np.linspace(0, n - 1, cols).round().astype(int)
    grid = np.repeat(np.repeat(colormap(gam[:, idx]), row_height, axis=0), max(1, width // cols), axis=1)
    left, top, bottom = 58, 22, 34
    img = Image.new("RGB", (left + grid.shape[1] + 70, top + grid.shape[0] + bottom), "white")
    img.paste(Image.fromarray(grid), (left, top))
    d = ImageDraw.Draw(img)
    d.text((left, 4), "APT overfitting indicator gamma per timestep bin", fill="black")
    for b in range(n_bins):
        d.text((4, top + b * row_height + 3), f"bin {b}", fill="black")
    y = top + grid.shape[0] + 4
    d.text((left, y), f"step {int(steps[0])}", fill="black")
    d.text((left + grid.shape[1] - 60, y), f"step {int(steps[-1])}", fill="black")
    bar_x = left + grid.shape[1] + 12
    bar = colormap(np.linspace(1, 0, grid.shape[0]))[:, None, :].repeat(14, axis=1)
    img.paste(Image.fromarray(bar), (bar_x, top))
    d.text((bar_x + 18, top - 2), "1", fill="black")
    d.text((bar_x + 18, top + grid.shape[0] - 10), "0", fill="black")
    return img


def save_gamma_heatmap(history, path: str) -> str:
    """Write the heatmap atomically (library/safe_io: a temp file of its own, then rename) and return the path.
    It replaces an existing one: it is written beside its LoRA file, after that file's overwrite check."""
    import io

    from library.safe_io import atomic_write_bytes

    buf = io.BytesIO()
    render_gamma_heatmap(history).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), overwrite=True)
    return path
