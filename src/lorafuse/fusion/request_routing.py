"""Arrow at request level (``arrow_top1``): one expert per prompt, so a serving engine that
runs one adapter per request (vLLM's LoRARequest) computes exactly what lorafuse computes.

Arrow (``fusion.routers.ArrowRouter``) routes per token and per module, which no engine
serves. Here the same training-free prototypes (each expert's top right-singular vector of
its delta in each adapted module; zero where the expert does not adapt the module) score the
whole prompt on the *base* model: per module the sign-agnostic alignment ``|v_k . x| / |x|``
of each prompt token's input ``x``, averaged over the prompt's tokens and then over the
modules; the prompt goes to the best-scoring expert alone (weight 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafuse.core.encode import Batch
from lorafuse.core.forward import final_hidden
from lorafuse.core.mixture import BatchMixer, FactorSource
from lorafuse.fusion.base import Fusion, prompt_mask
from lorafuse.library import module_factors, union_modules
from lorafuse.merging.svd import factor_svd
from lorafuse.workspace import Workspace


def arrow_prototype_table(experts: Sequence[FactorSource]) -> dict[str, torch.Tensor]:
    """Module -> (K, d_in) each expert's top right-singular vector there (zero if none)."""
    table = {}
    for module in union_modules(experts):
        rows = []
        for f in module_factors(experts, module):
            _, s, vh = factor_svd(f)
            rows.append(vh[0] if s[0] > 0 else torch.zeros_like(vh[0]))
        table[module] = torch.stack(rows).float()
    return table


@torch.no_grad()
def prompt_arrow_scores(
    model: nn.Module,
    prototypes: dict[str, torch.Tensor],
    states: torch.Tensor,
    batch: Batch,
    split: int,
) -> torch.Tensor:
    """(B, K) mean prompt-token alignment of each expert's prototypes with the inputs of the
    adapted modules, the model's adapted linears running as given (the base model's, or
    mixture layers at zero weight)."""
    mask = prompt_mask(batch, states.shape[1]).to(states.device, torch.float32)[..., None]
    totals: list[torch.Tensor] = []

    def hook(module, args, name):
        x = args[0].float()
        v = prototypes[name].to(x.device)
        align = torch.einsum("btd,kd->btk", x, v).abs() / x.norm(dim=-1, keepdim=True).clamp(
            min=1e-6
        )
        totals.append((align * mask).sum(1) / mask.sum(1).clamp(min=1))

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: hook(mod, args, name)
        )
        for name in prototypes
    ]
    try:
        final_hidden(model, states, split, batch.lengths)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(totals).mean(0)


class PromptArrow:
    """The route function of ``arrow_top1``: scores on the unadapted model (experts at weight
    0), then one-hot weights on the best expert. ``last``: the batch's (B, K) scores."""

    def __init__(self, prototypes: dict[str, torch.Tensor], mixer: BatchMixer, split: int):
        self.prototypes = prototypes
        self.mixer = mixer
        self.split = split
        self.last: torch.Tensor | None = None

    def __call__(self, model: nn.Module, states: torch.Tensor, batch: Batch) -> None:
        k = next(iter(self.prototypes.values())).shape[0]
        self.mixer.current = torch.zeros(k, device=states.device)  # the base model exactly
        self.last = prompt_arrow_scores(model, self.prototypes, states, batch, self.split)
        choice = self.last.argmax(-1)
        self.mixer.current = F.one_hot(choice, k).to(states.device, states.dtype)


def arrow_top1(ws: Workspace, *, seed: int = 0) -> Fusion:
    """Arrow at request level: each prompt to its best-aligned expert alone (servable)."""
    experts = list(ws.private.values())
    mixer = BatchMixer()
    route = PromptArrow(arrow_prototype_table(experts), mixer, ws.cache.split)
    return Fusion("arrow_top1", "routing", experts, mixer, route=route, info={"top_k": 1})


REQUEST_ROUTING = {"arrow_top1": ("routing", arrow_top1, {})}

__all__ = ["REQUEST_ROUTING", "PromptArrow", "arrow_prototype_table", "prompt_arrow_scores"]
