"""The unified step and the serving engine on device meshes equal the single-device ones.

``_sharded_steps.py`` runs in a fresh process on 8 fake CPU devices (the device count is
fixed when jax starts) and reports; these tests assert on its report. Tolerances: the
sharded steps reduce in another order (psums of partial sums), so float32 results differ
in the last bits; Adam's ``m / sqrt(v)`` amplifies that in the parameters of a few
near-zero gradients, hence a looser bound there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
STEP_MESHES = ["steps 1x8", "steps 2x4", "steps 8x1", "recompute steps 2x4", "pallas steps 2x4"]
TENSOR_PARALLEL = ["steps 1x8", "steps 2x4", "recompute steps 2x4", "pallas steps 2x4"]
MAX_REL_ERR = {"outputs": 1e-5, "cache": 1e-5, "params": 1e-4, "opt": 1e-4}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    env = {
        **os.environ,
        # This checkout's packages, whatever is installed.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")])
        ),
        "JAX_PLATFORMS": "cpu",  # the fake devices are CPU devices, even on a GPU host
        # Unoptimised machine code: the interpreted kernels' compiles are most of the run.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_sharded_steps.py"), str(out)],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("run", STEP_MESHES)
def test_sharded_unified_steps_equal_the_single_device_steps(report, run):
    """Outputs, trained tables, optimizer state and KV pools after two unified steps."""
    got = report[run]
    for part, bound in MAX_REL_ERR.items():
        assert got[part]["max_rel_err"] < bound, (part, got[part])
    assert got["same_tokens"]


@pytest.mark.parametrize("run", STEP_MESHES)
def test_sharded_step_compiles_once_and_keeps_its_layouts(report, run):
    """The new state and cache come back in the layouts they went in with, so the second
    step reuses the first one's compilation."""
    got = report[run]
    assert got["compilations"] == 1
    assert got["layouts"]["state"] and got["layouts"]["frozen"] and got["layouts"]["cache"]


@pytest.mark.parametrize("run", TENSOR_PARALLEL)
def test_tensor_parallel_layouts(report, run):
    """Megatron layouts over "model": column-parallel q (B split on d_out), row-parallel
    o and down (A and kernel split on d_in), vocabulary-parallel embedding, and KV
    pools split on their heads."""
    layouts = report[run]["layouts"]
    assert layouts["q_kernel"] == "(None, 'model')"
    assert layouts["q_b"] == "(None, None, 'model')"
    assert layouts["o_a"] == "(None, 'model')"
    assert layouts["down_kernel"] == "('model',)"
    assert layouts["embedding"] == "('model',)"
    assert layouts["q_b_grad_sum"] == "(None, None, None, 'model')"  # the layer axis whole
    assert layouts["o_a_grad_sum"] == "(None, None, 'model')"


def test_data_parallel_mesh_replicates_every_weight(report):
    layouts = report["steps 8x1"]["layouts"]
    assert {layouts[k] for k in ("q_kernel", "q_b", "o_a", "down_kernel", "embedding")} == {"()"}


@pytest.mark.parametrize("run", ["engine 2x4", "engine pallas 2x4"])
def test_sharded_engine_generates_the_single_device_tokens(report, run):
    """Greedy generations over the head-split KV cache, on the attention references and
    on the (interpreted) Pallas paged kernel."""
    assert report[run]["tokens"] == report["engine single"]["tokens"]
    assert report[run]["cache_spec"] == "(None, None, 'model')"


def test_adapter_unload_and_load_on_sharded_tables(report):
    """Unloading zeroes the slot, loading another adapter into it and exporting it back
    are exact, the tables keep their layouts, and the result serves like the
    single-device model's."""
    got = report["registry 2x4"]
    assert got["slot"] == 1  # "b"'s freed slot
    assert got["zeroed"] and got["exact_export"] and got["layouts_kept"]
    assert got["same_tokens"]


def test_orbax_checkpoints_of_sharded_tables_and_state(report):
    """An adapter checkpoint saved from sharded tables loads exactly into another sharded
    model, in its layouts; a job checkpoint of a sharded step's trained state restores
    bit-exactly into another slot of a fresh sharded state."""
    adapter, job = report["registry 2x4"], report["job checkpoint 2x4"]
    assert adapter["checkpoint_exact"] and adapter["checkpoint_layouts"]
    assert adapter["checkpoint_slot"] == 2
    assert job["slot"] == 2 and job["opt_trained"]
    assert job["opt_exact"] and job["layouts_kept"]
