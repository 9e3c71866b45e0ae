"""Block-wise --network_args (networks/lora_blocks.py): sd-scripts' block numbering, lr-weight presets, per-block
ranks and learning rates, and the file they give loaded back by diffusers."""
import math
from argparse import Namespace

import pytest
import torch
from safetensors import safe_open

from library.tiny_models import build_tiny_model
from networks.lora import LoRAWeightsError, create_network
from networks.lora_blocks import BlockArgsError, _lr_list, block_index, parse_block_args
from tests.test_train_e2e import _count_peft_lora_modules, _dataset, _train, load_in_diffusers

SD1_BLOCKS = {  # lora name -> block, worked out by hand from sd-scripts' get_block_index
    "lora_unet_down_blocks_0_attentions_0_proj_in": 1,
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q": 2,
    "lora_unet_down_blocks_1_downsamplers_0_conv": 6,
    "lora_unet_down_blocks_2_attentions_1_proj_out": 8,
    "lora_unet_down_blocks_3_resnets_1_conv1": 11,
    "lora_unet_mid_block_attentions_0_proj_in": 12,
    "lora_unet_up_blocks_0_resnets_0_conv2": 13,
    "lora_unet_up_blocks_1_attentions_2_proj_out": 18,
    "lora_unet_up_blocks_2_upsamplers_0_conv": 21,
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": 24,
    "lora_te_text_model_encoder_layers_0_mlp_fc1": -1,
}
SDXL_BLOCKS = {
    "lora_unet_time_embed_0": 0,
    "lora_unet_input_blocks_4_1_proj_in": 5,
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k": 9,
    "lora_unet_middle_block_1_proj_out": 11,
    "lora_unet_output_blocks_0_1_proj_in": 13,
    "lora_unet_output_blocks_8_0_in_layers_2": 21,
    "lora_unet_out_2": 22,
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": -1,
}


def test_block_index_follows_sd_scripts_numbering():
    assert {n: block_index(n, "sd1") for n in SD1_BLOCKS} == SD1_BLOCKS
    assert {n: block_index(n, "sdxl") for n in SDXL_BLOCKS} == SDXL_BLOCKS


def test_lr_weight_presets_padding_and_threshold():
    cos = _lr_list("down_lr_weight", "cosine", 12)
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.0)
    assert cos[4] == pytest.approx(math.sin(math.pi * (7 / 11) / 2))
    assert _lr_list("up_lr_weight", "sine+0.5", 9) == pytest.approx([math.sin(math.pi * i / 16) + 0.5 for i in range(9)])
    assert _lr_list("down_lr_weight", "linear", 12)[3] == pytest.approx(3 / 11)
    assert _lr_list("down_lr_weight", "reverse_linear", 12)[3] == pytest.approx(8 / 11)
    assert _lr_list("down_lr_weight", "1,,0.5", 12) == [1.0, 0.0, 0.5] + [1.0] * 9  # empty -> 0, short -> 1.0
    assert _lr_list("mid_lr_weight", "0.5", 1) == [0.5] and _lr_list("mid_lr_weight", "1,2,3", 1) == [1.0]
    for n in (1, 3):  # a preset for the middle block was a ZeroDivisionError on SD1/SD2, and dropped a block on SDXL
        with pytest.raises(BlockArgsError, match="mid_lr_weight='cosine': the presets are for down_lr_weight"):
            _lr_list("mid_lr_weight", "cosine", n)
    plan = parse_block_args({"down_lr_weight": "0.2,0.5", "block_lr_zero_threshold": 0.3}, "sd1", 8, 4.0, None, None)
    assert plan.lr_weight == [0.0, 0.5] + [1.0] * 10 + [1.0] + [1.0] * 12
    assert plan.dims == [0] + [8] * 24 and plan.alphas == [4.0] * 25 and plan.conv_dims is None
    sdxl = parse_block_args({"mid_lr_weight": "0,0,2"}, "sdxl", 8, 4.0, 2, 1.0)
    assert sdxl.lr_weight == [1.0] + [1.0] * 9 + [0.0, 0.0, 2.0] + [1.0] * 9 + [1.0]
    assert sdxl.dims[10:13] == [0, 0, 8] and sdxl.conv_dims[10:13] == [0, 0, 2]
    assert parse_block_args({"conv_dim": 2}, "sd1", 8, 4.0, 2, 1.0) is None


