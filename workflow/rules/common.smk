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
CELL = grid.CELL_PATH


def cell_path(cell):
    """A cell's part of every per-cell path; `cell` is a rule's wildcards or a grid cell's wildcards dict."""
    return CELL.format(**cell)


def adapter_dir(cell):
    return f"{RESULTS}/adapters/{cell_path(cell)}"


def eval_file(benchmark, cell, name):
    """One file (scores.json, predictions.jsonl, manifest.json) of a cell's evaluation on a benchmark."""
    return grid.eval_file(benchmark, cell, name, RESULTS)


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


from d2lora.benchmarks import eval_roles  # noqa: E402

EVAL_ROLE = eval_roles()


def eval_score_paths():
    return [eval_file(benchmark, cell.wildcards, "scores.json") for benchmark, cell in grid.evaluation_jobs(config)]


def get_final_output():
    return (
        [f"{RESULTS}/metrics/metrics.tsv", f"{RESULTS}/metrics/intervals.tsv", f"{RESULTS}/metrics/cost.tsv"]
        + expand(f"{RESULTS}/tables/significance.{{ext}}", ext=["csv", "md"])
        + expand(f"{RESULTS}/figures/score_vs_cost.{{ext}}", ext=["png", "pdf"])
        + expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"])
        + expand(f"{RESULTS}/tables/{{table}}.{{ext}}", table=ALL_TABLES, ext=["csv", "md"])
        + [
            f"{RESULTS}/provenance/config_used.yaml",
            f"{RESULTS}/provenance/versions.tsv",
            f"{RESULTS}/provenance/dataset_checksums.tsv",
            f"{RESULTS}/provenance/runtimes.tsv",
        ]
    )


ONPOLICY = f"{RESULTS}/onpolicy/{{task}}"


def onpolicy_output(task):
    return f"{RESULTS}/onpolicy/{task}/negatives.jsonl"


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
    return [
        task
        for task in grid.TASKS
        if config["datasets"].get(task, {}).get("train", {}).get("source") == "onpolicy"
        and task in {c.task for c in grid.training_cells(config)}
    ]


def onpolicy_source_files(wildcards):
    return local_source_files(config["datasets"][wildcards.task]["train"]["from"])


def role_max_n(wildcards):
    return grid.max_n(config, wildcards.role) if wildcards.role in grid.TASKS else 0


def adapter_for_cell(wildcards):
    """The adapter an evaluation loads: trained (n > 0), the variant's warm-up (warm-started, n = 0),
    none (the base model: every other variant at n = 0, whose adapter starts as the identity)."""
    if int(wildcards.n) > 0:
        return {"adapter": adapter_dir(wildcards)}
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
    return config["evaluation"]["engine"]


def lm_eval_task_input(wildcards):
    """The lm-eval task template, an input of evaluation jobs that lm-eval scores (edits rerun them)."""
    if eval_engine() == "lm_eval" and wildcards.benchmark in ("gsm8k", "arc_easy"):
        return {"lm_eval_task": f"{LM_EVAL_TEMPLATES}/d2lora_{wildcards.benchmark}.yaml"}
    return {}


