"""ELREA gradient features: one projected, Adam-normalised LoRA gradient per example.

ELREA (ensembles of low-rank expert adapters) clusters training examples by the gradient
they induce on a base adapter. A feature is built in four steps:

1. **Per-example gradient** of a loss with respect to every ``lora_A`` / ``lora_B`` weight
   of the base adapter. ``target="prompt"`` (default, as in ELREA, which takes the gradient
   "on the instruction tokens only") uses the mean next-token NLL *inside the prompt*:
   positions ``0..prompt_len-2`` predicting prompt tokens ``1..prompt_len-1``. It needs no
   answer, so an unlabeled prompt at inference gets a feature from the same definition
   (the answer tokens are not even run). ``target="answer"`` uses the mean NLL of the answer
   tokens (the training loss). Examples with no target token get a zero feature.
2. **Adam normalisation** as in LESS: ``g / (sqrt(v) + eps)`` with ``v`` the base adapter's
   Adam second moment (``exp_avg_sq`` per parameter). Adapters are usually saved without
   optimizer state; then ``v`` is *estimated* as the mean of squared per-example gradients
   over the given examples (:func:`estimate_second_moment`, a first pass, cached on disk).
   This is larger than Adam's average of squared mini-batch gradients, by up to the batch
   size where the gradients are mostly noise; only its shape across parameters matters
   after step 4, except relative to ``eps``. To featurise new prompts consistently, pass the
   training set's estimate as ``adam_state``.
3. **Random projection** (Johnson-Lindenstrauss) of the flat gradient (parameters in model
   order, A before B of each module, each weight row-major) to ``dim`` dimensions by a seeded
   Rademacher (default) or Gaussian matrix scaled by ``1/sqrt(dim)``. The matrix is never
   held whole: it is generated in row blocks, each from its own seed, so it depends only on
   ``(seed, kind, dim, P)`` and memory stays bounded for any ``P`` and ``dim``.
4. **L2 normalisation**.

Per-example gradients come from *one* batched backward (:func:`per_example_lora_grads`):
a LoRA linear is two plain linears ``u = x A^T`` and ``z = u B^T`` (the output then scaled
by ``s``), and a linear ``y = x W^T`` has the per-example gradient
``dW_i = sum_t gy_{i,t}^T x_{i,t}``. Forward hooks on every ``lora_A`` / ``lora_B`` keep
their inputs and outputs; ``torch.autograd.grad`` of the *summed* per-example losses gives
the output gradients (``gy`` of ``lora_B`` includes ``s``; that of ``lora_A`` is
``s * g B``). Summing is exact: in a causal LM with right padding examples do not
interact, so each example's loss depends only on its own row. Padding positions are
masked. The gradient of the NLL with respect to the final hidden states is formed in chunks
of positions (``softmax - onehot``, then the head weight) instead of through (N, V) logits.
:func:`per_example_lora_grads_loop` is the plain reference: one forward and
``autograd.grad`` per example.

On a CPU both are bound by the same matrix products (the vocabulary projection at every
prompt position is over half of them), so batching gains only GEMM efficiency on longer
matrices, about 1.5-2x for ~30-token prompts (``benchmarks/bench_grad.py``).

Features are cached under ``cache_root()/"grad_features"`` (or ``directory``) in a folder
named by a hash of the base model, adapter weights, settings and the ordered examples, one
safetensors file per chunk of ``chunk_size`` examples, each written atomically; a run
interrupted part-way resumes at the first missing chunk.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lorafuse.core.encode import Batch, Encoded, collate
from lorafuse.core.fit import per_example_nll
from lorafuse.core.forward import decoder_parts, run_layers, target_logits
from lorafuse.core.peft_adapters import peft_adapters
from lorafuse.core.states import StateCache, example_key, pad_states
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_path, atomic_write_json
from lorafuse.library import LoraAdapter
from lorafuse.models import BaseModel, cache_root

__all__ = [
    "LoraLinear",
    "TARGETS",
    "adam_normalise",
    "estimate_second_moment",
    "gradient_features",
    "lora_linears",
    "per_example_lora_grads",
    "per_example_lora_grads_loop",
    "project",
    "projection_block",
    "second_moment_vector",
]

TARGETS = ("prompt", "answer")
PROJECTIONS = ("rademacher", "gaussian")
MAX_DIM = 8192
_BLOCK_ENTRIES = 1 << 24  # entries of one generated projection block (64 MB in fp32)
_ADAPTER = "elrea_base"  # adapter name while attached to the base model
_FORMAT = 1  # bump when the feature definition changes (invalidates the disk cache)


@dataclass(frozen=True)
class LoraLinear:
    """One LoRA weight: its name as in ``adapter_model.safetensors`` and its linear module."""

    name: str  # e.g. base_model.model.model.layers.24.self_attn.q_proj.lora_A.weight
    module: nn.Linear

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def lora_linears(model: nn.Module, adapter_name: str | None = None) -> list[LoraLinear]:
    """Every ``lora_A`` / ``lora_B`` linear of the active (or named) adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = adapter_name or _active_adapter(module)
        if name not in module.lora_A:
            continue
        for part in ("lora_A", "lora_B"):
            linear = getattr(module, part)[name]
            if not isinstance(linear, nn.Linear) or linear.bias is not None:
                raise LorafuseError(f"{path}: only bias-free LoRA on linear layers is supported")
            out.append(LoraLinear(f"{path}.{part}.weight", linear))
    if not out:
        raise LorafuseError("the model carries no LoRA linear layers")
    return out


