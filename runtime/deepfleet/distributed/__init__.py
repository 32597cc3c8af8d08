"""Tensor and expert parallelism: process group, parallel layers, worker processes (see executor.py)."""
