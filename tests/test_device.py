"""--device / $LORAFUSE_DEVICE: resolution, one-line errors, and the model's device as default."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorafuse.device import DEVICE_ENV, model_device, resolve_device
from lorafuse.errors import LorafuseError


def test_auto_is_cuda_when_present_else_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device() == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu0", "cuda:x", ""])
def test_bad_device_is_one_line(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    if spec == "":  # empty means auto
        assert resolve_device(spec).type in ("cpu", "cuda")
        return
    with pytest.raises(LorafuseError, match="--device"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(LorafuseError, match="CUDA is not available"):
        resolve_device("cuda")


def test_model_device(tiny_llama) -> None:
    assert model_device(tiny_llama) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters


def test_cli_bad_device_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorafuse", "--device", "tpu9", "methods"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device: unknown device 'tpu9' (auto, cpu, cuda, cuda:N)"
    ]
