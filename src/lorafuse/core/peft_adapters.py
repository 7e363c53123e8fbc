"""Attach PEFT adapters to the shared base model for a while, then take them off again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from peft import PeftModel

from lorafuse.models import BaseModel


@contextlib.contextmanager
def peft_adapters(base: BaseModel, adapters: Mapping[str, str | Path]) -> Iterator[PeftModel]:
    """A PeftModel over ``base.model`` with every adapter loaded (switch with set_adapter).

    The LoRA layers are removed on exit, so the base model can be reused by the next method.
    """
    names = list(adapters)
    model = PeftModel.from_pretrained(base.model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    try:
        yield model
    finally:
        model.unload()
        base.model.requires_grad_(False)
