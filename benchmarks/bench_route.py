"""Benchmark routed inference on the mixture-of-LoRA core, all in one run.

Run::

    .venv/bin/python benchmarks/bench_route.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_route.py --threads 1

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

Each time is the median of ``--repeats`` timed calls after one warm-up call. The script also
checks that the routed logits equal the per-item merged ones (max abs difference printed).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from lorafuse.core.encode import Encoded, collate, encode_prompt, end_of_turn_id
from lorafuse.core.forward import lower_states, target_logits
from lorafuse.core.mixture import BatchMixer, layer_index, mixture_of_loras
from lorafuse.library import open_library
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lorafuse" / "data" / "default_library"
BATCH = 32


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def ratio_line(name: str, baseline: float, ours: float) -> str:
    return f"{name}: ratio={baseline / ours:.2f} ({baseline:.3f} s vs {ours:.3f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)

    base = load_base_model("embedded")
    model = base.model
    _, adapters = open_library(LIBRARY, kinds={"private"})
    experts = list(adapters.values())
    k = len(experts)
    split = min(layer_index(m) for m in experts[0].module_names)
    examples = builtin_suite(seed=args.seed).get("test")
    picked = [examples[i] for i in range(0, len(examples), len(examples) // BATCH)][:BATCH]
    eot = end_of_turn_id(base.tokenizer)
    # one target per row: the token after the prompt (the position that routing decides)
    encoded = [Encoded((*encode_prompt(base.tokenizer, ex.prompt), eot), 0) for ex in picked]
    encoded = [Encoded(e.ids, len(e.ids) - 1) for e in encoded]
    pad = base.tokenizer.pad_token_id
    batch = collate(encoded, pad)
    with torch.no_grad():
        states = lower_states(model, batch.input_ids, split)
    print(
        f"batch {BATCH} prompts from {len({ex.task for ex in picked})} tasks, width "
        f"{batch.input_ids.shape[1]}, layers {split}-{len(model.model.layers) - 1} adapted "
        f"(lower layers' states cached, as lorafuse runs every method)"
    )

    soft = torch.distributions.Dirichlet(torch.ones(k)).sample((BATCH,))
    top1 = torch.nn.functional.one_hot(soft.argmax(1), k).float()

    def forward(m=model) -> torch.Tensor:
        with torch.no_grad():
            return target_logits(m, states, batch, split)

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
    def per_item() -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i, e in enumerate(encoded):
                for m in modules:
                    w = model.get_submodule(m).weight
                    w.copy_(originals[m] + torch.einsum("k,koi->oi", soft[i], deltas[m]))
                one = collate([e], pad)
                outs.append(target_logits(model, states[i : i + 1, : len(e.ids)], one, split))
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


if __name__ == "__main__":
    main()
