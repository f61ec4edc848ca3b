"""The workflow through SLURM: `snakemake --profile profiles/slurm` against a real slurmctld.

tests/slurm/cluster.sh installs Debian's SLURM packages when they are missing and starts a
one-node cluster on loopback (munged, slurmctld, slurmd; no accounting database; four fake GPUs).
In a copy of the repository (as in test_workflow.py) Snakemake runs a reduced tiny grid (every
rule, both inits: 22 SLURM jobs) with the production profile plus tests/slurm/profile,
which changes only how the plugin polls (squeue, every few seconds) and keeps every job's SLURM
log. Checked: every job of the DAG was a SLURM job that completed, with the runtime, memory and
GPUs its rule declares; a failing cell is reported with its logs while --keep-going finishes
another; after the fix, what is left to redo is the failed job and what depends on it. Then the
evaluations again with profiles/slurm_grouped_evaluations: two per SLURM job, one GPU and one cell
server per group, the same predictions; and what a failing cell does to its group.

Skipped, with the reason, where a cluster cannot be started: not Linux, not root (the daemons and
the jobs run as root), or SLURM neither installed nor installable with apt-get.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"
CONFIG = "config/slurm_test.yaml"
GPU_RULES = {"warmup", "adapt", "evaluate", "sample_negatives"}
# config/tiny.yaml with as few cells as still run every rule: two trained cells (lora, d2lora) and
# the base model on the titles and ARC-Easy benchmarks (22 SLURM jobs; the tiny grid has 51).
EXPERIMENTS = yaml.safe_load("""
figure1: {task: math, metric: gsm8k_accuracy, panels: none, methods: [sft], inits: [lora], n: [2]}
figure2: {task: math, metric: gsm8k_accuracy, panels: method, methods: [sft], inits: [lora, d2lora], n: [2]}
table3: {task: math, metric: gsm8k_accuracy, methods: [sft], inits: [lora, d2lora], n: [2]}
table1: {task: titles, metric: rougeL, methods: [sft], inits: [lora], n: [0]}
figure3: {task: math, metric: arc_easy_accuracy, panels: method, methods: [sft], inits: [lora], n: [0]}
figure4: {task: math, metric: gsm8k_accuracy, panels: method, methods: [sft], inits: [d2lora], n: [2]}
""")
# The failure test: BAD's adapter gets corrupted, so its evaluation fails; GOOD is re-evaluated.
BAD = "math/sft/d2lora/n2/s0"
GOOD = "math/sft/lora/n2/s0"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")

pytestmark = pytest.mark.slow


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the test cluster needs Linux"
    if os.geteuid() != 0:
        return "the test cluster runs slurmctld, slurmd and the jobs as root: run as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is missing to install it"
    return None


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """A running one-node cluster; yields the environment its clients need (SLURM_CONF)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    install = subprocess.run(["bash", CLUSTER, "install"], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.fail(f"installing SLURM failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", CLUSTER, "start", state], capture_output=True, text=True)
    if start.returncode != 0:
        subprocess.run(["bash", CLUSTER, "stop", state], capture_output=True)
        pytest.fail(f"starting the SLURM test cluster failed:\n{start.stdout}\n{start.stderr[-6000:]}")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "SRUN_", "D2LORA_SLURM_", "SNAKEMAKE_PROFILE"))
    }
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    # Wrappers of sbatch, srun, ... that set SLURM_CONF: srun inside a job runs without it.
    env["PATH"] = f"{state / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    try:
        yield env
    finally:
        subprocess.run(["bash", CLUSTER, "stop", state], capture_output=True)


def _snakemake(
    work: Path, env: dict, *args: str, check: bool = True, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    # --configfile takes several values, so it goes last, after any targets. `profiles` come
    # between the production profile and the test's.
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "profiles/slurm",
        *(arg for profile in profiles for arg in ("--profile", profile)),
        "--profile",
        str(TEST_PROFILE),
        *args,
        "--configfile",
        CONFIG,
    ]
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}")
    return result


