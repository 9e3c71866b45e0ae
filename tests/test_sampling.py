"""library/sampling.py: sd-scripts prompt files, samplers, sampling with the live model, grids."""
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from library import sampling as S
from library.args_check import verify_args
from library.conditioning import encode_prompts
from library.sampling import (
    SAMPLERS,
    SamplePrompt,
    SamplingError,
    fixed_seed_grid,
    generate_images,
    make_sampler,
    parse_prompt_file,
    sample_images,
)
from library.tiny_models import build_tiny_model

NAME_RE = r"{name}_{num}_{idx:02d}_\d{{14}}{seed}\.png"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ---------------------------------------------------------------------------------------------- prompt files


def test_txt_prompt_file_all_options(tmp_path, caplog):
    path = write(tmp_path, "p.txt", "\n".join([
        "# a comment",
        "",
        "a photo of sks dog --n blurry, low quality --w 768 --h 100 --d 42 --s 28 --l 5.5 --ss euler_a",
        "  # an indented comment",
        "plain prompt",
        "big --W 30 --H 1030 --S 5000 --D -1 --L 9 --SS K_DPM_2_A",
        "few steps --s 0 --foo bar --g 3.5",
        "--n only negative",
    ]))
    with caplog.at_level(logging.WARNING, logger="library.sampling"):
        ps = parse_prompt_file(path)
    assert ps[0] == SamplePrompt("a photo of sks dog", "blurry, low quality", 768, 96, 42, 28, 5.5, "euler_a")
    assert ps[1] == SamplePrompt("plain prompt", None, 512, 512, None, 30, 7.5, None)
    assert ps[2] == SamplePrompt("big", None, 24, 1024, None, 1000, 9.0, "k_dpm_2_a")
    assert ps[3].steps == 1 and ps[3].prompt == "few steps"
    assert ps[4].prompt == "" and ps[4].negative_prompt == "only negative"
    assert len(ps) == 5
    assert "--foo bar" in caplog.text and f"{path}:7" in caplog.text  # unknown option: warning with file:line
    assert "--g" in caplog.text
    assert parse_prompt_file(path, default_size=1024)[1].width == 1024


def test_seed_zero_is_a_fixed_seed_and_only_negative_seeds_are_random(tmp_path):
    """`--d 0` (and seed = 0 in .toml/.json) is the fixed seed 0, as in sd-scripts: reading it as random gave a
    different sample at every save and no seed in the file name, so runs could not be compared. Only a negative
    seed (A1111's -1) draws a new one."""
    path = write(tmp_path, "p.txt", "a --d 0\nb --d -1\nc --d 1\n")
    assert [p.seed for p in parse_prompt_file(path)] == [0, None, 1]
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "a", "seed": 0}, {"prompt": "b", "seed": -1}]))
    assert [p.seed for p in parse_prompt_file(path)] == [0, None]
    assert S.sample_image_path("out", "x", 0, step=5, seed=0, timestamp="20250101000000") == os.path.join(
        "out", "sample", "x_000005_00_20250101000000_0.png")


def test_default_size_sets_both_sides_in_every_prompt_file_format(tmp_path):
    """`default_size=1024` (SDXL) is the width and the height of a prompt that gives neither, in .txt, .toml and
    .json alike; a prompt's own --w/--h (width/height) still wins. A 1024x512 default would sample SDXL at half
    height."""
    txt = write(tmp_path, "p.txt", "a dog\na cat --h 640\n")
    toml = write(tmp_path, "p.toml", '[[prompt.subset]]\nprompt = "a dog"\n[[prompt.subset]]\nprompt = "a cat"\nheight = 640\n')
    js = write(tmp_path, "p.json", json.dumps(["a dog", {"prompt": "a cat", "height": 640}]))
    for path in (txt, toml, js):
        got = [(p.width, p.height) for p in parse_prompt_file(path, default_size=1024)]
        assert got == [(1024, 1024), (1024, 640)], path


@pytest.mark.parametrize("line, message", [
    ("a dog --w abc", r"p\.txt:2: --w expects an integer"),
    ("a dog --l high", r"p\.txt:2: --l expects a number"),
    ("a dog --ss nosuch", r"p\.txt:2: unknown sampler 'nosuch'"),
    ("a dog --s", r"p\.txt:2: option --s needs a value"),
    ("a dog --h -8", r"p\.txt:2: --h must be positive"),
])
def test_txt_bad_line(tmp_path, line, message):
    path = write(tmp_path, "p.txt", "ok prompt\n" + line + "\n")
    with pytest.raises(SamplingError, match=message):
        parse_prompt_file(path)


