"""The one registry of static merge methods: name -> math function, space and parameters.

A method is a plain function on one module's inputs (see ``factor_methods`` and
``dense_methods``); the entry says which space it works in, what its parameters are (a
pydantic model: validated, ``extra="forbid"``) and what the weights default to. The driver,
``lorafuse.merging.merge``, does the rest. The dense methods are settings of
``generalized_task_arithmetic``.

Parameters every method takes: ``rank`` (output LoRA rank; ``None`` = exact for factor-space
methods, ``sum r_k`` for dense ones). Dense methods add ``scale`` (lambda), ``seed`` (DARE
drops, randomized SVD), ``svd`` (``"gram"``, exact and the default, ``"full"`` or
``"randomized"``; see ``svd.compress_dense``) and ``svd_niter``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafuse.errors import LorafuseError
from lorafuse.merging import (
    factor_methods,
    interference_methods,
    pruning_methods,
    subspace_methods,
    svd_methods,
)
from lorafuse.merging.dense_methods import generalized_task_arithmetic

__all__ = [
    "MERGE_METHODS",
    "DenseParams",
    "LowrankAverageParams",
    "MergeMethod",
    "MergeParams",
    "SparseParams",
    "TaskArithmeticParams",
    "TiesParams",
    "get_method",
    "register",
]

Density = Annotated[float, Field(gt=0.0, le=1.0, description="fraction of entries kept")]


class MergeParams(BaseModel):
    """Parameters shared by all methods."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rank: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None,
        description="output LoRA rank (None: exact / sum of expert ranks; 'auto': per module "
        "the smallest keeping `energy`, at most `max_rank`)",
    )
    energy: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.99, description="with rank 'auto': share of squared Frobenius norm kept"
    )
    max_rank: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="with rank 'auto': the largest rank (None: the untruncated)"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """Lax mode would read True as 1; no parameter is a boolean, so refuse them."""
        if isinstance(value, bool):
            raise ValueError("expected a number or a name, not a boolean")
        return value


class TaskArithmeticParams(MergeParams):
    scale: float = Field(default=1.0, description="lambda, multiplies the merged delta")


class LowrankAverageParams(MergeParams):
    weighting: Literal["average", "sqrt"] = Field(
        default="average", description="per-factor weight |w| or sqrt(|w|) (PEFT's linear)"
    )


class DenseParams(MergeParams):
    """Dense-space methods: the result is re-compressed to a LoRA by truncated SVD."""

    scale: float = Field(default=1.0, description="lambda, multiplies the merged delta")
    seed: int = Field(default=0, description="seeds DARE drops and randomized SVD per module")
    svd: Literal["gram", "full", "randomized"] = Field(
        default="gram", description="SVD algorithm (gram and full are exact)"
    )
    svd_niter: Annotated[int, Field(ge=0)] = Field(
        default=2, description="power iterations of the randomized SVD"
    )


class SparseParams(DenseParams):
    density: Density


class TiesParams(SparseParams):
    majority_sign: Literal["total", "frequency"] = Field(
        default="total", description="elect the sign of the sum of values, or of signs"
    )


class DellaParams(TiesParams):
    epsilon: float = Field(
        default=0.15, gt=0.0, description="keep probabilities span density +- epsilon"
    )

    @field_validator("epsilon")
    @classmethod
    def _in_unit_interval(cls, eps: float, info: Any) -> float:
        density = info.data.get("density")
        if density is not None and not (density - eps > 0 and density + eps <= 1):
            raise ValueError(f"density +- epsilon must lie in (0, 1] (density {density})")
        return eps


class BreadcrumbsParams(TiesParams):
    gamma: float = Field(
        default=0.01, ge=0.0, lt=1.0, description="fraction of largest magnitudes dropped"
    )


class PcbParams(DenseParams):
    density: Density


class TsvParams(TaskArithmeticParams):
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="singular vectors kept per task / min(d) (None: 1/K)"
    )


class IsoCtsParams(TaskArithmeticParams):
    common_fraction: float = Field(
        default=0.8, ge=0.0, le=1.0, description="share of the rank for the common subspace"
    )


class KnotsParams(TaskArithmeticParams):
    density: Density
    majority_sign: Literal["total", "frequency"] = "total"


