"""Toy world pretraining (issue 4): a 2-step run at a reduced size writes a loadable SD1 diffusers folder;
an interrupted run resumes to the same weights."""
import json
from dataclasses import asdict
import os

import pytest
import torch
from safetensors import safe_open

from bench.toyworld import pretrain as P


def _cfg(**kw):
    base = dict(image_size=32, vae_steps=2, vae_batch_size=4, vae_channels=(16, 16, 16), n_images=8, steps=2,
                batch_size=4, warmup_steps=1, unet_channels=(32, 32, 32, 32), te_hidden=32, te_layers=1,
                text_pretrain_steps=0)
    return P.PretrainConfig(**{**base, **kw})


def _weights(folder):
    out = {}
    for sub in ("unet", "vae", "text_encoder"):
        d = os.path.join(folder, sub)
        f = next(x for x in os.listdir(d) if x.endswith(".safetensors"))
        with safe_open(os.path.join(d, f), "pt") as sf:
            out.update({f"{sub}.{k}": sf.get_tensor(k) for k in sf.keys()})
    return out


def test_two_steps_write_a_folder_load_model_reads(tmp_path):
    from library.conditioning import encode_prompts
    from library.model_util import load_model, save_single_file

    cfg = _cfg()
    out = P.pretrain(cfg, str(tmp_path / "model"), str(tmp_path / "work"), log_every=1, workers=0,
                     vae_check_n=8)
    w = _weights(out)
    assert all(v.dtype == torch.float16 for v in w.values() if v.is_floating_point())
    assert P.folder_megabytes(out) < 30
    info = json.load(open(os.path.join(out, "toyworld.json")))
    assert info["config"]["steps"] == 2 and info["config"]["image_size"] == 32
    assert set(info["vae_judge_accuracy"]["vae"]) == {"background", "cls", "colour", "position", "size", "context",
                                                      "pattern"}
    m = load_model(out)
    assert m.arch == "sd1" and not m.v_parameterization
    assert m.unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert m.unet.config.layers_per_block == 2 and m.unet.config.sample_size == cfg.latent_size == 8
    assert m.latent_scale > 0 and m.latent_scale != 1.0  # set from the encoded latents
    assert m.tokenizers[0]("a sks backpack on snow").input_ids == [49406, 320, 48136, 14894, 525, 2583, 49407]
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        lat = m.vae.encode(x).latent_dist.mean
        assert tuple(lat.shape) == (1, 4, 8, 8)
        ctx = encode_prompts(m, ["a red kite at night"]).context
        assert m.unet(lat, torch.tensor([10]), ctx).sample.shape == lat.shape
        assert m.vae.decode(lat).sample.shape == x.shape
    # a diffusers pipeline samples from it at the model's own size (VAE scale factor 4: 32 px <-> 8x8 latents)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                   unet=m.unet, scheduler=DDIMScheduler.from_config(m.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a sks backpack", height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    # the judge can train on / be measured after this model's VAE round trip
    from bench.toyworld import judge as J

    rt = J.VAERoundTrip(out)
    assert rt.size == 32 and tuple(rt(torch.rand(2, 3, 64, 64)).shape) == (2, 3, 64, 64)
    J.train_judge(steps=1, batch_size=4, workers=0, vae=m, log=None)
    acc = J.held_out_accuracy(J.load(), n=8, degrade=rt)
    assert set(acc) == set(J.HEADS)
    # the single-file (LDM) path round-trips the 3-level VAE too
    f = save_single_file(m, str(tmp_path / "toy.safetensors"))
    m2 = load_model(f)
    assert m2.vae.config.block_out_channels == m.vae.config.block_out_channels
    assert torch.equal(m2.unet.conv_in.weight, m.unet.conv_in.weight)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg(steps=3)
    quiet = dict(log_every=100, vae_check_n=0)
    ref = P.pretrain(cfg, str(tmp_path / "ref"), str(tmp_path / "w1"), workers=0, **quiet)
    with pytest.raises(P.Interrupted):  # the VAE phase renders in a worker process here: same batches
        P.pretrain(cfg, str(tmp_path / "res"), str(tmp_path / "w2"), stop_after=1, workers=1, **quiet)
    assert not os.path.exists(tmp_path / "res")
    with pytest.raises(FileExistsError):  # a checkpoint is there: --resume or start over
        P.pretrain(cfg, str(tmp_path / "res"), str(tmp_path / "w2"))
    with pytest.raises(ValueError):  # other settings than the checkpoint's
        P.pretrain(_cfg(steps=4), str(tmp_path / "res"), str(tmp_path / "w2"), resume=True)
    res = P.pretrain(cfg, str(tmp_path / "res"), str(tmp_path / "w2"), resume=True, workers=0, **quiet)
    a, b = _weights(ref), _weights(res)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):  # the output exists
        P.pretrain(cfg, str(tmp_path / "res"), str(tmp_path / "w3"))


