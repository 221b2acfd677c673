#!/usr/bin/env bash
# One GPU session's phases, each under its own time limit, logs and JSON rows under $OUT
# (the device tool's output folder; default ./gpu_out). Usage:
#   benchmarks/gpu_run.sh tests lora_decode finetune     # any of the phases below, in order
# Phases: info, tests, e2e, lora_decode, decode_step, decode_concurrent, decode_phases,
# decode_phases_nocmdbuf, decode_hlo, decode_nocmdbuf, decode_two_kernel, flash, flash_sweep,
# finetune, finetune_schedules, finetune_sync, finetune4_backward, finetune4_recompute,
# finetune4_saved, finetune4_interleaved, finetune4_memory_report,
# loss_memory, host_dispatch, finetune_profile,
# finetune4, inference, inference_short, finetune_one, peft, unified, unified_rates,
# unified_serve256, unified_rows2048,
# unified_alone_rows, unified_runs, unified_seq512, unified_host, unified_host512,
# unified_no_requests, scaling, scaling_1gpu, cmdbuf_modes, graph_launch, optimizer_dispatch,
# finetune_host, finetune_host_same, finetune_host_fixed, finetune_host_nocmdbuf, cmdbuf_types,
# finetune_cmdbuf, finetune_cmdbuf_stable, unified_cmdbuf, unified_cmdbuf_stable,
# unified_stable, save_cache.
#
# "scaling" runs bench_scaling.py on every mesh the host has devices for (1, 2, 4, 8
# GPUs; NCCL_NVLS_ENABLE=0 below) after its check; a call has 10 minutes, so a multi-GPU
# run takes a subset per call: SCALING_MESHES="1 1x2 2x1" SCALING_CHECK="1x2 2x1 1x8"
# (SCALING_CHECK="" skips the check). "scaling_1gpu" is its one-GPU check (~3 min): the
# tiny model on a 1x1 mesh (the kernels under shard_map) against one device, then the 8B
# shape on the 1x1 mesh.
#
# The persistent compilation cache lives in /tmp/jax_cache; "save_cache" packs it into
# $OUT/jax_cache.tgz (when it fits the device tool's 16 MiB a file), and a packed cache
# carried in as .gpu_cache/jax_cache.tgz is unpacked first, so a later machine skips the
# compiles (and GEMM autotuning) of programs that did not change.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
if [ -f .gpu_cache/jax_cache.tgz ]; then
  mkdir -p /tmp/jax_cache && tar -xzf .gpu_cache/jax_cache.tgz -C /tmp/jax_cache
fi

# XLA flags that keep a command buffer's recorded addresses across calls, as the GPU's
# jaxlib names them (the option's values changed between XLA versions); empty if none.
cmdbuf_stable_flags() {
  local f
  for f in "--xla_gpu_command_buffer_update_mode=SKIP_TEMP" \
      "--xla_gpu_command_buffer_update_mode=VMM_PERSISTENT_TEMP" \
      "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE --xla_gpu_enable_command_buffer_va_remapping=true" \
      "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE"; do
    if XLA_FLAGS="$f" python3 -c "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()" \
        >/dev/null 2>&1; then
      echo "$f"
      return
    fi
  done
}
CMDBUF_LOG="TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3"
CMDBUF_FINETUNE="python3 benchmarks/bench_finetune.py --adapters 1 --steps 8 --sync each lagged"

phase() {  # phase NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc $((SECONDS - start))s"
  tail -n 25 "$OUT/$name.log"
}

cmdbuf_phase() {  # cmdbuf_phase NAME SECONDS [VAR=VALUE...] COMMAND...: XLA's command-buffer log summarized
  local name=$1 limit=$2
  shift 2
  phase "$name" "$limit" env $CMDBUF_LOG "$@"
  python3 benchmarks/cmdbuf_log_summary.py "$OUT/$name.log" | tee "$OUT/${name}_summary.txt"
  gzip -f "$OUT/$name.log"
}

