"""Reliability fixtures: a shared tiny engine, the output a fresh engine gives the
reference request, requests run alone, and the tally of bad inputs tried, faults injected
and requests completed, printed at the end of the run."""

import pytest

from loqjax import Engine

from _reliability import CONFIG, REFERENCE, TRIED, Alone, make_engine


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


@pytest.fixture(scope="session")
def alone() -> Alone:
    """Requests run on their own, shared by the fault and load tests: each distinct one
    runs once per session."""
    return Alone()


# The SIGKILL-during-save test lives with the checkpoint tests (a subprocess writing 44 MB,
# not worth running twice); it counts as an injected fault when it passed in this session.
KILL_DURING_SAVE = (
    "tests/test_checkpointing.py::test_a_save_killed_mid_write_leaves_the_previous_step"
)
GROUPS = {"fault": "faults injected", "completed": "requests completed", "": "bad inputs tried"}


def _group(category: str) -> str:
    prefix = category.split(": ", 1)[0]
    return prefix if prefix in GROUPS else ""


def pytest_terminal_summary(terminalreporter):
    passed = {report.nodeid for report in terminalreporter.stats.get("passed", [])}
    if KILL_DURING_SAVE in passed:
        TRIED["fault: process SIGKILLed during a checkpoint save (test_checkpointing)"] += 1
    if not TRIED:
        return
    terminalreporter.section("reliability: bad inputs tried, faults injected, requests completed")
    for prefix, title in GROUPS.items():
        group = {c: n for c, n in TRIED.items() if _group(c) == prefix}
        if group:
            terminalreporter.write_line(f"{title}: {sum(group.values())}")
            for category, n in sorted(group.items()):
                terminalreporter.write_line(f"  {category}: {n}")