def test_cli_reduced_run(tmp_path, capsys):
    out, work = str(tmp_path / "cli"), str(tmp_path / "cliwork")
    args = ["--steps", "2", "--vae_steps", "1", "--n_images", "4", "--batch_size", "2", "--image_size", "32",
            "--unet_channels", "32,32,32,32", "--te_hidden", "32", "--vae_check", "0", "--out", out,
            "--work_dir", work, "--text_pretrain_steps", "2"]
    assert P.main(args) == 0
    assert "wrote" in capsys.readouterr().out and os.path.isfile(os.path.join(out, "model_index.json"))
    assert P.main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


def test_cli_text_pretrain_default_is_off_when_continuing(monkeypatch):
    """--text_pretrain_steps defaults to the config's 300 from scratch and to 0 with --init_from (whose text encoder
    is already trained; pretraining a fresh one there is an error); given, it is used as given."""
    got = []
    monkeypatch.setattr(P, "pretrain", lambda cfg, *a, **k: got.append(cfg))
    for args in ([], ["--init_from", "m"], ["--text_pretrain_steps", "7"], ["--init_vae_from", "m"]):
        assert P.main(args) == 0
    assert [c.text_pretrain_steps for c in got] == [300, 0, 7, 300]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_is_not_part_of_the_key_and_a_missing_cuda_is_a_clear_error(tmp_path, capsys):
    assert _cfg(device="cuda").key() == _cfg().key()  # a checkpoint resumes on another device
    out, work = str(tmp_path / "cli"), str(tmp_path / "cliwork")
    assert P.main(["--steps", "2", "--device", "cuda", "--out", out, "--work_dir", work]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    assert not os.path.exists(work) and not os.path.exists(out)


def test_init_from_continues_a_written_model(tmp_path):
    """--init_from: the VAE phase is skipped, the folder's weights are the start (0 more steps give them back
    bitwise), more steps change UNet and text encoder but not the VAE, and toyworld.json records the start."""
    quiet = dict(log_every=100, vae_check_n=0, workers=0)
    first = P.pretrain(_cfg(), str(tmp_path / "first"), str(tmp_path / "w1"), **quiet)
    same = P.pretrain(_cfg(steps=0, init_from=first, seed=1), str(tmp_path / "same"), str(tmp_path / "w2"), **quiet)
    a, b = _weights(first), _weights(same)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    more = P.pretrain(_cfg(steps=2, init_from=first, seed=1), str(tmp_path / "more"), str(tmp_path / "w3"), **quiet)
    c = _weights(more)
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("vae."))
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("unet."))
    info, first_info = (json.load(open(os.path.join(p, "toyworld.json"))) for p in (more, first))
    assert info["init"]["folder"] == first and info["init"]["config"] == first_info["config"]
    assert info["latent_scaling_factor"] == first_info["latent_scaling_factor"] and "vae" not in info["seconds"]
    with pytest.raises(ValueError, match="does not match these settings"):
        P.pretrain(_cfg(steps=1, init_from=first, unet_channels=(32, 32, 32, 64)), str(tmp_path / "bad"),
                   str(tmp_path / "w4"), **quiet)
    with pytest.raises(ValueError, match="no toyworld.json"):
        P.pretrain(_cfg(steps=1, init_from=str(tmp_path)), str(tmp_path / "bad2"), str(tmp_path / "w5"), **quiet)


