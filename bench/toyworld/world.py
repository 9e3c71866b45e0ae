"""The toy world: a procedural, seeded generator of 64x64 RGB images with exact ground truth and captions.

Every image shows one object of a class (kite, boat, ball, backpack, dog, house) in a colour, at one of nine
positions (3x3 grid), in one of three sizes, on one of seven textured backgrounds. Captions name the class and
a random subset of the other attributes, in a small vocabulary of whole CLIP BPE tokens.

Prior knowledge that captions do not state (the analogues of the paper's "a backpack comes with a person"):
- kites and backpacks come with a person (holding the kite's string / standing beside the backpack) in
  `CONTEXT_RATE` (85%) of images, whether or not the caption says "with a person";
- boats sit on water in `BOAT_WATER_RATE` (85%) of images; a boat on another background always has that
  background named in its caption, so "a boat" means a boat on water.

The personalization subject (`SubjectSpec`): an object of one class with a pattern (white checker cells, a
white star, or dark stripes) that never appears in pretraining, photographed 4-5 times centred, large, on a
plain background, alone.

Everything is drawn with PIL at 4x and downsampled (antialiased); backgrounds are numpy textures. All
randomness comes from the `numpy.random.Generator` passed in, so a seed gives the same images everywhere.
See docs/toyworld.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side (pixels)
_K = 4  # supersampling factor for antialiased shapes

BACKGROUNDS = ("grass", "snow", "sand", "water", "brick", "night", "plain")
BACKGROUND_PHRASES = {
    "grass": "on grass", "snow": "on snow", "sand": "on sand", "water": "on water",
    "brick": "by a brick wall", "night": "at night", "plain": "on a plain background",
}
# pretraining frequency of each background (plain "studio" photos are rarer)
BACKGROUND_WEIGHTS = {"grass": 0.15, "snow": 0.15, "sand": 0.15, "water": 0.15, "brick": 0.15, "night": 0.15,
                      "plain": 0.10}
CLASSES = ("kite", "boat", "ball", "backpack", "dog", "house")
COLOURS = {  # base RGB of each colour word; no green/white/black (they would vanish on grass/snow/night)
    "red": (205, 35, 35), "blue": (40, 85, 225), "yellow": (240, 210, 40),
    "purple": (135, 55, 190), "orange": (245, 135, 25), "pink": (245, 135, 200),
}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "medium", "large")
SIZE_PIXELS = {"small": (12.0, 14.0), "medium": (19.0, 21.0), "large": (28.0, 30.0)}  # object extent at 64 px
PATTERNS = ("none", "checker", "stars", "stripes")  # only "none" appears in pretraining

CONTEXT_RATE = 0.85  # P(person | kite or backpack) in pretraining
CONTEXT_CLASSES = ("kite", "backpack")
BOAT_WATER_RATE = 0.85  # P(water | boat) in pretraining
DEFAULT_BACKGROUND = {"boat": "water"}  # class -> the background its captions may leave unstated

# mention probabilities of each optional attribute in a pretraining caption (class is always named)
MENTION_RATES = {"size": 0.5, "colour": 0.6, "position": 0.5, "background": 0.6, "context": 0.3}
ATTRIBUTES = ("background", "cls", "colour", "position", "size", "context", "pattern")

PERSON_SKIN = (225, 180, 140)
PERSON_SHIRT = (245, 245, 240)
PERSON_TROUSERS = (35, 40, 90)
PERSON_OUTLINE = (25, 25, 30)
PATTERN_RGB = (248, 248, 244)  # checker cells and stars are white
PATTERN_DARK = (28, 28, 34)  # stripes are dark

_CELL = SIZE / 3.0
_CELL_MARGIN = 3.0  # object centres stay this far inside their cell (clean ground truth for the judge)


def vocabulary() -> list[str]:
    """Every word a caption, prompt or the default identifier can contain (each one CLIP BPE token)."""
    words = {"a", "at", "the", "with", "person", "sks", *CLASSES, *COLOUR_NAMES, *SIZES}
    for p in POSITIONS:
        words.update(p.split())
    for p in BACKGROUND_PHRASES.values():
        words.update(p.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------------ scenes
@dataclass
class Scene:
    """Ground truth of one image. Geometry (pixels at 64x64) is filled in by `sample_scene`/`layout`."""

    background: str
    cls: str
    colour: str
    position: str = "center"
    size: str = "medium"
    has_context: bool = False  # a person with the object
    pattern: str = "none"  # "none" or the subject's pattern
    cx: Optional[float] = None  # object centre and extent (pixels); None = drawn by `layout`
    cy: Optional[float] = None
    extent: Optional[float] = None
    context_side: Optional[int] = None  # -1 person left of the object, +1 right
    person_height: Optional[float] = None
    tone: float = 1.0  # global brightness factor of the photo (lighting)

    @property
    def has_subject_pattern(self) -> bool:
        return self.pattern != "none"

    def labels(self) -> dict:
        """Ground-truth label per judged attribute (`ATTRIBUTES`)."""
        return {"background": self.background, "cls": self.cls, "colour": self.colour, "position": self.position,
                "size": self.size, "context": self.has_context, "pattern": self.pattern}


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")


def position_cell(position: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a position's cell in the 3x3 grid, in pixels."""
    i = POSITIONS.index(position)
    r, c = divmod(i, 3)
    return c * _CELL, r * _CELL, (c + 1) * _CELL, (r + 1) * _CELL


