"""The unified step: per-adapter gradients of a mixed batch against each adapter alone and
PEFT, serving logits against a serving-only forward, per-slot optax updates (by hand,
accumulated, skipped when non-finite, untouched slots bit-identical), one compile for
every layout, and a backward that never touches serving rows.

Every step runs through one compiled function (``Setup.step``): one model, optimizer and
set of batch capacities, so the module compiles it once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.extend import core as jax_core

from loqjax import AdapterRegistry, LoraBatch, add_lora_tables, load_model, load_peft_adapter
from loqjax import split_forward as split_forward_module
from loqjax.kv_cache import init_kv_cache
from loqjax.optim import SlotOptimizer, adamw
from loqjax.sampling import SamplingParams, SamplingStages
from loqjax.scheduler import EngineConfig, Scheduler, SequenceState
from loqjax.serve_step import ServeRows
from loqjax.unified import (
    ServeSequence,
    TrainSequence,
    TrainState,
    UnifiedBatch,
    make_unified_step,
    slot_losses,
    split_model,
)

from hf_reference import LORA_MAX_RANK, LORA_NUM_SLOTS, PEFT_ADAPTERS, pack, rel_err
from jaxpr_walk import equations, host_synced

ARCH = "llama2"
SLOT = {name: slot for slot, name in enumerate(PEFT_ADAPTERS)}  # registry load order
NAME = {slot: name for name, slot in SLOT.items()}
SLOTS = range(LORA_NUM_SLOTS)  # the last one stays empty
# Static capacities; no model dimension is 48 (all rows) or 20 (serving rows).
TRAIN_ROWS, SERVE_ROWS, NUM_SEGMENTS, NUM_SAMPLES = 28, 20, 8, 4
ALONE_ROWS = 16  # capacity of the single-sequence reference batches
TOL = 1e-4

WEIGHT_DECAY, LEARNING_RATE, MAX_GRAD_NORM = 0.1, 1e-2, 1e6
# Per-slot hyperparameters: mlp clips hard, kou learns slower, the rest use the defaults.
HYPERPARAMS = {SLOT["mlp"]: dict(max_grad_norm=0.05), SLOT["kou"]: dict(learning_rate=3e-3)}
GREEDY_PARAMS = SamplingParams(temperature=0.0, max_tokens=4)
OPTIMIZER = SlotOptimizer(
    adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
)


def _hyperparam(slot: int, name: str) -> float:
    default = dict(learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM)[name]
    return HYPERPARAMS.get(slot, {}).get(name, default)


@dataclasses.dataclass(frozen=True)
class Setup:
    graphdef: nnx.GraphDef
    frozen: nnx.State
    host_params: nnx.State  # numpy: every run starts from fresh buffers (the step donates)
    step: object
    vocab_size: int

    def fresh_state(self) -> TrainState:
        state = TrainState.create(jax.tree.map(jnp.array, self.host_params), OPTIMIZER)
        opt = state.opt
        for slot, values in HYPERPARAMS.items():
            opt = OPTIMIZER.set_hyperparams(opt, slot, **values)
        return state._replace(opt=opt)

    def run(self, state: TrainState, batch: UnifiedBatch):
        """One step: (new state, its host copy, host outputs)."""
        state, _, out = self.step(self.frozen, state, batch)
        return state, jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def setup(hf_models, peft_adapters) -> Setup:
    _, model = load_model(hf_models[ARCH].path)
    add_lora_tables(model, num_slots=LORA_NUM_SLOTS, max_rank=LORA_MAX_RANK)
    registry = AdapterRegistry(model)
    for name, adapter in peft_adapters[ARCH].items():
        assert registry.load(name, load_peft_adapter(adapter.path)) == SLOT[name]
    graphdef, frozen, params = split_model(model)
    host_params = jax.tree.map(np.array, params)
    step = make_unified_step(graphdef, OPTIMIZER)
    return Setup(graphdef, frozen, host_params, step, hf_models[ARCH].vocab_size)


def _train(setup, name, n, prompt, seed) -> TrainSequence:
    """n random tokens for adapter ``name``; the first ``prompt`` are not scored."""
    tokens = np.random.default_rng(seed).integers(0, setup.vocab_size, n, dtype=np.int32)
    return TrainSequence(SLOT[name], tokens, np.arange(n) >= prompt)


def _serve(setup, name, n, seed) -> ServeSequence:
    tokens = np.random.default_rng(seed).integers(0, setup.vocab_size, n, dtype=np.int32)
    return ServeSequence(-1 if name is None else SLOT[name], tokens)


def _batch(train, serve=(), accumulate=()) -> UnifiedBatch:
    return UnifiedBatch.pack(
        train,
        serve,
        num_train_rows=TRAIN_ROWS,
        num_serve_rows=SERVE_ROWS,
        num_segments=NUM_SEGMENTS,
        num_samples=NUM_SAMPLES,
        num_slots=LORA_NUM_SLOTS,
        accumulate=accumulate,
    )


TRAINED = (SLOT["all_rs"], SLOT["mlp"], SLOT["kou"])  # together they train every projection


def _mixed_train(setup) -> list[TrainSequence]:
    return [
        _train(setup, "all_rs", 9, 3, seed=10),
        _train(setup, "mlp", 7, 2, seed=11),
        _train(setup, "kou", 8, 0, seed=12),
    ]


def _mixed_serve(setup) -> list[ServeSequence]:
    """Requests for an adapter that is not training, the base alone, and an adapter that
    trains in the same batch."""
    return [_serve(setup, "qv", 6, 20), _serve(setup, None, 5, 21), _serve(setup, "all_rs", 7, 22)]


@pytest.fixture(scope="module")
def accumulated(setup):
    """The mixed batch stepped with every slot only accumulating: (batch, host states
    before and after, host outputs)."""
    batch = _batch(_mixed_train(setup), _mixed_serve(setup), accumulate=SLOTS)
    state = setup.fresh_state()
    before = jax.tree.map(np.asarray, state)
    _, after, out = setup.run(state, batch)
    return batch, before, after, out


@pytest.fixture(scope="module")
def applied(setup):
    """The mixed batch stepped with every slot applying: (host state after, outputs)."""
    _, after, out = setup.run(setup.fresh_state(), _batch(_mixed_train(setup), _mixed_serve(setup)))
    return after, out


# --- references and comparisons --------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _alone_loss_and_grads(graphdef, frozen, params, tokens, positions, segment_ids, lora, mask):
    """Mean next-token cross-entropy over ``mask`` of one sequence through the plain model
    forward, and its gradient w.r.t. the adapter tables."""

    def loss(params):
        logits = nnx.merge(graphdef, params, frozen)(tokens, positions, segment_ids, lora)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[1:])
        return jnp.sum(jnp.where(mask[1:], ce, 0.0)) / jnp.sum(mask[1:])

    return jax.value_and_grad(loss)(params)


def _alone(setup, params, seq: TrainSequence) -> tuple[float, nnx.State]:
    """(loss, gradient w.r.t. every table) of ``seq``'s adapter trained on it alone."""
    n = len(seq.tokens)
    mask = np.zeros(ALONE_ROWS, bool)
    mask[:n] = seq.loss_mask
    loss, grads = _alone_loss_and_grads(
        setup.graphdef,
        setup.frozen,
        params,
        *pack([seq.tokens], [0], ALONE_ROWS),
        LoraBatch.pack([n], [seq.slot], num_segments=1),
        mask,
    )
    return float(loss), grads


