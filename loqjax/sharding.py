"""Tensor and data parallelism over a ``jax.sharding.Mesh`` of axes ("data", "model").

    mesh = make_mesh(data=2, model=4)  # 8 devices
    shard_model(model, mesh)            # after add_lora_tables; in place
    graphdef, frozen, params = split_model(model)
    state = TrainState.create(params, optimizer)  # placed like the params
    step = make_unified_step(graphdef, optimizer)
    batch = UnifiedBatch.pack(..., placement=replicated(mesh))
    engine = Engine(model, registry, ...)         # KV pools split on the head axis

Nothing else changes: the model's graphdef carries the mesh (static), every jitted step
of it is GSPMD-partitioned by its arrays' ``NamedSharding``s and keeps its outputs in the
same layout (``with_sharding_constraint``), so it compiles once; the Pallas kernels,
which GSPMD cannot split, run per device inside ``shard_map`` (``loqjax.parallel``).
There is no communication code of our own: every collective is GSPMD's or a ``psum``
inside those ``shard_map``s.

The layout (``partition_spec``), Megatron-style over "model", everything replicated over
"data":

* q/k/v, gate/up: column-parallel, kernel [d_in, d_out] split along d_out (bias too);
  o, down: row-parallel, kernel split along d_in, so attention heads and the MLP's
  intermediate features never leave their device between the two; GSPMD all-reduces the
  row-parallel outputs (forward) and the column-parallel input gradients (backward).
* LoRA tables: column-parallel A [N, d_in, R] replicated, B [N, R, d_out] split along
  d_out; row-parallel A split along d_in, B replicated; scales replicated
  (``parallel.WEIGHT_SPECS``). The adapter terms then add one collective each way: a
  psum of the [T, R] shrink of row-parallel projections (forward) and of column-parallel
  ones' [T, R] ``g @ B^T`` (backward).
* Embedding and LM head [vocab, d]: split along the vocabulary when it divides evenly
  (else replicated). The head is the largest single matmul (vocab x d per token) and
  its float32 logits [T, vocab] the largest activation of a training step: both split
  M ways, for an all-reduce of the [T, d] looked-up rows and the softmax statistics.
* KV cache pools [num_pages, page_size, Hkv, D]: split along the KV heads.
* Norm scales, per-slot scalars (LoRA scales, optimizer counts and hyperparameters):
  replicated. Optimizer state leaves, a table stacked across layers [N, L, ...], take
  the table's layout with the layer axis whole.

Data parallelism is over the token axis of each step: where a projection's T rows split
evenly over "data" they are sharded over it (norms, projections, adapters, head and
loss alike), and the adapter gradients are summed over "data". Attention and the KV
cache are replicated over "data" (see ``loqjax.parallel``): fine-tuning scales over
"data", serving over "model". Batch capacities (training rows, serving rows, token
buckets) that are multiples of the "data" size keep every row data-parallel; others
work, their rows replicated.

The model axis must divide the KV heads (so each device holds whole heads of q, k and
v) and the MLP's intermediate size; ``check_model`` says so before anything is placed.

Multi-host (one process per host, SPMD): every process calls
``jax.distributed.initialize()`` (coordinator address, process count and id from the
cluster's environment, or passed explicitly) before any other JAX call; ``jax.devices()``
is then every host's devices, and ``make_mesh`` spans them all (keep the model axis
within a host: it carries the per-layer all-reduces). Every process then runs the same
program: builds and shards the same model, loads the same adapters and packs the same
batches (``placement=replicated(mesh)``: ``jax.device_put`` then checks that every
process passed the same values), so that each feeds its own devices' shards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loqjax.config import ModelConfig
from loqjax.kv_cache import KVCache, LayerKV, init_kv_cache
from loqjax.layers import Linear
from loqjax.model import Attention, CausalLM
from loqjax.parallel import AXES, MODEL, POOL, WEIGHT_SPECS, Split, TensorParallel

SPLITS: dict[str, Split] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), "column"),
    **dict.fromkeys(("o_proj", "down_proj"), "row"),
}
VOCAB_PARALLEL = ("embed_tokens", "lm_head")
LAYER = "*"  # the key standing for the layer index in a stacked leaf's path (loqjax.optim)
# A projection's leaves (key path below the projection) -> their ``WEIGHT_SPECS`` key.
_WEIGHTS = {
    ("kernel",): "kernel",
    ("bias",): "bias",
    ("adapters", "a"): "a",
    ("adapters", "b"): "b",
}


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh of ``data * model`` devices (default: all of
    ``jax.devices()``, ``model`` = all of them over ``data``); the model axis runs over
    neighbouring devices (on a GPU host, the fastest links)."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // data
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} of {len(devices)} devices")
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def check_model(config: ModelConfig, mesh: Mesh) -> None:
    """Raises ValueError unless ``mesh`` is a ("data", "model") mesh whose model axis
    splits this model's heads and MLP evenly."""
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"the mesh's axes must be {AXES}, got {mesh.axis_names}")
    m = mesh.shape[MODEL]
    if config.num_kv_heads % m or config.intermediate_size % m:
        raise ValueError(
            f"the model axis ({m} devices) must divide num_kv_heads={config.num_kv_heads} "
            f"and intermediate_size={config.intermediate_size}"
        )


