"""`evaluation.server`: evaluate jobs hand their cell to one long-lived process (d2lora.cell_server).

Checked on the CPU with the tiny model: a cell evaluated in the server writes the same scores,
predictions and manifest as in the job's own process; later jobs reuse the server; a failing cell
fails its job with the traceback in the job's log; the server leaves when idle, and at once when
the job it serves is gone (writing nothing after); a server is never shared across SLURM jobs,
GPU sets or versions of the code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from d2lora import cell_server
from d2lora.evaluation.dispatch import evaluate_cell_job
from d2lora.evaluation.partial import sidecar_path
from d2lora.io import write_jsonl
from d2lora.runtime import job

TEMPLATE = "{question} Answer with a number."
CELL = {"task": "math", "method": "none", "init": "lora", "n": 0, "seed": 0}


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir):
    """A job's folder as the workflow lays it out (relative paths), with a private server folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cell_server.SERVER_DIR_ENV, str(tmp_path / "servers"))
    (tmp_path / "results" / "model").mkdir(parents=True)
    os.symlink(tiny_model_dir, tmp_path / "results" / "model" / "base")
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
    write_jsonl(tmp_path / "results" / "data" / "math" / "eval.jsonl", rows)
    return tmp_path


def _evaluate(name: str, *, server: dict, data_dir="results/data/math", max_new_tokens=4, rows_per_batch=2):
    """One evaluate job, as workflow/scripts/evaluate.py runs it; its record and log."""
    out = Path("results/eval") / name
    fake = types.SimpleNamespace(threads=1, log=[f"logs/{name}.log"], config={})
    with job(fake):
        record = evaluate_cell_job(
            server=server,
            log_path=fake.log[0],
            benchmark="gsm8k",
            cell=CELL,
            model_dir="results/model/base",
            adapter_dir=None,
            data_dir=data_dir,
            settings={"max_new_tokens": max_new_tokens, "batch_size": rows_per_batch, "prompt_template": TEMPLATE},
            scores_path=str(out / "scores.json"),
            predictions_path=str(out / "predictions.jsonl"),
            device="cpu",
        )
    return record, Path(fake.log[0]).read_text()


def _server_of(log: str) -> tuple[int, int]:
    """(pid, request number) from the job's log."""
    pid, request = re.search(r"cell server: pid (\d+) on \S+, request (\d+)", log).groups()
    return int(pid), int(request)


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a child of this test process (it started the server) stays a zombie until reaped
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def test_a_cell_in_the_server_writes_what_the_job_itself_writes(workdir):
    here, _ = _evaluate("here", server={"enabled": False})
    served, log = _evaluate("served", server={"enabled": True, "idle_seconds": 60})
    again, log_again = _evaluate("again", server={"enabled": True, "idle_seconds": 60})

    pid, request = _server_of(log)
    assert pid != os.getpid() and request == 1
    assert _server_of(log_again) == (pid, 2)  # the second job reused the server
    assert "evaluate: gsm8k on 6 items" in log  # the cell's own output, in the job's log
    server_log = Path(re.search(r"its log: (\S+)\)", log).group(1)).read_text()
    assert re.search(rf"request 2 \({workdir}/logs/again.log\) done in [\d.]+ s; no GPU memory left", server_log)

    eval_dir = workdir / "results" / "eval"
    assert (eval_dir / "here/predictions.jsonl").read_bytes() == (eval_dir / "served/predictions.jsonl").read_bytes()
    varying = {"predictions", "eval_seconds", "load_seconds", "items_per_second"}
    for record in (served, again):
        assert {k: v for k, v in record.items() if k not in varying} == {
            k: v for k, v in here.items() if k not in varying
        }
        assert record == json.loads((eval_dir / Path(record["predictions"]).parent.name / "scores.json").read_text())
        assert 0 < record["load_seconds"] < record["eval_seconds"]
    manifests = [json.loads((eval_dir / name / "manifest.json").read_text()) for name in ("here", "served")]
    assert manifests[0]["outputs"]["predictions.jsonl"] == manifests[1]["outputs"]["predictions.jsonl"]
    assert manifests[0]["inputs"] == manifests[1]["inputs"] and manifests[0]["params"] == manifests[1]["params"]


