"""Baseline: Hugging Face transformers + peft, multi-LoRA generate and one-adapter fine-tuning.

  python3 benchmarks/bench_peft.py --grad-ckpt --out benchmarks/results/peft_h200.jsonl  # GPU
  python3 benchmarks/bench_peft.py --tiny --grad-ckpt --out /tmp/peft_tiny.jsonl  # all paths, CPU

Model: the Llama-3-8B shape (``--tiny``: 2 layers, hidden 64, vocab 512, one CPU thread) with
random weights, built directly on the device in bf16: torch's default dtype is bf16 while
the model is constructed inside ``with device:``, so transformers' own init (normal(0, 0.02))
runs as device kernels and the 8B parameters never exist on the CPU. Attention "sdpa".
LoRA: r=8, alpha=16, on q, k, v, o, gate, up and down. In order:

* generate ``base``: the plain transformers model, before peft touches it;
* train: peft wraps the model with one adapter and fine-tunes it;
* 64 (max of ``--mixed``) inference adapters are added and the trained one deleted;
* generate ``lora1``: one active adapter, peft's ordinary LoRA forward;
* generate ``mixed<n>``: row i uses adapter i % n through peft's mixed-batch inference,
  ``generate(adapter_names=[...])``, for each n of ``--mixed`` (n > batch is recorded as
  skipped: it would use only ``batch`` adapters).

generate: greedy, for each of ``--batches``, prompts of ``--prompt-len`` random ids, exactly
``--new-tokens`` new tokens per row (min_new_tokens = max_new_tokens), transformers' default
dynamic KV cache. A warm-up generate of 2 new tokens (prefill and one decode step) gives the
prefill and decode-step times; the timed runs then use the largest of --new-tokens, /2,
/4, ..., 2 and as many of ``--repeats`` runs as fit in what is left of
``--max-seconds-per-variant``. A row's ``new_tokens`` is what was measured
(``reduced_new_tokens`` when fewer than asked); a variant of which not even 2 tokens fit is
recorded as skipped, with the warm-up's times. A streamer stamps each step (generate syncs
the host every step anyway), splitting the call into the time to first token (TTFT: setup
and prefill) and the decode. Reported, medians over the runs: seconds per generate, output
tokens/s = batch * new_tokens / seconds, TTFT, prefill tokens/s = batch * prompt_len / TTFT
and decode tokens/s = batch * (new_tokens - 1) / (seconds - TTFT), the figure that stays
comparable when new_tokens was reduced.

Inference adapters are bf16 like the base, dropout 0, with B ~ normal(0, 0.02) instead of
peft's zeros, so that they change the output (same cost). They are added by calling the
tuner's ``_create_and_replace`` on each existing LoRA layer, the call ``add_adapter`` makes
for each module it matches: ``add_adapter`` itself rescans every module of the model
against every adapter already there, 5-8x slower for 64 adapters on 32 layers.

train: one adapter (dropout 0.05, peft's init: B = 0), ``--train-batch`` sequences of
``--train-seq-len`` random ids with labels = ids, the standard mixed-precision recipe (what
transformers' Trainer with bf16=True does with peft's default fp32 adapters): frozen bf16
base, fp32 LoRA weights and torch.optim.AdamW (lr 2e-5) state, forward under
torch.autocast(bf16). No gradient checkpointing; ``--grad-ckpt`` adds a run with it
(non-reentrant). ``--train-warmup`` steps, then up to ``--train-steps`` timed steps (fewer if
the cap would be passed): tokens/s = batch * seq_len * steps / seconds.

Peak memory is torch.cuda.max_memory_allocated over each variant (reset before it), weights
included. Each measurement is appended to ``--out`` as one JSON line at once (a run cut
short keeps what it measured), with the command line, versions, device and date; a table
is printed at the end. A variant that raises is recorded as an error and the run goes on;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shlex
import statistics
import sys
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30
FULL_DEFAULTS = dict(
    prompt_len=128, new_tokens=128, train_seq_len=1024, train_warmup=3, train_steps=10
)
TINY_DEFAULTS = dict(prompt_len=8, new_tokens=4, train_seq_len=32, train_warmup=1, train_steps=3)


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        shape = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
        )
    else:  # Llama-3-8B
        shape = dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
        )
    return LlamaConfig(
        **shape,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_model(config: LlamaConfig, device: torch.device) -> LlamaForCausalLM:
    """Random bf16 weights allocated and initialised on ``device``."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def lora_config(dropout: float) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)


def add_inference_adapters(model, names: list[str]) -> None:
    """Add bf16 adapters with B ~ normal(0, 0.02) to every LoRA layer of a peft model."""
    config = lora_config(dropout=0.0)
    tuner = model.base_model
    layers = [(k, m) for k, m in tuner.model.named_modules() if isinstance(m, LoraLayer)]
    for name in names:
        model.peft_config[name] = config
        for key, layer in layers:
            parent, _, attr = key.rpartition(".")
            tuner._create_and_replace(
                config, name, layer, attr, tuner.model.get_submodule(parent), current_key=key
            )
            layer.lora_A[name].to(torch.bfloat16)
            layer.lora_B[name].to(torch.bfloat16)
            torch.nn.init.normal_(layer.lora_B[name].weight, std=0.02)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


