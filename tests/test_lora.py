"""networks/lora.py and library/safe_io.py on tiny models: forward math, multiplier 0, save/load, errors, options."""
import argparse
import hashlib
import io
import logging
import math
import os

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from library import safe_io
from library.model_util import arch_config, build_from_config
from library.tiny_models import build_tiny_model
from networks.lora import LoRAModule, LoRANetwork, LoRAWeightsError, create_network, parse_network_args


def randomize(net, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = model.unet.config
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700][:batch])
    ctx = torch.randn(batch, 77, u.cross_attention_dim, generator=g)
    kw = {}
    if model.is_sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, model.text_encoders[1].config.projection_dim,
                                                               generator=g),
                                   "time_ids": torch.randn(batch, 6, generator=g)}
    return (x, t, ctx), kw


def te_outputs(model, ids):
    return [te(ids, output_hidden_states=True).hidden_states[-1] for te in model.text_encoders]


def args(**kw):
    base = dict(network_dim=None, network_alpha=None, network_dropout=None, network_args=None,
                network_train_unet_only=False)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_model("sd1")


# ---------------------------------------------------------------------------------------------------------------------
# module math


def _patched(org, **kw):
    lora = LoRAModule("x", org, **kw)
    randomize(lora, seed=3, std=0.2)
    lora.apply_to()
    return lora


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_forward_equals_hand_computed_and_delta_weight(kind):
    torch.manual_seed(0)
    rank, alpha, mult = 4, 2.0, 0.7
    if kind == "linear":
        org, x = nn.Linear(12, 10), torch.randn(3, 5, 12)
    elif kind == "conv1x1":
        org, x = nn.Conv2d(6, 5, 1), torch.randn(2, 6, 7, 7)
    else:
        org, x = nn.Conv2d(6, 5, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        expected_base = org(x)
    lora = _patched(org, lora_dim=rank, alpha=alpha, multiplier=mult)
    down, up, scale = lora.lora_down.weight, lora.lora_up.weight, alpha / rank
    assert lora.scale == scale

    with torch.no_grad():
        y = org(x)
        if kind == "linear":
            hand = x @ org.weight.T + org.bias + mult * scale * (x @ down.T @ up.T)
        elif kind == "conv1x1":
            hand = expected_base + mult * scale * torch.einsum("or,ri,bihw->bohw", up[:, :, 0, 0], down[:, :, 0, 0], x)
        else:
            # down keeps kernel/stride/padding, up is 1x1
            assert lora.lora_down.kernel_size == (3, 3) and lora.lora_down.stride == (2, 2)
            assert lora.lora_down.padding == (1, 1) and lora.lora_up.kernel_size == (1, 1)
            mid = nn.functional.conv2d(x, down, stride=2, padding=1)
            hand = expected_base + mult * scale * nn.functional.conv2d(mid, up)
        torch.testing.assert_close(y, hand, atol=1e-5, rtol=1e-5)

        # KOHYA_COMPAT §1.1: W + ΔW gives the same output (what ComfyUI/A1111 merge)
        dw = lora.delta_weight()
        assert dw.shape == org.weight.shape
        if kind == "conv3x3":  # ComfyUI's formula
            comfy = (up.flatten(1) @ down.flatten(1)).reshape(org.weight.shape) * mult * scale
            torch.testing.assert_close(dw, comfy, atol=1e-6, rtol=1e-5)
        w = org.weight + dw
        merged = nn.functional.linear(x, w, org.bias) if kind == "linear" else nn.functional.conv2d(
            x, w, org.bias, stride=org.stride, padding=org.padding)
        torch.testing.assert_close(y, merged, atol=1e-5, rtol=1e-4)


def test_init_alpha_and_restore():
    org = nn.Linear(8, 6)
    for a in (0, None):
        m = LoRAModule("m", org, lora_dim=4, alpha=a)
        assert m.scale == 1.0 and m.alpha.item() == 4.0 and m.alpha.dtype == torch.float32 and m.alpha.dim() == 0
    m = LoRAModule("m", org, lora_dim=4, alpha=1)
    assert m.scale == 0.25
    assert torch.count_nonzero(m.lora_up.weight) == 0 and torch.count_nonzero(m.lora_down.weight) > 0
    bound = 1 / math.sqrt(8)  # kaiming_uniform_(a=sqrt(5)) on fan_in 8
    assert m.lora_down.weight.abs().max() <= bound + 1e-6
    assert set(m.state_dict()) == {"alpha", "lora_down.weight", "lora_up.weight"}  # the org module is not in it
    m.apply_to()
    assert "forward" in org.__dict__
    with pytest.raises(RuntimeError):
        m.apply_to()
    m.restore()
    assert "forward" not in org.__dict__


# ---------------------------------------------------------------------------------------------------------------------
# multiplier


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_multiplier_zero_is_bit_exact_base(arch):
    base = build_tiny_model(arch, seed=0)
    model = build_tiny_model(arch, seed=0)
    net = LoRANetwork(model, lora_dim=4, alpha=4, conv_lora_dim=2)
    randomize(net)  # nonzero lora_up everywhere
    net.apply_to()
    (x, t, ctx), kw = unet_inputs(model)
    ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_unet = base.unet(x, t, ctx, **kw).sample
        ref_te = te_outputs(base, ids)
        lora_unet = model.unet(x, t, ctx, **kw).sample
        assert not torch.allclose(lora_unet, ref_unet)
        with net.multiplier_override(0.0):
            assert torch.equal(model.unet(x, t, ctx, **kw).sample, ref_unet)
            for a, b in zip(te_outputs(model, ids), ref_te):
                assert torch.equal(a, b)
        assert all(m.multiplier == 1.0 for m in net.loras)
        assert torch.equal(model.unet(x, t, ctx, **kw).sample, lora_unet)
        net.set_multiplier(0)
        assert torch.equal(model.unet(x, t, ctx, **kw).sample, ref_unet)
        net.set_multiplier(1.0)
        net.restore()
        assert torch.equal(model.unet(x, t, ctx, **kw).sample, ref_unet)


def test_multiplier_override_restores_on_exception(sd1):
    net = LoRANetwork(sd1)
    with pytest.raises(ValueError):
        with net.multiplier_override(0.0):
            raise ValueError
    assert net.multiplier == 1.0 and all(m.multiplier == 1.0 for m in net.loras)


def test_gradients_reach_lora_only():
    model = build_tiny_model("sd1")
    net = LoRANetwork(model, lora_dim=2)
    net.apply_to()
    net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    (x, t, ctx), kw = unet_inputs(model)
    model.unet(x, t, ctx).sample.square().mean().backward()
    ups = [m.lora_up.weight.grad for m in net.unet_loras]
    assert all(g is not None for g in ups) and any(g.abs().sum() > 0 for g in ups)
    assert all(p.grad is None for p in model.unet.parameters())
    net.restore()


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    org = nn.Linear(16, 16)
    x = torch.randn(4, 3, 16)
    for kw in ({"dropout": 0.5}, {"rank_dropout": 0.5}, {"module_dropout": 0.5}):
        lora = _patched(org, lora_dim=8, alpha=8, **kw)
        lora.eval()
        a, b = org(x), org(x)
        assert torch.equal(a, b)
        lora.train()
        outs = [org(x) for _ in range(8)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
        lora.restore()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_masks_ranks_per_sample_and_rescales_like_sd_scripts(kind):
    """--network_args rank_dropout=p (sd-scripts LoRAModule): in training each sample keeps each rank with
    probability 1-p (one draw per (sample, rank), shared by all its tokens / pixels) and the branch is scaled by
    1/(1-p), so its expected size equals the trained-without-dropout LoRA's; a wrong axis or a missing rescale
    trains a LoRA that is too weak (or noise) when loaded in ComfyUI/A1111."""
    torch.manual_seed(0)
    rank, alpha, mult, p = 4, 2.0, 0.7, 0.5
    if kind == "linear":
        org, x = nn.Linear(12, 10), torch.randn(3, 5, 12)  # (B, tokens, features): text encoder / attention
    else:
        org, x = nn.Conv2d(6, 5, 3, padding=1), torch.randn(3, 6, 4, 4)  # (B, C, H, W), H = W = rank
    with torch.no_grad():
        base = org(x)
    lora = _patched(org, lora_dim=rank, alpha=alpha, multiplier=mult, rank_dropout=p)
    lora.train()
    down, up = lora.lora_down.weight, lora.lora_up.weight
    with torch.no_grad():
        torch.manual_seed(11)
        y = org(x)
        torch.manual_seed(11)  # the module's only random draw: keep[b, r] = U(0,1) > p
        keep = (torch.rand(3, rank) > p).float()
        assert 0 < keep.sum() < keep.numel()  # some ranks dropped, some kept: the mask matters
        factor = mult * (alpha / rank) / (1 - p)  # 0.7 * 0.5 * 2
        if kind == "linear":
            h = (x @ down.T) * keep[:, None, :]  # the same ranks for every token of a sample
            hand = base + factor * (h @ up.T)
        else:
            h = nn.functional.conv2d(x, down, padding=1) * keep[:, :, None, None]  # a rank is a channel
            hand = base + factor * torch.einsum("or,brhw->bohw", up[:, :, 0, 0], h)
        torch.testing.assert_close(y, hand, atol=1e-5, rtol=1e-5)
    lora.restore()


@pytest.mark.parametrize("kind", ["linear_unfused", "conv3x3"])
def test_module_dropout_never_drops_the_lora_in_eval(kind):
    """module_dropout=p skips a module's whole LoRA branch with probability p, in training only (sd-scripts): sample
    images and validation loss, taken in eval mode, must see the full LoRA, not a randomly switched-off one."""
    torch.manual_seed(0)
    if kind == "linear_unfused":
        org, x = nn.Linear(12, 10), torch.randn(3, 5, 12)
    else:
        org, x = nn.Conv2d(6, 5, 3, padding=1), torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        base = org(x)
    lora = _patched(org, lora_dim=4, alpha=4.0, module_dropout=0.99)  # randomized: lora_up is non-zero
    lora.fused = False  # --no_fused_lora: the linear goes through the same path as the conv
    down, up = lora.lora_down.weight, lora.lora_up.weight
    with torch.no_grad():
        if kind == "linear_unfused":
            full = base + (x @ down.T) @ up.T  # multiplier 1, scale alpha / rank = 1
        else:
            full = base + nn.functional.conv2d(nn.functional.conv2d(x, down, padding=1), up)
        assert not torch.allclose(full, base)
        lora.eval()
        torch.manual_seed(1)
        for _ in range(5):
            torch.testing.assert_close(org(x), full, atol=1e-5, rtol=1e-5)
        lora.train()  # training: dropped on about 99% of calls, the output is then the base model's exactly
        dropped = sum(torch.equal(org(x), base) for _ in range(20))
        assert dropped >= 15
    lora.restore()


def _branch_grads(org, lora, x, fused, autocast):
    lora.fused = fused
    for p in (*lora.parameters(), x):
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = org(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), [p.grad.clone() for p in (lora.lora_down.weight, lora.lora_up.weight, x)]


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_branch_equals_separate_ops_with_fewer_kernels(base_dtype):
    """Issue 6: a Linear's LoRA branch as down + one addmm gives the output and gradients of the separate ops
    (fp32: to rounding; bf16 autocast, the trainer's setting: to bf16 rounding) and dispatches 5 ops instead of 9
    with bf16 base weights under autocast (the input is not cast to fp32 only to be cast back)."""
    from bench.op_count import count_ops

    torch.manual_seed(0)
    org = nn.Linear(24, 16).to(base_dtype)
    x = torch.randn(2, 7, 24).to(base_dtype).requires_grad_(True)
    lora = _patched(org, lora_dim=4, alpha=2.0, multiplier=0.7)
    autocast = base_dtype == torch.bfloat16
    y0, g0 = _branch_grads(org, lora, x, False, autocast)
    y1, g1 = _branch_grads(org, lora, x, True, autocast)
    tol = dict(atol=1e-5, rtol=1e-5) if not autocast else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)
    assert y1.dtype == y0.dtype and y1.shape == (2, 7, 16)
    if autocast:
        counts = {}
        for fused in (False, True):
            lora.fused = fused
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                counts[fused] = dict(count_ops(lambda: org(x))[1])
        assert counts[False] == {"aten.addmm": 1, "aten._to_copy": 4, "aten.mm": 2, "aten.mul": 1, "aten.add": 1}
        assert counts[True] == {"aten.addmm": 2, "aten._to_copy": 2, "aten.mm": 1}
    lora.fused = True  # training with a dropout takes the separate path (its masks), eval does not
    lora.dropout = 0.5
    lora.train()
    with torch.no_grad():
        outs = [org(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_no_fused_lora_flag(sd1):
    assert all(lora.fused for lora in create_network(sd1, args(network_dim=4)).loras)
    net = create_network(sd1, args(network_dim=4, no_fused_lora=True))
    assert not any(lora.fused for lora in net.loras)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fused_branch_whole_unet_step_equals_separate(arch):
    """The whole tiny UNet with LoRA (fp32): loss and every LoRA gradient of the fused branch equal the separate
    ops' to 1e-5 (the tolerance docs/speed.md states)."""
    model = build_tiny_model(arch)
    net = create_network(model, args(network_dim=4, network_alpha=2.0, network_train_unet_only=True))
    randomize(net, seed=5, std=0.05)
    net.apply_to()
    inputs, kw = unet_inputs(model)
    res = {}
    for fused in (False, True):
        for lora in net.loras:
            lora.fused = fused
        net.zero_grad(set_to_none=True)
        loss = (model.unet(*inputs, **kw).sample ** 2).mean()
        loss.backward()
        res[fused] = (loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None])
    torch.testing.assert_close(res[True][0], res[False][0], atol=1e-6, rtol=1e-5)
    assert len(res[True][1]) == len(res[False][1]) > 0
    for a, b in zip(res[True][1], res[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(lora.is_linear for lora in net.loras) > 0
    net.restore()


def test_multiplier_on_the_device_equals_the_number(sd1):
    """Datasets with different network_multiplier values (`keep_multiplier_on_device`): the LoRA reads a non-zero
    multiplier from one device tensor that set_multiplier fills in place. Loss and LoRA gradients equal those with
    the multiplier as a number (fused and separate branches); 0 still skips the branch; an override puts the value
    back; setting the value the tensor holds writes nothing (a queued backward may still read it)."""
    inputs, kw = unet_inputs(sd1)
    net = create_network(sd1, args(network_dim=4, network_alpha=2.0, network_train_unet_only=True))
    randomize(net, seed=5, std=0.05)
    net.apply_to()

    def loss_and_grads(m, fused):
        net.set_multiplier(m)
        for lora in net.loras:
            lora.fused = fused
        net.zero_grad(set_to_none=True)
        loss = (sd1.unet(*inputs, **kw).sample ** 2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    try:
        plain = {(m, f): loss_and_grads(m, f) for m in (1.0, -0.5) for f in (True, False)}
        with torch.no_grad():
            net.set_multiplier(0.0)
            base = sd1.unet(*inputs, **kw).sample
        net.set_multiplier(1.0)
        net.keep_multiplier_on_device("cpu")
        tensor = net.loras[0].multiplier
        assert isinstance(tensor, torch.Tensor) and all(lora.multiplier is tensor for lora in net.loras)
        for (m, fused), (loss, grads) in plain.items():
            got_loss, got_grads = loss_and_grads(m, fused)
            assert net.loras[-1].multiplier is tensor and tensor.item() == m
            torch.testing.assert_close(got_loss, loss, atol=1e-7, rtol=1e-6)
            assert len(got_grads) == len(grads) > 0
            for a, b in zip(got_grads, grads):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
        version = tensor._version
        with net.multiplier_override(0.0), torch.no_grad():
            assert all(lora.multiplier == 0.0 for lora in net.loras)  # a number: the branch is skipped
            assert torch.equal(sd1.unet(*inputs, **kw).sample, base)
        with net.multiplier_override(2.0):
            assert tensor.item() == 2.0
        assert net.multiplier == -0.5 and tensor.item() == -0.5 and net.loras[0].multiplier is tensor
        net.set_multiplier(-0.5)
        assert tensor._version == version + 2  # the 2.0 override and its restore only
    finally:
        net.restore()


def test_multiplier_on_the_device_compiles_once():
    """torch.compile specialises a graph on a multiplier that is a number (one graph per value, as datasets with
    different network_multiplier values would compile), and takes the device tensor as an input: one graph for
    every value."""
    import torch._dynamo

    from library.torch_compile import CompileReport

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 8), torch.randn(2, 8)
    lora = _patched(layer, lora_dim=2, alpha=2.0)
    counts = {}
    for kind in ("number", "tensor"):
        compiled = torch.compile(lambda t: layer(t), backend="eager")
        device_m = torch.tensor(1.0)
        report = CompileReport()
        for m in (1.0, -0.5, 2.0):
            if kind == "tensor":
                device_m.fill_(m)
            lora.multiplier = device_m if kind == "tensor" else m
            with torch.no_grad():
                want = torch.nn.functional.linear(x, layer.weight, layer.bias) + m * lora.scale * (
                    x @ lora.lora_down.weight.t() @ lora.lora_up.weight.t())
                torch.testing.assert_close(compiled(x), want, atol=1e-6, rtol=1e-5)
        counts[kind] = report.delta()["graphs"]
    assert counts["tensor"] == 1 and counts["number"] > 1, counts


# ---------------------------------------------------------------------------------------------------------------------
# save / load


def _sd_scripts_max_norm(state_dict, max_norm):
    """sd-scripts' `LoRANetwork.apply_max_norm_regularization`, module by module, on a state dict (the reference)."""
    keys_scaled, norms = 0, []
    for key in [k for k in state_dict if "lora_down" in k and "weight" in k]:
        up_key, alpha_key = key.replace("lora_down", "lora_up"), key.replace("lora_down.weight", "alpha")
        down, up, alpha = state_dict[key], state_dict[up_key], state_dict[alpha_key]
        scale = alpha / down.shape[0]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown = updown * scale
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = torch.clamp(norm, max=max_norm) / norm
        if ratio != 1:
            keys_scaled += 1
            state_dict[up_key] = up * ratio**0.5
            state_dict[key] = down * ratio**0.5
        norms.append(float(updown.norm() * ratio))
    return keys_scaled, sum(norms) / len(norms), max(norms)


def test_max_norm_equals_sd_scripts_per_module_loop(sd1):
    """--scale_weight_norms, batched per shape (networks/max_norm.py), against sd-scripts' loop: Linear, 1x1 conv
    (SD1's proj_in/out) and 3x3 conv (C3Lier) modules, some above the bound and some below, mixed alphas."""
    from networks.max_norm import max_norm_

    net = create_network(sd1, args(network_dim=4, network_alpha=2, network_args=["conv_dim=2", "conv_alpha=4"]))
    randomize(net, seed=3, std=0.3)
    kinds = {(m.is_linear, m.is_conv3x3) for m in net.loras}
    assert kinds == {(True, False), (False, False), (False, True)}
    bound = _sd_scripts_max_norm(dict(net.state_dict()), 1e9)[1]  # the mean norm: some above, some below
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    expected = _sd_scripts_max_norm(reference, bound)
    logs = max_norm_(net.loras, bound)
    assert 0 < expected[0] < len(net.loras)  # some scaled, some not
    assert int(logs["max_norm/keys_scaled"]) == expected[0]
    assert float(logs["max_norm/average_key_norm"]) == pytest.approx(expected[1], rel=1e-5)
    assert float(logs["max_norm/max_key_norm"]) == pytest.approx(expected[2], rel=1e-5)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-7)
    assert float(max_norm_(net.loras, bound * 1.0001)["max_norm/keys_scaled"]) == 0  # under the bound now


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_save_load_round_trip(sd1, tmp_path):
    net = LoRANetwork(sd1, lora_dim=4, alpha=2.0, conv_lora_dim=2, conv_alpha=1.0)
    randomize(net)
    path = str(tmp_path / "lora.safetensors")
    md = {"ss_network_dim": 4, "ss_network_alpha": 2.0, "ss_training_comment": None, "modelspec.title": "t"}
    written = net.save_weights(path, None, md)

    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == set(net.state_dict())
    assert meta == written
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_training_comment"] == "None" and meta["ss_network_alpha"] == "2.0"
    for k, v in tensors.items():
        if k.endswith(".alpha"):
            assert v.dim() == 0 and v.dtype == torch.float32
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 2.0

    # sshs_model_hash = sha256 of the bytes after the header, recomputed from the file
    raw = _file_bytes(path)
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["sshs_model_hash"] == safe_io.addnet_hash_file(path)
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    buf = safetensors.torch.save(tensors, ss_only)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]

    # load into a fresh network
    other = LoRANetwork(build_tiny_model("sd1"), lora_dim=4, alpha=2.0, conv_lora_dim=2, conv_alpha=1.0)
    info = other.load_weights(path)
    assert not info["missing"] and not info["ignored"]
    for (k, a), (k2, b) in zip(sorted(net.state_dict().items()), sorted(other.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert not [f for f in os.listdir(tmp_path) if f != "lora.safetensors"]  # no temp files left


@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float16), ("bf16", torch.bfloat16),
                                            ("float", torch.float32), ("fp16", torch.float16)])
def test_save_dtype_alpha_is_float_in_save_dtype(sd1, tmp_path, dtype, expected):
    net = LoRANetwork(sd1, lora_dim=4, alpha=1)  # int alpha (argparse default) must still be saved as float
    path = tmp_path / "x.safetensors"
    net.save_weights(path, dtype, None)
    sd = safetensors.torch.load_file(str(path))
    assert {v.dtype for v in sd.values()} == {expected}
    assert all(v.dim() == 0 and v.item() == 1.0 for k, v in sd.items() if k.endswith(".alpha"))


def test_overwrite_refused_and_file_untouched(sd1, tmp_path):
    net = LoRANetwork(sd1, lora_dim=2)
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError) as e:
        net.save_weights(str(path), None, {})
    assert str(path) in str(e.value) and "--overwrite" in str(e.value)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["out.safetensors"]
    net.save_weights(str(path), None, {}, overwrite=True)
    assert safetensors.torch.load_file(str(path)).keys() == net.state_dict().keys()


