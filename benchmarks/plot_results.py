"""Plots of the recorded end-to-end benchmark rows (``benchmarks/results/*.jsonl``), one PNG
per benchmark, next to them. Runs anywhere (no GPU): it only reads what the GPU runs wrote.

  python benchmarks/plot_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line]


def inference() -> Path:
    # Run 58: ours and PEFT on one machine.
    ours = [r for r in rows("inference_run13.jsonl") if "decode_tokens_per_s" in r]
    peft = [
        r for r in rows("peft_run3.jsonl") if r["benchmark"] == "generate" and r["status"] == "ok"
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, batch in zip(axes, (16, 64), strict=True):
        labels, mine, theirs = [], [], []
        for variant, peft_variant in [
            ("base", "base"),
            ("lora1", "lora1"),
            ("lora4", "mixed4"),
            ("lora16", "mixed16"),
            ("lora64", "mixed64"),
        ]:
            a = [r for r in ours if r["variant"] == variant and r["batch"] == batch]
            b = [r for r in peft if r["variant"] == peft_variant and r["batch"] == batch]
            if not a:
                continue
            labels.append(variant.replace("lora", "LoRA x"))
            mine.append(a[0]["decode_tokens_per_s"])
            theirs.append(b[0]["decode_tokens_per_s"] if b else 0.0)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], mine, 0.4, label="loqjax Engine")
        ax.bar([i + 0.2 for i in x], theirs, 0.4, label="HF transformers + peft generate")
        ax.set_xticks(list(x), labels)
        ax.set(title=f"decode tokens/s, batch {batch}", ylabel="tokens/s", yscale="log")
        ax.legend(loc="lower left")
    fig.suptitle("Llama-3-8B shape, bf16, r=8 on all 7 projections, NVIDIA H200")
    fig.tight_layout()
    path = RESULTS / "inference.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def finetune() -> Path:
    # Run 58: 1 adapter, and 4 whose updates spread over steps of 2 x 1024 tokens; run 57
    # (the same machine): all 4 in one step, recomputing all but the last k layers. "each"
    # reads the losses every step, "lagged" one step late (PEFT's timed loop reads none).
    interleaved = [r for r in rows("finetune_run18_interleaved.jsonl") if "tokens_per_s" in r]
    saved = [
        r
        for r in rows("finetune_run17_saved_layers.jsonl")
        if "tokens_per_s" in r and r["sync"] == "lagged"
    ]
    ours = interleaved + saved
    peft = next(r for r in rows("peft_run3.jsonl") if r["benchmark"] == "train")
    labels = [
        f"{'1 adapter' if r['n_adapters'] == 1 else '4, spread'}\n{r['sync']}" for r in interleaved
    ]
    labels += [f"4, one step\nk={r['saved_layers']} lagged" for r in saved]
    labels += ["peft\n1 adapter"]
    colors = ["C0" if r["n_adapters"] == 1 else "C2" for r in interleaved]
    colors += ["C4"] * len(saved) + ["C1"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    left.bar(labels, [r["tokens_per_s"] for r in ours] + [peft["tokens_per_s"]], color=colors)
    left.axhline(1.5 * peft["tokens_per_s"], color="k", ls=":", label="1.5x peft")
    left.set(title="fine-tuning tokens/s (2 x 1024 tokens per adapter, AdamW)")
    left.legend()
    right.bar(labels, [r["peak_mem_gib"] for r in ours] + [peft["peak_mem_gib"]], color=colors)
    right.axhline(peft["peak_mem_gib"], color="k", ls=":", label="peft, 1 adapter")
    right.set(title="peak device memory (GiB)")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Llama-3-8B shape, bf16, r=8 on all 7 projections, NVIDIA H200")
    fig.tight_layout()
    path = RESULTS / "finetune.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def unified() -> Path:
    # The same arrivals at 1024 training rows a unified step (run 66) and 2048 (run 67).
    runs = {
        "1024 rows": rows("unified_run26_rates.jsonl"),
        "2048 rows": rows("unified_run27_rows2048.jsonl"),
    }
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.4
    shares, attained = [], []
    for i, (label, data) in enumerate(runs.items()):
        alone = next(r for r in data if r["variant"] == "finetune alone")
        loads = [r for r in data if r["variant"].startswith("rate")]
        names = [r["variant"] for r in loads]  # the same rates in both runs
        x = [j + (i - 0.5) * width for j in range(len(loads))]
        left.bar(x, [1e3 * r["tpot_p50"] for r in loads], width, color=f"C{i}", label=label)
        left.plot(x, [1e3 * r["tpot_p99"] for r in loads], "k_", ms=12)
        middle.bar(x, [1e3 * r["itl_p99"] for r in loads], width, color=f"C{i}", label=label)
        tokens = [alone["train_tokens_per_s"]] + [r["train_tokens_per_s"] for r in loads]
        right.bar([j + (i - 0.5) * width for j in range(len(tokens))], tokens, width, label=label)
        shares += [r["train_tokens_per_s"] / alone["train_tokens_per_s"] for r in loads]
        attained += [r["slo_attainment"] for r in loads]
    left.axhline(45, color="k", ls=":", label="SLO 45 ms")
    left.set(ylabel="ms", title="TPOT p50 (bars) and p99 (dashes)")
    left.set_xticks(range(len(names)), names)
    left.legend(loc="lower right")
    middle.set(ylabel="ms", title="gap between two tokens, p99")
    middle.set_xticks(range(len(names)), names)
    right.set_xticks(range(len(names) + 1), ["alone", *names])
    right.set(ylabel="tokens/s", title="fine-tuning throughput")
    right.legend(loc="lower right")
    fig.suptitle(
        f"unified runtime, Llama-3-8B shape, H200: lowest SLO attainment {min(attained):.0%}; "
        f"fine-tuning kept {min(shares):.2f}-{max(shares):.2f}x of alone"
    )
    fig.tight_layout()
    path = RESULTS / "unified.png"
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    for plot in (inference, finetune, unified):
        print(plot())
