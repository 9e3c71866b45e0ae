"""color_aug (library/image_aug.py): sd-scripts' probabilities and ranges, the gamma on [0, 1] values, drawn from
the item's generator so that runs repeat; refused with cached latents."""
import colorsys
import random

import numpy as np
import pytest
from PIL import Image

from library.config_util import ConfigError
from library.image_aug import color_aug
from tests.test_dataset import group, img


def _branch(seed):
    r = random.Random(seed)
    if r.random() > 0.33:
        return "none", None
    if r.random() > 0.5:
        return "hue", r.uniform(-8 / 180, 8 / 180)
    return "gamma", r.uniform(0.95, 1.05)


def test_gamma_and_hue_against_hand_computed_values():
    seeds = {kind: next(s for s in range(1000) if _branch(s)[0] == kind) for kind in ("none", "hue", "gamma")}
    grey = Image.new("RGB", (4, 4), (128, 64, 250))
    assert color_aug(grey, random.Random(seeds["none"])) is grey

    g = _branch(seeds["gamma"])[1]
    out = np.asarray(color_aug(grey, random.Random(seeds["gamma"])))[0, 0]
    assert out.tolist() == [round(255 * (v / 255) ** g) for v in (128, 64, 250)]
    assert out.tolist() != [128, 64, 250] or abs(g - 1) < 1e-3

    shift = _branch(seeds["hue"])[1]
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    out = np.asarray(color_aug(red, random.Random(seeds["hue"])))[0, 0] / 255
    h, s, v = colorsys.rgb_to_hsv(*out)
    assert min(abs(h - shift % 1), 1 - abs(h - shift % 1)) < 2 / 256 and s > 0.98 and v > 0.98


def test_probabilities_follow_sd_scripts():
    rng = random.Random(0)
    base = Image.new("RGB", (2, 2), (120, 60, 200))
    changed = sum(color_aug(base, rng) is not base for _ in range(6000))
    assert 0.30 < changed / 6000 < 0.36
    kinds = [_branch(s)[0] for s in range(6000)]
    assert abs(kinds.count("hue") - kinds.count("gamma")) < 200


def test_color_aug_in_a_dataset_repeats_per_seed_and_refuses_cached_latents(tmp_path):
    for i in range(6):
        img(tmp_path / "a" / f"{i}.png", seed=i)
    sub = {"image_dir": str(tmp_path / "a"), "class_tokens": "sks dog"}
    plain = group([sub])
    aug, again = group([{**sub, "color_aug": True}]), group([{**sub, "color_aug": True}])
    batches = [[g[i]["images"] for i in range(len(g))] for g in (plain, aug, again)]
    assert all(np.array_equal(a, b) for a, b in zip(batches[1], batches[2]))  # same seed: same colours
    differ = sum(not np.array_equal(a, b) for a, b in zip(batches[0], batches[1]))
    assert 1 <= differ < 6  # about a third of the images change
    with pytest.raises(ConfigError, match="color_aug changes the image every step, so latents cannot be cached"):
        aug.cache_latents(None, 0.18215)


def test_every_seeds_branch_and_size_match_the_reference():
    """Per seed, color_aug does exactly what sd-scripts' draws say (_branch: none / hue / gamma, and its amount): a
    grey image shows the gamma (a hue shift leaves grey alone) and a red one the hue, as a fraction of the hue circle
    (PIL's HSV hue is 0-255 for 360 degrees). Guards the hue/gamma split and the hue's scale, which the averages above
    cannot see."""
    grey, red = Image.new("RGB", (2, 2), (128, 128, 128)), Image.new("RGB", (2, 2), (255, 0, 0))
    seen = {"none": 0, "hue": 0, "gamma": 0}
    for seed in range(400):
        kind, amount = _branch(seed)
        seen[kind] += 1
        g = np.asarray(color_aug(grey, random.Random(seed)))[0, 0].tolist()
        r = np.asarray(color_aug(red, random.Random(seed)))[0, 0] / 255
        if kind == "gamma":
            assert g == [round(255 * (128 / 255) ** amount)] * 3, seed
            assert r.tolist() == [1.0, 0.0, 0.0], seed  # 0 and 255 are fixed points of a gamma
        else:
            assert g == [128, 128, 128], seed
        if kind == "hue":
            h = colorsys.rgb_to_hsv(*r)[0]
            assert min(abs(h - amount % 1), 1 - abs(h - amount % 1)) < 2 / 256, (seed, h, amount)
    assert min(seen.values()) > 40
    big = [a for k, a in map(_branch, range(400)) if k == "hue" and abs(a) > 0.035]
    assert big  # shifts near the +-8/180 limit are among them: a wrong scale (x180 instead of x256) is 0.01 off
