"""Shared pytest fixtures: tiny models built from configs (no hub access, fast on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from lorafuse.library import LoraAdapter
    from lorafuse.models import BaseModel

TINY_LLAMA_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A seeded 2-layer fp32 LlamaForCausalLM in eval mode; identical on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM  # imported lazily: it is slow

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG))
    return model.to(torch.float32).eval()


@pytest.fixture
def tiny_base(
    tiny_llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory, monkeypatch
) -> BaseModel:
    """``tiny_llama`` as a frozen :class:`lorafuse.models.BaseModel` (pad id 0, no path).

    ``LORAFUSE_CACHE`` points at a temp dir so nothing reaches the user cache.
    """
    from types import SimpleNamespace

    from lorafuse.models import BaseModel

    monkeypatch.setenv("LORAFUSE_CACHE", str(tmp_path_factory.mktemp("lorafuse_cache")))
    tiny_llama.requires_grad_(False)
    return BaseModel(
        model=tiny_llama, tokenizer=SimpleNamespace(pad_token_id=0), name="tiny", path=None
    )


@pytest.fixture
def tiny_experts(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> list[LoraAdapter]:
    """Three adapters with different ranks and scalings on q/v/up of both layers."""
    from peft import LoraConfig, get_peft_model

    from lorafuse.library import LoraAdapter

    root = tmp_path_factory.mktemp("experts")
    out = []
    for k, (r, alpha) in enumerate([(2, 4), (4, 4), (3, 9)]):
        torch.manual_seed(10 + k)
        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False,
        )
        model = get_peft_model(tiny_llama, cfg)
        model.save_pretrained(root / f"e{k}")
        model.unload()
        out.append(LoraAdapter.open(root / f"e{k}"))
    return out


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    """Tiny models gain nothing from threads, and with other jobs on the CPU, torch's thread
    pool spin-waits make each tiny forward ~100x slower (250 ms vs 3 ms measured)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """One local 2-CPU Ray cluster for the whole run (started once, on first use)."""
    ray = pytest.importorskip("ray")
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": src, "OMP_NUM_THREADS": "1"}},
    )  # fmt: skip
    yield ray
    ray.shutdown()
