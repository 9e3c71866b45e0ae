"""library/conditioning.py: sd-scripts tokenization, long prompts, clip_skip, SDXL encoders, UNet call, cache."""
import pytest
import torch

from library import conditioning as C
from library.conditioning import (
    TextConditioning,
    TextEncoderCache,
    encode_prompts,
    sdxl_time_ids,
    tokenize,
    unet_forward,
)
from library.tiny_models import build_tiny_model

BOS, EOS, DOG = 49406, 49407, 1929
PHOTO_IDS = [49406, 320, 1125, 539, 320, 1929, 49407]  # "a photo of a dog"


@pytest.fixture(scope="module")
def models():
    return {arch: build_tiny_model(arch) for arch in ("sd1", "sd2", "sdxl")}


def dogs(n):
    return " ".join(["dog"] * n)  # "dog" is one token


# ---------------------------------------------------------------------------------------------- tokenize


def test_tokenize_short_prompt_ids(models):
    ids_sd1 = tokenize(models["sd1"], ["a photo of a dog"])
    assert len(ids_sd1) == 1 and ids_sd1[0].shape == (1, 77) and ids_sd1[0].dtype == torch.long
    assert ids_sd1[0][0].tolist() == PHOTO_IDS + [EOS] * 70
    ids1, ids2 = tokenize(models["sdxl"], "a photo of a dog")
    assert ids1[0].tolist() == PHOTO_IDS + [EOS] * 70
    assert ids2[0].tolist() == PHOTO_IDS + [0] * 70  # SDXL's second tokenizer pads with "!" (id 0)


def test_tokenize_long_prompt_eos_padded_tokenizer(models):
    (ids,) = tokenize(models["sd1"], [dogs(100)], max_token_length=150)
    assert ids.shape == (1, 2 * 77)
    chunk0, chunk1 = ids[0, :77].tolist(), ids[0, 77:].tolist()
    assert chunk0 == [BOS] + [DOG] * 75 + [EOS]
    assert chunk1 == [BOS] + [DOG] * 25 + [EOS] * 51
    (ids3,) = tokenize(models["sd1"], [dogs(200)], max_token_length=225)
    assert ids3.shape == (1, 3 * 77)
    assert ids3[0, 154:].tolist() == [BOS] + [DOG] * 50 + [EOS] * 26


def test_tokenize_truncated_long_prompt_ends_every_chunk_with_eos(models):
    """A caption longer than max_token_length (common with tag lists) is cut to 150 tokens; every chunk must still
    end in EOS, as sd-scripts' chunks `[ids[0]] + ids[i:i + 75] + [ids[-1]]` do (ids[-1] is the truncation's EOS).
    Without it the encoder sees each chunk run on with no end token."""
    (ids,) = tokenize(models["sd1"], [dogs(160)], max_token_length=150)
    assert ids[0, :77].tolist() == ids[0, 77:].tolist() == [BOS] + [DOG] * 75 + [EOS]
    _, ids2 = tokenize(models["sdxl"], [dogs(160)], max_token_length=150)
    assert ids2[0, :77].tolist() == ids2[0, 77:].tolist() == [BOS] + [DOG] * 75 + [EOS]

def test_tokenize_long_prompt_pad_tokenizer_chunk_rules(models):
    _, ids2 = tokenize(models["sdxl"], [dogs(100), dogs(75), "a dog"], max_token_length=150)
    assert ids2.shape == (3, 154)
    # text runs past chunk 0: its last id becomes EOS; chunk 1 ends in padding
    assert ids2[0, :77].tolist() == [BOS] + [DOG] * 75 + [EOS]
    assert ids2[0, 77:].tolist() == [BOS] + [DOG] * 25 + [EOS] + [0] * 50
    # exactly 75 tokens: chunk 0 gets EOS at its end, chunk 1 is BOS EOS pad...
    assert ids2[1, :77].tolist() == [BOS] + [DOG] * 75 + [EOS]
    assert ids2[1, 77:].tolist() == [BOS, EOS] + [0] * 75
    # short caption: the empty chunk's first pad becomes EOS
    assert ids2[2, :77].tolist() == [BOS, 320, DOG, EOS] + [0] * 73
    assert ids2[2, 77:].tolist() == [BOS, EOS] + [0] * 75


