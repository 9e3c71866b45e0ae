"""Toy world (issue 4): the generator's ground truth, captions in the CLIP vocabulary, the bundled judge."""
import os

import numpy as np
import pytest

from bench.toyworld import world as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bbox(mask, thr=0.5):
    ys, xs = np.nonzero(mask > thr)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


# ------------------------------------------------------------------------------------------------ backgrounds
def test_background_pixel_statistics():
    stats = {}
    for bg in W.BACKGROUNDS:
        arrs = [W.background_array(bg, np.random.default_rng(i)) for i in range(6)]
        mean = np.mean([a.mean((0, 1)) for a in arrs], 0)
        std = np.mean([a.std((0, 1)).mean() for a in arrs])
        stats[bg] = (mean, std)
    r, g, b = stats["grass"][0]
    assert g > r + 40 and g > b + 40
    assert stats["snow"][0].min() > 215 and stats["snow"][0][2] >= stats["snow"][0][0]
    r, g, b = stats["sand"][0]
    assert r > g > b + 30 and b > 100
    r, g, b = stats["water"][0]
    assert b > g > r + 30
    r, g, b = stats["brick"][0]
    assert r > g + 60 and stats["brick"][1] > 15  # mortar lines: a lot of texture
    night = stats["night"][0]
    assert night.max() < 75 and night.mean() < 45 and night[2] > night[0]  # dark blue
    assert stats["plain"][1] < 3 and stats["plain"][0].min() > 200  # plain: bright and flat
    for bg in ("grass", "sand", "water", "brick"):
        assert stats[bg][1] > 5, f"{bg} has no texture"
    # every background is told apart by its mean colour alone (nearest centroid on fresh samples)
    cents = {bg: m for bg, (m, _) in stats.items()}
    for bg in W.BACKGROUNDS:
        m = W.background_array(bg, np.random.default_rng(99)).mean((0, 1))
        assert min(cents, key=lambda k: np.abs(cents[k] - m).sum()) == bg


# ------------------------------------------------------------------------------------------------ objects
def test_object_bounding_box_in_its_cell_and_size():
    rng = np.random.default_rng(0)
    for i in range(len(W.CLASSES) * len(W.POSITIONS)):
        cls, pos = W.CLASSES[i % 6], W.POSITIONS[i // 6 % 9]
        size = W.SIZES[i % 3]
        scene = W.sample_scene(rng, cls=cls, position=pos, size=size, has_context=bool(i % 2),
                               pattern=W.PATTERNS[i % 4], priors=False)
        img, masks = W.render(scene, rng, return_masks=True)
        assert img.size == (64, 64) and img.mode == "RGB"
        x0, y0, x1, y1 = _bbox(masks["object"])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        c0, r0, c1, r1 = W.position_cell(pos)
        assert c0 <= cx < c1 and r0 <= cy < r1, (cls, pos, size, (cx, cy))
        ext = max(x1 - x0, y1 - y0)
        lo, hi = W.SIZE_PIXELS[size]
        assert lo * 0.8 <= ext <= hi + 2, (cls, size, ext)
        assert x0 >= 0 and y0 >= 0 and x1 <= 64 and y1 <= 64
        assert (masks["context"].max() > 0.5) == scene.has_context
        if scene.has_context:  # the person stands beside the object, mostly not on it
            overlap = (masks["context"] > 0.5) & (masks["object"] > 0.5)
            assert overlap.sum() < 0.2 * (masks["context"] > 0.5).sum()


def test_sizes_are_separated():
    rng = np.random.default_rng(1)
    ext = {s: [] for s in W.SIZES}
    for i in range(60):
        s = W.SIZES[i % 3]
        scene = W.sample_scene(rng, size=s, cls=W.CLASSES[i % 6], priors=False, has_context=False)
        _, masks = W.render(scene, rng, return_masks=True)
        x0, y0, x1, y1 = _bbox(masks["object"])
        ext[s].append(max(x1 - x0, y1 - y0))
    assert max(ext["small"]) < min(ext["medium"]) and max(ext["medium"]) < min(ext["large"])


def test_pattern_changes_only_the_object():
    rng = np.random.default_rng(3)
    scene = W.sample_scene(rng, cls="backpack", size="large", has_context=False, priors=False)
    a, ma = W.render(scene, np.random.default_rng(5), return_masks=True)
    b = W.render(W.Scene(**{**scene.__dict__, "pattern": "checker"}), np.random.default_rng(5))
    diff = np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).sum(-1) > 0
    assert diff.sum() > 40 and not (diff & (ma["object"] == 0)).any()


