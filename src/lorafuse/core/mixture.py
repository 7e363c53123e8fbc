"""The mixture-of-LoRA layer: ``W x + sum_k a_k(x) * B_k A_k x`` for K experts at once.

Every fusion that mixes experts' weights is this layer with different mixing weights:
a static merge (constant ``a``), learned merge coefficients (``a`` a parameter, global or
per layer), routing (``a`` per example or per token, from a router). The experts' factors
are stacked (ranks zero-padded to the largest, scalings folded into B) and applied with
two GEMMs (into all K rank spaces, weighted, back onto the base output), so a batch whose
items want different mixes is one batched computation and no merged weight is ever formed.
A mixer that keeps only k of the K experts returns a :class:`~lorafuse.core.sparse.TopK`;
with ``sparse=True`` (the default) only those experts are computed (see core/sparse.py),
with ``sparse=False`` it is run as the dense masked mixture (zero weight elsewhere).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lorafuse.core.sparse import TopK, sparse_mixture
from lorafuse.factors import FactorSource, LoraFactors, module_factors, union_modules

Weights = torch.Tensor | TopK  # dense (..., K) mixing weights or the selected top-k


class Mixer(Protocol):
    """Gives the mixing weights of one adapted module for its input ``x`` (B, T, d_in):
    shape (K,), (B, K) or (B, T, K), or a :class:`TopK` of the same granularities.
    ``module`` carries ``name``, ``layer``, ``A``, ``B``."""

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> Weights: ...


@dataclass
class FactorSet:
    """LoRA factors held in memory (a merge, a shared or exclusive delta) under a name."""

    name: str
    modules: dict[str, LoraFactors]

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def num_bytes(self) -> int:
        """Size of the factors (A's and B's at their dtype), as stored."""
        return sum(
            f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
            for f in self.modules.values()
        )

    def factors(self, module: str) -> LoraFactors:
        return self.modules[module]


def stack_factors(factors: Sequence[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, r_max, d_in) A's and (K, d_out, r_max) scaled B's; zero padding adds nothing."""
    r_max = max(f.rank for f in factors)
    d_out, d_in = factors[0].d_out, factors[0].d_in
    A = factors[0].A.new_zeros(len(factors), r_max, d_in)
    B = factors[0].B.new_zeros(len(factors), d_out, r_max)
    for k, f in enumerate(factors):
        A[k, : f.rank] = f.A
        B[k, :, : f.rank] = f.B * f.scaling
    return A, B


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` plus K LoRA experts mixed by weights from a shared mixer.

    ``shared`` (optional) is a delta everyone gets (Twin-Merging's shared merge): it is folded
    into a copy of the base weight, so it costs nothing per token. ``sparse``: run
    :class:`TopK` weights on the selected experts only (else as dense masked weights).
    """

    def __init__(
        self,
        base: nn.Linear,
        factors: Sequence[LoraFactors],
        name: str,
        mixer: Mixer,
        shared: LoraFactors | None = None,
        sparse: bool = True,
    ) -> None:
        super().__init__()
        self.sparse = sparse
        if shared is not None:
            folded = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            folded = folded.to(base.weight.device, base.weight.dtype).requires_grad_(False)
            delta = shared.delta().to(base.weight.device, base.weight.dtype)
            folded.weight.copy_(base.weight.detach() + delta)
            if base.bias is not None:
                folded.bias.copy_(base.bias.detach())
            base = folded
        self.base = base
        self.name = name
        self.layer = layer_index(name)
        A, B = stack_factors(factors)
        device, dtype = base.weight.device, base.weight.dtype
        self.register_buffer("A", A.to(device, dtype), persistent=False)
        # the same factors laid out for two plain GEMMs: (d_in, K*r) and (K*r, d_out); B is
        # kept only in the second layout (``B`` and ``Bk`` are views of it)
        self.register_buffer(
            "At", self.A.permute(2, 0, 1).reshape(A.shape[2], -1).contiguous(), persistent=False
        )
        self.register_buffer(
            "Bt",
            B.to(device, dtype).permute(0, 2, 1).reshape(-1, B.shape[1]).contiguous(),
            persistent=False,
        )
        self.mixer = mixer  # a plain attribute: shared by all layers, not a submodule

    @property
    def Bk(self) -> torch.Tensor:
        """(K, r, d_out): each expert's scaled B, transposed (a view of ``Bt``)."""
        return self.Bt.view(self.A.shape[0], self.A.shape[1], -1)

    @property
    def B(self) -> torch.Tensor:
        """(K, d_out, r): each expert's scaled B (a view of ``Bt``)."""
        return self.Bk.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mixer.weights(self, x).to(x.device)  # mixers and routers may sit on the CPU
        out = self.base(x)
        if isinstance(a, TopK):
            if self.sparse:
                return sparse_mixture(x, out, self.A, self.Bk, a)
            a = a.dense()
        if getattr(self.mixer, "one_per_item", False) and a.dim() == 2 and x.dim() == 3:
            return self._one_expert_per_item(x, a, out)
        k, r = self.A.shape[:2]
        lead = x.shape[:-1]
        # one GEMM into all K experts' rank spaces, weight them, one GEMM back (accumulated
        # onto the base output)
        h = (x.reshape(-1, x.shape[-1]) @ self.At).view(*lead, k, r)
        h = h * _broadcast(a, x)[..., None]
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, k * r), self.Bt)
        return flat.view(*lead, out.shape[-1])

    def _one_expert_per_item(
        self, x: torch.Tensor, a: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Hard routing (at most one expert per item): gather each item's factors and apply
        them with two batched matmuls, 1/K of the work of mixing all K (what Punica's
        gathered kernels do)."""
        idx = a.abs().argmax(-1)  # (B,)
        coef = a.gather(1, idx[:, None])[:, :, None]  # (B, 1, 1); 0 for an item with no expert
        h = torch.bmm(x, self.A[idx].transpose(1, 2)) * coef  # (B, T, r)
        return torch.baddbmm(out, h, self.Bk[idx])


def _broadcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weights (K,), (B, K) or (B, T, K) shaped to broadcast against x's (..., K)."""
    if a.dim() == 1 or a.dim() == x.dim():
        return a
    if a.dim() == 2 and x.dim() == 3:  # per example: same weights at every token
        return a[:, None, :]
    raise ValueError(f"mixing weights of shape {tuple(a.shape)} for inputs {tuple(x.shape)}")


def layer_index(module: str) -> int:
    """Decoder layer number in a module name such as ``model.layers.24.mlp.up_proj``
    (GPT-2's ``transformer.h.3.attn.c_attn``: ``h``); -1 outside the decoder layers."""
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", module)
    return int(m.group(1)) if m else -1


@contextlib.contextmanager
def mixture_of_loras(
    model: nn.Module,
    adapters: Sequence[FactorSource],
    mixer: Mixer,
    shared: FactorSource | None = None,
    sparse: bool = True,
) -> Iterator[dict[str, MixtureLinear]]:
    """Swap each adapted Linear of ``model`` for a MixtureLinear; restore on exit.

    The modules are the union of the sources' (a source that does not adapt a module adds
    zero there). ``shared`` is added for every input (folded into the weights, see
    :class:`MixtureLinear`); ``sparse``: top-k weights computed on the selected experts only.
    """
    swapped: dict[str, tuple[nn.Module, str, nn.Module]] = {}
    layers: dict[str, MixtureLinear] = {}
    try:
        extra = [shared] if shared is not None else []
        for module in union_modules([*adapters, *extra]):
            parent_name, _, child = module.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            factors = module_factors([*adapters, *extra], module)
            common = factors.pop() if shared is not None else None
            if common is not None and module not in set(shared.module_names):
                common = None
            layers[module] = MixtureLinear(original, factors, module, mixer, common, sparse)
            swapped[module] = (parent, child, original)
            setattr(parent, child, layers[module])
        yield layers
    finally:
        for parent, child, original in swapped.values():
            setattr(parent, child, original)


class ConstantMixer(nn.Module):
    """The same weights for every input: ``(K,)`` globally or ``(L, K)`` per layer.

    With ``trainable=True`` the weights are a parameter: learned merge coefficients.
    """

    def __init__(
        self, init: torch.Tensor, layers: Sequence[int] | None = None, trainable: bool = False
    ) -> None:
        super().__init__()
        self.coef = nn.Parameter(init.clone().float(), requires_grad=trainable)
        self.layer_pos = {layer: i for i, layer in enumerate(layers or [])}
        if init.dim() == 2 and len(self.layer_pos) != init.shape[0]:
            raise ValueError(f"{init.shape[0]} rows of weights for {len(self.layer_pos)} layers")

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> torch.Tensor:
        return self.coef[self.layer_pos[module.layer]] if self.coef.dim() == 2 else self.coef


class BatchMixer:
    """Weights set per batch by the caller (a router): (B, K) or (B, T, K), or per layer,
    dense or :class:`TopK`.

    Setting ``current`` also decides, once per batch rather than in every layer, whether
    each item uses at most one expert (``one_per_item``: hard routing, replicated
    ensembles), which the layers then serve by gathering each item's factors.
    """

    def __init__(self) -> None:
        self._current: Weights | dict[int, Weights] | None = None
        self.one_per_item = False

    @property
    def current(self) -> Weights | dict[int, Weights] | None:
        return self._current

    @current.setter
    def current(self, value: Weights | dict[int, Weights] | None) -> None:
        self._current = value
        self.one_per_item = (
            isinstance(value, torch.Tensor)
            and value.dim() == 2
            and bool(((value != 0).sum(-1) <= 1).all())
        )

    def weights(self, module: MixtureLinear, x: torch.Tensor) -> Weights:
        if self.current is None:
            raise RuntimeError("BatchMixer: no weights set for this batch")
        if isinstance(self.current, dict):
            return self.current[module.layer]
        return self.current