@pytest.mark.parametrize("name", ["p.txt", "p.json"])
def test_a_prompt_file_not_in_utf8_is_named(tmp_path, name):
    """A cp1252 prompt file was a raw UnicodeDecodeError traceback (a BOM is fine, and UTF-16 from PowerShell)."""
    path = tmp_path / name
    path.write_bytes(("caf\xe9 dog" if name.endswith(".txt") else '["caf\xe9 dog"]').encode("cp1252"))
    with pytest.raises(SamplingError, match=rf"sample prompt file .*{name} is not UTF-8 text: .* at byte \d+ \(0xe9\).*"
                                            "Re-save it as UTF-8"):
        parse_prompt_file(path)
    for encoded in (("\ufeff" + ("a dog" if name.endswith(".txt") else '["a dog"]')).encode("utf-8"),
                    ("a dog" if name.endswith(".txt") else '["a dog"]').encode("utf-16")):
        path.write_bytes(encoded)
        assert [p.prompt for p in parse_prompt_file(path)] == ["a dog"]


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(SamplingError, match=r"nope\.txt: sample prompt file not found"):
        parse_prompt_file(tmp_path / "nope.txt")
    with pytest.raises(SamplingError, match=r"\.txt, \.toml or \.json"):
        parse_prompt_file(write(tmp_path, "p.yaml", "x"))


def test_toml_prompt_file(tmp_path):
    path = write(tmp_path, "p.toml", """
[prompt]
width = 1024
height = 768
scale = 7
sample_steps = 28
negative_prompt = "lowres"

[[prompt.subset]]
prompt = "a sks dog on the beach"
seed = 1

[[prompt.subset]]
prompt = "a sks dog in the snow"
width = 500
sample_sampler = "dpmsolver++"
negative_prompt = "blurry"
""")
    a, b = parse_prompt_file(path)
    assert a == SamplePrompt("a sks dog on the beach", "lowres", 1024, 768, 1, 28, 7.0, None)
    assert b == SamplePrompt("a sks dog in the snow", "blurry", 496, 768, None, 28, 7.0, "dpmsolver++")


def test_toml_errors(tmp_path):
    with pytest.raises(SamplingError, match=r"p\.toml:2:\d+: TOML syntax error in the sample prompt file"):
        parse_prompt_file(write(tmp_path, "p.toml", "[prompt]\nwidth = = 3\n"))
    with pytest.raises(SamplingError, match=r"no \[\[prompt.subset\]\]"):
        parse_prompt_file(write(tmp_path, "q.toml", "[prompt]\nwidth = 512\n"))
    with pytest.raises(SamplingError, match=r"r\.toml: \[\[prompt.subset\]\] #2: 'seed' expects an integer"):
        parse_prompt_file(write(tmp_path, "r.toml", '[[prompt.subset]]\nprompt="a"\n[[prompt.subset]]\nprompt="b"\nseed="x"\n'))
    with pytest.raises(SamplingError, match=r"#1: entry has no 'prompt'"):
        parse_prompt_file(write(tmp_path, "s.toml", "[[prompt.subset]]\nseed = 3\n"))


def test_json_prompt_file(tmp_path, caplog):
    path = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a dog", "negative_prompt": "cat", "width": 640, "height": 512, "seed": 7, "sample_steps": 20,
         "scale": 4, "sample_sampler": "heun", "enum": 0, "mystery": 1},
        "a cat --w 256 --d 3",
        {"prompt": "defaults", "steps": 12, "sampler": "ddim"},
    ]))
    with caplog.at_level(logging.WARNING, logger="library.sampling"):
        a, b, c = parse_prompt_file(path)
    assert a == SamplePrompt("a dog", "cat", 640, 512, 7, 20, 4.0, "heun")
    assert b == SamplePrompt("a cat", None, 256, 512, 3, 30, 7.5, None)
    assert c == SamplePrompt("defaults", None, 512, 512, None, 12, 7.5, "ddim")
    assert "mystery" in caplog.text and "enum" not in caplog.text


