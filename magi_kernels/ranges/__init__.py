"""Slices and masks: ``(q_ranges, k_ranges, attn_type_map)`` with MagiAttention's semantics."""

from .masks import BlockCausal, Magi1WindowMask, PackedMask, SlidingWindow, VarlenCausal, VarlenFull
from .types import AttnMaskType, row_bounds, slice_area
from .validate import check_ranges_meta, check_ranges_values, validate_ranges

__all__ = ["AttnMaskType", "row_bounds", "slice_area", "check_ranges_meta", "check_ranges_values", "validate_ranges",
           "VarlenFull", "VarlenCausal", "BlockCausal", "SlidingWindow", "Magi1WindowMask", "PackedMask"]