def test_a_server_keeping_base_weights_reads_the_checkpoint_once(workdir):
    here, _ = _evaluate("here", server={"enabled": False})
    server = {"enabled": True, "idle_seconds": 60, "keep_base_weights": True}
    _, first = _evaluate("first", server=server)
    _, second = _evaluate("second", server=server)
    assert _server_of(second)[0] == _server_of(first)[0]
    assert "read into host memory" in first and "built from the base weights kept in host memory" in first
    assert "read into host memory" not in second and "built from the base weights kept in host memory" in second
    eval_dir = workdir / "results" / "eval"
    for name in ("first", "second"):
        assert (eval_dir / name / "predictions.jsonl").read_bytes() == (
            eval_dir / "here/predictions.jsonl"
        ).read_bytes()
    # a job that does not keep them frees them: its server reads the files itself
    _, plain = _evaluate("plain", server={"enabled": True, "idle_seconds": 60})
    _, after = _evaluate("after", server=server)
    assert "built from the base weights" not in plain and "read into host memory" in after


def test_a_job_running_beside_another_gets_a_server_of_its_own(workdir):
    import fcntl

    stem = cell_server.server_dir() / cell_server.server_key()
    with open(f"{stem}.0.claim", "a") as busy:  # slot 0 held, as by a job whose cell is running
        fcntl.flock(busy, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _, log = _evaluate("beside", server={"enabled": True, "idle_seconds": 60})
    assert f"its log: {stem}.1.log" in log
    _, log = _evaluate("alone", server={"enabled": True, "idle_seconds": 60})
    assert f"its log: {stem}.0.log" in log


def test_a_failing_cell_fails_its_job_with_the_traceback_in_its_log(workdir):
    with pytest.raises(
        cell_server.CellServerError, match="DataFileError: results/data/absent/eval.jsonl: file does not exist"
    ):
        _evaluate("broken", server={"enabled": True, "idle_seconds": 60}, data_dir="results/data/absent")
    log = (workdir / "logs" / "broken.log").read_text()
    assert "Traceback" in log and "results/data/absent/eval.jsonl" in log
    # the server survived its job's failure and serves the next one
    _, log = _evaluate("after", server={"enabled": True, "idle_seconds": 60})
    assert _server_of(log)[1] == 2


def test_the_server_leaves_when_idle(workdir):
    _, log = _evaluate("once", server={"enabled": True, "idle_seconds": 1})
    pid, _ = _server_of(log)
    assert _gone(pid, within=15)
    assert not list((workdir / "servers").glob("*.sock"))
    _, log = _evaluate("later", server={"enabled": True, "idle_seconds": 1})  # a new one starts
    assert _server_of(log)[0] != pid


CLIENT = """
import sys, types
from d2lora.evaluation.dispatch import evaluate_cell_job
from d2lora.evaluation.partial import sidecar_path
from d2lora.runtime import job
fake = types.SimpleNamespace(threads=1, log=["logs/slow.log"], config={})
with job(fake):
    evaluate_cell_job(server={"enabled": True, "idle_seconds": 60}, log_path=fake.log[0], benchmark="gsm8k",
        cell=%r, model_dir="results/model/base", adapter_dir=None, data_dir="results/data/slow",
        settings={"max_new_tokens": 64, "batch_size": 1, "prompt_template": %r},
        scores_path="results/eval/slow/scores.json", predictions_path="results/eval/slow/predictions.jsonl",
        device="cpu")
"""


def test_a_job_whose_cell_runs_in_the_server_imports_no_torch(workdir):
    """What the server saves: the job process itself stays light."""
    script = CLIENT.replace("results/data/slow", "results/data/math").replace(
        '"max_new_tokens": 64', '"max_new_tokens": 2'
    )
    script += "print('torch imported:', 'torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script % (CELL, TEMPLATE)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch imported: False" in done.stdout
    assert (workdir / "results" / "eval" / "slow" / "scores.json").is_file()


def test_the_server_ends_when_its_job_is_gone_and_writes_nothing_after(workdir):
    rows = [{"id": f"q{i}", "question": f"What is {i} times {i}?", "answer": str(i * i)} for i in range(400)]
    write_jsonl(workdir / "results" / "data" / "slow" / "eval.jsonl", rows)
    client = subprocess.Popen([sys.executable, "-c", CLIENT % (CELL, TEMPLATE)], env=dict(os.environ))
    log = workdir / "logs" / "slow.log"
    sidecar = sidecar_path(workdir / "results" / "eval" / "slow" / "predictions.jsonl")
    deadline = time.monotonic() + 120
    # killed once the server has finished a batch of the cell (the sidecar's header and one batch)
    while not (sidecar.exists() and len(sidecar.read_text().splitlines()) >= 2):
        assert client.poll() is None and time.monotonic() < deadline, "the cell never got going in the server"
        time.sleep(0.05)
    pid, _ = _server_of(log.read_text())
    client.kill()
    client.wait()
    assert _gone(pid, within=10)
    time.sleep(1)
    assert not (workdir / "results" / "eval" / "slow" / "scores.json").exists()
    # what it finished stays for the next job to resume from (d2lora.evaluation.partial), and the
    # server did not get to the end
    assert 2 <= len(sidecar.read_text().splitlines()) < 1 + 400


def test_jobs_share_a_server_only_on_one_machine_slurm_job_gpu_set_and_code(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    base = cell_server.server_key()
    assert cell_server.server_key() == base
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    in_job = cell_server.server_key()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert len({base, in_job, cell_server.server_key()}) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cell_server.server_key() != in_job
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    before = cell_server.server_key()
    copy = tmp_path / "d2lora"
    subprocess.run(["cp", "-r", str(cell_server.PACKAGE_DIR), str(copy)], check=True)
    monkeypatch.setattr(cell_server, "PACKAGE_DIR", copy)
    assert cell_server.server_key() == before  # the same code elsewhere
    with open(copy / "cost.py", "a") as edited:
        edited.write("\n# an edit\n")
    assert cell_server.server_key() != before


def test_only_the_listed_functions_can_be_called():
    with pytest.raises(ValueError, match="unknown server function 'os.system'"):
        cell_server.call("os.system", {}, log_path=None, idle_seconds=1)


def _train(name: str, *, server: dict, method: str, warmup_dir=None):
    """One adapt job (warmup when method is None), as workflow/scripts/adapt.py and warmup.py run it;
    its training record and log."""
    from d2lora.training.dispatch import train_cell_job

    fake = types.SimpleNamespace(threads=1, log=[f"logs/{name}.log"], config={})
    common = dict(
        model_dir="results/model/base",
        train_path="results/data/train.jsonl",
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        out_dir=f"results/adapters/{name}",
        seed=0,
        variant=None,
        device="cpu",
        checkpoint_steps=0,
    )
    hp = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "constant", "batch_size": 2, "max_length": 128}
    with job(fake):
        if method is None:
            record = train_cell_job("run_warmup", server=server, log_path=fake.log[0], hp=hp, **common)
        else:
            record = train_cell_job(
                "run_adaptation",
                server=server,
                log_path=fake.log[0],
                method=method,
                init="d2lora",
                n=4,
                hp=dict(hp, beta=0.1),
                warmup_dir=warmup_dir,
                **common,
            )
    return record, Path(fake.log[0]).read_text()


def test_a_training_cell_in_the_server_trains_what_the_job_itself_trains(workdir):
    """training.server: a warm-up and then a DPO cell in one server (the second reusing the process
    the first left) train the adapters and records that their own processes train."""
    rows = [
        {"id": f"r{i}", "prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {i}."}
        for i in range(4)
    ]
    write_jsonl(workdir / "results" / "data" / "train.jsonl", rows)
    warm_here, _ = _train("warm_here", server={"enabled": False}, method=None)
    warm_served, log = _train("warm_served", server={"enabled": True, "idle_seconds": 60}, method=None)
    dpo_here, _ = _train("dpo_here", server={"enabled": False}, method="dpo", warmup_dir="results/adapters/warm_here")
    dpo_served, log_dpo = _train(
        "dpo_served",
        server={"enabled": True, "idle_seconds": 60},
        method="dpo",
        warmup_dir="results/adapters/warm_served",
    )
    pid, request = _server_of(log)
    assert pid != os.getpid() and request == 1 and _server_of(log_dpo) == (pid, 2)
    adapters = workdir / "results" / "adapters"
    for here, served in (("warm_here", "warm_served"), ("dpo_here", "dpo_served")):
        weights = "adapter_model.safetensors"
        assert (adapters / here / weights).read_bytes() == (adapters / served / weights).read_bytes(), here
    varying = {"train_seconds", "trainer_setup_seconds", "load_seconds", "log_history", "out_dir", "files"}
    for here, served in ((warm_here, warm_served), (dpo_here, dpo_served)):
        assert here["train_loss"] == served["train_loss"]
        kept = {key for key in here if key not in varying and not key.endswith(("_seconds", "_mb"))}
        assert {"global_steps", "train_tokens", "checkpointing", "dropout", "hparams"} <= kept
        assert {k: served[k] for k in kept} == {k: here[k] for k in kept}
    assert dpo_here["global_steps"] == 2 and len({e["loss"] for e in dpo_here["log_history"] if "loss" in e}) == 2
    server_log = Path(re.search(r"its log: (\S+)\)", log).group(1)).read_text()
    assert re.search(rf"request 2 \({workdir}/logs/dpo_served.log\) done in [\d.]+ s", server_log)
    assert dpo_served["dropout"] == {"lora": 0.0, "while_training": 0.0}


def test_an_unknown_training_function_is_refused():
    from d2lora.training.dispatch import train_cell_job

    with pytest.raises(ValueError, match="unknown training function 'evaluate_cell'"):
        train_cell_job("evaluate_cell", server={"enabled": True}, log_path=None)
