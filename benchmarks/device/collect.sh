#!/bin/bash
# Progress so far, and everything worth keeping packed into the output folder $OUT (8 files at most).
# A node started with MODE=paper_scale has its own, smaller collection.
[ -f /root/paper_scale.sh ] && exec bash "$(dirname "$0")/collect_paper_scale.sh"
if [ -f /root/lever_accuracy.sh ]; then
  tail -12 /root/lever_accuracy.log 2>/dev/null
  cd /root/run 2>/dev/null || exit 0
  for log in benchmarks/out/lever_accuracy/snakemake_*.log; do
    [ -f "$log" ] && echo "$log: $(grep -E '^[0-9]+ of [0-9]+ steps' "$log" | tail -1)"
  done
  grep -h -B2 -A8 "^Error in rule" benchmarks/out/lever_accuracy/snakemake_*.log 2>/dev/null | head -30
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  [ -n "$OUT" ] || exit 0
  # The arms as kept so far, and what results/ holds now (an arm cut short leaves its finished cells there).
  tar -czf $OUT/lever_accuracy.tar.gz benchmarks/out/lever_accuracy results/provenance \
    $(find results/eval -name predictions.jsonl -o -name scores.json 2>/dev/null) \
    $(ls results/adapters/*/*/*/*/*/training.json results/data/*/manifest.json 2>/dev/null) 2>/dev/null
  tar -czf $OUT/logs.tar.gz logs /root/lever_accuracy.log 2>/dev/null
  cp /root/lever_accuracy.log $OUT/ 2>/dev/null; ls -la $OUT
  exit 0
fi
if [ -f /root/evaluate_startup.sh ]; then
  cat /root/evaluate_startup.log 2>/dev/null | tail -30
  [ -n "$OUT" ] && cd /root/run && cp /root/evaluate_startup.log $OUT/ && \
    tar -czf $OUT/evaluate_startup.tar.gz $(ls benchmarks/out/evaluate_startup_*/summary.json benchmarks/out/evaluate_startup_*/*/job*/*.json benchmarks/out/evaluate_startup_*/*/job*/*.log 2>/dev/null) && ls -la $OUT
  exit 0
fi
if [ -f /root/training_startup.sh ]; then
  cat /root/training_startup.log 2>/dev/null | tail -30
  [ -n "$OUT" ] && cd /root/run && cp /root/training_startup.log $OUT/ && \
    tar -czf $OUT/training_startup.tar.gz $(ls benchmarks/out/training_startup_*/summary.json benchmarks/out/training_startup_*/*/job*/adapter/training.json benchmarks/out/training_startup_*/*/job*/*.log benchmarks/out/training_startup_*/server_logs/*.log 2>/dev/null) && ls -la $OUT
  exit 0
fi
cd /root/run 2>/dev/null || exit 0
export PYTHONPATH=/tmp/site:/root/run/src
cat /root/pipeline.log | tail -25
grep -c "Finished job" benchmarks/out/snakemake.log 2>/dev/null | sed 's/^/finished jobs: /'
grep -E "^[0-9]+ of [0-9]+ steps" benchmarks/out/snakemake.log 2>/dev/null | tail -1
grep -B2 -A8 "^Error in rule" benchmarks/out/snakemake.log 2>/dev/null | head -40
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
python3 benchmarks/run_mini.py table --out benchmarks/out > /dev/null 2>&1 || true
[ -n "$OUT" ] || exit 0
tar -czf $OUT/results.tar.gz results/metrics results/figures results/tables results/provenance results/benchmarks \
   $(ls -d results/adapters/*/*/*/*/*/training.json results/warmup/*/*/training.json results/warmup/*/training.json 2>/dev/null) \
   $(find results/eval -name scores.json -o -name manifest.json 2>/dev/null) $(ls results/data/*/manifest.json 2>/dev/null) \
   benchmarks/out/*.json benchmarks/out/*.md benchmarks/out/*.tsv 2>/dev/null
tar -czf $OUT/predictions.tar.gz $(find results/eval -name predictions.jsonl 2>/dev/null) 2>/dev/null
tar -czf $OUT/logs.tar.gz logs benchmarks/out/snakemake.log /root/*.log 2>/dev/null
cp /root/pipeline.log /root/speed.log $OUT/ 2>/dev/null; cp benchmarks/out/timing.md benchmarks/out/summary.json $OUT/ 2>/dev/null
ls -la $OUT
