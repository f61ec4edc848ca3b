"""Snakemake's own linter finds nothing in the workflow, and the code is formatted (GitHub issue 14, item 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_snakemake_lint_is_clean():
    snakemake = Path(sys.executable).with_name("snakemake")
    result = subprocess.run([str(snakemake), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Lints for" not in output, output[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in output


def test_python_and_rules_are_formatted():
    """What `make lint` checks before the suite, also checked here so a run of pytest alone sees it."""
    tools = Path(sys.executable).parent
    for command in (
        [str(tools / "ruff"), "format", "--check", "src", "tests", "benchmarks", "workflow/scripts"],
        [str(tools / "ruff"), "check", "src", "tests", "benchmarks", "workflow/scripts"],
        [str(tools / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
    ):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command[1:])}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