def partition_spec(names: tuple[str | int, ...], shape: tuple[int, ...], model_size: int) -> P:
    """The layout of one array of a model (base weights, LoRA tables) or of a tree shaped
    like its params (optimizer state, gradients), by its key path ``names``; see the
    module docstring. Everything is replicated on a model axis of one device."""
    if model_size == 1:
        return P()
    names = tuple(n for n in names if n != "value")  # a Variable's own leaf
    if LAYER in names:  # a table stacked across layers (``optim.LayerStacking``): axis 1
        member = partition_spec(
            tuple(n for n in names if n != LAYER), shape[:1] + shape[2:], model_size
        )
        return P(*member[:1], None, *member[1:]) if len(member) else P()
    for i, name in enumerate(names):
        if name in SPLITS:
            weight = _WEIGHTS.get(names[i + 1 :])
            layout = P() if weight is None else WEIGHT_SPECS[SPLITS[name]][weight]
            # A leaf of another rank under a projection's path (none today) stays whole.
            return layout if len(layout) <= len(shape) else P()
        if name in VOCAB_PARALLEL and names[i + 1 :] == ("embedding",):
            return P(MODEL) if shape[0] % model_size == 0 else P()
    return P()


def tree_shardings(tree, mesh: Mesh):
    """A ``NamedSharding`` for every leaf of ``tree`` (a model state, ``TrainState``,
    gradients, ...; arrays or ``jax.ShapeDtypeStruct``s) by its key path."""
    model_size = mesh.shape[MODEL]

    def sharding(path, leaf):
        names = tuple(key_name(k) for k in path)
        return NamedSharding(mesh, partition_spec(names, np.shape(leaf), model_size))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def shard_tree(tree, mesh: Mesh):
    """``tree`` placed on ``mesh`` by ``tree_shardings`` (arrays already there stay)."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """The ``NamedSharding`` of every pool of ``cache``: split along the KV heads."""
    pool = NamedSharding(mesh, POOL if mesh.shape[MODEL] > 1 else P())
    return tuple(LayerKV(pool, pool) for _ in cache)


def init_cache(
    config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype, mesh: Mesh
) -> KVCache:
    """``init_kv_cache`` zero-filled on ``mesh``, each device allocating only its own
    slice of the pools."""
    init = functools.partial(init_kv_cache, config, num_pages, page_size, dtype)
    return jax.jit(init, out_shardings=cache_shardings(jax.eval_shape(init), mesh))()


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: step metadata and batches."""
    return NamedSharding(mesh, P())


def shard_model(model: CausalLM, mesh: Mesh) -> CausalLM:
    """Places every variable of ``model`` on ``mesh`` (``partition_spec``) and binds the
    model to it, in place; returns the model.

    Call after ``add_lora_tables`` (tables added later are placed as they are made) and
    before ``AdapterRegistry``/``split_model``/``Engine``. The model's graphdef then
    carries the mesh, so every jit of it compiles for the mesh.

    Raises:
      ValueError: ``check_model`` fails.
    """
    check_model(model.config, mesh)
    nnx.update(model, shard_tree(nnx.state(model), mesh))
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear):
            if path[-1] not in SPLITS:
                raise ValueError(f"no tensor-parallel layout for the projection {path}")
            module.tensor_parallel = TensorParallel(mesh, SPLITS[path[-1]])
        elif isinstance(module, Attention | CausalLM):
            module.mesh = mesh
    return model


def constrain_tree(tree, mesh: Mesh | None):
    """Inside a jit: ``tree`` (state, gradients) kept in its ``tree_shardings`` layout."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


def constrain_cache(cache: KVCache | None, mesh: Mesh | None) -> KVCache | None:
    """Inside a jit: the KV pools kept split along their heads."""
    if mesh is None or cache is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` are placed on (that of its first ``NamedSharding``),
    or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def key_name(key) -> str | int:
    """A pytree path key's name: an attribute's name, a dict key, or a sequence index."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
        return key.key
    return key.idx
