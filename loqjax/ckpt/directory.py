"""One checkpoint directory: numbered orbax steps, each a JSON record and array trees.

Orbax writes every step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` once complete, so a save interrupted at any point leaves no step behind (and
the next save of that step removes the leftover). Saves are asynchronous: ``save``
returns once the arrays are copied to host memory and a background thread writes them;
every read first waits for pending writes of this process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import orbax.checkpoint as ocp

from loqjax.adapter import AdapterError, LoraAdapter
from loqjax.ckpt.adapter_record import decode_config
from loqjax.ckpt.base_model import BaseModelId
from loqjax.ckpt.tree import FlatArrays, Specs, check_specs, flatten, nest, specs_of

ENV_VAR = "LOQJAX_CHECKPOINT_DIR"
META = "meta"  # the JSON item of every step
ADAPTER = "adapter"  # the array item of an adapter's weights


class CheckpointRestoreError(AdapterError):
    """A checkpoint is missing, unreadable, inconsistent or made for another model or
    table layout; the message names the step and the problem. Nothing was loaded."""


def checkpoint_root() -> Path:
    """``$LOQJAX_CHECKPOINT_DIR`` if set, else ``checkpoints/`` in the working directory."""
    return Path(os.environ.get(ENV_VAR) or "checkpoints")


def default_directory(kind: str, name: str) -> Path:
    """``<checkpoint_root()>/<kind>/<name>``; ``name`` must be a plain file name."""
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"checkpoint name {name!r} must be a plain directory name")
    return checkpoint_root() / kind / name


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which steps a directory keeps after each save: the newest ``keep_last`` and the
    ``keep_best`` best by the ``metric`` passed to ``save``.

    Steps saved without the metric count as worst. Keeping the newest as well as the
    best means a job can always resume from where it stopped.

    Attributes:
      keep_last: None keeps every step.
      keep_best: 0 ranks nothing.
      metric: a key of ``save``'s ``metrics``, e.g. "eval_loss".
      mode: "min" or "max": which end of the metric is best.
    """

    keep_last: int | None = 3
    keep_best: int = 0
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if (self.keep_last is not None and self.keep_last < 1) or self.keep_best < 0:
            raise ValueError(
                f"keep_last must be None or >= 1 and keep_best >= 0; "
                f"got {self.keep_last}, {self.keep_best}"
            )

    def manager_options(self, async_save: bool) -> ocp.CheckpointManagerOptions:
        worst = math.inf if self.mode == "min" else -math.inf

        def score(metrics: Mapping[str, float]) -> float:
            return metrics.get(self.metric, worst)

        policies = [ocp.checkpoint_managers.LatestN(n=self.keep_last)]
        if self.keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=score,
                    reverse=self.mode == "min",
                    n=self.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        return ocp.CheckpointManagerOptions(
            best_fn=score,  # orbax writes step metrics only if set
            best_mode=self.mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # Not on open: another process may be writing into this directory right now.
            cleanup_tmp_directories=False,
        )


