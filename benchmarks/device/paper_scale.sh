#!/bin/bash
# The paper-shape measurement (benchmarks/paper_scale.py), in /root/run (one commit); progress in
# /root/paper_scale.log. Started by start.sh with MODE=paper_scale instead of pipeline.sh.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One process, stages one after another: expandable segments let a stage reuse what the last one freed
# (the evaluation's KV cache grows every token) instead of fragmenting the cache.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# Why torch.compile recompiled, if it does (compiled levers); silent otherwise.
export TORCH_LOGS=recompiles
cd /root/run
echo "== $(date +%T) paper scale, commit ${D2LORA_GIT_COMMIT:-unknown}, stages ${STAGES:-all}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# WITHOUT_PLAIN=1: only the levers LEVERS names, without plain (a short run of two levers side by side).
# PROCESSES=2 runs the same stages again in a fresh process, as the next job on the node would find it:
# inductor's on-disk cache warm (compiled levers), the base model in the page cache. Each process's
# summary is kept as summary_process<i>.json.
for process in $(seq 1 "${PROCESSES:-1}"); do
  echo "== $(date +%T) process $process of ${PROCESSES:-1}"
  python3 benchmarks/paper_scale.py --config config/paper_shape.yaml --out benchmarks/results_paper_scale ${STAGES:+--stages "$STAGES"} ${LEVERS:+--levers "$LEVERS"} ${WITHOUT_PLAIN:+--without-plain} ${PROFILE_STEPS:+--profile-steps "$PROFILE_STEPS"}
  code=$?
  cp benchmarks/results_paper_scale/summary.json "benchmarks/results_paper_scale/summary_process$process.json"
done
# DECODE_PROFILE_ROWS=N: then profile eager GSM8K decoding steps of a batch of N rows at this shape
# (benchmarks/decode_profile.py): where a step's time goes.
if [ "${DECODE_PROFILE_ROWS:-0}" -gt 0 ]; then
  echo "== $(date +%T) decoding profile, ${DECODE_PROFILE_ROWS} rows"
  python3 benchmarks/decode_profile.py --model benchmarks/results_paper_scale/work/model/base \
    --data benchmarks/results_paper_scale/work/data/math --rows "$DECODE_PROFILE_ROWS" \
    --out benchmarks/results_paper_scale/decode_profile > /root/decode_profile.log 2>&1
  code=$?
  tail -15 /root/decode_profile.log
fi
# STARTUP_JOBS=N: then N GSM8K evaluate jobs at this shape (the model and data just prepared), each a
# fresh process as Snakemake starts one, without and with the cell server (benchmarks/evaluate_startup.py):
# the 8B model's per-job start-up, and whether a server's compiled decoding step serves its next cells.
# STARTUP_SETTINGS (JSON) overrides config/paper_shape.yaml's GSM8K settings; STARTUP_MODES (default
# own,server) may add server_kept, the server keeping the base weights in host memory. Where this run trained
# an SFT adapter (stage sft, or levers_sft's plain lever), every job evaluates it: a merged evaluation's
# start-up then includes the merge.
if [ "${STARTUP_JOBS:-0}" -gt 0 ]; then
  echo "== $(date +%T) evaluate start-up at this shape, ${STARTUP_JOBS} jobs a mode"
  OVERRIDES=${STARTUP_SETTINGS:-"{}"}
  SETTINGS=$(python3 benchmarks/paper_scale.py --config config/paper_shape.yaml --print-eval-settings "$OVERRIDES") || exit 1
  echo "settings: $SETTINGS"
  ADAPTER=""
  for stage in sft levers_sft_plain; do
    [ -f "benchmarks/results_paper_scale/work/adapters/$stage/training.json" ] && ADAPTER="benchmarks/results_paper_scale/work/adapters/$stage"
  done
  echo "adapter: ${ADAPTER:-none}"
  python3 benchmarks/evaluate_startup.py --model benchmarks/results_paper_scale/work/model/base \
    --data benchmarks/results_paper_scale/work/data/math --benchmark gsm8k --jobs "$STARTUP_JOBS" --device cuda ${ADAPTER:+--adapter "$ADAPTER"} \
    --settings "$SETTINGS" ${STARTUP_MODES:+--modes "$STARTUP_MODES"} --out benchmarks/results_paper_scale/startup
  code=$?
fi
echo "== $(date +%T) done, exit $code"