def _job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a run or dry run: rule -> number of jobs."""
    counts = {}
    for line in output.split("Job stats:", 1)[-1].splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def _slurm_jobs(env: dict, run_id: str) -> dict[str, dict[str, str]]:
    """Every job of one Snakemake run as slurmctld knows it (finished ones stay for MinJobAge)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True)
    jobs = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("JobName") == run_id:
            jobs[fields["JobId"]] = fields
    return jobs


def _run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, output[-3000:]
    return match.group(1)


def _rule_of(comment: str) -> str:
    """The plugin's job comment is rule_<rule>[_wildcards_<values>]."""
    return re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment).group(1)


@pytest.fixture(scope="module")
def slurm_run(slurm_env, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm_workflow")
    for name in ("Snakefile", "workflow", "config", "report", "src", "envs", "profiles"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["run_name"] = "slurm-test"
    config["experiments"] = EXPERIMENTS
    (work / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))

    planned = _job_counts(_snakemake(work, slurm_env, "-n", "all").stdout)
    started = time.monotonic()
    result = _snakemake(work, slurm_env, "all")
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    (work / "snakemake_slurm.log").write_text(output)  # for a look after a failure
    print(f"\nSLURM run of {sum(planned.values())} jobs: {seconds:.0f} s")
    return {"work": work, "env": slurm_env, "planned": planned, "output": output, "seconds": seconds}


def test_every_job_ran_as_a_completed_slurm_job(slurm_run):
    output, planned = slurm_run["output"], slurm_run["planned"]
    submitted = SUBMITTED.findall(output)
    jobs = _slurm_jobs(slurm_run["env"], _run_id(output))
    # `all` collects the targets and runs nothing: it is the one job that stays with Snakemake.
    expected = {rule: count for rule, count in planned.items() if rule != "all"}
    assert sum(expected.values()) == len(submitted) == len(jobs), (expected, len(submitted), len(jobs))
    assert {slurm_id for _, slurm_id, _ in submitted} == set(jobs)
    ran = {}
    for job in jobs.values():
        ran[_rule_of(job["Comment"])] = ran.get(_rule_of(job["Comment"]), 0) + 1
    assert ran == expected
    assert {job["JobState"] for job in jobs.values()} == {"COMPLETED"}
    for _, _, log in submitted:  # every job's SLURM log, kept by the test profile
        assert Path(log).is_file(), log


def _declared_resources(output: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Snakemake job id -> (rule, resources) from the job descriptions of a run's log."""
    declared = {}
    for block in re.split(r"\n(?=\[[^\]\n]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        jobid = re.search(r"^    jobid: (\d+)$", block, re.M)
        resources = re.search(r"^    resources: (.*)$", block, re.M)
        if rule and jobid and resources:
            items = dict(item.split("=", 1) for item in resources.group(1).split(", "))
            declared[jobid.group(1)] = (rule.group(1), items)
    return declared


def _minutes(time_limit: str) -> int:
    """SLURM's [D-]HH:MM:SS as minutes."""
    days, _, clock = time_limit.rpartition("-")
    hours, minutes, _ = (int(part) for part in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + minutes


def test_jobs_ask_slurm_for_the_resources_their_rules_declare(slurm_run):
    output = slurm_run["output"]
    jobs = _slurm_jobs(slurm_run["env"], _run_id(output))
    declared = _declared_resources(output)
    for snakemake_id, slurm_id, _ in SUBMITTED.findall(output):
        rule, resources = declared[snakemake_id]
        job = jobs[slurm_id]
        assert _minutes(job["TimeLimit"]) == int(resources["runtime"]), (rule, job["TimeLimit"], resources)
        assert job["MinMemoryNode"] == f"{resources['mem_mb']}M", (rule, job["MinMemoryNode"], resources)
        gpus = int(resources.get("gpu", 0))
        assert gpus == (1 if rule in GPU_RULES else 0), (rule, resources)
        assert job.get("TresPerJob", "") == (f"gres:gpu:{gpus}" if gpus else ""), (rule, job.get("TresPerJob"))
    assert (slurm_run["work"] / "results" / "metrics" / "metrics.tsv").stat().st_size > 0
    assert (slurm_run["work"] / "results" / "provenance" / "runtimes.tsv").stat().st_size > 0


def test_failed_cell_is_reported_others_go_on_and_rerun_redoes_only_it(slurm_run):
    work, env = slurm_run["work"], slurm_run["env"]
    results = work / "results"
    scores = {cell: f"results/eval/gsm8k/{cell}/scores.json" for cell in (BAD, GOOD)}
    for cell in (BAD, GOOD):
        for name in ("scores.json", "predictions.jsonl"):
            (results / "eval" / "gsm8k" / cell / name).unlink()
    bad_weights = results / "adapters" / BAD / "adapter_model.safetensors"
    original = bad_weights.read_bytes()
    bad_weights.write_bytes(b"not a safetensors file")  # the failure: a corrupted adapter

    # One job at a time, the doomed evaluation first: GOOD's evaluation is submitted only after
    # the failure, so it runs only because of --keep-going.
    failed = _snakemake(work, env, "--jobs", "1", f"--prioritize={scores[BAD]}", scores[BAD], scores[GOOD], check=False)
    output = failed.stdout + failed.stderr
    (work / "snakemake_failure.log").write_text(output)
    assert failed.returncode != 0, output[-3000:]
    error_at = output.index("Error in rule evaluate")
    error = output[error_at:]
    rule_log = f"logs/evaluate/gsm8k/{BAD}.log"
    assert rule_log in error, error[:3000]
    assert "safetensor" in (work / rule_log).read_text().lower()  # the traceback, in the rule's log
    slurm_log = re.search(r"(\S*\.snakemake/slurm_logs/rule_evaluate/\S+\.log)", error)
    assert slurm_log and Path(slurm_log.group(1)).is_file(), error[:3000]
    good_wildcards = "_".join(["gsm8k", *(re.sub(r"^[ns](\d+)$", r"\1", part) for part in GOOD.split("/"))])
    good = [m for m in SUBMITTED.finditer(output) if f"/rule_evaluate/{good_wildcards}/" in m.group(3)]
    assert good and good[0].start() > error_at, "GOOD was submitted before the failure"
    assert (work / scores[GOOD]).is_file(), output[-3000:]
    jobs = _slurm_jobs(env, _run_id(output))
    assert sorted(job["JobState"] for job in jobs.values()) == ["COMPLETED", "FAILED"]

    # The fix: the adapter's bytes back. What is left to do is the failed evaluation and what
    # reads the metrics; no data, model, warm-up or adapter is rebuilt, no other cell re-evaluated.
    bad_weights.write_bytes(original)
    counts = _job_counts(_snakemake(work, env, "-n", "all").stdout)
    assert counts.get("evaluate") == 1, counts
    assert not {"prepare_data", "prepare_model", "warmup", "adapt"} & set(counts), counts
    _snakemake(work, env, scores[BAD])
    assert (work / scores[BAD]).is_file()


@pytest.fixture(scope="module")
def grouped_run(slurm_run, tmp_path_factory):
    """The same workflow's evaluations again, in a copy whose scores are gone, grouped as
    profiles/slurm_grouped_evaluations groups them, two to a SLURM job here (the reduced grid has
    four evaluations; the profile's eight would make one group)."""
    work = tmp_path_factory.mktemp("slurm_grouped") / "work"
    shutil.copytree(slurm_run["work"], work, symlinks=True)
    shutil.rmtree(work / "results" / "eval")
    shutil.rmtree(work / "logs" / "evaluate")
    original = slurm_run["work"]
    targets = sorted(str(p.relative_to(original)) for p in (original / "results" / "eval").rglob("scores.json"))
    result = _snakemake(
        work,
        slurm_run["env"],
        *targets,
        "--group-components",
        "evaluations=2",
        profiles=("profiles/slurm_grouped_evaluations",),
    )
    output = result.stdout + result.stderr
    (work / "snakemake_grouped.log").write_text(output)
    return {"work": work, "env": slurm_run["env"], "output": output, "targets": targets, "original": original}


def test_grouped_evaluations_share_one_gpu_job_and_one_cell_server(grouped_run):
    output, work, cells = grouped_run["output"], grouped_run["work"], len(grouped_run["targets"])
    jobs = _slurm_jobs(grouped_run["env"], _run_id(output))
    assert cells == 4
    assert len(jobs) == 2, jobs  # two groups of two
    runtimes = [int(m) for m in re.findall(r"^\s+resources: .*\bruntime=(\d+)", output, re.M)]
    memory = [int(m) for m in re.findall(r"^\s+resources: .*\bmem_mb=(\d+)", output, re.M)]
    assert len(runtimes) == len(memory) == cells
    for job in jobs.values():
        assert job["Comment"].startswith("rule_evaluations") and job["JobState"] == "COMPLETED", job
        # one GPU per group (the pool is per group job), the group's time the sum of two evaluations'
        assert job.get("TresPerJob") == "gres:gpu:1", job.get("TresPerJob")
        assert _minutes(job["TimeLimit"]) == 2 * max(runtimes) and job["MinMemoryNode"] == f"{max(memory)}M", job
    servers: dict[int, list[int]] = {}
    for log in (work / "logs" / "evaluate").rglob("*.log"):
        pid, request = re.search(r"cell server: pid (\d+) on \S+, request (\d+)", log.read_text()).groups()
        servers.setdefault(int(pid), []).append(int(request))
    # one server per SLURM job, serving both evaluations of its group in turn
    assert sorted(sorted(requests) for requests in servers.values()) == [[1, 2], [1, 2]], servers
    for predictions in (work / "results" / "eval").rglob("predictions.jsonl"):
        original = grouped_run["original"] / predictions.relative_to(work)
        assert predictions.read_bytes() == original.read_bytes(), predictions


def test_a_failing_cell_ends_its_group_and_the_rerun_redoes_what_did_not_finish(grouped_run):
    """Inside a group job Snakemake does not keep going: the cell that fails ends its SLURM job, and
    the group's cells that had not run are left for the rerun, with the failed one (docs/cluster.md)."""
    work, env, targets = grouped_run["work"], grouped_run["env"], grouped_run["targets"]
    bad = f"results/eval/gsm8k/{BAD}/scores.json"
    assert bad in targets
    for target in targets:
        for name in ("scores.json", "predictions.jsonl"):
            (work / target).with_name(name).unlink()
    bad_weights = work / "results" / "adapters" / BAD / "adapter_model.safetensors"
    original = bad_weights.read_bytes()
    bad_weights.write_bytes(b"not a safetensors file")
    grouped = ("--group-components", "evaluations=4")  # all four in one group
    failed = _snakemake(work, env, *targets, *grouped, profiles=("profiles/slurm_grouped_evaluations",), check=False)
    output = failed.stdout + failed.stderr
    (work / "snakemake_grouped_failure.log").write_text(output)
    assert failed.returncode != 0 and "Error in group evaluations" in output, output[-3000:]
    assert "safetensor" in (work / f"logs/evaluate/gsm8k/{BAD}.log").read_text().lower()
    finished = [target for target in targets if (work / target).is_file()]
    assert bad not in finished and len(finished) < len(targets)

    bad_weights.write_bytes(original)
    counts = _job_counts(_snakemake(work, env, "-n", *targets, profiles=("profiles/slurm_grouped_evaluations",)).stdout)
    assert counts == {"evaluate": len(targets) - len(finished)}, (counts, finished)
