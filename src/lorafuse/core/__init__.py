"""Core computation shared by training, evaluation and every fusion method."""
