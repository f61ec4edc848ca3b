#!/bin/bash
# Progress of the paper-shape measurement, and its results packed into $OUT (4 files): the summary
# (rewritten after every stage), the log, and a tarball of the per-stage records (with the real 135M
# model's answers, whose lengths bound what finished rows leaving the batch can save) and of the
# start-up jobs (STARTUP_JOBS) and the decoding profile (DECODE_PROFILE_ROWS). The 16 GB base
# model and the adapters stay on the node.
cd /root/run 2>/dev/null || exit 0
RES=benchmarks/results_paper_scale
grep -aE "^\[paper_scale|^==|Error|Traceback" /root/paper_scale.log 2>/dev/null | tail -25
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
[ -n "$OUT" ] || exit 0
cp $RES/summary*.json /root/paper_scale.log $OUT/ 2>/dev/null
tar -czf $OUT/paper_scale_records.tar.gz $RES/summary.json \
   $(ls $RES/work/model/prepare.json $RES/work/model/base/source.json $RES/work/model/base/config.json 2>/dev/null) \
   $(ls $RES/work/adapters/*/training.json $RES/work/adapters/*/manifest.json 2>/dev/null) \
   $(ls $RES/work/data/*/manifest.json $RES/work/data/onpolicy/*/*.manifest.json 2>/dev/null) \
   $(ls $RES/work/eval/*/scores.json $RES/work/eval/gsm8k/manifest.json $RES/work/model/small/source.json 2>/dev/null) \
   $(ls $RES/work/eval/levers_gsm8k_small_*/predictions.jsonl $RES/profile_*.txt 2>/dev/null) \
   $(ls $RES/decode_profile/* /root/decode_profile.log 2>/dev/null) \
   $(ls $RES/startup/summary.json $RES/startup/*/job*/scores.json $RES/startup/*/job*/evaluate.log $RES/startup/server/*.log 2>/dev/null) 2>/dev/null
ls -la $OUT
