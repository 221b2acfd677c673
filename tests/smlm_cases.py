"""What the SMLM kernel tests (test_smlm.py, test_lora_split.py) share: the batch sizes,
the tolerances, the error measure and the hypothesis strategy of segment layouts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

NUM_ROWS, NUM_SEGMENTS, NUM_SLOTS = 48, 8, 5
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
SEGMENT_LENGTHS = (0, 1, 2, 3, 5, 7, 16, 17, 33)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@st.composite
def layouts(
    draw,
    num_rows=NUM_ROWS,
    num_segments=NUM_SEGMENTS,
    num_slots=NUM_SLOTS,
    segment_lengths=SEGMENT_LENGTHS,
):
    """Segment ends/slots: empty and one-row segments, repeated slots, slot -1,
    an uncovered tail, and a training-row limit anywhere in the batch."""
    lengths = draw(
        st.lists(st.sampled_from(segment_lengths), min_size=num_segments, max_size=num_segments)
    )
    ends = np.minimum(np.cumsum(lengths), num_rows).astype(np.int32)
    slots = np.asarray(
        draw(
            st.lists(st.integers(-1, num_slots - 1), min_size=num_segments, max_size=num_segments)
        ),
        np.int32,
    )
    grad_rows = draw(st.integers(0, num_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    return ends, slots, grad_rows, seed
