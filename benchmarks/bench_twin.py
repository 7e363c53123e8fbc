"""Benchmark group-wise Twin-Merging against per-item merging and the mixture core, one run.

Run::

    .venv/bin/python benchmarks/bench_twin.py                 # ~2 min on one thread
    .venv/bin/python benchmarks/bench_twin.py --groups 8 --batch 64

Setup: the embedded SmolLM2-135M (fp32, offline) and the K = 8 private experts of the default
library as Twin's sources (shared = task arithmetic 0.3, exclusive deltas at each expert's rank,
the default). A served batch of ``--batch`` test items (prompt + answer, right-padded) from the
8 tasks, with the router weights a confident router gives: softmax of 4 x one-hot(task) plus
unit Gaussian noise (seeded). The router's own pass (the shared model's prompt features) is the
same for all three and is not timed. Every side runs the adapted layers 24-29 on the same
cached hidden states (how lorafuse runs every method) and returns the logits at every target.

* group-wise (``twin_group``): the batch's router weights grouped (argmax bins, k-means,
  ``--groups`` in all), one dense merge ``W + ΔW_s + Σ_t w̄_t ΔW_t^excl`` per group, each
  group's rows run on it (k-means included in the time);
* per-item merging (Twin's reference code): the same with every item its own group: one merge
  per item, each item run alone;
* mixture core (``twin``): shared delta folded once, per-item weights on the exclusive factors,
  the whole batch in one forward, no merged weight formed.

Printed (``ratio = other / group-wise``, > 1: group-wise is faster)::

    twin_group_vs_per_item: ratio=X.XX (per-item s vs group-wise s)
    twin_group_vs_mixture: ratio=X.XX (mixture s vs group-wise s)

Each time is the median of ``--repeats`` calls, the three sides alternating after a warm-up
of each, so load on the machine hits all alike. The script checks that per-item merging equals
the mixture core (max |logit diff|) and prints how far group-wise moves the logits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lorafuse.core.encode import collate, encode_examples
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import BatchMixer, layer_index, mixture_of_loras
from lorafuse.fusion.group_merge import group_items, grouped_logits
from lorafuse.fusion.twin import twin_sources
from lorafuse.library import open_library
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lorafuse" / "data" / "default_library"


def timed_all(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, calls alternating after one warm-up of each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def ratio_line(name: str, other: float, ours: float) -> str:
    return f"{name}: ratio={other / ours:.2f} ({other:.3f} s vs {ours:.3f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--groups", type=int, default=20, help="twin_group's groups (paper: 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base_model("embedded")
    model = base.model
    _, adapters = open_library(LIBRARY, kinds={"private"})
    experts = list(adapters.values())
    task_of = {name: k for k, name in enumerate(adapters)}  # each private expert: its task
    split = min(layer_index(m) for m in experts[0].module_names)
    examples = [ex for ex in builtin_suite(seed=args.seed).get("test") if ex.task in task_of]
    step = max(1, len(examples) // args.batch)
    picked = examples[::step][: args.batch]
    encoded = encode_examples(base.tokenizer, picked)
    batch = collate(encoded, base.tokenizer.pad_token_id)
    with torch.no_grad():
        states = lower_states(model, batch.input_ids, split)

    gen = torch.Generator().manual_seed(args.seed)
    hot = torch.nn.functional.one_hot(torch.tensor([task_of[ex.task] for ex in picked]), 8)
    weights = torch.softmax(4 * hot + torch.randn(len(picked), 8, generator=gen), -1)
    shared, *exclusive = twin_sources(experts, shared_params={"scale": 0.3})
    n_groups = len(group_items(weights.numpy(), args.groups, seed=args.seed)[1])
    print(
        f"batch {len(picked)} items from {len({ex.task for ex in picked})} tasks, width "
        f"{batch.input_ids.shape[1]}, {len(batch.targets)} targets, layers {split}-"
        f"{len(model.model.layers) - 1} adapted; twin_group: {n_groups} groups; "
        f"{args.threads} thread(s)"
    )

    mixer = BatchMixer()
    with mixture_of_loras(model, exclusive, mixer, shared), torch.no_grad():

        def group_wise() -> torch.Tensor:
            labels, means = group_items(weights.numpy(), args.groups, seed=args.seed)
            return grouped_logits(model, states, batch, split, labels, means)

        def per_item() -> torch.Tensor:
            labels = np.arange(len(picked))
            return grouped_logits(model, states, batch, split, labels, weights.numpy())

        def mixture() -> torch.Tensor:
            mixer.current = weights
            return target_logits(model, states, batch, split)

        diff_item = (per_item() - mixture()).abs().max().item()
        diff_group = (group_wise() - mixture()).abs().max().item()
        t = timed_all({"group": group_wise, "per_item": per_item, "mixture": mixture}, args.repeats)
    print(f"check: per-item merged vs mixture core logits max |diff| = {diff_item:.2e}")
    print(f"check: group-wise vs mixture core logits max |diff| = {diff_group:.2e} (grouping)")
    print(ratio_line("twin_group_vs_per_item", t["per_item"], t["group"]))
    print(ratio_line("twin_group_vs_mixture", t["mixture"], t["group"]))


if __name__ == "__main__":
    main()
