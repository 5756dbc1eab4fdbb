"""Engine pieces around the decoder: memory planning, CUDA-graph decode, synthetic benchmark models."""

from spqr_run.engine.graphs import GraphDecodeStep
from spqr_run.engine.planner import MemoryPlan, apply_budget, parse_memory, plan_memory
from spqr_run.engine.synthetic import SYNTHETIC, build_synthetic

__all__ = [
    "SYNTHETIC",
    "GraphDecodeStep",
    "MemoryPlan",
    "apply_budget",
    "build_synthetic",
    "parse_memory",
    "plan_memory",
]
