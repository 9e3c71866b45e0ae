"""Per-sample caption processing (sd-scripts process_caption) and caption files."""
import random

import pytest

from library.captions import process_caption, read_caption_file, tag_frequency
from library.config_util import ConfigError, SubsetBlueprint

CAPTION = "sks dog, sitting, on grass, red collar, sunny"


def proc(caption=CAPTION, seed=0, epoch=1, **kw):
    return process_caption(SubsetBlueprint(**kw), caption, rng=random.Random(seed), epoch=epoch)


def test_plain_caption_unchanged():
    assert proc() == CAPTION
    assert proc("line one\nline two") == "line one"


def test_shuffle_with_keep_tokens_keeps_first_tokens():
    outs = [proc(seed=s, shuffle_caption=True, keep_tokens=1) for s in range(50)]
    tags = [t.strip() for t in CAPTION.split(",")]
    for out in outs:
        parts = out.split(", ")
        assert parts[0] == "sks dog" and sorted(parts) == sorted(tags)
    assert len(set(outs)) > 10  # really shuffled
    assert proc(seed=7, shuffle_caption=True, keep_tokens=1) == proc(seed=7, shuffle_caption=True, keep_tokens=1)
    two = {tuple(proc(seed=s, shuffle_caption=True, keep_tokens=2).split(", ")[:2]) for s in range(20)}
    assert two == {("sks dog", "sitting")}


def test_keep_tokens_separator():
    cap = "1girl, hatsune miku ||| smile, long hair, twintails, skirt ||| masterpiece, best quality"
    outs = {proc(cap, seed=s, shuffle_caption=True, keep_tokens_separator="|||") for s in range(40)}
    assert len(outs) > 5
    for out in outs:
        parts = out.split(", ")
        assert parts[:2] == ["1girl", "hatsune miku"] and parts[-2:] == ["masterpiece", "best quality"]
        assert sorted(parts[2:-2]) == ["long hair", "skirt", "smile", "twintails"]
        assert "|||" not in out
    # without shuffle the order is kept and the separator does not reach the text encoder
    assert proc(cap, keep_tokens_separator="|||") == ("1girl, hatsune miku, smile, long hair, twintails, skirt, "
                                                      "masterpiece, best quality")


def test_caption_dropout_rate_over_many_draws():
    n = 4000
    dropped = sum(proc(seed=s, caption_dropout_rate=0.3) == "" for s in range(n))
    assert abs(dropped / n - 0.3) < 0.03
    assert all(proc(seed=s) != "" for s in range(50))


def test_caption_dropout_every_n_epochs():
    assert [proc(epoch=e, caption_dropout_every_n_epochs=2) == "" for e in (1, 2, 3, 4)] == [False, True, False, True]


def test_tag_dropout_rate():
    cap = ", ".join(f"t{i}" for i in range(10))
    kept = [len(proc(cap, seed=s, caption_tag_dropout_rate=0.5, keep_tokens=1).split(", ")) - 1 for s in range(500)]
    assert abs(sum(kept) / len(kept) - 4.5) < 0.3  # 9 droppable tags, half kept
    assert all(proc(cap, seed=s, caption_tag_dropout_rate=0.5, keep_tokens=1).startswith("t0") for s in range(50))


def test_wildcards_and_multiline():
    outs = {proc("a {red|blue} car, {{literal}}", seed=s, enable_wildcard=True) for s in range(30)}
    assert outs == {"a red car, {literal}", "a blue car, {literal}"}
    lines = {proc("first line\nsecond line", seed=s, enable_wildcard=True) for s in range(30)}
    assert lines == {"first line", "second line"}


def test_secondary_separator_prefix_suffix():
    assert proc("sks dog, red;;;blue;;;green collar", secondary_separator=";;;") == "sks dog, red,blue,green collar"
    out = proc("sks dog, grass", caption_prefix="photo of", caption_suffix=", 4k")
    assert out == "photo of sks dog, grass , 4k"  # joined with spaces, verbatim, like sd-scripts
    # secondary-separated tags stay one tag when shuffled
    outs = {proc("a;;;b, c, d", seed=s, shuffle_caption=True, secondary_separator=";;;") for s in range(30)}
    assert all("a,b" in o for o in outs) and len(outs) > 1