def _peft(peft_model, seq: TrainSequence) -> tuple[float, dict]:
    """The same loss in PyTorch, and its gradient {(layer, proj): (dA [d_in, r], dB [r,
    d_out])} in our layout."""
    tokens = torch.as_tensor(seq.tokens, dtype=torch.long)
    logits = peft_model(input_ids=tokens[None], position_ids=torch.arange(len(tokens))[None])
    ce = torch.nn.functional.cross_entropy(logits.logits[0, :-1], tokens[1:], reduction="none")
    mask = torch.as_tensor(seq.loss_mask[1:], dtype=torch.float32)
    loss = (ce * mask).sum() / mask.sum()
    loss.backward()
    grads = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:  # ...layers.{i}.{parent}.{proj}.lora_{A|B}.default.weight
            *_, layer, _, proj, matrix, _, _ = name.split(".")
            grads.setdefault((int(layer), proj), {})[matrix] = param.grad.numpy().T
    peft_model.zero_grad(set_to_none=True)
    return loss.item(), {key: (g["lora_A"], g["lora_B"]) for key, g in grads.items()}


def _slot_tree(tree, slot: int):
    """``tree`` with every leaf cut to its row ``slot`` (numpy)."""
    return jax.tree.map(lambda x: np.asarray(x)[slot], tree)


def _grad_sums(state: TrainState) -> nnx.State:
    """The optimizer's gradient sums, one leaf per table (it holds them stacked)."""
    return OPTIMIZER.unstacked(state.opt.grad_sum, state.params)


def _tables(tree: nnx.State) -> dict:
    """{(layer, proj): (a, b)} of a state shaped like the LoraParam tables."""
    out = {}
    for path, value in nnx.to_flat_state(tree):
        *_, layer, _, proj, _, matrix = path  # layers, i, self_attn|mlp, proj, adapters, a|b
        out.setdefault((layer, proj), {})[matrix] = np.asarray(value[...])
    return {key: (m["a"], m["b"]) for key, m in out.items()}


