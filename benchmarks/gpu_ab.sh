#!/usr/bin/env bash
# Two source trees against each other in one call on the GPU machine, runs interleaved (machines differ
# by up to 15%, and one host drifts within a call, so only pairs taken side by side compare).
# Usage: bash benchmarks/gpu_ab.sh OLD_SRC NEW_SRC [single1b] [single8b] [single8b_fp8] [single8b_w4a16] [w1]
#        [online] [w1_structured] [w1_structured_free] [online_structured] [long_prefill] [w2]
#   OLD_SRC, NEW_SRC: folders holding the `batchlm` package (e.g. `git archive REV src | tar -x -C
#   /tmp/old` gives /tmp/old/src). The benchmark scripts are this tree's; only the package differs.
#   ROUNDS (default 2): rounds per workload; each round runs both trees, the order swapped every round.
# Prints one line per process (the figure of each of its runs) and, per workload, the median of each tree's runs
# and new / old. single*: ITL in ms (lower is better; single8b_fp8 and single8b_w4a16: the 8B quantized at
# load); w1, long_prefill (64 x 8,000 in / 64 out), w2 (512 x 1,000 / 1,000, 8B), online*: output tok/s
# (higher is better; online_structured: every request under the bounded schema);
# w1_structured*: W1 under offline_throughput.py's JSON schema (bounded or free last field), each
# structured run over the plain run before it in the same engine (higher is better).
# Needs $OUT (results folder), and on PYTHONPATH the wheels the machine lacks (each tree goes ahead of them).
set -u
old="$1" new="$2"
shift 2
workloads="${*:-single1b single8b w1}"
OUT="${OUT:-/tmp/batchlm-gpu-ab}"
mkdir -p "$OUT"
S="--dummy --input-len 512 --output-len 256 --runs 3"

# run TREE WORKLOAD FILE: one process of the workload on TREE, its output in FILE.
run() {
  local tree="$1" workload="$2" file="$3"
  # The tree first, ahead of whatever the caller's path holds (the carried wheels).
  local PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONPATH
  case "$workload" in
    single1b) timeout 90 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b $S --num-requests 1 ;;
    single8b) timeout 120 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b $S --num-requests 1 ;;
    single8b_fp8 | single8b_w4a16)
      timeout 200 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b $S --num-requests 1 \
        --quantization "${workload#single8b_}" ;;
    w1) timeout 120 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b $S --num-requests 256 ;;
    long_prefill) timeout 240 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b --dummy --num-requests 64 \
      --input-len 8000 --output-len 64 --runs 3 ;;
    w2) timeout 400 python3 benchmarks/offline_throughput.py --shape llama-3.1-8b --dummy --num-requests 512 \
      --input-len 1000 --output-len 1000 --runs 2 ;;
    w1_structured) timeout 200 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b $S --num-requests 256 \
      --structured ;;
    w1_structured_free) timeout 200 python3 benchmarks/offline_throughput.py --shape llama-3.2-1b $S \
      --num-requests 256 --structured --summary-field free ;;
    online)
      timeout 200 python3 benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 \
        --input-len 512 --output-len 256 --runs 3 --out-dir "$OUT/serve" ;;
    online_structured)
      timeout 200 python3 benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 \
        --input-len 512 --output-len 256 --runs 3 --out-dir "$OUT/serve" --structured bounded ;;
    *) echo "unknown workload: $workload" >&2; return 2 ;;
  esac >"$file" 2>&1
}

# values WORKLOAD FILE: the figure of each run in FILE, one per line.
values() {
  case "$1" in
    single*) grep -oE '"itl_ms_median": [0-9.]+' "$2" | grep -oE '[0-9.]+$' ;;
    w1 | long_prefill | w2) grep -E '^\{"engine"' "$2" | grep -oE '"output_tok_s": [0-9.]+' | grep -oE '[0-9.]+$' ;;
    online*) grep -oE '"output_throughput": [0-9.]+' "$2" | grep -oE '[0-9.]+$' ;;
    w1_structured*) grep -oE '"structured_over_plain_pairs": \[[0-9., ]+\]' "$2" | grep -oE '[0-9]+\.[0-9]+' ;;
  esac
}

for workload in $workloads; do
  : >"$OUT/ab_${workload}_old.txt"
  : >"$OUT/ab_${workload}_new.txt"
  for round in $(seq "${ROUNDS:-2}"); do
    order="old new"
    [ $((round % 2)) -eq 0 ] && order="new old"
    for which in $order; do
      tree="$old"
      [ "$which" = new ] && tree="$new"
      log="$OUT/ab_${workload}_${which}_$round.log"
      run "$tree" "$workload" "$log"
      figures="$(values "$workload" "$log" | tee -a "$OUT/ab_${workload}_$which.txt" | paste -sd' ')"
      echo "[$workload round $round $which] ${figures:-no result (see $log)}"
    done
  done
  python3 - "$workload" "$OUT/ab_${workload}_old.txt" "$OUT/ab_${workload}_new.txt" <<'EOF'
import statistics, sys
workload, old_file, new_file = sys.argv[1:]
old = [float(x) for x in open(old_file).read().split()]
new = [float(x) for x in open(new_file).read().split()]
if old and new:
    a, b = statistics.median(old), statistics.median(new)
    unit = "ms ITL" if workload.startswith("single") else "output tok/s"
    if workload.startswith("w1_structured"):
        unit = "structured / plain"
    print(f"[{workload}] median of {len(old)} / {len(new)} runs: old {a:g}, new {b:g} {unit}; new / old {b / a:.4f}")
else:
    print(f"[{workload}] missing runs: old {len(old)}, new {len(new)}")
EOF
done