def test_safe_io_helpers(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    safe_io.atomic_write_bytes(p, b"one")
    assert p.read_bytes() == b"one"
    with pytest.raises(FileExistsError, match="--overwrite"):
        safe_io.atomic_write_bytes(p, b"two")
    safe_io.atomic_write_bytes(p, b"two", overwrite=True)
    assert p.read_bytes() == b"two"
    with pytest.raises(FileExistsError, match="--force"):
        safe_io.check_writable(p, False, "--force")
    safe_io.check_writable(p, True)
    safe_io.check_writable(tmp_path / "new" / "deeper" / "x", False)

    # hashes on a tensor big enough for the legacy window (1 MiB .. 1 MiB + 64 KiB)
    t = {"w": torch.arange(400_000, dtype=torch.float32)}
    md = {"ss_a": "1", "other": "x"}
    model_hash, legacy = safe_io.safetensors_hashes(t, md)
    f = tmp_path / "t.safetensors"
    safe_io.atomic_save_safetensors(t, f, {"ss_a": "1"})
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert legacy == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]  # same ss_* header as this file
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]

    old, new = safe_io.model_hashes(f)
    assert old == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert new == hashlib.sha256(raw).hexdigest()
    assert safe_io.model_hashes(tmp_path) == (None, None)