def test_block_dims_give_each_module_its_blocks_rank_and_alpha():
    """SD1 with 25 block ranks (0: no modules there) and 3x3-conv ranks per block; SDXL with 23."""
    model = build_tiny_model("sd1")
    dims = [0, 2, 3, 0, 4, 5, 0, 6, 7, 0, 0, 0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    alphas = [float(d or 1) / 2 for d in dims]
    conv = [1] * 25
    conv[13] = 0
    args = Namespace(network_dim=4, network_alpha=4, network_args=[
        "block_dims=" + ",".join(map(str, dims)), "block_alphas=" + ",".join(map(str, alphas)),
        "conv_block_dims=" + ",".join(map(str, conv))])
    net = create_network(model, args)
    seen = set()
    for lora in net.unet_loras:
        i = block_index(lora.lora_name, "sd1")
        seen.add(i)
        expected = conv[i] if lora.is_conv3x3 else dims[i]
        assert lora.lora_dim == expected and lora.lora_down.weight.shape[0] == expected
        assert lora.alpha.item() == (1.0 if lora.is_conv3x3 else alphas[i])
    assert 13 not in seen and 24 in seen and any(lora.is_conv3x3 for lora in net.unet_loras)
    assert not any(lora.is_conv3x3 for lora in net.unet_loras if block_index(lora.lora_name, "sd1") == 13)
    assert len(net.text_encoder_loras) == 18 and all(lora.lora_dim == 4 for lora in net.text_encoder_loras)

    sdxl = create_network(build_tiny_model("sdxl"), Namespace(network_dim=4, network_alpha=4, network_args=[
        "block_dims=" + ",".join(["3"] * 13 + ["0"] * 10)]))
    assert sdxl.unet_loras and all(block_index(m.lora_name, "sdxl") <= 12 and m.lora_dim == 3 for m in sdxl.unet_loras)


def test_block_lr_weights_make_one_group_per_block():
    """down_lr_weight zeros: the down blocks get no modules; every other block a group "unet_block<i>" at
    unet_lr x its weight (mid 0.5, up cosine); the text encoder keeps its own lr."""
    model = build_tiny_model("sd1")
    net = create_network(model, Namespace(network_dim=4, network_alpha=4, network_args=[
        "down_lr_weight=zeros", "mid_lr_weight=0.5", "up_lr_weight=cosine"]))
    groups = net.prepare_optimizer_params(5e-5, 1e-3, 1e-4)
    lrs = {g["name"]: g["lr"] for g in groups}
    up = _lr_list("up_lr_weight", "cosine", 12)
    expected = {"textencoder": 5e-5, "unet_block12": 1e-3 * 0.5}
    expected.update({f"unet_block{13 + k}": 1e-3 * up[k] for k in range(3, 11)})  # up_blocks 1-3 attentions
    assert lrs == pytest.approx(expected)
    assert all(block_index(m.lora_name, "sd1") >= 12 for m in net.unet_loras)
    # up_blocks_3_attentions_2 is block 24, weight cos(...) = 0: no modules there either
    assert not any(block_index(m.lora_name, "sd1") == 24 for m in net.unet_loras)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == 2 * len(net.loras)


def test_lr_weight_equal_to_the_threshold_gets_no_modules():
    """sd-scripts' block_lr_zero_threshold: a block whose weight is at or below it gets no LoRA modules (docs:
    "重みがこの値以下の場合"). A weight exactly at the threshold must drop the block, as sd-scripts does, or the
    same config trains (and saves) modules sd-scripts leaves out."""
    plan = parse_block_args({"down_lr_weight": "1,0.5,0.6", "block_lr_zero_threshold": "0.5"}, "sd1", 8, 4.0,
                            None, None)
    assert plan.lr_weight[:3] == [1.0, 0.0, 0.6] and plan.dims[:3] == [8, 0, 8]
    net = create_network(build_tiny_model("sd1"), Namespace(network_dim=4, network_alpha=4, network_args=[
        "down_lr_weight=1,0.5,0.6", "block_lr_zero_threshold=0.5"]))
    blocks = {block_index(m.lora_name, "sd1") for m in net.unet_loras}
    assert 1 not in blocks and 2 in blocks  # down_blocks_0_attentions_0 (block 1) left out, attentions_1 kept


def test_conv_dim_with_block_dims_keeps_conv_alpha():
    """block_dims with a plain conv_dim / conv_alpha (no conv_block_dims): every 3x3 conv gets conv_dim and
    conv_alpha, the other modules their block's rank and network_alpha (sd-scripts). A 3x3 conv at network_alpha
    would train and save at another scale (alpha / rank: 0.5 / 2 here, not 4 / 2)."""
    dims = [0] + [2] * 24
    net = create_network(build_tiny_model("sd1"), Namespace(network_dim=4, network_alpha=4, network_args=[
        "block_dims=" + ",".join(map(str, dims)), "conv_dim=2", "conv_alpha=0.5"]))
    convs = [m for m in net.unet_loras if m.is_conv3x3]
    others = [m for m in net.unet_loras if not m.is_conv3x3]
    assert convs and others
    assert all(m.lora_dim == 2 and m.alpha.item() == 0.5 for m in convs)
    assert all(m.lora_dim == 2 and m.alpha.item() == 4.0 for m in others)


@pytest.mark.parametrize("network_args, message", [
    (["block_dims=1,2,3"], "block_dims needs 25 values for this model (one per UNet block), got 3"),
    (["block_dims=" + ",".join(["4"] * 24 + ["x"])], "block_dims='4,"),
    (["down_lr_weight=0.5"], "give comma-separated weights or one of cosine, sine, linear, reverse_linear, zeros"),
    (["block_alphas=" + ",".join(["1"] * 25)], "block_alphas is used with block_dims (or a block lr weight)"),
    (["block_lr_zero_threshold=0.1"], "block_lr_zero_threshold applies to down_lr_weight"),
    (["block_dims=" + ",".join(["4"] * 24 + ["4.5"])], "block_dims='4,"),  # a rank is not cut to 4 silently
    (["block_dims=" + ",".join(["4"] * 25), "conv_block_dims=" + ",".join(["1"] * 24 + ["-1"])],
     "block_dims / conv_block_dims must be >= 0"),
])
def test_bad_block_args_name_the_key(network_args, message):
    with pytest.raises(LoRAWeightsError, match=None) as e:
        create_network(build_tiny_model("sd1"), Namespace(network_dim=4, network_alpha=4, network_args=network_args))
    assert message in str(e.value)


def test_block_wise_lora_trains_and_loads_in_diffusers(tiny, images, tmp_path):
    """The real consumer: a LoRA with per-block ranks and block learning rates loads into diffusers module for
    module (every rank as written), and the UNet gives what this trainer's network gives."""
    from diffusers import StableDiffusionPipeline

    from library.conditioning import encode_prompts, unet_forward
    from library.model_util import load_model

    dims = ",".join(["0", "2", "3"] * 8 + ["4"])
    network_args = [f"block_dims={dims}", "up_lr_weight=1,1,1,1,2,2,2,0.5", "mid_lr_weight=0"]
    out = tmp_path / "out"
    assert _train(tiny["sd1"], _dataset(tmp_path, images), out, "--network_args", *network_args,
                  "--network_train_unet_only") == 0
    path = str(out / "lora.safetensors")
    with safe_open(path, "pt") as f:
        ranks = {k.split(".")[0]: f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
        assert f.metadata()["ss_network_args"].startswith('{"block_dims": "0,2,3')
    assert set(ranks.values()) == {2, 3, 4} and not any(block_index(n, "sd1") == 12 for n in ranks)

    model = load_model(tiny["sd1"])
    network = create_network(model, Namespace(network_dim=4, network_alpha=4, network_args=network_args,
                                              network_train_unet_only=True))
    network.apply_to()
    network.load_weights(path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd1"], local_files_only=True)
    load_in_diffusers(pipe, path)
    assert _count_peft_lora_modules(pipe.unet) == len(ranks)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        cond = encode_prompts(model, ["sks dog"])
        ours = unet_forward(model, x, t, cond)
        theirs = pipe.unet(x, t, encoder_hidden_states=cond.context).sample
        with network.multiplier_override(0.0):
            base = unet_forward(model, x, t, cond)
    assert (ours - base).abs().max() > 1e-5
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
