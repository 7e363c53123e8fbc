"""Where a Hugging Face causal LM keeps its pieces, and how to run it in two halves.

Most causal LMs are an embedding, a stack of decoder layers and a final norm + output
head (Llama, Mistral, Qwen2, Gemma-2, Phi-3, GPT-NeoX, GPT-2, ...). They differ in the
attribute names, in learned absolute position embeddings (GPT-2's ``wpe``), in the
attention mask each layer expects (full or sliding window, per ``config.layer_types``)
and in what follows the head (Gemma-2's final logit softcapping). This module finds the
pieces by name and runs them as the model's own forward does, building masks with
transformers' own mask functions. Whether that reproduces a given model's forward is not
assumed: :mod:`lorafuse.core.probe` checks every model on a probe input before use.

The second path, for models the split forward does not reproduce, is the model's own
forward from input embeddings (``inputs_embeds``): exact, but it runs every layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorafuse.errors import LorafuseError

LAYER_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


@dataclass
class DecoderParts:
    """The pieces of a causal LM that the split forward calls directly."""

    embed: nn.Module  # token embedding (get_input_embeddings())
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module  # output projection (get_output_embeddings())
    rotary: nn.Module | None  # rotary embedding module, called once per forward
    positions: nn.Module | None  # learned absolute position embeddings (GPT-2's wpe)
    config: object
    softcap: float | None  # final logit softcapping (Gemma-2)


def causal_lm(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a PeftModel (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inner_model(lm: nn.Module) -> nn.Module | None:
    """The decoder stack under the head (``lm.model``, ``lm.transformer``, ``lm.gpt_neox``)."""
    prefix = getattr(lm, "base_model_prefix", None)
    inner = getattr(lm, prefix, None) if isinstance(prefix, str) and prefix else None
    return inner if isinstance(inner, nn.Module) else getattr(lm, "model", None)


def _first(owner: nn.Module | None, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        found = getattr(owner, name, None) if owner is not None else None
        if isinstance(found, nn.Module):
            return found
    return None


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``model.layers``, ``transformer.h``, ...)."""
    lm = causal_lm(model)
    layers = _first(inner_model(lm), LAYER_NAMES)
    if not isinstance(layers, nn.ModuleList):
        raise LorafuseError(f"{type(lm).__name__}: no list of decoder layers found")
    return layers


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Every piece the split forward needs, or one line naming the one that is missing."""
    lm = causal_lm(model)
    inner = inner_model(lm)
    get_in = getattr(lm, "get_input_embeddings", None)
    get_out = getattr(lm, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else getattr(inner, "embed_tokens", None)
    head = get_out() if callable(get_out) else getattr(lm, "lm_head", None)
    found = {
        "embedding": embed,
        "decoder layers": _first(inner, LAYER_NAMES),
        "final norm": _first(inner, NORM_NAMES),
        "output head": head,
    }
    missing = [name for name, module in found.items() if not isinstance(module, nn.Module)]
    if missing:
        raise LorafuseError(f"{type(lm).__name__}: no {', '.join(missing)} found")
    config = getattr(lm, "config", None)
    return DecoderParts(
        embed=embed,
        layers=found["decoder layers"],
        norm=found["final norm"],
        lm_head=head,
        rotary=_first(inner, ("rotary_emb",)),
        positions=_first(inner, ("wpe",)),
        config=config,
        softcap=getattr(config, "final_logit_softcapping", None),
    )


def layer_type(config: object, index: int) -> str:
    """The attention kind of layer ``index``, as the modelling code picks its mask."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def layer_masks(
    parts: DecoderParts, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]
) -> dict[str, object]:
    """One attention mask per layer kind, from transformers' own mask functions.

    Rows are right-padded and no padding mask is given: under causal attention a real
    token never sees a pad after it, so each row computes as if it were alone.
    """
    from transformers import masking_utils as mu  # slow import, only when a model runs

    makers = {
        "full_attention": mu.create_causal_mask,
        "sliding_attention": mu.create_sliding_window_causal_mask,
        "chunked_attention": mu.create_chunked_causal_mask,
    }
    unknown = kinds - set(makers)
    if unknown:
        raise LorafuseError(f"unsupported attention kind {sorted(unknown)[0]!r}")
    args = dict(
        config=parts.config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids,
    )
    return {kind: makers[kind](**args) for kind in kinds}


