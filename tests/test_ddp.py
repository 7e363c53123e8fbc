"""Data-parallel training of one expert with ``accelerate launch`` (2 processes, gloo on CPU)
equals single-process training on the same global batches: each process takes half of each
batch and the gradients are summed, so the steps agree up to float reassociation; an
interrupted run resumes its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_cli import make_tiny_model, task_file

from lorafuse.core.states import StateCache
from lorafuse.models import load_base_model
from lorafuse.tasks import load_tasks
from lorafuse.training import ddp
from lorafuse.training.config import TrainConfig
from lorafuse.training.ddp import REPORT_NAME, shard, train_adapter_data_parallel
from lorafuse.training.library import ExpertJob, job_data
from lorafuse.training.train import checkpoint_path, split_layer, train_adapter

STEPS, BATCH = 4, 6
CONFIG = TrainConfig(
    steps=STEPS, batch_size=BATCH, lr=5e-2, warmup=1, rank=2, alpha=4, top_layers=1,
    target_modules=["q_proj", "v_proj"],
)  # fmt: skip
TOLERANCE = 1e-5  # max |Δ| of the LoRA weights: float reassociation of the gradient sums


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_splits_a_batch_among_processes() -> None:
    batch = [7, 3, 9, 1, 4]
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [[7, 9, 4], [3, 1]]
    assert sorted(sum(parts, [])) == sorted(batch)


def test_accelerate_two_processes_equal_single_process(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    model_dir = make_tiny_model(tmp_path / "model")
    tasks = task_file(tmp_path / "tasks.jsonl")
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "LORAFUSE_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml"),  # no user config read
    }  # fmt: skip
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "lorafuse.training.ddp", "--device", "cpu",
        "--base-model", str(model_dir), "--tasks", str(tasks),
        "--task", "up", "--out", str(out), "--steps", str(STEPS), "--batch-size", str(BATCH),
        "--lr", "5e-2", "--warmup", "1", "--rank", "2", "--alpha", "4", "--top-layers", "1",
        "--target-modules", "q_proj,v_proj",
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["world_size"] == 2 and report["steps"] == STEPS

    # the reference: one process, the whole batch, the library trainer's own loop
    base = load_base_model(model_dir, device="cpu")
    data = job_data(base, load_tasks(str(tasks), seed=0), ExpertJob("up", ("up",), "private",
                                                                     CONFIG))  # fmt: skip
    cache = StateCache(base, split_layer(base.model, 1), tmp_path / "serial", progress=False)
    want = train_adapter(base, data.encoded, cache, CONFIG, tmp_path / "single", progress=False)
    got_w = load_file(str(out / "adapter_model.safetensors"))
    want_w = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert got_w.keys() == want_w.keys() and len(want_w) == 4
    # training moved the weights (LoRA B starts at zero)
    assert all(want_w[k].abs().max() > 1e-3 for k in want_w if "lora_B" in k)
    delta = max((got_w[k] - want_w[k]).abs().max().item() for k in want_w)
    assert delta < TOLERANCE, delta
    assert report["losses"] == pytest.approx(want.losses, abs=1e-4)


class OneProcess:
    """accelerate's Accelerator as one process sees it when it is alone (no launcher)."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def main_process_first(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


class Interrupted(Exception):
    pass


def test_data_parallel_run_resumes_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Killed after its step-2 checkpoint, a rerun resumes it and ends where an
    uninterrupted run ends; a checkpoint of another configuration is not resumed."""
    model_dir = make_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, device="cpu")
    config = CONFIG.model_copy(update={"checkpoint_every": 2})
    data = job_data(base, load_tasks(str(task_file(tmp_path / "t.jsonl")), seed=0),
                    ExpertJob("up", ("up",), "private", config))  # fmt: skip
    cache = StateCache(base, split_layer(base.model, 1), tmp_path / "states", progress=False)
    want = train_adapter_data_parallel(base, data, cache, config, tmp_path / "whole", OneProcess())

    saved = ddp.save_checkpoint

    def save_then_die(*args) -> None:
        saved(*args)
        raise Interrupted

    out = tmp_path / "resumed"
    monkeypatch.setattr(ddp, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train_adapter_data_parallel(base, data, cache, config, out, OneProcess())
    assert checkpoint_path(out).is_file() and not out.exists()
    monkeypatch.setattr(ddp, "save_checkpoint", saved)
    got = train_adapter_data_parallel(base, data, cache, config, out, OneProcess())
    assert got.losses == want.losses and not checkpoint_path(out).exists()
    got_w = load_file(str(out / "adapter_model.safetensors"))
    want_w = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)

    # a checkpoint of another learning rate: not resumed (the run restarts and says so)
    monkeypatch.setattr(ddp, "save_checkpoint", save_then_die)
    other = tmp_path / "other"
    with pytest.raises(Interrupted):
        train_adapter_data_parallel(
            base, data, cache, config.model_copy(update={"lr": 1e-1}), other, OneProcess()
        )
    monkeypatch.setattr(ddp, "save_checkpoint", saved)
    got = train_adapter_data_parallel(base, data, cache, config, other, OneProcess())
    assert got.losses == want.losses
