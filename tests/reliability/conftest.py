"""Reliability fixtures: a shared tiny engine, the output a fresh engine gives the
reference request, and the tally of bad inputs tried, printed at the end of the run."""

import pytest

from loqjax import Engine

from _reliability import CONFIG, REFERENCE, TRIED, make_engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    """Shared by every bad-input test; each checks it still serves correctly."""
    return make_engine()


@pytest.fixture(scope="session")
def reference_output():
    return make_engine().submit(*REFERENCE).result()


@pytest.fixture
def still_serves(engine, reference_output):
    """Call after the bad inputs: the engine is idle with its pool full, and a normal
    request gets what it gets on a fresh engine."""

    def check():
        assert engine.num_unfinished == 0
        assert engine.num_free_pages == CONFIG.num_pages
        out = engine.submit(*REFERENCE).result()
        assert (out.token_ids, out.text, out.finish_reason) == (
            reference_output.token_ids,
            reference_output.text,
            reference_output.finish_reason,
        )
        assert engine.num_free_pages == CONFIG.num_pages

    return check


def pytest_terminal_summary(terminalreporter):
    if TRIED:
        terminalreporter.section("bad inputs tried")
        for category, n in sorted(TRIED.items()):
            terminalreporter.write_line(f"{category}: {n}")
        terminalreporter.write_line(f"total: {sum(TRIED.values())}")
