"""Attach PEFT adapters to the shared base model for a while, then take them off again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from peft import PeftModel

from lorafuse.models import BaseModel


def peft_names(names: Mapping[str, object] | list[str]) -> dict[str, str]:
    """User name -> the adapter name PEFT is given: ``lorafuse_0``, ``lorafuse_1``, ...

    Expert names are user data; PEFT makes adapter names ``nn.ModuleDict`` keys, so a name
    that is also a module attribute (``double``, ``float``, ``to``, ``train``...) would crash
    it. Internal names, in the order given, keep any user name working.
    """
    return {name: f"lorafuse_{k}" for k, name in enumerate(names)}


@contextlib.contextmanager
def peft_adapters(base: BaseModel, adapters: Mapping[str, str | Path]) -> Iterator[PeftModel]:
    """A PeftModel over ``base.model`` with every adapter loaded, the first one active.

    Adapters are loaded under :func:`peft_names` (switch with
    ``model.set_adapter(peft_names(adapters)[name])``). The LoRA layers are removed on exit,
    so the base model can be reused by the next method.
    """
    internal = peft_names(adapters)
    first, *rest = adapters
    model = PeftModel.from_pretrained(
        base.model, str(adapters[first]), adapter_name=internal[first]
    )
    for name in rest:
        model.load_adapter(str(adapters[name]), adapter_name=internal[name])
    model.eval()
    try:
        yield model
    finally:
        model.unload()
        base.model.requires_grad_(False)