def test_short_prompt_first_chunk_agrees(models):
    for arch in ("sd1", "sdxl"):
        short = tokenize(models[arch], ["a photo of a dog"])
        long = tokenize(models[arch], ["a photo of a dog"], max_token_length=150)
        for s, lg in zip(short, long):
            assert torch.equal(lg[:, :77], s)
        assert [t.shape for t in tokenize(models[arch], "x", max_token_length=75)] == [t.shape for t in short]


def test_bad_max_token_length(models):
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize(models["sd1"], ["a"], max_token_length=100)


# ---------------------------------------------------------------------------------------------- encode


def test_context_lengths(models):
    m = models["sd1"]
    with torch.no_grad():
        assert encode_prompts(m, ["a dog"]).context.shape == (1, 77, 32)
        assert encode_prompts(m, ["a dog", dogs(140)], max_token_length=150).context.shape == (2, 152, 32)
        assert encode_prompts(m, ["a dog"], max_token_length=225).context.shape == (1, 227, 32)
    assert C.context_length(150) == 152 and C.context_length(None) == 77


def _by_hand_stitch(hidden_chunks):
    """BOS of chunk 0, the 75 middle states of every chunk, the last state of the last chunk."""
    return torch.cat([hidden_chunks[0][:, :1]] + [h[:, 1:76] for h in hidden_chunks] + [hidden_chunks[-1][:, -1:]], 1)


def test_long_prompt_restitched_sd1(models):
    m = models["sd1"]
    te = m.text_encoders[0]
    caption = dogs(100) + " a photo of a cat"
    with torch.no_grad():
        got = encode_prompts(m, [caption], max_token_length=150).context
        (ids,) = tokenize(m, [caption], max_token_length=150)
        chunks = [te(ids[:, k * 77 : (k + 1) * 77]).last_hidden_state for k in range(2)]
    assert got.shape == (1, 152, 32)
    torch.testing.assert_close(got, _by_hand_stitch(chunks))


def test_long_prompt_restitched_sdxl_and_pooled_from_first_chunk(models):
    m = models["sdxl"]
    te1, te2 = m.text_encoders
    caption = dogs(90) + " on a beach"
    with torch.no_grad():
        cond = encode_prompts(m, [caption, "a dog"], max_token_length=150)
        ids1, ids2 = tokenize(m, [caption, "a dog"], max_token_length=150)
        h1 = [te1(ids1[:, k * 77 : (k + 1) * 77], output_hidden_states=True).hidden_states[-2] for k in range(2)]
        outs2 = [te2(ids2[:, k * 77 : (k + 1) * 77], output_hidden_states=True) for k in range(2)]
        h2 = [o.hidden_states[-2] for o in outs2]
    assert cond.context.shape == (2, 152, 96) and cond.pooled.shape == (2, 64)
    torch.testing.assert_close(cond.context[..., :32], _by_hand_stitch(h1))
    torch.testing.assert_close(cond.context[..., 32:], _by_hand_stitch(h2))
    torch.testing.assert_close(cond.pooled, outs2[0].text_embeds)  # first chunk's pooled output


def test_short_prompt_encoding_agrees_with_150(models):
    for arch in ("sd1", "sdxl"):
        with torch.no_grad():
            a = encode_prompts(models[arch], ["a photo of a dog"])
            b = encode_prompts(models[arch], ["a photo of a dog"], max_token_length=150)
        torch.testing.assert_close(b.context[:, :76], a.context[:, :76])  # BOS + chunk 0's 75 middle states
        if arch == "sdxl":
            torch.testing.assert_close(b.pooled, a.pooled)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_clip_skip(models, arch):
    m = models[arch]
    te = m.text_encoders[0]
    with torch.no_grad():
        (ids,) = tokenize(m, ["a photo of a dog"])
        out = te(ids, output_hidden_states=True)
        ln = getattr(te, "text_model", te).final_layer_norm
        skip2 = encode_prompts(m, ["a photo of a dog"], clip_skip=2).context
        skip1 = encode_prompts(m, ["a photo of a dog"], clip_skip=1).context
        none = encode_prompts(m, ["a photo of a dog"]).context
    torch.testing.assert_close(skip2, ln(out.hidden_states[-2]))
    torch.testing.assert_close(skip1, out.last_hidden_state)
    torch.testing.assert_close(none, out.last_hidden_state)
    assert not torch.allclose(skip2, none)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(m, ["a"], clip_skip=10)


