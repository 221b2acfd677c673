"""Fine-tuning job checkpoints: one adapter slot's training state, for an exact resume.

A step holds everything a job needs to go on besides its data and the frozen base: the
adapter (as an adapter checkpoint holds it), its slot of the ``SlotOptState`` (moments,
step count, hyperparameters, gradients accumulated since the last update), the data
position and the RNG key. Training on from a restored step gives bit-identical weights
to never having stopped.

    jobs = JobCheckpoints(model, optimizer, "poet-sft")  # checkpoints/jobs/poet-sft/
    jobs.save(step, state, registry.info("poet"), data_position=pos, rng=key)

Resuming, in any process whose model has the same base and tables, into any slot:

    job = jobs.restore()  # checks everything, writes nothing
    slot = registry.load("poet", job.adapter)
    graphdef, frozen, params = split_model(model)
    state = job.install(TrainState.create(params, optimizer), slot)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loqjax.adapter import LoraAdapter
from loqjax.ckpt.adapter_record import encode
from loqjax.ckpt.base_model import BaseModelId
from loqjax.ckpt.directory import ADAPTER, CheckpointDirectory, Retention, default_directory
from loqjax.ckpt.tree import flatten_pytree, specs_of, unflatten_like
from loqjax.lora import TARGET_MODULES, LoraParam, lora_tables
from loqjax.model import CausalLM
from loqjax.optim import SlotOptimizer, SlotOptState
from loqjax.registry import AdapterInfo, write_slot
from loqjax.unified import TrainState

FORMAT = "loqjax.job.v1"
OPTIMIZER = "optimizer"


@dataclasses.dataclass(frozen=True)
class JobCheckpoint:
    """A restored job step.

    Attributes:
      step: the training step it was saved at.
      adapter: the adapter as trained up to ``step``, in its table dtype.
      opt: the slot's optimizer state: a ``SlotOptState`` of host arrays without the
        slot axis (one slot of what ``SlotOptimizer.init`` makes).
      data_position: the JSON value passed to ``save`` (tuples come back as lists).
      rng: the key passed to ``save``, typed or raw uint32 as it was; or None.
    """

    step: int
    adapter: LoraAdapter
    opt: SlotOptState
    data_position: Any
    rng: jax.Array | None

    def install(self, state: TrainState, slot: int) -> TrainState:
        """``state`` with slot ``slot``'s optimizer state set to this job's; ``state``
        is donated. The slot's params must already hold ``adapter``: load it into the
        registry before splitting the model into ``state``."""
        num_slots = jax.tree.leaves(state.opt)[0].shape[0]
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is outside [0, {num_slots})")
        return state._replace(opt=write_slot(state.opt, np.int32(slot), self.opt))


class JobCheckpoints(CheckpointDirectory):
    """Numbered steps of one fine-tuning job: one adapter slot trained by ``optimizer``
    in the adapter tables of ``model``."""

    def __init__(
        self,
        model: CausalLM,
        optimizer: SlotOptimizer,
        name: str,
        *,
        directory: str | os.PathLike | None = None,
        retention: Retention | None = None,
        async_save: bool = True,
    ):
        """
        Args:
          model: the base model with the adapter tables the job trains in.
          optimizer: the job's optimizer; a restored state must have its structure.
          name: the job's name; the default directory is
            ``<checkpoint_root()>/jobs/<name>``.
          directory, retention, async_save: as for ``AdapterCheckpoints``.
        """
        tables = lora_tables(model)
        if not tables:
            raise ValueError("the model has no LoRA tables; call add_lora_tables first")
        self.base = BaseModelId.of(model)
        self.max_rank = next(iter(tables.values())).a.shape[2]
        self.target_modules = tuple(dict.fromkeys(proj for _, proj in tables))
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(model, LoraParam)
        )
        self._opt_template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
            jax.eval_shape(optimizer.init, params),
        )
        super().__init__(
            directory or default_directory("jobs", name),
            (ADAPTER, OPTIMIZER),
            retention,
            async_save,
        )

    def save(
        self,
        step: int,
        state: TrainState,
        adapter: AdapterInfo,
        *,
        data_position: Any = None,
        rng: jax.Array | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts writing the job's state after training step ``step``.

        Copies the slot to host memory and returns; the write finishes in the
        background, so ``state`` may be donated to the next step right away.

        Args:
          step: the number of training steps taken (the resumed job's next is ``step``).
          state: the unified step's state.
          adapter: the trained adapter's registry entry (its slot and config).
          data_position: any JSON value that locates the job in its data.
          rng: a typed or raw uint32 JAX key.
          metrics: e.g. {"eval_loss": ...}, for ``Retention``.

        Raises:
          ValueError: ``data_position`` is not JSON, or the step exists.
        """
        try:
            json.dumps(data_position)
        except TypeError as e:
            raise ValueError(f"data_position must be a JSON value: {e}") from e
        params, opt = jax.device_get(_take_slot((state.params, state.opt), np.int32(adapter.slot)))
        weights = {}
        for layer in range(self.base.config.num_layers):
            for name in adapter.target_modules:
                table = params["layers"][layer][TARGET_MODULES[name]][name]["adapters"]
                weights[layer, name] = (table["a"][:, : adapter.rank], table["b"][: adapter.rank])
        lora = LoraAdapter(adapter.rank, adapter.alpha, weights, adapter.use_rslora)
        record, arrays = encode(lora, self.base)
        meta = {
            "format": FORMAT,
            "adapter": record,
            "data_position": data_position,
            "rng": _rng_record(rng),
        }
        optimizer = {path: np.array(x) for path, x in flatten_pytree(opt).items()}
        self._save(step, meta, {ADAPTER: arrays, OPTIMIZER: optimizer}, metrics)

    def restore(self, step: int | None = None) -> JobCheckpoint:
        """Reads a step (default: the newest) and checks it against this job's base,
        tables and optimizer.

        Raises:
          CheckpointRestoreError: as ``AdapterCheckpoints.restore``; or the adapter does
            not fit the tables, or the optimizer state's structure, shapes or dtypes are
            not this optimizer's on these tables.
        """
        step = self._resolve(step)
        meta = self._read_meta(step, FORMAT)
        adapter = self._read_adapter(step, meta.get("adapter"), self.base)
        foreign = [name for name in adapter.target_modules if name not in self.target_modules]
        if adapter.rank > self.max_rank or foreign:
            raise self._error(
                step,
                f"the adapter (rank {adapter.rank}, targets {list(adapter.target_modules)}) "
                f"does not fit the tables (max_rank {self.max_rank}, "
                f"targets {list(self.target_modules)})",
            )
        self._check_arrays(step, OPTIMIZER, specs_of(flatten_pytree(self._opt_template)))
        opt = unflatten_like(self._read_arrays(step, OPTIMIZER), self._opt_template)
        rng = _rng_from_record(meta.get("rng"), functools.partial(self._error, step))
        return JobCheckpoint(step, adapter, opt, meta.get("data_position"), rng)


@jax.jit
def _take_slot(tree, slot: jax.Array):
    """Slot ``slot`` of every [N, ...] leaf, in one dispatch."""
    return jax.tree.map(lambda x: x[slot], tree)


def _rng_record(rng: jax.Array | None) -> dict | None:
    if rng is None:
        return None
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl, data = str(jax.random.key_impl(rng)), jax.random.key_data(rng)
    else:
        impl, data = None, rng
    return {"impl": impl, "data": np.asarray(data, np.uint32).tolist()}


def _rng_from_record(record: object, fail) -> jax.Array | None:
    if record is None:
        return None
    try:
        data = np.asarray(record["data"], np.uint32)
        impl = record["impl"]
        return jnp.asarray(data) if impl is None else jax.random.wrap_key_data(data, impl=impl)
    except (TypeError, KeyError, ValueError) as e:
        raise fail(f"malformed rng record {record!r} ({e})") from e
