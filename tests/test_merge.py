"""--base_weights (networks/merge.py): LoRA files merged into the base model equal the model with those LoRAs
applied, at their multipliers; files for another model are refused naming them."""
import copy

import pytest
import torch

from library.conditioning import encode_prompts, unet_forward
from library.tiny_models import build_tiny_model
from networks.lora import LoRANetwork, LoRAWeightsError
from networks.merge import merge_base_weights
from tests.test_train_e2e import _dataset, _train


def _random_lora(model, path, seed, **kw):
    torch.manual_seed(seed)
    net = LoRANetwork(model, **kw)
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.05)
    net.save_weights(path)
    return net


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600])
    with torch.no_grad():
        cond = encode_prompts(model, ["a photo of sks dog", "a dog"])
        return cond.context, unet_forward(model, x, t, cond)


def test_merged_weights_equal_the_loras_applied(tmp_path):
    """Two LoRAs (C3Lier with text encoder at 0.6; LierLa with its own alpha at the default 1.0) merged into SD1
    give the text-encoder and UNet outputs of the model with both applied."""
    model = build_tiny_model("sd1")
    merged = copy.deepcopy(model)
    a = _random_lora(model, tmp_path / "a.safetensors", 1, lora_dim=4, alpha=2, conv_lora_dim=2, conv_alpha=1)
    b = _random_lora(model, tmp_path / "b.safetensors", 2, lora_dim=3, alpha=6, train_text_encoder=False)
    a.set_multiplier(0.6)
    a.apply_to()
    b.apply_to()
    expected = _outputs(model)
    lines = merge_base_weights(merged, [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], [0.6])
    assert lines[0].endswith(f"a.safetensors ({len(a.loras)} modules, multiplier 0.6) into the base model")
    assert "multiplier 1)" in lines[1]
    got = _outputs(merged)
    b.restore()  # the last applied first
    a.restore()
    base = _outputs(model)
    assert (expected[1] - base[1]).abs().max() > 1e-3 and (expected[0] - base[0]).abs().max() > 1e-3
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


def test_a_lora_for_another_model_or_format_is_refused(tmp_path):
    sdxl_lora = tmp_path / "xl.safetensors"
    _random_lora(build_tiny_model("sdxl"), sdxl_lora, 0, lora_dim=4, alpha=4)
    with pytest.raises(LoRAWeightsError, match=r"--base_weights .*xl\.safetensors: \d+ of its \d+ LoRA modules do "
                                               r"not exist in this model .*made for SDXL"):
        merge_base_weights(build_tiny_model("sd1"), [str(sdxl_lora)])
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(LoRAWeightsError, match=r"--base_weights .*x\.ckpt: only \.safetensors LoRA files"):
        merge_base_weights(build_tiny_model("sd1"), [str(tmp_path / "x.ckpt")])
    with pytest.raises(LoRAWeightsError, match="--base_weights_multiplier has 2 values for 1 --base_weights files"):
        merge_base_weights(build_tiny_model("sd1"), [str(sdxl_lora)], [1.0, 0.5])


def test_training_on_top_of_base_weights(tiny, images, tmp_path, capsys):
    from library.model_util import load_model

    lora = tmp_path / "style.safetensors"
    _random_lora(load_model(tiny["sd1"]), lora, 3, lora_dim=4, alpha=4)
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "out", "--apt", "--base_weights", str(lora),
                  "--base_weights_multiplier", "0.5") == 0
    assert f"--base_weights: merged {lora} (" in capsys.readouterr().out
    assert _train(tiny["sd1"], _dataset(tmp_path, images), tmp_path / "bad", "--base_weights_multiplier", "0.5") == 2
    assert "--base_weights_multiplier is the weight of each --base_weights file: add the files" in capsys.readouterr().err


def test_a_module_of_another_size_or_an_empty_file_is_refused_naming_it(tmp_path):
    """A file whose module names fit but whose sizes do not (a LoRA for another model of the same layout, or an edited
    one) is a LoRAWeightsError naming the file, the tensor and both shapes, not a reshape traceback; an empty file is
    not merged as "0 modules" but refused as no LoRA."""
    import safetensors.torch

    model = build_tiny_model("sd1")
    path = tmp_path / "a.safetensors"
    _random_lora(model, path, 0, lora_dim=4, alpha=4)
    sd = safetensors.torch.load_file(str(path))
    name = sorted(k for k in sd if k.startswith("lora_unet_") and k.endswith("to_k.lora_down.weight"))[0]
    width = sd[name].shape[1]
    sd[name] = torch.zeros(4, width + 1)
    bad = tmp_path / "wider.safetensors"
    safetensors.torch.save_file(sd, str(bad))
    with pytest.raises(LoRAWeightsError, match=rf"--base_weights .*wider\.safetensors: {name} is \[4, {width + 1}\], "
                                               rf"this model needs \[4, {width}\]"):
        merge_base_weights(copy.deepcopy(model), [str(bad)])
    safetensors.torch.save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoRAWeightsError, match=r"empty\.safetensors: not a plain kohya LoRA"):
        merge_base_weights(model, [str(tmp_path / "empty.safetensors")])


def test_a_dora_or_lycoris_file_is_refused_not_merged_as_plain_lora(tmp_path):
    """A DoRA file (kohya keys plus `dora_scale`) merged as a plain LoRA would add up @ down without the magnitude
    rescaling: a base model silently unlike the one the file describes. It is refused naming the unexpected key,
    and the model is left as it was."""
    import safetensors.torch

    model = build_tiny_model("sd1")
    path = tmp_path / "a.safetensors"
    net = _random_lora(model, path, 0, lora_dim=4, alpha=4)
    sd = safetensors.torch.load_file(str(path))
    name = net.unet_loras[0].lora_name
    sd[f"{name}.dora_scale"] = torch.ones(1, net.unet_loras[0].lora_down.weight.shape[1])
    dora = tmp_path / "dora.safetensors"
    safetensors.torch.save_file(sd, str(dora))
    parts = [model.unet, *model.text_encoders]
    before = [copy.deepcopy(m.state_dict()) for m in parts]
    with pytest.raises(LoRAWeightsError, match=rf"dora\.safetensors: not a plain kohya LoRA .*: unexpected keys such as "
                                               rf"{name}\.dora_scale\. It looks like a DoRA file"):
        merge_base_weights(model, [str(dora)])
    assert all(torch.equal(v, b[k]) for m, b in zip(parts, before) for k, v in m.state_dict().items())
