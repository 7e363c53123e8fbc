"""bench_merge's PEFT side: ``add_weighted_adapter`` on a PeftModel holding every expert,
timed and recorded (the uncompressed merged delta of each module, the input of PEFT's SVD)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import peft.tuners.lora.model as peft_lora_model
import torch
from peft import PeftModel

from lorafuse.library import LoraAdapter

PEFT_FUNCS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def load_peft_model(base_model: torch.nn.Module, adapters: dict[str, LoraAdapter]) -> PeftModel:
    """A PeftModel over ``base_model`` with every adapter loaded under its own name."""
    names = list(adapters)
    first = adapters[names[0]]
    model = PeftModel.from_pretrained(base_model, str(first.path), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name].path), adapter_name=name)
    return model.eval()


@contextlib.contextmanager
def patched(owner: Any, attr: str, replacement: Any) -> Iterator[None]:
    """Temporarily set ``owner.attr`` (a module global or an instance attribute)."""
    had_own = attr in vars(owner)
    original = vars(owner).get(attr)
    setattr(owner, attr, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)


class PeftRunner:
    """Runs ``add_weighted_adapter`` on a PeftModel and reads or deletes the result."""

    def __init__(self, model: PeftModel, adapter_names: list[str]) -> None:
        self.model = model
        self.adapter_names = adapter_names
        self.calls = 0

    def call(self, pair: Any, weights: list[float]) -> str:
        self.calls += 1
        name = f"bench_{self.calls}"
        self.model.add_weighted_adapter(
            self.adapter_names,
            weights,
            name,
            combination_type=pair.peft_type,
            svd_rank=pair.rank,
            density=pair.params.get("density"),
            majority_sign_method=pair.params.get("majority_sign", "total"),
        )
        return name

    def delete(self, name: str) -> None:
        self.model.delete_adapter(name)

    def deltas(self, name: str, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        base = self.model.get_base_model()
        return {m: base.get_submodule(m).get_delta_weight(name).detach() for m in modules}

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record PEFT's uncompressed merged delta per module (the input of its SVD)."""
        recorded: dict[str, torch.Tensor] = {}
        last: list[torch.Tensor] = []
        lora_model = self.model.base_model
        names = {id(mod): n for n, mod in self.model.get_base_model().named_modules()}
        svd_merge = lora_model._svd_generalized_task_arithmetic_weighted_adapter

        def keep(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
                last.append(fn(*args, **kwargs))
                return last[-1]

            return wrapped

        def per_module(*args: Any, **kwargs: Any) -> Any:
            out = svd_merge(*args, **kwargs)  # args[4] is the LoRA layer being merged
            recorded[names[id(args[4])]] = last.pop()
            return out

        with contextlib.ExitStack() as stack:
            for f in PEFT_FUNCS:
                stack.enter_context(patched(peft_lora_model, f, keep(getattr(peft_lora_model, f))))
            attr = "_svd_generalized_task_arithmetic_weighted_adapter"
            stack.enter_context(patched(lora_model, attr, per_module))
            yield recorded