def _assert_tables_close(
    ours: dict, ref: dict, what: str, rank: int | None = None, tol: float = TOL
):
    """Every table of ``ref`` matches ours (cut to ``rank``); zero where ref is zero."""
    for key, (ref_a, ref_b) in ref.items():
        a, b = ours[key]
        if rank is not None:
            a, b = a[:, :rank], b[:rank]
        for x, y in ((a, ref_a), (b, ref_b)):
            if not y.any():
                assert not x.any(), f"{what} {key}: nonzero where the reference is zero"
                continue
            err = rel_err(x, y)
            assert err < tol, f"{what} {key}: rel err {err:.2e}"


def _assert_moved_alike(new, ref_new, old, what: str, tol: float = TOL):
    """One slot's tables moved from ``old`` to ``new`` as they did to ``ref_new``."""
    delta, ref_delta = (_tables(jax.tree.map(np.subtract, t, old)) for t in (new, ref_new))
    _assert_tables_close(delta, ref_delta, what, tol=tol)


def _slot_bits_equal(a, b, slot: int) -> bool:
    """Whether row ``slot`` of every leaf of the pytrees ``a`` and ``b`` has the same bits."""
    return all(
        np.asarray(x)[slot].tobytes() == np.asarray(y)[slot].tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _assert_slot_bits_equal(a: TrainState, b: TrainState, slot: int):
    """Params and every optimizer state leaf of ``slot`` are bit-identical."""
    assert _slot_bits_equal(a.params, b.params, slot), f"slot {slot} params"
    assert _slot_bits_equal(a.opt, b.opt, slot), f"slot {slot} optimizer state"


# --- the mixed step --------------------------------------------------------------------


def test_mixed_step_gradients_match_each_adapter_alone_and_peft(setup, accumulated, peft_adapters):
    """The mean gradient each slot accumulates from one mixed step (3 adapters training,
    3 requests serving) is ``jax.grad`` of that adapter's loss alone, and PEFT's."""
    _, before, after, out = accumulated
    assert not out.updated.any() and not out.nonfinite.any()
    params = jax.tree.map(jnp.asarray, before.params)
    for seq in _mixed_train(setup):
        slot, name = seq.slot, NAME[seq.slot]
        count = int(seq.loss_mask[1:].sum())
        assert out.num_tokens[slot] == after.opt.num_tokens[slot] == count
        grads = {
            key: (a / count, b / count)
            for key, (a, b) in _tables(_slot_tree(_grad_sums(after), slot)).items()
        }

        loss, alone = _alone(setup, params, seq)
        assert abs(out.loss[slot] - loss) < TOL * loss
        _assert_tables_close(grads, _tables(_slot_tree(alone, slot)), f"{name} vs alone")

        peft_loss, peft_grads = _peft(peft_adapters[ARCH][name].torch_model, seq)
        assert abs(out.loss[slot] - peft_loss) < TOL * peft_loss
        rank, _, targets, _ = PEFT_ADAPTERS[name]
        assert {proj for _, proj in peft_grads} == set(targets)
        _assert_tables_close(grads, peft_grads, f"{name} vs PEFT", rank)
        for (_, proj), (a, b) in grads.items():  # padded ranks and other projections: zero
            assert not a[:, rank:].any() and not b[rank:].any()
            assert (a.any() and b.any()) == (proj in targets), (name, proj)
    for slot in set(SLOTS) - set(TRAINED):
        assert out.num_tokens[slot] == 0
        assert _slot_bits_equal(after.opt.grad_sum, before.opt.grad_sum, slot)


def test_serving_logits_match_a_serving_only_forward(setup, accumulated, lora_forward):
    batch, before, _, out = accumulated
    serve = _mixed_serve(setup)
    lengths = [len(s.tokens) for s in serve]
    model = nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, before.params), setup.frozen)
    logits = lora_forward(
        model,
        *pack([s.tokens for s in serve], [0] * len(serve)),
        LoraBatch.pack(lengths, [s.slot for s in serve], NUM_SEGMENTS),
    )
    last_rows = np.cumsum(lengths) - 1
    assert np.asarray(batch.sample_rows)[: len(serve)].tolist() == [
        TRAIN_ROWS + row for row in last_rows
    ]
    ref = np.asarray(logits)[last_rows]
    err = rel_err(out.next_logits[: len(serve)], ref)
    assert err < 1e-5, f"rel err {err:.2e}"
    np.testing.assert_array_equal(out.next_tokens[: len(serve)], ref.argmax(-1))


def test_untouched_slots_stay_bit_identical(setup, applied):
    """Over two applied steps, a slot that does not train keeps the bits of its params and
    of every optimizer state leaf (moments, step counts, hyperparameters, accumulators)."""
    first, out = applied
    fresh = jax.tree.map(np.asarray, setup.fresh_state())
    assert out.updated.tolist() == [s in TRAINED for s in SLOTS]
    for slot in SLOTS:
        if slot in TRAINED:
            assert first.opt.inner.count[slot] == 1
            assert not _slot_bits_equal(first.params, fresh.params, slot)
        else:
            _assert_slot_bits_equal(first, fresh, slot)

    qv = SLOT["qv"]
    batch = _batch([_train(setup, "qv", 10, 4, seed=30)], [_serve(setup, "kou", 9, seed=31)])
    _, second, out = setup.run(jax.tree.map(jnp.asarray, first), batch)
    assert out.updated.tolist() == [s == qv for s in SLOTS]
    assert second.opt.inner.count[qv] == 1
    for slot in set(SLOTS) - {qv}:
        _assert_slot_bits_equal(second, first, slot)


