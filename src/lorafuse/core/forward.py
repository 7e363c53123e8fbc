"""A causal LM cut in two: frozen lower layers (run once, cached) and the adapted top.

Only the top layers carry LoRA weights in the default setting, so the hidden states
entering layer ``split`` are the same for every expert and every method; they are
computed once per example and reused. The top is then run on those states, and logits
are computed only at the positions that predict answer tokens (a full-vocabulary
projection at every position costs more than the rest of a scoring pass).

Every model is checked first (:mod:`lorafuse.core.probe`). A model the split forward
does not reproduce runs its own full forward instead: its "states" are then the input
embeddings, ``split`` is ignored, and every layer runs on every call.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from lorafuse.core.decoder import (
    DecoderParts,
    causal_lm,
    decoder_parts,
    find_layers,
    head_logits,
    input_embeddings,
    mlp_only_at,
    own_final_hidden,
    own_logits,
    split_embed,
    split_layers,
)
from lorafuse.core.encode import Batch
from lorafuse.core.probe import FULL, ForwardPlan, model_label, plan_of
from lorafuse.errors import LorafuseError

__all__ = [
    "DecoderParts",
    "ForwardPlan",
    "causal_lm",
    "decoder_parts",
    "final_hidden",
    "lower_states",
    "num_layers",
    "plan_of",
    "run_layers",
    "target_logits",
]


def num_layers(model: nn.Module) -> int:
    """Decoder layers (from the config where the layer list is not found by name)."""
    try:
        return len(find_layers(model))
    except LorafuseError:
        count = getattr(getattr(causal_lm(model), "config", None), "num_hidden_layers", None)
        if isinstance(count, int):
            return count
        raise


def _split_plan(model: nn.Module, length: int) -> ForwardPlan:
    """The plan, refusing what the split forward cannot do or was not checked for."""
    plan = plan_of(model)
    if plan.path == FULL:
        raise LorafuseError(
            "per-layer hidden states are not available: the model runs its own full forward "
            f"({plan.reason})",
            model_label(causal_lm(model)),
        )
    if plan.max_len is not None and length > plan.max_len:
        raise LorafuseError(
            f"a {length}-token sequence is longer than the sliding window ({plan.max_len}) "
            "that the split forward was checked within",
            model_label(causal_lm(model)),
        )
    return plan


def run_layers(
    model: nn.Module, hidden: torch.Tensor, start: int, end: int | None = None
) -> torch.Tensor:
    """Run decoder layers ``start:end`` on hidden states (B, T, H) of right-padded rows."""
    _split_plan(model, hidden.shape[1])
    return split_layers(decoder_parts(model), hidden, start, end)


def lower_states(model: nn.Module, input_ids: torch.Tensor, split: int) -> torch.Tensor:
    """Hidden states entering layer ``split`` (the input embeddings on the full path)."""
    if plan_of(model).path == FULL:
        return input_embeddings(model, input_ids)
    _split_plan(model, input_ids.shape[1])
    parts = decoder_parts(model)
    return split_layers(parts, split_embed(parts, input_ids), 0, split)


def final_hidden(
    model: nn.Module, states: torch.Tensor, split: int, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Final-normed last hidden states (B, T, H) from states at ``split``."""
    if plan_of(model).path == FULL:
        return own_final_hidden(model, states, lengths)
    return decoder_parts(model).norm(run_layers(model, states, split))


def target_logits(
    model: nn.Module,
    states: torch.Tensor,
    batch: Batch,
    split: int,
    *,
    mlp_at_targets: bool = False,
) -> torch.Tensor:
    """Logits (N, V) at the positions predicting each target, from states at ``split``.

    ``mlp_at_targets``: run the last layer's MLP only at those positions (exact there, where
    the probe found it so; about 10% less work for short answers over six adapted layers).
    Only for modules that act per position: a mixture whose weights come per batch row
    would see one row of picked positions.
    """
    plan = plan_of(model)
    if plan.path == FULL:
        logits = own_logits(model, states, batch.lengths)
        return logits[batch.rows.to(logits.device), batch.positions.to(logits.device)]
    parts = decoder_parts(model)
    rows, positions = batch.rows.to(states.device), batch.positions.to(states.device)
    pick = mlp_at_targets and plan.mlp_at_targets
    with mlp_only_at(parts.layers[-1], rows, positions) if pick else nullcontext():
        hidden = run_layers(model, states, split)
    return head_logits(parts, parts.norm(hidden[rows, positions]))
