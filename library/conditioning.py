"""Text conditioning with sd-scripts semantics: tokenize, encode (clip_skip, 150/225 tokens, SDXL's two
encoders), call the UNet, and cache text-encoder outputs when the text encoders are frozen.

Long prompts (sd-scripts `get_input_ids` / `get_hidden_states` / `get_hidden_states_sdxl`):

* `max_token_length` L in {None, 75, 150, 225} (any multiple of 75 is accepted). None or 75: one chunk of 77
  tokens, the ordinary CLIP encoding. Otherwise n = L // 75 chunks.
* Tokenize: each caption is tokenized to L + 2 ids with padding and truncation (BOS, up to L tokens, EOS,
  padding), then cut into n chunks of 77: `[ids[0]] + ids[i : i + 75] + [ids[-1]]` for i = 1, 76, 151.
  * Tokenizers whose pad token is EOS (SD1, SDXL's first): nothing else (ids[-1] is always EOS).
  * Tokenizers with their own pad token (SDXL's second, which pads with "!" = id 0; an SD2 tokenizer that
    pads with "!"): if a chunk's second-to-last id is neither EOS nor pad (the text runs on past the chunk),
    its last id becomes EOS; if a chunk starts with pad right after BOS (an empty chunk), that pad becomes
    EOS, giving `BOS EOS pad pad ...`.
* Encode: the n chunks of a caption are encoded as separate 77-token sequences (batch B*n), then re-stitched
  into one sequence of 2 + 75n tokens (77, 152, 227): chunk 0's BOS, the 75 middle positions of every chunk in
  order, and the last chunk's final position (EOS or pad). sd-scripts' v2 branch also has an "empty chunk"
  fix-up, but it compares token ids with the EOS token *string* (SD2) or is commented out (SDXL), so it never
  runs; the effective behaviour, reproduced here, is the same stitching for every tokenizer.
* SDXL pooled output: from the first chunk of each caption only (`pool2[::n]`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from library.fp8_base import compute_dtype
from library.transfer import to_device

logger = logging.getLogger(__name__)

CHUNK_LEN = 77  # CLIP's context length: BOS + 75 tokens + EOS
_warned_sdxl_clip_skip = False


# ----------------------------------------------------------------------------------------------------------
# TextConditioning


@dataclass
class TextConditioning:
    """What the UNet is conditioned on: `context` (B, N, D) for `encoder_hidden_states`; `pooled` (B, P) for
    SDXL's `text_embeds` (None for SD1/SD2)."""

    context: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def to(self, device=None, dtype=None) -> "TextConditioning":
        return TextConditioning(
            self.context.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    def detach(self) -> "TextConditioning":
        return TextConditioning(self.context.detach(), None if self.pooled is None else self.pooled.detach())

    def __getitem__(self, index) -> "TextConditioning":
        """Batch slicing. An int index keeps the batch dimension (gives a batch of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextConditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    @classmethod
    def cat(cls, items: Sequence["TextConditioning"]) -> "TextConditioning":
        items = list(items)
        if not items:
            raise ValueError("TextConditioning.cat needs at least one item")
        lengths = {tuple(c.context.shape[1:]) for c in items}
        if len(lengths) != 1:
            raise ValueError(f"cannot concatenate conditionings of different shapes {sorted(lengths)} "
                             "(different max_token_length or model?)")
        has_pooled = {c.pooled is not None for c in items}
        if len(has_pooled) != 1:
            raise ValueError("cannot concatenate conditionings with and without pooled embeddings")
        context = torch.cat([c.context for c in items], dim=0)
        pooled = torch.cat([c.pooled for c in items], dim=0) if items[0].pooled is not None else None
        return cls(context, pooled)


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def num_chunks(max_token_length: Optional[int]) -> int:
    """Number of 77-token chunks for `max_token_length` (None/75 -> 1, 150 -> 2, 225 -> 3)."""
    if max_token_length is None:
        return 1
    if not isinstance(max_token_length, int) or max_token_length <= 0 or max_token_length % 75:
        raise ValueError(f"max_token_length must be None, 75, 150 or 225 (a multiple of 75); got {max_token_length!r}")
    return max_token_length // 75


def context_length(max_token_length: Optional[int]) -> int:
    """Length N of the re-stitched context: 77, 152, 227 for None/75, 150, 225."""
    return 2 + 75 * num_chunks(max_token_length)


def _as_list(captions: Union[str, Sequence[str]]) -> list[str]:
    return [captions] if isinstance(captions, str) else list(captions)


def flat_ids(tokenizer, captions: Sequence[str], length: int, weighted: bool = False) -> torch.Tensor:
    """(B, length) ids: BOS, the caption's tokens, EOS, padding (the tokenizer's own layout). `weighted`
    (--weighted_captions): A1111 attention syntax read and each weighted segment tokenized on its own
    (library/prompt_weights.py)."""
    if weighted:
        from library.prompt_weights import weighted_ids

        return weighted_ids(tokenizer, list(captions), length)[0]
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=length,
                     return_tensors="pt").input_ids.to(torch.long)


def apply_token_weights(cond: "TextConditioning", weights: torch.Tensor, keep_mean: bool = False,
                        widths: Optional[Sequence[int]] = None) -> "TextConditioning":
    """The context scaled per token position; the pooled output is left alone. Training (sd-scripts'
    --weighted_captions) does not renormalise; `keep_mean` rescales each sample so that its mean over tokens and
    channels is what it was, as sd-scripts' sampling pipelines (lpw_stable_diffusion) do: per text encoder, whose
    states are the context's channel slices of `widths` (SDXL's 768 + 1280; the lpw pipeline weights each
    encoder's output on its own before they are concatenated)."""
    w = weights.to(device=cond.context.device, dtype=cond.context.dtype)
    context = cond.context * w.unsqueeze(-1)
    if keep_mean:
        parts = []
        for orig, part in zip(cond.context.split(list(widths or [context.shape[-1]]), dim=-1),
                              context.split(list(widths or [context.shape[-1]]), dim=-1)):
            before = orig.float().mean(dim=(-2, -1), keepdim=True).to(part.dtype)
            after = part.float().mean(dim=(-2, -1), keepdim=True).to(part.dtype)
            scale = part.float().abs().mean(dim=(-2, -1), keepdim=True).to(part.dtype)
            # a mean at rounding level (LayerNorm outputs without bias, as in untrained tiny models): left as weighted
            parts.append(part * torch.where(after.abs() > 1e-4 * scale, before / after, 1.0))
        context = torch.cat(parts, dim=-1)
    return TextConditioning(context, cond.pooled)