class CheckpointDirectory:
    """An orbax ``CheckpointManager`` whose steps hold a JSON record and array trees.

    Use as a context manager, or call ``close``, so pending writes finish before the
    process exits. Readers in other processes see a step once it is complete.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        array_items: tuple[str, ...],
        retention: Retention | None,
        async_save: bool,
    ):
        self.directory = Path(directory).absolute()
        self.retention = retention = retention or Retention()
        handlers = {META: ocp.JsonCheckpointHandler()}
        handlers.update({item: ocp.StandardCheckpointHandler() for item in array_items})
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=retention.manager_options(async_save),
            item_handlers=handlers,
        )

    @property
    def steps(self) -> list[int]:
        """Complete steps on disk, ascending (waits for this process's pending saves)."""
        self.wait_until_finished()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    @property
    def latest_step(self) -> int | None:
        steps = self.steps
        return steps[-1] if steps else None

    @property
    def best_step(self) -> int | None:
        """The step with the best ``retention.metric``, or None if none was saved with it."""
        metric = self.retention.metric
        scores = {step: (self._manager.metrics(step) or {}).get(metric) for step in self.steps}
        scored = [step for step, score in scores.items() if score is not None]
        if not scored:
            return None
        return (min if self.retention.mode == "min" else max)(scored, key=scores.__getitem__)

    def wait_until_finished(self) -> None:
        """Blocks until this process's pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _save(
        self,
        step: int | None,
        meta: dict,
        arrays: Mapping[str, FlatArrays],
        metrics: Mapping[str, float] | None,
    ) -> int:
        """Starts writing step ``step`` (default: one past the newest) and returns it.

        Waits for this directory's previous save first, as orbax does anyway. ``arrays``
        must be host arrays that nobody mutates while the write runs.

        Raises:
          orbax's StepAlreadyExistsError (a ValueError): ``step`` exists.
        """
        if step is None:
            latest = self.latest_step
            step = 0 if latest is None else latest + 1
        args = {META: ocp.args.JsonSave(meta)}
        args.update({item: ocp.args.StandardSave(nest(flat)) for item, flat in arrays.items()})
        # force: save whatever the step, including one below the newest after a rollback.
        self._manager.save(
            step,
            args=ocp.args.Composite(**args),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            force=True,
        )
        return step

    def _resolve(self, step: int | None) -> int:
        """``step``, or the newest if None; it must be a complete step."""
        steps = self.steps
        if not steps:
            raise CheckpointRestoreError(f"{self.directory}: no checkpoints")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointRestoreError(f"{self.directory}: no step {step} (steps: {steps})")
        return step

    def _error(self, step: int, problem: str) -> CheckpointRestoreError:
        return CheckpointRestoreError(f"checkpoint {self.directory / str(step)}: {problem}")

    # Orbax reports a missing or damaged item with many exception types (KeyError,
    # FileNotFoundError, tensorstore's ValueError ...): the readers below turn them all
    # into one CheckpointRestoreError that names the step and the item.

    def _read_meta(self, step: int, kind: str) -> dict:
        """The step's JSON record; its "format" must be ``kind``."""
        try:
            args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
            meta = self._manager.restore(step, args=args)[META]
        except Exception as e:
            raise self._error(step, f"cannot read its metadata ({_brief(e)})") from e
        if not isinstance(meta, dict) or meta.get("format") != kind:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise self._error(step, f"metadata format {found!r} is not {kind!r}")
        return meta

    def _check_arrays(self, step: int, item: str, wanted: Specs) -> None:
        """Checks item ``item``'s array paths, shapes and dtypes from its metadata alone."""
        try:
            tree = self._manager.item_metadata(step)[item].tree
        except Exception as e:
            raise self._error(step, f"cannot read the {item!r} metadata ({_brief(e)})") from e
        problem = check_specs(specs_of(flatten(tree)), wanted)
        if problem:
            raise self._error(step, f"{item!r}: {problem}")

    def _read_arrays(self, step: int, item: str) -> FlatArrays:
        """Item ``item``'s arrays, read in full into host memory."""
        try:
            args = ocp.args.Composite(**{item: ocp.args.StandardRestore()})
            tree = self._manager.restore(step, args=args)[item]
        except Exception as e:
            raise self._error(step, f"cannot read the {item!r} arrays ({_brief(e)})") from e
        return {path: np.asarray(a) for path, a in flatten(tree).items()}

    def _read_adapter(self, step: int, record: object, base: BaseModelId) -> LoraAdapter:
        """The adapter of ``record`` (an ``adapter_record.encode`` config) and the step's
        adapter arrays, every check done before its arrays are read."""
        config = decode_config(record, base, functools.partial(self._error, step))
        self._check_arrays(step, ADAPTER, config.array_specs(base))
        return config.adapter(self._read_arrays(step, ADAPTER), base)


def _brief(error: Exception, limit: int = 300) -> str:
    """The exception's type and message, cut short (tensorstore appends its whole spec)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "…"
