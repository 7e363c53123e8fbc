"""Read and write single PEFT LoRA adapters, one module's factors at a time.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (shape ``(r, d_in)``) and
``...lora_B.weight`` (shape ``(d_out, r)``). The weight update of ``<module>`` is
``scaling * B @ A`` where ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), and
``r``/``alpha`` may be overridden per module by ``rank_pattern``/``alpha_pattern``.

``LoraAdapter.open`` validates the directory, the config and the tensor header up front and
then reads tensors lazily, so a library of many experts can be scanned cheaply. Only plain
LoRA on linear layers is supported; anything else is refused with a ``LorafuseError``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_dir, read_json

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

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' dtype names
_TORCH_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_B_SUFFIX = ".lora_B.weight"

# Config switches that change what the adapter computes; each must be off/empty.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


@dataclass(frozen=True)
class LoraFactors:
    """The low-rank update of one linear module: ``delta = scaling * B @ A``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LoraFactors needs A (r, d_in) and B (d_out, r); got A {tuple(self.A.shape)}, "
                f"B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        """Input features of the adapted linear layer."""
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        """Output features of the adapted linear layer."""
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense weight update ``scaling * B @ A``, shape ``(d_out, d_in)``.

        Multiplied in the same order as PEFT's merge so results agree to rounding.
        """
        return (self.B @ self.A) * self.scaling