def _flat_length(max_token_length: Optional[int]) -> int:
    """77, or 75n + 2 for n chunks: the tokenizer's flat layout, which is also the stitched context's length."""
    n = num_chunks(max_token_length)
    return CHUNK_LEN if n == 1 else 75 * n + 2


def cut_chunks(flat: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 75n + 2, ...) in the flat (stitched) layout -> (B, n * 77, ...): each chunk the flat first position,
    its 75 middle positions and the flat last position. For ids see `_chunked`; for token weights this is the
    lpw pipelines' layout (every chunk's BOS and EOS weighted as the flat ends, 1.0)."""
    if n == 1:
        return flat
    starts = range(1, flat.shape[1] - CHUNK_LEN + 2, CHUNK_LEN - 2)  # 1, 76, 151, ...
    assert len(starts) == n, (flat.shape, n)
    return torch.cat([torch.cat([flat[:, :1], flat[:, i : i + CHUNK_LEN - 2], flat[:, -1:]], dim=1)
                      for i in starts], dim=1)


def _chunked(tokenizer, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Flat (B, 75n + 2) ids -> (B, n * 77): each chunk <BOS> 75 ids <EOS>, as sd-scripts feeds the encoders."""
    chunked = cut_chunks(ids, n)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if n > 1 and pad != eos:
        for chunk in chunked.split(CHUNK_LEN, dim=1):  # views of `chunked`: fixed in place
            runs_on = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[runs_on, -1] = eos
            empty = chunk[:, 1] == pad
            chunk[empty, 1] = eos
    return chunked


