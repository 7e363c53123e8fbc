"""Read single PEFT LoRA adapters, one module's factors at a time.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (shape ``(r, d_in)``) and
``...lora_B.weight`` (shape ``(d_out, r)``). The weight update of ``<module>`` is
``scaling * B @ A`` (see ``adapter_config`` for the rank and scaling rules).

``LoraAdapter.open`` validates the directory, the config and the tensor header up front and
then reads tensors lazily, so a library of many experts can be scanned cheaply. Only plain
LoRA on linear layers is supported; anything else is refused with a ``LorafuseError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from lorafuse.errors import LorafuseError
from lorafuse.factors import LoraFactors, module_sort_key
from lorafuse.library.adapter_config import (
    CONFIG_NAME,
    PEFT_PREFIX,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    embedding_or_head,
    module_scaling,
    pattern_value,
    read_config,
)
from lorafuse.library.save import save_adapter

__all__ = [
    "CONFIG_NAME",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "LoraAdapter",
    "LoraFactors",
    "module_sort_key",
    "pattern_value",
    "save_adapter",
]

_A_SUFFIX = ".lora_A.weight"
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' dtype names
_TORCH_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_B_SUFFIX = ".lora_B.weight"


class _ModuleInfo(NamedTuple):
    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int


class _TensorSource:
    """Tensor access by key: lazily from safetensors, or from an already loaded dict."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self._tensors = tensors
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        if tensors is not None:
            for key, t in tensors.items():
                self.shapes[key] = tuple(t.shape)
                self.dtypes[key] = _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype))
        else:
            self._read_header()

    def _read_header(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = str(sl.get_dtype())
        except Exception as exc:  # safetensors raises its own error types
            raise LorafuseError(
                f"unreadable safetensors file (truncated or corrupt): {_one_line(exc)}", self.path
            ) from exc

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as fh:
                return fh.get_tensor(key)
        except Exception as exc:
            raise LorafuseError(
                f"cannot read tensor {key!r} (truncated or corrupt file?): {_one_line(exc)}",
                self.path,
            ) from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class LoraAdapter:
    """One PEFT LoRA adapter directory, read lazily (``safetensors.safe_open``), tensor by tensor.

    Create with :meth:`open`, which validates the files, config and tensor shapes without
    loading tensor data. ``module_names`` are relative to the causal LM, e.g.
    ``"model.layers.1.self_attn.q_proj"``.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        weights_path: Path,
        source: _TensorSource,
        modules: dict[str, _ModuleInfo],
    ) -> None:
        self.path = path
        self.config = config
        self.weights_path = weights_path
        self._source = source
        self._modules = modules
        self.module_names: list[str] = sorted(modules, key=module_sort_key)

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
        """Open and validate the adapter at ``path``; tensors are read later, on demand."""
        path = Path(path)
        if not path.exists():
            raise LorafuseError("adapter directory not found", path)
        if not path.is_dir():
            raise LorafuseError("not a directory (expected a PEFT adapter directory)", path)
        config = read_config(path / CONFIG_NAME)
        weights_path, source = _open_weights(path, allow_pickle=allow_pickle)
        modules = _index_modules(config, source)
        return cls(path, config, weights_path, source, modules)

    # -------------------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        """The adapter directory's name."""
        return self.path.name

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path`` from the config, if set."""
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def target_modules(self) -> list[str] | str | None:
        """``target_modules`` from the config: a list of names, a regex string, or None."""
        value = self.config.get("target_modules")
        if isinstance(value, list | tuple | set):
            return sorted(str(v) for v in value)
        return value

    @property
    def num_bytes(self) -> int:
        """Size of the weights file in bytes."""
        return self.weights_path.stat().st_size

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self._modules)})"

    # ---------------------------------------------------------------------- per module
    def _info(self, module: str) -> _ModuleInfo:
        try:
            return self._modules[module]
        except KeyError:
            raise LorafuseError(
                f"no LoRA weights for module {module!r}", self.weights_path
            ) from None

    def module_rank(self, module: str) -> int:
        """The rank of ``module``'s factors (from the tensor header)."""
        return self._info(module).rank

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of the linear layer ``module`` adapts (from the tensor header)."""
        info = self._info(module)
        return info.d_out, info.d_in

    def scaling(self, module: str) -> float:
        """PEFT's scaling for ``module``: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        return module_scaling(self.config, module, self._info(module).rank)

    def factors(
        self, module: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> LoraFactors:
        """Load just ``module``'s A and B, check them, and convert to ``dtype`` on ``device``."""
        info = self._info(module)
        a = self._load(info.a_key, (info.rank, info.d_in))
        b = self._load(info.b_key, (info.d_out, info.rank))
        return LoraFactors(
            A=a.to(device=device, dtype=dtype),
            B=b.to(device=device, dtype=dtype),
            scaling=self.scaling(module),
        )

    def _load(self, key: str, shape: tuple[int, int]) -> torch.Tensor:
        tensor = self._source.get(key)
        if tuple(tensor.shape) != shape:
            raise LorafuseError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}",
                self.weights_path,
            )
        if not bool(torch.isfinite(tensor).all()):
            raise LorafuseError(f"tensor {key!r} contains NaN or Inf values", self.weights_path)
        return tensor

    def delta(self, module: str) -> torch.Tensor:
        """The dense fp32 update ``scaling * B @ A`` of ``module``, shape ``(d_out, d_in)``."""
        return self.factors(module).delta()

    def iter_factors(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[str, LoraFactors]]:
        """Yield ``(module, factors)`` in model order, loading one module at a time."""
        for module in self.module_names:
            yield module, self.factors(module, dtype=dtype, device=device)