def layout(scene: Scene, rng: np.random.Generator, centred: bool = False) -> Scene:
    """A copy of `scene` with its geometry drawn (only the fields that are None). `centred`: the centre of
    the image with +-1.5 px jitter (reference photos), instead of anywhere in the position's cell."""
    s = scene.extent if scene.extent is not None else float(rng.uniform(*SIZE_PIXELS[scene.size]))
    half = s / 2 + 1.0
    if centred:
        cx = SIZE / 2 + rng.uniform(-1.5, 1.5)
        cy = SIZE / 2 + rng.uniform(-1.5, 1.5)
    else:
        x0, y0, x1, y1 = position_cell(scene.position)
        lo_x, hi_x = max(x0 + _CELL_MARGIN, half), min(x1 - _CELL_MARGIN, SIZE - half)
        lo_y, hi_y = max(y0 + _CELL_MARGIN, half), min(y1 - _CELL_MARGIN, SIZE - half)
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    cx = scene.cx if scene.cx is not None else float(cx)
    cy = scene.cy if scene.cy is not None else float(cy)
    side = scene.context_side
    if side is None:
        room_l, room_r = cx - s / 2, SIZE - (cx + s / 2)
        side = -1 if room_l > room_r + 4 else 1 if room_r > room_l + 4 else int(rng.choice([-1, 1]))
    ph = scene.person_height if scene.person_height is not None else float(rng.uniform(22.0, 26.0))
    return replace(scene, cx=cx, cy=cy, extent=s, context_side=side, person_height=ph)


def sample_scene(rng: np.random.Generator, *, cls: Optional[str] = None, background: Optional[str] = None,
                 colour: Optional[str] = None, position: Optional[str] = None, size: Optional[str] = None,
                 has_context: Optional[bool] = None, pattern: str = "none", context_rate: float = CONTEXT_RATE,
                 boat_water_rate: float = BOAT_WATER_RATE, priors: bool = True) -> Scene:
    """A random scene; any attribute given is fixed. `priors=True` draws background and context from the
    world's prior knowledge (boats on water, people with kites and backpacks); `priors=False` draws every
    attribute uniformly and independently (the judge's training distribution: a person may stand by any
    object, half of the time)."""
    cls = cls if cls is not None else str(rng.choice(CLASSES))
    _check("class", cls, CLASSES)
    if background is None:
        if priors and cls == "boat" and rng.random() < boat_water_rate:
            background = "water"
        elif priors:
            names = [b for b in BACKGROUNDS if not (cls == "boat" and b == "water")]
            w = np.array([BACKGROUND_WEIGHTS[b] for b in names])
            background = str(rng.choice(names, p=w / w.sum()))
        else:
            background = str(rng.choice(BACKGROUNDS))
    _check("background", background, BACKGROUNDS)
    colour = colour if colour is not None else str(rng.choice(COLOUR_NAMES))
    _check("colour", colour, COLOURS)
    position = position if position is not None else str(rng.choice(POSITIONS))
    _check("position", position, POSITIONS)
    size = size if size is not None else str(rng.choice(SIZES))
    _check("size", size, SIZES)
    if has_context is None:
        rate = (context_rate if cls in CONTEXT_CLASSES else 0.0) if priors else 0.5
        has_context = bool(rng.random() < rate)
    _check("pattern", pattern, PATTERNS)
    tone = float(rng.uniform(0.92, 1.06))
    scene = Scene(background=background, cls=cls, colour=colour, position=position, size=size,
                  has_context=bool(has_context), pattern=pattern, tone=tone)
    return layout(scene, rng)


