"""LoRA against Hugging Face PEFT: mixed-adapter batches, adapters moving both ways, and
clear errors for malformed PEFT directories."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file, save_file

from loqjax import (
    AdapterRegistry,
    PeftFormatError,
    ShapeMismatchError,
    TargetModuleError,
    add_lora_tables,
    load_model,
    load_peft_adapter,
    save_peft_adapter,
)
from loqjax.peft_format import CONFIG_FILE, WEIGHTS_FILE

from hf_reference import (
    LORA_ARCHS,
    LORA_MAX_RANK,
    LORA_NUM_SLOTS,
    HFModel,
    pack,
    random_adapter,
    rel_err,
)

TOL = 1e-4
NUM_SEGMENTS = 8

# (adapter, or None for the base model alone; length): every PEFT_ADAPTERS entry and two
# base-only sequences in one packed batch, with padding at the end.
MIXED = [("qv", 4), (None, 3), ("all_rs", 5), ("mlp", 4), ("kou", 4), (None, 4), ("attn_rs", 5)]
STARTS = [0, 3, 0, 11, 0, 0, 2]  # some sequences resume mid-document


def _check_changes_logits(ref, base, what):
    """Guards the parity checks: the adapter must move the logits far beyond TOL."""
    assert rel_err(ref, base) > 100 * TOL, f"{what} barely changes the logits"


@pytest.mark.parametrize("arch", LORA_ARCHS)
def test_mixed_batch_matches_peft(
    arch, hf_models, peft_adapters, lora_models, forward, lora_forward
):
    """Each sequence gets the logits PEFT gives for its adapter alone; base-only rows are
    exactly those of the model without adapters."""
    hf = hf_models[arch]
    model, registry = lora_models[arch]
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, hf.vocab_size, n, dtype=np.int32) for _, n in MIXED]
    inputs = pack(seqs, STARTS)
    logits = np.asarray(lora_forward(model, *inputs, registry.batch(MIXED, NUM_SEGMENTS)))
    assert np.isfinite(logits).all()
    base_logits = np.asarray(forward(model, *inputs))

    offset = 0
    for (name, n), seq, start in zip(MIXED, seqs, STARTS, strict=True):
        rows = slice(offset, offset + n)
        positions = np.arange(start, start + n)
        base = hf.logits(seq, positions)
        if name is None:
            np.testing.assert_array_equal(logits[rows], base_logits[rows])
            ref = base
        else:
            ref = peft_adapters[arch][name].logits(seq, positions)
            _check_changes_logits(ref, base, f"{arch} adapter {name}")
        err = rel_err(logits[rows], ref)
        assert err < TOL, f"{arch} sequence for {name}: rel err {err:.2e}"
        offset += n


def test_peft_adapter_roundtrips_bit_exactly(peft_adapters, lora_models, tmp_path):
    """PEFT file -> tables -> export -> PEFT file: same tensors, bit for bit, same config."""
    _, registry = lora_models["qwen2"]
    for name, hf in peft_adapters["qwen2"].items():
        save_peft_adapter(registry.export(name), tmp_path / name)
        ours, theirs = (load_file(p / WEIGHTS_FILE) for p in (tmp_path / name, hf.path))
        assert ours.keys() == theirs.keys()
        for tensor in theirs:
            np.testing.assert_array_equal(ours[tensor], theirs[tensor], err_msg=tensor)

        ours, theirs = (
            json.loads((p / CONFIG_FILE).read_text()) for p in (tmp_path / name, hf.path)
        )
        for field in ("peft_type", "r", "lora_alpha", "use_rslora", "bias"):
            assert ours[field] == theirs[field], field
        assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


def test_loqjax_adapter_loads_in_peft(hf_models, lora_forward, tmp_path):
    hf = hf_models["llama2"]
    _, model = load_model(hf.path)
    add_lora_tables(model, num_slots=LORA_NUM_SLOTS, max_rank=LORA_MAX_RANK)
    registry = AdapterRegistry(model)
    targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    registry.load("native", random_adapter(model, 6, 9.0, targets, use_rslora=True, seed=3))
    save_peft_adapter(registry.export("native"), tmp_path, base_model_name_or_path=str(hf.path))

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf.torch_model), tmp_path).eval()
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (6, 9.0, True)
    assert set(config.target_modules) == set(targets)

    seq = np.random.default_rng(4).integers(0, hf.vocab_size, 20, dtype=np.int32)
    positions = np.arange(20)
    ours = lora_forward(model, *pack([seq], [0]), registry.batch([("native", 20)], NUM_SEGMENTS))
    ref = HFModel(peft_model, tmp_path).logits(seq, positions)
    _check_changes_logits(ref, hf.logits(seq, positions), "the loqjax adapter")
    err = rel_err(np.asarray(ours)[:20], ref)
    assert err < TOL, f"rel err {err:.2e}"


def test_adapter_for_another_base_model_is_rejected(peft_adapters, lora_models):
    """Mistral's q/v projections (head_dim 8) are narrower than qwen2's."""
    _, registry = lora_models["qwen2"]
    adapter = load_peft_adapter(peft_adapters["mistral"]["qv"].path)
    with pytest.raises(ShapeMismatchError, match=r"layers\.0\.self_attn\.q_proj: A \(64, 4\)"):
        registry.check(adapter)


# --- malformed PEFT directories ------------------------------------------------------

_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
_B = _A.replace("lora_A", "lora_B")


def _edit_config(**changes):
    def edit(path):
        config = json.loads((path / CONFIG_FILE).read_text())
        config.update(changes)
        (path / CONFIG_FILE).write_text(json.dumps(config))

    return edit


def _drop_config_field(field):
    def edit(path):
        config = json.loads((path / CONFIG_FILE).read_text())
        del config[field]
        (path / CONFIG_FILE).write_text(json.dumps(config))

    return edit


def _edit_tensors(change):
    def edit(path):
        tensors = load_file(path / WEIGHTS_FILE)
        change(tensors)
        save_file(tensors, path / WEIGHTS_FILE)

    return edit


# case -> (corruption of a copy of the qwen2 "qv" adapter (q_proj, v_proj; r=4), error, match)
MALFORMED = {
    "no config": (lambda p: (p / CONFIG_FILE).unlink(), PeftFormatError, "no adapter_config.json"),
    "no weights": (
        lambda p: (p / WEIGHTS_FILE).unlink(),
        PeftFormatError,
        "no adapter_model.safetensors",
    ),
    "bad json": (lambda p: (p / CONFIG_FILE).write_text("{"), PeftFormatError, "malformed JSON"),
    "not lora": (_edit_config(peft_type="IA3"), PeftFormatError, "peft_type 'IA3' is not LORA"),
    "bias": (_edit_config(bias="lora_only"), PeftFormatError, 'bias="none" is required'),
    "rank_pattern": (
        _edit_config(rank_pattern={"q_proj": 2}),
        PeftFormatError,
        "rank_pattern=.* is not supported",
    ),
    "alpha_pattern": (
        _edit_config(alpha_pattern={"v_proj": 32}),
        PeftFormatError,
        "alpha_pattern=.* is not supported",
    ),
    "dora": (_edit_config(use_dora=True), PeftFormatError, "use_dora=True is not supported"),
    "no rank": (_drop_config_field("r"), PeftFormatError, "missing 'r'"),
    "bad rank": (_edit_config(r=0), PeftFormatError, "r=0 is not a positive integer"),
    "regex targets": (
        _edit_config(target_modules=".*_proj"),
        PeftFormatError,
        "target_modules='.*_proj' must be a non-empty list",
    ),
    "foreign target": (
        _edit_config(target_modules=["q_proj", "v_proj", "lm_head"]),
        TargetModuleError,
        r"\['lm_head'\] are not decoder projections",
    ),
    "target without tensors": (
        _edit_config(target_modules=["q_proj", "k_proj", "v_proj"]),
        PeftFormatError,
        r"missing tensor\(s\) base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A",
    ),
    "untargeted tensor": (
        _edit_config(target_modules=["q_proj"]),
        PeftFormatError,
        r"v_proj\.lora_A\.weight is for v_proj, not in target_modules",
    ),
    "missing tensor": (
        _edit_tensors(lambda t: t.pop(_B)),
        PeftFormatError,
        rf"missing tensor\(s\) {re.escape(_B)}$",
    ),
    "wrong rank": (
        _edit_tensors(lambda t: t.update({_A: np.zeros((5, 64), np.float32)})),
        PeftFormatError,
        rf"{re.escape(_A)} has shape \(5, 64\), expected \[4, d_in\]",
    ),
    "unexpected tensor": (
        _edit_tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[_A]})),
        PeftFormatError,
        r"unexpected tensor base_model\.model\.lm_head\.lora_A\.weight",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_peft_adapter(case, peft_adapters, tmp_path):
    corrupt, error, match = MALFORMED[case]
    path = tmp_path / "adapter"
    shutil.copytree(peft_adapters["qwen2"]["qv"].path, path)
    load_peft_adapter(path)  # the pristine copy loads
    corrupt(path)
    with pytest.raises(error, match=match):
        load_peft_adapter(path)