def _active_adapter(module: nn.Module) -> str:
    active = module.active_adapters
    if len(active) != 1:
        raise LorafuseError(f"exactly one active adapter needed, found {list(active)}")
    return active[0]


def _inputs(
    states: Sequence[torch.Tensor], encoded: Sequence[Encoded], pad_id: int, target: str
) -> tuple[torch.Tensor, Batch]:
    """Padded states and the batch of loss targets for ``target``.

    ``"prompt"``: each sequence is cut to its prompt and every prompt token after the first
    is a target (``collate`` with ``prompt_len=1``); the states are cut alike, which equals
    running the prompt alone since attention is causal.
    """
    if target == "answer":
        return pad_states(states), collate(encoded, pad_id)
    if target != "prompt":
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    cut = [max(e.prompt_len, 1) for e in encoded]
    prompts = [Encoded(e.ids[:n], 1) for e, n in zip(encoded, cut, strict=True)]
    return pad_states([s[:n] for s, n in zip(states, cut, strict=True)]), collate(prompts, pad_id)


def _example_losses(
    model: nn.Module, states: torch.Tensor, batch: Batch, split: int
) -> torch.Tensor:
    logits = target_logits(model, states, batch, split)
    return per_example_nll(logits, batch)


def _final_hidden(model: nn.Module, states: torch.Tensor, batch: Batch, split: int):
    """Normed last hidden states (N, H) at the positions predicting each target."""
    parts = decoder_parts(model)
    hidden = run_layers(model, states, split)
    picked = hidden[batch.rows.to(hidden.device), batch.positions.to(hidden.device)]
    return parts.norm(picked)


@torch.no_grad()
def _nll_grad(
    normed: torch.Tensor,
    batch: Batch,
    head: nn.Module,
    n: int,
    chunk: int = 64,
    softcap: float | None = None,
):
    """d(sum_i mean-NLL_i) / d(normed), (N, H), computed ``chunk`` positions at a time.

    ``softmax(z) - onehot`` times ``1/count_i`` times the head weight: the same products as
    autograd through ``cross_entropy``, without (N, V) logits and their gradient in memory
    (for a prompt target N is every prompt token; at V=49k those buffers cost more in memory
    traffic than the products themselves). With final logit softcapping
    ``z = c tanh(u / c)`` the chain rule adds the factor ``1 - tanh(u / c)^2``.
    """
    rows = batch.rows.to(normed.device)
    targets = batch.targets.to(normed.device)
    counts = torch.bincount(rows, minlength=n).clamp(min=1).to(normed.dtype)
    out = torch.empty_like(normed)
    for s in range(0, normed.shape[0], chunk):
        z = head(normed[s : s + chunk])
        squash = None if softcap is None else torch.tanh(z / softcap)
        z = z.softmax(dim=-1) if squash is None else (squash * softcap).softmax(dim=-1)
        z[torch.arange(z.shape[0], device=z.device), targets[s : s + chunk]] -= 1
        z.mul_((1 / counts[rows[s : s + chunk]])[:, None])
        if squash is not None:
            z.mul_(1 - squash.square())
        out[s : s + chunk] = z @ head.weight
    return out


