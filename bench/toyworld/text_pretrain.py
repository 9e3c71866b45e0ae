"""Pretrain the toy world's text encoder on its captions before the diffusion phase, as CLIP is pretrained before
Stable Diffusion: the encoder learns to state every attribute a caption names, at every token from the caption's
end on (where a causal encoder has read the whole caption), and is then kept frozen while the UNet trains.

Why: trained jointly with the UNet from scratch, the encoder merges the position words before the UNet learns to
use them, and a frozen *random* encoder keeps them apart but carries the other words weakly (docs/toyworld.md,
"Position: the cause"). Here the objective is the attribute read-out itself: a linear head per attribute
(class, colour, position, size, background, "with a person"; each but the class with an "unnamed" answer) on
the final hidden states that the UNet reads, cross-entropy averaged over the heads and the tokens from EOS on.
The captions are drawn as the diffusion phase draws them (random scenes, random attribute subsets, 10% empty).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.toyworld import world as W

UNNAMED = "-"
HEADS = {  # attribute -> answers; index 0 is "the caption does not name it"
    "cls": (UNNAMED, *W.CLASSES),
    "colour": (UNNAMED, *W.COLOUR_NAMES),
    "position": (UNNAMED, *W.POSITIONS),
    "size": (UNNAMED, *W.SIZES),
    "background": (UNNAMED, *W.BACKGROUNDS),
    "context": (UNNAMED, True),
}


def targets(captions) -> torch.Tensor:
    """(B, len(HEADS)) answer indices of each caption (`world.parse_prompt`)."""
    rows = []
    for c in captions:
        named = W.parse_prompt(c)
        rows.append([answers.index(named[k]) if k in named else 0 for k, answers in HEADS.items()])
    return torch.tensor(rows, dtype=torch.long)


def caption_batch(rng: np.random.Generator, n: int, dropout: float = 0.1) -> list[str]:
    """n captions drawn like the diffusion phase's (`pretrain.diffusion_batch`): world priors on, a random subset
    of attributes named, `dropout` of them empty."""
    return ["" if rng.random() < dropout else W.caption(W.sample_scene(rng), rng=rng) for _ in range(n)]


class AttributeHeads(torch.nn.Module):
    """One linear read-out per attribute of `HEADS` on the text encoder's final hidden states."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(a)) for a in HEADS.values())

    def loss(self, hidden: torch.Tensor, ids: torch.Tensor, tgt: torch.Tensor,
             eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over heads and over the tokens from the first EOS on; and the per-head accuracy there."""
        eos = (ids == eos_id).int().argmax(dim=1, keepdim=True)
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] >= eos).float()  # (B, L)
        losses, accs = [], []
        for i, head in enumerate(self.heads):
            logits = head(hidden)  # (B, L, K)
            t = tgt[:, i, None].expand(-1, ids.shape[1])
            ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none").view_as(mask)
            losses.append((ce * mask).sum() / mask.sum())
            accs.append(((logits.argmax(-1) == t).float() * mask).sum() / mask.sum())
        return torch.stack(losses).mean(), torch.stack(accs)


def pretrain_text_encoder(model, steps: int, seed: int, batch_size: int = 256, lr: float = 1e-3,
                          log_every: int = 100, log=print) -> dict:
    """Train `model.text_encoders[0]` in place on the attribute read-out; returns the final per-head accuracy on
    a held-out batch of 1024 captions ({attribute: accuracy}) and the seconds taken."""
    from library.conditioning import tokenize

    te = model.text_encoders[0].train().requires_grad_(True)
    eos = model.tokenizers[0].eos_token_id
    dev = te.device
    with torch.random.fork_rng(devices=[]):  # the heads' initialisation depends on the seed only
        torch.manual_seed(seed)
        heads = AttributeHeads(te.config.hidden_size).to(dev)
    params = list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 0x7E])
    t0 = time.time()

    def run(caps):
        ids = tokenize(model, caps)[0].to(dev)
        return heads.loss(te(ids).last_hidden_state, ids, targets(caps).to(dev), eos)

    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss, acc = run(caption_batch(rng, batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"[text] step {step + 1}/{steps}  loss {float(loss.detach()):.4f}  "
                f"min head accuracy {float(acc.min()):.3f} ({time.time() - t0:.0f}s)")
    te.eval().requires_grad_(False)
    with torch.no_grad():
        _, acc = run(caption_batch(np.random.default_rng([seed, 0x7E57]), 1024))
    return {"accuracy": {k: round(float(a), 4) for k, a in zip(HEADS, acc)}, "seconds": round(time.time() - t0)}
