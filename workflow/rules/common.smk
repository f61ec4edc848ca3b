# What rules share: config validation, the grid, path patterns and input functions.
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from d2lora import grid  # noqa: E402

# A key written twice in a config file (YAML keeps the last silently) is refused first.
grid.check_config_files(workflow.config_settings.configfiles or ["config/config.yaml"])
validate(config, schema="../schemas/config.schema.yaml")
grid.check(config)

RESULTS = "results"
LOGS = "logs"
CELL = "{task}/{method}/{init}/n{n}/s{seed}"
FIGURES = ["figure1", "figure2", "figure3", "figure4"]
COMPARISON_TABLES = ["table1", "table3"]
ALL_TABLES = ["table1", "table2", "table3"]


wildcard_constraints:
    task="math|titles",
    method="sft|dpo|orpo|none",
    # Every variant of the grid (d2lora.grid.variants): built-in lora/d2lora plus config `variants`.
    init="|".join(grid.inits_in_grid(config)),
    n=r"\d+",
    seed=r"\d+",
    benchmark="gsm8k|arc_easy|titles",
    role="warmup|math|titles|forgetting",
    figure="|".join(FIGURES),
    table="|".join(COMPARISON_TABLES),


EVAL_ROLE = {"gsm8k": "math", "titles": "titles", "arc_easy": "forgetting"}


def eval_score_paths():
    return [
        f"{RESULTS}/eval/{benchmark}/" + CELL.format(**cell.wildcards) + "/scores.json"
        for benchmark, cell in grid.evaluation_jobs(config)
    ]


def get_final_output():
    return (
        [f"{RESULTS}/metrics/metrics.tsv", f"{RESULTS}/metrics/intervals.tsv", f"{RESULTS}/metrics/cost.tsv"]
        + expand(f"{RESULTS}/tables/significance.{{ext}}", ext=["csv", "md"])
        + expand(f"{RESULTS}/figures/score_vs_cost.{{ext}}", ext=["png", "pdf"])
        + expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"])
        + expand(f"{RESULTS}/tables/{{table}}.{{ext}}", table=ALL_TABLES, ext=["csv", "md"])
        + [f"{RESULTS}/provenance/config_used.yaml", f"{RESULTS}/provenance/versions.tsv",
           f"{RESULTS}/provenance/dataset_checksums.tsv", f"{RESULTS}/provenance/runtimes.tsv"]
    )


ONPOLICY = f"{RESULTS}/onpolicy/{{task}}"


def onpolicy_output(task):
    return ONPOLICY.format(task=task) + "/negatives.jsonl"


def resolved_role_config(role):
    """A role's config as prepare_data reads it: an `onpolicy` train source becomes the local
    file that the sample_negatives rule writes (format gsm8k_onpolicy)."""
    from d2lora.data.onpolicy import as_local_source

    role_cfg = dict(config["datasets"][role])
    train = role_cfg.get("train")
    if train and train.get("source") == "onpolicy":
        role_cfg["train"] = as_local_source(train, onpolicy_output(role))
    return role_cfg


def role_config(wildcards):
    return resolved_role_config(wildcards.role)


def local_source_files(source_cfg):
    if not source_cfg or source_cfg.get("source") != "local":
        return []
    files = source_cfg["data_files"]
    return [files] if isinstance(files, str) else list(files)


def role_input_files(wildcards):
    """Local files a role is prepared from (so editing one reruns preparation), incl. on-policy pairs."""
    role_cfg = resolved_role_config(wildcards.role)
    return [f for split in ("train", "eval") for f in local_source_files(role_cfg.get(split))]


def onpolicy_tasks():
    return [task for task in grid.TASKS
            if config["datasets"].get(task, {}).get("train", {}).get("source") == "onpolicy"
            and task in {c.task for c in grid.training_cells(config)}]


def onpolicy_source_files(wildcards):
    return local_source_files(config["datasets"][wildcards.task]["train"]["from"])


def role_max_n(wildcards):
    return grid.max_n(config, wildcards.role) if wildcards.role in grid.TASKS else 0


def adapter_for_cell(wildcards):
    """The adapter an evaluation loads: trained (n > 0), the variant's warm-up (warm-started, n = 0),
    none (the base model: every other variant at n = 0, whose adapter starts as the identity)."""
    if int(wildcards.n) > 0:
        return {"adapter": f"{RESULTS}/adapters/" + CELL.format(**wildcards)}
    if grid.variant(config, wildcards.init)["warmup"]:
        return {"adapter": warmup_adapter_path(wildcards.init)}
    return {}


def warmup_adapter_path(init):
    return f"{RESULTS}/warmup/{init}/adapter"


