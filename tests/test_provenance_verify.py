"""Result manifests, `python -m d2lora.verify`, and tokens kept out of logs and manifests.

A small results/ folder is built with the package's entry points (data, base model, a trained
adapter, an evaluation cell), inside d2lora.runtime.job as a workflow script would run them, with
a fake hub token in the environment. Then: every result has a manifest that verify accepts;
tampering with any file is reported (exit code 1); the token appears nowhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from d2lora.data.prepare import prepare_role
from d2lora.evaluation.run import evaluate_cell
from d2lora.manifests import config_sha256, manifest_table
from d2lora.runtime import job
from d2lora.training.run import run_adaptation
from d2lora.verify import main as verify_main
from d2lora.verify import verify

REPO = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"
OTHER_TOKEN = "sk-another-FAKE-secret-4242"
TEMPLATE = "{question} Please reason step by step, and put your final answer within \\boxed{}."
CONFIG = {"run_name": "verify-test", "hf_token_env": "MY_HUB_TOKEN", "training": {"checkpoint_steps": 1}}
ADAPTER = "results/adapters/math/sft/lora/n2/s0"
EVAL = "results/eval/gsm8k/math/sft/lora/n2/s0"


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("HF_TOKEN", FAKE_TOKEN)
    mp.setenv("MY_HUB_TOKEN", OTHER_TOKEN)  # named by the config's hf_token_env
    shutil.copytree(tiny_model_dir, "results/model/base")
    fake = SimpleNamespace(threads=1, log=["logs/adapt.log"], config=CONFIG)
    try:
        with job(fake):
            print(f"a careless library prints the token: {FAKE_TOKEN} and {OTHER_TOKEN}")
            role = {
                "prompt_template": TEMPLATE,
                "train": {"source": "synthetic", "kind": "math", "rows": 4},
                "eval": {"source": "synthetic", "kind": "math", "rows": 2},
            }
            prepare_role("math", role, "results/data/math", seed=0, max_n=2)
            hp = {"learning_rate": 1e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 512}
            run_adaptation(
                "results/model/base",
                "results/data/math/train.jsonl",
                method="sft",
                init="lora",
                n=2,
                lora={"rank": 4, "alpha": 8},
                hp=hp,
                out_dir=ADAPTER,
                seed=0,
                device="cpu",
                checkpoint_steps=1,
            )
        fake.log = ["logs/evaluate.log"]
        with job(fake):
            evaluate_cell(
                "gsm8k",
                cell={"task": "math", "method": "sft", "init": "lora", "n": 2, "seed": 0},
                model_dir="results/model/base",
                adapter_dir=ADAPTER,
                data_dir="results/data/math",
                settings={"max_new_tokens": 4, "batch_size": 2, "prompt_template": TEMPLATE},
                scores_path=f"{EVAL}/scores.json",
                predictions_path=f"{EVAL}/predictions.jsonl",
                device="cpu",
            )
        yield work
    finally:
        mp.undo()


def test_every_result_carries_a_manifest(results):
    for folder in (results / ADAPTER, results / EVAL):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["config_sha256"] == config_sha256(CONFIG)
        assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
        assert manifest["host"] and manifest["device"].startswith("cpu") and manifest["job_device"] == "cpu"
        assert manifest["packages"]["torch"] and manifest["packages"]["transformers"]
        assert all(len(sha) == 64 for sha in manifest["outputs"].values())
        assert "model" in manifest["inputs"]
    adapter = json.loads((results / ADAPTER / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "training.json"} <= set(adapter["outputs"])
    assert adapter["inputs"]["train_data"]["path"] == "results/data/math/train.jsonl"
    evaluation = json.loads((results / EVAL / "manifest.json").read_text())
    assert set(evaluation["outputs"]) == {"scores.json", "predictions.jsonl"}
    assert set(evaluation["inputs"]) == {"model", "adapter", "eval_data"}
    table = manifest_table([results / ADAPTER / "manifest.json", results / EVAL / "manifest.json"])
    assert list(table["kind"]) == ["evaluation", "training"] and table["config_sha256"].str.len().eq(12).all()


def test_the_token_appears_nowhere(results):
    leaks = [
        str(p)
        for p in results.rglob("*")
        if p.is_file()
        if FAKE_TOKEN.encode() in p.read_bytes() or OTHER_TOKEN.encode() in p.read_bytes()
    ]
    assert not leaks
    log = (results / "logs" / "adapt.log").read_text()
    assert "a careless library prints the token: *** and ***" in log


def test_manifests_redact_a_token_that_reaches_them(tmp_path, monkeypatch):
    from d2lora.manifests import write_manifest
    from d2lora.redaction import SECRET_ENVS_VAR

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv(SECRET_ENVS_VAR, "MY_HUB_TOKEN")
    monkeypatch.setenv("MY_HUB_TOKEN", OTHER_TOKEN)
    write_manifest(tmp_path / "manifest.json", {"params": {"path": f"https://user:{OTHER_TOKEN}@host/{FAKE_TOKEN}"}})
    text = (tmp_path / "manifest.json").read_text()
    assert FAKE_TOKEN not in text and OTHER_TOKEN not in text and "https://user:***@host/***" in text


def test_verify_accepts_untouched_results(results, capsys):
    findings, checked = verify(results / "results")
    assert [f for f in findings if f.fails] == [] and checked >= 10
    assert verify_main([str(results / "results")]) == 0


def test_verify_reports_every_tampered_file(results, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(results / "results", copy / "results")
    root = copy / "results"
    scores = root / EVAL.removeprefix("results/") / "scores.json"
    record = json.loads(scores.read_text())
    record["metrics"]["accuracy"] = 0.99  # a better number, typed in by hand
    scores.write_text(json.dumps(record))
    (root / ADAPTER.removeprefix("results/") / "notes.txt").write_text("added later")
    with open(root / "data" / "math" / "train.jsonl", "a") as handle:
        handle.write('{"id": "extra"}\n')
    (root / "model" / "base" / "model.safetensors").write_bytes(b"not the weights")

    findings, _ = verify(root)
    by_status = {(f.status, Path(f.path).name) for f in findings}
    assert ("CHANGED", "scores.json") in by_status
    assert ("UNLISTED", "notes.txt") in by_status
    assert ("CHANGED", "train.jsonl") in by_status  # against the data manifest
    assert ("STALE-INPUT", "train.jsonl") in by_status  # the adapter was trained on other data
    assert ("CHANGED", "model.safetensors") in by_status  # against the model's source.json

    (root / EVAL.removeprefix("results/") / "manifest.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "d2lora.verify", str(root)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    assert "NO-MANIFEST" in result.stdout
    assert "do not match their manifests" in result.stdout
    assert "UNLISTED" in result.stdout and "notes.txt" in result.stdout
