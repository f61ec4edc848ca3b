"""`compile_cache_dir`: every job's torch.compile cache in one folder, so a later job, a fresh process,
loads the graphs an earlier one compiled (compile_layers at the 8B shape: ~7 s from the cache against
~80 s cold, benchmarks/RESULTS.md Round 10)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from d2lora.runtime import COMPILE_CACHE_ENV, job

SRC = Path(__file__).resolve().parents[1] / "src"


def _snakemake(config: dict):
    return types.SimpleNamespace(threads=1, log=[], config=config)


def test_a_job_points_torch_compile_at_the_configs_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != COMPILE_CACHE_ENV})
    monkeypatch.chdir(tmp_path)
    with job(_snakemake({"compile_cache_dir": None})):
        assert COMPILE_CACHE_ENV not in os.environ  # torch's own default, a folder under /tmp
    with job(_snakemake({"compile_cache_dir": "cache/inductor"})):
        assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "cache" / "inductor")


# One job's compile, as a workflow script runs it: torch imported first, then the job wrapper.
COMPILING_JOB = """
import sys, types, torch
from torch._dynamo.utils import counters
from d2lora.runtime import job
with job(types.SimpleNamespace(threads=1, log=[], config={"compile_cache_dir": sys.argv[1]})):
    step = torch.compile(lambda x: torch.sin(x) * 2 + torch.cos(x).exp())
    step(torch.randn(64))
print(dict(counters["inductor"]))
"""


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler on the CPU")
def test_a_second_job_loads_the_graph_the_first_compiled(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop(COMPILE_CACHE_ENV, None)
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", COMPILING_JOB, "compile_cache"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(ast.literal_eval(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    assert second.get("fxgraph_cache_hit", 0) >= 1 and not second.get("fxgraph_cache_miss"), second
    assert any((tmp_path / "compile_cache").iterdir())