def _open_weights(path: Path, *, allow_pickle: bool) -> tuple[Path, _TensorSource]:
    """Find the weights file: safetensors preferred, pickle only when explicitly allowed."""
    st_path = path / WEIGHTS_NAME
    if st_path.is_file():
        return st_path, _TensorSource(st_path)
    bin_path = path / PICKLE_WEIGHTS_NAME
    if bin_path.is_file():
        if not allow_pickle:
            raise LorafuseError(
                "pickled weights; pass allow_pickle=True / --allow-pickle to load it", bin_path
            )
        return bin_path, _TensorSource(bin_path, _load_pickle(bin_path))
    raise LorafuseError(f"{WEIGHTS_NAME} not found", st_path)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load an ``adapter_model.bin`` with ``weights_only=True`` (no arbitrary code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LorafuseError(f"cannot load pickled weights: {_one_line(exc)}", path) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LorafuseError("expected a dict of tensors", path)
    return state


def _index_modules(config: dict[str, Any], source: _TensorSource) -> dict[str, _ModuleInfo]:
    """Pair lora_A/lora_B keys per module and check shapes against the declared ranks."""
    halves: dict[str, dict[str, str]] = {}
    for key in source.shapes:
        for suffix, half in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
                halves.setdefault(module, {})[half] = key
                break
        else:
            raise LorafuseError(_foreign_tensor(key), source.path)
    if not halves:
        raise LorafuseError("no LoRA weights found", source.path)
    return {m: _module_info(config, source, m, keys) for m, keys in halves.items()}


def _foreign_tensor(key: str) -> str:
    """Why a tensor that is not a LoRA A/B weight is refused, naming the config field."""
    module = key.removesuffix(".weight").removesuffix(".base_layer")
    what = embedding_or_head(module.rsplit(".", 1)[-1])
    if what:  # PEFT saves the full embedding/head weights along with LoRA on them
        return f"tensor {key!r}: LoRA on {what} (target_modules) is not supported"
    for marker, field in (
        ("modules_to_save", "fully trained extra modules (modules_to_save)"),
        ("lora_magnitude_vector", "DoRA (use_dora)"),
        ("lora_embedding_", "LoRA on embeddings (target_modules)"),
        ("lora_bias", "LoRA bias (lora_bias)"),
        (".bias", "trained biases (bias)"),
    ):
        if marker in key:
            return f"tensor {key!r}: {field} is not supported"
    return (
        f"tensor {key!r} is not a LoRA A/B weight (a fully trained module: modules_to_save?); "
        "not supported (only LoRA on linear layers is)"
    )


def _module_info(
    config: dict[str, Any], source: _TensorSource, module: str, keys: dict[str, str]
) -> _ModuleInfo:
    """Check one module's A/B pair from the header: 2-D, float, ranks agree with the config."""
    for half, other in (("A", "B"), ("B", "A")):
        if half not in keys:
            raise LorafuseError(
                f"tensor {keys[other]!r} has no matching lora_{half} weight", source.path
            )
    what = embedding_or_head(module.rsplit(".", 1)[-1])
    if what:
        raise LorafuseError(
            f"LoRA on {what} (target_modules, module {module!r}) is not supported", source.path
        )
    a_key, b_key = keys["A"], keys["B"]
    a_shape, b_shape = source.shapes[a_key], source.shapes[b_key]
    for key, shape in ((a_key, a_shape), (b_key, b_shape)):
        if len(shape) != 2:
            raise LorafuseError(
                f"tensor {key!r} has shape {shape}; only LoRA on linear layers is supported",
                source.path,
            )
        if source.dtypes[key] not in _FLOAT_DTYPES:
            raise LorafuseError(
                f"tensor {key!r} has dtype {source.dtypes[key]}; expected floats", source.path
            )
    declared = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    if a_shape[0] != declared or b_shape[1] != declared:
        raise LorafuseError(
            f"rank mismatch for {module!r}: {a_key!r} has {a_shape[0]}, {b_key!r} has "
            f"{b_shape[1]}, config declares r={declared}",
            source.path,
        )
    return _ModuleInfo(a_key, b_key, declared, d_in=a_shape[1], d_out=b_shape[0])