def test_json_errors(tmp_path):
    with pytest.raises(SamplingError, match=r"p\.json:2:\d+: invalid JSON"):
        parse_prompt_file(write(tmp_path, "p.json", '[\n {"prompt": }\n]'))
    with pytest.raises(SamplingError, match="expected a JSON list"):
        parse_prompt_file(write(tmp_path, "q.json", '{"prompt": "a"}'))
    with pytest.raises(SamplingError, match=r"r\.json: entry 1: expected a string or an object"):
        parse_prompt_file(write(tmp_path, "r.json", '["a", 3]'))
    with pytest.raises(SamplingError, match=r"s\.json: entry 0: --w expects an integer"):
        parse_prompt_file(write(tmp_path, "s.json", '["a --w x"]'))


# ---------------------------------------------------------------------------------------------- samplers


def test_lms_without_scipy_fails_before_training_naming_the_fix(monkeypatch, tmp_path):
    """requirements.txt does not install scipy, which diffusers' LMS scheduler needs: the flag, a prompt's --ss and
    make_sampler say so (found by a run in a fresh virtual environment, where k_lms failed at the first sample)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(SamplingError, match="the k_lms sampler .* needs scipy, which is not installed: pip install scipy"):
        make_sampler("k_lms")
    assert S.missing_sampler_package("euler_a") is None and make_sampler("euler_a") is not None
    f = tmp_path / "prompts.txt"
    f.write_text("a photo --ss lms\n", encoding="utf-8")
    with pytest.raises(SamplingError, match=r"prompts.txt.*1.*the lms sampler .* pip install scipy"):
        S.parse_prompt_file(str(f))
    from library.train_args import setup_parser

    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir",
                                      str(tmp_path), "--sample_prompts", str(f), "--sample_sampler", "k_lms"])
    from library.train_util import TrainingSetupError

    with pytest.raises(TrainingSetupError, match="--sample_sampler: the k_lms sampler .* pip install scipy"):
        verify_args(args)



@pytest.mark.parametrize("name", SAMPLERS)
def test_make_sampler_runs(name):
    if S.missing_sampler_package(name):  # LMS without scipy (a fresh install): the error says what to do
        with pytest.raises(SamplingError, match="needs scipy, which is not installed: pip install scipy"):
            make_sampler(name)
        return
    sched = make_sampler(name, v_parameterization=False)
    cfg = sched.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert cfg.prediction_type == "epsilon"
    assert getattr(cfg, "clip_sample", False) is False
    sched.set_timesteps(2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        kw = {"generator": g} if "generator" in S.inspect.signature(sched.step).parameters else {}
        x = sched.step(torch.randn(1, 4, 8, 8, generator=g), t, x, **kw).prev_sample
    assert torch.isfinite(x).all()


def test_ddim_samples_on_the_sd_timesteps_with_steps_offset_1():
    """The SD scheduler config has steps_offset 1, so 4 DDIM steps ("leading" spacing, 1000 // 4 = 250 apart) run at
    t = 751, 501, 251, 1, as diffusers' and A1111's SD pipelines do; offset 0 (750 ... 0) gives other samples than
    the ones users compare with."""
    sched = make_sampler("ddim", False)
    sched.set_timesteps(4)
    assert sched.config.steps_offset == 1 and sched.timesteps.tolist() == [751, 501, 251, 1]


def test_make_sampler_options():
    assert type(make_sampler("k_euler_a", False)).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(make_sampler("dpmsingle", False)).__name__ == "DPMSolverSinglestepScheduler"
    assert make_sampler("dpmsolver", False).config.algorithm_type == "dpmsolver"
    assert make_sampler("DPMSolver++", True).config.prediction_type == "v_prediction"
    assert make_sampler("ddim", False, clip_sample=True).config.clip_sample is True
    with pytest.raises(SamplingError, match="unknown sampler 'k_magic'"):
        make_sampler("k_magic", False)


# ---------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_model("sd1")


def _capture_calls(monkeypatch, cls, model, calls):
    original = cls.__call__

    def wrapper(self, *args, **kwargs):
        calls.append(dict(kwargs, _unet_training=model.unet.training, _te_training=model.text_encoders[0].training,
                          _scheduler=type(self.scheduler).__name__))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", wrapper)


def test_sample_images_sd1(sd1, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    calls = []
    _capture_calls(monkeypatch, StableDiffusionPipeline, sd1, calls)
    prompts = [SamplePrompt("a photo of sks dog", "blurry", 64, 64, seed=123, steps=2),
               SamplePrompt("a cat", None, 72, 64, seed=None, steps=2, sampler="euler_a")]
    sd1.unet.train()
    sd1.text_encoders[0].train()
    sd1.unet.conv_in.eval()  # a child with its own flag must get it back
    dropout = torch.nn.Dropout(0.5).train()
    rng_before = torch.get_rng_state()
    paths = sample_images(sd1, prompts, output_dir=str(tmp_path), output_name="mylora", step=250, clip_skip=2,
                          extra_modules=[dropout])
    assert torch.equal(torch.get_rng_state(), rng_before)
    # modes: eval during sampling, restored after (per child)
    assert [c["_unet_training"] for c in calls] == [False, False] and not calls[0]["_te_training"]
    assert sd1.unet.training and sd1.text_encoders[0].training and not sd1.unet.conv_in.training and dropout.training
    sd1.unet.eval()
    sd1.text_encoders[0].eval()
    # files
    assert len(paths) == 2 and all(os.path.dirname(p) == str(tmp_path / "sample") for p in paths)
    assert re.fullmatch(NAME_RE.format(name="mylora", num="000250", idx=0, seed="_123"), os.path.basename(paths[0]))
    assert re.fullmatch(NAME_RE.format(name="mylora", num="000250", idx=1, seed=""), os.path.basename(paths[1]))
    assert [Image.open(p).size for p in paths] == [(64, 64), (72, 64)]
    # the pipeline got our encoder's embeddings (clip_skip; short prompts: one chunk) and the prompt's settings
    with torch.no_grad():
        pos = encode_prompts(sd1, ["a photo of sks dog"], clip_skip=2).context
        neg = encode_prompts(sd1, ["blurry"], clip_skip=2).context
        neg_empty = encode_prompts(sd1, [""], clip_skip=2).context
    assert calls[0]["prompt_embeds"].shape == (1, 77, 32)
    torch.testing.assert_close(calls[0]["prompt_embeds"], pos)
    torch.testing.assert_close(calls[0]["negative_prompt_embeds"], neg)
    torch.testing.assert_close(calls[1]["negative_prompt_embeds"], neg_empty)
    assert (calls[0]["height"], calls[0]["width"], calls[0]["num_inference_steps"], calls[0]["guidance_scale"]) == (64, 64, 2, 7.5)
    assert calls[0]["_scheduler"] == "DDIMScheduler" and calls[1]["_scheduler"] == "EulerAncestralDiscreteScheduler"
    # the same seed gives the same image again (PNG is lossless)
    monkeypatch.undo()
    (again, seed), = generate_images(sd1, [prompts[0]], clip_skip=2)
    assert seed == 123
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(paths[0])))
    (other, _), = generate_images(sd1, [SamplePrompt("a photo of sks dog", "blurry", 64, 64, seed=124, steps=2)],
                                  clip_skip=2)
    assert not np.array_equal(np.asarray(other), np.asarray(again))


def test_sample_prompts_are_read_as_sd_scripts_sampling_reads_them():
    """Attention weights are applied with each sample's mean kept (sd-scripts' lpw pipelines), and a prompt takes
    the chunks the longer of it and its negative needs, up to 3 (225 tokens), whatever the run's max_token_length."""
    from library.conditioning import encode_ids, final_layer_norm, tokenize_weighted
    from library.sampling import encode_sample_prompts, prompt_chunks

    sd1 = build_tiny_model("sd1")
    with torch.no_grad():
        final_layer_norm(sd1.text_encoders[0]).bias.fill_(0.2)  # a context mean away from 0, as real CLIP's
        zero_mean = build_tiny_model("sd1")  # untrained LayerNorm: the mean is 0 up to rounding and stays as is
        z, _ = encode_sample_prompts(zero_mean, "a (dog:1.5)", "", clip_skip=2)
        assert torch.isfinite(z.context).all()
        pos, neg = encode_sample_prompts(sd1, "a photo of (sks:1.5) [dog]", "blurry", clip_skip=2)
        ids, weights = tokenize_weighted(sd1, ["a photo of (sks:1.5) [dog]"])
        plain = encode_ids(sd1, ids, clip_skip=2).context
    assert weights[0, 1:6].tolist() == pytest.approx([1, 1, 1, 1.5, 1 / 1.1])  # a photo of sks dog
    by_hand = plain * weights[..., None]
    by_hand = by_hand * plain.mean() / by_hand.mean()
    torch.testing.assert_close(pos.context, by_hand)
    torch.testing.assert_close(pos.context.mean(), plain.mean())  # the mean is kept ...
    ratio = pos.context[0, :, 0] / plain[0, :, 0]
    torch.testing.assert_close(ratio[4] / ratio[1], torch.tensor(1.5))  # ... and the weights' proportions
    torch.testing.assert_close(neg.context, encode_prompts(sd1, ["blurry"], clip_skip=2).context)  # none: unchanged
    long = " ".join(["dog"] * 80)
    assert [prompt_chunks(sd1, t) for t in (["a dog", ""], [long, ""], ["", long], [long * 4, "a"])] == [1, 2, 2, 3]
    with torch.no_grad():
        pos, neg = encode_sample_prompts(sd1, "a dog", long)
    assert pos.context.shape == neg.context.shape == (1, 154, 32)  # 77 * 2: every chunk's BOS and EOS kept


