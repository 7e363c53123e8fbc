"""Static merges: K experts in, one adapter out."""

from lorafuse.merging.linear import linear_merge

__all__ = ["linear_merge"]
