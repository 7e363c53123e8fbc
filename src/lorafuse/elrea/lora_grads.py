"""Per-example gradients of a loss with respect to every LoRA weight of an adapter.

Per-example gradients come from *one* batched backward (:func:`per_example_lora_grads`):
a LoRA linear is two plain linears ``u = x A^T`` and ``z = u B^T`` (the output then scaled
by ``s``), and a linear ``y = x W^T`` has the per-example gradient
``dW_i = sum_t gy_{i,t}^T x_{i,t}``. Forward hooks on every ``lora_A`` / ``lora_B`` keep
their inputs and outputs; ``torch.autograd.grad`` of the *summed* per-example losses gives
the output gradients (``gy`` of ``lora_B`` includes ``s``; that of ``lora_A`` is
``s * g B``). Summing is exact: in a causal LM with right padding examples do not
interact, so each example's loss depends only on its own row. Padding positions are
masked. The gradient of the NLL with respect to the final hidden states is formed in chunks
of positions (``softmax - onehot``, then the head weight) instead of through (N, V) logits.
:func:`per_example_lora_grads_loop` is the plain reference: one forward and
``autograd.grad`` per example.

On a CPU both are bound by the same matrix products (the vocabulary projection at every
prompt position is over half of them), so batching gains only GEMM efficiency on longer
matrices, about 1.5-2x for ~30-token prompts (``benchmarks/bench_grad.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.fit import per_example_nll
from lorafuse.core.forward import decoder_parts, run_layers, target_logits
from lorafuse.core.states import pad_states
from lorafuse.errors import LorafuseError

TARGETS = ("prompt", "answer")


@dataclass(frozen=True)
class LoraLinear:
    """One LoRA weight: its name as in ``adapter_model.safetensors`` and its linear module."""

    name: str  # e.g. base_model.model.model.layers.24.self_attn.q_proj.lora_A.weight
    module: nn.Linear

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def lora_linears(model: nn.Module, adapter_name: str | None = None) -> list[LoraLinear]:
    """Every ``lora_A`` / ``lora_B`` linear of the active (or named) adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = adapter_name or _active_adapter(module)
        if name not in module.lora_A:
            continue
        for part in ("lora_A", "lora_B"):
            linear = getattr(module, part)[name]
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                raise LorafuseError(f"{path}: only bias-free LoRA on linear layers is supported")
            out.append(LoraLinear(f"{path}.{part}.weight", linear))
    if not out:
        raise LorafuseError("the model carries no LoRA linear layers")
    return out


def _active_adapter(module: nn.Module) -> str:
    active = module.active_adapters
    if len(active) != 1:
        raise LorafuseError(f"exactly one active adapter needed, found {list(active)}")
    return active[0]


def _inputs(
    states: Sequence[torch.Tensor], encoded: Sequence[Encoded], pad_id: int, target: str
) -> tuple[torch.Tensor, Batch]:
    """Padded states and the batch of loss targets for ``target``.

    ``"prompt"``: each sequence is cut to its prompt and every prompt token after the first
    is a target (``collate`` with ``prompt_len=1``); the states are cut alike, which equals
    running the prompt alone since attention is causal.
    """
    if target == "answer":
        return pad_states(states), collate(encoded, pad_id)
    if target != "prompt":
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    cut = [max(e.prompt_len, 1) for e in encoded]
    prompts = [Encoded(e.ids[:n], 1) for e, n in zip(encoded, cut, strict=True)]
    return pad_states([s[:n] for s, n in zip(states, cut, strict=True)]), collate(prompts, pad_id)


LOGITS_BYTES = 256 << 20  # (positions, vocabulary) logits held at once by _nll_grad


def _example_losses(
    model: nn.Module, states: torch.Tensor, batch: Batch, split: int
) -> torch.Tensor:
    logits = target_logits(model, states, batch, split)
    return per_example_nll(logits, batch)


def _final_hidden(model: nn.Module, states: torch.Tensor, batch: Batch, split: int):
    """Normed last hidden states (N, H) at the positions predicting each target."""
    parts = decoder_parts(model)
    hidden = run_layers(model, states, split)
    picked = hidden[batch.rows.to(hidden.device), batch.positions.to(hidden.device)]
    return parts.norm(picked)