def test_halted_slots_stay_bit_identical(setup):
    """A halted slot (``UnifiedBatch.halt``, or an earlier step's non-finite slots through
    ``halting``) keeps every bit of its params and optimizer state, though it has rows
    and would apply; the other slots train as in the same batch without the halt."""
    all_rs, mlp = SLOT["all_rs"], SLOT["mlp"]
    train = _mixed_train(setup)
    _, plain, plain_out = setup.run(setup.fresh_state(), _batch(train))
    fresh = jax.tree.map(np.asarray, setup.fresh_state())
    halted = dataclasses.replace(_batch(train), halt=jnp.asarray(np.isin(SLOTS, [all_rs])))
    earlier_nonfinite = jnp.asarray(np.isin(SLOTS, [mlp]))
    _, state, out = setup.run(setup.fresh_state(), halted.halting(earlier_nonfinite))
    assert out.updated.tolist() == [s in TRAINED and s not in (all_rs, mlp) for s in SLOTS]
    assert not out.nonfinite.any()
    for slot in SLOTS:
        if slot in (all_rs, mlp):
            _assert_slot_bits_equal(state, fresh, slot)
        else:
            _assert_slot_bits_equal(state, plain, slot)
    np.testing.assert_array_equal(out.loss, plain_out.loss)  # still computed and reported


def _by_hand(slot: int) -> optax.GradientTransformation:
    """What ``OPTIMIZER`` does to ``slot``, from plain optax."""
    return optax.chain(
        optax.clip_by_global_norm(_hyperparam(slot, "max_grad_norm")),
        optax.adamw(_hyperparam(slot, "learning_rate"), weight_decay=WEIGHT_DECAY),
    )


def test_applied_updates_equal_optax_adamw_by_hand(setup, accumulated):
    """Applying the accumulated mean gradients gives each slot what clipping plus
    ``optax.adamw`` with that slot's own hyperparameters gives it alone; a slot's second
    update uses its own step count for bias correction."""
    _, before, after, _ = accumulated
    serve_only = _batch([], _mixed_serve(setup))
    state, first, out = setup.run(jax.tree.map(jnp.asarray, after), serve_only)
    assert out.updated.tolist() == [s in TRAINED for s in SLOTS]
    assert not first.opt.num_tokens.any()
    by_hand = {}
    for slot in TRAINED:
        params = _slot_tree(before.params, slot)
        count = after.opt.num_tokens[slot]
        grads = jax.tree.map(lambda g, n=count: g / n, _slot_tree(_grad_sums(after), slot))
        norm = float(optax.global_norm(grads))
        assert abs(out.grad_norm[slot] - norm) < TOL * norm
        assert (norm > _hyperparam(slot, "max_grad_norm")) == (slot == SLOT["mlp"])  # clips
        tx = _by_hand(slot)
        updates, opt_state = tx.update(grads, tx.init(params), params)
        by_hand[slot] = tx, opt_state, optax.apply_updates(params, updates)
        _assert_moved_alike(_slot_tree(first.params, slot), by_hand[slot][2], params, "1st")

    all_rs = SLOT["all_rs"]
    seq = _train(setup, "all_rs", 11, 4, seed=40)
    _, second, out = setup.run(state, _batch([seq]))
    assert out.updated.tolist() == [s == all_rs for s in SLOTS]
    assert second.opt.inner.count.tolist() == [(s in TRAINED) + (s == all_rs) for s in SLOTS]
    _, grads = _alone(setup, jax.tree.map(jnp.asarray, first.params), seq)
    tx, opt_state, params = by_hand[all_rs]
    updates, _ = tx.update(_slot_tree(grads, all_rs), opt_state, params)
    ref = optax.apply_updates(params, updates)
    # Adam divides each moment by its own RMS, so entries whose gradients are near zero
    # turn float32 rounding differences (a differently compiled reference gradient) into
    # visible update differences: a looser bound than for the raw gradients.
    _assert_moved_alike(_slot_tree(second.params, all_rs), ref, params, "2nd", tol=3 * TOL)


