# What rules share: config validation, the grid, path patterns and input functions.
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from d2lora import grid  # noqa: E402

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
    init="lora|d2lora",
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
        [f"{RESULTS}/metrics/metrics.tsv"]
        + expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"])
        + expand(f"{RESULTS}/tables/{{table}}.{{ext}}", table=ALL_TABLES, ext=["csv", "md"])
        + [f"{RESULTS}/provenance/config_used.yaml", f"{RESULTS}/provenance/versions.tsv",
           f"{RESULTS}/provenance/dataset_checksums.tsv", f"{RESULTS}/provenance/runtimes.tsv"]
    )


def role_config(wildcards):
    return config["datasets"][wildcards.role]


def role_max_n(wildcards):
    return grid.max_n(config, wildcards.role) if wildcards.role in grid.TASKS else 0


def adapter_for_cell(wildcards):
    """The adapter an evaluation loads: trained (n > 0), warm-up only (d2lora, n = 0), none (lora, n = 0)."""
    if int(wildcards.n) > 0:
        return {"adapter": f"{RESULTS}/adapters/" + CELL.format(**wildcards)}
    if wildcards.init == "d2lora":
        return {"adapter": f"{RESULTS}/warmup/adapter"}
    return {}


def warmup_for_init(wildcards):
    return {"warmup": f"{RESULTS}/warmup/adapter"} if wildcards.init == "d2lora" else {}


def adapt_hparams(wildcards):
    return config["training"]["adapt"][wildcards.method]


def eval_settings(wildcards):
    settings = dict(config["evaluation"][wildcards.benchmark])
    settings["dtype"] = config["evaluation"].get("dtype", "float32")
    if wildcards.benchmark == "gsm8k":
        settings["prompt_template"] = config["datasets"]["math"]["prompt_template"]
    return settings


def benchmark_paths():
    """Every job's Snakemake benchmark file: the per-rule runtimes in the report."""
    cells = [CELL.format(**c.wildcards) for c in grid.training_cells(config)]
    paths = [f"{RESULTS}/benchmarks/prepare_model/base.tsv"]
    paths += expand(f"{RESULTS}/benchmarks/prepare_data/{{role}}.tsv", role=used_roles())
    if grid.needs_warmup(config):
        paths.append(f"{RESULTS}/benchmarks/warmup/warmup.tsv")
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

