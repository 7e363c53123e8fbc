"""Serving: exports that engines (vLLM, PEFT) compute as lorafuse does, and router bundles
(``export_bundle``) whose ``load_router(OUT).route(prompts)`` picks each request's adapter.

This layer sits above ``fusion`` and ``elrea`` (it builds and exports their routers); nothing
below imports it. ``load_router`` and ``export_bundle`` are imported on first use.
"""

from __future__ import annotations

from typing import Any

from lorafuse.serving.export import VLLM_RANKS, ExportResult, export_adapter


def load_router(path, base=None, *, device=None) -> Any:
    """Open a router bundle; see :func:`lorafuse.serving.router.load_router`."""
    from lorafuse.serving.router import load_router as load

    return load(path, base, device=device)


def export_bundle(ws, method: str, out, **kwargs) -> Any:
    """Write a router bundle; see :func:`lorafuse.serving.bundle.export_bundle`."""
    from lorafuse.serving.bundle import export_bundle as export

    return export(ws, method, out, **kwargs)


__all__ = ["VLLM_RANKS", "ExportResult", "export_adapter", "export_bundle", "load_router"]