def test_dropout_happens_before_prefix_is_visible():
    assert proc(caption_prefix="x", caption_dropout_rate=1.0) == ""


def test_read_caption_file(tmp_path):
    img = tmp_path / "a.png"
    assert read_caption_file(str(img), ".txt", False) is None
    (tmp_path / "a.txt").write_text("first, tags\n\nsecond line\n", encoding="utf-8")
    assert read_caption_file(str(img), ".txt", False) == "first, tags"
    assert read_caption_file(str(img), ".txt", True) == "first, tags\nsecond line"
    (tmp_path / "a.caption").write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a\.caption is empty"):
        read_caption_file(str(img), ".caption", False)
    (tmp_path / "a.bin").write_bytes(b"\xff\xfe\xfa caption")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_caption_file(str(img), ".bin", False)


def test_caption_file_of_a_face_crop_and_line_ends(tmp_path):
    """A face-box name (<name>_<cx>_<cy>_<w>_<h>, sd-scripts' detect_face_rotate.py) without its own caption file
    reads the original's, as sd-scripts' read_caption; a name whose last four parts are not numbers does not.
    Lines end only at \\n, \\r\\n and \\r, as Python's text mode (sd-scripts) reads them: U+2028 stays inside."""
    (tmp_path / "girl.txt").write_text("sks girl, red dress")
    assert read_caption_file(str(tmp_path / "girl_256_200_120_140.png"), ".txt", False) == "sks girl, red dress"
    (tmp_path / "girl_256_200_120_140.txt").write_text("own caption")
    assert read_caption_file(str(tmp_path / "girl_256_200_120_140.png"), ".txt", False) == "own caption"
    (tmp_path / "my.txt").write_text("unrelated")
    assert read_caption_file(str(tmp_path / "my_photo_of_a_dog.png"), ".txt", False) is None
    (tmp_path / "u.txt").write_text("sks dog\u2028on a beach\x85sunset\r\nsecond\rthird", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "u.png"), ".txt", False) == "sks dog\u2028on a beach\x85sunset"
    assert read_caption_file(str(tmp_path / "u.png"), ".txt", True).split("\n")[1:] == ["second", "third"]


def test_tag_frequency():
    assert tag_frequency(["Sks dog, grass", "sks dog,  ", "grass"]) == {"sks dog": 2, "grass": 2}


# -- token warm-up (sd-scripts token_warmup_step / token_warmup_min) ---------------------------------------------------

WARM = "a, b, c, d, e"


def warm(step, caption=WARM, seed=0, max_train_steps=None, **kw):
    kw = {"keep_tokens": 1, "token_warmup_min": 1, "token_warmup_step": 4, **kw}
    return process_caption(SubsetBlueprint(**kw), caption, rng=random.Random(seed), epoch=1, step=step,
                           max_train_steps=max_train_steps)


def test_token_warmup_grows_the_flex_tokens_in_caption_order():
    # flex = b, c, d, e (4); kept = floor(step * (4 - 1) / 4) + 1 before step 4: 1, 1, 2, 3; then all
    assert [warm(s) for s in range(6)] == ["a, b", "a, b", "a, b, c", "a, b, c, d", WARM, WARM]
    assert warm(None) == WARM  # after the warm-up (validation, --debug_dataset)
    # token_warmup_min 0: floor(step * 4 / 4) + 0 = step flex tokens
    assert [warm(s, token_warmup_min=0) for s in (0, 1, 2, 3)] == ["a", "a, b", "a, b, c", "a, b, c, d"]
    # keep_tokens_separator: the fixed head and tail stay; flex = b, c, d, kept floor(step * 2 / 3) + 1
    cap = "x ||| b, c, d ||| z"
    assert [warm(s, cap, keep_tokens=0, keep_tokens_separator="|||", token_warmup_step=3) for s in range(4)] == \
        ["x, b, z", "x, b, z", "x, b, c, z", "x, b, c, d, z"]


