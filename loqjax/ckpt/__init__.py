"""Orbax checkpoints of adapters and fine-tuning jobs: async, atomic, checked on restore.

On disk, under ``checkpoint_root()`` (``$LOQJAX_CHECKPOINT_DIR``, else ``checkpoints/``)::

    adapters/<name>/<step>/   AdapterCheckpoints: one version of an adapter
        meta/metadata           JSON: format, adapter config and base model id
        adapter/                its A/B arrays (orbax: OCDBT + zarr)
        metrics/metrics         JSON: the metrics passed to save, if any
    jobs/<name>/<step>/       JobCheckpoints: a fine-tuning job after <step> steps
        meta/metadata           ... plus data position and RNG key
        adapter/
        optimizer/              its slot of the SlotOptState

A step directory appears by an atomic rename once complete; ``<step>.orbax-checkpoint-tmp``
is a save in progress or one that was interrupted.
"""

from loqjax.ckpt.adapters import AdapterCheckpoints
from loqjax.ckpt.base_model import BaseModelId
from loqjax.ckpt.directory import (
    ENV_VAR,
    CheckpointRestoreError,
    Retention,
    checkpoint_root,
    default_directory,
)
from loqjax.ckpt.jobs import JobCheckpoint, JobCheckpoints

__all__ = [
    "ENV_VAR",
    "AdapterCheckpoints",
    "BaseModelId",
    "CheckpointRestoreError",
    "JobCheckpoint",
    "JobCheckpoints",
    "Retention",
    "checkpoint_root",
    "default_directory",
]