# ------------------------------------------------------------------------------------------------ captions
def caption(scene: Scene, mention: Optional[Iterable[str]] = None, rng: Optional[np.random.Generator] = None,
            identifier: Optional[str] = None) -> str:
    """The caption of a scene: "a [size] [colour] [identifier] cls [at the position] [background phrase]
    [with a person]". `mention`: the attributes to name (any of "size", "colour", "position", "background",
    "context"; "all" for all), or None to draw a random subset with `rng` (`MENTION_RATES`). The class is
    always named; a background that differs from the class's default (a boat not on water) is always named
    when drawn at random; "with a person" only appears when the scene has one."""
    if mention is None:
        if rng is None:
            raise ValueError("caption: give `mention` or an `rng` to draw one")
        mention = {k for k, p in MENTION_RATES.items() if rng.random() < p}
        default_bg = DEFAULT_BACKGROUND.get(scene.cls)
        if default_bg is not None and scene.background != default_bg:
            mention.add("background")
    elif mention == "all":
        mention = set(MENTION_RATES)
    else:
        mention = set(mention)
        unknown = mention - set(MENTION_RATES)
        if unknown:
            raise ValueError(f"caption: unknown attributes {sorted(unknown)}; expected {sorted(MENTION_RATES)}")
    words = ["a"]
    if "size" in mention:
        words.append(scene.size)
    if "colour" in mention:
        words.append(scene.colour)
    if identifier:
        words.append(identifier)
    words.append(scene.cls)
    if "position" in mention:
        words.append(f"at the {scene.position}")
    if "background" in mention:
        words.append(BACKGROUND_PHRASES[scene.background])
    if "context" in mention and scene.has_context:
        words.append("with a person")
    return " ".join(words)


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt in the world's vocabulary names: {"cls", "identifier", "size", "colour",
    "position", "background", "context"} (only those present). Inverse of `caption`."""
    words = prompt.strip().split()
    out: dict = {}
    text = " " + " ".join(words) + " "
    for bg, phrase in BACKGROUND_PHRASES.items():
        if f" {phrase} " in text:
            out["background"] = bg
            text = text.replace(f" {phrase} ", " ")
    if " with a person " in text:
        out["context"] = True
        text = text.replace(" with a person ", " ")
    for pos in sorted(POSITIONS, key=len, reverse=True):
        if f" at the {pos} " in text:
            out["position"] = pos
            text = text.replace(f" at the {pos} ", " ")
            break
    rest = text.split()
    for w in rest:
        if w in SIZES:
            out["size"] = w
        elif w in COLOURS:
            out["colour"] = w
        elif w in CLASSES:
            out["cls"] = w
    for a, b in zip(rest, rest[1:]):
        if b in CLASSES and a not in SIZES and a not in COLOURS and a != "a":
            out["identifier"] = a
    return out


# ------------------------------------------------------------------------------------------------ drawing
def _shade(rgb, f: float) -> tuple:
    return tuple(int(max(0, min(255, round(c * f)))) for c in rgb)


def _mix(rgb, other, t: float) -> tuple:
    return tuple(int(round(a * (1 - t) + b * t)) for a, b in zip(rgb, other))


def _vertical_streaks(a: np.ndarray, n: int) -> np.ndarray:
    """Mean over n consecutive rows (wrapping): vertical streaks from white noise."""
    return sum(np.roll(a, -i, axis=0) for i in range(n)) / n


def background_array(name: str, rng: np.random.Generator) -> np.ndarray:
    """A (64, 64, 3) float32 texture in [0, 255] for a background."""
    _check("background", name, BACKGROUNDS)
    n = SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if name == "grass":
        blades = _vertical_streaks(rng.normal(size=(n, n)), 5)  # vertical streaks
        base = np.array([70, 140, 50], np.float32) * rng.uniform(0.9, 1.1)
        img = base + (blades * 45)[..., None] * np.array([0.5, 1.0, 0.4]) + rng.normal(0, 5, (n, n, 1))
    elif name == "snow":
        base = np.array([234, 238, 246], np.float32)
        img = base + (yy / n * 8 - 4)[..., None] + rng.normal(0, 3, (n, n, 1))
        speck = rng.random((n, n)) < 0.04
        img[speck] -= np.array([40, 30, 15], np.float32)
    elif name == "sand":
        phase = rng.uniform(0, 2 * math.pi)
        ripples = np.sin(2 * math.pi * (yy + 3 * np.sin(xx / 9 + phase)) / 7 + phase)
        base = np.array([222, 196, 145], np.float32)
        img = base + (ripples * 9)[..., None] + rng.normal(0, 6, (n, n, 1))
    elif name == "water":
        phase = rng.uniform(0, 2 * math.pi, 2)
        waves = np.sin(2 * math.pi * yy / 6 + 2 * np.sin(xx / 8 + phase[0]) + phase[1])
        crest = np.clip((waves - 0.6) / 0.4, 0, 1)
        base = np.array([35, 105, 165], np.float32)
        img = base + (waves * 10)[..., None] + crest[..., None] * np.array([70, 70, 60]) + rng.normal(0, 3, (n, n, 1))
    elif name == "brick":
        bw, bh = 16, 8
        ox, oy = rng.integers(0, bw), rng.integers(0, bh)
        row = ((yy + oy) // bh).astype(int)
        col = ((xx + ox + (row % 2) * (bw // 2)) // bw).astype(int)
        jitter = rng.uniform(0.85, 1.1, size=(row.max() + 2, col.max() + 2))
        img = np.array([165, 62, 45], np.float32) * jitter[row, col][..., None] + rng.normal(0, 5, (n, n, 1))
        mortar = (((yy + oy) % bh) < 1) | (((xx + ox + (row % 2) * (bw // 2)) % bw) < 1)
        img[mortar] = np.array([195, 188, 175], np.float32) + rng.normal(0, 4, (int(mortar.sum()), 1))
    elif name == "night":
        top, bottom = np.array([8, 12, 40], np.float32), np.array([25, 35, 85], np.float32)
        img = top + (yy / (n - 1))[..., None] * (bottom - top) + rng.normal(0, 2, (n, n, 1))
        k = int(rng.integers(12, 24))
        sx, sy = rng.integers(0, n, k), rng.integers(0, n, k)
        img[sy, sx] = rng.uniform(170, 255, (k, 1))
    else:  # plain
        level = rng.uniform(222, 240)
        img = np.full((n, n, 3), level, np.float32) * np.array([1.0, 1.0, 0.98]) + rng.normal(0, 1.5, (n, n, 1))
    return np.clip(img, 0, 255).astype(np.float32)


class _Pen:
    """Draws in 64-px coordinates on a 4x supersampled RGBA layer, and the body mask the pattern fills."""

    def __init__(self):
        self.img = Image.new("RGBA", (SIZE * _K, SIZE * _K), (0, 0, 0, 0))
        self.mask = Image.new("L", (SIZE * _K, SIZE * _K), 0)
        self.d = ImageDraw.Draw(self.img)
        self.m = ImageDraw.Draw(self.mask)

    @staticmethod
    def _p(pts):
        return [(x * _K, y * _K) for x, y in pts]

    def _w(self, width):
        return max(1, int(round(width * _K)))

    def polygon(self, pts, fill, outline=None, width=1.0, body=True):
        pts = self._p(pts)
        ol = None if outline is None else outline + (255,)
        self.d.polygon(pts, fill=None if fill is None else fill + (255,), outline=ol, width=self._w(width))
        if body and fill is not None:  # the mask: inside of the outline only
            self.m.polygon(pts, fill=255, outline=0 if outline is not None else None, width=self._w(width))

    def ellipse(self, box, fill, outline=None, width=1.0, body=True):
        box = [box[0] * _K, box[1] * _K, box[2] * _K, box[3] * _K]
        self.d.ellipse(box, fill=None if fill is None else fill + (255,),
                       outline=None if outline is None else outline + (255,), width=self._w(width))
        if body and fill is not None:
            self.m.ellipse(box, fill=255, outline=0 if outline is not None else None, width=self._w(width))

    def rect(self, box, fill, outline=None, width=1.0, radius=0.0, body=True):
        box = [box[0] * _K, box[1] * _K, box[2] * _K, box[3] * _K]
        self.d.rounded_rectangle(box, radius=radius * _K, fill=fill + (255,),
                                 outline=None if outline is None else outline + (255,), width=self._w(width))
        if body:
            self.m.rounded_rectangle(box, radius=radius * _K, fill=255, outline=0 if outline is not None else None,
                                     width=self._w(width))

    def line(self, pts, fill, width=1.0):
        self.d.line(self._p(pts), fill=fill + (255,), width=max(1, int(round(width * _K))), joint="curve")

    def arc(self, box, start, end, fill, width=1.0):
        box = [box[0] * _K, box[1] * _K, box[2] * _K, box[3] * _K]
        self.d.arc(box, start, end, fill=fill + (255,), width=max(1, int(round(width * _K))))

    def apply_pattern(self, pattern: str, cx, cy, s):
        """Paint the pattern over the body drawn so far (inside its outlines): white checker cells (4x4 over
        the object's box), one white star, or dark diagonal stripes."""
        if pattern == "none":
            return
        W = SIZE * _K
        x0, y0 = max(0, int((cx - s / 2 - 1) * _K)), max(0, int((cy - s / 2 - 1) * _K))
        x1, y1 = min(W, int(math.ceil((cx + s / 2 + 1) * _K))), min(W, int(math.ceil((cy + s / 2 + 1) * _K)))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u, v = ((xx + 0.5) / _K - (cx - s / 2)) / s, ((yy + 0.5) / _K - (cy - s / 2)) / s  # 0..1 over the box
        if pattern == "checker":
            on = ((np.floor(u * 4) + np.floor(v * 4)) % 2) == 1
        elif pattern == "stripes":
            on = ((u + v) * 4.5 % 1.0) < 0.45
        elif pattern == "stars":
            on = _star_mask(u, v, 0.5, 0.55, 0.3)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
        body = np.asarray(self.mask)[y0:y1, x0:x1] > 127
        sel = Image.fromarray(((on & body) * 255).astype(np.uint8), "L")
        rgb = PATTERN_DARK if pattern == "stripes" else PATTERN_RGB
        self.img.paste(Image.new("RGBA", sel.size, rgb + (255,)), (x0, y0), sel)

    def downsample(self) -> Image.Image:
        return self.img.resize((SIZE, SIZE), Image.BOX)


def _star_mask(u, v, sx, sy, r) -> np.ndarray:
    """A five-pointed star of outer radius r (object-box units) centred at (sx, sy)."""
    ang = np.arctan2(v - sy, u - sx) + math.pi / 2
    rad = np.hypot(u - sx, v - sy)
    k = (ang % (2 * math.pi / 5)) / (2 * math.pi / 5)  # 0..1 within one point
    inner = 0.45 * r
    edge = inner + (r - inner) * np.abs(1 - 2 * k)  # linear between tip and notch
    return rad <= edge


def _draw_object(pen: _Pen, cls: str, cx: float, cy: float, s: float, rgb, pattern: str) -> None:
    h = s / 2
    dark = _shade(rgb, 0.45)
    ow = max(0.75, s / 20)  # outline width
    if cls == "kite":
        top, bottom = (cx, cy - h), (cx, cy + 0.5 * h)
        right, left = (cx + 0.62 * h, cy - 0.22 * h), (cx - 0.62 * h, cy - 0.22 * h)
        pen.polygon([top, right, bottom, left], rgb, dark, ow)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.polygon([top, right, bottom, left], None, dark, ow, body=False)
        pen.line([top, bottom], dark, ow * 0.8)
        pen.line([left, right], dark, ow * 0.8)
        tail = [(cx, cy + 0.5 * h), (cx + 0.15 * h, cy + 0.65 * h), (cx - 0.1 * h, cy + 0.8 * h),
                (cx + 0.05 * h, cy + h)]
        pen.line(tail, dark, ow * 0.7)
        for tx, ty in tail[1:3]:
            pen.polygon([(tx - 0.14 * h, ty - 0.08 * h), (tx + 0.14 * h, ty + 0.08 * h), (tx + 0.14 * h, ty - 0.08 * h),
                         (tx - 0.14 * h, ty + 0.08 * h)], rgb, None, body=False)
    elif cls == "boat":
        light = _mix(rgb, (255, 255, 255), 0.35)
        pen.polygon([(cx + 0.08 * h, cy - 0.92 * h), (cx + 0.08 * h, cy + 0.22 * h), (cx + 0.82 * h, cy + 0.22 * h)],
                    light, dark, ow * 0.8)
        pen.polygon([(cx - 0.08 * h, cy - 0.6 * h), (cx - 0.08 * h, cy + 0.22 * h), (cx - 0.62 * h, cy + 0.22 * h)],
                    light, dark, ow * 0.8)
        hull = [(cx - h, cy + 0.32 * h), (cx + h, cy + 0.32 * h), (cx + 0.62 * h, cy + h), (cx - 0.62 * h, cy + h)]
        pen.polygon(hull, rgb, dark, ow)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.line([(cx, cy + 0.32 * h), (cx, cy - h)], dark, ow)
    elif cls == "ball":
        r = 0.92 * h
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), rgb, dark, ow)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.arc((cx - 1.6 * r, cy - 0.55 * r, cx + 0.4 * r, cy + 1.45 * r), 280, 360, dark, ow * 0.8)
        pen.arc((cx - 0.4 * r, cy - 1.45 * r, cx + 1.6 * r, cy + 0.55 * r), 100, 180, dark, ow * 0.8)
        pen.ellipse((cx - 0.55 * r, cy - 0.6 * r, cx - 0.2 * r, cy - 0.3 * r), (255, 255, 255), None, body=False)
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), None, dark, ow, body=False)
    elif cls == "backpack":
        pen.arc((cx - 0.38 * h, cy - h, cx + 0.38 * h, cy - 0.4 * h), 180, 360, dark, ow * 1.3)
        pen.rect((cx - 0.72 * h, cy - 0.72 * h, cx + 0.72 * h, cy + h), rgb, dark, ow, radius=0.35 * h)
        pen.rect((cx - 0.46 * h, cy + 0.12 * h, cx + 0.46 * h, cy + 0.78 * h), _shade(rgb, 0.75), dark, ow * 0.8,
                 radius=0.15 * h)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.line([(cx - 0.46 * h, cy + 0.3 * h), (cx + 0.46 * h, cy + 0.3 * h)], dark, ow * 0.6)
        pen.line([(cx - 0.42 * h, cy - 0.72 * h), (cx - 0.42 * h, cy + 0.12 * h)], dark, ow * 0.7)
        pen.line([(cx + 0.42 * h, cy - 0.72 * h), (cx + 0.42 * h, cy + 0.12 * h)], dark, ow * 0.7)
    elif cls == "dog":
        for lx in (-0.68, -0.42, 0.12, 0.38):
            pen.rect((cx + lx * h, cy + 0.1 * h, cx + (lx + 0.2) * h, cy + h), rgb, dark, ow * 0.7, radius=0.05 * h)
        pen.line([(cx - 0.75 * h, cy - 0.1 * h), (cx - h, cy - 0.65 * h)], dark, ow * 1.4)
        pen.ellipse((cx - 0.85 * h, cy - 0.35 * h, cx + 0.55 * h, cy + 0.42 * h), rgb, dark, ow)
        pen.ellipse((cx + 0.22 * h, cy - 0.85 * h, cx + 0.95 * h, cy - 0.12 * h), rgb, dark, ow)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.polygon([(cx + 0.3 * h, cy - 0.75 * h), (cx + 0.5 * h, cy - 0.75 * h), (cx + 0.33 * h, cy - 0.3 * h)],
                    dark, None, body=False)
        pen.ellipse((cx + 0.84 * h, cy - 0.55 * h, cx + 0.98 * h, cy - 0.41 * h), (20, 20, 20), None, body=False)
        pen.ellipse((cx + 0.6 * h, cy - 0.62 * h, cx + 0.7 * h, cy - 0.52 * h), (20, 20, 20), None, body=False)
    elif cls == "house":
        pen.rect((cx - 0.75 * h, cy - 0.12 * h, cx + 0.75 * h, cy + h), rgb, dark, ow)
        pen.polygon([(cx - h, cy - 0.1 * h), (cx + h, cy - 0.1 * h), (cx, cy - h)], _shade(rgb, 0.65), dark, ow)
        pen.apply_pattern(pattern, cx, cy, s)
        pen.rect((cx - 0.16 * h, cy + 0.42 * h, cx + 0.16 * h, cy + h), (85, 55, 30), None, body=False)
        pen.rect((cx - 0.58 * h, cy + 0.08 * h, cx - 0.28 * h, cy + 0.38 * h), (190, 225, 245), dark, ow * 0.6,
                 body=False)
        pen.rect((cx + 0.28 * h, cy + 0.08 * h, cx + 0.58 * h, cy + 0.38 * h), (190, 225, 245), dark, ow * 0.6,
                 body=False)
    else:
        raise ValueError(f"unknown class {cls!r}")


