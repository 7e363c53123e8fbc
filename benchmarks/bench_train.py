"""Benchmark expert training: lorafuse vs a standard PEFT loop, and library build throughput.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py --threads 1 --clock cpu
    .venv/bin/python benchmarks/bench_train.py --part library      # needs lorafuse[ray]

Setup: the embedded SmolLM2-135M (fp32, offline), the built-in suite (seed 0), the
library's training settings (rank 8, alpha 16, LoRA on q/k/v/o/gate/up/down of the last 6
of 30 layers, AdamW lr 3e-3 with warm-up and cosine decay, batches of 16).

* ``train_vs_peft``: one private expert (``--task``, ``--steps`` steps). lorafuse:
  :func:`lorafuse.training.train_adapter` with a fresh state cache, so the timed call also
  runs the lower 24 layers once over the task's training examples; each step then runs the
  top 6 layers and takes logits only where they predict answer tokens. PEFT: the same
  LoRA config through ``get_peft_model``, the same optimizer, schedule and batches (the
  same example indices at every step), the standard loop: a full forward with
  ``labels`` (-100 except the answer tokens, as lorafuse's targets) and ``loss.backward()``.
  Printed ``train_vs_peft: ratio=X.XX (A s vs B s)``, A = PEFT, B = lorafuse (target >= 3),
  and ``train_vs_peft_cached_states`` without the states' one-time cost (a library's
  multi-task adapter, its evaluation and every merge reuse them),
  plus both sides' first and last losses (PEFT's is the token mean, lorafuse's the mean of
  per-example means: the same targets, weighted differently).
* ``library_serial_vs_ray``: a library of ``--library-tasks`` private experts plus the
  multi-task adapter (``--library-steps`` steps each, twice for the multi-task one),
  trained serially (``--threads`` torch threads) and on a local Ray cluster of
  ``--workers`` CPUs (one CPU and one torch thread per expert), each from a cold state
  cache. Printed in experts per hour, ``ratio`` = Ray / serial; the Ray time includes
  starting the cluster and its workers (each imports torch and loads the model once).

``--clock cpu`` times the PEFT-vs-lorafuse calls with this process's CPU time, which other
work on a busy machine barely disturbs (one thread); the library part is always wall time.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lorafuse.core.encode import Encoded, collate, encode_examples
from lorafuse.core.fit import batch_indices
from lorafuse.core.states import StateCache
from lorafuse.models import load_base_model
from lorafuse.tasks import builtin_suite
from lorafuse.training.config import TrainConfig
from lorafuse.training.train import lora_config, split_layer, train_adapter


def peft_standard_loop(base, encoded: list[Encoded], config: TrainConfig) -> list[float]:
    """A plain PEFT training loop: full forward with labels, same batches and schedule."""
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    model = get_peft_model(base.model, lora_config(config, base))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def factor(step: int) -> float:  # lorafuse's schedule (training/train.py)
        if step < config.warmup:
            return (step + 1) / (config.warmup + 1)
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    pad = base.tokenizer.pad_token_id
    losses = []
    model.train()
    try:
        for step in range(config.steps):
            idx = batch_indices(len(encoded), step, config.batch_size, config.seed)
            batch = collate([encoded[i] for i in idx], pad)
            width = batch.input_ids.shape[1]
            mask = torch.arange(width)[None] < batch.lengths[:, None]
            labels = torch.full_like(batch.input_ids, -100)
            for i in idx_positions(batch):
                labels[i] = batch.input_ids[i]
            out = model(input_ids=batch.input_ids, attention_mask=mask.long(), labels=labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            losses.append(out.loss.item())
    finally:
        model.unload()
        base.model.eval().requires_grad_(False)
    return losses


def idx_positions(batch) -> list[tuple[int, int]]:
    """(row, position) of every target token (HF shifts labels by one itself)."""
    return list(zip(batch.rows.tolist(), (batch.positions + 1).tolist(), strict=True))


def clock(kind: str) -> float:
    return time.process_time() if kind == "cpu" else time.perf_counter()


def train_vs_peft(args, base, suite) -> None:
    examples = suite.get("train", [args.task])
    encoded = encode_examples(base.tokenizer, examples)
    config = TrainConfig(steps=args.steps)
    print(
        f"setup: task {args.task}, {len(encoded)} training examples, "
        f"{sum(len(e.ids) for e in encoded) / len(encoded):.1f} tokens/example "
        f"({sum(e.n_targets for e in encoded) / len(encoded):.1f} targets), {args.steps} steps "
        f"of {config.batch_size}, torch threads={torch.get_num_threads()}, clock={args.clock}"
    )
    split = split_layer(base.model, config.top_layers)
    with tempfile.TemporaryDirectory() as tmp:
        warm = TrainConfig(steps=1, top_layers=config.top_layers)  # imports, first kernels
        train_adapter(
            base, encoded[:16], StateCache(base, split, Path(tmp) / "w", progress=False),
            warm, Path(tmp) / "warm", progress=False,
        )  # fmt: skip
        peft_standard_loop(base, encoded, warm)
        t0 = clock(args.clock)
        cache = StateCache(base, split, Path(tmp) / "states", progress=False)
        cache.get(encoded)
        t_states = clock(args.clock) - t0
        ours = train_adapter(base, encoded, cache, config, Path(tmp) / "e", progress=False)
        t_ours = clock(args.clock) - t0
        t0 = clock(args.clock)
        theirs = peft_standard_loop(base, encoded, config)
        t_peft = clock(args.clock) - t0
    print(
        f"train_vs_peft: ratio={t_peft / t_ours:.2f} ({t_peft:.2f} s vs {t_ours:.2f} s)"
        f"  (target >= 3; lorafuse includes {t_states:.2f} s of lower-layer states)"
    )
    print(
        f"train_vs_peft_cached_states: ratio={t_peft / (t_ours - t_states):.2f} "
        f"({t_peft:.2f} s vs {t_ours - t_states:.2f} s)  (states already cached, as for "
        f"every later use of the same examples: the multi-task adapter, eval, merges)"
    )
    print(
        f"losses: lorafuse {ours.losses[0]:.3f} -> {sum(ours.losses[-5:]) / 5:.3f}, "
        f"peft {theirs[0]:.3f} -> {sum(theirs[-5:]) / 5:.3f} (first step -> mean of last 5)"
    )


def library_serial_vs_ray(args, base, suite) -> None:
    import ray

    from lorafuse.training.distributed import train_library_ray
    from lorafuse.training.library import train_library

    tasks = suite.tasks[: args.library_tasks]
    config = TrainConfig(steps=args.library_steps)
    n = len(tasks) + 1
    kwargs = dict(multitask_steps=2 * args.library_steps, tasks=tasks, progress=False)
    split = split_layer(base.model, config.top_layers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        cache = StateCache(base, split, root / "serial_states", progress=False)
        train_library(base, suite, root / "serial", config, cache=cache, **kwargs)
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            train_library_ray(
                base, suite, root / "ray", config, cpus_per_expert=1,
                cache_dir=root / "ray_states", **kwargs,
            )  # fmt: skip
        finally:
            ray.shutdown()
        t_ray = time.perf_counter() - t0
    rate_serial, rate_ray = n / t_serial * 3600, n / t_ray * 3600
    print(
        f"library_serial_vs_ray: ratio={rate_ray / rate_serial:.2f} "
        f"({rate_ray:.0f} vs {rate_serial:.0f} experts/hour; {t_ray:.1f} s vs {t_serial:.1f} s)"
        f"  [{n} experts, {args.library_steps} steps ({2 * args.library_steps} multi-task); "
        f"Ray: {args.workers} workers x 1 thread; serial: {torch.get_num_threads()} threads]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "peft", "library"], default="all")
    parser.add_argument("--task", default=None, help="built-in task (default: the first)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--library-tasks", type=int, default=3)
    parser.add_argument("--library-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    base = load_base_model(device="cpu")
    suite = builtin_suite(seed=0)
    args.task = args.task or suite.tasks[0]
    if args.part in ("all", "peft"):
        train_vs_peft(args, base, suite)
    if args.part in ("all", "library"):
        library_serial_vs_ray(args, base, suite)


if __name__ == "__main__":
    main()