def _save(net, path, **kw):
    net.save_weights(str(path), None, {}, **kw)
    return str(path)


def test_dims_from_weights_reads_rank_and_alpha_per_kind(sd1, tmp_path):
    from networks.lora import dims_from_weights

    def kinds(path):
        return {k: v for k, v in dims_from_weights(path).items() if k != "modules"}

    net = create_network(sd1, args(network_dim=3, network_alpha=1.5, network_args=["conv_dim=2", "conv_alpha=0.5"]))
    path = _save(net, tmp_path / "c3lier.safetensors")
    assert kinds(path) == {"network_dim": 3, "network_alpha": 1.5, "conv_dim": 2, "conv_alpha": 0.5}
    assert dims_from_weights(path)["modules"] == {m.lora_name: (2, 0.5) if m.is_conv3x3 else (3, 1.5)
                                                  for m in net.loras}
    lierla = _save(create_network(sd1, args(network_dim=5, network_alpha=2)), tmp_path / "lierla.safetensors")
    assert kinds(lierla) == {"network_dim": 5, "network_alpha": 2.0}
    sd = safetensors.torch.load_file(lierla)
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    safetensors.torch.save_file(no_alpha, str(tmp_path / "no_alpha.safetensors"))
    assert kinds(str(tmp_path / "no_alpha.safetensors")) == {"network_dim": 5, "network_alpha": 5.0}
    # alpha 0 means alpha = rank too (sd-scripts' LoRAModule): taken as 0 it loaded a LoRA of scale 0, which had no
    # effect and no gradients
    zero = str(tmp_path / "alpha0.safetensors")
    safetensors.torch.save_file({k: torch.zeros(()) if k.endswith(".alpha") else v for k, v in sd.items()}, zero)
    assert kinds(zero) == {"network_dim": 5, "network_alpha": 5.0}
    for built in (create_network(sd1, args(network_dim=5, network_alpha=2)),
                  create_network(sd1, args(network_dim=5, network_alpha=5), dims_from_weights(zero)["modules"])):
        built.load_weights(zero)
        assert all(float(m.alpha) == 5.0 and m.scale == 1.0 for m in built.loras)