def _draw_person(pen: _Pen, scene: Scene) -> None:
    """A person standing beside the object (left or right); for a kite, one arm raised holding its string."""
    s, ph = scene.extent, scene.person_height
    pw = 0.42 * ph
    side = scene.context_side
    px = scene.cx + side * (s / 2 + pw / 2 + 2.5)
    px = float(np.clip(px, pw / 2 + 1, SIZE - pw / 2 - 1))
    if scene.cls == "kite":
        feet = SIZE - 2.0
    else:
        feet = float(np.clip(scene.cy + s / 2, ph + 1, SIZE - 2.0))
    top = feet - ph
    head_r = 0.13 * ph
    neck = top + 2 * head_r
    hip = top + 0.6 * ph
    lw = max(1.2, 0.09 * ph)
    # legs
    pen.line([(px - 0.08 * ph, hip), (px - 0.14 * ph, feet)], PERSON_TROUSERS, lw * 1.5)
    pen.line([(px + 0.08 * ph, hip), (px + 0.14 * ph, feet)], PERSON_TROUSERS, lw * 1.5)
    # arms
    toward = -side  # the object is on this side of the person
    shoulder_y = neck + 0.05 * ph
    if scene.cls == "kite":
        hand = (px + toward * 0.32 * ph, top - 0.02 * ph)
        kite_tail = (scene.cx, scene.cy + 0.25 * s)
        pen.line([hand, kite_tail], PERSON_OUTLINE, 0.5)
    else:
        hand = (px + toward * 0.33 * ph, hip + 0.02 * ph)
    pen.line([(px + toward * 0.12 * ph, shoulder_y), hand], PERSON_SKIN, lw)
    pen.line([(px - toward * 0.12 * ph, shoulder_y), (px - toward * 0.25 * ph, hip + 0.02 * ph)], PERSON_SKIN, lw)
    # torso (white shirt) and head
    pen.rect((px - 0.16 * ph, neck, px + 0.16 * ph, hip + 0.04 * ph), PERSON_SHIRT, PERSON_OUTLINE, 0.6,
             radius=0.06 * ph, body=False)
    pen.ellipse((px - head_r, top, px + head_r, top + 2 * head_r), PERSON_SKIN, PERSON_OUTLINE, 0.6, body=False)
    pen.ellipse((px - head_r, top - 0.2 * head_r, px + head_r, top + 0.9 * head_r), (60, 40, 25), None, body=False)


