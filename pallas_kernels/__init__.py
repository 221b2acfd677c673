"""Pallas GPU kernels for segmented multi-LoRA matmul (SMLM), forward and backward.

Every kernel also runs with ``interpret=True`` (the default off-GPU), which is
how the CPU test suite exercises them.
"""

from pallas_kernels.expand import segment_expand
from pallas_kernels.outer import segment_outer
from pallas_kernels.reference import smlm_reference
from pallas_kernels.segments import (
    RowTiles,
    SlotTiles,
    group_tiles_by_slot,
    normalize_segments,
    plan_row_tiles,
    token_slots,
)
from pallas_kernels.shrink import segment_shrink
from pallas_kernels.smlm import smlm

__all__ = [
    "RowTiles",
    "SlotTiles",
    "group_tiles_by_slot",
    "normalize_segments",
    "plan_row_tiles",
    "segment_expand",
    "segment_outer",
    "segment_shrink",
    "smlm",
    "smlm_reference",
    "token_slots",
]
