#!/bin/bash
# A speed lever's accuracy on a preset (benchmarks/lever_accuracy.py), in /root/run (one commit);
# progress in /root/lever_accuracy.log. Started by start.sh with MODE=lever_accuracy.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Several jobs share the GPU: expandable segments return freed memory instead of caching it per process.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd /root/run
echo "== $(date +%T) lever accuracy, commit ${D2LORA_GIT_COMMIT:-unknown}: ${LEVER} on ${CONFIG}, methods ${METHODS}, benchmarks ${BENCHMARKS}, inits ${INITS:-all}, n ${N:-all}, seeds ${SEEDS:-preset}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/lever_accuracy.py --config "$CONFIG" --lever "$LEVER" --methods "$METHODS" --benchmarks "$BENCHMARKS" \
  ${INITS:+--inits "$INITS"} ${N:+--n "$N"} ${SEEDS:+--seeds "$SEEDS"} --out benchmarks/out/lever_accuracy \
  -- --cores 16 --resources gpu="${GPU_JOBS:-3}" --scheduler greedy --keep-going
status=$?  # before the echo's own $(date) replaces it
echo "== $(date +%T) done, exit $status"
