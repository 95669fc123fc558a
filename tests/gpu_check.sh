#!/usr/bin/env bash
# The CUDA paths and the GPU speed figures in one go (README: Performance, "On a GPU"), for a machine with a CUDA
# GPU and this repo's requirements (torch with CUDA). Every step runs under its own time limit and under one
# overall deadline, most important first, so that a slow step costs the ones after it and nothing else.
#
#     bash tests/gpu_check.sh                 # writes gpu_check_out/{summary.txt,all.log,bench.jsonl}
#     OUT=/tmp/x DEADLINE=560 bash tests/gpu_check.sh   # within one 10-minute device call: the first steps
#
# summary.txt: one line per step (exit code, seconds); bench.jsonl: bench.py's JSON lines; all.log: every output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DEADLINE=${DEADLINE:-1100}   # seconds for the whole script (the step limits add up to ~1100)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"; : > "$OUT/all.log"; : > "$OUT/bench.jsonl"
START=$EPOCHREALTIME
RESULTS=$(mktemp -d)/results

step() {   # step NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, what is left of DEADLINE)
    local name=$1 limit=$2 t0=$EPOCHREALTIME left rc; shift 2
    left=$(awk -v s="$START" -v n="$EPOCHREALTIME" -v d="$DEADLINE" 'BEGIN { printf "%d", d - (n - s) }')
    if (( left < 5 )); then echo "$name: skipped (deadline)" | tee -a "$OUT/summary.txt"; return; fi
    (( limit > left )) && limit=$left
    echo "===== $name (limit ${limit}s): $*" >> "$OUT/all.log"
    timeout "$limit" "$@" > "$OUT/step.log" 2>&1
    rc=$?
    cat "$OUT/step.log" >> "$OUT/all.log"
    grep -h '^{' "$OUT/step.log" >> "$OUT/bench.jsonl"
    awk -v n="$name" -v r="$rc" -v a="$t0" -v b="$EPOCHREALTIME" \
        'BEGIN { printf "%-26s rc=%-4s %7.1f s%s\n", n, r, b - a, (r == 124 ? "  (time limit)" : "") }' \
        | tee -a "$OUT/summary.txt"
    rm -f "$OUT/step.log"
}

newest_run() { ls -1d "$RESULTS"/*_lstm_gan 2>/dev/null | tail -1 | xargs -r basename; }

step gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
step python 60 $PY -c "import torch, sklearn, scipy, h5py, pandas, matplotlib, tqdm
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(),
      'devices', torch.cuda.device_count(), 'threads', torch.get_num_threads())"

# the test suite's CUDA-capable tests (the `device` fixture: cpu and cuda); no notebook/Keras packages needed
step pytest_cuda 150 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_lean_lstm.py tests/test_bench.py \
    tests/test_soc_estimator.py tests/test_generate.py tests/test_evaluate.py tests/test_train_lstm_gan.py

# a conditional run with the mode-seeking term (the generator step's paired draws on the device)
step conditional_e2 60 $PY train_lstm_gan.py --preset cpu --condition temperature --mode-seeking 0.3 -e 2 -s 2 \
    -ess 16 --device cuda --results-dir "$RESULTS/conditional"

# the paper config, fp32: critic and generator iterations (reference and fast), the equal-loss check
step bench_fp32 90 $PY bench.py --device cuda --precision fp32 --steps 3 --warmup 1 --check-steps 2 --label-seqs 0
# the main command on the GPU (about 13 s per paper epoch on an H100), resumed, then generate.py and evaluate.py
step train_e3 120 $PY train_lstm_gan.py -e 3 -s 1 -ess 64 --device cuda --results-dir "$RESULTS"
RUN=$(newest_run)
echo "run: ${RUN:-none}" | tee -a "$OUT/summary.txt"
if [[ -n "$RUN" ]]; then
    step resume_e5 100 $PY train_lstm_gan.py -r "$RUN" -e 5 --results-dir "$RESULTS"
    step generate 45 $PY generate.py -r "$RUN" --results-dir "$RESULTS" -n 1000 -o "$RESULTS/synthetic.parquet" \
        --device cuda --seed 1
    step evaluate 90 $PY evaluate.py -r "$RUN" --results-dir "$RESULTS" --device cuda
    cp "$RESULTS/$RUN/losses.csv" "$OUT/losses.csv" 2>/dev/null
fi

# the fast critic step as one CUDA graph (experimental), and its operators (torch.profiler; at 60 steps, since the
# profiler cannot keep up with the ~1.2 x 10^5 kernels of 600 steps within a minute)
step bench_cuda_graph 90 $PY bench.py --device cuda --impl fast --steps 3 --warmup 1 --check-steps 0 \
    --label-seqs 0 --cuda-graph
step bench_profile_60_steps 60 $PY bench.py --device cuda --impl fast --seq-len 60 --steps 1 --warmup 0 \
    --check-steps 0 --label-seqs 0 --profile
# the snapshot at -ess 4000: generate + label 4000 sequences, PCA and t-SNE of 4000 + 4000
step eval_ess4000 120 $PY bench.py --device cuda --impl fast --steps 1 --warmup 0 --check-steps 0 --label-seqs 0 \
    --eval-seqs 4000
step soc_bench_4000 60 $PY soc_estimator.py --bench 4000 --device cuda

step bench_tf32 60 $PY bench.py --device cuda --impl fast --precision tf32 --steps 2 --warmup 1 --check-steps 0 \
    --label-seqs 0
step bench_bf16 60 $PY bench.py --device cuda --impl fast --precision bf16 --steps 2 --warmup 1 --check-steps 0 \
    --label-seqs 0
step bench_b512_chunk128 60 $PY bench.py --device cuda --impl fast --batch 512 --critic-chunk 128 --steps 1 \
    --warmup 0 --check-steps 0 --label-seqs 0
# --gpus with two ids (DataParallel) and torchrun with two processes (NCCL) need two GPUs
echo "gpus: $($PY -c 'import torch; print(torch.cuda.device_count())') (--gpus 0,1 needs two)" | tee -a "$OUT/summary.txt"