def test_a_file_with_per_module_ranks_is_continued_module_for_module(sd1, tmp_path):
    """A resized LoRA (ranks differ per module): --dim_from_weights builds each module at the file's rank and alpha,
    so the file loads and the network computes what the file does; a network of one rank cannot load it."""
    from networks.lora import dims_from_weights

    net = create_network(sd1, args(network_dim=5, network_alpha=2))
    with torch.no_grad():
        for m in net.loras:
            m.lora_up.weight.normal_()
    sd = net.kohya_state_dict()
    resized = {}
    for i, m in enumerate(net.loras):  # ranks 1..5 and alphas r/2 in turn, as a dynamic resize leaves them
        r, n = 1 + i % 5, m.lora_name
        resized[f"{n}.lora_down.weight"] = sd[f"{n}.lora_down.weight"][:r].contiguous()
        resized[f"{n}.lora_up.weight"] = sd[f"{n}.lora_up.weight"][:, :r].contiguous()
        resized[f"{n}.alpha"] = torch.tensor(r / 2)
    path = str(tmp_path / "resized.safetensors")
    safetensors.torch.save_file(resized, path)
    dims = dims_from_weights(path)
    assert dims["network_dim"] in range(1, 6) and len(dims["modules"]) == len(net.loras)
    with pytest.raises(LoRAWeightsError, match="rank mismatch"):
        create_network(sd1, args(network_dim=dims["network_dim"], network_alpha=dims["network_alpha"])).load_weights(path)
    cont = create_network(sd1, args(network_dim=dims["network_dim"], network_alpha=dims["network_alpha"]),
                          dims["modules"])
    assert cont.load_weights(path)["missing"] == []
    for i, m in enumerate(cont.loras):
        r = 1 + i % 5
        assert (m.lora_dim, float(m.alpha)) == (r, r / 2)
        up, down = (resized[f"{m.lora_name}.lora_{p}.weight"].float().flatten(1) for p in ("up", "down"))
        want = up @ down
        torch.testing.assert_close(m.delta_weight().reshape(want.shape), want * (r / 2) / r)
    saved = cont.kohya_state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in resized.items()}