def per_example_lora_grads(
    model: nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
    *,
    target: str = "prompt",
    linears: Sequence[LoraLinear] | None = None,
) -> torch.Tensor:
    """Flat per-example gradients (B, P) of each example's mean NLL, from one backward.

    ``model`` carries LoRA layers only at or above ``split``; ``states`` are the (len_i, H)
    hidden states entering layer ``split``. Columns follow :func:`lora_linears`.
    """
    linears = list(linears) if linears is not None else lora_linears(model)
    device = next(model.parameters()).device
    padded, batch = _inputs(states, encoded, pad_id, target)
    padded = padded.to(device)
    n, width = padded.shape[:2]
    mask = torch.arange(width, device=device)[None] < batch.lengths.to(device)[:, None]
    mask = mask.to(padded.dtype)[..., None]  # (B, T, 1)

    seen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(linears)

    def keep(k: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if seen[k] is not None:
                raise LorafuseError(f"{linears[k].name} ran twice in one forward")
            seen[k] = (args[0].detach(), output)

        return hook

    flags = [lin.module.weight.requires_grad for lin in linears]
    handles = [lin.module.register_forward_hook(keep(k)) for k, lin in enumerate(linears)]
    try:
        for lin in linears:
            lin.module.weight.requires_grad_(True)  # so the LoRA outputs join the graph
        with torch.enable_grad():
            normed = _final_hidden(model, padded, batch, split)
            if any(s is None for s in seen):
                missing = [lin.name for lin, s in zip(linears, seen, strict=True) if s is None]
                raise LorafuseError(f"LoRA layers not run (below split {split}?): {missing[:3]}")
            parts = decoder_parts(model)
            head = parts.lm_head
            if getattr(head, "bias", None) is not None:
                raise LorafuseError("an lm_head with a bias is not supported")
            grads = torch.autograd.grad(
                normed,
                [s[1] for s in seen],
                grad_outputs=_nll_grad(normed.detach(), batch, head, n, softcap=parts.softcap),
                allow_unused=True,
            )
    finally:
        for h in handles:
            h.remove()
        for lin, flag in zip(linears, flags, strict=True):
            lin.module.weight.requires_grad_(flag)

    out = padded.new_empty(n, sum(lin.numel for lin in linears))
    offset = 0
    for lin, (x, _), gy in zip(linears, seen, grads, strict=True):
        size = lin.numel
        block = out[:, offset : offset + size].view(n, *lin.module.weight.shape)
        if gy is None:  # output does not reach the loss (e.g. a module after the last target)
            block.zero_()
        else:
            block.copy_(torch.bmm(gy.transpose(1, 2), x.to(gy.dtype) * mask))
        offset += size
    return out


def per_example_lora_grads_loop(
    model: nn.Module,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    split: int,
    pad_id: int,
    *,
    target: str = "prompt",
    linears: Sequence[LoraLinear] | None = None,
) -> torch.Tensor:
    """The same (B, P) gradients with one forward and backward per example (the reference)."""
    linears = list(linears) if linears is not None else lora_linears(model)
    device = next(model.parameters()).device
    weights = [lin.module.weight for lin in linears]
    flags = [w.requires_grad for w in weights]
    rows = []
    try:
        for w in weights:
            w.requires_grad_(True)
        for state, example in zip(states, encoded, strict=True):
            padded, batch = _inputs([state], [example], pad_id, target)
            with torch.enable_grad():
                loss = _example_losses(model, padded.to(device), batch, split).sum()
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(w)).reshape(-1)
                        for g, w in zip(grads, weights, strict=True)
                    ]
                )
            )
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return torch.stack(rows)


# --- Adam normalisation ------------------------------------------------------------------


def _canonical(name: str) -> str:
    """``...lora_A.<adapter>.weight`` (a live module's name) -> ``...lora_A.weight`` (file)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


def second_moment_vector(
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]],
    linears: Sequence[LoraLinear],
) -> torch.Tensor:
    """The flat ``v`` (P,) in the column order of ``linears``.

    ``adam_state`` maps parameter names (as in ``adapter_model.safetensors``, or with the
    adapter name as in ``named_parameters``) to ``exp_avg_sq`` tensors, or to an optimizer's
    per-parameter state dict holding ``"exp_avg_sq"``.
    """
    by_name = {_canonical(k): v for k, v in adam_state.items()}
    parts = []
    for lin in linears:
        value = by_name.get(_canonical(lin.name))
        if isinstance(value, Mapping):
            value = value.get("exp_avg_sq")
        if value is None:
            raise LorafuseError(f"adam_state has no exp_avg_sq for {lin.name}")
        if value.numel() != lin.numel:
            raise LorafuseError(
                f"adam_state[{lin.name}] has {value.numel()} entries, the weight {lin.numel}"
            )
        parts.append(value.detach().reshape(-1).float().cpu())
    v = torch.cat(parts)
    if (v < 0).any() or not torch.isfinite(v).all():
        raise LorafuseError("adam_state exp_avg_sq must be finite and non-negative")
    return v


def adam_normalise(grads: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """LESS's Adam-preconditioned gradient ``g / (sqrt(v) + eps)`` (v broadcast over rows)."""
    return grads / (v.to(grads.device, grads.dtype).sqrt() + eps)