def test_init_vae_from_takes_the_vae_only(tmp_path):
    """--init_vae_from: the VAE (bitwise) and its judge check come from the folder, the UNet and text encoder are
    the fresh ones of this seed (equal to a from-scratch build), the latent scale is measured anew; combined with
    --init_from it is refused."""
    quiet = dict(log_every=100, vae_check_n=0, workers=0)
    first = P.pretrain(_cfg(), str(tmp_path / "first"), str(tmp_path / "w1"), **quiet)
    new = P.pretrain(_cfg(steps=0, seed=1, init_vae_from=first), str(tmp_path / "new"), str(tmp_path / "w2"), **quiet)
    a, b = _weights(first), _weights(new)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vae."))
    fresh = P.build_model(_cfg(seed=1))
    for k, v in fresh.unet.state_dict().items():
        assert torch.equal(v.half(), b[f"unet.{k}"]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    info, first_info = (json.load(open(os.path.join(p, "toyworld.json"))) for p in (new, first))
    assert info["vae_from"]["config"] == first_info["config"] and "vae" not in info["seconds"]
    assert info["vae_judge_accuracy"] == first_info["vae_judge_accuracy"]
    with pytest.raises(ValueError, match="exclude each other"):
        P.pretrain(_cfg(init_from=first, init_vae_from=first), str(tmp_path / "bad"), str(tmp_path / "w3"), **quiet)
    with pytest.raises(ValueError, match="--init_vae_from .*no toyworld.json"):
        P.pretrain(_cfg(init_vae_from=str(tmp_path)), str(tmp_path / "bad2"), str(tmp_path / "w4"), **quiet)


@pytest.mark.parametrize("floor", [None, 0.5])
def test_diffusion_loss_weights_min_snr_and_the_snr_floor(monkeypatch, floor):
    """The eps-loss weight is clamp(snr, floor, 5) / snr: min-SNR-5 caps the low-noise steps, the floor raises the
    high-noise ones (snr < floor) to floor / snr. Checked against the hand formula on a zero-predicting UNet."""
    from types import SimpleNamespace

    import library.conditioning as C
    from library.model_util import make_noise_scheduler

    class ZeroUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        @property
        def device(self):
            return self.p.device

        def forward(self, noisy, t, ctx):
            return SimpleNamespace(sample=torch.zeros_like(noisy))

    monkeypatch.setattr(C, "encode_prompts", lambda model, caps: SimpleNamespace(context=torch.zeros(len(caps), 1, 4)))
    sched = make_noise_scheduler(False)
    model = SimpleNamespace(unet=ZeroUNet(), noise_scheduler=sched)
    lat = torch.randn(64, 4, 2, 2)
    loss = P.diffusion_loss(model, lat, [""] * 64, _cfg(snr_floor=floor), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise, t = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (64,), generator=g)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    w = torch.where(snr > 5, 5 / snr, torch.ones_like(snr))
    if floor is not None:
        w = torch.where(snr < floor, floor / snr, w)
        assert (snr < floor).any() and (w > 1).any()
    assert loss.item() == pytest.approx(((noise ** 2).mean(dim=(1, 2, 3)) * w).mean().item(), rel=1e-5)


def test_later_fields_unset_keep_earlier_checkpoint_keys():
    """Fields added later (snr_floor, freeze_text_encoder, init_vae_from, te_lr_scale, te_freeze_steps,
    text_pretrain_steps), at their
    neutral values, must not change the key of the configs written before they existed; set, they do."""
    import hashlib

    cfg = _cfg()
    early = ("image_size", "seed", "vae_steps", "vae_batch_size", "vae_lr", "vae_channels", "vae_kl_weight",
             "vae_fg_weight", "n_images", "steps", "batch_size", "lr", "warmup_steps", "unet_channels", "te_hidden",
             "te_layers", "caption_dropout", "min_snr_gamma", "ema_decay", "bf16", "init_from")
    d = {k: v for k, v in asdict(cfg).items() if k in early}
    assert cfg.key() == hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]
    for k, v in dict(snr_floor=0.5, freeze_text_encoder=True, init_vae_from="x", te_lr_scale=0.1,
                     te_freeze_steps=10, text_pretrain_steps=300).items():
        assert _cfg(**{k: v}).key() != cfg.key(), k


@pytest.mark.parametrize("kw,te_trains", [
    (dict(), True), (dict(freeze_text_encoder=True), False), (dict(te_lr_scale=0.0), False),
    (dict(te_lr_scale=0.5), True), (dict(te_freeze_steps=3), False), (dict(te_freeze_steps=2), True)])
def test_freeze_text_encoder_trains_the_unet_only(kw, te_trains):
    """--freeze_text_encoder, --te_lr_scale 0 and --te_freeze_steps >= steps leave the (random) text encoder
    exactly as initialised, EMA included, and still train the UNet; otherwise (a smaller scale, released after
    step 2 of 3) both train."""
    cfg = _cfg(steps=3, **kw)
    model = P.build_model(cfg)
    te0 = {k: v.clone() for k, v in model.text_encoders[0].state_dict().items()}
    unet0 = {k: v.clone() for k, v in model.unet.state_dict().items()}
    data = {"mean": torch.randn(8, 4, 8, 8).half(), "std": torch.full((8, 4, 8, 8), 0.1).half(),
            "scenes": [asdict(P.W.pretraining_example(i)[2]) for i in range(8)], "scaling_factor": 1.0}
    ema = P.train_diffusion(model, data, cfg, {}, lambda s: None, save_every=100, log_every=100)
    ema.copy_to([model.unet, model.text_encoders[0]])
    te_same = all(torch.equal(v, te0[k]) for k, v in model.text_encoders[0].state_dict().items())
    assert te_same == (not te_trains)
    assert not all(torch.equal(v, unet0[k]) for k, v in model.unet.state_dict().items())