def test_sdxl_encoders_by_hand(models):
    m = models["sdxl"]
    te1, te2 = m.text_encoders
    with torch.no_grad():
        cond = encode_prompts(m, ["a photo of a dog", "a cat"])
        ids1, ids2 = tokenize(m, ["a photo of a dog", "a cat"])
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        o2 = te2(ids2, output_hidden_states=True)
        # pooled by hand: text_projection(final-LN hidden at the EOS position)
        eos_pos = (ids2 == EOS).int().argmax(1)
        pooled = te2.text_projection(o2.last_hidden_state[torch.arange(2), eos_pos])
    assert cond.context.shape == (2, 77, 32 + 64) and cond.pooled.shape == (2, 64)
    torch.testing.assert_close(cond.context, torch.cat([h1, o2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled, pooled)
    torch.testing.assert_close(cond.pooled, o2.text_embeds)


def test_grad_mode_follows_caller(models):
    m = build_tiny_model("sd1")
    m.text_encoders[0].requires_grad_(True)
    cond = encode_prompts(m, ["a dog"])
    assert cond.context.requires_grad
    cond.context.sum().backward()
    assert m.text_encoders[0].get_input_embeddings().weight.grad is not None
    with torch.no_grad():
        assert not encode_prompts(m, ["a dog"]).context.requires_grad
    assert encode_prompts(m, "a dog", device="cpu").context.device.type == "cpu"


def test_text_conditioning_methods():
    a = TextConditioning(torch.randn(2, 77, 8), torch.randn(2, 4))
    b = TextConditioning(torch.randn(3, 77, 8), torch.randn(3, 4))
    c = TextConditioning.cat([a, b])
    assert len(c) == 5 and c.context.shape == (5, 77, 8) and c.pooled.shape == (5, 4)
    assert torch.equal(c[3].context, b.context[1:2]) and c[3].pooled.shape == (1, 4)
    assert torch.equal(c[-1].context, b.context[-1:])
    assert torch.equal(c[1:3].pooled, torch.cat([a.pooled[1:], b.pooled[:1]]))
    assert c.to(dtype=torch.float16).context.dtype == torch.float16
    assert c.to(dtype=torch.float16).pooled.dtype == torch.float16
    x = TextConditioning(torch.randn(1, 77, 8, requires_grad=True))
    assert not x.detach().context.requires_grad and x.detach().pooled is None
    with pytest.raises(ValueError):
        TextConditioning.cat([a, TextConditioning(torch.randn(1, 152, 8), torch.randn(1, 4))])
    with pytest.raises(ValueError):
        TextConditioning.cat([a, TextConditioning(torch.randn(1, 77, 8))])


# ---------------------------------------------------------------------------------------------- cache


def test_cache_encodes_each_caption_once(models, monkeypatch):
    m = models["sdxl"]
    calls = []
    real = C.encode_prompts

    def counting(model, captions, **kw):
        calls.append(list(captions))
        return real(model, captions, **kw)

    monkeypatch.setattr(C, "encode_prompts", counting)
    cache = TextEncoderCache(m, clip_skip=None, max_token_length=150)
    got = cache.get(["a dog", "a cat", "a dog"])
    assert calls == [["a dog", "a cat"]]
    assert got.context.shape == (3, 152, 96) and got.pooled.shape == (3, 64)
    assert got.context.device.type == "cpu" and not got.context.requires_grad
    again = cache.get(["a cat", "a dog", "a bird"])
    assert calls == [["a dog", "a cat"], ["a bird"]]
    assert torch.equal(again.context[0], got.context[1]) and torch.equal(again.pooled[1], got.pooled[0])
    assert cache.num_encoded == 3 and len(cache) == 3 and "a bird" in cache
    with torch.no_grad():
        direct = real(m, ["a cat", "a dog", "a bird"], max_token_length=150)
    torch.testing.assert_close(again.context, direct.context)
    torch.testing.assert_close(again.pooled, direct.pooled)
    cache.precompute(["a dog", "a fox", "a fox"], show_progress=False)
    assert calls[-1] == ["a fox"] and cache.num_encoded == 4


# ---------------------------------------------------------------------------------------------- UNet


def test_sdxl_time_ids_order():
    t = sdxl_time_ids(torch.tensor([[1024, 768]]), [[16, 8]], torch.tensor([[896, 640]]))
    assert t.dtype == torch.float32 and t.tolist() == [[1024, 768, 16, 8, 896, 640]]
    assert sdxl_time_ids([[1, 2], [3, 4]], [[0, 0], [0, 0]], [[1, 2], [3, 4]]).shape == (2, 6)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_unet_forward(models, arch):
    m = models[arch]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        cond = encode_prompts(m, ["a dog", "a cat"])
        if arch == "sdxl":
            ids_a = sdxl_time_ids([[64, 64]] * 2, [[0, 0]] * 2, [[64, 64]] * 2)
            ids_b = sdxl_time_ids([[32, 48]] * 2, [[8, 0]] * 2, [[64, 64]] * 2)
            out = unet_forward(m, x, t, cond, ids_a)
            assert not torch.allclose(out, unet_forward(m, x, t, cond, ids_b))
            with pytest.raises(ValueError, match="time_ids"):
                unet_forward(m, x, t, cond)
        else:
            out = unet_forward(m, x, t, cond)
        # the conditioning is cast to the UNet's dtype
        out16 = unet_forward(m, x, t, cond.to(dtype=torch.float64), ids_a if arch == "sdxl" else None)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out16, out)


def test_sdxl_sizes_reach_the_unet_in_float32_under_bf16():
    """sd-scripts embeds the size conditioning from exact float32 values; a bf16 cast first would round them
    (1500 -> 1504, 1195 -> 1192) and change the sinusoids. The UNet's time projection sees the exact sizes."""
    m = build_tiny_model("sdxl")
    m.unet.to(torch.bfloat16)
    seen = []
    m.unet.add_time_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    ids = sdxl_time_ids([[1500, 1195]], [[10, 0]], [[1216, 832]])
    assert torch.tensor(1500.0, dtype=torch.bfloat16).item() == 1504  # what a bf16 cast would have given
    with torch.no_grad():
        cond = encode_prompts(m, ["a dog"])
        unet_forward(m, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([10]), cond, ids)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [1500, 1195, 10, 0, 1216, 832]


def test_cache_encodes_with_the_runs_clip_skip_and_caption_weights(models):
    """--cache_text_encoder_outputs with --clip_skip 2 / --weighted_captions: the cached context must be what the
    uncached path gives (penultimate layer through the final LayerNorm; the weighted token scaled), else a cached
    run silently trains on other conditioning than the same run without the cache. Reference built by hand from
    the encoder: "a photo of dog" is BOS a photo of dog EOS..., "dog" at position 4."""
    m = models["sd1"]
    te = m.text_encoders[0]
    ln = getattr(te, "text_model", te).final_layer_norm
    with torch.no_grad():
        (ids,) = tokenize(m, ["a photo of dog"])
        assert ids[0, :6].tolist() == [BOS, 320, 1125, 539, DOG, EOS]
        skip2 = ln(te(ids, output_hidden_states=True).hidden_states[-2])
    got = TextEncoderCache(m, clip_skip=2).get(["a photo of dog"]).context
    torch.testing.assert_close(got, skip2)
    scale = torch.ones(1, 77, 1)
    scale[0, 4] = 1.5
    weighted = TextEncoderCache(m, clip_skip=2, weighted=True).get(["a photo of (dog:1.5)"]).context
    torch.testing.assert_close(weighted, skip2 * scale)