# --- random projection -------------------------------------------------------------------


def _block_rows(dim: int) -> int:
    return max(1, _BLOCK_ENTRIES // dim)


_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1  # byte -> 8 ±1


def projection_block(
    seed: int, index: int, rows: int, dim: int, kind: str = "rademacher"
) -> torch.Tensor:
    """Rows ``[index*B, index*B + rows)`` of the (P, dim) projection matrix, unscaled.

    Each block has its own generator seeded from ``(seed, index)``, so any block can be
    made alone and the matrix does not depend on how the examples are batched.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    if kind == "gaussian":
        return torch.randn(rows, dim, generator=gen)
    if kind != "rademacher":
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    total = rows * dim
    octets = torch.randint(0, 256, ((total + 7) // 8,), generator=gen, dtype=torch.uint8)
    signs = nn.functional.embedding(octets.long(), _SIGNS)  # 8 random signs per byte
    return signs.reshape(-1)[:total].view(rows, dim)


def project(
    grads: torch.Tensor, dim: int = 1024, seed: int = 0, kind: str = "rademacher"
) -> torch.Tensor:
    """``grads (N, P) @ R / sqrt(dim)`` with R (P, dim) of i.i.d. ±1 or N(0, 1) entries.

    ``E ||project(x)||^2 = ||x||^2`` and inner products are preserved up to
    ``O(1/sqrt(dim))`` (Johnson-Lindenstrauss). R is generated block by block.
    """
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in 1..{MAX_DIM}, got {dim}")
    n, p = grads.shape
    rows = _block_rows(dim)
    out = grads.new_zeros(n, dim, dtype=torch.float32)
    for index, start in enumerate(range(0, p, rows)):
        stop = min(start + rows, p)
        block = projection_block(seed, index, stop - start, dim, kind).to(grads.device)
        out.addmm_(grads[:, start:stop].float(), block)
    return out.mul_(dim**-0.5)


# --- the cached pipeline -----------------------------------------------------------------


def _sha1_file(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def _adapter_fingerprint(adapter: LoraAdapter) -> str:
    h = hashlib.sha1()
    _sha1_file(h, adapter.path / "adapter_config.json")
    _sha1_file(h, adapter.weights_path)
    return h.hexdigest()[:16]


def _examples_hash(encoded: Sequence[Encoded]) -> str:
    """The ordered examples: token ids (via the state-cache key) and where the prompt ends."""
    h = hashlib.sha1()
    for e in encoded:
        h.update(f"{example_key(e)}:{e.prompt_len};".encode())
    return h.hexdigest()[:16]


def _tensor_hash(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def _open_adapter(adapter_path: str | Path, split: int) -> LoraAdapter:
    adapter = LoraAdapter.open(adapter_path)

    def layer(module: str) -> int:
        hit = re.search(r"\.layers\.(\d+)\.", module)
        return int(hit.group(1)) if hit else -1  # not in a decoder layer: below any split

    below = [m for m in adapter.module_names if layer(m) < split]
    if below:
        raise LorafuseError(
            f"adapter adapts layers below the state cache's split {split} ({below[0]}); "
            "use a StateCache at the adapter's first layer",
            adapter.path,
        )
    return adapter


def _length_batches(encoded: Sequence[Encoded], indices: Sequence[int], size: int):
    """Batches of ``indices`` in order of sequence length (less padding)."""
    order = sorted(indices, key=lambda i: len(encoded[i].ids))
    return [order[s : s + size] for s in range(0, len(order), size)]


def _batched_grads(model, linears, states, encoded, indices, split, pad_id, target, batch_size):
    """(len(indices), P) gradients of ``indices``, rows in the order given."""
    row = {i: r for r, i in enumerate(indices)}
    out = None
    for idx in _length_batches(encoded, indices, batch_size):
        grads = per_example_lora_grads(
            model,
            [states[i] for i in idx],
            [encoded[i] for i in idx],
            split,
            pad_id,
            target=target,
            linears=linears,
        )
        if out is None:
            out = grads.new_empty(len(indices), grads.shape[1])
        out[torch.tensor([row[i] for i in idx])] = grads
    return out


def estimate_second_moment(
    base: BaseModel,
    adapter_path: str | Path,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    target: str = "prompt",
    batch_size: int = 16,
    directory: str | Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The fallback for a missing Adam state: mean over ``encoded`` of squared gradients.

    Returned (and cached on disk) per parameter, shaped and named like the adapter's weights,
    so it can be passed back as ``adam_state`` (e.g. to featurise test prompts with the
    training set's estimate).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not encoded:
        raise ValueError("estimate_second_moment needs at least one example")
    adapter = _open_adapter(adapter_path, cache.split)
    root = Path(directory) if directory is not None else cache_root() / "grad_features"
    key = _key(
        kind="second_moment",
        base=base.fingerprint,
        adapter=_adapter_fingerprint(adapter),
        split=cache.split,
        target=target,
        examples=_examples_hash(encoded),
    )
    file = root / f"second_moment-{key}.safetensors"
    if file.is_file():
        return load_file(str(file))
    states = cache.get(encoded, desc="grad features: states")
    with peft_adapters(base, {_ADAPTER: adapter.path}) as model:
        return _second_moment(
            model, states, encoded, cache.split, base, target, batch_size, file, progress
        )


def _second_moment(model, states, encoded, split, base, target, batch_size, file, progress):
    linears = lora_linears(model)
    total = None
    bar = tqdm(total=len(encoded), desc="grad features: v", disable=not progress, leave=False)
    for idx in _length_batches(encoded, range(len(encoded)), batch_size):
        grads = per_example_lora_grads(
            model,
            [states[i] for i in idx],
            [encoded[i] for i in idx],
            split,
            base.tokenizer.pad_token_id,
            target=target,
            linears=linears,
        )
        sq = grads.square().sum(0)
        total = sq if total is None else total.add_(sq)
        bar.update(len(idx))
    bar.close()
    mean = (total / max(1, len(encoded))).cpu()
    out, offset = {}, 0
    for lin in linears:
        out[_canonical(lin.name)] = (
            mean[offset : offset + lin.numel].view_as(lin.module.weight).clone()
        )
        offset += lin.numel
    with atomic_path(file) as tmp:
        save_file(out, str(tmp))
    return out


def _key(**fields: object) -> str:
    text = json.dumps({"format": _FORMAT, **fields}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class FeaturePlan:
    """Where the features of one call go: a folder named by every setting, one file per
    chunk of examples (``chunks[c]`` are indices into the examples, ``files[c]`` its file)."""

    run: Path
    settings: dict
    chunks: list[list[int]]
    files: list[Path]

    @property
    def todo(self) -> list[int]:
        """The chunks not on disk yet."""
        return [c for c, f in enumerate(self.files) if not f.is_file()]

    def load(self) -> torch.Tensor:
        return torch.cat([load_file(str(f))["features"] for f in self.files])


def _adam_state(
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``exp_avg_sq`` per canonical weight name, and its hash (``estimated`` when absent)."""
    if adam_state is None:
        return None, "estimated"
    v_given = {_canonical(k): v for k, v in adam_state.items()}
    v_given = {
        k: (v.get("exp_avg_sq") if isinstance(v, Mapping) else v) for k, v in v_given.items()
    }
    bad = [k for k, v in v_given.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise LorafuseError(f"adam_state has no exp_avg_sq tensor for {bad[0]}")
    v_hash = hashlib.sha1(
        "".join(
            f"{k}:{_tensor_hash(v.detach().float().cpu())}" for k, v in sorted(v_given.items())
        ).encode()
    ).hexdigest()[:16]
    return v_given, v_hash


def feature_plan(
    base: BaseModel,
    adapter: LoraAdapter,
    encoded: Sequence[Encoded],
    split: int,
    *,
    dim: int,
    seed: int,
    target: str,
    projection: str,
    eps: float,
    v_hash: str,
    chunk_size: int,
    directory: str | Path | None,
) -> FeaturePlan:
    root = Path(directory) if directory is not None else cache_root() / "grad_features"
    settings = dict(
        base=base.fingerprint,
        adapter=_adapter_fingerprint(adapter),
        split=split,
        target=target,
        dim=dim,
        seed=seed,
        projection=projection,
        eps=eps,
        second_moment=v_hash,
        examples=_examples_hash(encoded),
    )
    run = root / _key(kind="features", **settings)
    chunks = [
        list(range(s, min(s + chunk_size, len(encoded))))
        for s in range(0, len(encoded), chunk_size)
    ]
    files = [run / f"chunk-{c:05d}-{len(ix)}.safetensors" for c, ix in enumerate(chunks)]
    return FeaturePlan(run, settings, chunks, files)


def write_feature_chunks(
    base: BaseModel,
    adapter_path: str | Path,
    states: Sequence[torch.Tensor],
    encoded: Sequence[Encoded],
    v_given: Mapping[str, torch.Tensor],
    chunks: Sequence[Sequence[int]],
    files: Sequence[Path],
    *,
    split: int,
    dim: int,
    seed: int,
    target: str,
    projection: str,
    eps: float,
    batch_size: int,
    progress: bool = False,
) -> None:
    """Compute and write (each atomically) the features of ``chunks[c]`` to ``files[c]``.

    A chunk's features depend only on its own examples (in order) and the settings, so
    any process can write any chunk (:mod:`lorafuse.elrea.distributed`).
    """
    pad = base.tokenizer.pad_token_id
    with peft_adapters(base, {_ADAPTER: Path(adapter_path)}) as model:
        linears = lora_linears(model)
        v = second_moment_vector(v_given, linears)
        bar = tqdm(total=sum(len(c) for c in chunks), desc="grad features", disable=not progress)
        for chunk, file in zip(chunks, files, strict=True):
            grads = _batched_grads(
                model, linears, states, encoded, chunk, split, pad, target, batch_size
            )
            feats = project(adam_normalise(grads, v, eps), dim, seed, projection)
            del grads
            feats = nn.functional.normalize(feats, dim=1).cpu().contiguous()
            with atomic_path(file) as tmp:
                save_file({"features": feats}, str(tmp))
            bar.update(len(chunk))
        bar.close()


def check_feature_settings(
    target: str, projection: str, dim: int, batch_size: int, chunk_size: int
) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in 1..{MAX_DIM}, got {dim}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be positive")


def gradient_features(
    base: BaseModel,
    adapter_path: str | Path,
    encoded: Sequence[Encoded],
    cache: StateCache,
    *,
    dim: int = 1024,
    seed: int = 0,
    target: str = "prompt",
    batch_size: int = 16,
    adam_state: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
    eps: float = 1e-8,
    projection: str = "rademacher",
    chunk_size: int = 64,
    directory: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Unit-norm ELREA gradient features (N, dim) of ``encoded`` for the adapter at
    ``adapter_path`` (see the module docstring for the four steps).

    ``adam_state``: ``exp_avg_sq`` per LoRA weight; without it ``v`` is estimated over
    ``encoded`` (:func:`estimate_second_moment`). Results are cached on disk per chunk of
    ``chunk_size`` examples; an interrupted call resumes. ``chunk_size`` examples' full
    gradients (``chunk_size * P`` floats) are held at once, and the projection matrix is
    regenerated once per chunk.
    """
    check_feature_settings(target, projection, dim, batch_size, chunk_size)
    if not encoded:
        return torch.zeros(0, dim)
    adapter = _open_adapter(adapter_path, cache.split)
    v_given, v_hash = _adam_state(adam_state)
    plan = feature_plan(
        base, adapter, encoded, cache.split, dim=dim, seed=seed, target=target,
        projection=projection, eps=eps, v_hash=v_hash, chunk_size=chunk_size,
        directory=directory,
    )  # fmt: skip
    todo = plan.todo
    if todo:
        if not (plan.run / "settings.json").is_file():
            atomic_write_json(plan.run / "settings.json", {**plan.settings, "n": len(encoded)})
        if v_given is None:
            v_given = estimate_second_moment(
                base,
                adapter.path,
                encoded,
                cache,
                target=target,
                batch_size=batch_size,
                directory=plan.run.parent,
                progress=progress,
            )
        write_feature_chunks(
            base, adapter.path, cache.get(encoded, desc="grad features: states"), encoded,
            v_given, [plan.chunks[c] for c in todo], [plan.files[c] for c in todo],
            split=cache.split, dim=dim, seed=seed, target=target, projection=projection,
            eps=eps, batch_size=batch_size, progress=progress,
        )  # fmt: skip
    return plan.load()