class CoreSpaceParams(TaskArithmeticParams):
    inner: Literal["task_arithmetic", "ties", "dare_ties", "tsv_m", "iso_c"] = Field(
        default="ties", description="merge run on the cores"
    )
    density: Density | None = Field(default=None, description="for inner ties / dare_ties")
    majority_sign: Literal["total", "frequency"] = "total"
    seed: int = Field(default=0, description="seeds DARE drops per module")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``fn`` merges one module: factor space ``fn(parts: list[LoraFactors], weights, **params)
    -> LoraFactors``; dense space ``fn(deltas, weights, **params) -> Tensor``, where
    ``space="svd"`` methods take and return factors like factor-space ones, working on
    singular vectors computed from the factors (no dense matrix).
    ``deltas`` is one (K, d_out, d_in) tensor (indexing or iterating it gives the experts'
    deltas, as a list would; not to be modified nor kept: the driver reuses its memory for
    the next module) and ``params`` are the fields of
    ``params`` minus ``rank``/``svd``/``svd_niter``.
    ``default_weights`` is what ``weights=None`` means: ``"mean"`` (1/K each) or ``"ones"``.
    ``overwrites``: a dense ``fn`` that takes ``overwrite=True``, letting it use ``deltas`` as
    scratch memory (the driver passes it: one stack of deltas per module instead of two).
    """

    name: str
    space: Literal["factors", "svd", "dense"]
    fn: Callable[..., Any]
    summary: str
    url: str
    params: type[MergeParams]
    default_weights: Literal["mean", "ones"] = "mean"
    overwrites: bool = False

    def parse_params(self, params: Mapping[str, Any]) -> MergeParams:
        """Validate ``params``; any problem is a one-line ``LorafuseError``."""
        known = sorted(self.params.model_fields)
        unknown = sorted(set(params) - set(known))
        if unknown:
            names = ", ".join(repr(u) for u in unknown)
            raise LorafuseError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {names} for method "
                f"{self.name!r} (known: {', '.join(known)})"
            )
        try:
            return self.params(**params)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"  # not the union member
            if err["type"] == "missing":
                raise LorafuseError(
                    f"missing parameter {field!r} for method {self.name!r}"
                ) from None
            raise LorafuseError(
                f"invalid parameter {field!r} for method {self.name!r}: {err['msg']} "
                f"(got {err.get('input')!r})"
            ) from None

    def default_weight_list(self, k: int) -> list[float]:
        """The weights used when none are given, for ``k`` experts."""
        return [1.0 / k] * k if self.default_weights == "mean" else [1.0] * k


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`MERGE_METHODS`; a name may be registered only once."""
    if method.name in MERGE_METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    MERGE_METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``, or a ``LorafuseError`` listing the known ones."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise LorafuseError(
            f"unknown merge method {name!r} (known: {', '.join(sorted(MERGE_METHODS))})"
        ) from None


_TIES_URL = "https://arxiv.org/abs/2306.01708"
_DARE_URL = "https://arxiv.org/abs/2311.03099"
_TA_URL = "https://arxiv.org/abs/2212.04089"

register(
    MergeMethod(
        name="linear",
        space="factors",
        fn=factor_methods.linear,
        summary="exact weighted sum of deltas, stacked into a rank-sum(r_k) LoRA",
        url=_TA_URL,
        params=MergeParams,
    )
)
register(
    MergeMethod(
        name="task_arithmetic",
        space="factors",
        fn=factor_methods.task_arithmetic,
        summary="exact scale * sum_k w_k delta_k (task vectors added, weights default 1)",
        url=_TA_URL,
        params=TaskArithmeticParams,
        default_weights="ones",
    )
)
register(
    MergeMethod(
        name="lowrank_average",
        space="factors",
        fn=factor_methods.lowrank_average,
        summary="average A's and B's separately (equal ranks; cross-terms, not mean of deltas)",
        url="https://huggingface.co/docs/peft/main/en/developer_guides/model_merging",
        params=LowrankAverageParams,
    )
)
register(
    MergeMethod(
        name="ties",
        space="dense",
        fn=partial(
            generalized_task_arithmetic,
            sparsify="magnitude",
            sign_consensus=True,
            combine="disjoint_mean",
        ),
        summary="TIES: trim to top-density magnitudes, elect signs, disjoint mean",
        url=_TIES_URL,
        params=TiesParams,
        default_weights="ones",
        overwrites=True,
    )
)
register(
    MergeMethod(
        name="dare_linear",
        space="dense",
        fn=partial(
            generalized_task_arithmetic, sparsify="random", sign_consensus=False, combine="sum"
        ),
        summary="DARE: random drop with prob 1-density, rescale by 1/density, weighted sum",
        url=_DARE_URL,
        params=SparseParams,
        overwrites=True,
    )
)
register(
    MergeMethod(
        name="dare_ties",
        space="dense",
        fn=partial(
            generalized_task_arithmetic,
            sparsify="random",
            sign_consensus=True,
            combine="disjoint_mean",
        ),
        summary="DARE drop and rescale, then TIES sign election and disjoint mean",
        url=_DARE_URL,
        params=TiesParams,
        default_weights="ones",
        overwrites=True,
    )
)
register(
    MergeMethod(
        name="magnitude",
        space="dense",
        fn=partial(
            generalized_task_arithmetic, sparsify="magnitude", sign_consensus=False, combine="sum"
        ),
        summary="magnitude-prune each expert to density, then weighted sum (PEFT)",
        url=_TIES_URL,
        params=SparseParams,
        overwrites=True,
    )
)