# ------------------------------------------------------------------------------------------------ priors
def test_prior_rates_match_configuration():
    rng = np.random.default_rng(7)
    n = 3000
    kites = [W.sample_scene(rng, cls="kite") for _ in range(n)]
    backpacks = [W.sample_scene(rng, cls="backpack") for _ in range(n)]
    boats = [W.sample_scene(rng, cls="boat") for _ in range(n)]
    balls = [W.sample_scene(rng, cls="ball") for _ in range(500)]
    for group in (kites, backpacks):
        rate = np.mean([s.has_context for s in group])
        assert abs(rate - W.CONTEXT_RATE) < 0.025
    assert abs(np.mean([s.background == "water" for s in boats]) - W.BOAT_WATER_RATE) < 0.025
    assert not any(s.has_context for s in balls)
    assert all(s.pattern == "none" for s in kites + boats + balls)
    # configurable
    assert np.mean([W.sample_scene(rng, cls="kite", context_rate=0.3).has_context for _ in range(2000)]) < 0.35
    # judge distribution: no priors
    assert abs(np.mean([W.sample_scene(rng, cls="boat", priors=False).background == "water"
                        for _ in range(2000)]) - 1 / 7) < 0.03


def test_pretraining_set_is_seeded_and_has_no_patterns():
    ims, caps, scenes = W.pretraining_set(24, seed=3)
    ims2, caps2, _ = W.pretraining_set(24, seed=3)
    assert caps == caps2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ims, ims2))
    im5, cap5, _ = W.pretraining_example(5, seed=3)
    assert cap5 == caps[5] and np.array_equal(np.asarray(im5), np.asarray(ims[5]))
    _, caps3, _ = W.pretraining_set(24, seed=4)
    assert caps3 != caps
    assert not any(s.has_subject_pattern for s in scenes)
    assert all("sks" not in c for c in caps)


# ------------------------------------------------------------------------------------------------ captions
def test_captions_use_whole_clip_tokens_only():
    from library.clip_tokenizer import bundled_clip_tokenizer

    tok = bundled_clip_tokenizer()
    vocab = W.vocabulary()
    assert len(vocab) <= 40
    for w in vocab:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == w + "</w>", w
    rng = np.random.default_rng(0)
    texts = [W.caption(W.sample_scene(rng), rng=rng) for _ in range(400)]
    texts += [p.prompt for p in W.eval_prompts(W.SubjectSpec())]
    texts += W.reference_set(W.SubjectSpec(), 0)[1]
    allowed = set(vocab)
    for t in texts:
        assert set(t.split()) <= allowed, t
        ids = tok(t).input_ids
        assert len(ids) == len(t.split()) + 2  # one token per word, + BOS/EOS


def test_caption_mentions_and_parse_back():
    rng = np.random.default_rng(2)
    seen = {k: 0 for k in W.MENTION_RATES}
    for _ in range(300):
        s = W.sample_scene(rng)
        full = W.parse_prompt(W.caption(s, mention="all"))
        assert full["cls"] == s.cls and full["size"] == s.size and full["colour"] == s.colour
        assert full["position"] == s.position and full["background"] == s.background
        assert full.get("context", False) == s.has_context
        c = W.caption(s, rng=rng)
        p = W.parse_prompt(c)
        assert p["cls"] == s.cls and all(p[k] == getattr(s, k) for k in ("size", "colour", "position",
                                                                          "background") if k in p)
        if s.cls == "boat" and s.background != "water":
            assert p["background"] == s.background  # "a boat" means a boat on water
        for k in seen:
            seen[k] += k in p
    assert all(v > 20 for v in seen.values()) and seen["size"] < 250  # random subsets
    assert W.caption(W.Scene("grass", "kite", "red"), mention=()) == "a kite"
    s = W.Scene("snow", "backpack", "blue", "top left", "small", has_context=True)
    assert W.caption(s, mention="all", identifier="sks") == \
        "a small blue sks backpack at the top left on snow with a person"
    assert W.parse_prompt("a small blue sks backpack at the top left on snow")["identifier"] == "sks"
    with pytest.raises(ValueError):
        W.caption(s)  # needs mention or rng


