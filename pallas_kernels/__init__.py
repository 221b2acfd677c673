"""Pallas GPU kernels: segmented multi-LoRA matmul (SMLM) and packed flash attention,
forward and backward, and paged attention for the serving step (forward).

Every kernel also runs with ``interpret=True`` (the default off-GPU), which is
how the CPU test suite exercises them; a model off GPU computes with the plain-jnp
references instead (``platform.use_kernels``).
"""

from pallas_kernels.expand import segment_expand
from pallas_kernels.flash_attention import packed_attention, packed_layout_ok
from pallas_kernels.lora_split import lora_split_forward
from pallas_kernels.outer import segment_outer
from pallas_kernels.paged_attention import (
    AttentionBlocks,
    QueryTiles,
    TilePlan,
    paged_attention,
    plan_query_tiles,
)
from pallas_kernels.reference import smlm_group_reference, smlm_reference
from pallas_kernels.segments import (
    RowTiles,
    SlotChunks,
    normalize_segments,
    plan_row_tiles,
    plan_slot_chunks,
    token_slots,
)
from pallas_kernels.shrink import segment_shrink
from pallas_kernels.smlm import (
    SMALL_BATCH_ROWS,
    plan_forward,
    smlm,
    smlm_group,
    smlm_group_backward,
    smlm_group_forward,
)

__all__ = [
    "SMALL_BATCH_ROWS",
    "AttentionBlocks",
    "QueryTiles",
    "RowTiles",
    "SlotChunks",
    "TilePlan",
    "lora_split_forward",
    "normalize_segments",
    "packed_attention",
    "packed_layout_ok",
    "paged_attention",
    "plan_forward",
    "plan_query_tiles",
    "plan_row_tiles",
    "plan_slot_chunks",
    "segment_expand",
    "segment_outer",
    "segment_shrink",
    "smlm",
    "smlm_group",
    "smlm_group_backward",
    "smlm_group_forward",
    "smlm_group_reference",
    "smlm_reference",
    "token_slots",
]
