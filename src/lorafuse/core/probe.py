"""Check, once per model, that the split forward reproduces the model's own forward.

A base model is used through the split forward (lower layers cached, the top run on the
cached states) only if that gives the model's own logits on a probe input: a few rows of
several lengths (one longer than a small sliding window), cut at several layers. If it
does not, or the pieces cannot be found, the model's own full forward from input
embeddings is used instead (exact, slower: no lower-layer cache), provided *that*
reproduces the logits; otherwise the model is refused in one line. Nothing runs silently
wrong. The outcome is kept on the model (``lorafuse_forward``) and recorded in results.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from lorafuse.core import decoder as dec
from lorafuse.errors import LorafuseError

ATTR = "lorafuse_forward"
SPLIT, FULL = "split", "full"
ATOL = RTOL = 1e-4  # fp32: reordered sums differ by ~1e-6; a missing piece by far more
PROBE_LENGTHS = (3, 9)
LONG_PROBE_CAP = 64  # longest probe row; sliding windows beyond it are guarded at run time


@dataclass(frozen=True)
class ForwardPlan:
    """How lorafuse runs a base model, and why."""

    path: str  # "split" (cached lower layers) or "full" (the model's own forward)
    reason: str = ""  # why the split forward is not used ("" when it is)
    max_len: int | None = None  # longest sequence the split forward is checked for
    # the last layer's MLP may run only where logits are read (decoder.mlp_only_at)
    mlp_at_targets: bool = False

    def describe(self) -> str:
        return self.path if self.path == SPLIT else f"{self.path} ({self.reason})"


def model_label(lm: nn.Module) -> str:
    """The model folder (as loaded), else its class name."""
    return str(getattr(lm, "name_or_path", "") or type(lm).__name__)


def plan_of(model: nn.Module) -> ForwardPlan:
    """The model's checked forward plan (checked on first use, then kept on the model)."""
    lm = dec.causal_lm(model)
    plan = getattr(lm, ATTR, None)
    if not isinstance(plan, ForwardPlan):
        plan = check_forward(lm)
        setattr(lm, ATTR, plan)
        if plan.path == FULL:
            print(
                f"lorafuse: {model_label(lm)}: {plan.reason}; using the model's own full "
                "forward (exact, slower: no lower-layer state cache)",
                file=sys.stderr,
            )
    return plan


def _windows(config: object) -> list[int]:
    sizes = [getattr(config, k, None) for k in ("sliding_window", "attention_chunk_size")]
    return [s for s in sizes if isinstance(s, int) and s > 0]


def _max_positions(config: object) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def probe_rows(config: object, vocab: int, device: torch.device) -> list[torch.Tensor]:
    """Seeded token rows: short ones, and one longer than a small sliding window."""
    lengths = set(PROBE_LENGTHS)
    lengths.update(w + 3 for w in _windows(config) if w + 3 <= LONG_PROBE_CAP)
    limit = _max_positions(config)
    lengths = sorted({min(n, limit) if limit else n for n in lengths})
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=gen).to(device) for n in lengths]


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def _mismatch(got: torch.Tensor, want: list[torch.Tensor]) -> float | None:
    """Largest |difference| of padded-batch logits from per-row logits; None if close."""
    worst, close = 0.0, True
    for i, w in enumerate(want):
        g = got[i, : w.shape[0]].to(w.dtype)
        worst = max(worst, float((g - w).abs().max()))
        close = close and torch.allclose(g, w, atol=ATOL, rtol=RTOL)
    return None if close else worst


def _split_logits(lm: nn.Module, ids: torch.Tensor, split: int) -> torch.Tensor:
    parts = dec.decoder_parts(lm)
    lower = dec.split_layers(parts, dec.split_embed(parts, ids), 0, split)
    return dec.head_logits(parts, parts.norm(dec.split_layers(parts, lower, split)))


def _mlp_at_targets_exact(lm: nn.Module, ids: torch.Tensor, want: list[torch.Tensor]) -> bool:
    """Whether running the last layer's MLP only at a few positions of each row keeps the
    logits there exact (every standard decoder layer; anything else keeps the full layer)."""
    picked = [(i, p) for i, w in enumerate(want) for p in sorted({0, len(w) - 2, len(w) - 1})]
    rows = torch.tensor([i for i, p in picked if p >= 0], device=ids.device)
    positions = torch.tensor([p for _, p in picked if p >= 0], device=ids.device)
    try:
        parts = dec.decoder_parts(lm)
        with dec.mlp_only_at(parts.layers[-1], rows, positions):
            got = _split_logits(lm, ids, len(parts.layers) // 2)[rows, positions]
    except Exception:
        return False
    expected = torch.stack(
        [want[i][p] for i, p in zip(rows.tolist(), positions.tolist(), strict=True)]
    )
    return torch.allclose(got.to(expected.dtype), expected, atol=ATOL, rtol=RTOL)


def _probe_splits(n_layers: int) -> list[int]:
    """Two cut points, an odd one among them: layers are indexed absolutely (mask kinds
    alternate in Gemma-2), so any cut computes the same; two passes keep the check cheap
    (about three forwards of a 9-token row in all)."""
    return sorted({min(1, n_layers), n_layers // 2})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_forward(model: nn.Module) -> ForwardPlan:
    """Compare the split forward (and the own-forward fallback) with the model's forward."""
    lm = dec.causal_lm(model)
    training = lm.training
    lm.eval()  # dropout would make any two forwards differ
    try:
        return _check(lm)
    finally:
        lm.train(training)


@torch.no_grad()
def _check(lm: nn.Module) -> ForwardPlan:
    label = model_label(lm)
    config = getattr(lm, "config", None)
    try:
        device = next(lm.parameters()).device
        vocab = lm.get_input_embeddings().weight.shape[0]
        rows = probe_rows(config, vocab, device)
        want = [lm(input_ids=r[None], use_cache=False).logits[0] for r in rows]
    except Exception as err:  # any failure of the model itself: refuse, in one line
        raise LorafuseError(
            f"cannot run the model's own forward on a probe input ({_first_line(err)})", label
        ) from None
    ids, lengths = _pad(rows)

    try:  # any failure here means "the split forward does not fit this family"
        worst = None
        for split in _probe_splits(len(dec.decoder_parts(lm).layers)):
            worst = _mismatch(_split_logits(lm, ids, split), want)
            if worst is not None:
                reason = f"split forward differs from the model's own (max |dlogit| {worst:.2g})"
                break
    except Exception as err:
        worst, reason = float("nan"), f"split forward cannot run ({_first_line(err)})"
    if worst is None:
        # a sliding window no probe row exceeded is only checked for sequences within it
        checked = max(len(r) for r in rows)
        unchecked = [w for w in _windows(config) if w >= checked]
        return ForwardPlan(
            SPLIT,
            max_len=min(unchecked) if unchecked else None,
            mlp_at_targets=_mlp_at_targets_exact(lm, ids, want),
        )

    try:
        full = _mismatch(dec.own_logits(lm, dec.input_embeddings(lm, ids), lengths), want)
    except Exception as err:
        full_reason = _first_line(err)
    else:
        if full is None:
            return ForwardPlan(FULL, reason=reason)
        full_reason = f"differs by {full:.2g}"
    raise LorafuseError(
        f"cannot run this model exactly: {reason}, and its own forward from input "
        f"embeddings fails ({full_reason})",
        label,
    )
