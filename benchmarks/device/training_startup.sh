#!/bin/bash
# Training-job start-up with and without the cell server (benchmarks/training_startup.py); progress
# in /root/training_startup.log. SHAPE=135m (default): SFT on the mini preset's real 135M model and
# math training rows, eager and then with compile_layers. SHAPE=8b: one DPO cell at the
# Llama-3.1-8B shape (random init, benchmarks/paper_scale.py's model and stand-in pairs) with
# config/paper_shape.yaml's DPO settings (compiled layers, reference precomputed), one epoch.
export PYTHONPATH=/tmp/site:/root/run/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd /root/run
if [ "${SHAPE:-135m}" = 8b ]; then
  echo "== $(date +%T) base model at the 8B shape and math pairs (paper_scale.py --stages prepare)"
  python3 benchmarks/paper_scale.py --config config/paper_shape.yaml --out benchmarks/results_paper_scale --stages prepare > /root/prepare.log 2>&1 || { tail -30 /root/prepare.log; exit 1; }
  # The preset's DPO settings and LoRA shape; one epoch of 64 pairs is 4 optimizer steps: mostly start-up.
  HP=$(python3 -c "import json, yaml; hp = yaml.safe_load(open('config/paper_shape.yaml'))['training']['adapt']['dpo']; print(json.dumps({**hp, 'epochs': 1}))")
  LORA=$(python3 -c "import json, yaml; print(json.dumps(yaml.safe_load(open('config/paper_shape.yaml'))['training']['lora']))")
  echo "== $(date +%T) DPO at the 8B shape, the preset's settings: $HP"
  python3 benchmarks/training_startup.py --model benchmarks/results_paper_scale/work/model/base \
    --data benchmarks/results_paper_scale/work/data/math --method dpo --rows 64 --jobs ${JOBS:-3} \
    --device cuda --hp "$HP" --lora "$LORA" --out benchmarks/out/training_startup_8b_dpo
  echo "== $(date +%T) done"
  exit 0
fi
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