def test_sdxl_sample_weights_keep_each_text_encoders_mean():
    """SDXL: sd-scripts' lpw pipeline weights each encoder's states and restores each one's mean before they are
    concatenated; one mean over the concatenation scaled both by the same factor (1-4% off on a tiny model)."""
    from library.conditioning import encode_ids, tokenize_weighted
    from library.sampling import encode_sample_prompts

    xl = build_tiny_model("sdxl")
    with torch.no_grad():
        for te, bias in zip(xl.text_encoders, (0.2, -0.5)):  # means away from 0, and unlike
            for name, module in te.named_modules():
                if name.endswith("mlp.fc2"):  # added to the residual stream the context is taken from
                    module.bias.fill_(bias)
        pos, _ = encode_sample_prompts(xl, "a photo of a (red:1.5) dog, [blurry]", "")
        ids, weights = tokenize_weighted(xl, ["a photo of a (red:1.5) dog, [blurry]"])
        plain = encode_ids(xl, ids).context
    widths = [te.config.hidden_size for te in xl.text_encoders]
    for got, ref in zip(pos.context.split(widths, -1), plain.split(widths, -1)):
        by_hand = ref * weights[..., None]
        torch.testing.assert_close(got, by_hand * ref.mean() / by_hand.mean())


def test_long_sample_prompts_keep_every_chunk_bos_and_eos_as_the_lpw_pipelines():
    """A 2-chunk sample prompt is encoded as sd-scripts' lpw pipelines (and A1111, ComfyUI) encode it: each chunk
    <BOS> 75 ids <EOS> through the encoder, the 77-state outputs concatenated, the weights at the chunks'
    positions, the mean kept. Built here by hand from the tokenizer and the encoder."""
    from library.conditioning import final_layer_norm
    from library.sampling import encode_sample_prompts

    sd1 = build_tiny_model("sd1")
    tok, te = sd1.tokenizers[0], sd1.text_encoders[0]
    assert tok.pad_token_id == tok.eos_token_id  # SD1: padded with EOS
    with torch.no_grad():
        final_layer_norm(te).bias.fill_(0.2)  # a context mean away from 0
        words = tok(" ".join(["dog"] * 79) + " cat dog", add_special_tokens=False).input_ids
        assert len(words) == 81
        flat = [tok.bos_token_id] + words + [tok.eos_token_id] * (152 - 1 - len(words))
        chunks = torch.tensor([[tok.bos_token_id] + flat[1 + 75 * k: 76 + 75 * k] + [tok.eos_token_id]
                               for k in (0, 1)])
        plain = te(chunks).last_hidden_state.reshape(1, 154, -1)
        weights = torch.ones(1, 154)
        weights[0, 77 + 1 + (79 - 75)] = 1.5  # "cat", word 79: chunk 1, position 1 + 4 after its BOS
        by_hand = plain * weights[..., None]
        by_hand = by_hand * plain.mean() / by_hand.mean()
        pos, neg = encode_sample_prompts(sd1, " ".join(["dog"] * 79) + " (cat:1.5) dog", "")
        blank = te(torch.tensor([[tok.bos_token_id] + [tok.eos_token_id] * 76] * 2)).last_hidden_state
    torch.testing.assert_close(pos.context, by_hand)
    torch.testing.assert_close(neg.context, blank.reshape(1, 154, -1))  # the negative in as many chunks
    sdxl = build_tiny_model("sdxl")
    with torch.no_grad():
        pos, _ = encode_sample_prompts(sdxl, " ".join(["dog"] * 79) + " (cat:1.5) dog", "")
        first = encode_sample_prompts(sdxl, " ".join(["dog"] * 75), "")[0]  # the first chunk alone: its pooled
    assert pos.context.shape[:2] == (1, 154)
    torch.testing.assert_close(pos.pooled, first.pooled)  # SDXL's pooled output: the first chunk's