def test_position_probe_blocks_and_rows():
    """bench/toyworld/position_probe.py (why --freeze_text_encoder exists): the block sits in the column its label
    names, and a run reports Δε at the three timesteps before and after training."""
    from bench.toyworld import position_probe as PP

    x, lab = PP.block_batch(16, torch.Generator().manual_seed(0))
    cols = (x[:, 0].abs().sum(dim=1) > 0)  # (n, 8): columns holding the block
    for c, l in zip(cols, lab):
        assert c.nonzero().flatten().tolist() == ([1, 2] if l == 0 else [5, 6])
    assert x.sum(dim=(1, 2, 3)).eq(2.0 * 4 * 4).all()  # one 2x2 block of +2 in 4 channels
    rows = PP.run("none", steps=1, batch_size=2, log=lambda m: None)
    assert [r[0] for r in rows] == [0, 1] and all(len(r[1]) == 3 and min(r[1]) >= 0 for r in rows)


def test_probe_model_word_response_by_hand(monkeypatch):
    """bench/toyworld/probe_model.py's Δε on the bundled model: an unchanged word gives exactly 0, and a changed one
    equals the mean squared ε difference computed here directly (same noise draws, same timestep)."""
    from bench.toyworld import probe_model as PM
    from bench.toyworld.evaluate import DEFAULT_MODEL, load
    from library.conditioning import encode_prompts

    model = load(DEFAULT_MODEL)
    monkeypatch.setattr(PM, "CHANGES", {"same": ("ball", "ball"), "colour": ("red", "blue")})
    monkeypatch.setattr(PM, "TIMESTEPS", (900,))
    out = PM.word_response(model, draws=2)
    assert out["same"] == [0.0]
    ac, g = model.noise_scheduler.alphas_cumprod, torch.Generator().manual_seed(5)
    x = torch.sqrt(1 - ac[900]) * torch.randn(2, 4, 8, 8, generator=g)
    c = encode_prompts(model, [PM.PROBE, PM.PROBE.replace("red", "blue")]).context
    with torch.no_grad():
        e = [model.unet(x, torch.full((2,), 900), c[i : i + 1].expand(2, -1, -1)).sample for i in range(2)]
    assert out["colour"][0] == pytest.approx(float(((e[1] - e[0]) ** 2).mean()), rel=1e-5) and out["colour"][0] > 0


def test_text_pretrain_targets_by_hand():
    """bench/toyworld/text_pretrain.py: each caption's answer per head, index 0 for an attribute it does not name."""
    from bench.toyworld import text_pretrain as T

    assert list(T.HEADS) == ["cls", "colour", "position", "size", "background", "context"]
    got = T.targets(["a large red kite at the top left on snow with a person", "a boat", ""]).tolist()
    assert got[0] == [1 + P.W.CLASSES.index("kite"), 1 + P.W.COLOUR_NAMES.index("red"),
                      1 + P.W.POSITIONS.index("top left"), 1 + P.W.SIZES.index("large"),
                      1 + P.W.BACKGROUNDS.index("snow"), 1]
    assert got[1] == [1 + P.W.CLASSES.index("boat"), 0, 0, 0, 0, 0]
    assert got[2] == [0] * 6


