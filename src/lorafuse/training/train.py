"""Train one LoRA adapter with PEFT on answer tokens, on top of cached lower-layer states.

Only layers ``split..L-1`` carry LoRA, so each step runs just those layers; logits are
taken only where they predict answer tokens, and the last layer's MLP runs only at those
positions (exact there; the probe checks each model for it). Batches are a pure function
of (seed, step), so a run interrupted after a checkpoint resumes to the same result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm

from lorafuse.core.encode import Encoded, collate
from lorafuse.core.fit import batch_indices, per_example_nll
from lorafuse.core.forward import num_layers, target_logits
from lorafuse.core.states import StateCache, pad_states
from lorafuse.fingerprint import Stamp, examples_digest, files_digest, mismatch, say
from lorafuse.io import atomic_dir, atomic_path
from lorafuse.models import BaseModel
from lorafuse.training.config import TrainConfig

# (model, states, encoded, example indices) -> scalar loss of a training batch
ExampleLoss = Callable[
    [torch.nn.Module, list[torch.Tensor], list[Encoded], list[int]], torch.Tensor
]


def split_layer(model: torch.nn.Module, top_layers: int) -> int:
    """First adapted layer: ``L - top_layers`` (0 when ``top_layers`` is 0 = all layers)."""
    total = num_layers(model)
    return 0 if top_layers <= 0 or top_layers >= total else total - top_layers


def top_layers_at(model: torch.nn.Module, split: int) -> int:
    """The ``top_layers`` whose LoRA starts at layer ``split`` (a state cache's split)."""
    return num_layers(model) - split if split > 0 else 0


def lora_config(config: TrainConfig, base: BaseModel) -> LoraConfig:
    split = split_layer(base.model, config.top_layers)
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(split, num_layers(base.model))),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base.name,
    )


def answer_nll(
    model: torch.nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
) -> torch.Tensor:
    """Each example's mean NLL of its target tokens, (B,): the training forward (top layers
    only, the last layer's MLP and the logits only where answer tokens are predicted)."""
    batch = collate(encoded, pad_id)
    device = next(model.parameters()).device
    logits = target_logits(model, pad_states(states).to(device), batch, split, mlp_at_targets=True)
    return per_example_nll(logits, batch)


def answer_loss(
    model: torch.nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
) -> torch.Tensor:
    """Mean over examples of the mean NLL of each example's target tokens."""
    return answer_nll(model, states, encoded, split, pad_id).mean()


