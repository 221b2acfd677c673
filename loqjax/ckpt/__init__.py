"""Orbax checkpoints of adapters: async, atomic, checked on restore.

On disk, under ``checkpoint_root()`` (``$LOQJAX_CHECKPOINT_DIR``, else ``checkpoints/``)::

    adapters/<name>/<step>/   AdapterCheckpoints: one version of an adapter
        meta/metadata           JSON: format, adapter config and base model id
        adapter/                its A/B arrays (orbax: OCDBT + zarr)
        metrics/metrics         JSON: the metrics passed to save, if any

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

__all__ = [
    "ENV_VAR",
    "AdapterCheckpoints",
    "BaseModelId",
    "CheckpointRestoreError",
    "Retention",
    "checkpoint_root",
    "default_directory",
]