class StepClock(BaseStreamer):
    """Stamps the time of each ``put``: once with the prompt, then once per new token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def generate_once(model, ids, new_tokens: int, adapter_names, device) -> dict:
    clock = StepClock(device)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
        **extra,
    )
    sync(device)
    seconds = time.perf_counter() - start
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)} for {tuple(ids.shape)}")
    return {"seconds": seconds, "ttft": clock.stamps[1] - start}


class Recorder:
    """Appends each row to the JSON-lines file at once and keeps it for the final table."""

    def __init__(self, args, device: torch.device):
        self.out = args.out
        self.rows: list[dict] = []
        self.device = device
        self.common = {
            "model": "tiny" if args.tiny else "llama3-8b-shape",
            "device": (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else f"cpu ({platform.processor() or platform.machine()})"
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "command": shlex.join(sys.orig_argv),
        }

    def record(self, benchmark: str, variant: str, status: str = "ok", **fields) -> dict:
        row = {
            "benchmark": benchmark,
            "variant": variant,
            "status": status,
            "batch": None,
            "n_adapters": None,
            "prompt_len": None,
            "new_tokens": None,
            "seconds": None,
            "tokens_per_s": None,
            "peak_mem_gib": peak_gib(self.device),
            **fields,
            **self.common,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.rows.append(row)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"  {benchmark} {variant}: {status} " + json.dumps(fields), flush=True)
        return row


def bench_generate(rec, model, args, device, variant, batch, n_adapters, adapter_names=None):
    fields = dict(batch=batch, n_adapters=n_adapters, prompt_len=args.prompt_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device=device)
    reset_peak(device)
    start = time.perf_counter()
    warm = generate_once(model, ids, 2, adapter_names, device)
    step = warm["seconds"] - warm["ttft"]

    def estimate(new_tokens):
        return warm["ttft"] + (new_tokens - 1) * step

    warmup_seconds = time.perf_counter() - start
    left = args.max_seconds_per_variant - warmup_seconds
    lengths = [args.new_tokens >> k for k in range(args.new_tokens.bit_length())]
    fitting = [n for n in lengths if n >= 2 and estimate(n) <= left]
    if not fitting:
        return rec.record(
            "generate",
            variant,
            "skipped",
            **fields,
            reason=f"after a {warmup_seconds:.1f}s warm-up, 2 new tokens (~{estimate(2):.1f}s) "
            f"would pass --max-seconds-per-variant {args.max_seconds_per_variant:g}",
            warmup_ttft_s=warm["ttft"],
            warmup_decode_step_s=step,
        )
    new_tokens = fitting[0]
    repeats = max(1, min(args.repeats, int(left // estimate(new_tokens))))
    runs = [generate_once(model, ids, new_tokens, adapter_names, device) for _ in range(repeats)]
    seconds = statistics.median(r["seconds"] for r in runs)
    ttft = statistics.median(r["ttft"] for r in runs)
    decode = statistics.median(r["seconds"] - r["ttft"] for r in runs)
    return rec.record(
        "generate",
        variant,
        **fields,
        new_tokens=new_tokens,
        seconds=seconds,
        tokens_per_s=batch * new_tokens / seconds,
        ttft_s=ttft,
        prefill_tokens_per_s=batch * args.prompt_len / ttft,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode,
        repeats=repeats,
        all_seconds=[r["seconds"] for r in runs],
        reduced_new_tokens=new_tokens < args.new_tokens,
    )


def bench_train(rec, model, args, device, grad_ckpt: bool):
    """Fine-tune the active adapter ("trained") for a few steps."""
    base = model.get_base_model()
    if grad_ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    tokens = args.train_batch * args.train_seq_len
    ids = torch.randint(
        0, model.config.vocab_size, (args.train_batch, args.train_seq_len), device=device
    )

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    try:
        reset_peak(device)
        start = time.perf_counter()
        for _ in range(args.train_warmup):
            sync(device)
            step_start = time.perf_counter()
            step()
            sync(device)
        step_seconds = time.perf_counter() - step_start
        left = args.max_seconds_per_variant - (time.perf_counter() - start)
        steps = max(1, min(args.train_steps, int(left // step_seconds)))
        sync(device)
        timed_start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        seconds = time.perf_counter() - timed_start
        return rec.record(
            "train",
            "lora+grad_ckpt" if grad_ckpt else "lora",
            batch=args.train_batch,
            n_adapters=1,
            prompt_len=args.train_seq_len,
            new_tokens=0,
            seconds=seconds,
            tokens_per_s=tokens * steps / seconds,
            steps=steps,
            step_s=seconds / steps,
            loss=loss.item(),
            trainable_params=sum(p.numel() for p in params),
            recipe="base bf16 frozen; LoRA weights + AdamW state fp32; autocast bf16",
            grad_ckpt=grad_ckpt,
        )
    finally:
        if grad_ckpt:
            base.gradient_checkpointing_disable()
        model.eval()


def measure(rec, benchmark, variant, fn, *args, **kwargs):
    """Run one measurement; an exception becomes an error row and the run goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (recorded, and the exit status says so)
        return rec.record(benchmark, variant, "error", reason=f"{type(e).__name__}: {e}"[:500])


