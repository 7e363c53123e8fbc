"""Static merges: K experts in, one adapter out.

``merge(adapters, method, weights, **params)`` runs any method in ``MERGE_METHODS``
(``registry``), one module at a time. Methods work in factor space (``factor_methods``: exact,
no dense matrix) or dense space (``dense_methods``: elementwise TIES/DARE/magnitude, then
truncated SVD back to LoRA via ``svd``).
"""

from lorafuse.merging.linear import concat_factors, linear_merge
from lorafuse.merging.merge import merge, merge_module
from lorafuse.merging.registry import MERGE_METHODS, MergeMethod, get_method, register
from lorafuse.merging.svd import compress_dense, compress_factors, factor_svd

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "compress_dense",
    "compress_factors",
    "concat_factors",
    "factor_svd",
    "get_method",
    "linear_merge",
    "merge",
    "merge_module",
    "register",
]
