#!/bin/bash
# Evaluate-job start-up with and without the cell server (benchmarks/evaluate_startup.py) on the
# mini preset's real 135M model and GSM8K test set; progress in /root/evaluate_startup.log.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /root/run
echo "== $(date +%T) base model and GSM8K"
python3 -m snakemake --cores 4 --scheduler greedy results/model/base results/data/math --configfile config/mini.yaml > /root/prepare.log 2>&1 || { tail -30 /root/prepare.log; exit 1; }
# config/mini.yaml's GSM8K settings and prompt
SETTINGS='{"max_new_tokens": 384, "batch_size": 1319, "cache": "static", "compile": false, "rows_leave_every": 32, "dtype": "auto", "engine": "pipeline", "merge_adapter": true, "prompt_template": "{question} Please reason step by step, and put your final answer within \\boxed{}."}'
echo "== $(date +%T) 64 prompts a job: mostly start-up"
python3 benchmarks/evaluate_startup.py --model results/model/base --data results/data/math --benchmark gsm8k \
  --rows 64 --jobs ${JOBS:-6} --device cuda --settings "$SETTINGS" --out benchmarks/out/evaluate_startup_64
echo "== $(date +%T) all 1,319 prompts a job"
python3 benchmarks/evaluate_startup.py --model results/model/base --data results/data/math --benchmark gsm8k \
  --jobs ${JOBS:-6} --device cuda --settings "$SETTINGS" --out benchmarks/out/evaluate_startup_all
echo "== $(date +%T) done"
