"""Structured pruning as ONNX graph passes.

    groups.py    dependency analysis: coupled channels / heads / KV groups (rules.py: per-op rules)
    criteria.py  importance per unit: magnitude, activation-aware (calib.py: norms via ONNX Runtime)
    surgery.py   removal: initializers, shape constants, Split sizes, Conv groups, KV-cache shapes
    prune.py     PrunePass: budget, selection, report, metadata
    nm.py        N:M semi-structured sparsity
"""

from .groups import Group, analyze
from .nm import apply_nm
from .prune import PruneConfig, PrunePass, PruneResult

__all__ = ["Group", "PruneConfig", "PrunePass", "PruneResult", "analyze", "apply_nm"]