@torch.no_grad()
def _nll_grad(
    normed: torch.Tensor,
    batch: Batch,
    head: nn.Module,
    n: int,
    chunk: int | None = None,
    softcap: float | None = None,
):
    """d(sum_i mean-NLL_i) / d(normed), (N, H), computed ``chunk`` positions at a time
    (default: as many as fit ``LOGITS_BYTES`` of logits; each chunk streams the head's
    weight twice, so at 64 positions that streaming cost more than the products).

    ``softmax(z) - onehot`` times ``1/count_i`` times the head weight: the same products as
    autograd through ``cross_entropy``, without (N, V) logits and their gradient in memory
    (for a prompt target N is every prompt token; at V=49k those buffers cost more in memory
    traffic than the products themselves). With final logit softcapping
    ``z = c tanh(u / c)`` the chain rule adds the factor ``1 - tanh(u / c)^2``.
    """
    rows = batch.rows.to(normed.device)
    targets = batch.targets.to(normed.device)
    chunk = chunk or max(64, LOGITS_BYTES // (4 * head.weight.shape[0]))
    counts = torch.bincount(rows, minlength=n).clamp(min=1).to(normed.dtype)
    out = torch.empty_like(normed)
    for s in range(0, normed.shape[0], chunk):
        z = head(normed[s : s + chunk])
        squash = None if softcap is None else torch.tanh(z / softcap)
        z = z.softmax(dim=-1) if squash is None else (squash * softcap).softmax(dim=-1)
        z[torch.arange(z.shape[0], device=z.device), targets[s : s + chunk]] -= 1
        z.mul_((1 / counts[rows[s : s + chunk]])[:, None])
        if squash is not None:
            z.mul_(1 - squash.square())
        out[s : s + chunk] = z @ head.weight
    return out


def per_example_lora_grads(
    model: nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
    *,
    target: str = "prompt",
    linears: Sequence[LoraLinear] | None = None,
) -> torch.Tensor:
    """Flat per-example gradients (B, P) of each example's mean NLL, from one backward.

    ``model`` carries LoRA layers only at or above ``split``; ``states`` are the (len_i, H)
    hidden states entering layer ``split``. Columns follow :func:`lora_linears`.
    """
    linears = list(linears) if linears is not None else lora_linears(model)
    device = next(model.parameters()).device
    padded, batch = _inputs(states, encoded, pad_id, target)
    padded = padded.to(device)
    n, width = padded.shape[:2]
    mask = torch.arange(width, device=device)[None] < batch.lengths.to(device)[:, None]
    mask = mask.to(padded.dtype)[..., None]  # (B, T, 1)

    seen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(linears)

    def keep(k: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if seen[k] is not None:
                raise LorafuseError(f"{linears[k].name} ran twice in one forward")
            seen[k] = (args[0].detach(), output)

        return hook

    flags = [lin.module.weight.requires_grad for lin in linears]
    handles = [lin.module.register_forward_hook(keep(k)) for k, lin in enumerate(linears)]
    try:
        for lin in linears:
            lin.module.weight.requires_grad_(True)  # so the LoRA outputs join the graph
        with torch.enable_grad():
            normed = _final_hidden(model, padded, batch, split)
            if any(s is None for s in seen):
                missing = [lin.name for lin, s in zip(linears, seen, strict=True) if s is None]
                raise LorafuseError(f"LoRA layers not run (below split {split}?): {missing[:3]}")
            parts = decoder_parts(model)
            head = parts.lm_head
            if getattr(head, "bias", None) is not None:
                raise LorafuseError("an lm_head with a bias is not supported")
            grads = torch.autograd.grad(
                normed,
                [s[1] for s in seen],
                grad_outputs=_nll_grad(normed.detach(), batch, head, n, softcap=parts.softcap),
                allow_unused=True,
            )
    finally:
        for h in handles:
            h.remove()
        for lin, flag in zip(linears, flags, strict=True):
            lin.module.weight.requires_grad_(flag)

    out = padded.new_empty(n, sum(lin.numel for lin in linears))
    offset = 0
    for lin, (x, _), gy in zip(linears, seen, grads, strict=True):
        size = lin.numel
        block = out[:, offset : offset + size].view(n, *lin.module.weight.shape)
        if gy is None:  # output does not reach the loss (e.g. a module after the last target)
            block.zero_()
        else:
            block.copy_(torch.bmm(gy.transpose(1, 2), x.to(gy.dtype) * mask))
        offset += size
    return out


def per_example_lora_grads_loop(
    model: nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
    *,
    target: str = "prompt",
    linears: Sequence[LoraLinear] | None = None,
) -> torch.Tensor:
    """The same (B, P) gradients with one forward and backward per example (the reference)."""
    linears = list(linears) if linears is not None else lora_linears(model)
    device = next(model.parameters()).device
    weights = [lin.module.weight for lin in linears]
    flags = [w.requires_grad for w in weights]
    rows = []
    try:
        for w in weights:
            w.requires_grad_(True)
        for state, example in zip(states, encoded, strict=True):
            padded, batch = _inputs([state], [example], pad_id, target)
            with torch.enable_grad():
                loss = _example_losses(model, padded.to(device), batch, split).sum()
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(w)).reshape(-1)
                        for g, w in zip(grads, weights, strict=True)
                    ]
                )
            )
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return torch.stack(rows)


def _canonical(name: str) -> str:
    """``...lora_A.<adapter>.weight`` (a live module's name) -> ``...lora_A.weight`` (file)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
