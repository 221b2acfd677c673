"""SlotOptimizer on small synthetic tables: any optax transformation runs per slot with
its own step count, non-finite micro-batches are dropped and updates that would make
weights non-finite refused, for their slot only, and per-slot hyperparameters (checked
before anything is written) and slot resets touch one slot."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from loqjax.optim import SlotOptimizer, adamw, slot_norms

NUM_SLOTS = 3


def _tables(seed: int) -> dict:
    """Two tables with the slot axis first, like the LoraParam state."""
    ka, kb = jax.random.split(jax.random.key(seed))
    return {
        "a": jax.random.normal(ka, (NUM_SLOTS, 4, 2)),
        "b": jax.random.normal(kb, (NUM_SLOTS, 2, 5)),
    }


def _slot(tree, slot: int):
    return jax.tree.map(lambda x: x[slot], tree)


def _bits(tree, slot: int) -> list[bytes]:
    return [np.asarray(leaf)[slot].tobytes() for leaf in jax.tree.leaves(tree)]


def test_slot_norms():
    tables = _tables(0)
    for slot in range(NUM_SLOTS):
        want = optax.global_norm(_slot(tables, slot))
        np.testing.assert_allclose(slot_norms(tables)[slot], want, rtol=1e-6)


def test_plain_optax_transformation_steps_each_slot_on_its_own_count():
    """optax.adam, not built for slots: slot 0 steps twice, slot 1 once (accumulating two
    micro-batches), slot 2 never; each matches optax.adam run on that slot alone."""
    tx = optax.adam(1e-2)
    opt = SlotOptimizer(tx)
    update = jax.jit(opt.update)
    params = _tables(0)
    state = opt.init(params)
    g1, g2 = _tables(1), _tables(2)
    losses = jnp.ones(NUM_SLOTS)
    p, state, out = update(
        params, state, g1, losses, jnp.array([2, 3, 0]), jnp.array([True, False, True])
    )
    assert out.updated.tolist() == [True, False, False]
    p, state, out = update(p, state, g2, losses, jnp.array([4, 1, 0]), jnp.ones(3, bool))
    assert out.updated.tolist() == [True, True, False]
    assert state.inner[0].count.tolist() == [2, 1, 0]
    assert not state.num_tokens.any()

    def by_hand(slot, grads):
        p, s = _slot(params, slot), tx.init(_slot(params, slot))
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    expected = [
        by_hand(0, [jax.tree.map(lambda g: g[0] / 2, g1), jax.tree.map(lambda g: g[0] / 4, g2)]),
        by_hand(1, [jax.tree.map(lambda a, b: (a[1] + b[1]) / (3 + 1), g1, g2)]),
        _slot(params, 2),
    ]
    for slot, want in enumerate(expected):
        for ours, ref in zip(jax.tree.leaves(_slot(p, slot)), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_nonfinite_micro_batch_is_dropped_for_its_slot_only():
    """Slot 1's gradient has a NaN, slot 2's loss is infinite: both are reported and
    keep their bits; slot 0 updates. A slot with earlier good micro-batches still
    applies those."""
    opt = SlotOptimizer()
    update = jax.jit(opt.update)
    params = _tables(0)
    state = opt.init(params)
    grads = _tables(1)
    grads["b"] = grads["b"].at[1, 0, 0].set(jnp.nan)
    losses = jnp.array([1.0, 1.0, jnp.inf])
    tokens, apply = jnp.array([2, 2, 2]), jnp.ones(NUM_SLOTS, bool)
    new, new_state, out = update(params, state, grads, losses, tokens, apply)
    assert out.nonfinite.tolist() == [False, True, True]
    assert out.updated.tolist() == [True, False, False]
    for slot in (1, 2):
        assert _bits(new, slot) == _bits(params, slot)
        assert _bits(new_state, slot) == _bits(state, slot)
    assert _bits(new, 0) != _bits(params, 0)

    # Slot 1 accumulates a good micro-batch, then gets a NaN one with apply: it applies
    # the good one alone.
    good = _tables(2)
    _, acc, _ = update(params, opt.init(params), good, jnp.ones(3), tokens, jnp.zeros(3, bool))
    mixed, _, out = update(params, acc, grads, losses, tokens, apply)
    nothing = jax.tree.map(jnp.zeros_like, good)
    clean, _, _ = update(params, acc, nothing, jnp.zeros(3), jnp.zeros(3, jnp.int32), apply)
    assert out.nonfinite[1] and out.updated[1]
    assert _bits(mixed, 1) == _bits(clean, 1)


def test_update_that_would_make_weights_non_finite_is_refused():
    """Finite gradients, but slot 1's learning rate overflows its weights at its second
    update (Adam steps by ~lr: 2e38 twice) and slot 2's first moment holds a NaN (a
    corrupted state): those updates are refused and reported, the slots keeping params
    and whole state bit-identical (the micro-batch not accumulated); slot 0 updates as it
    would alone. bf16 tables whose float32 master stays finite but rounds to inf are
    refused the same way."""
    opt = SlotOptimizer(adamw(1e-2, max_grad_norm=np.inf))
    update = jax.jit(opt.update)
    params, grads = _tables(0), _tables(1)
    tokens, apply = jnp.array([2, 2, 2]), jnp.ones(NUM_SLOTS, bool)
    state = opt.set_hyperparams(opt.init(params), 1, learning_rate=2e38)
    params, state, out = update(params, state, grads, jnp.ones(3), tokens, apply)
    assert out.updated.all() and not out.nonfinite.any()  # slot 1 at ~2e38: finite

    adam = state.inner.inner_state[1][0]  # adamw's ScaleByAdamState
    mu = {**adam.mu, "a": adam.mu["a"].at[2, 0, 0].set(jnp.nan)}
    chain = (adam._replace(mu=mu), *state.inner.inner_state[1][1:])
    state = state._replace(
        inner=state.inner._replace(inner_state=(state.inner.inner_state[0], chain))
    )
    new, new_state, out = update(params, state, grads, jnp.ones(3), tokens, apply)
    assert out.nonfinite.tolist() == [False, True, True]
    assert out.updated.tolist() == [True, False, False]
    for slot in (1, 2):
        assert _bits(new, slot) == _bits(params, slot)
        assert _bits(new_state, slot) == _bits(state, slot)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(new))
    alone, _, _ = update(params, state, grads, jnp.ones(3), tokens, apply.at[1:].set(False))
    assert _bits(new, 0) == _bits(alone, 0)

    # A micro-batch accumulated (not applied) is kept; the refused update drops only its
    # own micro-batch, so the slot's gradient sum is what it was before.
    _, acc, _ = update(params, state, grads, jnp.ones(3), tokens, jnp.zeros(3, bool))
    _, after, out = update(params, acc, grads, jnp.ones(3), tokens, apply)
    assert out.nonfinite.tolist() == [False, True, True]
    assert _bits(after, 1) == _bits(acc, 1) and _bits(after, 2) == _bits(acc, 2)

    bf16 = {"w": jnp.ones((NUM_SLOTS, 4), jnp.bfloat16)}
    opt = SlotOptimizer(adamw(1.0, max_grad_norm=np.inf))
    state = opt.set_hyperparams(opt.init(bf16), 0, learning_rate=3.4e38)  # bf16 max 3.39e38
    g = {"w": jnp.ones((NUM_SLOTS, 4), jnp.bfloat16)}
    new, new_state, out = jax.jit(opt.update)(bf16, state, g, jnp.ones(3), tokens, apply)
    assert out.nonfinite.tolist() == [True, False, False]
    assert _bits(new, 0) == _bits(bf16, 0) and _bits(new_state, 0) == _bits(state, 0)


def test_hyperparams_are_checked_before_anything_is_written():
    opt = SlotOptimizer(adamw(1e-3))
    state = opt.init(_tables(0))
    for values, error, match in [
        ({"momentum": 0.9}, KeyError, r"unknown hyperparameters \['momentum'\]"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate=nan is not a number"),
        ({"learning_rate": "1e-3"}, ValueError, "is not a number"),
        ({"learning_rate": True}, ValueError, "is not a number"),
        ({"learning_rate": 1e39}, ValueError, "learning_rate=1e\\+39 overflows float32"),
    ]:
        with pytest.raises(error, match=match):
            opt.check_hyperparams(state, values)
        with pytest.raises(error, match=match):
            opt.set_hyperparams(state, 1, **values)
    # inf is a value: adamw(max_grad_norm=inf) disables clipping.
    state = opt.set_hyperparams(state, 1, max_grad_norm=np.inf, learning_rate=np.float32(2e-3))
    np.testing.assert_array_equal(state.inner.hyperparams["max_grad_norm"], [1.0, np.inf, 1.0])
    sgd = SlotOptimizer(optax.sgd(0.1))
    sgd_state = sgd.init(_tables(0))
    with pytest.raises(KeyError, match="optimizer has none"):
        sgd.check_hyperparams(sgd_state, {"learning_rate": 0.1})
    # No values: nothing to check or set, with or without inject_hyperparams.
    sgd.check_hyperparams(sgd_state, {})
    assert sgd.set_hyperparams(sgd_state, 1) is sgd_state


def test_set_hyperparams_and_reset_slot():
    opt = SlotOptimizer(adamw(1e-3, weight_decay=0.01))
    params = _tables(0)
    state = opt.set_hyperparams(opt.init(params), 1, learning_rate=0.5, weight_decay=0.0)
    with pytest.raises(KeyError, match=r"unknown hyperparameters \['momentum'\]"):
        opt.set_hyperparams(state, 0, momentum=0.9)
    hyper = state.inner.hyperparams
    np.testing.assert_allclose(hyper["learning_rate"], [1e-3, 0.5, 1e-3])
    np.testing.assert_allclose(hyper["weight_decay"], [0.01, 0.0, 0.01])

    grads, tokens = _tables(1), jnp.array([1, 1, 1])
    params, state, _ = opt.update(params, state, grads, jnp.ones(3), tokens, jnp.ones(3, bool))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.5, weight_decay=0.0))
    p1 = _slot(_tables(0), 1)
    u, _ = tx.update(_slot(grads, 1), tx.init(p1), p1)
    # inject_hyperparams holds b1, b2 in float32, so bias corrections differ by ~1e-5.
    moved = jax.tree.map(jnp.subtract, _slot(params, 1), p1)
    for ours, ref in zip(jax.tree.leaves(moved), jax.tree.leaves(u), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4)

    kept = [_bits(state, slot) for slot in (0, 2)]
    state = opt.reset_slot(state, params, 1)
    assert state.inner.count.tolist() == [1, 0, 1]
    np.testing.assert_allclose(state.inner.hyperparams["learning_rate"], [1e-3] * 3)
    assert not any(np.asarray(leaf)[1].any() for leaf in jax.tree.leaves(state.inner.inner_state))
    assert [_bits(state, slot) for slot in (0, 2)] == kept


def test_bf16_tables_train_through_a_float32_master():
    """Updates far below bf16's resolution accumulate in the float32 master and reach the
    bf16 tables once they add up; other slots keep their bits. AdamW's hyperparameters
    stay float32 (bf16 rounds b2 = 0.999 to 1, which would divide by zero)."""
    params = {"w": jnp.ones((NUM_SLOTS, 4), jnp.bfloat16)}
    optimizer = SlotOptimizer(optax.sgd(1e-4))
    state = optimizer.init(params)
    assert state.master["w"].dtype == jnp.float32
    grads = {"w": jnp.ones((NUM_SLOTS, 4), jnp.bfloat16)}
    apply = jnp.array([True, False, False])
    counts = jnp.array([1, 0, 0], jnp.int32)
    for _ in range(40):
        params, state, _ = optimizer.update(params, state, grads, jnp.zeros(3), counts, apply)
    np.testing.assert_allclose(state.master["w"][0], 1 - 40e-4, rtol=1e-6)
    np.testing.assert_array_equal(params["w"][0], jnp.full(4, 1 - 40e-4, jnp.bfloat16))
    assert _bits(params, 1) == _bits({"w": jnp.ones((NUM_SLOTS, 4), jnp.bfloat16)}, 1)

    hyperparams = SlotOptimizer(adamw()).init(params).inner.hyperparams
    assert all(v.dtype == jnp.float32 for v in hyperparams.values())


def _layers(seed: int, num_layers: int = 3) -> dict:
    """``_tables`` for each of ``num_layers`` layers, keyed by layer index as the model's
    state is, plus one table outside the layers."""
    layers = {i: _tables(seed + i) for i in range(num_layers)}
    head = jax.random.normal(jax.random.key(seed + 99), (NUM_SLOTS, 6))
    return {"layers": layers, "head": head}


def test_state_stacks_tables_across_layers_and_updates_as_per_layer_optax():
    """The state holds one array per table [N, L, ...]; ``unstacked`` gives it back per
    layer; an update equals clipping + AdamW run on each slot's per-layer tree alone."""
    opt = SlotOptimizer(adamw(1e-2, weight_decay=0.1, max_grad_norm=0.5))
    params, grads = _layers(0), _layers(10)
    state = opt.init(params)
    shapes = {k: v.shape for k, v in state.grad_sum["layers"]["*"].items()}
    assert shapes == {"a": (NUM_SLOTS, 3, 4, 2), "b": (NUM_SLOTS, 3, 2, 5)}
    assert state.grad_sum["head"].shape == (NUM_SLOTS, 1, 6)
    apply = jnp.array([True, False, True])
    new, state, out = jax.jit(opt.update)(
        params, state, grads, jnp.ones(NUM_SLOTS), jnp.array([1, 1, 0]), apply
    )
    assert out.updated.tolist() == [True, False, False]
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1))
    want = optax.apply_updates(
        _slot(params, 0), tx.update(_slot(grads, 0), tx.init(_slot(params, 0)), _slot(params, 0))[0]
    )
    for got_leaf, want_leaf in zip(
        jax.tree.leaves(_slot(new, 0)), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6, atol=1e-7)
    assert _bits(new, 1) == _bits(params, 1) and _bits(new, 2) == _bits(params, 2)
    # Slot 1 only accumulated: its gradient sum, per layer again, is its gradient.
    grad_sums = opt.unstacked(state.grad_sum, params)
    assert jax.tree.structure(grad_sums) == jax.tree.structure(params)
    assert _bits(grad_sums, 1) == _bits(grads, 1)


def test_tables_of_one_path_and_different_shapes_do_not_stack():
    params = {"layers": {0: {"a": jnp.zeros((NUM_SLOTS, 4))}, 1: {"a": jnp.zeros((NUM_SLOTS, 5))}}}
    with pytest.raises(ValueError, match="cannot stack"):
        SlotOptimizer(adamw()).init(params)