def run(args, device: torch.device, rec: Recorder) -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(model_config(args.tiny), device)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    rec.record("setup", "build_model", seconds=time.perf_counter() - start, params=n_params)
    start = time.perf_counter()  # the process's first generate: cuBLAS handles, first kernels
    generate_once(
        model, torch.zeros((1, args.prompt_len), dtype=torch.long, device=device), 2, None, device
    )
    rec.record("setup", "first_generate", seconds=time.perf_counter() - start)

    for batch in args.batches:
        args_ = (rec, model, args, device, "base", batch, 0)
        measure(rec, "generate", "base", bench_generate, *args_)

    model = get_peft_model(model, lora_config(dropout=0.05), adapter_name="trained")
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.lora_A["trained"].float()
            layer.lora_B["trained"].float()
    if args.train_steps:
        measure(rec, "train", "lora", bench_train, rec, model, args, device, grad_ckpt=False)
        if args.grad_ckpt:
            measure(rec, "train", "lora+grad_ckpt", bench_train, rec, model, args, device, True)

    reset_peak(device)
    start = time.perf_counter()
    names = [f"a{i}" for i in range(max([1, *args.mixed]))]
    add_inference_adapters(model, names)
    model.set_adapter("a0")
    model.delete_adapter("trained")
    model.eval()
    sync(device)
    rec.record("setup", "add_adapters", seconds=time.perf_counter() - start, n_adapters=len(names))

    for batch in args.batches:
        args_ = (rec, model, args, device, "lora1", batch, 1)
        measure(rec, "generate", "lora1", bench_generate, *args_)
    for n in args.mixed:
        variant = f"mixed{n}"
        for batch in args.batches:
            if n > batch:
                rec.record(
                    "generate",
                    variant,
                    "skipped",
                    batch=batch,
                    n_adapters=n,
                    prompt_len=args.prompt_len,
                    reason=f"{n} adapters over {batch} rows would use only {batch} of them",
                )
                continue
            rows = [names[i % n] for i in range(batch)]
            args_ = (rec, model, args, device, variant, batch, n, rows)
            measure(rec, "generate", variant, bench_generate, *args_)


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(rec: Recorder) -> None:
    c = rec.common
    print(
        f"\n{c['model']} on {c['device']}; torch {c['torch']}, transformers "
        f"{c['transformers']}, peft {c['peft']}\n{c['command']}\n"
    )
    head = "benchmark variant batch adapters new_tok seconds tok/s TTFT_s prefill_tok/s"
    head = (head + " decode_tok/s peak_GiB status").split()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rec.rows:
        cells = [
            r["benchmark"],
            r["variant"],
            fmt(r["batch"], "d"),
            fmt(r["n_adapters"], "d"),
            fmt(r["new_tokens"], "d"),
            fmt(r["seconds"], ".2f"),
            fmt(r["tokens_per_s"], ".1f"),
            fmt(r.get("ttft_s"), ".3f"),
            fmt(r.get("prefill_tokens_per_s"), ".0f"),
            fmt(r.get("decode_tokens_per_s"), ".1f"),
            fmt(r["peak_mem_gib"], ".2f"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
        ]
        print("| " + " | ".join(cells) + " |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model, short lengths")
    parser.add_argument("--out", help="append one JSON line per measurement to this file")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--mixed", type=int, nargs="*", default=[4, 16, 64])
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3, help="timed generates per variant")
    parser.add_argument("--max-seconds-per-variant", type=float, default=20.0)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-seq-len", type=int)
    parser.add_argument("--train-warmup", type=int)
    parser.add_argument("--train-steps", type=int, help="0: no training")
    parser.add_argument("--grad-ckpt", action="store_true", help="also train with it")
    parser.epilog = f"defaults: {FULL_DEFAULTS}; --tiny: {TINY_DEFAULTS}"
    args = parser.parse_args(argv)
    for name, default in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if args.train_warmup < 1:
        parser.error("--train-warmup must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # more intra-op threads thrash on a small shared machine
    else:
        sys.exit("the full benchmark needs a CUDA GPU (try --tiny)")
    rec = Recorder(args, device)
    print(f"{rec.common['model']} on {rec.common['device']}", flush=True)
    start = time.perf_counter()
    run(args, device, rec)
    print_table(rec)
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 1 if any(r["status"] == "error" for r in rec.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
