"""Adapter checkpoints: saved versions of one LoRA adapter, loadable into any registry of
the same base model.

    ckpts = AdapterCheckpoints(model, "poet")  # checkpoints/adapters/poet/
    ckpts.save(registry.export("poet"), metrics={"eval_loss": 1.3})  # returns at once
    slot = ckpts.load(other_registry, "poet")  # the newest version, in any free slot
    ckpts.export_peft("exported/poet")
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from loqjax.adapter import AdapterError, LoraAdapter
from loqjax.ckpt.adapter_record import encode
from loqjax.ckpt.base_model import BaseModelId
from loqjax.ckpt.directory import (
    ADAPTER,
    CheckpointDirectory,
    CheckpointRestoreError,
    Retention,
    default_directory,
)
from loqjax.model import CausalLM
from loqjax.peft_format import save_peft_adapter
from loqjax.registry import AdapterRegistry

FORMAT = "loqjax.adapter.v1"


class AdapterCheckpoints(CheckpointDirectory):
    """Numbered versions of one adapter of ``model``'s base.

    A step holds the adapter's weights and config (rank, alpha, use_rslora,
    target_modules, scale) and the base model's ``BaseModelId``; restoring checks them
    all against this base before returning anything.
    """

    def __init__(
        self,
        model: CausalLM,
        name: str,
        *,
        directory: str | os.PathLike | None = None,
        retention: Retention | None = None,
        async_save: bool = True,
    ):
        """
        Args:
          model: the base model (with or without adapter tables) the adapter belongs to.
          name: the adapter's name; the default directory is
            ``<checkpoint_root()>/adapters/<name>``.
          directory: overrides the default directory.
          retention: which steps to keep; default ``Retention()``.
          async_save: write in a background thread (``save`` returns at once).
        """
        self.base = BaseModelId.of(model)
        super().__init__(
            directory or default_directory("adapters", name), (ADAPTER,), retention, async_save
        )

    def save(
        self,
        adapter: LoraAdapter,
        *,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> int:
        """Starts writing ``adapter`` as step ``step`` (default: one past the newest).

        Returns once the weights are copied; the write finishes in the background.

        Returns:
          The step.

        Raises:
          RankError, TargetModuleError, ShapeMismatchError: the adapter does not fit the
            base model; nothing is written.
        """
        record, arrays = encode(adapter, self.base)
        return self._save(step, {"format": FORMAT, "adapter": record}, {ADAPTER: arrays}, metrics)

    def restore(self, step: int | None = None) -> LoraAdapter:
        """Reads a step (default: the newest), in the dtype it was saved in.

        Raises:
          CheckpointRestoreError: no such step; missing, malformed or inconsistent
            metadata; missing, unreadable or wrongly shaped arrays; another base model.
        """
        step = self._resolve(step)
        return self._read_adapter(step, self._read_meta(step, FORMAT).get("adapter"), self.base)

    def load(
        self,
        registry: AdapterRegistry,
        name: str,
        *,
        step: int | None = None,
        replace: bool = False,
    ) -> int:
        """Restores a step into ``registry`` as ``name``: into the lowest free slot, or
        with ``replace`` into the slot of the loaded adapter ``name``. Returns the slot.

        ``registry`` must belong to a model of this base. Every check runs before the
        slot is written: after an error the tables are bit-identical.

        Raises:
          CheckpointRestoreError: as ``restore``, or the adapter does not fit the tables
            (rank above their max_rank, a projection they do not hold).
          DuplicateAdapterError, TableFullError, UnknownAdapterError: as
            ``AdapterRegistry.load`` and ``replace``.
        """
        step = self._resolve(step)
        adapter = self.restore(step)
        try:
            registry.check(adapter)
        except AdapterError as e:
            raise CheckpointRestoreError(
                f"checkpoint {self.directory / str(step)} does not fit the adapter tables: {e}"
            ) from e
        return registry.replace(name, adapter) if replace else registry.load(name, adapter)

    def export_peft(
        self,
        path: str | os.PathLike,
        *,
        step: int | None = None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        """Writes a step (default: the newest) as a PEFT adapter directory
        (``peft_format.save_peft_adapter``), for PEFT, vLLM or ``load_peft_adapter``."""
        save_peft_adapter(self.restore(step), path, base_model_name_or_path=base_model_name_or_path)
