"""Run a merge config: open and check the experts, merge, write a PEFT adapter (or model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lorafuse import __version__
from lorafuse.io import atomic_dir
from lorafuse.library import LoraAdapter, LoraFactors, check_compatible, save_adapter
from lorafuse.merging.config import MergeConfig
from lorafuse.merging.merge import merge
from lorafuse.merging.truncation import Truncation, format_summary, summarize
from lorafuse.models import EMBEDDED_NAME


def run_merge(
    config: MergeConfig,
    out: str | Path,
    *,
    root: Path = Path("."),
    full_model: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> Path:
    """Merge the config's experts and write ``out`` atomically; returns ``out``.

    What re-compression to a rank lost (relative Frobenius error per module, energy kept) is
    passed to ``report`` as one line and written into the model card.
    """
    adapters = [
        LoraAdapter.open(_resolve(root, e.path), allow_pickle=allow_pickle) for e in config.experts
    ]
    check_compatible(adapters)
    lost: dict[str, Truncation] = {}
    factors = merge(
        adapters,
        config.method,
        config.weights(),
        progress=progress,
        truncation=lost,
        **config.parameters,
    )
    if lost:
        report(format_summary(lost))
    base_name = adapters[0].base_model or (
        EMBEDDED_NAME if config.base_model == "embedded" else config.base_model
    )
    card = model_card(config, adapters) + truncation_card(lost)
    if full_model:
        return save_full_model(config.base_model, factors, out, card)
    return save_adapter(out, factors, base_model=base_name, readme=card)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def model_card(config: MergeConfig, adapters: list[LoraAdapter]) -> str:
    lines = [
        "---",
        "library_name: peft",
        "tags: [lorafuse, merge, lora]",
        "---",
        "",
        f"# Merged LoRA ({config.method})",
        "",
        f"Made with lorafuse {__version__}: `lorafuse merge` with this configuration.",
        "",
        "```yaml",
        config.to_yaml().rstrip(),
        "```",
        "",
        "Experts:",
        "",
    ]
    lines += [f"- `{a.path}` (base `{a.base_model}`)" for a in adapters]
    return "\n".join(lines) + "\n"


def truncation_card(lost: dict[str, Truncation]) -> str:
    """The model card's account of re-compression: the summary line and every module."""
    if not lost:
        return ""
    s = summarize(lost)
    lines = [
        "",
        "## Re-compression",
        "",
        format_summary(lost) + ".",
        "",
        f"Energy kept over all modules: {s['energy_kept_total']:.4f}.",
        "",
        "| module | rank | relative Frobenius error | energy kept |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{m}` | {t.rank} | {t.rel_error:.4f} | {t.energy_kept:.4f} |" for m, t in lost.items()
    ]
    return "\n".join(lines) + "\n"


def save_full_model(
    base_spec: str, factors: dict[str, LoraFactors], out: str | Path, card: str
) -> Path:
    """Add each merged delta to the base weights and save a Hugging Face model folder."""
    from lorafuse.models import load_base_model

    base = load_base_model(base_spec)
    check_compatible_shapes(base.model, factors)
    with torch.no_grad():
        for module, f in factors.items():
            linear = base.model.get_submodule(module)
            linear.weight += f.delta().to(linear.weight.device, linear.weight.dtype)
    out = Path(out)
    with atomic_dir(out) as tmp:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def check_compatible_shapes(model: torch.nn.Module, factors: dict[str, LoraFactors]) -> None:
    from lorafuse.errors import LorafuseError

    for module, f in factors.items():
        try:
            weight = model.get_submodule(module).weight
        except AttributeError:
            raise LorafuseError(f"module {module} not found in the base model") from None
        if tuple(weight.shape) != (f.d_out, f.d_in):
            raise LorafuseError(
                f"{module}: merged delta {(f.d_out, f.d_in)} vs base weight {tuple(weight.shape)}"
            )
