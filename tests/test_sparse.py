"""Sparse top-k dispatch equals the dense masked mixture (weights zero outside the top-k):
the kernels against hand-written dense math, never reading an unselected expert, and whole
models (per example, per token, routers, gradients, ``generate``) sparse vs dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafuse.core import sparse
from lorafuse.core.mixture import BatchMixer, FactorSet, mixture_of_loras
from lorafuse.core.sparse import (
    TopK,
    dense_weights,
    sparse_mixture,
    top_k_of_weights,
    top_k_select,
)
from lorafuse.fusion.routers import ArrowRouter, LayerRouter, top_k_softmax
from lorafuse.library import LoraFactors

K, R, D_IN, D_OUT = 10, 3, 12, 7
IDS = torch.tensor([[3, 17, 9, 88, 41, 5], [7, 7, 2, 99, 31, 11], [1, 2, 3, 4, 5, 6]])


def factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, R, D_IN, generator=gen), torch.randn(K, R, D_OUT, generator=gen)


def dense_reference(x, out, A, Bk, weights) -> torch.Tensor:
    """``out + sum_k a_k (x A_k^T) B_k`` over all K experts, in float64."""
    a = weights.double()
    if a.dim() == 2 and x.dim() == 3:
        a = a[:, None, :]
    h = torch.einsum("...d,krd->...kr", x.double(), A.double())
    return (out.double() + torch.einsum("...kr,...k,kro->...o", h, a, Bk.double())).float()


def random_top(shape: tuple[int, ...], k: int, seed: int, n: int = K) -> TopK:
    gen = torch.Generator().manual_seed(seed)
    return top_k_select(torch.randn(*shape, n, generator=gen), k)


@pytest.mark.parametrize(
    "lead, top_shape",
    [((2, 5), ()), ((2, 5), (2,)), ((2, 5), (2, 5)), ((40, 9), (40, 9))],
    ids=["global", "per_example", "per_token_gathered", "per_token_grouped"],
)
def test_kernels_equal_the_dense_masked_sum(lead, top_shape, monkeypatch) -> None:
    if lead[0] == 40:
        monkeypatch.setattr(sparse, "GATHER_BUDGET", 0)  # force the grouped path
    A, Bk = factors()
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(*lead, D_IN, generator=gen), torch.randn(*lead, D_OUT, generator=gen)
    top = random_top(top_shape, 3, seed=2)
    want = dense_reference(x, out, A, Bk, top.dense())
    # the unselected experts are never read: poison them
    chosen = torch.zeros(K, dtype=torch.bool)
    chosen[top.indices.unique()] = True
    A[~chosen], Bk[~chosen] = float("nan"), float("nan")
    got = sparse_mixture(x, out, A, Bk, top)
    # outputs of size ~10: fp32 rounding of a sum in another order, a few 1e-6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_top_k_forms() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, -2.0, 4.0, 0.0]])
    top = top_k_select(logits, 2, temperature=0.5)
    torch.testing.assert_close(top.dense(), top_k_softmax(logits, 2, 0.5))
    w = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.1, 0.2]])
    kept = top_k_of_weights(w, 2)  # renormalised to each row's original sum (1.0, 0.6)
    want = torch.tensor([[0.0, 0.6 / 0.9, 0.3 / 0.9], [0.3 * 1.2, 0.0, 0.2 * 1.2]])
    torch.testing.assert_close(kept.dense(), want)
    assert dense_weights(w) is w


def library(model, n: int = 8, seed: int = 0) -> list[FactorSet]:
    """``n`` random in-memory experts on q/v/up of both layers (ranks 1..4)."""
    gen = torch.Generator().manual_seed(seed)
    names = [
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
    ]
    out = []
    for k in range(n):
        mods = {}
        for name in names:
            lin = model.get_submodule(name)
            r = 1 + k % 4
            mods[name] = LoraFactors(
                A=torch.randn(r, lin.in_features, generator=gen) * 0.3,
                B=torch.randn(lin.out_features, r, generator=gen) * 0.3,
                scaling=0.5 + k / n,
            )
        out.append(FactorSet(f"e{k}", mods))
    return out


def logits_of(model, experts, mixer, sparse_on: bool) -> torch.Tensor:
    with mixture_of_loras(model, experts, mixer, sparse=sparse_on), torch.no_grad():
        return model(IDS).logits


def test_per_example_and_per_token_top_k_in_the_model(tiny_llama) -> None:
    experts = library(tiny_llama)
    plain = tiny_llama(IDS).logits.detach()
    for top in (random_top((3,), 2, 5, 8), random_top((3, 6), 3, 6, 8), random_top((), 2, 7, 8)):
        mixer = BatchMixer()
        mixer.current = top
        got = logits_of(tiny_llama, experts, mixer, True)
        mixer.current = top.dense()  # the dense masked mixture, as a plain weight tensor
        want = logits_of(tiny_llama, experts, mixer, True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
        assert (got - plain).abs().max() > 1e-2  # the experts did run


@pytest.mark.parametrize("per_example", [True, False])
def test_top_k_layer_router_sparse_equals_dense_with_gradients(tiny_llama, per_example) -> None:
    experts = library(tiny_llama)
    router = LayerRouter([0, 1], tiny_llama.config.hidden_size, 8, per_example=per_example, top_k=2)
    torch.manual_seed(3)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    results = []
    for sparse_on in (True, False):
        router.zero_grad()
        with mixture_of_loras(tiny_llama, experts, router, sparse=sparse_on):
            with router.hooked(tiny_llama):
                logits = tiny_llama(IDS).logits
                assert isinstance(router.current[1], TopK)
        F.log_softmax(logits, -1)[..., 5].sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in router.parameters()]))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert g.abs().sum() > 0


def generate(model, experts, mixer, sparse_on: bool):
    with mixture_of_loras(model, experts, mixer, sparse=sparse_on), torch.no_grad():
        return model.generate(
            IDS[:, :4],
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("granularity", ["per_example", "per_token"])
def test_sparse_equals_dense_inside_generate(tiny_llama, granularity) -> None:
    """Prompt and every cached decoding step: same scores, same tokens."""
    experts = library(tiny_llama)
    if granularity == "per_token":
        mixer = ArrowRouter(top_k=2, temperature=0.1)  # per token, per module
    else:
        mixer = BatchMixer()
        mixer.current = random_top((3,), 2, seed=9, n=8)
    got = generate(tiny_llama, experts, mixer, True)
    want = generate(tiny_llama, experts, mixer, False)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(
        torch.stack(got.scores), torch.stack(want.scores), rtol=1e-6, atol=2e-6
    )
