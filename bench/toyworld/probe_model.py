"""A quick look at a toy-world model while it trains: how strongly its ε prediction reacts to one word, and the
judged share of named attributes on a few pretraining-style prompts. The full measure is
`bench.toyworld.evaluate`'s model quality (320 prompts, ~4 min); this takes ~1 min on 2 cores.

    python -m bench.toyworld.probe_model FOLDER [--prompts 96] [--positions]
    python -m bench.toyworld.probe_model WORK_DIR       # a running pretraining's last checkpoint (EMA weights)

Δε: the mean squared change of the ε prediction, for 8 fixed noise draws at t = 900 / 700 / 500, when one word of
"a red ball at the left on grass" changes (position "right", colour "blue", background "snow"): the probe of
docs/toyworld.md. Named attributes: prompts 0..N-1 of the quality set (`evaluate.model_quality`'s prompts and
seeds, so the numbers agree with it on the first N). `--positions`: also 72 samples of "a large {red, blue} ball
at the {each position} on grass", the judged position (chance 1/9).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

PROBE = "a red ball at the left on grass"
CHANGES = {"position": ("left", "right"), "colour": ("red", "blue"), "background": ("grass", "snow")}
TIMESTEPS = (900, 700, 500)


@torch.no_grad()
def word_response(model, draws: int = 8) -> dict:
    """{attribute: [Δε at each of TIMESTEPS]} for the word changes of CHANGES."""
    from library.conditioning import encode_prompts

    unet, ac = model.unet, model.noise_scheduler.alphas_cumprod
    prompts = [PROBE] + [PROBE.replace(a, b) for a, b in CHANGES.values()]
    ctx = encode_prompts(model, prompts).context
    h, c = int(unet.config.sample_size), int(unet.config.in_channels)
    g, out = torch.Generator().manual_seed(5), {k: [] for k in CHANGES}
    for t in TIMESTEPS:
        x = torch.sqrt(1 - ac[t]) * torch.randn(draws, c, h, h, generator=g)
        eps = [unet(x, torch.full((draws,), t), ctx[i : i + 1].expand(draws, -1, -1)).sample for i in range(len(prompts))]
        for k, e in zip(CHANGES, eps[1:]):
            out[k].append(float(((e - eps[0]) ** 2).mean()))
    return out


def named_share(model, judge, n: int, steps: int = 25, guidance: float = 4.0, seed: int = 4242) -> tuple[float, dict]:
    """The judged share of named attributes on the first `n` quality prompts (evaluate.model_quality's)."""
    from bench.toyworld import metrics as M
    from bench.toyworld.evaluate import quality_prompts, sample

    prompts, seeds = quality_prompts(n, seed)
    x = sample(model, prompts, seeds, steps=steps, guidance=guidance)
    return M.attribute_accuracy(prompts, judge.predict(x))


def position_share(model, judge, steps: int = 20, guidance: float = 4.0) -> float:
    """Judged position of "a large {red, blue} ball at the {position} on grass", 4 seeds each (72 images)."""
    from bench.toyworld import world as W
    from bench.toyworld.evaluate import sample

    prompts, wanted = [], []
    for pos in W.POSITIONS:
        for colour in ("red", "blue"):
            for _ in range(4):
                prompts.append(f"a large {colour} ball at the {pos} on grass")
                wanted.append(pos)
    x = sample(model, prompts, list(range(len(prompts))), steps=steps, guidance=guidance)
    got = judge.predict(x)["position"]
    return sum(a == b for a, b in zip(got, wanted)) / len(wanted)


def load_checkpoint(work_dir: str):
    """The model of a pretraining's last checkpoint (`pretrain.py --work_dir`) with the EMA weights it would export,
    in float32 and eval mode: a look at a run while it trains."""
    from bench.toyworld import pretrain as P
    from bench.toyworld.evaluate import for_inference

    state = torch.load(os.path.join(work_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    if "unet" not in state:
        raise ValueError(f"{work_dir}: the checkpoint is in phase {state['phase']!r}, before any diffusion step")
    cfg = P.PretrainConfig(**{**state["config"], "init_from": None, "init_vae_from": None})
    model = P.build_model(cfg)
    model.vae.load_state_dict(state["vae"])
    model.unet.load_state_dict(state["unet"])
    model.text_encoders[0].load_state_dict(state["te"])
    if "ema" in state:
        mods = [model.unet, model.text_encoders[0]]
        ema = P.EMA(mods, cfg.ema_decay)
        ema.load_state_dict(state["ema"])
        ema.copy_to(mods)
    scale = torch.load(os.path.join(work_dir, "latents.pt"), map_location="cpu", weights_only=True)["scaling_factor"]
    model.vae.register_to_config(scaling_factor=scale)
    for_inference(model)
    print(f"{work_dir}: diffusion step {state.get('step')} of {cfg.steps}")
    return model


def main(argv=None) -> int:
    from bench.toyworld import judge as J
    from bench.toyworld.evaluate import load

    p = argparse.ArgumentParser(prog="python -m bench.toyworld.probe_model", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a model folder written by bench.toyworld.pretrain, or its --work_dir while it "
                   "runs")
    p.add_argument("--prompts", type=int, default=96, help="quality prompts to sample and judge (0: none)")
    p.add_argument("--positions", action="store_true", help="also the 72-image position test")
    p.add_argument("--judge", default=J.DEFAULT_PATH)
    a = p.parse_args(argv)
    t0 = time.time()
    model = load_checkpoint(a.model) if os.path.exists(os.path.join(a.model, "checkpoint.pt")) else load(a.model)
    for k, v in word_response(model).items():
        print(f"Δε {k:<10} t = 900 / 700 / 500: " + " / ".join(f"{x:.1e}" for x in v))
    judge = J.load(a.judge)
    if a.prompts:
        acc, per = named_share(model, judge, a.prompts)
        print(f"named attributes ({a.prompts} prompts): {acc:.1%}  " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(per.items())))
    if a.positions:
        print(f"judged position (72 images, chance 11.1%): {position_share(model, judge):.1%}")
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