def test_dims_from_weights_reports_the_most_common_rank_of_each_kind(tmp_path):
    """A resized file (ranks differ per module): --dim_from_weights sets --network_dim/--network_alpha (and so
    ss_network_dim / ss_network_alpha in the continued file) to the rank and alpha most of its modules have, per kind
    (Linear/1x1 vs 3x3 conv), as the docstring says; not to a rank only one outlier module has."""
    from networks.lora import dims_from_weights

    sd = {}

    def module(name, rank, alpha, conv=False):
        sd[f"{name}.lora_down.weight"] = torch.zeros((rank, 8, 3, 3) if conv else (rank, 8))
        sd[f"{name}.lora_up.weight"] = torch.zeros((8, rank, 1, 1) if conv else (8, rank))
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))

    for i in range(3):
        module(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q{i}", 4, 2)
    module("lora_unet_mid_block_attentions_0_proj_in", 8, 8)
    module("lora_unet_down_blocks_0_resnets_0_conv1", 2, 1, conv=True)
    module("lora_unet_down_blocks_0_resnets_0_conv2", 2, 1, conv=True)
    module("lora_unet_down_blocks_0_resnets_1_conv1", 6, 3, conv=True)
    path = str(tmp_path / "resized.safetensors")
    safetensors.torch.save_file(sd, path)
    dims = dims_from_weights(path)
    assert {k: v for k, v in dims.items() if k != "modules"} == {"network_dim": 4, "network_alpha": 2.0,
                                                                 "conv_dim": 2, "conv_alpha": 1.0}
    assert dims["modules"]["lora_unet_mid_block_attentions_0_proj_in"] == (8, 8.0)


def test_a_unet_only_file_continued_without_the_flag_says_it_trains_no_text_encoder(sd1, caplog):
    """--dim_from_weights builds exactly the file's modules: a UNet-only file gives no text-encoder LoRA even
    without --network_train_unet_only (as sd-scripts); a warning says so, and not when the flag is given."""
    net = create_network(sd1, args(network_dim=2))
    unet_only = {lora.lora_name: (2, 2.0) for lora in net.unet_loras}
    with caplog.at_level(logging.WARNING):
        assert not create_network(sd1, args(network_dim=2), unet_only).text_encoder_loras
    assert "the file has no text-encoder modules, so this run trains none" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_network(sd1, args(network_dim=2, network_train_unet_only=True), unet_only)
    assert "text-encoder modules" not in caplog.text


def test_sdxl_file_with_diffusers_block_names_loads_as_sgm(tmp_path):
    """An SDXL kohya file whose UNet names use diffusers' blocks (lora_unet_down_blocks_1_attentions_0_..., as other
    trainers write them): --network_weights, --dim_from_weights and --base_weights read it as the SGM-named file
    (sd-scripts' convert_diffusers_to_sai_if_needed); it was refused as made for another model."""
    from networks.lora import dims_from_weights
    from networks.merge import merge_lora_file

    model = build_tiny_model("sdxl")
    net = create_network(model, args(network_dim=4, network_args=["conv_dim=2"]))
    randomize(net, seed=3, std=0.1)
    sgm_path = _save(net, tmp_path / "sgm.safetensors")
    by_module = {id(lora.org_module): lora.lora_name for lora in net.unet_loras}
    renamed = {by_module[id(m)]: "lora_unet_" + n.replace(".", "_") for n, m in model.unet.named_modules()
               if id(m) in by_module}
    assert len(renamed) == len(net.unet_loras) and any("down_blocks" in v for v in renamed.values())
    sd = safetensors.torch.load_file(sgm_path)
    diffusers_sd = {}
    for k, v in sd.items():
        name, _, part = k.partition(".")
        diffusers_sd[f"{renamed.get(name, name)}.{part}"] = v
    assert any("input_blocks" in k for k in sd) and not any("input_blocks" in k for k in diffusers_sd)
    path = str(tmp_path / "diffusers_names.safetensors")
    safetensors.torch.save_file(diffusers_sd, path)

    fresh = create_network(model, args(network_dim=4, network_args=["conv_dim=2"]))
    assert fresh.load_weights(path)["missing"] == []
    assert {k: torch.equal(v, sd[k]) for k, v in fresh.kohya_state_dict().items()} == {k: True for k in sd}
    dims = dims_from_weights(path)
    built = create_network(model, args(network_dim=dims["network_dim"], network_alpha=dims["network_alpha"]),
                           dims["modules"])
    assert sorted(lora.lora_name for lora in built.loras) == sorted(lora.lora_name for lora in net.loras)
    merged = {}
    for p in (sgm_path, path):
        m = build_tiny_model("sdxl")
        assert merge_lora_file(m, p) == len(net.loras)
        merged[p] = m.unet.state_dict()
    assert all(torch.equal(merged[sgm_path][k], merged[path][k]) for k in merged[path])

    # one module under both names: which to use cannot be told (one of them was kept silently)
    twice = {**sd, **{k: v.clone() for k, v in diffusers_sd.items() if k.startswith(next(iter(renamed.values())) + ".")}}
    both = str(tmp_path / "both_names.safetensors")
    safetensors.torch.save_file(twice, both)
    for load in (lambda: fresh.load_weights(both), lambda: merge_lora_file(build_tiny_model("sdxl"), both)):
        with pytest.raises(LoRAWeightsError, match=f"both_names.safetensors: the module {next(iter(renamed))} is in "
                                                   "it twice"):
            load()


def test_conv_dim_0_file_loads_with_the_advice_given(sd1, tmp_path):
    """A file with the conv blocks' Linear/1x1 modules and no 3x3 convs (sd-scripts' conv_dim=0): a LierLa network
    refuses it naming conv_dim=0, and with that it loads (the advice did not work: conv_dim=0 meant LierLa here)."""
    net = create_network(sd1, args(network_dim=4, network_args=["conv_dim=0"]))
    assert not any(lora.is_conv3x3 for lora in net.loras)
    assert any("time_emb_proj" in lora.lora_name for lora in net.loras)
    path = _save(net, tmp_path / "c0.safetensors")
    with pytest.raises(LoRAWeightsError, match="pass --network_args conv_dim=0 conv_alpha=1"):
        create_network(sd1, args(network_dim=4)).load_weights(path)
    assert create_network(sd1, args(network_dim=4, network_args=["conv_dim=0", "conv_alpha=1"])).load_weights(
        path)["missing"] == []


def test_load_sdxl_lora_into_sd1_network(sd1, tmp_path):
    xl = LoRANetwork(build_tiny_model("sdxl"), lora_dim=4)
    path = _save(xl, tmp_path / "xl.safetensors")
    with pytest.raises(LoRAWeightsError) as e:
        LoRANetwork(sd1, lora_dim=4).load_weights(path)
    msg = str(e.value)
    assert path in msg and "SDXL" in msg and "SD1.x" in msg and "--sdxl" in msg


def test_load_rank_mismatch(sd1, tmp_path):
    path = _save(LoRANetwork(sd1, lora_dim=8), tmp_path / "r8.safetensors")
    with pytest.raises(LoRAWeightsError) as e:
        LoRANetwork(sd1, lora_dim=4).load_weights(path)
    msg = str(e.value)
    assert path in msg and "rank 8" in msg and "--network_dim 8" in msg

    c3 = _save(LoRANetwork(sd1, lora_dim=4, conv_lora_dim=8), tmp_path / "c3.safetensors")
    with pytest.raises(LoRAWeightsError, match="conv_dim=8"):
        LoRANetwork(sd1, lora_dim=4, conv_lora_dim=2).load_weights(c3)
    with pytest.raises(LoRAWeightsError, match=r"C3Lier.*--network_args conv_dim=8 conv_alpha=1"):
        LoRANetwork(sd1, lora_dim=4).load_weights(c3)


def _meta_model(arch):
    with torch.device("meta"):
        return build_from_config(arch_config(arch), tokenizers=[])


def test_load_other_architecture_same_names(tmp_path):
    # full-size SD2 and SD1 share every module name (the tiny models also share the widths): only shapes differ.
    # The LoRA tensors are real CPU tensors (rank 1) around weightless (meta) base models.
    sd1, sd2 = _meta_model("sd1"), _meta_model("sd2")
    path = _save(LoRANetwork(sd2, lora_dim=1), tmp_path / "sd2.safetensors")
    with pytest.raises(LoRAWeightsError) as e:  # SD2's text encoder has 23 layers, SD1's 12
        LoRANetwork(sd1, lora_dim=1).load_weights(path)
    msg = str(e.value)
    assert "do not exist in this SD1.x model" in msg and "made for SD2.x" in msg and path in msg
    path = _save(LoRANetwork(sd2, lora_dim=1, train_text_encoder=False), tmp_path / "sd2_unet.safetensors")
    with pytest.raises(LoRAWeightsError) as e:
        LoRANetwork(sd1, lora_dim=1, train_text_encoder=False).load_weights(path)
    msg = str(e.value)
    assert "shape mismatch" in msg and "made for SD2.x" in msg and path in msg
    print(msg)


def test_a_text_encoder_only_file_is_described_by_its_text_encoder_width():
    """A file with no UNet cross-attention module (a text-encoder-only LoRA) is placed by its q_proj input width:
    768 SD1.x, 1024 SD2.x; the refusal sends the user to the base model named here (an SD2 file called SD1.x would
    send them to the wrong one)."""
    from networks.lora import _describe_file

    def te_file(width, rank=4):
        n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        return {f"{n}.lora_down.weight": torch.zeros(rank, width), f"{n}.lora_up.weight": torch.zeros(width, rank),
                f"{n}.alpha": torch.tensor(1.0)}

    assert _describe_file(te_file(1024)) == ("The file appears to be made for SD2.x (rank 4; 1 text-encoder and 0 "
                                             "UNet modules).")
    assert "made for SD1.x (rank 8;" in _describe_file(te_file(768, rank=8))


def test_load_unet_only_file_into_network_with_te(sd1, tmp_path, caplog):
    src = LoRANetwork(sd1, lora_dim=4, train_text_encoder=False)
    randomize(src)
    path = _save(src, tmp_path / "unet_only.safetensors")
    dst = LoRANetwork(build_tiny_model("sd1"), lora_dim=4)
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        info = dst.load_weights(path)
    assert "text-encoder" in caplog.text and path in caplog.text
    assert len(info["missing"]) == len(dst.text_encoder_loras)
    for m in dst.unet_loras:
        assert torch.equal(m.lora_up.weight, src.get_submodule(m.lora_name).lora_up.weight)
    assert all(torch.count_nonzero(m.lora_up.weight) == 0 for m in dst.text_encoder_loras)

    # and the other way round: TE keys are ignored (with a warning) by a UNet-only network
    full = _save(LoRANetwork(sd1, lora_dim=4), tmp_path / "full.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        info = LoRANetwork(sd1, lora_dim=4, train_text_encoder=False).load_weights(full)
    assert info["ignored"] and "ignored" in caplog.text


def test_load_missing_alpha_and_file_alpha(sd1, tmp_path):
    src = LoRANetwork(sd1, lora_dim=4, alpha=2.0)
    randomize(src)
    sd = src.kohya_state_dict()
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    p = tmp_path / "noalpha.safetensors"
    safetensors.torch.save_file(no_alpha, str(p))
    dst = LoRANetwork(build_tiny_model("sd1"), lora_dim=4, alpha=2.0)
    dst.load_weights(str(p))
    assert all(m.alpha.item() == 4.0 and m.scale == 1.0 for m in dst.loras)

    p2 = _save(src, tmp_path / "a2.safetensors")
    dst = LoRANetwork(build_tiny_model("sd1"), lora_dim=4, alpha=1.0)
    dst.load_weights(p2)  # sd-scripts: the file's alpha wins
    assert all(m.scale == 0.5 for m in dst.loras)


def test_load_rejects_non_kohya_files(sd1, tmp_path):
    net = LoRANetwork(sd1, lora_dim=4)
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(LoRAWeightsError, match="only .safetensors"):
        net.load_weights(str(ckpt))
    with pytest.raises(LoRAWeightsError, match="not found"):
        net.load_weights(str(tmp_path / "nope.safetensors"))
    sd = net.kohya_state_dict()
    name = net.unet_loras[0].lora_name
    sd[f"{name}.lora_mid.weight"] = torch.zeros(1)
    p = tmp_path / "lyco.safetensors"
    safetensors.torch.save_file(sd, str(p))
    with pytest.raises(LoRAWeightsError, match="LyCORIS"):
        net.load_weights(str(p))
    p = tmp_path / "peft.safetensors"
    safetensors.torch.save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}, str(p))
    with pytest.raises(LoRAWeightsError, match="diffusers/PEFT"):
        net.load_weights(str(p))


