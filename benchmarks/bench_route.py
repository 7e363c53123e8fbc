"""Benchmark routed inference on the mixture-of-LoRA core, all in one run.

Run::

    .venv/bin/python benchmarks/bench_route.py            # every section, a few minutes
    .venv/bin/python benchmarks/bench_route.py --section topk --threads 1

Setup: the embedded SmolLM2-135M (fp32, offline), the K=8 private experts of the default
library (r=8, 7 projections of layers 24-29), a batch of 32 test prompts from 8 different tasks
(mixed batch), right-padded. Every variant runs the adapted layers 24-29 on the same cached
hidden states entering layer 24 (how lorafuse runs every method; the frozen lower layers are
identical for all variants) and takes the logits at each prompt's last position.
Each item has its own mixing weights (soft: a random point of the simplex; hard: one-hot).

Printed lines (``ratio = baseline / lorafuse``, > 1 favours lorafuse):

* ``routed_vs_static``: the soft-routed batch through the core vs one static merged model (the
  uniform merge folded into the base weights, no LoRA work at all). Target: lorafuse at most
  1.3x slower, i.e. ratio >= 0.77.
* ``routed_vs_per_item_merge``: vs what Twin-Merging's reference code does: for every item, add
  ``sum_k a_k dW_k`` into each adapted weight (dense task vectors precomputed), run the item
  alone, restore. Target: ratio >= 5.
* ``top1_vs_peft_adapter_names``: hard (top-1) routing through the core vs PEFT's mixed-batch
  inference (``adapter_names=[...]``, 8 adapters loaded). Target: ratio > 1.

Section ``topk`` (fast as K grows; K = 8 is the library, K = 48 and 256 synthetic experts of
the same modules and ranks):

* ``route_top2_k{8,48,256}_vs_static``: per-example top-2 routing (a TopK, sparse dispatch:
  only the selected experts' factors are gathered) vs the static merged model. Target: routed
  at most 1.3x the static model (ratio >= 0.77) at every K.
* ``route_top2_k{8,48}_sparse_vs_dense``: the same top-2 weights run as the dense masked
  mixture (all K experts, zero weight outside the top-2) vs sparse dispatch.
* ``route_top2_per_token_k48_vs_static``: per-token top-2 (what Arrow gives), grouped by
  expert.

Section ``soft``: ``soft_k48_vs_flop_estimate``: soft per-item routing over all K = 48 (dense,
as it must be) vs its FLOP estimate: the static model's time scaled by the ratio of the two
forwards' matmul FLOPs (counted by ``torch.utils.flop_counter``). Target: ratio near 1.

Each time is the median of ``--repeats`` timed calls after one warm-up call (in ``topk`` and
``soft`` the two sides alternate, so load on the machine hits both alike). The script also
checks that the routed logits equal the per-item merged ones (max abs difference printed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from lorafuse.core.encode import Encoded, collate, encode_prompt, end_of_turn_id
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import BatchMixer, FactorSet, layer_index, mixture_of_loras
from lorafuse.core.sparse import top_k_select
from lorafuse.library import LoraFactors, open_library
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lorafuse" / "data" / "default_library"
BATCH = 32
SECTIONS = ("base", "topk", "soft")  # K = 8 core lines; top-k as K grows; soft at K = 48


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def timed_pair(
    fa: Callable[[], torch.Tensor], fb: Callable[[], torch.Tensor], repeats: int
) -> tuple[float, float]:
    """Medians of alternating timed calls of ``fa`` and ``fb`` (after a warm-up of each)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def ratio_line(name: str, baseline: float, ours: float) -> str:
    return f"{name}: ratio={baseline / ours:.2f} ({baseline:.3f} s vs {ours:.3f} s)"


