"""Planner: slices -> per-tile work lists (FULL / PARTIAL) for block-sparse attention kernels."""

from .planner import AttnPlan, PlanEntry, build_plan, cache_info, clear_cache, get_plan, native_planner, plan_attention
from .stats import tile_efficiency, union_area

__all__ = ["AttnPlan", "PlanEntry", "build_plan", "get_plan", "plan_attention", "cache_info", "clear_cache",
           "native_planner", "tile_efficiency", "union_area"]
