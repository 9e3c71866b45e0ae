"""--fp8_base / --fp8_base_unet (library/fp8_base.py): the frozen Linear/Conv2d weights in float8_e4m3fn give the
same outputs and LoRA gradients as a bf16 model whose weights were rounded to fp8, hold no bf16 copy of a weight
for the backward, and train end to end."""
import copy

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from library.fp8_base import FP8, compute_dtype, store_in_fp8
from library.tiny_models import build_tiny_model
from networks.lora import LoRANetwork
from tests.test_train_e2e import _dataset, _train

BF16 = torch.bfloat16


def _rounded_reference(module):
    """A copy whose Linear/Conv2d weights went through fp8 and back to bf16: what the fp8 layers compute with."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            m.weight.data = m.weight.data.to(FP8).to(BF16)
    return ref


def _unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        n = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, n, generator=g), "time_ids": torch.rand(batch, 6, generator=g)}
    return x, torch.tensor([10, 700][:batch]), c, kw


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fp8_unet_with_lora_equals_the_rounded_bf16_model(arch):
    """Forward output and every LoRA gradient bit-equal to the bf16 model with fp8-rounded weights under autocast
    (C3Lier, so the LoRA also wraps 3x3 convolutions); norms, embeddings and biases stay bf16."""
    model = build_tiny_model(arch)
    model.unet.to(BF16)
    ref_unet = _rounded_reference(model.unet)
    layers, saved = store_in_fp8(model.unet, BF16, "UNet")
    n_weights = sum(m.weight.numel() for m in model.unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    assert layers == sum(type(m) in (nn.Linear, nn.Conv2d) for m in model.unet.modules()) and saved == n_weights
    assert {p.dtype for n, p in model.unet.named_parameters() if n.endswith("weight") and "norm" in n} == {BF16}
    assert compute_dtype(model.unet) == model.unet.dtype == BF16 and model.unet.conv_in.weight.dtype == FP8
    assert type(model.unet).__name__ == "UNet2DConditionModel"

    grads = []
    for unet in (ref_unet, model.unet):
        ref_model = copy.copy(model)
        ref_model.unet = unet
        torch.manual_seed(3)
        net = LoRANetwork(ref_model, lora_dim=4, alpha=2, conv_lora_dim=2, train_text_encoder=False)
        for lora in net.loras:  # a nonzero up weight, so the gradient of the down weight is not zero either
            nn.init.normal_(lora.lora_up.weight, std=0.1)
        net.apply_to()
        x, t, c, kw = _unet_inputs(unet)
        with torch.autocast("cpu", dtype=BF16):
            out = unet(x, t, c.clone().requires_grad_(), **kw).sample
        out.float().square().mean().backward()
        grads.append((out, [p.grad for p in net.parameters()]))
    (out_ref, g_ref), (out, g) = grads
    assert out.dtype == BF16 and torch.equal(out, out_ref)
    assert len(g) == len(g_ref) and all(torch.equal(a, b) for a, b in zip(g, g_ref))
    assert sum(bool(a.abs().sum()) for a in g) == len(g)


def test_fp8_text_encoders_equal_the_rounded_bf16_model():
    """SDXL's two text encoders (the second with its projection): the same hidden states and pooled output, without
    autocast too (each layer casts to its compute dtype itself)."""
    model = build_tiny_model("sdxl")
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    for te in model.text_encoders:
        te.to(BF16)
        ref = _rounded_reference(te)
        store_in_fp8(te, BF16)
        assert te.get_input_embeddings().weight.dtype == BF16
        for ctx in (torch.autocast("cpu", dtype=BF16), torch.no_grad()):
            with ctx:
                a, b = ref(ids, output_hidden_states=True), te(ids, output_hidden_states=True)
            assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
            assert torch.equal(a[1], b[1])  # pooled / text embeds


def test_no_bf16_copy_of_a_weight_is_saved_for_the_backward():
    """What autograd keeps for the LoRA's backward: the fp8 weights themselves, never a bf16 copy (autocast on an
    fp8 parameter would keep one per layer: fp8 + bf16 of every weight for the whole step)."""
    model = build_tiny_model("sd1")
    model.unet.to(BF16)
    store_in_fp8(model.unet, BF16)
    net = LoRANetwork(model, lora_dim=4, alpha=4, train_text_encoder=False)
    net.apply_to()
    params = {p.data_ptr() for p in model.unet.parameters()}
    weights = [m.weight for m in model.unet.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x, t, c, kw = _unet_inputs(model.unet, batch=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=BF16):
        model.unet(x, t, c, **kw).sample.float().mean().backward()
    fp8_saved = [s for s in saved if s.dtype == FP8]
    assert len(fp8_saved) > len(weights) // 2 and all(s.data_ptr() in params for s in fp8_saved)
    copies = [w for w in weights for s in saved
              if s.dtype == BF16 and s.shape == w.shape and torch.equal(s, w.to(BF16))]
    assert not copies, [tuple(w.shape) for w in copies[:3]]


def test_weights_beyond_the_fp8_range_are_refused_naming_the_layer():
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(BF16).requires_grad_(False)
    block[1].weight.data[0, 0] = 500.0
    with pytest.raises(ValueError, match=r"UNet\.1: weights up to 500 do not fit float8_e4m3fn"):
        store_in_fp8(block, BF16, "UNet")
    with pytest.raises(ValueError, match="fp16 or bf16 compute dtype"):
        store_in_fp8(block, torch.float32)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_training_with_fp8_base(arch, tiny, images, tmp_path, capsys):
    """APT with --fp8_base trains, samples and saves; --fp8_base_unet leaves the text encoders alone; without
    mixed precision the flag is refused, naming what to add."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks dog --w 64 --h 64 --s 2 --d 1\n")
    out = tmp_path / "out"
    assert _train(tiny[arch], _dataset(tmp_path, images), out, "--fp8_base", "--mixed_precision", "bf16", "--apt",
                  "--sample_prompts", str(prompts), "--sample_every_n_steps", "3") == 0
    printed = capsys.readouterr().out
    assert "fp8 base weights: UNet," in printed and "fp8 base weights: text encoder 1," in printed
    assert len(list((out / "sample").glob("*.png"))) == 1
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert md["ss_fp8_base"] == "True" and all(torch.isfinite(u).all() for u in ups)
    assert sum(bool(u.abs().sum()) for u in ups) > len(ups) // 2
    if arch == "sdxl":
        assert _train(tiny[arch], _dataset(tmp_path, images), tmp_path / "unet", "--fp8_base_unet",
                      "--mixed_precision", "bf16", "--network_train_unet_only", "--cache_text_encoder_outputs") == 0
        printed = capsys.readouterr().out
        assert "fp8 base weights: UNet," in printed and "text encoder" not in printed.split("fp8 base weights: UNet")[1]
    assert _train(tiny[arch], _dataset(tmp_path, images), tmp_path / "bad", "--fp8_base") == 2
    assert "--fp8_base computes each layer in the --mixed_precision dtype: add --mixed_precision bf16" in \
        capsys.readouterr().err