def test_token_warmup_below_one_is_a_fraction_of_the_run():
    # 0.5 of 8 steps = 4 steps, as token_warmup_step = 4; 0.3 of 10 = 3: floor(step * 3 / 3) + 1
    assert [warm(s, token_warmup_step=0.5, max_train_steps=8) for s in range(5)] == [warm(s) for s in range(5)]
    assert [warm(s, token_warmup_step=0.3, max_train_steps=10) for s in range(4)] == \
        ["a, b", "a, b, c", "a, b, c, d", WARM]
    assert warm(0, token_warmup_step=0.05, max_train_steps=10) == WARM  # floor(0.5) = 0 steps: no warm-up
    with pytest.raises(ValueError, match="token_warmup_step = 0.5 is a fraction of the run"):
        warm(0, token_warmup_step=0.5)


def test_token_warmup_fraction_of_the_run_is_floored():
    """A fractional token_warmup_step is floor(fraction * max_train_steps) steps, as sd-scripts computes it, so the
    same config warms up for the same steps in both trainers; rounding would add a step of shortened captions.
    (0.5 alone cannot tell: Python rounds 0.5 down to 0, as floor does.)"""
    # 0.07 of 10 = 0.7: floor 0 steps, no warm-up (round would give 1 step: step 0 -> "a, b")
    assert 0.07 * 10 > 0.5
    assert warm(0, token_warmup_step=0.07, max_train_steps=10) == WARM
    # 0.35 of 10 = 3.5: floor 3 steps: kept = floor(step * (4 - 1) / 3) + 1 flex tokens = 1, 2, 3, then all at step 3
    # (round would give 4 steps, and step 3 would keep floor(3 * 3 / 4) + 1 = 3: "a, b, c, d")
    assert [warm(s, token_warmup_step=0.35, max_train_steps=10) for s in range(4)] == \
        ["a, b", "a, b, c", "a, b, c, d", WARM]


def test_shuffle_and_tag_dropout_draw_only_from_the_kept_tokens():
    for seed in range(20):
        flex = ["b", "c"]  # step 2 keeps two: the shuffle is of those alone
        random.Random(seed).shuffle(flex)
        assert warm(2, seed=seed, shuffle_caption=True) == "a, " + ", ".join(flex)
        rng = random.Random(seed)
        kept = [t for t in ["b", "c", "d"] if rng.random() >= 0.5]  # step 3 keeps three
        assert warm(3, seed=seed, caption_tag_dropout_rate=0.5) == ", ".join(["a"] + kept)
    assert {warm(2, seed=s, shuffle_caption=True) for s in range(20)} == {"a, b, c", "a, c, b"}


def test_without_token_warmup_the_step_changes_nothing():
    for kw in ({}, {"shuffle_caption": True, "keep_tokens": 1}, {"caption_tag_dropout_rate": 0.3},
               {"enable_wildcard": True, "caption_dropout_rate": 0.2}):
        for seed in range(10):
            plain = proc("a, {b|c}, d, e", seed=seed, **kw)
            at_step = process_caption(SubsetBlueprint(**kw), "a, {b|c}, d, e", rng=random.Random(seed), epoch=1,
                                      step=0, max_train_steps=5)
            assert at_step == plain


def test_deferred_captions_are_finished_with_their_own_seed():
    from library.captions import DeferredCaption, finish_captions

    sub = SubsetBlueprint(keep_tokens=1, token_warmup_step=4, shuffle_caption=True)
    deferred = DeferredCaption(sub, WARM, 1, "seed/0")
    batch = {"captions": [deferred, "done already"]}
    assert finish_captions(batch, 2)["captions"] == [
        process_caption(sub, WARM, rng=random.Random("seed/0"), epoch=1, step=2), "done already"]
    assert len(batch["captions"][0].split(", ")) == 3
    assert finish_captions({"captions": [deferred]})["captions"][0].split(", ")[0] == "a"  # None: all five
    assert len(finish_captions({"captions": [deferred]})["captions"][0].split(", ")) == 5