def warmup_for_init(wildcards):
    return {"warmup": warmup_adapter_path(wildcards.init)} if grid.variant(config, wildcards.init)["warmup"] else {}


def variant_spec(wildcards):
    """What a training job needs of its variant; the label is left out (renaming reruns nothing)."""
    return {k: v for k, v in grid.variant(config, wildcards.init).items() if k != "label"}


def adapt_hparams(wildcards):
    return config["training"]["adapt"][wildcards.method]


LM_EVAL_TEMPLATES = "workflow/resources/lm_eval"


def eval_engine():
    return config["evaluation"].get("engine", "pipeline")


def lm_eval_task_input(wildcards):
    """The lm-eval task template, an input of evaluation jobs that lm-eval scores (edits rerun them)."""
    if eval_engine() == "lm_eval" and wildcards.benchmark in ("gsm8k", "arc_easy"):
        return {"lm_eval_task": f"{LM_EVAL_TEMPLATES}/d2lora_{wildcards.benchmark}.yaml"}
    return {}


def eval_settings(wildcards):
    settings = dict(config["evaluation"][wildcards.benchmark])
    settings["dtype"] = config["evaluation"].get("dtype", "auto")
    settings["engine"] = eval_engine()
    # Only when set, so configs without the key keep their parameters (and their results).
    if config["evaluation"].get("merge_adapter"):
        settings["merge_adapter"] = True
    if settings["engine"] == "lm_eval":
        settings["lm_eval_templates"] = LM_EVAL_TEMPLATES
    if wildcards.benchmark == "gsm8k":
        settings["prompt_template"] = config["datasets"]["math"]["prompt_template"]
    return settings


def benchmark_paths():
    """Every job's Snakemake benchmark file: the per-rule runtimes in the report."""
    cells = [CELL.format(**c.wildcards) for c in grid.training_cells(config)]
    paths = [f"{RESULTS}/benchmarks/prepare_model/base.tsv"]
    paths += expand(f"{RESULTS}/benchmarks/prepare_data/{{role}}.tsv", role=used_roles())
    paths += expand(f"{RESULTS}/benchmarks/sample_negatives/{{task}}.tsv", task=onpolicy_tasks())
    paths += [f"{RESULTS}/benchmarks/warmup/{init}.tsv" for init in grid.warm_inits(config)]
    paths += [f"{RESULTS}/benchmarks/adapt/{cell}.tsv" for cell in cells]
    paths += [
        f"{RESULTS}/benchmarks/evaluate/{benchmark}/" + CELL.format(**cell.wildcards) + ".tsv"
        for benchmark, cell in grid.evaluation_jobs(config)
    ]
    return paths


def used_roles():
    roles = {EVAL_ROLE[b] for b, _ in grid.evaluation_jobs(config)}
    roles |= {c.task for c in grid.training_cells(config)}
    if grid.needs_warmup(config):
        roles.add("warmup")
    return sorted(roles)


def data_dirs():
    return expand(f"{RESULTS}/data/{{role}}", role=used_roles())



# Job resources for cluster runs: runtime (minutes) and host memory (MB) of every job, sized from
# the config so that a preset asks for what it needs without editing rules. They are rough upper
# bounds from the model's size, the rows a job trains on or evaluates and the device; where jobs
# go (account, partition, GPU type) is the profile's business (profiles/slurm, docs/cluster.md).
# Override any of them per rule: --set-resources adapt:runtime=720. A retry (--retries) gets
# `attempt` times the time and more memory.
import functools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

from d2lora.data.sources import available_rows  # noqa: E402

GPU_FLOPS = 2e14  # sustained training FLOP/s of one GPU (a quarter of an H100's 8e14 bf16 matmul, SPEC)
CPU_FLOPS = 2e10  # the same for one CPU core
UNKNOWN_ROWS = {"train": 50_000, "eval": 2_500}  # hub sources, whose size is known only once loaded
METHOD_PASSES = {"sft": 1, "orpo": 2, "dpo": 3}  # chosen + rejected; DPO also runs its reference
# auto is sized as float32: the job may resolve it either way, and the estimate must hold for both.
DTYPE_BYTES = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}


