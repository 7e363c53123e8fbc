"""A causal LM cut in two: frozen lower layers (run once, cached) and the adapted top.

Only the top layers carry LoRA weights in the default setting, so the hidden states
entering layer ``split`` are the same for every expert and every method; they are
computed once per example and reused. The top is then run on those states, and logits
are computed only at the positions that predict answer tokens (a full-vocabulary
projection at every position costs more than the rest of a scoring pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafuse.core.encode import Batch
from lorafuse.errors import LorafuseError


@dataclass
class DecoderParts:
    """The pieces of a Llama-style causal LM that the split forward calls directly."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a PeftModel (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_parts(model: nn.Module) -> DecoderParts:
    lm = causal_lm(model)
    inner = getattr(lm, "model", None)
    try:
        return DecoderParts(
            inner.embed_tokens, inner.layers, inner.norm, lm.lm_head, inner.rotary_emb
        )
    except AttributeError:
        raise LorafuseError(
            f"{type(lm).__name__}: lorafuse needs a Llama-style decoder "
            "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)"
        ) from None


def num_layers(model: nn.Module) -> int:
    return len(decoder_parts(model).layers)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, T, T) mask; explicit so eager and sdpa attention agree."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


def run_layers(
    model: nn.Module, hidden: torch.Tensor, start: int, end: int | None = None
) -> torch.Tensor:
    """Run decoder layers ``start:end`` on hidden states (B, T, H) of right-padded rows."""
    parts = decoder_parts(model)
    length = hidden.shape[1]
    position_ids = torch.arange(length, device=hidden.device)[None]
    rotary = parts.rotary(hidden, position_ids)
    mask = causal_mask(length, hidden.dtype, hidden.device)
    for layer in parts.layers[start:end]:
        hidden = layer(
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary
        )
        if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
            hidden = hidden[0]
    return hidden


def lower_states(model: nn.Module, input_ids: torch.Tensor, split: int) -> torch.Tensor:
    """Hidden states entering layer ``split`` (the embeddings when ``split`` is 0)."""
    hidden = decoder_parts(model).embed(input_ids)
    return run_layers(model, hidden, 0, split) if split > 0 else hidden


def target_logits(model: nn.Module, states: torch.Tensor, batch: Batch, split: int) -> torch.Tensor:
    """Logits (N, V) at the positions predicting each target, from states at ``split``."""
    parts = decoder_parts(model)
    hidden = run_layers(model, states, split)
    picked = hidden[batch.rows.to(hidden.device), batch.positions.to(hidden.device)]
    return parts.lm_head(parts.norm(picked))
