"""lorafuse: fuse libraries of LoRA experts by ensembling, merging and routing."""

__version__ = "0.1.0"