def test_nonfinite_slot_is_skipped_and_reported(setup, applied):
    """A target outside the vocabulary makes mlp's loss NaN: mlp is skipped, reported and
    keeps its bits; every other slot and the serving outputs come out exactly as in the
    same step without the bad target."""
    clean, clean_out = applied
    batch = _batch(_mixed_train(setup), _mixed_serve(setup))
    row = 9 + 4  # a scored row of mlp's sequence, rows 9..15
    assert batch.loss_mask[row]
    targets = np.array(batch.targets)
    targets[row] = setup.vocab_size
    batch = dataclasses.replace(batch, targets=jnp.asarray(targets))
    _, poisoned, out = setup.run(setup.fresh_state(), batch)

    mlp = SLOT["mlp"]
    assert out.nonfinite.tolist() == [s == mlp for s in SLOTS]
    assert out.updated.tolist() == [s in TRAINED and s != mlp for s in SLOTS]
    assert np.isnan(out.loss[mlp]) and np.isfinite(np.delete(out.loss, mlp)).all()
    _assert_slot_bits_equal(poisoned, jax.tree.map(np.asarray, setup.fresh_state()), mlp)
    for slot in set(SLOTS) - {mlp}:
        _assert_slot_bits_equal(poisoned, clean, slot)
    np.testing.assert_array_equal(out.next_logits, clean_out.next_logits)


def test_nonfinite_weights_stay_in_their_slot(setup, applied):
    """NaN adapter weights in mlp's slot make mlp's loss NaN (skipped and reported); no NaN
    crosses into the other sequences of the packed batch: every other slot and the serving
    outputs come out exactly as in the clean step."""
    clean, clean_out = applied
    mlp = SLOT["mlp"]
    state = setup.fresh_state()
    state = state._replace(params=jax.tree.map(lambda w: w.at[mlp].set(jnp.nan), state.params))
    _, poisoned, out = setup.run(state, _batch(_mixed_train(setup), _mixed_serve(setup)))

    assert out.nonfinite.tolist() == [s == mlp for s in SLOTS]
    assert out.updated.tolist() == [s in TRAINED and s != mlp for s in SLOTS]
    for slot in set(SLOTS) - {mlp}:
        _assert_slot_bits_equal(poisoned, clean, slot)
    np.testing.assert_array_equal(out.next_logits, clean_out.next_logits)


def test_accumulation_equals_one_step_on_the_union_batch(setup):
    """mlp accumulates two micro-batches with different token counts (kou applies in the
    first); the update equals one step on their union, whose loss is the mean over all
    of mlp's loss tokens (not the mean of the two micro-batch means)."""
    mlp, kou = SLOT["mlp"], SLOT["kou"]
    x, y = _train(setup, "mlp", 12, 5, seed=50), _train(setup, "mlp", 6, 1, seed=51)
    first = _batch([x, _train(setup, "kou", 9, 0, seed=52)], accumulate=[mlp])
    state, _, out = setup.run(setup.fresh_state(), first)
    assert out.updated.tolist() == [s == kou for s in SLOTS]
    _, micro, out = setup.run(state, _batch([y], _mixed_serve(setup)))
    assert out.updated[mlp] and out.num_tokens[mlp] == 5
    _, union, out = setup.run(setup.fresh_state(), _batch([x, y]))
    assert out.num_tokens[mlp] == 7 + 5

    old = _slot_tree(setup.host_params, mlp)
    _assert_moved_alike(_slot_tree(micro.params, mlp), _slot_tree(union.params, mlp), old, "")
    for ours, ref in zip(
        jax.tree.leaves(_slot_tree(micro.opt.inner, mlp)),
        jax.tree.leaves(_slot_tree(union.opt.inner, mlp)),
        strict=True,
    ):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-12)


def test_one_compile_for_every_layout(setup):
    """Sequence counts, lengths and slots, and empty training or serving parts, are data."""
    layouts = [
        ([], []),
        ([_train(setup, "qv", TRAIN_ROWS, 0, seed=60)], []),
        ([], [_serve(setup, "mlp", SERVE_ROWS, seed=61)]),
        (
            [_train(setup, name, 5, 1, seed=62 + i) for i, name in enumerate(PEFT_ADAPTERS)],
            [_serve(setup, None, 1, seed=70), _serve(setup, "qv", 2, seed=71)],
        ),
    ]
    for train, serve in layouts:
        setup.run(setup.fresh_state(), _batch(train, serve))
    assert setup.step._cache_size() == 1


# --- backward pruning ------------------------------------------------------------------


def _dots_on_serving_rows(jaxpr: jax_core.Jaxpr) -> int:
    """Matmuls (outside Pallas kernels) with an operand dimension of all rows or of the
    serving rows, in ``jaxpr`` and every jaxpr nested in it."""
    return sum(
        bool(
            {d for var in eqn.invars for d in var.aval.shape}
            & {TRAIN_ROWS + SERVE_ROWS, SERVE_ROWS}
        )
        for eqn in equations(jaxpr)
        if eqn.primitive.name == "dot_general"
    )


def _unpruned_split_rows(fn, params, x_train, x_serve, rows=(), consts=(), state=None):
    """What plain autodiff would do: stop the serving rows and slice."""
    n = x_train.shape[0]
    x = jnp.concatenate([x_train, jax.lax.stop_gradient(x_serve)])
    y, state = fn(params, x, rows, consts, state, n)
    return y[:n], jax.lax.stop_gradient(y[n:]), state


