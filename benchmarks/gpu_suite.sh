#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, offline W1/W2, single-stream latency, long prefill, online W1, start-up time.
# Usage: bash benchmarks/gpu_suite.sh [tests] [w1] [single] [long_prefill] [w2] [online] [online_servers] [online_clients] [online_endpoints] [scoring]
#        [online_profile] [startup] [startup_profile] [quant_tests] [quant_kernels] [quant_single] [quant_w2]
#        [structured_threads] [structured_templates] [structured_switch] [mask_process] [ablation] [decode_splits]
# (default: tests w1 single long_prefill w2 online startup). startup: command-to-ready of `batchlm serve` three times, the first
# with an empty Triton cache (as on a fresh machine), with the server's `startup:` breakdown;
# startup_profile: the engine core's start-up in one process (every Triton compile, every graph
# capture), cold then warm, and what padding decode batches to coarser graph sizes costs.
# quant_tests: the FP8 / W4A16 / FP8-KV GPU tests alone; quant_kernels: the three linears at 8B
# shapes, decode kernels against the GEMM paths (benchmarks/quant_kernels.py); quant_single:
# single-stream 8B ITL, bf16 vs --quantization fp8 vs w4a16 (random weights quantized at load);
# quant_w2: a short W2 (512 x 1000 in / 256 out), bf16 vs fp8 weights + fp8 KV cache
# (QUANT_W2_OUT=1000 for the full one). ablation: single-stream 1B ITL with the decode attention, the
# KV write and RoPE left out of decode steps in turn (benchmarks/decode_step_ablation.py).
# Needs $OUT (results folder); PYTHONPATH=src (the package is not installed there). To compare two
# source trees in one call, runs interleaved, see benchmarks/gpu_ab.sh.
set -u
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)/src" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/batchlm-gpu}"
mkdir -p "$OUT"
steps="${*:-tests w1 single long_prefill w2 online startup}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
# online_ab ROUNDS FLAG VIA VALUE...: the online run once per VALUE of `--FLAG`, passed to the server
# (VIA --serve-arg) or the bench client (VIA --bench-arg), interleaved over ROUNDS rounds, 3 runs each.
online_ab() {
  local rounds="$1" flag="$2" via="$3"
  shift 3
  for round in $(seq "$rounds"); do
    for value in "$@"; do
      timeout 200 python3 benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 --input-len 512 \
        --output-len 256 --runs 3 --out-dir "$OUT" "$via=--$flag" "$via=$value" 2>&1 \
        | grep '^{' | sed "s/^/[round $round, $flag $value] /"
    done
  done
}
# structured_ab LABEL FLAG VALUE...: W1 with every request under the JSON schema, alternating with
# unconstrained runs (STRUCTURED_RUNS of each, 3 by default), once per VALUE of
# `offline_throughput.py --FLAG`; one line of tok/s per value.
structured_ab() {
  local label="$1" flag="$2"
  shift 2
  for value in "$@"; do
    timeout 150 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b --dummy --num-requests 256 \
      --input-len 512 --output-len 256 --runs "${STRUCTURED_RUNS:-3}" --structured "--$flag" "$value" 2>&1 \
      | grep -E '^\{"engine"' | grep -oE '"engine": "[a-z-]+"|"output_tok_s": [0-9.]+' | paste -sd' ' \
      | sed "s/^/[$label $value] /"
  done
}
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case "$step" in
    tests)
      # The whole GPU suite takes over 200 s on an H200.
      timeout 480 python3 -m pytest -m gpu tests/gpu tests/test_sampler.py -q -p no:cacheprovider -o addopts="" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
    w1)
      timeout 240 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b --dummy --num-requests 256 \
        --input-len 512 --output-len 256 --runs 3 --json-out "$OUT/w1.json" 2>&1 | grep -v Loading | tail -8 ;;
    single)
      timeout 100 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b --dummy --num-requests 1 \
        --input-len 512 --output-len 256 --runs 3 --json-out "$OUT/single.json" 2>&1 | grep -v Loading | tail -5 ;;
    long_prefill)
      # 64 prompts of 8,000 tokens, 64 out each: the prefill kernel at long context (total tok/s).
      timeout 240 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b --dummy --num-requests 64 \
        --input-len 8000 --output-len 64 --runs 3 --json-out "$OUT/long_prefill.json" 2>&1 | grep -v Loading | tail -5
      python3 benchmarks/throughput_floor.py --shape llama-3.2-1b --num-requests 64 --input-len 8000 --output-len 64 ;;
    decode_splits)
      # Single-stream ITL with the one-request decode attention's split count and tile set by hand
      # (benchmarks/decode_split_sweep.py); DECODE_SHAPES_1B / DECODE_SHAPES_8B: ';'-separated settings.
      for model in 1b 8b; do
        if [ "$model" = 1b ]; then shape=llama-3.2-1b; shapes="${DECODE_SHAPES_1B:-;splits=1;splits=4;splits=8;splits=16;}"
        else shape=llama-3.1-8b; shapes="${DECODE_SHAPES_8B:-;splits=16;}"; fi
        IFS=';' read -ra settings <<< "$shapes"
        for setting in "${settings[@]}" ""; do
          BATCHLM_DECODE_SHAPE="$setting" timeout 150 python3 benchmarks/decode_split_sweep.py --shape "$shape" \
            --dummy --num-requests 1 --input-len 512 --output-len 256 --runs 3 2>&1 \
            | grep -oE '"itl_ms_median": [0-9.]+' | paste -sd' ' | sed "s/^/[$model, ${setting:-engine}] /"
        done
      done ;;
    ablation)
      for parts in "" attn kv rope attn,kv,rope; do
        BATCHLM_ABLATE="$parts" timeout 100 python3 benchmarks/decode_step_ablation.py --shape llama-3.2-1b --dummy \
          --num-requests 1 --input-len 512 --output-len 256 --runs 3 2>&1 | grep -oE '"itl_ms_median": [0-9.]+' \
          | paste -sd' ' | sed "s/^/[left out: ${parts:-nothing}] /"
      done ;;
    w2)
      timeout 560 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b --dummy --num-requests 512 \
        --input-len 1000 --output-len 1000 --runs 3 --json-out "$OUT/w2.json" 2>&1 | grep -v Loading | tail -5 ;;
    online)
      # One JSON line per run (the bench's own report goes to online.log).
      timeout 300 python3 benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 --input-len 512 \
        --output-len 256 --runs 3 --out-dir "$OUT" 2>&1 | grep -v Loading | tee /tmp/online.log | grep '^{' ;;
    online_servers)
      # The online run with 1, 2 and 4 API-server processes (`--api-servers`), interleaved, two rounds
      # (API_SERVERS="1 2 4" and ROUNDS=2 by default), 3 runs each.
      online_ab "${ROUNDS:-2}" api-servers --serve-arg ${API_SERVERS:-1 2 4} ;;
    online_clients)
      # The online run with the bench client in 1 and 2 processes (`batchlm bench --client-processes`),
      # each against a fresh server: how much the single-process client holds the figure down.
      online_ab "${ROUNDS:-1}" client-processes --bench-arg 1 2 ;;
    scoring)
      # What prompt logprobs (echo with logprobs: lm-evaluation-harness's scoring) cost a prefill.
      timeout 300 python3 benchmarks/prompt_logprobs_cost.py --shape llama-3.2-1b --device cuda --prompts 64 \
        --prompt-len 512 --runs 3 2>&1 | grep -v Loading | tail -2 ;;
    online_endpoints)
      # The online run through each API: /completions, /chat/completions and /responses (`batchlm
      # bench --backend`), interleaved over ROUNDS rounds.
      online_ab "${ROUNDS:-1}" backend --bench-arg openai openai-chat openai-responses ;;
    online_profile)
      # The online run again, every process sampled by py-spy (carried as a wheel), with the server's
      # stats line every second; then the front end alone against a simulated engine (this host's CPU).
      lscpu | grep -E "Model name|^CPU\(s\)|MHz" | tee "$OUT/cpu.txt"
      pyspy="$(command -v py-spy || echo /tmp/site/bin/py-spy)"
      timeout 300 "$pyspy" record --subprocesses --nonblocking -r 100 -f raw -o "$OUT/online_profile.txt" -- \
        python3 benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 --input-len 512 --output-len 256 \
        --runs 3 --out-dir "$OUT" --server-log "$OUT/online_server.log" --server-log-level INFO \
        --serve-arg=--stats-log-interval --serve-arg=1 2>&1 | grep -v Loading | tail -14
      timeout 120 python3 benchmarks/frontend_capacity.py --runs 3 2>&1 | tail -5 ;;
    startup)
      cache="$(mktemp -d)"
      for run in cold warm1 warm2; do
        TRITON_CACHE_DIR="$cache" timeout 150 python3 benchmarks/serve_gpu.py --shape llama-3.2-1b \
          --requests 256 --input-len 512 --output-len 256 --runs 0 --server-log "$OUT/startup_$run.log" \
          --server-log-level INFO 2>&1 | grep -v Loading | sed "s/^/[$run] /"
      done ;;
    quant_tests)
      timeout 240 python3 -m pytest -m gpu tests/gpu/test_quant_kernels.py tests/gpu/test_fp8_kv_cache.py \
        tests/gpu/test_decode_linears.py tests/gpu/test_decode_linear_layers.py tests/gpu/test_quantized_models_gpu.py -q -p no:cacheprovider \
        -o addopts="" 2>&1 | tail -15 \
        | tee "$OUT/quant_tests.txt" ;;
    quant_kernels)
      timeout 150 python3 benchmarks/quant_kernels.py --json "$OUT/quant_kernels.json" 2>&1 | tail -34 ;;
    quant_single)
      for quant in none fp8 w4a16; do
        flag=(); [ "$quant" != none ] && flag=(--quantization "$quant")
        timeout 150 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b --dummy --num-requests 1 \
          --input-len 512 --output-len 256 --runs 3 "${flag[@]}" --json-out "$OUT/single8b_$quant.json" 2>&1 \
          | grep '^{' | tail -1 | sed "s/^/[$quant] /"
        python3 -c "import json,statistics,sys; r=json.load(open(sys.argv[1]))['runs']; print('[$quant] ITL ms median', statistics.median(x['itl_ms_median'] for x in r))" "$OUT/single8b_$quant.json"
      done ;;
    quant_w2)
      for variant in bf16 fp8; do
        flag=(); [ "$variant" = fp8 ] && flag=(--quantization fp8 --kv-cache-dtype fp8)
        timeout 280 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b --dummy --num-requests 512 \
          --input-len 1000 --output-len "${QUANT_W2_OUT:-256}" --runs 2 "${flag[@]}" \
          --json-out "$OUT/w2_$variant.json" 2>&1 | grep '^{' | tail -1 | sed "s/^/[$variant] /"
      done
      python3 -c "import json,sys; a,b=(json.load(open(p))['summary']['batchlm median output tok/s'] for p in sys.argv[1:]); print('W2 fp8 weights + fp8 KV over bf16:', round(b/a,2))" "$OUT/w2_bf16.json" "$OUT/w2_fp8.json" ;;
    mask_process)
      # A constrained step's masks without a model (256 rows, warm passes): from a thread beside 3 ms
      # of engine Python against a process of their own, then the flag's release beside that Python
      # (it takes the GIL) and beside one busy core (it does not).
      timeout 300 python3 benchmarks/grammar_mask_process.py --rows 256 --steps 128 --passes 3 \
        --engine-python-ms 0 3.0 2>&1 | grep '^{'
      for contention in "--engine-python-ms 3.0" "--engine-python-ms 0 --busy-processes 1"; do
        timeout 200 python3 benchmarks/grammar_host_step.py --rows 256 --steps 256 --hand-to-device --passes 3 \
          $contention 2>&1 | grep '^{'
      done ;;
    structured_threads)
      # llguidance's threads at each of MASK_THREADS: whether the engine thread gains more from free
      # cores than the masks lose.
      structured_ab "mask threads" mask-threads ${MASK_THREADS:-4 8 12} ;;
    structured_templates)
      # Compiled copies of the grammar per mask thread, at each of TEMPLATES (more copies: less waiting
      # on a shared lexer, more of them to warm up).
      structured_ab "templates per thread" templates-per-thread ${TEMPLATES:-2 4} ;;
    structured_switch)
      # Python's GIL switch interval at each of SWITCH_MS (ms; the engine sets 0.2 once constrained
      # requests run): whether the engine thread, which holds a constrained step, loses more to
      # forced GIL hand-overs than the mask worker gains from them.
      structured_ab "switch interval (ms)" switch-interval-ms ${SWITCH_MS:-0.2 1 5} ;;
    startup_profile)
      cache="$(mktemp -d)"
      TRITON_CACHE_DIR="$cache" timeout 150 python3 benchmarks/startup_profile.py --json-out "$OUT/startup_cold.json"
      TRITON_CACHE_DIR="$cache" timeout 200 python3 benchmarks/startup_profile.py --padding \
        --json-out "$OUT/startup_warm.json" ;;
  esac
done
