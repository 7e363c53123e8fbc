"""Serving: exports that engines (vLLM, PEFT) compute as lorafuse does."""

from __future__ import annotations

from lorafuse.serving.export import VLLM_RANKS, ExportResult, export_adapter

__all__ = ["VLLM_RANKS", "ExportResult", "export_adapter"]