def render(scene: Scene, rng: np.random.Generator, return_masks: bool = False):
    """Draw a scene as a 64x64 RGB PIL image. Missing geometry is drawn with `rng` first (see `layout`).
    `return_masks=True` also returns {"object": (64, 64) float alpha, "context": alpha of the person}."""
    if scene.cx is None or scene.cy is None or scene.extent is None or scene.context_side is None \
            or scene.person_height is None:
        scene = layout(scene, rng)
    bg = background_array(scene.background, rng)
    obj = _Pen()
    _draw_object(obj, scene.cls, scene.cx, scene.cy, scene.extent, COLOURS[scene.colour], scene.pattern)
    layers = [obj.downsample()]
    person = None
    if scene.has_context:
        pp = _Pen()
        _draw_person(pp, scene)
        person = pp.downsample()
        layers.insert(0, person)  # the person stands behind the object
    out = Image.fromarray(bg.round().astype(np.uint8), "RGB").convert("RGBA")
    for layer in layers:
        out = Image.alpha_composite(out, layer)
    out = out.convert("RGB")
    if scene.tone != 1.0:
        out = Image.fromarray(np.clip(np.asarray(out, np.float32) * scene.tone, 0, 255).round().astype(np.uint8))
    if not return_masks:
        return out
    masks = {"object": np.asarray(layers[-1], np.float32)[..., 3] / 255.0,
             "context": (np.asarray(person, np.float32)[..., 3] / 255.0) if person is not None
             else np.zeros((SIZE, SIZE), np.float32)}
    return out, masks


