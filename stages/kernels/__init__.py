"""Triton kernels, each a drop-in for a torch reference in ``stages/solvers``."""