# ---------------------------------------------- methods since 2024 (issue 11), one per paper
_DELLA_URL = "https://arxiv.org/abs/2406.11617"
_CRUMBS_URL = "https://arxiv.org/abs/2312.06795"
_TSV_URL = "https://arxiv.org/abs/2412.00081"
_ISO_URL = "https://arxiv.org/abs/2502.04959"
_NEW: list[tuple[str, str, Callable[..., Any], type[MergeParams], str, str]] = [
    # (name, space, fn, params, summary, url); every one defaults to weights 1 each
    ("della", "dense", pruning_methods.della, DellaParams,
     "DELLA: drop by magnitude rank (p in density+-eps), rescale 1/p, elect, disjoint mean",
     _DELLA_URL),
    ("della_linear", "dense", partial(pruning_methods.della, sign_consensus=False),
     DellaParams, "DELLA's MagPrune drop and rescale, then weighted sum", _DELLA_URL),
    ("breadcrumbs", "dense", pruning_methods.breadcrumbs, BreadcrumbsParams,
     "Breadcrumbs: drop the top gamma and the smallest magnitudes to density, then sum",
     _CRUMBS_URL),
    ("breadcrumbs_ties", "dense", partial(pruning_methods.breadcrumbs, sign_consensus=True),
     BreadcrumbsParams, "Breadcrumbs masks, then elected signs, sum of agreeing experts",
     _CRUMBS_URL),
    ("pcb", "dense", interference_methods.pcb, PcbParams,
     "PCB: intra x inter-task balance scores, keep top density, score-weighted mean",
     "https://arxiv.org/abs/2410.02396"),
    ("tsv_m", "svd", svd_methods.tsv_m, TsvParams,
     "TSV-M: each task's top singular vectors, orthogonalised (polar), own singular values",
     _TSV_URL),
    ("tsv_c", "svd", svd_methods.tsv_c, TsvParams,
     "TSV-C: sum of each task's top-k SVD truncation (k = fraction * min(d))", _TSV_URL),
    ("iso_c", "svd", svd_methods.iso_c, TaskArithmeticParams,
     "Iso-C: SVD of the task sum with every singular value set to their mean", _ISO_URL),
    ("iso_cts", "svd", svd_methods.iso_cts, IsoCtsParams,
     "Iso-CTS: common subspace + per-task residual directions, orthogonalised, flat spectrum",
     _ISO_URL),
    ("knots", "svd", subspace_methods.knots, KnotsParams,
     "KnOTS: SVD of the side-by-side deltas, TIES on each task's S V_i^T in the shared U",
     "https://arxiv.org/abs/2410.19735"),
    ("core_space", "factors", subspace_methods.core_space, CoreSpaceParams,
     "Core Space: merge the cores U_B^T delta_i V_A (inner method), exact for mixed ranks",
     "https://arxiv.org/abs/2509.17786"),
    ("wudi", "factors", interference_methods.wudi, TaskArithmeticParams,
     "WUDI: least-squares minimiser of sum_i ||(t_m - t_i) t_i^T||^2 / ||t_i||^2 (closed form)",
     "https://arxiv.org/abs/2503.08099"),
]  # fmt: skip
for _name, _space, _fn, _params, _summary, _url in _NEW:
    register(MergeMethod(_name, _space, _fn, _summary, _url, _params, default_weights="ones"))
