"""Merges with threads: same output at any thread count; ``map_in_order`` keeps order and a
bounded window of items in flight; thread counts are restored."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import torch

from lorafuse.library import LoraAdapter, LoraFactors
from lorafuse.merging import get_method, merge, merge_module
from lorafuse.merging.merge import module_seed
from lorafuse.merging.threads import blas_threads, map_in_order, single_threaded

SHAPES = {  # module -> (d_out, d_in): mixed sizes, so workers finish out of order
    "layers.0.q_proj": (48, 40),
    "layers.0.up_proj": (96, 40),
    "layers.0.down_proj": (40, 96),
    "layers.1.q_proj": (48, 40),
    "layers.1.v_proj": (16, 40),
    "layers.1.up_proj": (96, 40),
}


class MemoryAdapter:
    """What ``merge`` reads from an adapter (module names and factors), held in memory."""

    def __init__(self, seed: int, rank: int = 4) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.module_names = list(SHAPES)
        self._factors = {
            m: LoraFactors(
                A=torch.randn(rank, d_in, generator=gen),
                B=torch.randn(d_out, rank, generator=gen),
                scaling=0.5 + seed / 10,
            )
            for m, (d_out, d_in) in SHAPES.items()
        }

    def factors(self, module: str) -> LoraFactors:
        return self._factors[module]


ADAPTERS = cast(list[LoraAdapter], [MemoryAdapter(seed) for seed in range(5)])
CASES = [
    ("ties", {"density": 0.4}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("magnitude", {"density": 0.3}),
    ("linear", {}),
    ("dare_ties", {"density": 0.5, "seed": 3, "svd": "randomized"}),  # global-RNG SVD
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_merge_same_output_at_any_thread_count(method: str, params: dict[str, Any]) -> None:
    one = merge(ADAPTERS, method, progress=False, threads=1, rank=6, **params)
    # reference: merge_module module by module, no driver, no buffer, no pool
    spec = get_method(method)
    parsed = spec.parse_params({"rank": 6, **params})
    weights = spec.default_weight_list(len(ADAPTERS))
    for module in SHAPES:
        parts = [a.factors(module) for a in ADAPTERS]
        seed = module_seed(params.get("seed", 0), module)
        ref = merge_module(spec, parts, weights, parsed, seed=seed)
        assert torch.equal(one[module].A, ref.A) and torch.equal(one[module].B, ref.B)
    for threads, budget in ((2, 1 << 30), (3, 1 << 30), (2, 1)):  # budget 1: one at a time
        got = merge(
            ADAPTERS, method, progress=False, threads=threads, memory_budget=budget,
            rank=6, **params,
        )  # fmt: skip
        assert list(got) == list(one)
        for module, f in one.items():
            assert torch.equal(got[module].A, f.A), (threads, module)
            assert torch.equal(got[module].B, f.B), (threads, module)
            assert got[module].scaling == f.scaling


def test_merge_restores_thread_counts() -> None:
    before = torch.get_num_threads()
    merge(ADAPTERS, "ties", progress=False, threads=2, density=0.5)
    assert torch.get_num_threads() == before
    merge(ADAPTERS, "ties", progress=False, threads=1, density=0.5)
    assert torch.get_num_threads() == before


def _slow_square(x: int) -> int:
    time.sleep(0.002 * (x % 3))  # later items often finish first
    return x * x


class Counted:
    """An iterable that records how many items were taken from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.taken += 1
            yield i


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_map_in_order_keeps_order_and_bounds_in_flight(threads: int) -> None:
    source = Counted(40)
    yielded = 0
    for i, value in enumerate(map_in_order(_slow_square, source, threads, max_in_flight=3)):
        assert value == i * i
        yielded += 1
        # taken from the source but not yet yielded: this one and at most 2 more
        assert source.taken - (yielded - 1) <= 3
    assert yielded == 40


def test_map_in_order_memory_budget() -> None:
    costs = [10, 10, 10, 100, 10, 10, 5, 5, 5, 5]  # 100 exceeds the budget: admitted alone
    started: list[int] = []

    def record(i: int) -> int:
        started.append(i)  # list.append is atomic
        time.sleep(0.002)
        return i

    out: list[int] = []
    for value in map_in_order(record, range(len(costs)), 2, cost=costs.__getitem__, budget=25):
        active = [i for i in started if i >= len(out)]  # started, not yet yielded
        assert len(active) == 1 or sum(costs[i] for i in active) <= 25, active
        out.append(value)
    assert out == list(range(len(costs)))


def test_map_in_order_workers_are_single_threaded() -> None:
    before = torch.get_num_threads()
    main = threading.get_ident()

    def probe(_: int) -> tuple[int, bool]:
        return torch.get_num_threads(), threading.get_ident() != main

    assert set(map_in_order(probe, range(6), 2)) == {(1, True)}
    assert set(map_in_order(probe, range(3), 1)) == {(1, False)}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [1, 2])
def test_map_in_order_raises_at_the_failing_item(threads: int) -> None:
    def fail_at_3(i: int) -> int:
        if i == 3:
            raise RuntimeError("item 3")
        return i

    got = []
    with pytest.raises(RuntimeError, match="item 3"):
        for value in map_in_order(fail_at_3, range(10), threads):
            got.append(value)
    assert got == [0, 1, 2]


def test_thread_limits_are_restored() -> None:
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    with blas_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        list(map_in_order(_slow_square, range(2), 0))


@pytest.mark.parametrize(("method", "params"), [c for c in CASES[:5] if c[0] != "linear"])
@pytest.mark.parametrize("density", [None, 1.0])
def test_overwriting_the_stack_gives_the_same_result(
    method: str, params: dict[str, Any], density: float | None
) -> None:
    """What merge does to save a stack of deltas per module (``overwrite=True``) changes
    nothing in the result."""
    spec = get_method(method)
    assert spec.overwrites
    kwargs = {k: v for k, v in params.items() if k in ("density", "seed")}
    if density is not None:
        kwargs["density"] = density
    stack = torch.stack([a.factors("layers.0.up_proj").delta() for a in ADAPTERS])
    weights = [0.3, 1.0, -0.5, 0.7, 0.2]
    copying = spec.fn(stack.clone(), weights, **kwargs)
    scratch = stack.clone()
    assert torch.equal(spec.fn(scratch, weights, overwrite=True, **kwargs), copying)
    assert torch.equal(spec.fn(stack, weights, **kwargs), copying)  # and kept stack intact
    assert torch.equal(spec.fn(stack, weights, **kwargs), copying)