def test_sample_images_epoch_name_and_prompt_file(sd1, tmp_path):
    path = write(tmp_path, "p.txt", "a dog --w 64 --h 64 --s 1 --d 5 --ss dpmsolver++\n")
    (out,) = sample_images(sd1, path, output_dir=str(tmp_path / "out"), output_name=None, epoch=3, step=99)
    assert re.fullmatch(r"e000003_00_\d{14}_5\.png", os.path.basename(out))
    assert os.path.isfile(out)
    assert sample_images(sd1, [], output_dir=str(tmp_path), output_name="x") == []


def test_sample_errors_leave_state_alone(sd1, tmp_path):
    with pytest.raises(ValueError, match="device"):
        sample_images(sd1, [SamplePrompt("a", width=64, height=64, steps=1)], output_dir=str(tmp_path),
                      output_name="x", device="meta")
    with pytest.raises(SamplingError, match="unknown sampler"):
        sample_images(sd1, [SamplePrompt("a", width=64, height=64, steps=1)], output_dir=str(tmp_path),
                      output_name="x", sampler="nope")
    assert not os.path.exists(tmp_path / "sample")


def test_sample_images_sdxl(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    model = build_tiny_model("sdxl")
    calls = []
    _capture_calls(monkeypatch, StableDiffusionXLPipeline, model, calls)
    rng_before = torch.get_rng_state()
    (path,) = sample_images(model, [SamplePrompt("a photo of sks dog", steps=2, width=64, height=64, seed=9)],
                            output_dir=str(tmp_path), output_name="xl", step=1, sampler="k_euler")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert re.fullmatch(NAME_RE.format(name="xl", num="000001", idx=0, seed="_9"), os.path.basename(path))
    assert Image.open(path).size == (64, 64)
    with torch.no_grad():
        cond = encode_prompts(model, ["a photo of sks dog"])
        neg = encode_prompts(model, [""])
    torch.testing.assert_close(calls[0]["prompt_embeds"], cond.context)
    torch.testing.assert_close(calls[0]["pooled_prompt_embeds"], cond.pooled)
    torch.testing.assert_close(calls[0]["negative_pooled_prompt_embeds"], neg.pooled)
    assert calls[0]["_scheduler"] == "EulerDiscreteScheduler"


# ---------------------------------------------------------------------------------------------- grid


def test_fixed_seed_grid():
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 24), "blue")
    grid = fixed_seed_grid([[red, red, red], [blue, blue, blue]], ["prior", "LoRA"], col_labels=["1", "2", "3"])
    assert grid.mode == "RGB" and grid.height > 64 and grid.width > 96
    w_labels = grid.width - 96
    # the top-left cell of the image area is red, the bottom-right one blue
    header = grid.height - 64
    assert grid.getpixel((w_labels + 16, header + 16)) == (255, 0, 0)
    assert grid.getpixel((w_labels + 64 + 16, header + 32 + 16)) == (0, 0, 255)
    with pytest.raises(ValueError, match="labels"):
        fixed_seed_grid([[red]], ["a", "b"])


def test_grid_labels_draw_greek_where_the_system_has_a_font_for_it():
    """"APT, τ = 10": the label font draws τ as a glyph, not as the missing-glyph box (Pillow's default font)."""
    from PIL import ImageFont

    from library.sampling import LABEL_FONTS, label_font

    def loads(name):
        try:
            return ImageFont.truetype(name, 11)
        except OSError:
            return None

    if not any(loads(name) for name in LABEL_FONTS):
        pytest.skip(f"none of {LABEL_FONTS} on this system")
    font = label_font()

    def mask(ch):
        return bytes(font.getmask(ch))

    assert mask("τ") != mask("\uffff")  # a real glyph, not .notdef
    default = ImageFont.load_default()
    assert bytes(default.getmask("τ")) == bytes(default.getmask("\uffff"))  # what it replaces: a box

