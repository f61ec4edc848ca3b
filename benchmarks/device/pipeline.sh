#!/bin/bash
# The measured work, in /root/run (one commit); progress in /root/pipeline.log.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Several jobs share the GPU: expandable segments return freed memory instead of caching it per process.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd /root/run
echo "== $(date +%T) base model"
python3 -m snakemake --cores 4 --scheduler greedy results/model/base --configfile config/mini.yaml > /root/prepare.log 2>&1 || { tail -30 /root/prepare.log; exit 1; }
if [ -z "$SKIP_SPEED" ]; then
echo "== $(date +%T) speed levers"
timeout 360 python3 benchmarks/speed.py --out benchmarks/out ${SPEED_ARGS:-} > /root/speed.log 2>&1
echo "speed exit $?"; grep -E "^(bf16|fp32|lora|trl_|ours)" /root/speed.log
if [ -f benchmarks/dynamic_lora_overhead.py ]; then
  echo "== $(date +%T) dynamic lora overhead"
  timeout 120 python3 benchmarks/dynamic_lora_overhead.py --model results/model/base --device cuda > /root/dynamic.log 2>&1; echo "dynamic exit $?"
fi
fi
echo "== $(date +%T) mini grid"
python3 benchmarks/run_mini.py run --cores 16 --gpu-jobs ${GPU_JOBS:-3} --out benchmarks/out --scheduler greedy
echo "== $(date +%T) done"
