"""APT capture: explicit-softmax processor, layer selection, hidden-state stats, gradient checkpointing
(apt_ext/capture.py). Tiny UNets, 8x8 latents, batch 2: keep the number of forwards small (2 shared CPU cores)."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from apt_ext.capture import APTCapture, ProbCaptureAttnProcessor, select_layers
from apt_ext.losses import hidden_stats
from library.tiny_models import tiny_config

B, NT = 2, 77


def _tiny_unet(arch, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch)["unet"]
    return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def _inputs(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(B, NT, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(B, 64, generator=g),
                                       time_ids=torch.randn(B, 6, generator=g))
    return (x, t, ctx), kw


@pytest.fixture(scope="module")
def sd1():
    unet = _tiny_unet("sd1")
    args, kw = _inputs(unet)
    with torch.no_grad():
        ref = unet(*args, **kw).sample  # default SDPA processors everywhere
    return unet, args, kw, ref


# ---------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("arch,expected", [("sd1", ["up_blocks.2", "up_blocks.3"]),
                                           ("sd2", ["up_blocks.2", "up_blocks.3"]),
                                           ("sdxl", ["up_blocks.0", "up_blocks.1"])])
def test_select_layers_per_arch(arch, expected):
    unet = _tiny_unet(arch)
    assert select_layers(unet, arch) == expected
    assert select_layers(unet, None) == expected  # found from the block structure
    assert select_layers(unet, arch, ["up_blocks.1", "mid_block"]) == ["up_blocks.1", "mid_block"]
    assert select_layers(unet, arch, ["up_blocks.1", "up_blocks.1"]) == ["up_blocks.1"]  # a repeat: hooked once
    with pytest.raises(ValueError, match="apt_layers"):
        select_layers(unet, arch, ["up_blocks.9"])
    if arch == "sdxl":
        with pytest.raises(ValueError, match="no cross-attention"):
            select_layers(unet, arch, ["up_blocks.2"])
        cap = APTCapture(unet, expected)
        assert len(cap.attn_names) == len(cap.stats_names) == 12  # 3 attentions x 2 transformer blocks x 2 blocks


# ---------------------------------------------------------------------------------------------------- processor


def test_processor_matches_sdpa_standalone_with_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=4, dim_head=4).eval()
    h, enc = torch.randn(2, 10, 16), torch.randn(2, 7, 8)
    mask = torch.zeros(2, 7)
    mask[1, 5:] = -10000.0  # additive mask, as diffusers builds it from encoder_attention_mask
    seen = []
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, h, enc, attention_mask=mask.unsqueeze(1))
        proc = ProbCaptureAttnProcessor(lambda i, a, p: seen.append(p), 0)
        out = proc(attn, h, enc, attention_mask=mask.unsqueeze(1))
    assert (out - ref).abs().max() < 1e-5
    (probs,) = seen
    assert probs.shape == (2, 4, 10, 7) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert probs[1, ..., 5:].max() < 1e-6


def test_processor_computes_in_float32_under_autocast():
    """DESIGN §2.5: the probabilities are softmax(QKᵀ·scale) in float32 also under --mixed_precision, where
    autocast would run the matmuls in bf16 despite the .float() casts (it did: up to 7% off, found by review).
    Reference: the same bf16 Q, K, V (what to_q/to_k/to_v give under autocast) in float64."""
    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    h, enc = torch.randn(2, 256, 64), torch.randn(2, 77, 32)
    seen = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ProbCaptureAttnProcessor(lambda i, a, p: seen.append(p), 0)(attn, h, enc)
        q, k, v = attn.to_q(h), attn.to_k(enc), attn.to_v(enc)
    (probs,) = seen
    assert probs.dtype == torch.float32 and out.dtype == torch.bfloat16
    split = lambda t: t.double().view(2, -1, 4, 16).transpose(1, 2)  # noqa: E731
    want = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
    assert (probs.double() - want).abs().max() < 1e-6
    hidden = (want @ split(v)).transpose(1, 2).reshape(2, -1, 64)
    torch.testing.assert_close(out.float(), attn.to_out[0](hidden.float()), atol=2e-2, rtol=2e-2)  # bf16 output


def test_capture_matches_sdpa_shapes_and_only_when_asked(sd1):
    unet, args, kw, ref = sd1
    cap = APTCapture(unet, select_layers(unet, "sd1")).install()
    try:
        others = [p for n, p in unet.attn_processors.items() if not any(n.startswith(a) for a in cap.attn_names)]
        assert all(isinstance(p, AttnProcessor2_0) for p in others)  # everything else untouched
        with torch.no_grad(), cap.capture("prior") as rec:
            out = unet(*args, **kw).sample
        assert (out - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())
        # 3 attentions x 1 transformer block in up_blocks.2 (4x4 tokens) and up_blocks.3 (8x8 tokens)
        assert len(rec.attn) == len(rec.stats) == len(rec.num_heads) == 6
        assert [a.shape for a in rec.attn] == [(B, 16, NT)] * 3 + [(B, 64, NT)] * 3
        assert rec.num_heads == [4] * 6
        for a, h in zip(rec.attn, rec.num_heads):
            assert a.dtype == torch.float32 and not a.requires_grad
            assert torch.allclose(a.sum(-1), torch.full_like(a[..., 0], float(h)), atol=1e-5)  # head-summed
        assert all(mu.shape == sd.shape == (B,) and mu.dtype == torch.float32 for mu, sd in rec.stats)
        # outside capture(...) nothing is stored and the record is not touched
        kept = [a for a in rec.attn]
        with torch.no_grad():
            unet(*args, **kw)
        assert cap._active is None and all(a is b for a, b in zip(rec.attn, kept))
    finally:
        cap.remove()
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert not any(m._forward_hooks for _, m in cap.stats_modules)


def test_transformer_hook_per_channel(sd1):
    unet, args, kw, _ = sd1
    cap = APTCapture(unet, ["up_blocks.3"], rs_hook="transformer", rs_stats="per_channel").install()
    try:
        with torch.no_grad(), cap.capture("prior") as rec:
            unet(*args, **kw)
    finally:
        cap.remove()
    assert cap.stats_names == [f"up_blocks.3.attentions.{i}" for i in range(3)]
    # up_blocks.3 has 32 channels
    assert [s[0].shape for s in rec.stats] == [(B, 32)] * 3 and [s[1].shape for s in rec.stats] == [(B, 32)] * 3


def test_hidden_stats_values_and_grad():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mu, sd = hidden_stats(x, "scalar")
    assert torch.allclose(mu, x.mean((1, 2))) and torch.allclose(sd, x.std((1, 2), unbiased=False))
    mu_c, sd_c = hidden_stats(x, "per_channel")
    assert mu_c.shape == (2, 3) and torch.allclose(sd_c, x.std(1, unbiased=False))
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert hidden_stats(y, "per_channel")[0].shape == (2, 3)
    for mode in ("scalar", "per_channel"):
        assert torch.autograd.gradcheck(lambda t: hidden_stats(t, mode), (x,))
    assert torch.autograd.gradcheck(lambda t: hidden_stats(t, "per_channel"), (y,))
    xb = torch.randn(2, 5, 3).bfloat16()
    assert hidden_stats(xb)[1].dtype == torch.float32


# ------------------------------------------------------------------------------------------ grad / checkpointing


def _ft_step(unet, cap, args, kw, param, backward_inside=False):
    """One captured fine-tuned forward; a loss built from the captured tensors only; backward."""
    param.grad = None
    calls = []

    def counting_sink(*a):  # counts every processor call, the checkpoint's recomputation included
        calls.append(a[0])
        cap._on_attn(*a)

    for _, m in cap.attn_modules:
        m.processor.sink = counting_sink
    with cap.capture("ft") as rec:
        unet(*args, **kw)
        loss = sum(a.square().sum() / h for a, h in zip(rec.attn, rec.num_heads))
        loss = loss + sum((mu.square() + sd).sum() for mu, sd in rec.stats)
        if backward_inside:  # the checkpoint's recomputation then runs while capture is armed
            loss.backward()
    snapshot = [a for a in rec.attn]
    if not backward_inside:
        loss.backward()
    for _, m in cap.attn_modules:
        m.processor.sink = cap._on_attn
    assert len(rec.attn) == len(rec.stats) == 6 and rec.complete
    assert all(a is b for a, b in zip(rec.attn, snapshot))  # not overwritten by the recomputation
    return rec, param.grad.clone(), len(calls)


def test_identical_inputs_give_identical_prior_and_ft_records_and_gradient_checkpointing(sd1):
    unet, args, kw, _ = sd1
    cap = APTCapture(unet, select_layers(unet, "sd1")).install()
    param = unet.get_submodule(cap.attn_names[3]).to_k.weight  # attn2 inside up_blocks.3
    unet.train()
    param.requires_grad_(True)
    try:
        with torch.no_grad(), cap.capture("prior") as prior:
            unet(*args, **kw)
        ft, g_plain, calls_plain = _ft_step(unet, cap, args, kw, param)
        assert calls_plain == 6
        for a, b in zip(prior.attn, ft.attn):
            assert b.requires_grad and not a.requires_grad and torch.equal(a, b.detach())
        for (m0, s0), (m1, s1) in zip(prior.stats, ft.stats):
            assert m1.requires_grad and torch.equal(m0, m1.detach()) and torch.equal(s0, s1.detach())
        assert g_plain.abs().sum() > 0

        unet.enable_gradient_checkpointing()
        for inside in (False, True):
            ck, g_ck, calls_ck = _ft_step(unet, cap, args, kw, param, backward_inside=inside)
            assert calls_ck == 12  # the processors fired again in the backward recomputation...
            for a, b in zip(ft.attn, ck.attn):  # ...but captured once, the same values, with grad
                assert b.requires_grad and torch.allclose(a.detach(), b.detach(), atol=1e-6)
            for (m0, s0), (m1, s1) in zip(ft.stats, ck.stats):
                assert torch.allclose(m0.detach(), m1.detach(), atol=1e-6)
                assert torch.allclose(s0.detach(), s1.detach(), atol=1e-6)
            assert g_ck.abs().sum() > 0
            assert torch.allclose(g_ck, g_plain, rtol=1e-4, atol=1e-6)
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
        param.requires_grad_(False)
        param.grad = None
        cap.remove()


def test_capture_misuse_errors(sd1):
    unet, args, kw, _ = sd1
    cap = APTCapture(unet, ["up_blocks.3"])
    with pytest.raises(RuntimeError, match="install"):
        with cap.capture("prior"):
            pass
    cap.install()
    try:
        with pytest.raises(ValueError, match="tag"):
            with cap.capture("other"):
                pass
        with pytest.raises(RuntimeError, match="missed"):  # armed but the UNet was never called
            with cap.capture("prior"):
                pass
        with pytest.raises(RuntimeError, match="armed"):
            with cap.capture("prior"), cap.capture("ft"):
                pass
        assert cap._active is None
    finally:
        cap.remove()


def test_capture_record_flat_round_trip_and_count_check():
    """The static prior pass returns a record as `flat()` tensors and rebuilds it with `from_flat`: order matters
    (attention maps first, then mu, sigma per stats module), and a wrong count is refused."""
    from apt_ext.capture import CaptureRecord

    rec = CaptureRecord("prior", ["a0", "a1"], ["s0"])
    a0, a1, mu, sd = (torch.full((1,), float(i)) for i in range(4))
    rec.attn, rec.stats, rec.num_heads = [a0, a1], [(mu, sd)], [2, 4]
    flat = rec.flat()
    assert [float(x) for x in flat] == [0.0, 1.0, 2.0, 3.0]
    back = CaptureRecord.from_flat("prior", rec.attn_names, rec.stats_names, rec.num_heads, flat)
    assert back.complete and back.num_heads == [2, 4] and back.tag == "prior"
    assert back.attn[1] is a1 and back.stats[0][0] is mu and back.stats[0][1] is sd
    with pytest.raises(ValueError, match="3 tensors for 2 attention maps and 1"):
        CaptureRecord.from_flat("prior", rec.attn_names, rec.stats_names, rec.num_heads, flat[:3])


def test_prior_capture_is_detached_even_with_grad_enabled(sd1):
    """DESIGN §2.4: the prior record is a target. If it kept its graph (a prior pass run with grad, e.g. outside
    `torch.no_grad()`), the APT losses would push gradients through the target into the weights and hold the
    whole prior forward's activations in memory; "prior" must detach, "ft" must not."""
    unet, args, kw, _ = sd1
    cap = APTCapture(unet, ["up_blocks.3"]).install()
    param = unet.get_submodule(cap.attn_names[0]).to_k.weight
    was = param.requires_grad
    param.requires_grad_(True)
    try:
        with torch.enable_grad(), cap.capture("prior") as rec:
            unet(*args, **kw)
    finally:
        param.requires_grad_(was)
        cap.remove()
    assert rec.complete
    assert not any(a.requires_grad for a in rec.attn)
    assert not any(mu.requires_grad or sd.requires_grad for mu, sd in rec.stats)