def test_recompute_backward_never_touches_serving_rows(setup, monkeypatch):
    """With the "recompute" backward, differentiating the step adds no matmul over
    serving rows to the forward's, and saves no serving-row residual; stopping the
    serving rows' gradient alone would do both (which shows that the checks can see
    them)."""
    batch = _batch(_mixed_train(setup), _mixed_serve(setup))
    params = jax.tree.map(jnp.asarray, setup.host_params)

    def loss(params):
        return slot_losses(setup.graphdef, setup.frozen, params, batch, backward="recompute")[0]

    def serving_work():
        forward = _dots_on_serving_rows(jax.make_jaxpr(loss)(params).jaxpr)
        backward = _dots_on_serving_rows(jax.make_jaxpr(jax.grad(loss))(params).jaxpr) - forward
        residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
        serving_residuals = sum(
            r.shape[:1] in ((TRAIN_ROWS + SERVE_ROWS,), (SERVE_ROWS,))
            for r in jax.tree.leaves(residuals)
        )
        return forward, backward, serving_residuals

    forward, backward, residuals = serving_work()
    assert forward >= 9 * len(setup.host_params["layers"])  # 7 projections, 2 attention
    assert (backward, residuals) == (0, 0)
    monkeypatch.setattr(split_forward_module, "split_rows", _unpruned_split_rows)
    _, backward, residuals = serving_work()
    assert backward > 0 and residuals > 0


def _tanh_layer(w, x, rows, consts, state, num_train_rows):
    return jnp.tanh(x @ w), state


