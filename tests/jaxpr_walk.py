"""Walking a traced step's equations outside Pallas kernels, for tests that check what a
step computes."""

from collections.abc import Iterator

from jax.extend import core as jax_core


def equations(jaxpr: jax_core.Jaxpr) -> Iterator[jax_core.JaxprEqn]:
    """Every equation of ``jaxpr`` and of the jaxprs nested in it, but for the bodies of
    Pallas kernels."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for sub in jax_core.jaxprs_in_params(eqn.params):
                yield from equations(sub)


def host_synced(jaxpr: jax_core.Jaxpr) -> list[str]:
    """The conditionals among ``equations(jaxpr)``: on a GPU, XLA reads a conditional's
    predicate back to the host, so the host stops queueing work until the device has
    caught up (a serving step would cost its host time plus its device time)."""
    return [eqn.primitive.name for eqn in equations(jaxpr) if eqn.primitive.name == "cond"]
