"""Runtime adapter management: names -> slots of a model's LoRA tables.

Loading, replacing and unloading an adapter rewrites one slot of every table with one
jitted, buffer-donating call whose argument shapes never change (adapters are padded to
``max_rank`` and untargeted projections get zeros with scale 0), so neither that call
nor the model's forward ever recompiles. Every check runs before the write: a failed
call leaves the tables and the registry as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loqjax.adapter import (
    DuplicateAdapterError,
    InvalidAdapterError,
    LoraAdapter,
    RankError,
    ShapeMismatchError,
    TableFullError,
    TargetModuleError,
    UnknownAdapterError,
)
from loqjax.lora import TARGET_MODULES, LoraBatch, LoraTable, ModuleKey, lora_tables
from loqjax.model import CausalLM


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """Where a loaded adapter lives and how it was configured."""

    slot: int
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]


@functools.partial(jax.jit, donate_argnums=0)
def write_slot(tables, slot: jax.Array, values):
    """Replaces slot ``slot`` of every table array; the old tables are donated.

    Args:
      tables: pytree of [N, ...] arrays.
      slot: int32 scalar in [0, N).
      values: the same pytree with [...] arrays (each leaf's slot shape and dtype).
    """
    return jax.tree.map(lambda table, value: table.at[slot].set(value), tables, values)


class AdapterRegistry:
    """Host-side map of adapter names to the slots of a model's LoRA tables.

    The registry writes into the model's table variables in place, so a model passed to
    ``nnx.jit`` sees every change on its next call without retracing. The old table
    buffers are donated: a state split off the model earlier is stale after a change.
    """

    def __init__(self, model: CausalLM):
        """Binds to the tables ``add_lora_tables`` gave ``model``; all slots start free."""
        self._tables: dict[ModuleKey, LoraTable] = lora_tables(model)
        if not self._tables:
            raise ValueError("the model has no LoRA tables; call add_lora_tables first")
        self.num_slots, _, self.max_rank = next(iter(self._tables.values())).a.shape
        self.num_layers = len(model.layers)
        self.target_modules = tuple(dict.fromkeys(name for _, name in self._tables))
        self._adapters: dict[str, AdapterInfo] = {}

    @property
    def adapters(self) -> Mapping[str, AdapterInfo]:
        """Read-only view: loaded adapter name -> its info."""
        return types.MappingProxyType(self._adapters)

    def info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            loaded = ", ".join(map(repr, self._adapters)) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
        return self._adapters[name]

    def load(self, name: str, adapter: LoraAdapter) -> int:
        """Writes ``adapter`` into the lowest free slot and returns that slot.

        Raises:
          DuplicateAdapterError, TableFullError, and the errors of ``check``.
        """
        if name in self._adapters:
            raise DuplicateAdapterError(
                f"adapter {name!r} is already loaded in slot {self._adapters[name].slot}; "
                "use replace()"
            )
        self.check(adapter)
        free = sorted(set(range(self.num_slots)) - {i.slot for i in self._adapters.values()})
        if not free:
            raise TableFullError(
                f"all {self.num_slots} slots are taken; unload an adapter before loading {name!r}"
            )
        self._set(name, free[0], adapter)
        return free[0]

    def replace(self, name: str, adapter: LoraAdapter) -> int:
        """Overwrites a loaded adapter in its own slot (any rank or targets) and returns it.

        Raises:
          UnknownAdapterError, and the errors of ``check``.
        """
        slot = self.info(name).slot
        self.check(adapter)
        self._set(name, slot, adapter)
        return slot

    def unload(self, name: str) -> None:
        """Frees the adapter's slot, zeroing it so stale weights can never be served."""
        slot = self.info(name).slot
        self._write(slot, None)
        del self._adapters[name]

    def export(self, name: str) -> LoraAdapter:
        """Reads a loaded adapter back from the tables (in the tables' dtype)."""
        info = self.info(name)
        weights = {}
        for key, table in self._tables.items():
            if key[1] in info.target_modules:
                a = np.asarray(table.a[...][info.slot])[:, : info.rank]
                b = np.asarray(table.b[...][info.slot])[: info.rank]
                weights[key] = (a, b)
        return LoraAdapter(info.rank, info.alpha, weights, info.use_rslora)

    def batch(
        self,
        requests: Sequence[tuple[str | None, int]],
        num_segments: int,
        grad_rows: int | None = None,
    ) -> LoraBatch:
        """``LoraBatch`` for sequences packed back to back from row 0.

        Args:
          requests: (adapter name, or None for the base model alone; sequence length)
            per sequence, in packing order.
          num_segments, grad_rows: see ``LoraBatch.pack``.

        Raises:
          UnknownAdapterError: a name is not loaded.
        """
        slots = [-1 if name is None else self.info(name).slot for name, _ in requests]
        return LoraBatch.pack([n for _, n in requests], slots, num_segments, grad_rows)

    def check(self, adapter: LoraAdapter) -> None:
        """Checks that ``adapter`` fits these tables and the base model.

        Raises:
          InvalidAdapterError: not a ``LoraAdapter``, alpha not a finite number, or A/B
            not finite floating-point arrays.
          RankError: rank not an integer in [1, max_rank].
          TargetModuleError: no targets, or a target the tables do not hold.
          ShapeMismatchError: missing or extra layers, or A/B shapes that do not match
            the base projections.
        """
        if not isinstance(adapter, LoraAdapter):
            raise InvalidAdapterError(f"expected a LoraAdapter, got {type(adapter).__name__}")
        rank = adapter.rank
        if not isinstance(rank, int | np.integer) or isinstance(rank, bool):
            raise RankError(f"adapter rank {rank!r} is not an integer")
        if not 1 <= rank <= self.max_rank:
            raise RankError(f"adapter rank {rank} is outside [1, {self.max_rank}]")
        alpha = adapter.alpha
        if not isinstance(alpha, int | float | np.number) or not np.isfinite(alpha):
            raise InvalidAdapterError(f"adapter alpha {alpha!r} is not a finite number")
        targets = adapter.target_modules
        foreign = [name for name in targets if name not in self.target_modules]
        if foreign or not targets:
            raise TargetModuleError(
                f"adapter targets {list(targets)}; the tables hold {list(self.target_modules)}"
            )
        for name in targets:
            layers = sorted(layer for layer, n in adapter.weights if n == name)
            if layers != list(range(self.num_layers)):
                raise ShapeMismatchError(
                    f"{name} has weights for layers {layers}; "
                    f"the base model has layers 0..{self.num_layers - 1}"
                )
            for layer in layers:
                table = self._tables[layer, name]
                a, b = adapter.weights[layer, name]
                where = f"layers.{layer}.{TARGET_MODULES[name]}.{name}"
                for matrix, w in (("A", a), ("B", b)):
                    if not isinstance(w, np.ndarray | jax.Array):
                        raise InvalidAdapterError(
                            f"{where}: {matrix} is a {type(w).__name__}, not an array"
                        )
                    if not jnp.issubdtype(w.dtype, jnp.floating):
                        raise InvalidAdapterError(
                            f"{where}: {matrix} has dtype {w.dtype}; a float dtype is needed"
                        )
                want_a = (table.a.shape[1], adapter.rank)
                want_b = (adapter.rank, table.b.shape[2])
                if (a.shape, b.shape) != (want_a, want_b):
                    raise ShapeMismatchError(
                        f"{where}: A {a.shape} and B {b.shape}; "
                        f"the base model needs A {want_a} and B {want_b}"
                    )
                if not (np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()):
                    raise InvalidAdapterError(f"{where}: A or B holds NaN or infinity")

    def _set(self, name: str, slot: int, adapter: LoraAdapter) -> None:
        self._write(slot, adapter)
        self._adapters[name] = AdapterInfo(
            slot, adapter.rank, adapter.alpha, adapter.use_rslora, adapter.target_modules
        )

    def _write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Writes ``adapter`` (None: zeros) into ``slot`` of every table."""
        tables = {key: (t.a[...], t.b[...], t.scale[...]) for key, t in self._tables.items()}
        values = {key: self._slot_values(key, t, adapter) for key, t in self._tables.items()}
        new = write_slot(tables, np.int32(slot), values)
        for key, table in self._tables.items():
            for variable, value in zip((table.a, table.b, table.scale), new[key], strict=True):
                variable.set_value(value)

    def _slot_values(
        self, key: ModuleKey, table: LoraTable, adapter: LoraAdapter | None
    ) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """One slot's (a [d_in, R], b [R, d_out], scale) on the host, zero-padded to R."""
        a = np.zeros(table.a.shape[1:], table.a.dtype)
        b = np.zeros(table.b.shape[1:], table.b.dtype)
        if adapter is None or key not in adapter.weights:
            return a, b, np.float32(0.0)
        a[:, : adapter.rank], b[: adapter.rank] = adapter.weights[key]
        return a, b, np.float32(adapter.scale)