def eval_settings(wildcards):
    settings = dict(config["evaluation"][wildcards.benchmark])
    settings["dtype"] = config["evaluation"]["dtype"]
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
    cells = [cell_path(c.wildcards) for c in grid.training_cells(config)]
    paths = [f"{RESULTS}/benchmarks/prepare_model/base.tsv"]
    paths += expand(f"{RESULTS}/benchmarks/prepare_data/{{role}}.tsv", role=used_roles())
    paths += expand(f"{RESULTS}/benchmarks/sample_negatives/{{task}}.tsv", task=onpolicy_tasks())
    paths += [f"{RESULTS}/benchmarks/warmup/{init}.tsv" for init in grid.warm_inits(config)]
    paths += [f"{RESULTS}/benchmarks/adapt/{cell}.tsv" for cell in cells]
    paths += [
        f"{RESULTS}/benchmarks/evaluate/{benchmark}/{cell_path(cell.wildcards)}.tsv"
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


# Job resources for cluster runs (runtime in minutes, host memory in MB), estimated from the config
# by d2lora.resources; override any of them per rule: --set-resources adapt:runtime=720. A retry
# (--retries) gets `attempt` times the time and more memory.
from d2lora.resources import ResourceModel  # noqa: E402

RESOURCES = ResourceModel(config)


def warmup_runtime(wildcards, attempt):
    return RESOURCES.warmup_runtime(attempt)


def adapt_runtime(wildcards, attempt):
    return RESOURCES.adapt_runtime(wildcards.method, int(wildcards.n), attempt)


def evaluate_runtime(wildcards, attempt):
    return RESOURCES.evaluate_runtime(wildcards.benchmark, attempt)


def sample_negatives_runtime(wildcards, attempt):
    return RESOURCES.sample_negatives_runtime(wildcards.task, attempt)


def prepare_model_runtime(wildcards, attempt):
    return RESOURCES.prepare_model_runtime(attempt)


def data_runtime(wildcards, attempt):
    return RESOURCES.data_runtime(wildcards.role, attempt)


def model_job_mem_mb(wildcards, attempt):
    return RESOURCES.model_job_mem_mb(attempt)


def prepare_model_mem_mb(wildcards, attempt):
    return RESOURCES.prepare_model_mem_mb(attempt)


def data_mem_mb(wildcards, attempt):
    return RESOURCES.data_mem_mb(wildcards.role, attempt)


# ----------------------------------------------------------------------------- inputs of the result rules
from d2lora.results.labels import init_labels  # noqa: E402

# init name -> label (config `variants`, else LoRA / D2LoRA / name)
INIT_LABELS = init_labels(config)
REFERENCE = {
    "math": "workflow/resources/reference/paper_table3_gsm8k.csv",
    "titles": "workflow/resources/reference/paper_table1_rouge.csv",
}
# The paper's values exist only as Tables 1 and 3, which are also Figures 1 and 2's points; its
# Figures 3 (ARC-Easy) and 4 (n = 100..1,000) were never transcribed. Draw nothing it did not report.
FIGURES_WITH_PAPER_VALUES = ("figure1", "figure2")


# Figures (figures.smk)
def figure_reference(figure):
    if figure not in FIGURES_WITH_PAPER_VALUES:
        return []
    return [REFERENCE[config["experiments"][figure]["task"]]]


def prediction_cells():
    """Every evaluation of the grid (benchmark and cell), in the order of prediction_paths()."""
    return [{"benchmark": benchmark, **cell.wildcards} for benchmark, cell in grid.evaluation_jobs(config)]


def prediction_paths():
    return [eval_file(c["benchmark"], c, "predictions.jsonl") for c in prediction_cells()]


def spec_labels(artifact):
    """Labels of the inits one figure or table draws (a label edit reruns only what shows it)."""
    return {init: INIT_LABELS[init] for init in config["experiments"][artifact]["inits"]}


# Cost (cost.smk)
def cost_cells():
    cells = []
    for cell in sorted({cell for _, cell in grid.evaluation_jobs(config)}):
        warm = grid.variant(config, cell.init)["warmup"]
        cells.append(
            {
                **cell.wildcards,
                "training": f"{adapter_dir(cell.wildcards)}/training.json" if cell.n > 0 else None,
                "warmup": cell.init if warm else None,
            }
        )
    return cells


def cost_inputs():
    adapters = [adapter_dir(cell.wildcards) for cell in grid.training_cells(config)]
    return {"adapters": adapters, "warmups": [warmup_adapter_path(init) for init in grid.warm_inits(config)]}


# Provenance (manifests.smk)
def result_manifest_inputs():
    adapters = [adapter_dir(cell.wildcards) for cell in grid.training_cells(config)]
    adapters += [warmup_adapter_path(init) for init in grid.warm_inits(config)]
    evaluations = [
        eval_file(benchmark, cell.wildcards, "manifest.json") for benchmark, cell in grid.evaluation_jobs(config)
    ]
    return {"adapters": adapters, "evaluations": evaluations}
