"""One expert trained data-parallel across processes, with ``accelerate launch``::

    accelerate launch --multi_gpu --num_processes 2 -m lorafuse.training.ddp \\
        --base-model MODEL --tasks TASKS --task up --out up_adapter --steps 100

(``--multi_gpu`` is accelerate's multi-process launcher, torchrun: with ``--device cpu``, or
no GPU, the processes run on the CPU over gloo, else one process per GPU over NCCL; add
``--num_machines``, ``--machine_rank``, ``--main_process_ip`` for several nodes. Note that
``accelerate launch --cpu`` starts one process only, unless given an MPI hostfile.) Every
process runs the
same steps as :func:`lorafuse.training.train.train_adapter`: the same seeded batches
(``batch_indices``), LoRA initialisation, AdamW and schedule. Process ``r`` of ``N`` takes
examples ``r, r+N, ...`` of each global batch and backpropagates the sum of their answer-token
NLLs divided by the global batch size; the gradients are then summed over the processes
(one all-reduce of all LoRA gradients), so each step is the single-process full-batch step up
to float reassociation (tested: max |Δ| of the LoRA weights < 1e-5 after a few steps).

The lower-layer states are computed by the main process first (task by task, as the library
trainer does) and read from the shared state cache by the others. Process 0 saves the
adapter atomically, with ``data_parallel.json`` (world size, losses), and every
``checkpoint_every`` steps a checkpoint stamped exactly as
:func:`~lorafuse.training.train.train_adapter`'s: a rerun resumes it (at any number of
processes, even from a single-process run's checkpoint) and refuses, restarting and saying
so, one from another configuration or other data.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import get_peft_model

from lorafuse.core.fit import batch_indices
from lorafuse.core.states import StateCache
from lorafuse.device import resolve_device
from lorafuse.errors import LorafuseError
from lorafuse.failures import one_line
from lorafuse.io import atomic_dir, atomic_write_json
from lorafuse.models import BaseModel, load_base_model
from lorafuse.tasks import load_tasks
from lorafuse.training.config import TrainConfig
from lorafuse.training.library import ExpertJob, JobData, job_data
from lorafuse.training.train import (
    TrainResult,
    answer_nll,
    checkpoint_path,
    lora_config,
    run_stamp,
    save_checkpoint,
    split_layer,
    start_run,
)

REPORT_NAME = "data_parallel.json"


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's examples of a global batch: every ``world``-th, from ``rank``."""
    return list(indices[rank::world])


def sum_gradients(params: Sequence[torch.nn.Parameter], accelerator) -> None:
    """Sum every parameter's gradient over the processes (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    for p, g in zip(params, torch.split(flat, [g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)


def train_adapter_data_parallel(
    base: BaseModel,
    data: JobData,
    cache: StateCache,
    config: TrainConfig,
    out_dir: str | Path,
    accelerator,
) -> TrainResult:
    """Train a LoRA on ``data`` across ``accelerator``'s processes; process 0 saves it."""
    out_dir = Path(out_dir)
    split = split_layer(base.model, config.top_layers)
    if split != cache.split:
        raise ValueError(f"state cache is at layer {cache.split}, training needs {split}")
    world, rank = accelerator.num_processes, accelerator.process_index
    with accelerator.main_process_first():  # the others read the main process's states
        for encoded in data.by_task.values():
            cache.get(encoded, desc="states")
        states = cache.get(data.encoded, desc="states")
    stamp = run_stamp(base, data.encoded, config, split, None, None)
    ckpt = checkpoint_path(out_dir)
    torch.manual_seed(config.seed)
    model = get_peft_model(base.model, lora_config(config, base))
    model.peft_config[model.active_adapter].base_model_name_or_path = base.name
    try:
        with accelerator.main_process_first():  # process 0 alone drops a stale checkpoint
            run = start_run(model, config, ckpt, stamp, "data-parallel training")
        params, opt, sched = run.params, run.opt, run.sched
        step, losses, elapsed = run.step, run.losses, run.elapsed
        device = next(model.parameters()).device
        pad = base.tokenizer.pad_token_id
        model.train()
        start = time.perf_counter() - elapsed
        while step < config.steps:
            idx = batch_indices(len(data.encoded), step, config.batch_size, config.seed)
            mine = shard(idx, rank, world)
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            if mine:
                nll = answer_nll(
                    model, [states[i] for i in mine], [data.encoded[i] for i in mine], split, pad
                )
                loss = nll.sum() / len(idx)
                loss.backward()
            sum_gradients(params, accelerator)
            opt.step()
            sched.step()
            step += 1
            losses.append(round(accelerator.reduce(loss.detach(), reduction="sum").item(), 5))
            if step % config.checkpoint_every == 0 and step < config.steps:
                if accelerator.is_main_process:
                    elapsed = time.perf_counter() - start
                    save_checkpoint(ckpt, model, opt, sched, step, losses, elapsed, stamp)
                accelerator.wait_for_everyone()
        model.eval()
        seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp, save_embedding_layers=False)
                atomic_write_json(
                    tmp / REPORT_NAME,
                    {"world_size": world, "steps": config.steps, "losses": losses,
                     "train_time_s": round(seconds, 2), "n_train": len(data.encoded)},
                )  # fmt: skip
            ckpt.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    finally:
        model.unload()
        base.model.eval().requires_grad_(False)
    return TrainResult(out_dir, step, seconds, losses)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="accelerate launch --num_processes N [--cpu] -m lorafuse.training.ddp",
        description="One LoRA expert trained data-parallel (gradients summed over processes).",
    )
    p.add_argument("--out", required=True, help="Adapter folder to write.")
    p.add_argument("--base-model", default="embedded")
    p.add_argument("--tasks", default="builtin", help="Task suite (as lorafuse train).")
    p.add_argument("--task", action="append", help="Train on this task (repeatable; all).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--top-layers", type=int, default=6)
    p.add_argument("--target-modules", help="Comma-separated (default: all projections).")
    p.add_argument("--checkpoint-every", type=int, default=25, help="Steps between checkpoints.")
    p.add_argument("--cache", help="Lower-layer state cache (default $LORAFUSE_CACHE/states).")
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu or cuda.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``-m lorafuse.training.ddp`` entry point (every process runs it)."""
    import warnings

    from accelerate import Accelerator

    # peft 0.21 calls a transformers API that transformers 5.23 deprecates (as lorafuse.cli)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    args = parse_args(argv)
    try:
        accelerator = Accelerator(cpu=resolve_device(args.device).type == "cpu")
        extra = {"target_modules": args.target_modules.split(",")} if args.target_modules else {}
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            rank=args.rank, alpha=args.alpha, top_layers=args.top_layers, seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            **extra,
        )  # fmt: skip
        base = load_base_model(args.base_model, device=accelerator.device)
        suite = load_tasks(args.tasks, seed=args.seed)
        tasks = tuple(args.task or suite.tasks)
        data = job_data(base, suite, ExpertJob(args.out, tasks, "private", config))
        cache_dir = Path(args.cache) if args.cache else None
        cache = StateCache(base, split_layer(base.model, config.top_layers), cache_dir,
                           progress=False)  # fmt: skip
        result = train_adapter_data_parallel(base, data, cache, config, args.out, accelerator)
    except LorafuseError as err:
        message, code = one_line(err)
        print(message, file=sys.stderr)
        return code
    if accelerator.is_main_process:
        print(f"{args.out}: {result.steps} steps on {accelerator.num_processes} processes, "
              f"{result.train_time_s:.1f}s, final loss {result.losses[-1]:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