@dataclass
class TrainResult:
    path: Path
    steps: int
    train_time_s: float
    losses: list[float]


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run that writes ``out_dir`` keeps its checkpoint (next to it, hidden)."""
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


def lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / (config.warmup + 1)
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_adapter(
    base: BaseModel,
    encoded: Sequence[Encoded],
    cache: StateCache,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    desc: str = "train",
    progress: bool = True,
    init_adapter: str | Path | None = None,
    loss_fn: ExampleLoss | None = None,
) -> TrainResult:
    """Train a LoRA on ``encoded`` and save it (atomically) as a PEFT adapter.

    The LoRA is fresh, or with ``init_adapter`` a copy of that PEFT adapter (its rank and
    modules; ``config``'s rank and targets are then ignored), as ELREA's cluster experts are.
    ``loss_fn(model, states, encoded, indices)`` replaces the answer-token loss (e.g. a
    distillation loss against a teacher's outputs for those example indices).
    """
    out_dir = Path(out_dir)
    split = split_layer(base.model, config.top_layers)
    if split != cache.split:
        raise ValueError(f"state cache is at layer {cache.split}, training needs {split}")
    stamp = run_stamp(base, encoded, config, split, init_adapter, loss_fn)
    states = cache.get(encoded, desc=f"{desc}: states")
    torch.manual_seed(config.seed)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base.model, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(base.model, lora_config(config, base))
    # get_peft_model overwrites the recorded base name with model.name_or_path (a local path)
    model.peft_config[model.active_adapter].base_model_name_or_path = base.name
    try:
        return _train_loop(
            model, base, encoded, states, config, split, out_dir, desc, progress, loss_fn, stamp
        )
    finally:
        model.unload()  # remove the LoRA layers, leave the base model untouched
        base.model.eval().requires_grad_(False)  # eval also after an interrupted run


@dataclass
class Run:
    """A training run's optimizer and schedule, and where it stands (0, or a checkpoint's)."""

    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step: int
    losses: list[float]
    elapsed: float


def start_run(
    model: PeftModel, config: TrainConfig, ckpt: Path, stamp: Stamp | None, desc: str
) -> Run:
    """AdamW on the LoRA weights with lorafuse's schedule, resumed from ``ckpt`` when it
    belongs to this run (else from step 0; a stale checkpoint is dropped, saying so)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    state = resume_state(ckpt, model, stamp, desc)
    if state is None:
        return Run(params, opt, sched, 0, [], 0.0)
    model.load_state_dict(state["lora"], strict=False)  # keys checked equal by resume_state
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return Run(params, opt, sched, state["step"], state["losses"], state["elapsed"])


def _train_loop(
    model: PeftModel,
    base: BaseModel,
    encoded: Sequence[Encoded],
    states: Sequence[torch.Tensor],
    config: TrainConfig,
    split: int,
    out_dir: Path,
    desc: str,
    progress: bool,
    loss_fn: ExampleLoss | None = None,
    stamp: Stamp | None = None,
) -> TrainResult:
    ckpt = checkpoint_path(out_dir)
    run = start_run(model, config, ckpt, stamp, desc)
    opt, sched, step, losses, elapsed = run.opt, run.sched, run.step, run.losses, run.elapsed
    model.train()
    pad = base.tokenizer.pad_token_id
    bar = tqdm(total=config.steps, initial=step, desc=desc, disable=not progress)
    start = time.perf_counter() - elapsed
    while step < config.steps:
        idx = batch_indices(len(encoded), step, config.batch_size, config.seed)
        batch_states, batch_encoded = [states[i] for i in idx], [encoded[i] for i in idx]
        if loss_fn is None:
            loss = answer_loss(model, batch_states, batch_encoded, split, pad)
        else:
            loss = loss_fn(model, batch_states, batch_encoded, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
        if step % config.checkpoint_every == 0 and step < config.steps:
            elapsed = time.perf_counter() - start
            save_checkpoint(ckpt, model, opt, sched, step, losses, elapsed, stamp)
    bar.close()
    model.eval()
    train_time = time.perf_counter() - start
    with atomic_dir(out_dir) as tmp:
        # no embedding check: it would look base_model_name_or_path up on the hub
        model.save_pretrained(tmp, save_embedding_layers=False)
    ckpt.unlink(missing_ok=True)
    return TrainResult(out_dir, step, train_time, losses)


def run_stamp(
    base: BaseModel,
    encoded: Sequence[Encoded],
    config: TrainConfig,
    split: int,
    init_adapter: str | Path | None,
    loss_fn: ExampleLoss | None,
) -> Stamp:
    """What a checkpoint must match to be resumed: settings, examples, model and start."""
    settings = config.model_dump(exclude={"checkpoint_every"})
    loss = None if loss_fn is None else getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    start = None
    if init_adapter is not None:
        folder = Path(init_adapter)
        start = files_digest(sorted(folder.glob("adapter_config.json")))
        start += files_digest(sorted(folder.glob("adapter_model.*")))
    return Stamp.of(
        {"train": settings, "loss": loss},
        examples_digest(encoded),
        {"base": base.fingerprint, "split": split, "init": start},
    )


def resume_state(ckpt: Path, model: PeftModel, stamp: Stamp | None, desc: str) -> dict | None:
    """The checkpoint's state if it belongs to this run; else delete it and say so."""
    if not ckpt.is_file():
        return None
    why = None
    try:
        state = torch.load(ckpt, weights_only=True)
    except Exception as err:  # a checkpoint from another torch, or damaged
        state, why = None, f"unreadable ({type(err).__name__})"
    if state is not None and stamp is not None:
        parts = stamp.differs(Stamp.from_dict(state.get("stamp")))
        if parts:
            why = f"a different run: {mismatch(parts)}"
    if state is not None and why is None:
        want = {k for k in model.state_dict() if "lora_" in k}
        if set(state.get("lora", {})) != want:
            why = "its LoRA weights do not match this adapter"
    if why is None:
        return state
    say(f"{ckpt}: checkpoint not resumed ({why}); {desc} restarts from step 0")
    ckpt.unlink(missing_ok=True)
    return None


def save_checkpoint(ckpt, model, opt, sched, step, losses, elapsed, stamp) -> None:
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    with atomic_path(ckpt) as tmp:
        torch.save(
            {
                "lora": lora,
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "step": step,
                "losses": losses,
                "elapsed": elapsed,
                "stamp": None if stamp is None else stamp.as_dict(),
            },
            tmp,
        )