# ------------------------------------------------------------------------------------------------ subject
def test_subject_references_centred_large_plain_alone():
    subject = W.SubjectSpec()
    ims, caps = W.reference_set(subject, seed=0)
    assert len(ims) == subject.n_refs == 5 and caps == ["a sks backpack"] * 5
    assert len(W.reference_set(W.SubjectSpec(n_refs=4, cls="kite", pattern="stars"), 1)[0]) == 4
    for im in ims:
        a = np.asarray(im, np.float32)
        fg = np.abs(a - np.median(a.reshape(-1, 3), 0)).sum(-1) > 30  # everything that is not the backdrop
        x0, y0, x1, y1 = _bbox(fg.astype(np.float32))
        assert abs((x0 + x1) / 2 - 32) <= 3 and abs((y0 + y1) / 2 - 32) <= 3  # centred
        assert max(x1 - x0, y1 - y0) >= W.SIZE_PIXELS["large"][0] - 1  # large
        assert (x1 - x0) <= 32 and (y1 - y0) <= 33  # one object, no person beside it
        border = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[:, :4].reshape(-1, 3)])
        assert border.std(0).max() < 4 and border.mean() > 200  # plain backdrop
        inner = a[y0 + 5 : y1 - 3, x0 + 4 : x1 - 4]
        assert ((inner.min(-1) > 200).sum()) > 30  # the checker's white cells inside the (blue) backpack
    assert not np.array_equal(np.asarray(ims[0]), np.asarray(ims[1]))  # not five copies


def test_eval_prompts_cover_the_attributes():
    subject = W.SubjectSpec()
    ps = W.eval_prompts(subject)
    subj = [p for p in ps if p.kind == "subject"]
    cls = [p for p in ps if p.kind == "class"]
    assert len(subj) == len(cls) and all("sks" in p.prompt for p in subj) and not any("sks" in p.prompt for p in cls)
    named = {k: {p.expected[k] for p in subj if k in p.expected} for k in ("background", "position", "size")}
    assert named["background"] == set(W.BACKGROUNDS) - {"plain"}
    assert len(named["position"]) >= 6 and named["size"] >= {"small", "medium"}
    assert any(p.expected["colour"] != subject.colour for p in subj)
    assert all(p.expected["pattern"] == "checker" and p.expected["cls"] == "backpack" for p in subj)
    assert "a backpack" in [p.prompt for p in cls] and all("pattern" not in p.expected for p in cls)
    assert {p.prompt for p in ps if p.kind == "other"} == {"a kite", "a boat"}
    custom = W.eval_prompts(W.SubjectSpec(cls="kite", identifier="sks", prompts=("a sks kite on snow",)))
    assert [p.prompt for p in custom if p.kind == "subject"] == ["a sks kite on snow"]
    with pytest.raises(ValueError):
        W.SubjectSpec(pattern="none")
    with pytest.raises(ValueError):
        W.SubjectSpec(cls="car")


# ------------------------------------------------------------------------------------------------ judge
def test_bundled_judge_loads_small_and_accurate():
    from bench.toyworld import judge as J

    path = os.path.join(ROOT, "bench", "toyworld", "judge.safetensors")
    assert os.path.getsize(path) < 2_000_000
    judge = J.load(path)
    acc = J.held_out_accuracy(judge, n=300, seed=2024)
    assert min(acc.values()) >= 0.97, J.format_accuracy(acc, 300)
    ims, _ = W.reference_set(W.SubjectSpec(), 0)
    pred = judge.predict(ims)
    assert pred["cls"] == ["backpack"] * 5 and pred["pattern"] == ["checker"] * 5
    assert pred["background"] == ["plain"] * 5 and pred["position"] == ["center"] * 5
    assert pred["size"] == ["large"] * 5 and pred["context"] == [False] * 5
    f = judge.features(ims)
    assert tuple(f.shape) == (5, J.FEATURE_DIM)
    small = [im.resize((32, 32)) for im in ims]  # other sizes are resized
    assert judge.predict(small)["cls"] == ["backpack"] * 5


def test_judge_training_is_seeded_and_round_trips(tmp_path):
    import torch

    from bench.toyworld import judge as J

    a = J.train_judge(steps=2, seed=5, batch_size=6, workers=0, log=None)
    b = J.train_judge(steps=2, seed=5, batch_size=6, workers=1, log=None)  # a render process: same batches
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    path = J.save(a, str(tmp_path / "j.safetensors"), {"note": "test"})
    c = J.load(path)
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(c.features(x), a.float().features(x), atol=0.05, rtol=0.05)  # fp16 weights
    with pytest.raises(FileNotFoundError):
        J.load(str(tmp_path / "missing.safetensors"))
