#!/bin/bash
# Training-job start-up with and without the cell server (benchmarks/training_startup.py) on the
# mini preset's real 135M model and math training rows; progress in /root/training_startup.log.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /root/run
echo "== $(date +%T) base model and math rows"
python3 -m snakemake --cores 4 --scheduler greedy results/model/base results/data/math --configfile config/mini.yaml > /root/prepare.log 2>&1 || { tail -30 /root/prepare.log; exit 1; }
# config/mini.yaml's SFT settings (Table 2's batch; the preset's learning rate), on 64 rows: mostly start-up
HP='{"learning_rate": 1e-4, "epochs": 1, "scheduler": "cosine", "batch_size": 8, "grad_accum": 2, "max_length": 1024, "bf16": "auto"}'
echo "== $(date +%T) SFT, eager"
python3 benchmarks/training_startup.py --model results/model/base --data results/data/math --method sft \
  --rows 64 --jobs ${JOBS:-4} --device cuda --hp "$HP" --out benchmarks/out/training_startup_eager
echo "== $(date +%T) SFT, compiled layers: a server's later cells reuse the graphs"
python3 benchmarks/training_startup.py --model results/model/base --data results/data/math --method sft \
  --rows 64 --jobs ${JOBS:-4} --device cuda --hp "${HP%\}}, \"compile_layers\": true}" --out benchmarks/out/training_startup_compiled
echo "== $(date +%T) done"