def test_recompute_backward_waits_for_the_layer_above():
    """Each layer's backward recomputation depends on the cotangent from the layer above,
    so XLA cannot schedule every layer's recomputation early and hold all their
    activations at once (the 4-adapter step's temporaries were 16.2 GiB so, 3.6 after)."""
    w_low, w_high = jnp.full((3, 3), 0.1), jnp.full((3, 3), 0.2)

    def loss(w_low, w_high, x):
        x_train, x_serve = x[:4], x[4:]
        for w in (w_low, w_high):
            x_train, x_serve, _ = split_forward_module.split_rows(_tanh_layer, w, x_train, x_serve)
        return jnp.sum(x_train**2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(w_low, w_high, jnp.ones((6, 3))).jaxpr
    low, high = jaxpr.invars[:2]
    ancestors: dict = {}
    dots_on = {low: [], high: []}
    for eqn in jaxpr.eqns:
        inputs = {v for v in eqn.invars if isinstance(v, jax_core.Var)}
        reach = set().union(inputs, *(ancestors.get(v, set()) for v in inputs))
        for out in eqn.outvars:
            ancestors[out] = reach | {eqn}
        if eqn.primitive.name == "dot_general":
            for w in inputs & dots_on.keys():
                dots_on[w].append(eqn)
    assert dots_on[low] and dots_on[high]
    for low_dot in dots_on[low]:
        assert all(high_dot in ancestors[low_dot.outvars[0]] for high_dot in dots_on[high])


def test_saved_layers_are_not_recomputed(setup):
    """Each layer saved under the "recompute" backward takes one layer's recomputation
    (its matmuls over the training rows) out of the backward and adds its activations
    to what the forward saves."""
    batch = _batch(_mixed_train(setup), _mixed_serve(setup))
    params = jax.tree.map(jnp.asarray, setup.host_params)

    def cost(saved_layers):
        def loss(params):
            return slot_losses(
                setup.graphdef,
                setup.frozen,
                params,
                batch,
                backward="recompute",
                saved_layers=saved_layers,
            )[0]

        training_dots = sum(
            TRAIN_ROWS in {d for var in eqn.invars for d in var.aval.shape}
            for eqn in equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
            if eqn.primitive.name == "dot_general"
        )
        residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
        return training_dots, sum(r.size for r in jax.tree.leaves(residuals))

    (dots_0, saved_0), (dots_1, saved_1), (dots_2, saved_2) = map(cost, range(3))
    # At least the 7 projections a layer; more for the first layer, whose input gradient
    # only the recomputing backward computes.
    assert dots_0 - 7 >= dots_1 >= dots_2 + 7
    assert saved_0 < saved_1 < saved_2


def test_all_serving_logits(setup, accumulated, lora_forward):
    """A step made with ``all_serving_logits`` also returns every serving row's logits."""
    batch, before, _, out = accumulated
    step = make_unified_step(setup.graphdef, OPTIMIZER, all_serving_logits=True)
    _, _, all_out = step(setup.frozen, jax.tree.map(jnp.asarray, before), batch)
    serve = _mixed_serve(setup)
    lengths = [len(s.tokens) for s in serve]
    model = nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, before.params), setup.frozen)
    ref = lora_forward(
        model,
        *pack([s.tokens for s in serve], [0] * len(serve)),
        LoraBatch.pack(lengths, [s.slot for s in serve], NUM_SEGMENTS),
    )
    rows = sum(lengths)
    assert all_out.serving_logits.shape == (SERVE_ROWS, setup.vocab_size)
    assert rel_err(all_out.serving_logits[:rows], np.asarray(ref)[:rows]) < 1e-5
    np.testing.assert_allclose(all_out.next_logits, out.next_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(all_out.loss, out.loss)


# --- packing -----------------------------------------------------------------------------


def _pack(train, serve, **overrides) -> UnifiedBatch:
    sizes = dict(num_train_rows=6, num_serve_rows=4, num_segments=6, num_samples=3, num_slots=3)
    return UnifiedBatch.pack(train, serve, **{**sizes, **overrides})


def test_pack_layout():
    train = [
        TrainSequence(2, np.array([5, 6, 7]), np.array([False, True, True])),
        TrainSequence(0, np.array([8, 9])),
    ]
    serve = [ServeSequence(-1, np.array([1, 2])), ServeSequence(1, np.array([3]))]
    batch = _pack(train, serve, accumulate=[0])
    expected = dict(
        tokens=[5, 6, 7, 8, 9, 0, 1, 2, 3, 0],
        positions=[0, 1, 2, 0, 1, 0, 0, 1, 0, 0],
        segment_ids=[0, 0, 0, 1, 1, -1, 2, 2, 3, -1],
        targets=[6, 7, 0, 9, 0, 0],
        loss_mask=[True, True, False, True, False, False],
        sample_rows=[7, 8, 6],
        apply=[False, True, True],
    )
    for field, value in expected.items():
        assert np.asarray(getattr(batch, field)).tolist() == value, field
    # The training padding and the base-model serving rows after it: one segment.
    assert np.asarray(batch.lora.seg_ends).tolist() == [3, 5, 8, 9, 9, 9]
    assert np.asarray(batch.lora.seg_slots).tolist() == [2, 0, -1, 1, -1, -1]
    assert batch.lora.grad_rows == 5 and batch.num_train_rows == 6


@pytest.mark.parametrize(
    "train, serve, overrides, match",
    [
        ([TrainSequence(0, np.arange(7))], [], {}, "7 training tokens exceed the capacity 6"),
        ([], [ServeSequence(0, np.arange(5))], {}, "5 serving tokens exceed the capacity 4"),
        ([TrainSequence(3, np.arange(2))], [], {}, r"training slot 3 is outside \[0, 3\)"),
        ([TrainSequence(-1, np.arange(2))], [], {}, "training slot -1"),
        ([], [ServeSequence(-2, np.arange(2))], {}, r"serving slot -2 is outside \[-1, 3\)"),
        ([TrainSequence(0, np.arange(2), np.ones(3, bool))], [], {}, "3 mask entries for 2"),
        ([], [ServeSequence(0, np.arange(0))], {}, "at least one token"),
        ([], [ServeSequence(0, np.arange(1))] * 2, dict(num_samples=1), "2 serving requests"),
        ([], [], dict(num_serve_rows=0), "num_samples > 0 needs serving rows"),
        (
            [TrainSequence(0, np.arange(1))] * 5,
            [],
            dict(num_segments=5),
            "need 6 segments .* num_segments=5",
        ),
    ],
)
def test_pack_rejects(train, serve, overrides, match):
    with pytest.raises(ValueError, match=match):
        _pack(train, serve, **overrides)


# --- serving rows over the paged KV cache -------------------------------------------------

CACHE = EngineConfig(
    token_capacity=SERVE_ROWS, max_seqs=NUM_SAMPLES, page_size=4, num_pages=24, max_seq_len=16
)
MAX_TRAIN_SEQS = 4


def _cached(setup, train, scheduler, accumulate=()) -> UnifiedBatch:
    chunks = scheduler.schedule()
    slots = [-1 if c.seq.adapter is None else SLOT[c.seq.adapter] for c in chunks]
    rows = ServeRows.pack(chunks, slots, CACHE, setup.vocab_size)
    batch = UnifiedBatch.pack_cached(
        train,
        rows,
        num_train_rows=TRAIN_ROWS,
        max_train_seqs=MAX_TRAIN_SEQS,
        num_slots=LORA_NUM_SLOTS,
        accumulate=accumulate,
    )
    return batch, chunks


@pytest.mark.parametrize(
    ("backward", "saved_layers"), [("save", 0), ("recompute", 0), ("recompute", 1)]
)
def test_cached_serving_rows_serve_and_train_like_recomputed_ones(
    setup, accumulated, lora_forward, backward, saved_layers
):
    """The mixed batch with its requests prefilled into a paged KV cache gives the same
    losses, gradients and next tokens as with the requests recomputed whole (under the
    "save" backward); a decode step over the cache then gives the logits of a plain
    forward over prompt and token. So does every backward strategy: all layers saved,
    all recomputed, and the last layer saved, the first recomputed."""
    _, before, after, out = accumulated
    model = nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, before.params), setup.frozen)
    cache = init_kv_cache(model.config, CACHE.num_pages, CACHE.page_size, jnp.float32)
    scheduler = Scheduler(CACHE)
    serve = _mixed_serve(setup)
    for i, seq in enumerate(serve):
        adapter = None if seq.slot < 0 else NAME[seq.slot]
        tokens = list(seq.tokens)
        scheduler.add(SequenceState(i, tokens, len(tokens), adapter, GREEDY_PARAMS, 0))
    assert len(model.layers) == 2  # so saved_layers=1 mixes the two kinds of layer
    step = make_unified_step(
        setup.graphdef, OPTIMIZER, backward=backward, saved_layers=saved_layers
    )

    batch, chunks = _cached(setup, _mixed_train(setup), scheduler, accumulate=SLOTS)
    assert [c.length for c in chunks] == [len(s.tokens) for s in serve]  # whole prompts
    state, cache, prefill = step(setup.frozen, setup.fresh_state(), batch, cache)
    prefill, grad_sum = jax.tree.map(np.asarray, (prefill, state.opt.grad_sum))
    np.testing.assert_allclose(prefill.loss, out.loss, rtol=1e-5)
    np.testing.assert_array_equal(prefill.num_tokens, out.num_tokens)
    for got, want in zip(
        jax.tree.leaves(grad_sum), jax.tree.leaves(after.opt.grad_sum), strict=True
    ):
        assert rel_err(got, want) < TOL if np.any(want) else not np.any(got)
    n = len(serve)
    assert rel_err(prefill.next_logits[:n], out.next_logits[:n]) < 1e-5
    np.testing.assert_array_equal(prefill.next_tokens[:n], out.next_tokens[:n])

    for chunk, token in zip(chunks, prefill.next_tokens, strict=False):
        chunk.seq.num_computed = chunk.stop
        chunk.seq.token_ids.append(int(token))
    batch, chunks = _cached(setup, [], scheduler)
    assert [c.length for c in chunks] == [1] * n  # decode rows
    _, _, decode = step(setup.frozen, state, batch, cache)
    whole = [np.asarray(c.seq.token_ids, np.int32) for c in chunks]
    lengths = [len(w) for w in whole]
    ref = lora_forward(
        model,
        *pack(whole, [0] * n),
        LoraBatch.pack(lengths, [s.slot for s in serve], NUM_SEGMENTS),
    )
    ref = np.asarray(ref)[np.cumsum(lengths) - 1]
    assert rel_err(np.asarray(decode.next_logits)[:n], ref) < 1e-5