@functools.cache
def model_params_b():
    """The configured model's size in billions of parameters, read from its name ('8B', '135M').

    A random_init model is counted from its architecture (at least 0.01: the tiny ones); a name
    without a size counts as 8B (ask for too much, not too little).
    """
    model = config["model"]
    if model["source"] == "random_init":
        from d2lora.models import architecture_parameters

        return max(0.01, architecture_parameters(model.get("architecture") or {}) / 1e9)
    name = Path(str(model.get("id") or model.get("file") or model.get("path") or "")).name
    sizes = re.findall(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([MB])(?![A-Za-z])", name)
    if not sizes:
        return 8.0
    number, unit = sizes[-1]
    return float(number) / (1000 if unit == "M" else 1)


def _on_gpu():
    return config.get("device", "auto") != "cpu"


def _weights_mb(dtype=None):
    return model_params_b() * 1000 * DTYPE_BYTES[dtype or config["model"].get("dtype", "auto")]


@functools.cache
def _source_rows(role, split):
    source = config["datasets"].get(role, {}).get(split)
    if not source:
        return 0
    if source["source"] == "onpolicy":
        source = {**source["from"], **{k: source[k] for k in ("limit", "skip") if k in source}}
    return available_rows(source) or UNKNOWN_ROWS[split]


def _minutes(seconds, attempt):
    """Loading the model (a minute per billion parameters, at least 5) plus `seconds` of work,
    rounded up to 5 minutes, times the attempt."""
    load = 60 * max(5.0, model_params_b())
    return int(attempt * 5 * math.ceil((load + seconds) / 300))


def _train_seconds(rows, hp, method):
    """6 FLOPs per parameter and token (forward, backward, recomputation), every example padded
    to max_length."""
    tokens = rows * hp["epochs"] * hp.get("max_length", 1024) * METHOD_PASSES[method]
    return 6 * model_params_b() * 1e9 * tokens / (GPU_FLOPS if _on_gpu() else CPU_FLOPS)


def _generate_seconds(rows, batch_size, max_new_tokens, rounds=1):
    """One decoding step per new token and batch; a step reads every weight once."""
    steps = rounds * math.ceil(rows / batch_size) * max_new_tokens
    if _on_gpu():
        step = 0.1 + _weights_mb() * 1e6 / 1e12  # overhead, and the weights at 1 TB/s
    else:
        step = 0.2 + _weights_mb() * 1e6 / 1e10
    return steps * step


def warmup_runtime(wildcards, attempt):
    return _minutes(_train_seconds(_source_rows("warmup", "train"), config["training"]["warmup"], "sft"), attempt)


def adapt_runtime(wildcards, attempt):
    hp = config["training"]["adapt"][wildcards.method]
    return _minutes(_train_seconds(int(wildcards.n), hp, wildcards.method), attempt)


def evaluate_runtime(wildcards, attempt):
    settings = config["evaluation"][wildcards.benchmark]
    rows = _source_rows(EVAL_ROLE[wildcards.benchmark], "eval")
    if wildcards.benchmark == "arc_easy":  # four scored choices of ~256 tokens, forward only
        flops = rows * 4 * 256 * 2 * model_params_b() * 1e9
        return _minutes(flops / (GPU_FLOPS if _on_gpu() else CPU_FLOPS), attempt)
    return _minutes(_generate_seconds(rows, settings["batch_size"], settings["max_new_tokens"]), attempt)


def sample_negatives_runtime(wildcards, attempt):
    source = config["datasets"][wildcards.task]["train"]
    settings = {"samples": 4, "max_new_tokens": 384, "batch_size": 64, **source}  # d2lora.data.onpolicy defaults
    rows = _source_rows(wildcards.task, "train")
    return _minutes(
        _generate_seconds(rows, settings["batch_size"], settings["max_new_tokens"], settings["samples"]), attempt
    )


def model_job_mem_mb(wildcards, attempt):
    """Host memory of a job that loads the model: the weights pass through RAM as they load (on a
    CPU device they stay, with activations and LoRA optimizer state), 4 GB for Python, torch and
    data on top; half as much again on each retry."""
    need = 4000 + (1.5 if _on_gpu() else 3) * _weights_mb()
    return int(1000 * math.ceil(need * (1 + 0.5 * (attempt - 1)) / 1000))


def prepare_model_mem_mb(wildcards, attempt):
    """Loading (a .gguf is dequantized to float32) and writing the weights once more."""
    weights = _weights_mb("float32" if config["model"]["source"] == "gguf" else None)
    return int(1000 * math.ceil(max(8000, 4000 + 2 * weights) * (1 + 0.5 * (attempt - 1)) / 1000))


def prepare_model_runtime(wildcards, attempt):
    download = _weights_mb() / 20 if config["model"]["source"] == "hub" else 0  # at 20 MB/s
    return _minutes(download, attempt)


def _reads_files(role):
    """Whether a role's data come from hub or local files (read, maybe downloaded, and hashed)
    rather than being generated in seconds."""
    return any(part.get("source") != "synthetic" for part in config["datasets"][role].values() if isinstance(part, dict))


def data_runtime(wildcards, attempt):
    return attempt * (30 if _reads_files(wildcards.role) else 10)


def data_mem_mb(wildcards, attempt):
    return attempt * (8000 if _reads_files(wildcards.role) else 2000)