def tokenize_with(tokenizer, captions: Union[str, Sequence[str]], max_token_length: Optional[int] = None,
                  weighted: bool = False) -> torch.Tensor:
    """Token ids of one tokenizer, (B, n_chunks * 77) int64, chunked as sd-scripts does (module docstring)."""
    ids = flat_ids(tokenizer, _as_list(captions), _flat_length(max_token_length), weighted)
    return _chunked(tokenizer, ids, num_chunks(max_token_length))


def tokenize(model, captions: Union[str, Sequence[str]], max_token_length: Optional[int] = None,
             weighted: bool = False) -> list[torch.Tensor]:
    """One LongTensor (B, n_chunks * 77) per tokenizer of `model` (flattened; chunk k is [:, 77k : 77k + 77])."""
    return [tokenize_with(tok, captions, max_token_length, weighted) for tok in model.tokenizers]


def tokenize_weighted(model, captions: Union[str, Sequence[str]],
                      max_token_length: Optional[int] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """--weighted_captions: `tokenize`'s ids and the (B, N) weights of the context's token positions, each caption
    read once per tokenizer. The flat layout is the stitched one, and both SDXL tokenizers split a caption alike,
    so tokenizer 1's weights serve the whole context."""
    from library.prompt_weights import weighted_ids

    captions, n, length = _as_list(captions), num_chunks(max_token_length), _flat_length(max_token_length)
    per_tok = [weighted_ids(tok, captions, length) for tok in model.tokenizers]
    return [_chunked(tok, ids, n) for tok, (ids, _) in zip(model.tokenizers, per_tok)], per_tok[0][1]


# ----------------------------------------------------------------------------------------------------------
# Encoding


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """The final LayerNorm of a CLIP text encoder (transformers 4.x keeps it under `.text_model`; 5.x's
    CLIPTextModel has it at the top level)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def stitch_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n*77, D) chunk-wise hidden states -> (B, 2 + 75n, D): BOS of chunk 0, the middle 75 of every chunk,
    the last position of the last chunk (sd-scripts). n == 1 returns the input unchanged."""
    if n == 1:
        return hidden
    parts = [hidden[:, :1]]
    for k in range(n):
        parts.append(hidden[:, k * CHUNK_LEN + 1 : k * CHUNK_LEN + CHUNK_LEN - 1])
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def _first_eos_pool(text_encoder_2, last_hidden_state: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """text_projection of the final-LN hidden state at the first EOS of each row (sd-scripts `pool_workaround`;
    the same position as CLIP's argmax-token-id pooling, since EOS has the largest id)."""
    index = torch.argmax((ids == eos_id).int(), dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), index]
    proj = text_encoder_2.text_projection
    return proj(pooled.to(compute_dtype(proj))).to(last_hidden_state.dtype)


def encode_prompts(model, captions: Union[str, Sequence[str]], *, clip_skip: Optional[int] = None,
                   max_token_length: Optional[int] = None, device=None, weighted: bool = False,
                   keep_mean: bool = False, keep_chunk_ends: bool = False) -> TextConditioning:
    """Encode captions with the model's (live, possibly LoRA-patched) text encoders: `tokenize`, then `encode_ids`
    (then, with `weighted`, `apply_token_weights`, `keep_mean` passed on). `keep_chunk_ends`: see `encode_ids`.

    Token ids go to each text encoder's device; the result stays there (and in the encoder's dtype) unless
    `device` is given. Runs under the caller's grad mode: wrap in `torch.no_grad()` for frozen encoders.
    """
    captions = _as_list(captions)
    if not captions:
        raise ValueError("encode_prompts: no captions given")
    ids, weights = tokenize_weighted(model, captions, max_token_length) if weighted else \
        (tokenize(model, captions, max_token_length), None)
    ids_list = [to_device(t, _module_device(te)) for t, te in zip(ids, model.text_encoders)]  # no stream sync
    cond = encode_ids(model, ids_list, clip_skip=clip_skip, max_token_length=max_token_length,
                      keep_chunk_ends=keep_chunk_ends)
    if weights is not None:
        if keep_chunk_ends:
            weights = cut_chunks(weights, num_chunks(max_token_length))
        cond = apply_token_weights(cond, weights, keep_mean,
                                   widths=[te.config.hidden_size for te in model.text_encoders])
    return cond.to(device=device) if device is not None else cond


def encode_ids(model, ids_list: Sequence[torch.Tensor], *, clip_skip: Optional[int] = None,
               max_token_length: Optional[int] = None, keep_chunk_ends: bool = False) -> TextConditioning:
    """The text encoders on token ids (`tokenize`'s, one (B, n_chunks * 77) tensor per encoder, on its device):
    tensor work only, no host synchronisation, so `--text_encoder_cuda_graph` can record it. The chunks are
    stitched (2 + 75n states, as training in sd-scripts), or with `keep_chunk_ends` simply concatenated (77n
    states, every chunk's BOS and EOS kept: sd-scripts' lpw sampling pipelines, A1111 and ComfyUI).

    SD1/SD2: last_hidden_state (clip_skip None or 1), else final_layer_norm(hidden_states[-clip_skip]).
    SDXL: context = cat(TE1 hidden_states[-2], TE2 hidden_states[-2]) (no final LN; [-2] is sd-scripts'
    `hidden_states[11]` for the real 12-layer TE1), pooled = TE2 text_projection of the final-LN EOS state of
    the first chunk. clip_skip is ignored for SDXL (as in sd-scripts; a warning is logged once).
    """
    global _warned_sdxl_clip_skip
    n = num_chunks(max_token_length)
    stitched = 1 if keep_chunk_ends else n  # stitch_chunks leaves 1 chunk as it is
    b = ids_list[0].shape[0]
    if model.is_sdxl:
        if clip_skip not in (None, 1) and not _warned_sdxl_clip_skip:
            logger.warning("clip_skip=%s is ignored for SDXL (sd-scripts uses TE1/TE2 penultimate layers)", clip_skip)
            _warned_sdxl_clip_skip = True
        te1, te2 = model.text_encoders
        ids1, ids2 = ids_list[0].reshape(-1, CHUNK_LEN), ids_list[1].reshape(-1, CHUNK_LEN)
        out1 = te1(ids1, output_hidden_states=True, return_dict=True)
        h1 = out1.hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True, return_dict=True)
        h2 = out2.hidden_states[-2]
        pooled = _first_eos_pool(te2, out2.last_hidden_state, ids2, model.tokenizers[1].eos_token_id)
        h1 = stitch_chunks(h1.reshape(b, -1, h1.shape[-1]), stitched)
        h2 = stitch_chunks(h2.reshape(b, -1, h2.shape[-1]), stitched)
        pooled = pooled[::n]
        context = torch.cat([h1, h2.to(device=h1.device, dtype=h1.dtype)], dim=-1)
        return TextConditioning(context, pooled.to(device=context.device))
    te = model.text_encoders[0]
    ids = ids_list[0].reshape(-1, CHUNK_LEN)
    if clip_skip is not None and clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    if clip_skip is None or clip_skip == 1:
        hidden = te(ids, return_dict=True).last_hidden_state
    else:
        out = te(ids, output_hidden_states=True, return_dict=True)
        if clip_skip >= len(out.hidden_states):
            raise ValueError(f"clip_skip={clip_skip} is larger than the text encoder's "
                             f"{len(out.hidden_states) - 1} layers")
        hidden = final_layer_norm(te)(out.hidden_states[-clip_skip])
    return TextConditioning(stitch_chunks(hidden.reshape(b, -1, hidden.shape[-1]), stitched), None)