@dataclass
class Setup:
    """The model, the K = 8 library, one mixed batch and its cached states at the split."""

    model: torch.nn.Module
    tokenizer: object
    adapters: dict
    encoded: list[Encoded]
    batch: object
    states: torch.Tensor
    split: int

    @property
    def experts(self) -> list:
        return list(self.adapters.values())

    def forward(self, m: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.no_grad():
            return target_logits(m or self.model, self.states, self.batch, self.split)


def setup(seed: int) -> Setup:
    base = load_base_model("embedded")
    model = base.model
    _, adapters = open_library(LIBRARY, kinds={"private"})
    experts = list(adapters.values())
    split = min(layer_index(m) for m in experts[0].module_names)
    examples = builtin_suite(seed=seed).get("test")
    picked = [examples[i] for i in range(0, len(examples), len(examples) // BATCH)][:BATCH]
    eot = end_of_turn_id(base.tokenizer)
    # one target per row: the token after the prompt (the position that routing decides)
    encoded = [Encoded((*encode_prompt(base.tokenizer, ex.prompt), eot), 0) for ex in picked]
    encoded = [Encoded(e.ids, len(e.ids) - 1) for e in encoded]
    batch = collate(encoded, base.tokenizer.pad_token_id)
    with torch.no_grad():
        states = lower_states(model, batch.input_ids, split)
    print(
        f"batch {BATCH} prompts from {len({ex.task for ex in picked})} tasks, width "
        f"{batch.input_ids.shape[1]}, layers {split}-{len(model.model.layers) - 1} adapted "
        f"(lower layers' states cached, as lorafuse runs every method)"
    )
    return Setup(model, base.tokenizer, adapters, encoded, batch, states, split)


def static_model(s: Setup) -> torch.nn.Module:
    """A copy of the model with the K = 8 uniform merge folded into its weights (any static
    merge costs the same: no LoRA work at all)."""
    static = copy.deepcopy(s.model)
    with torch.no_grad():
        for m in s.experts[0].module_names:
            static.get_submodule(m).weight += torch.stack([e.delta(m) for e in s.experts]).mean(0)
    return static


def synthetic_experts(template: list, k: int, seed: int) -> list[FactorSet]:
    """``k`` random experts with the modules, ranks, scalings and factor scales of the
    library's first expert."""
    gen = torch.Generator().manual_seed(seed)
    like = {m: template[0].factors(m) for m in template[0].module_names}
    return [
        FactorSet(
            f"synthetic{j}",
            {
                m: LoraFactors(
                    A=torch.randn(f.A.shape, generator=gen) * f.A.std(),
                    B=torch.randn(f.B.shape, generator=gen) * f.B.std(),
                    scaling=f.scaling,
                )
                for m, f in like.items()
            },
        )
        for j in range(k)
    ]


def section_base(s: Setup, args: argparse.Namespace) -> None:
    """K = 8: soft routing vs static and per-item merging, top-1 vs PEFT."""
    model, experts, adapters, k = s.model, s.experts, s.adapters, len(s.adapters)
    soft = torch.distributions.Dirichlet(torch.ones(k)).sample((BATCH,))
    top1 = torch.nn.functional.one_hot(soft.argmax(1), k).float()
    forward = s.forward

    # 1. the core, per-item soft and hard weights
    mixer = BatchMixer()
    with mixture_of_loras(model, experts, mixer):
        mixer.current = soft
        t_routed, routed = timed(forward, args.repeats)
        mixer.current = top1
        t_top1, routed_top1 = timed(forward, args.repeats)

    # 2. a static merged model: the uniform merge folded into the weights
    modules = experts[0].module_names
    originals = {m: model.get_submodule(m).weight.detach().clone() for m in modules}
    deltas = {m: torch.stack([e.delta(m) for e in experts]) for m in modules}  # (K, out, in)
    with torch.no_grad():
        for m in modules:
            model.get_submodule(m).weight += deltas[m].mean(0)
    t_static, _ = timed(forward, args.repeats)
    with torch.no_grad():
        for m in modules:
            model.get_submodule(m).weight.copy_(originals[m])

    # 3. Twin-Merging's way: merge the weights for each item, run it alone
    pad = s.tokenizer.pad_token_id

    def per_item() -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i, e in enumerate(s.encoded):
                for m in modules:
                    w = model.get_submodule(m).weight
                    w.copy_(originals[m] + torch.einsum("k,koi->oi", soft[i], deltas[m]))
                one = collate([e], pad)
                outs.append(target_logits(model, s.states[i : i + 1, : len(e.ids)], one, s.split))
            for m in modules:
                model.get_submodule(m).weight.copy_(originals[m])
        return torch.cat(outs)

    t_item, item_logits = timed(per_item, max(1, args.repeats // 2))
    diff = (item_logits - routed).abs().max().item()

    # 4. PEFT mixed batch (hard routing): adapter_names, 8 adapters loaded. The adapter_names
    # hooks are what PeftModel.forward enables; entered here directly so that PEFT runs on
    # the same cached states (PeftModel.forward would rerun the lower layers).
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(
        model, str(adapters[names[0]].path), adapter_name=names[0]
    )
    for n in names[1:]:
        peft_model.load_adapter(str(adapters[n].path), adapter_name=n)
    peft_model.eval()
    per_row = [names[j] for j in top1.argmax(1).tolist()]

    def peft_forward() -> torch.Tensor:
        with peft_model.base_model._enable_peft_forward_hooks(adapter_names=per_row):
            return forward(peft_model)

    t_peft, peft_logits = timed(peft_forward, args.repeats)
    peft_model.unload()
    peft_diff = (peft_logits - routed_top1).abs().max().item()

    print(f"check: routed vs per-item merged logits max |diff| = {diff:.2e}")
    print(f"check: top-1 routed vs PEFT adapter_names logits max |diff| = {peft_diff:.2e}")
    print(ratio_line("routed_vs_static", t_static, t_routed) + "  (target >= 0.77)")
    print(ratio_line("routed_vs_per_item_merge", t_item, t_routed) + "  (target >= 5)")
    print(ratio_line("top1_vs_peft_adapter_names", t_peft, t_top1) + "  (target > 1)")


def section_topk(s: Setup, args: argparse.Namespace, library: dict[int, list]) -> None:
    """Per-example top-2 at K = 8, 48, 256 vs static; sparse vs dense masked; per token."""
    static = static_model(s)
    gen = torch.Generator().manual_seed(args.seed)
    tops = {k: top_k_select(torch.randn(BATCH, k, generator=gen), 2) for k in library}
    for k, experts in library.items():
        mixer = BatchMixer()
        with mixture_of_loras(s.model, experts, mixer):
            mixer.current = tops[k]
            t_static, t_routed = timed_pair(lambda: s.forward(static), s.forward, args.repeats)
        print(
            ratio_line(f"route_top2_k{k}_vs_static", t_static, t_routed)
            + "  (target >= 0.77, i.e. routed <= 1.3x static)",
            flush=True,
        )
    for k in (8, 48):
        top, mixer = tops[k], BatchMixer()
        with mixture_of_loras(s.model, library[k], mixer):

            def dense(top=top, mixer=mixer) -> torch.Tensor:
                mixer.current = top.dense()  # all K experts, zero weight outside the top-2
                return s.forward()

            def sparse(top=top, mixer=mixer) -> torch.Tensor:
                mixer.current = top
                return s.forward()

            diff = (dense() - sparse()).abs().max().item()
            t_dense, t_sparse = timed_pair(dense, sparse, args.repeats)
            print(f"check: K={k} top-2 sparse vs dense masked logits max |diff| = {diff:.2e}")
            print(ratio_line(f"route_top2_k{k}_sparse_vs_dense", t_dense, t_sparse), flush=True)
            if k == 48:
                width = s.states.shape[1]
                mixer.current = top_k_select(torch.randn(BATCH, width, k, generator=gen), 2)
                t_static, t_routed = timed_pair(lambda: s.forward(static), s.forward, args.repeats)
                print(ratio_line("route_top2_per_token_k48_vs_static", t_static, t_routed))


def section_soft(s: Setup, args: argparse.Namespace, experts: list) -> None:
    """Soft per-item routing over all K = 48 experts vs its FLOP estimate."""
    from torch.utils.flop_counter import FlopCounterMode

    static = static_model(s)
    k = len(experts)
    soft = torch.distributions.Dirichlet(torch.ones(k)).sample((BATCH,))
    mixer = BatchMixer()
    with mixture_of_loras(s.model, experts, mixer):
        mixer.current = soft
        flops = []
        for fn in (lambda: s.forward(static), s.forward):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            flops.append(counter.get_total_flops())
        t_static, t_soft = timed_pair(lambda: s.forward(static), s.forward, args.repeats)
    estimate = t_static * flops[1] / flops[0]
    print(
        ratio_line(f"soft_k{k}_vs_flop_estimate", estimate, t_soft)
        + f"  ({flops[1] / 1e9:.1f} vs {flops[0] / 1e9:.1f} GFLOP static; target near 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--section",
        choices=["all", *SECTIONS],
        action="append",
        help="run only these parts (repeatable; default all): " + ", ".join(SECTIONS),
    )
    args = parser.parse_args()
    sections = set(args.section or ["all"])
    if "all" in sections:
        sections = set(SECTIONS)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    s = setup(args.seed)
    library = {len(s.experts): s.experts}
    if sections & {"topk", "soft"}:
        library[48] = synthetic_experts(s.experts, 48, args.seed)
    if "base" in sections:
        section_base(s, args)
    if "topk" in sections:
        library[256] = synthetic_experts(s.experts, 256, args.seed + 1)
        section_topk(s, args, library)
        del library[256]
    if "soft" in sections:
        section_soft(s, args, library[48])


if __name__ == "__main__":
    main()
