"""--weighted_captions (library/prompt_weights.py and the text paths that use it): the A1111 grammar, token ids
laid out as the plain tokenizer's, the context scaled at exactly the weighted tokens, APT's alignment unchanged,
and training that equals the unweighted run when no caption uses the syntax."""
import pytest
import torch
from safetensors.torch import load_file

from apt_ext.prompts import alignment_for_batch
from library.conditioning import encode_prompts, tokenize
from library.prompt_weights import parse_weights, weighted_ids
from library.tiny_models import build_tiny_model
from tests.test_train_e2e import _dataset, _train

R = 1.1


@pytest.mark.parametrize("text, expected", [
    ("a (b:1.5) [c]", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / R)]),
    ("a (red: 1.5) dog", [("a ", 1.0), ("red: 1.5", R), (" dog", 1.0)]),  # sd-scripts: no space before the number
    ("((x)) y", [("x", R * R), (" y", 1.0)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("\\(lit\\) (open", [("(lit) ", 1.0), ("open", R)]),  # escapes are text; an unclosed bracket weighs the rest
    ("stray) and ]", [("stray) and ]", 1.0)]),
    ("[[a]] b:", [("a", 1 / R / R), (" b:", 1.0)]),
    ("", [("", 1.0)]),
])
def test_grammar(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("which", [0, 1])  # SDXL's tokenizers: pad = EOS, and pad = "!" (id 0)
def test_ids_are_the_plain_tokenizers_and_weights_sit_on_the_weighted_tokens(which):
    tok = build_tiny_model("sdxl").tokenizers[which]
    plain = "a photo of sks dog, on grass"
    ref = tok([plain], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    ids, w = weighted_ids(tok, ["a photo of (sks dog:1.5), on [grass]"], 77)
    assert torch.equal(ids, ref)
    expected = torch.ones(77)
    expected[4:6] = 1.5  # BOS a photo of | sks dog | , on | grass
    expected[8] = 1 / R
    torch.testing.assert_close(w[0], expected)
    ids, w = weighted_ids(tok, ["a (red)dog"], 77)  # segments tokenized apart, as in sd-scripts
    red, dog = (tok(s, add_special_tokens=False).input_ids for s in ("red", "dog"))
    assert ids[0, 1:5].tolist() == tok("a", add_special_tokens=False).input_ids + red + dog + [tok.eos_token_id]
    long = ", ".join(["(x:2)"] * 100)  # cut at 75 tokens, EOS kept, like truncation
    ids, w = weighted_ids(tok, [long], 77)
    assert ids[0, -1] == tok.eos_token_id and w[0, 0] == 1 and w[0, -1] == 1 and set(w[0, 1:-1].tolist()) == {1.0, 2.0}


@pytest.mark.parametrize("arch, max_len", [("sd1", None), ("sdxl", None), ("sd1", 150)])
def test_context_is_scaled_at_the_weighted_tokens_only(arch, max_len):
    """Against the plain caption's encoding: positions of "sks dog" x1.5, the rest (and SDXL's pooled) equal; with
    150 tokens the weight lands on the second chunk's tokens too."""
    model = build_tiny_model(arch)
    pad = ", ".join(["grass"] * 40) + ", " if max_len else ""  # pushes "sks dog" into the second chunk
    plain, weighted = pad + "a photo of sks dog", pad + "a photo of (sks dog:1.5)"
    assert torch.equal(tokenize(model, [weighted], max_len, weighted=True)[0], tokenize(model, [plain], max_len)[0])
    with torch.no_grad():
        a = encode_prompts(model, [plain], max_token_length=max_len)
        b = encode_prompts(model, [weighted], max_token_length=max_len, weighted=True)
    ids = weighted_ids(model.tokenizers[0], [weighted], a.context.shape[1])[0][0]
    sks_dog = model.tokenizers[0]("sks dog", add_special_tokens=False).input_ids
    pos = [i for i in range(len(ids) - 1) if ids[i:i + 2].tolist() == sks_dog]
    assert len(pos) == 1 and (pos[0] > 76) == bool(max_len)
    scale = torch.ones(a.context.shape[1])
    scale[pos[0]:pos[0] + 2] = 1.5
    torch.testing.assert_close(b.context, a.context * scale[None, :, None])
    if arch == "sdxl":
        assert torch.equal(a.pooled, b.pooled)


def test_apt_alignment_reads_through_the_weights():
    tok = build_tiny_model("sd1").tokenizers
    plain = alignment_for_batch(tok, ["sks dog on grass"], ["dog on grass"], class_tokens=["sks dog"])
    weighted = alignment_for_batch(tok, ["(sks dog:1.2) on [grass]"], ["(dog:1.2) on [grass]"],
                                   class_tokens=["sks dog"], weighted=True)
    assert torch.equal(plain[0], weighted[0])


def _captioned(tmp_path, images, captions):
    import shutil

    d = tmp_path / "captioned"
    d.mkdir()
    for i, src in enumerate(sorted(p for p in __import__("pathlib").Path(images).iterdir())):
        shutil.copy(src, d / src.name)
        (d / (src.stem + ".txt")).write_text(captions[i % len(captions)])
    return str(d)


def test_training_with_weighted_captions(tiny, images, tmp_path):
    """Plain captions: --weighted_captions gives the same LoRA bit for bit. Weighted ones train with APT (text
    encoder LoRA) and with the text-encoder cache."""
    plain = _dataset(tmp_path, _captioned(tmp_path, images, ["sks dog, on grass", "sks dog"]), caption_extension=".txt")
    runs = {}
    for name, extra in (("off", ()), ("on", ("--weighted_captions",))):
        assert _train(tiny["sd1"], plain, tmp_path / name, "--apt", *extra) == 0
        runs[name] = load_file(str(tmp_path / name / "lora.safetensors"))
    assert runs["on"].keys() == runs["off"].keys() and all(torch.equal(runs["on"][k], runs["off"][k]) for k in runs["on"])

    (tmp_path / "w").mkdir()
    weighted = _dataset(tmp_path / "w", _captioned(tmp_path / "w", images, ["(sks dog:1.3), on [grass]", "((sks dog))"]),
                        caption_extension=".txt")
    assert _train(tiny["sd1"], weighted, tmp_path / "wt", "--apt", "--weighted_captions") == 0
    w = load_file(str(tmp_path / "wt" / "lora.safetensors"))
    assert not all(torch.equal(w[k], runs["on"][k]) for k in w)
    assert _train(tiny["sdxl"], weighted, tmp_path / "cached", "--apt", "--weighted_captions",
                  "--network_train_unet_only", "--cache_text_encoder_outputs") == 0


def test_the_trainer_scales_the_fine_tuned_and_the_class_prompts(tiny, images, tmp_path, monkeypatch):
    """The training step's text path (TrainContext.encode_text, used for c* and, through the base-text memo, for
    APT's c) applies the caption's weights: 1.3 on "sks dog" in c*, on "dog" in c."""
    import library.conditioning as cond_lib

    seen = []
    real = cond_lib.apply_token_weights

    def spy(cond, weights):
        seen.append(sorted({round(float(w), 4) for w in weights.flatten()}))
        return real(cond, weights)

    monkeypatch.setattr(cond_lib, "apply_token_weights", spy)
    weighted = _dataset(tmp_path, _captioned(tmp_path, images, ["(sks dog:1.3), on grass"]), caption_extension=".txt")
    assert _train(tiny["sd1"], weighted, tmp_path / "out", "--apt", "--weighted_captions") == 0
    assert seen and all(s == [1.0, 1.3] for s in seen)
    assert len(seen) >= 4  # three steps of c*, and c at least once (memoised)