def test_text_pretrain_loss_reads_the_tokens_from_eos_on():
    """The read-out's loss and accuracy count only the tokens from the first EOS on: hidden states before it do
    not change them; the loss equals the hand-computed cross-entropy over those tokens."""
    import torch.nn.functional as F

    from bench.toyworld import text_pretrain as T

    torch.manual_seed(0)
    heads = T.AttributeHeads(8)
    ids = torch.tensor([[1, 5, 6, 9, 9, 9], [1, 9, 9, 9, 9, 9]])  # EOS (9) at 3 and at 1
    tgt = T.targets(["a red ball", ""])
    h = torch.randn(2, 6, 8)
    loss, acc = heads.loss(h, ids, tgt, eos_id=9)
    h2 = h.clone()
    h2[0, :3] = torch.randn(3, 8)
    assert torch.equal(heads.loss(h2, ids, tgt, eos_id=9)[0], loss)
    keep = [(0, j) for j in range(3, 6)] + [(1, j) for j in range(1, 6)]
    ref = torch.stack([torch.stack([F.cross_entropy(head(h[b, j])[None], tgt[b, i, None]) for b, j in keep]).mean()
                       for i, head in enumerate(heads.heads)]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert acc.shape == (6,) and ((acc >= 0) & (acc <= 1)).all()


def test_text_pretrain_steps_then_frozen_encoder(tmp_path):
    """--text_pretrain_steps: the text encoder is trained on the captions first (its held-out accuracy lands in
    toyworld.json), then kept fixed through the diffusion phase: the written encoder is the pretrained one, unlike
    the random initialisation, and an interrupted run resumes to the same weights."""
    quiet = dict(log_every=100, vae_check_n=0, workers=0)
    cfg = _cfg(steps=3, text_pretrain_steps=2)
    assert cfg.key() != _cfg(steps=3).key()
    out = P.pretrain(cfg, str(tmp_path / "a"), str(tmp_path / "w1"), **quiet)
    info = json.load(open(os.path.join(out, "toyworld.json")))
    assert set(info["text_pretrain"]["accuracy"]) == {"cls", "colour", "position", "size", "background", "context"}
    assert "text" in info["seconds"]
    model = P.build_model(cfg)
    from bench.toyworld.text_pretrain import pretrain_text_encoder
    pretrain_text_encoder(model, 2, cfg.seed, log=lambda m: None)
    w = _weights(out)
    te = {k: v.half() for k, v in model.text_encoders[0].state_dict().items()}
    assert all(torch.equal(te[k], w[f"text_encoder.{k}"]) for k in te)
    fresh = P.build_model(cfg).text_encoders[0].state_dict()
    assert not all(torch.equal(fresh[k].half(), te[k]) for k in te)
    with pytest.raises(P.Interrupted):
        P.pretrain(cfg, str(tmp_path / "b"), str(tmp_path / "w2"), stop_after=1, **quiet)
    res = P.pretrain(cfg, str(tmp_path / "b"), str(tmp_path / "w2"), resume=True, **quiet)
    b = _weights(res)
    assert all(torch.equal(w[k], b[k]) for k in w)
    with pytest.raises(ValueError, match="--text_pretrain_steps"):
        P.pretrain(_cfg(text_pretrain_steps=2, init_from=out), str(tmp_path / "c"), str(tmp_path / "w3"), **quiet)


def test_probe_model_reads_a_running_checkpoint(tmp_path):
    """probe_model on a --work_dir: the last checkpoint's EMA weights (what the run would export), the VAE and the
    latent scale of that run; before the first diffusion step it says so."""
    from bench.toyworld import probe_model as PM

    cfg = _cfg(steps=3)
    quiet = dict(log_every=100, vae_check_n=0, workers=0)
    with pytest.raises(P.Interrupted):
        P.pretrain(cfg, str(tmp_path / "out"), str(tmp_path / "w"), stop_after=2, **quiet)
    state = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    model = PM.load_checkpoint(str(tmp_path / "w"))
    params = [p for m in (model.unet, model.text_encoders[0]) for p in m.parameters()]
    assert len(params) == len(state["ema"]["shadow"])
    assert all(torch.equal(p, s) for p, s in zip(params, state["ema"]["shadow"]))
    assert not all(torch.equal(v, state["unet"][k]) for k, v in model.unet.state_dict().items())  # not the raw weights
    assert all(torch.equal(v, state["vae"][k]) for k, v in model.vae.state_dict().items())
    lat = torch.load(tmp_path / "w" / "latents.pt", weights_only=False)
    assert model.vae.config.scaling_factor == lat["scaling_factor"]
    (tmp_path / "w2").mkdir()
    torch.save({"phase": "latents", "config": asdict(cfg)}, tmp_path / "w2" / "checkpoint.pt")
    with pytest.raises(ValueError, match="before any diffusion step"):
        PM.load_checkpoint(str(tmp_path / "w2"))


class _Payload:  # what a shared, tampered checkpoint.pt could hold: unpickling it runs code
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_is_read_without_running_its_code(tmp_path):
    """pretrain --resume (and probe_model) unpickled work_dir/checkpoint.pt in full: a model folder from someone
    else ran their code. It is read with weights_only now, so a pickled object is refused and runs nothing."""
    import pickle

    work = tmp_path / "w"
    work.mkdir()
    marker = tmp_path / "ran"
    torch.save({"key": _Payload(str(marker))}, str(work / "checkpoint.pt"))
    with pytest.raises(pickle.UnpicklingError):
        P.pretrain(_cfg(steps=1), str(tmp_path / "out"), str(work), resume=True)
    assert not marker.exists()
