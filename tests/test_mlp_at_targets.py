"""Training's shortcut: the last layer's MLP runs only where logits are read.

In every family the split forward serves, the logits *and* the LoRA gradients at the target
positions must equal those of the full last layer; a layer whose MLP mixes positions must
be caught by the probe and run in full.
"""

from __future__ import annotations

import pytest
import torch
from test_families import EXAMPLES, FAMILIES, base_of, build, with_lora
from torch import nn

from lorafuse.core.encode import collate
from lorafuse.core.fit import per_example_nll
from lorafuse.core.forward import target_logits
from lorafuse.core.probe import SPLIT
from lorafuse.core.states import StateCache, pad_states

SPLIT_FAMILIES = [name for name, spec in FAMILIES.items() if spec[-1] == SPLIT]


def logits_and_grads(model: nn.Module, cache: StateCache, pick: bool):
    batch = collate(EXAMPLES, 0)
    model.zero_grad(set_to_none=True)
    logits = target_logits(model, pad_states(cache.get(EXAMPLES)), batch, 1, mlp_at_targets=pick)
    per_example_nll(logits, batch).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_last_mlp_at_targets_keeps_logits_and_lora_gradients(family: str) -> None:
    model = build(family)
    cache = StateCache(base_of(model, family), 1, persist=False, progress=False)
    assert cache.forward.mlp_at_targets, cache.forward
    peft_model = with_lora(model, family)
    full_logits, full_grads = logits_and_grads(peft_model, cache, pick=False)
    logits, grads = logits_and_grads(peft_model, cache, pick=True)
    torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == full_grads.keys()
    last = [n for n in grads if ".2." in n]  # layer 2, the last: its MLP's LoRA among them
    assert last and all(full_grads[n].abs().max() > 0 for n in last)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-4, msg=name)


class MixingMLP(nn.Module):
    """An MLP whose output at a position also depends on the positions before it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 0.5 * x.cumsum(dim=1)


def test_a_position_mixing_mlp_runs_in_full() -> None:
    model = build("llama")
    model.model.layers[-1].mlp = MixingMLP(model.model.layers[-1].mlp)
    cache = StateCache(base_of(model, "mixing"), 1, persist=False, progress=False)
    assert cache.forward.path == SPLIT and not cache.forward.mlp_at_targets
    batch = collate(EXAMPLES, 0)
    states = pad_states(cache.get(EXAMPLES))
    with torch.no_grad():
        full = target_logits(model, states, batch, 1)
        asked = target_logits(model, states, batch, 1, mlp_at_targets=True)
        model.lorafuse_forward = cache.forward.__class__(SPLIT, mlp_at_targets=True)  # forced
        wrong = target_logits(model, states, batch, 1, mlp_at_targets=True)
    assert torch.equal(asked, full)
    assert (wrong - full).abs().max() > 1e-3  # the probe's refusal is what keeps it exact