def module_sort_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting modules in model order: numeric parts (layer indices) numerically."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """Look ``module`` up in a PEFT ``rank_pattern``/``alpha_pattern`` the way PEFT does.

    PEFT takes the first key ``k`` for which ``(.*\\.)?(k)$`` matches the module name.
    """
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return pattern.get(module, default)


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
        config = _read_config(path / CONFIG_NAME)
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
        return _scaling(self.config, module, self._info(module).rank)

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


# --------------------------------------------------------------------------- validation
def _read_config(path: Path) -> dict[str, Any]:
    """Load ``adapter_config.json`` and refuse anything that is not plain LoRA."""
    if not path.is_file():
        raise LorafuseError(f"{CONFIG_NAME} not found (not a PEFT adapter directory?)", path)
    config = read_json(path)
    if not isinstance(config, dict):
        raise LorafuseError("expected a JSON object", path)
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise LorafuseError(f"peft_type is {peft_type!r}; only LORA adapters are supported", path)
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise LorafuseError(f"{feature} is not supported", path)
    if config.get("bias", "none") != "none":
        raise LorafuseError(f"bias={config['bias']!r} is not supported (only 'none')", path)
    _check_number(path, "r", config.get("r", 8), rank=True)
    _check_number(path, "lora_alpha", config.get("lora_alpha", 8), rank=False)
    for key, is_rank in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise LorafuseError(f"{key} must be a JSON object", path)
        for name, value in pattern.items():
            try:
                re.compile(name)
            except re.error as exc:
                raise LorafuseError(
                    f"{key} key {name!r} is not a valid regex: {exc}", path
                ) from exc
            _check_number(path, f"{key}[{name!r}]", value, rank=is_rank)
    return config


def _check_number(path: Path, what: str, value: Any, *, rank: bool) -> None:
    """Ranks must be positive integers; alphas any finite number (merges may negate)."""
    if rank:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LorafuseError(f"{what} must be a positive integer, got {value!r}", path)
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LorafuseError(f"{what} must be a finite number, got {value!r}", path)


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
            raise LorafuseError(
                f"tensor {key!r} is not a LoRA A/B weight; only LoRA on linear layers is "
                "supported (modules_to_save, embeddings and biases are not supported)",
                source.path,
            )
    if not halves:
        raise LorafuseError("no LoRA weights found", source.path)
    return {m: _module_info(config, source, m, keys) for m, keys in halves.items()}


def _module_info(
    config: dict[str, Any], source: _TensorSource, module: str, keys: dict[str, str]
) -> _ModuleInfo:
    """Check one module's A/B pair from the header: 2-D, float, ranks agree with the config."""
    for half, other in (("A", "B"), ("B", "A")):
        if half not in keys:
            raise LorafuseError(
                f"tensor {keys[other]!r} has no matching lora_{half} weight", source.path
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


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling rule, honouring ``alpha_pattern`` and ``use_rslora``."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


# ------------------------------------------------------------------------------- saving
def save_adapter(
    path: str | Path,
    factors: Mapping[str, LoraFactors],
    *,
    base_model: str | None,
    target_modules: list[str] | None = None,
    extra_config: dict[str, Any] | None = None,
    readme: str | None = None,
) -> Path:
    """Write ``factors`` as a PEFT-loadable LoRA adapter directory at ``path``, atomically.

    A and B are stored unchanged (contiguous, same float dtype), so re-saving an adapter read
    with :class:`LoraAdapter` reproduces its weights file byte for byte. Each module's scaling
    goes into ``lora_alpha``/``alpha_pattern`` (ranks into ``r``/``rank_pattern``), with alpha
    chosen so that PEFT's ``alpha / r`` gives back the scaling: exactly whenever some alpha
    can (always for scalings that came from an ``alpha / r``), else to within one ulp. When all
    modules share one rank and alpha there are no patterns. ``use_rslora`` is written only if
    plain ``alpha / r`` needs non-integral alphas and ``alpha / sqrt(r)`` does not; so an
    rsLoRA adapter is usually re-saved as the equivalent plain one (same scaling, new alpha).

    ``target_modules`` defaults to the modules' leaf names (``["q_proj", "v_proj"]``) when the
    modules cover every layer index 0..max for each leaf, else to a regex matching exactly the
    given modules. ``extra_config`` keys are added to ``adapter_config.json`` (PEFT ignores
    unknown keys with a warning); they may not override the keys computed here.
    """
    tensors, ranks, scalings = _prepare_tensors(factors)
    config = _adapter_config(ranks, scalings, base_model, target_modules)
    for key, value in (extra_config or {}).items():
        if key in config:
            raise ValueError(f"extra_config may not override {key!r}")
        config[key] = value
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
    return path


def _prepare_tensors(
    factors: Mapping[str, LoraFactors],
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """PEFT-keyed contiguous CPU tensors plus per-module rank and scaling."""
    if not factors:
        raise ValueError("save_adapter needs at least one module's factors")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scalings: dict[str, float] = {}
    seen: set[int] = set()
    for module in sorted(factors, key=module_sort_key):
        f = factors[module]
        if not module or module.startswith(PEFT_PREFIX) or ".lora_" in module:
            raise ValueError(
                f"expected a bare module name like 'model.layers.0.q_proj': {module!r}"
            )
        if not math.isfinite(f.scaling):
            raise ValueError(f"scaling of {module!r} is not finite: {f.scaling}")
        for half, t in (("lora_A", f.A), ("lora_B", f.B)):
            if not t.is_floating_point():
                raise ValueError(f"{module}.{half} must be a float tensor, got {t.dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[f"{PEFT_PREFIX}{module}.{half}.weight"] = t
        ranks[module] = f.rank
        scalings[module] = float(f.scaling)
    return tensors, ranks, scalings


def _exact_alpha(scaling: float, rank: int, rslora: bool) -> tuple[float | int, bool]:
    """The alpha whose ``alpha / r`` (or ``/ sqrt(r)``) is closest to ``scaling``.

    Returns ``(alpha, integral)``, where integral means an int alpha reproduces the scaling
    exactly. Some scalings (e.g. 0.37 at r=3) have no float alpha with ``alpha / r == scaling``;
    then the nearest one is used, off by one ulp of the scaling.
    """
    denom = math.sqrt(rank) if rslora else rank
    raw = scaling * denom
    candidates: list[float | int] = [round(raw), raw]
    for direction in (math.inf, -math.inf):
        value = raw
        for _ in range(2):
            value = math.nextafter(value, direction)
            candidates.append(value)
    best = min(candidates, key=lambda alpha: abs(alpha / denom - scaling))
    return best, isinstance(best, int) and best / denom == scaling


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the smallest."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _adapter_config(
    ranks: dict[str, int],
    scalings: dict[str, float],
    base_model: str | None,
    target_modules: list[str] | None,
) -> dict[str, Any]:
    """A minimal ``adapter_config.json`` that ``peft.LoraConfig`` loads."""
    use_rslora = False
    alphas = {m: _exact_alpha(scalings[m], ranks[m], False) for m in ranks}
    if not all(integral for _, integral in alphas.values()):
        rs_alphas = {m: _exact_alpha(scalings[m], ranks[m], True) for m in ranks}
        if all(integral for _, integral in rs_alphas.values()):
            alphas, use_rslora = rs_alphas, True
    alpha_of = {m: a for m, (a, _) in alphas.items()}
    r = _most_common(list(ranks.values()))
    lora_alpha = _most_common(list(alpha_of.values()))
    rank_pattern = _patterns({m: v for m, v in ranks.items() if v != r}, ranks, r)
    alpha_pattern = _patterns(
        {m: v for m, v in alpha_of.items() if v != lora_alpha}, alpha_of, lora_alpha
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": (
            sorted(set(target_modules)) if target_modules else _default_targets(list(ranks))
        ),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }


def _patterns(overrides: dict[str, Any], wanted: dict[str, Any], default: Any) -> dict[str, Any]:
    """Per-module pattern keys: plain names when unambiguous under PEFT's regex, else anchored."""
    pattern = {m: overrides[m] for m in sorted(overrides, key=module_sort_key)}
    if all(pattern_value(pattern, m, default) == v for m, v in wanted.items()):
        return pattern
    return {"^" + re.escape(m): v for m, v in pattern.items()}


def _default_targets(modules: list[str]) -> list[str] | str:
    """Leaf names when they cover the same modules as the full names would, else a regex."""
    names = set(modules)
    layer = re.compile(r"\.(\d+)\.")  # the first numeric path component, e.g. ".3."
    indices = {int(m.group(1)) for m in map(layer.search, names) if m}
    for name in names:
        if layer.search(name) and any(
            layer.sub(f".{i}.", name, count=1) not in names for i in range(max(indices) + 1)
        ):
            return "^(?:" + "|".join(re.escape(m) for m in sorted(names)) + ")$"
    return sorted({name.rsplit(".", 1)[-1] for name in names})
