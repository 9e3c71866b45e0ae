"""Can the toy world's UNet learn a position word? The synthetic experiment behind `--freeze_text_encoder`
(docs/toyworld.md, "Position: the cause"): 8x8 latents that are 0 except a 2x2 block of +2 in the left or the
right column, captions "a red ball at the {left, right} on grass", the pretraining's UNet and text encoder from
scratch, its loss (min-SNR-5) and AdamW; every 100 steps the mean squared change of the eps prediction when "left"
becomes "right", at t = 900 / 700 / 500.

    python -m bench.toyworld.position_probe --text_encoder trained|frozen|pretrained|none [--steps 300] [--no_clip]

"none" replaces the text encoder by one learned vector per word at token 1 (the UNet alone); "pretrained" trains
the encoder on the captions first (`text_pretrain.py`, 250 steps) and freezes it. Measured (2 cores): trained stays
at ~3e-6, frozen and none reach 1e-3..1e-1 within 300 steps, pretrained 4e-3..1e-1.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.toyworld.pretrain import PretrainConfig, build_model

WORDS = ("left", "right")


def block_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents with the block in the left (label 0) or right (1) column, at a random row."""
    x, lab = torch.zeros(n, 4, 8, 8), torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        cx, cy = (1 if lab[i] == 0 else 5), int(torch.randint(1, 6, (1,), generator=g))
        x[i, :, cy:cy + 2, cx:cx + 2] = 2.0
    return x, lab


def run(text_encoder: str = "trained", steps: int = 300, clip: bool = True, batch_size: int = 64,
        probe_every: int = 100, log=print) -> list[tuple[int, list[float]]]:
    """Train as described above; returns [(step, [Δε at t = 900, 700, 500])] at step 0, every `probe_every`
    steps and at the end."""
    from library.conditioning import encode_prompts

    torch.manual_seed(0)
    model = build_model(PretrainConfig())
    unet, te = model.unet, model.text_encoders[0]
    ac = model.noise_scheduler.alphas_cumprod
    unet.train().requires_grad_(True)
    if text_encoder == "pretrained":  # the attribute read-out first (bench.toyworld.text_pretrain), then frozen
        from bench.toyworld.text_pretrain import pretrain_text_encoder

        log(f"pretrained text encoder: {pretrain_text_encoder(model, 250, seed=0, log=log)}")
    te.train().requires_grad_(text_encoder == "trained")
    emb = torch.nn.Parameter(torch.randn(2, te.config.hidden_size))

    def context(lab):
        if text_encoder == "none":
            c = torch.zeros(len(lab), 77, te.config.hidden_size)
            c[:, 1] = emb[lab]
            return c
        return encode_prompts(model, [f"a red ball at the {WORDS[int(i)]} on grass" for i in lab]).context

    params = list(unet.parameters()) + ([emb] if text_encoder == "none" else
                                        list(te.parameters()) if text_encoder == "trained" else [])
    opt = torch.optim.AdamW(params, lr=5e-4)

    def probe():
        g, out = torch.Generator().manual_seed(5), []
        left, right = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)
        with torch.no_grad():
            for t in (900, 700, 500):
                x, tt = torch.sqrt(1 - ac[t]) * torch.randn(8, 4, 8, 8, generator=g), torch.full((8,), t)
                out.append(float(((unet(x, tt, context(left)).sample - unet(x, tt, context(right)).sample) ** 2).mean()))
        return out

    g, rows, t0 = torch.Generator().manual_seed(1), [], time.time()
    for step in range(steps + 1):
        if step % probe_every == 0 or step == steps:
            rows.append((step, probe()))
            log(f"{text_encoder} step {step}: Δε " + " / ".join(f"{v:.1e}" for v in rows[-1][1])
                + f" ({time.time() - t0:.0f}s)")
        if step == steps:
            break
        x0, lab = block_batch(batch_size, g)
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (batch_size,), generator=g)
        pred = unet(model.noise_scheduler.add_noise(x0, noise, t), t, context(lab)).sample
        snr = ac[t] / (1 - ac[t])
        loss = (((pred - noise) ** 2).mean((1, 2, 3)) * torch.clamp(snr, max=5) / snr).mean()
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.toyworld.position_probe", description=__doc__.split("\n")[0])
    p.add_argument("--text_encoder", choices=["trained", "frozen", "pretrained", "none"], default="trained")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--no_clip", action="store_true", help="no gradient clipping (the pretraining clips at 1.0)")
    a = p.parse_args(argv)
    run(a.text_encoder, a.steps, clip=not a.no_clip)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