def test_bad_backward_strategies_are_refused(setup):
    """An unknown strategy, or saved layers without "recompute", fail when the step is
    made; more saved layers than the model has, when it is traced."""
    with pytest.raises(ValueError, match="backward must be"):
        make_unified_step(setup.graphdef, OPTIMIZER, backward="checkpoint")
    with pytest.raises(ValueError, match="saved_layers=1: .* only with the 'recompute'"):
        make_unified_step(setup.graphdef, OPTIMIZER, saved_layers=1)
    with pytest.raises(ValueError, match="saved_layers=-1"):
        make_unified_step(setup.graphdef, OPTIMIZER, backward="recompute", saved_layers=-1)
    params = jax.tree.map(jnp.asarray, setup.host_params)
    batch = _batch(_mixed_train(setup))
    with pytest.raises(ValueError, match=r"saved_layers must be in \[0, 2\], got 3"):
        jax.eval_shape(
            lambda p: slot_losses(
                setup.graphdef, setup.frozen, p, batch, backward="recompute", saved_layers=3
            ),
            params,
        )


def test_a_sampled_step_never_waits_on_the_host(setup):
    """Every sampler stage on (penalty, top-k/top-p, the draw), the unified step over
    cached serving rows has no device-side conditional (see ``jaxpr_walk.host_synced``)."""
    model = nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, setup.host_params), setup.frozen)
    cache = init_kv_cache(model.config, CACHE.num_pages, CACHE.page_size, jnp.float32)
    scheduler = Scheduler(CACHE)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2)
    scheduler.add(SequenceState(0, [1, 2, 3], 3, None, params, 0))
    chunks = scheduler.schedule()
    rows = ServeRows.pack(chunks, [-1], CACHE, setup.vocab_size)
    assert rows.sampling.stages == SamplingStages(penalize=True, truncate=True, draw=True)
    batch = UnifiedBatch.pack_cached(
        [_train(setup, "qv", 5, 1, seed=80)],
        rows,
        num_train_rows=TRAIN_ROWS,
        max_train_seqs=MAX_TRAIN_SEQS,
        num_slots=LORA_NUM_SLOTS,
    )
    jaxpr = jax.make_jaxpr(setup.step)(setup.frozen, setup.fresh_state(), batch, cache)
    assert host_synced(jaxpr.jaxpr) == []