unified_four_rates() {  # unified_four_rates NAME METRICS_DIR [BENCH_UNIFIED_FLAG...]: 1-4 req/s
  local name=$1 dir=$2
  shift 2
  phase "$name" 570 python3 benchmarks/bench_unified.py "$@" --rates 1 2 3 4 --duration 20 \
    --drain 25 --alone 8 --metrics-dir "$OUT/$dir" --out "$OUT/$name.jsonl"
}

for p in "$@"; do
  case $p in
    info) phase info 60 bash -c "nvidia-smi; python3 -c 'import jax, flax, optax; print(jax.__version__, jax.devices(), flax.__version__, optax.__version__)'" ;;
    # The tests leave a quarter of the card outside XLA's pool: at 0.92, on an H100, a CUDA graph of the
    # float32 flash-attention test failed to instantiate for lack of memory (RESULTS run 69).
    tests) phase tests 180 env JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 \
      python3 -m pytest -x -q -p no:cacheprovider \
      -m gpu tests/test_smlm.py tests/test_lora_split.py tests/test_flash_attention.py tests/test_paged_attention_kernel.py ;;
    e2e) phase e2e 240 env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -x -q -p no:cacheprovider \
      tests/test_model_kernels.py "tests/test_engine.py::test_greedy_matches_transformers_and_peft" ;;
    lora_decode) phase lora_decode 100 python3 benchmarks/bench_lora_decode.py --tokens 64 --adapters 1 64 --methods two-kernel split --json "$OUT/lora_decode.json" ;;
    decode_step) phase decode_step 230 python3 benchmarks/bench_decode_step.py --paths split --schedules concurrent lhs --out "$OUT/decode_step.jsonl" ;;
    decode_concurrent) phase decode_concurrent 230 env XLA_FLAGS="--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" \
      python3 benchmarks/bench_decode_step.py --paths split --out "$OUT/decode_concurrent.jsonl" ;;
    decode_phases) phase decode_phases 200 python3 benchmarks/bench_decode_step.py --paths split --adapters 1 \
      --phases --out "$OUT/decode_phases.jsonl" ;;
    decode_phases_nocmdbuf) phase decode_phases_nocmdbuf 200 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" \
      python3 benchmarks/bench_decode_step.py --paths split --adapters 1 --phases --out "$OUT/decode_phases_nocmdbuf.jsonl" ;;
    decode_hlo) phase decode_hlo 150 python3 benchmarks/bench_decode_step.py --paths split --adapters 1 \
      --top 150 --hlo-dir "$OUT/hlo" --out "$OUT/decode_step.jsonl" ;;
    decode_nocmdbuf) phase decode_nocmdbuf 150 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" \
      python3 benchmarks/bench_decode_step.py --paths split --adapters 1 --out "$OUT/decode_nocmdbuf.jsonl" ;;
    flash) phase flash 120 python3 benchmarks/bench_flash_attention.py --table ;;
    flash_sweep) phase flash_sweep 320 python3 benchmarks/bench_flash_attention.py --sweep --tokens 2048 --segments 2 ;;
    finetune) phase finetune 290 python3 benchmarks/bench_finetune.py --out "$OUT/finetune.jsonl" ;;
    finetune_schedules) phase finetune_schedules 380 python3 benchmarks/bench_finetune.py --adapters 1 --steps 6 \
      --schedules lhs concurrent --out "$OUT/finetune_schedules.jsonl" ;;
    finetune_sync) phase finetune_sync 390 python3 benchmarks/bench_finetune.py --adapters 1 --steps 8 \
      --schedules lhs concurrent --sync each lagged --out "$OUT/finetune_sync.jsonl" ;;
    finetune4_backward) phase finetune4_backward 420 python3 benchmarks/bench_finetune.py --adapters 4 --steps 4 \
      --backward recompute save --sync each lagged --out "$OUT/finetune4_backward.jsonl" ;;
    finetune4_recompute) phase finetune4_recompute 330 python3 benchmarks/bench_finetune.py --adapters 4 --steps 4 \
      --backward recompute --sync each lagged --out "$OUT/finetune4_recompute.jsonl" ;;
    finetune4_saved)  # four adapters, recomputing all but the last 0, 8, 12, 16 or 32 layers
      phase finetune4_saved 590 python3 benchmarks/bench_finetune.py --adapters 4 --steps 4 \
        --backward recompute --saved-layers 0 8 12 16 32 --sync each lagged --out "$OUT/finetune4_saved.jsonl" ;;
    finetune4_interleaved)  # one adapter, then four whose updates spread over steps of 2 x 1024 tokens
      phase finetune4_interleaved 300 python3 benchmarks/bench_finetune.py --adapters 1 4 --step-seqs 2 \
        --steps 8 --sync each lagged --out "$OUT/finetune4_interleaved.jsonl" ;;
    finetune4_memory_report)  # the same, with XLA's memory-usage report of the step (run 34)
      phase finetune4_memory_report 330 env XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" \
        python3 benchmarks/bench_finetune.py --adapters 4 --steps 4 --backward recompute \
        --sync each lagged --out "$OUT/finetune4_memory_report.jsonl"
      gzip -c "$(ls -S /tmp/dump/*jit_call*memory-usage-report.txt | head -1)" >"$OUT/memory_usage_report.txt.gz" ;;
    decode_two_kernel) phase decode_two_kernel 120 python3 benchmarks/bench_decode_step.py --paths two-kernel \
      --out "$OUT/decode_two_kernel.jsonl" ;;
    loss_memory) phase loss_memory 120 python3 benchmarks/bench_loss_memory.py --time --out "$OUT/loss_memory.jsonl" ;;
    host_dispatch) phase host_dispatch 120 python3 benchmarks/bench_host_dispatch.py --out "$OUT/host_dispatch.jsonl" ;;
    finetune_profile) phase finetune_profile 200 python3 benchmarks/bench_finetune.py --adapters 1 --profile --out "$OUT/finetune.jsonl" ;;
    finetune4) phase finetune4 330 python3 benchmarks/bench_finetune.py --adapters 4 --out "$OUT/finetune.jsonl" ;;
    inference) phase inference 200 python3 benchmarks/bench_inference.py --out "$OUT/inference.jsonl" ;;
    inference_short) phase inference_short 270 python3 benchmarks/bench_inference.py --adapters 1 16 \
      --out "$OUT/inference_short.jsonl" ;;
    finetune_one) phase finetune_one 270 python3 benchmarks/bench_finetune.py --adapters 1 --steps 8 \
      --sync each lagged --out "$OUT/finetune_one.jsonl" ;;
    peft) phase peft 250 python3 benchmarks/bench_peft.py --out "$OUT/peft.jsonl" ;;
    unified) phase unified 570 python3 benchmarks/bench_unified.py \
      --rates 1 2 4 --duration 20 --drain 25 --alone 8 --metrics-dir "$OUT" --out "$OUT/unified.jsonl" ;;
    unified_rates) unified_four_rates unified_rates rates ;;
    unified_serve256)  # a unified step's serving rows 256, so that most prompts prefill in one
      unified_four_rates unified_serve256 serve256 --unified-serve-rows 256 ;;
    unified_rows2048)  # both jobs' sequences in every unified step, under load
      unified_four_rates unified_rows2048 rows2048 --train-rows 2048 ;;
    unified_alone_rows)  # the runtime alone at 1024 and 2048 training rows a step; bench_finetune's
      phase unified_alone_1024 200 python3 benchmarks/bench_unified.py --rates --alone 10 \
        --out "$OUT/unified_alone.jsonl"
      phase unified_alone_2048 220 python3 benchmarks/bench_unified.py --train-rows 2048 --rates --alone 10 \
        --out "$OUT/unified_alone.jsonl"
      phase finetune1 150 python3 benchmarks/bench_finetune.py --adapters 1 --steps 8 --sync each lagged \
        --out "$OUT/finetune1.jsonl" ;;
    unified_runs)  # RuntimeConfig.unified_run 1 and 2 on the same arrivals
      phase unified_runs 570 python3 benchmarks/bench_unified.py --unified-run 1 2 --rates 1 2 4 --duration 15 \
        --drain 20 --alone 8 --metrics-dir "$OUT/runs" --out "$OUT/unified_runs.jsonl" ;;
    unified_seq512) phase unified_seq512 570 python3 benchmarks/bench_unified.py --train-seq-len 512 \
      --rates 1 2 4 --duration 20 --drain 25 --alone 8 --metrics-dir "$OUT/seq512" --out "$OUT/unified_seq512.jsonl" ;;
    unified_host) phase unified_host 480 python3 benchmarks/bench_unified.py --rates 2 --duration 20 --drain 25 \
      --alone 8 --profile-alone 30 --metrics-dir "$OUT/host" --out "$OUT/unified_host.jsonl" ;;
    unified_host512) phase unified_host512 420 python3 benchmarks/bench_unified.py --train-seq-len 512 --rates \
      --alone 8 --profile-alone 30 --metrics-dir "$OUT/host512" --out "$OUT/unified_host512.jsonl" ;;
    unified_no_requests) phase unified_no_requests 570 python3 benchmarks/bench_unified.py --pipeline no_requests \
      --rates 1 2 4 --duration 20 --drain 25 --alone 8 --out "$OUT/unified_no_requests.jsonl" ;;
    scaling) phase scaling 570 python3 benchmarks/bench_scaling.py ${SCALING_MESHES:+--meshes $SCALING_MESHES} \
      ${SCALING_CHECK+--check-meshes $SCALING_CHECK} --out "$OUT/scaling.jsonl" ;;
    scaling_1gpu) phase scaling_1gpu 240 python3 benchmarks/bench_scaling.py --meshes 1x1 --check-meshes 1x1 \
      --new-tokens 32 --steps 3 --out "$OUT/scaling.jsonl" ;;
    cmdbuf_modes)  # the jaxlib's command-buffer update modes, and which one cmdbuf_stable_flags takes
      phase cmdbuf_modes 90 bash -c "python3 -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__)'; \
        strings \$(python3 -c 'import jaxlib, os; print(os.path.dirname(jaxlib.__file__))')/*.so \
        | grep -E '^(ALWAYS_UPDATE|NEVER_UPDATE|CAPTURE_CMD_NEVER_UPDATE|SKIP_TEMP|SKIP_PROFILED|DYNAMIC_ALLOCATE|VMM_PERSISTENT_TEMP)\$' | sort -u; \
        echo \"stable flags: $(cmdbuf_stable_flags)\"" ;;
    graph_launch)  # host time of a jitted call against its kernels, layers unrolled or scanned
      phase graph_launch 150 python3 benchmarks/bench_graph_launch.py --layers 32 512 1536 \
        --out "$OUT/graph_launch.jsonl" ;;
    optimizer_dispatch)  # the optimizer's update alone: tables per layer or stacked across layers
      phase optimizer_dispatch 200 python3 benchmarks/bench_optimizer_dispatch.py --out "$OUT/optimizer_dispatch.jsonl" ;;
    finetune_host)  # one adapter's unified step: where the host's time goes, by trace event
      cmdbuf_phase finetune_host 230 $CMDBUF_FINETUNE --host-profile --out "$OUT/finetune_host.jsonl" ;;
    finetune_host_same)  # finetune_host with every step on one device-resident batch
      cmdbuf_phase finetune_host_same 230 $CMDBUF_FINETUNE --same-batch --host-profile \
        --out "$OUT/finetune_host_same.jsonl" ;;
    finetune_host_fixed)  # finetune_host with neither its batch nor its outputs moving between calls
      cmdbuf_phase finetune_host_fixed 230 python3 benchmarks/bench_finetune.py --adapters 1 --steps 8 \
        --sync each --same-batch --reuse-outputs --host-profile --out "$OUT/finetune_host_fixed.jsonl" ;;
    finetune_host_nocmdbuf)  # the same with XLA's command buffers off
      phase finetune_host_nocmdbuf 230 env XLA_FLAGS="--xla_gpu_enable_command_buffer=" $CMDBUF_FINETUNE \
        --host-profile --out "$OUT/finetune_host_nocmdbuf.jsonl" ;;
    cmdbuf_types)  # finetune_host's dispatch with cuBLAS or custom calls left out of the command buffers
      for types in "" "FUSION,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" "FUSION,CUBLAS,CUBLASLT,CUDNN,WHILE,CONDITIONAL"; do
        name=cmdbuf_types_${types:-default}
        phase "${name//,/_}" 180 env ${types:+XLA_FLAGS=--xla_gpu_enable_command_buffer=$types} \
          python3 benchmarks/bench_finetune.py --adapters 1 --steps 6 --sync each --host-profile \
          --out "$OUT/cmdbuf_types.jsonl"
      done ;;
    finetune_cmdbuf)  # one adapter's unified step, XLA's command-buffer log summarized
      cmdbuf_phase finetune_cmdbuf 260 $CMDBUF_FINETUNE --out "$OUT/finetune_cmdbuf.jsonl" ;;
    finetune_cmdbuf_stable)  # the same under cmdbuf_stable_flags
      flags=$(cmdbuf_stable_flags)
      echo "=== finetune_cmdbuf_stable: XLA_FLAGS=$flags"
      cmdbuf_phase finetune_cmdbuf_stable 260 XLA_FLAGS="$flags" $CMDBUF_FINETUNE \
        --out "$OUT/finetune_cmdbuf_stable.jsonl" ;;
    unified_cmdbuf)  # the runtime alone, then at 2 req/s, XLA's command-buffer log summarized
      cmdbuf_phase unified_cmdbuf 480 python3 benchmarks/bench_unified.py --rates 2 --duration 10 \
        --drain 10 --alone 8 --out "$OUT/unified_cmdbuf.jsonl" ;;
    unified_cmdbuf_stable)  # unified_cmdbuf under cmdbuf_stable_flags
      flags=$(cmdbuf_stable_flags)
      echo "=== unified_cmdbuf_stable: XLA_FLAGS=$flags"
      cmdbuf_phase unified_cmdbuf_stable 420 XLA_FLAGS="$flags" python3 benchmarks/bench_unified.py \
        --rates 2 --duration 15 --drain 15 --alone 8 --metrics-dir "$OUT/cmdbuf_stable" --out "$OUT/unified_cmdbuf_stable.jsonl" ;;
    unified_stable)  # the "unified" phase under cmdbuf_stable_flags
      flags=$(cmdbuf_stable_flags)
      echo "=== unified_stable: XLA_FLAGS=$flags"
      phase unified_stable 570 env XLA_FLAGS="$flags" python3 benchmarks/bench_unified.py \
        --rates 1 2 4 --duration 20 --drain 25 --alone 8 --metrics-dir "$OUT/stable" --out "$OUT/unified_stable.jsonl" ;;
    save_cache)
      tar -czf "$OUT/jax_cache.tgz" -C /tmp/jax_cache . 2>/dev/null
      size=$(stat -c %s "$OUT/jax_cache.tgz" 2>/dev/null || echo 0)
      echo "=== save_cache: $((size / 1048576)) MiB"
      [ "$size" -lt $((16 * 1048576)) ] || rm -f "$OUT/jax_cache.tgz" ;;  # too big to come back
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