def test_a_partial_file_is_refused_naming_how_many_modules_it_lacks(sd1, tmp_path):
    """--network_weights with some but not all of a part's modules (a block-wise file, or one edited by hand) into a
    full network is refused, naming the count: loaded, the modules it lacks would silently restart from zero while
    the user believes the whole LoRA is being continued."""
    src = LoRANetwork(sd1, lora_dim=4)
    randomize(src)
    sd = src.kohya_state_dict()
    dropped = [m.lora_name for m in src.unet_loras if "mid_block" in m.lora_name]
    assert 0 < len(dropped) < len(src.unet_loras)
    partial = {k: v for k, v in sd.items() if k.split(".")[0] not in dropped}
    p = str(tmp_path / "no_mid.safetensors")
    safetensors.torch.save_file(partial, p)
    with pytest.raises(LoRAWeightsError, match=rf"no_mid\.safetensors: lacks {len(dropped)} of the "
                                               rf"{len(src.unet_loras)} UNet LoRA modules"):
        LoRANetwork(build_tiny_model("sd1"), lora_dim=4).load_weights(p)
    te_dropped = src.text_encoder_loras[0].lora_name
    p = str(tmp_path / "te_short.safetensors")
    safetensors.torch.save_file({k: v for k, v in sd.items() if k.split(".")[0] != te_dropped}, p)
    with pytest.raises(LoRAWeightsError, match=rf"lacks 1 of the {len(src.text_encoder_loras)} text-encoder LoRA"):
        LoRANetwork(build_tiny_model("sd1"), lora_dim=4).load_weights(p)