# ----------------------------------------------------------------------------------------------------------
# UNet call


def sdxl_time_ids(original_sizes_hw, crop_top_lefts, target_sizes_hw) -> torch.Tensor:
    """(B, 6) float32: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (diffusers' add_time_ids order).
    Each argument is (B, 2) (tensor, or a list of pairs)."""
    parts = [torch.as_tensor(x).reshape(-1, 2).to(torch.float32) for x in (original_sizes_hw, crop_top_lefts, target_sizes_hw)]
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"sdxl_time_ids: batch sizes differ {[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1)


def unet_forward(model, noisy_latents: torch.Tensor, timesteps, cond: TextConditioning,
                 time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The UNet's prediction. The conditioning is cast to the UNet's dtype and the latents' device; SDXL adds
    `added_cond_kwargs` (pooled text embeds + time ids, which are required)."""
    unet = model.unet
    dtype, dev = unet.dtype, noisy_latents.device
    context = cond.context.to(device=dev, dtype=dtype)
    kwargs = {}
    if model.is_sdxl:
        if cond.pooled is None:
            raise ValueError("SDXL needs pooled text embeddings (cond.pooled is None)")
        if time_ids is None:
            raise ValueError("SDXL needs time_ids: build them with sdxl_time_ids(original_sizes_hw, crop_top_lefts, target_sizes_hw)")
        kwargs["added_cond_kwargs"] = {
            "text_embeds": cond.pooled.to(device=dev, dtype=dtype),
            # float32, as sd-scripts embeds them: bf16 would round the sizes (1500 -> 1504) before the sinusoid
            "time_ids": time_ids.to(device=dev, dtype=torch.float32),
        }
    return unet(noisy_latents, timesteps, encoder_hidden_states=context, **kwargs).sample


# ----------------------------------------------------------------------------------------------------------
# Cache for frozen text encoders


class TextEncoderCache:
    """Memo of `encode_prompts` per caption string, for frozen text encoders. Entries are CPU tensors.

    `get(captions)` encodes the captions it has not seen (in one batch, under no_grad) and returns the batch
    as a TextConditioning on the CPU. In memory only (`--cache_text_encoder_outputs_to_disk` keeps it there too):
    encoding a run's captions takes seconds, and a file keyed by caption and settings could not tell two models
    saved at one path apart.
    """

    def __init__(self, model, clip_skip: Optional[int] = None, max_token_length: Optional[int] = None,
                 batch_size: int = 16, weighted: bool = False):
        num_chunks(max_token_length)  # validate early
        self.model = model
        self.weighted = weighted  # --weighted_captions
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.batch_size = max(1, int(batch_size))
        self._mem: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.num_encoded = 0  # captions actually run through the text encoders (not read from memory)

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, caption: str) -> bool:
        return caption in self._mem

    def _encode_missing(self, captions: Sequence[str]) -> None:
        missing = [c for c in dict.fromkeys(captions) if c not in self._mem]  # unique, in order
        for start in range(0, len(missing), self.batch_size):
            part = missing[start : start + self.batch_size]
            with torch.no_grad():
                cond = encode_prompts(self.model, part, clip_skip=self.clip_skip,
                                      max_token_length=self.max_token_length, weighted=self.weighted)
            self.num_encoded += len(part)
            for i, c in enumerate(part):
                context = cond.context[i].detach().to("cpu").clone()
                pooled = None if cond.pooled is None else cond.pooled[i].detach().to("cpu").clone()
                self._mem[c] = (context, pooled)

    def get(self, captions: Union[str, Sequence[str]]) -> TextConditioning:
        captions = _as_list(captions)
        if not captions:
            raise ValueError("TextEncoderCache.get: no captions given")
        self._encode_missing(captions)
        entries = [self._mem[c] for c in captions]
        context = torch.stack([e[0] for e in entries])
        pooled = torch.stack([e[1] for e in entries]) if entries[0][1] is not None else None
        return TextConditioning(context, pooled)

    def precompute(self, captions: Sequence[str], show_progress: bool = True) -> None:
        """Encode every caption once (a tqdm bar over batches)."""
        unique = [c for c in dict.fromkeys(_as_list(captions)) if c not in self._mem]
        if not unique:
            return
        from tqdm import tqdm

        with tqdm(total=len(unique), desc="caching text encoder outputs", disable=not show_progress, unit="caption") as bar:
            for start in range(0, len(unique), self.batch_size):
                part = unique[start : start + self.batch_size]
                self._encode_missing(part)
                bar.update(len(part))
