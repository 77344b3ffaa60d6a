"""Evaluation: the shapes judge, reconstruction and codebook metrics."""