def test_a_module_without_its_down_or_up_weight_is_refused_by_every_reader(sd1, tmp_path):
    """A file where one module has lora_up but no lora_down (truncated or hand-edited) is "not a plain kohya LoRA"
    naming that module, for --network_weights, --dim_from_weights and --base_weights alike, not a KeyError
    traceback from deep in the loader."""
    from networks.lora import dims_from_weights
    from networks.merge import merge_lora_file

    net = LoRANetwork(sd1, lora_dim=4)
    sd = net.kohya_state_dict()
    name = net.unet_loras[0].lora_name
    del sd[f"{name}.lora_down.weight"]
    p = str(tmp_path / "cut.safetensors")
    safetensors.torch.save_file(sd, p)
    msg = rf"cut\.safetensors.*not a plain kohya LoRA.*{name}\.<lora_down/lora_up missing>"
    with pytest.raises(LoRAWeightsError, match=msg):
        LoRANetwork(build_tiny_model("sd1"), lora_dim=4).load_weights(p)
    with pytest.raises(LoRAWeightsError, match=msg):
        merge_lora_file(build_tiny_model("sd1"), p)
    with pytest.raises(LoRAWeightsError, match=r"--dim_from_weights: .*cut\.safetensors is not a plain kohya LoRA"):
        dims_from_weights(p)


def test_text_encoder_only_network_loads_the_text_encoder_of_a_c3lier_file(sd1, tmp_path, caplog):
    """--network_train_text_encoder_only continuing a C3Lier file: the text-encoder modules load with the file's
    values and the UNet ones (3x3 convs included) are ignored with a warning; asking for conv_dim there (a network
    that trains no UNet) would refuse a file the run can use."""
    src = LoRANetwork(sd1, lora_dim=4, alpha=2.0, conv_lora_dim=2, conv_alpha=1.0)
    randomize(src)
    path = _save(src, tmp_path / "c3.safetensors")
    dst = LoRANetwork(build_tiny_model("sd1"), lora_dim=4, alpha=2.0, train_unet=False)
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        info = dst.load_weights(path)
    assert info["missing"] == [] and info["ignored"] == sorted(m.lora_name for m in src.unet_loras)
    assert "this network does not train the UNet" in caplog.text
    for m in dst.text_encoder_loras:
        assert torch.equal(m.lora_down.weight, src.get_submodule(m.lora_name).lora_down.weight)