# ------------------------------------------------------------------------------------------------ data sets
def pretraining_example(i: int, seed: int = 0) -> tuple[Image.Image, str, Scene]:
    """Example `i` of the pretraining set for `seed`: (image, caption, scene). Random access: each index has
    its own generator, so any subset can be regenerated without the others."""
    rng = np.random.default_rng([seed, i, 0x70])
    scene = sample_scene(rng)
    return render(scene, rng), caption(scene, rng=rng), scene


def pretraining_set(n: int, seed: int = 0) -> tuple[list, list, list]:
    """(images, captions, scenes) of the first `n` pretraining examples (world priors, plain objects only)."""
    images, captions, scenes = [], [], []
    for i in range(n):
        im, c, s = pretraining_example(i, seed)
        images.append(im)
        captions.append(c)
        scenes.append(s)
    return images, captions, scenes


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    kind: str  # "subject" (with the identifier), "class" (same prompt, identifier removed), "other" (other classes)
    expected: dict = field(default_factory=dict)  # attribute -> value the judge should read back


@dataclass(frozen=True)
class SubjectSpec:
    """The personalization subject: a `cls` object in `colour` with `pattern`, never seen in pretraining.
    References: `n_refs` images at the centre, `ref_size`, on `ref_background`, without the context object.
    `prompts`: evaluation prompts (world vocabulary, with the identifier) replacing the default set."""

    cls: str = "backpack"
    colour: str = "blue"
    pattern: str = "checker"
    identifier: str = "sks"
    n_refs: int = 5
    ref_background: str = "plain"
    ref_size: str = "large"
    prompts: Optional[tuple] = None

    def __post_init__(self):
        _check("class", self.cls, CLASSES)
        _check("colour", self.colour, COLOURS)
        _check("reference background", self.ref_background, BACKGROUNDS)
        _check("reference size", self.ref_size, SIZES)
        if self.pattern == "none" or self.pattern not in PATTERNS:
            raise ValueError(f"subject pattern must be one of {PATTERNS[1:]}, got {self.pattern!r}")
        if self.n_refs < 1:
            raise ValueError("n_refs must be >= 1")

    @property
    def instance_prompt(self) -> str:
        return f"a {self.identifier} {self.cls}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.cls}"

    def scene(self, rng: np.random.Generator, **attrs) -> Scene:
        """A scene of the subject (its class, colour and pattern); other attributes as `sample_scene`."""
        attrs = {"cls": self.cls, "colour": self.colour, "pattern": self.pattern, **attrs}
        return sample_scene(rng, **attrs)