def split_layers(
    parts: DecoderParts, hidden: torch.Tensor, start: int, end: int | None = None
) -> torch.Tensor:
    """Run decoder layers ``start:end`` on hidden states (B, T, H) of right-padded rows."""
    end = len(parts.layers) if end is None else end
    if start >= end:
        return hidden
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    kinds = {layer_type(parts.config, i) for i in range(start, end)}
    masks = layer_masks(parts, hidden, position_ids, kinds)
    extra = {}
    if parts.rotary is not None:
        extra["position_embeddings"] = parts.rotary(hidden, position_ids)
    for i in range(start, end):
        hidden = parts.layers[i](
            hidden,
            attention_mask=masks[layer_type(parts.config, i)],
            position_ids=position_ids,
            **extra,
        )
        if isinstance(hidden, tuple):  # older layers return (hidden, ...)
            hidden = hidden[0]
    return hidden


def layer_mlp(layer: nn.Module) -> nn.Module | None:
    """The position-wise feed-forward block of a decoder layer (``mlp``, ...), if named so."""
    return _first(layer, MLP_NAMES)


@contextmanager
def mlp_only_at(layer: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """Run ``layer``'s MLP only at ``(rows, positions)`` of its (B, T, H) input (zero output
    elsewhere), as forward hooks removed on exit.

    In the last layer nothing mixes positions after the MLP, so the layer's output is exact
    at those positions and the rest (where no logits are read) is skipped: about three
    quarters of the layer's work at the positions that predict no target. Whether a model's
    layers allow this is checked by the probe, not assumed.
    """
    mlp = layer_mlp(layer)
    if mlp is None:
        raise LorafuseError(f"{type(layer).__name__}: no MLP block found")
    seen: dict[str, torch.Size] = {}

    def pick(module: nn.Module, args: tuple) -> tuple:
        seen["shape"] = args[0].shape
        return (args[0][rows, positions][None], *args[1:])

    def place(module: nn.Module, args: tuple, out):
        first = out[0] if isinstance(out, tuple) else out
        full = first.new_zeros(*seen["shape"][:2], first.shape[-1])
        full = full.index_put((rows, positions), first[0])
        return (full, *out[1:]) if isinstance(out, tuple) else full

    handles = [mlp.register_forward_pre_hook(pick), mlp.register_forward_hook(place)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def split_embed(parts: DecoderParts, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering layer 0: token (+ learned position) embeddings."""
    hidden = parts.embed(input_ids)
    if parts.positions is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = hidden + parts.positions(positions).to(hidden.device)
    return hidden


def head_logits(parts: DecoderParts, normed: torch.Tensor) -> torch.Tensor:
    """Logits from final-normed hidden states (softcapped as the model does)."""
    logits = parts.lm_head(normed)
    if parts.softcap is not None:
        logits = torch.tanh(logits / parts.softcap) * parts.softcap
    return logits


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """What the model's own forward takes as ``inputs_embeds`` for these ids."""
    return causal_lm(model).get_input_embeddings()(input_ids)


def _padding_mask(embeds: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
    if lengths is None:
        return None
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    return (positions < lengths.to(embeds.device)[:, None]).long()


def own_logits(
    model: nn.Module, embeds: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, T, V) of the model's own forward from input embeddings."""
    lm = causal_lm(model)
    out = lm(inputs_embeds=embeds, attention_mask=_padding_mask(embeds, lengths), use_cache=False)
    return out.logits


def own_final_hidden(
    model: nn.Module, embeds: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The decoder stack's own last hidden state (after its final norm), (B, T, H)."""
    inner = inner_model(causal_lm(model))
    mask = _padding_mask(embeds, lengths)
    return inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