def test_save_then_load_round_trip_with_fp16_file(sd1, tmp_path):
    src = LoRANetwork(sd1, lora_dim=4)
    randomize(src)
    path = str(tmp_path / "h.safetensors")
    src.save_weights(path, torch.float16, {})
    dst = LoRANetwork(build_tiny_model("sd1"), lora_dim=4)
    dst.load_weights(path)
    for a, b in zip(src.parameters(), dst.parameters()):
        torch.testing.assert_close(a.half().float(), b)


# ---------------------------------------------------------------------------------------------------------------------
# create_network / optimiser groups


def test_create_network_from_args(sd1):
    net = create_network(sd1, args())
    assert net.lora_dim == 4 and net.alpha == 1.0 and net.conv_lora_dim is None
    assert net.unet_loras[0].scale == 0.25

    net = create_network(sd1, args(network_dim=8, network_alpha=8, network_args=["conv_dim=4"]))
    conv = [m for m in net.unet_loras if m.is_conv3x3]
    assert conv and all(m.lora_dim == 4 and m.scale == 0.25 for m in conv)  # conv_alpha defaults to 1.0
    assert all(m.lora_dim == 8 and m.scale == 1.0 for m in net.unet_loras if not m.is_conv3x3)
    assert net.network_args == {"conv_dim": "4"}

    net = create_network(sd1, args(network_args=["conv_dim=4", "conv_alpha=2", "rank_dropout=0.1",
                                                 "module_dropout=0.2"], network_dropout=0.1))
    m = net.unet_loras[0]
    assert (m.dropout, m.rank_dropout, m.module_dropout) == (0.1, 0.1, 0.2)
    assert {x.scale for x in net.unet_loras if x.is_conv3x3} == {0.5}

    with pytest.raises(LoRAWeightsError, match="'conv_dimm'"):
        create_network(sd1, args(network_args=["conv_dimm=4"]))
    with pytest.raises(LoRAWeightsError, match="key=value"):
        create_network(sd1, args(network_args=["conv_dim"]))
    with pytest.raises(LoRAWeightsError, match="conv_dim"):
        parse_network_args(["conv_dim=abc"])


def test_network_args_integer_keys_refuse_fractions_and_none_means_unset():
    """conv_dim=2.5 is refused (it was read as 2: a rank the user did not ask for, and the file's metadata would
    say 2.5 via ss_network_args); "None" leaves a key unset, as sd-scripts' kwargs do."""
    with pytest.raises(LoRAWeightsError, match=r"--network_args conv_dim='2.5': expected an integer"):
        parse_network_args(["conv_dim=2.5"])
    assert parse_network_args(["conv_dim=2.0", "conv_alpha=0.5", "rank_dropout=None"]) == {
        "conv_dim": 2, "conv_alpha": 0.5, "rank_dropout": None}


def test_network_train_unet_only_drops_te_keys(sd1, tmp_path):
    net = create_network(sd1, args(network_train_unet_only=True))
    assert not net.text_encoder_loras
    assert not [k for k in net.state_dict() if k.startswith("lora_te")]
    path = _save(net, tmp_path / "u.safetensors")
    assert not [k for k in safetensors.torch.load_file(path) if k.startswith("lora_te")]
    assert [g["name"] for g in net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)] == ["unet"]


def test_optimizer_param_groups(sd1):
    net = LoRANetwork(sd1, lora_dim=2)
    te_params = {id(p) for m in net.text_encoder_loras for p in m.parameters()}
    unet_params = {id(p) for m in net.unet_loras for p in m.parameters()}

    groups = net.prepare_optimizer_params(5e-6, 5e-5, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-6), ("unet", 5e-5)]
    assert {id(p) for p in groups[0]["params"]} == te_params
    assert {id(p) for p in groups[1]["params"]} == unet_params
    torch.optim.AdamW(groups)  # valid torch param groups

    groups = net.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups = net.prepare_optimizer_params(0, 1e-4, 1e-3)  # lr 0: the text encoder group is dropped
    assert [g["name"] for g in groups] == ["unet"]
    assert all(not p.requires_grad for m in net.text_encoder_loras for p in m.parameters())

    xl = LoRANetwork(build_tiny_model("sdxl"), lora_dim=2)
    groups = xl.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder1", 1e-5), ("textencoder2", 2e-5), ("unet", 1e-4)]
    n1 = sum(m.lora_name.startswith("lora_te1_") for m in xl.text_encoder_loras)
    assert len(groups[0]["params"]) == 2 * n1
    groups = xl.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert [g["name"] for g in groups] == ["textencoder", "unet"]


def test_loraplus_puts_the_up_weights_in_their_own_group(sd1):
    """--network_args loraplus_lr_ratio (sd-scripts' LoRA+): per part, the up weights in a "<name> plus" group at
    lr x ratio (the part's own ratio first); the ratios reach ss_network_args; a bad value names the key."""
    net = create_network(sd1, args(network_dim=2, network_args=["loraplus_lr_ratio=16",
                                                                "loraplus_text_encoder_lr_ratio=4"]))
    groups = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("textencoder", 1e-5), ("textencoder plus", 4e-5), ("unet", 1e-4), ("unet plus", 1.6e-3)]
    assert {id(p) for p in groups[3]["params"]} == {id(m.lora_up.weight) for m in net.unet_loras}
    assert {id(p) for p in groups[2]["params"]} == {id(m.lora_down.weight) for m in net.unet_loras}
    assert {id(p) for p in groups[1]["params"]} == {id(m.lora_up.weight) for m in net.text_encoder_loras}
    assert net.network_args == {"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}
    only_unet = create_network(sd1, args(network_dim=2, network_args=["loraplus_unet_lr_ratio=8"]))
    assert [(g["name"], g["lr"]) for g in only_unet.prepare_optimizer_params(None, None, 1e-3)] == [
        ("textencoder", 1e-3), ("unet", 1e-3), ("unet plus", 8e-3)]
    assert [g["name"] for g in only_unet.prepare_optimizer_params(0, None, 1e-3)] == ["unet", "unet plus"]
    with pytest.raises(LoRAWeightsError, match="loraplus_lr_ratio='x': expected a number"):
        create_network(sd1, args(network_args=["loraplus_lr_ratio=x"]))


def test_network_state_dict_is_only_lora(sd1):
    net = LoRANetwork(sd1, lora_dim=2)
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith(("lora_down.weight", "lora_up.weight",
                                                                         ".alpha")) for k in net.state_dict())
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(m.lora_down.weight.numel() + m.lora_up.weight.numel() for m in net.loras)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)  # picklable / plain tensors