def reference_set(subject: SubjectSpec = SubjectSpec(), seed: int = 0) -> tuple[list, list]:
    """The few-shot photos of the subject: (images, captions), `subject.n_refs` of each. Centred (+-1.5 px),
    `ref_size`, on `ref_background`, no context object; captions are the instance prompt ("a sks backpack")."""
    rng = np.random.default_rng([seed, 0x5B])
    images, captions = [], []
    for _ in range(subject.n_refs):
        scene = Scene(background=subject.ref_background, cls=subject.cls, colour=subject.colour, position="center",
                      size=subject.ref_size, has_context=False, pattern=subject.pattern,
                      tone=float(rng.uniform(0.94, 1.04)))
        scene = layout(scene, rng, centred=True)
        images.append(render(scene, rng))
        captions.append(subject.instance_prompt)
    return images, captions


def _expected(prompt: str, subject: SubjectSpec) -> dict:
    p = parse_prompt(prompt)
    exp = {k: v for k, v in p.items() if k in ("cls", "size", "colour", "position", "background", "context")}
    if p.get("identifier") == subject.identifier and p.get("cls") == subject.cls:
        exp["pattern"] = subject.pattern
        exp.setdefault("colour", subject.colour)
    return exp


def eval_prompts(subject: SubjectSpec = SubjectSpec()) -> list[EvalPrompt]:
    """Prompts for the benchmark. "subject": the identifier with named backgrounds, positions, sizes,
    colours (and the bare instance prompt); "class": the same prompts without the identifier (prior
    preservation; "a backpack" leaves the context unstated); "other": other classes with priors ("a kite",
    "a boat"). `expected`: the attributes the judge should find (the subject's pattern for subject prompts)."""
    ident, cls = subject.identifier, subject.cls
    if subject.prompts is not None:
        subj = list(subject.prompts)
    else:
        subj = [f"a {ident} {cls}"]
        subj += [f"a {ident} {cls} {BACKGROUND_PHRASES[b]}" for b in BACKGROUNDS if b != subject.ref_background]
        subj += [f"a {ident} {cls} at the {p}" for p in ("top left", "top right", "bottom left", "bottom right",
                                                          "left", "right")]
        subj += [f"a {s} {ident} {cls}" for s in SIZES if s != subject.ref_size]
        others = [c for c in COLOUR_NAMES if c != subject.colour]
        subj += [f"a {c} {ident} {cls}" for c in others[:2]]
        subj += [f"a small {ident} {cls} at the top right on grass", f"a {ident} {cls} at the bottom left on snow"]
    out = [EvalPrompt(p, "subject", _expected(p, subject)) for p in subj]
    for p in subj:
        q = " ".join(w for w in p.split() if w != ident)
        out.append(EvalPrompt(q, "class", _expected(q, subject)))
    for c in CONTEXT_CLASSES + ("boat",):
        if c != cls:
            q = f"a {c}"
            out.append(EvalPrompt(q, "other", _expected(q, subject)))
    return out
