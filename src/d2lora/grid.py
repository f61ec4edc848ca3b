"""The experiment grid, derived from config: which cells to train and which to evaluate.

Each artifact in `experiments` names a task, a metric, methods, inits and sample sizes; the
training grid is the union of their cells times `seeds`. A cell with n = 0 trains nothing and is
shared by every method (method "none"): the base model (lora) or base + warm-up adapter (d2lora).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import yaml

from d2lora.benchmarks import BENCHMARKS, METRICS, eval_roles
from d2lora.data.formats import FORMATS
from d2lora.data.prepare import ROLE_FORMS
from d2lora.data.sources import available_rows, source_origin
from d2lora.models import check_flex_attention_heads, known_attention_heads
from d2lora.settings import Decoding, StatisticsSettings, defaults, with_defaults
from d2lora.training.variants import BUILTIN_VARIANTS as TYPED_BUILTINS
from d2lora.training.variants import Variant, VariantError

TASKS = ("math", "titles")
# Each metric's benchmark and each benchmark's task, from the benchmark catalog (the schema's enum
# says which metrics an experiment may plot).
BENCHMARK_OF_METRIC = {name: bench.name for name, (bench, _) in METRICS.items()}
TASK_OF_BENCHMARK = {name: bench.task for name, bench in BENCHMARKS.items()}
PREFERENCE_METHODS = ("dpo", "orpo")
BASE_METHOD = "none"


TEMPLATE_PLACEHOLDERS = {"math": "question", "titles": "abstract"}


class ConfigError(ValueError):
    """A configuration that passes the schema but cannot be run; the message names the key."""


def check_config_files(paths) -> None:
    """Refuse a YAML config file in which a key appears twice in one mapping.

    YAML loaders (Snakemake's too) silently keep the last of two equal keys, so a grid pasted
    twice, or an `n:` list written twice, would run a grid nobody wrote. Raises ConfigError
    naming the file, the line and the key.
    """

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{path}:{key_node.start_mark.line + 1}: key '{key}' appears twice in the same mapping "
                    f"(first on line {seen[key] + 1}); YAML would silently keep the last one"
                )
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            try:
                yaml.load(handle, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from err


@dataclass(frozen=True, order=True)
class Cell:
    task: str
    method: str
    init: str
    n: int
    seed: int

    @property
    def wildcards(self) -> dict:
        return {"task": self.task, "method": self.method, "init": self.init, "n": self.n, "seed": self.seed}


# Where a cell's files live under a run's results folder: the rules' wildcards (workflow/rules/
# common.smk) and the tools that read a finished run (benchmarks/compare_runs.py) share it.
CELL_PATH = "{task}/{method}/{init}/n{n}/s{seed}"


def eval_file(benchmark: str, cell: Mapping, name: str, results: str = "results") -> str:
    """One file (scores.json, predictions.jsonl, manifest.json) of a cell's evaluation on a benchmark;
    `cell` is a rule's wildcards or a Cell's wildcards dict."""
    return f"{results}/eval/{benchmark}/{CELL_PATH.format(**cell)}/{name}"


def _cells_of(name: str, experiment: dict, seeds: list[int]) -> list[Cell]:
    cells = []
    for n in experiment["n"]:
        for init in experiment["inits"]:
            if n == 0:
                cells.append(Cell(experiment["task"], BASE_METHOD, init, 0, seeds[0]))
                continue
            for method in experiment["methods"]:
                for seed in seeds:
                    cells.append(Cell(experiment["task"], method, init, n, seed))
    return cells


def evaluation_jobs(config: dict) -> list[tuple[str, Cell]]:
    """(benchmark, cell) pairs to evaluate, unique and sorted."""
    jobs = set()
    for name, experiment in config["experiments"].items():
        benchmark = BENCHMARK_OF_METRIC[experiment["metric"]]
        for cell in _cells_of(name, experiment, config["seeds"]):
            jobs.add((benchmark, cell))
    return sorted(jobs)


def training_cells(config: dict) -> list[Cell]:
    return sorted({cell for _, cell in evaluation_jobs(config) if cell.n > 0})


def max_n(config: dict, task: str) -> int:
    return max((cell.n for cell in training_cells(config) if cell.task == task), default=0)


# The init axis. A variant names how a cell's adapter starts: which adapter type (plain LoRA, or the
# adaptive-rank AdaLoRA / Dynamic LoRA), which of peft's `init_lora_weights`, and whether it
# continues from the D2LoRA warm-up (trained with the same init, on the same residual base where the
# init rewrites the base weights). `lora` and `d2lora` are the paper's two; config `variants` adds more.
# The spec form the rules pass to jobs (d2lora.training.variants.Variant.of completes it there): the
# built-ins' three keys and a label; calibration_rows only where a config sets it, so specs, and
# with them every job's parameters, stay what they were.
SPEC_KEYS = ("adapter", "init_lora_weights", "warmup")
BUILTIN_LABELS = {"lora": "LoRA", "d2lora": "D2LoRA"}
BUILTIN_VARIANTS = {
    name: {**{key: getattr(variant, key) for key in SPEC_KEYS}, "label": BUILTIN_LABELS[name]}
    for name, variant in TYPED_BUILTINS.items()
}
VARIANT_DEFAULTS = {key: getattr(Variant(), key) for key in SPEC_KEYS}


def variants(config: dict) -> dict[str, dict]:
    """Every known variant (built-ins, then config `variants`), defaults filled in."""
    known = {name: dict(spec) for name, spec in BUILTIN_VARIANTS.items()}
    for name, spec in (config.get("variants") or {}).items():
        known[name] = {**VARIANT_DEFAULTS, "label": name, **spec}
    return known


def variant(config: dict, init: str) -> dict:
    known = variants(config)
    if init not in known:
        raise ConfigError(
            f"init '{init}' is not a known variant (known: {', '.join(sorted(known))}); define it under `variants`"
        )
    return known[init]


def inits_in_grid(config: dict) -> list[str]:
    return sorted({cell.init for _, cell in evaluation_jobs(config)})


def warm_inits(config: dict) -> list[str]:
    """Variants of the grid that start from a warm-up: each has its own warm-up adapter."""
    return [init for init in inits_in_grid(config) if variant(config, init)["warmup"]]


def needs_warmup(config: dict) -> bool:
    return bool(warm_inits(config))


def _check_formats(datasets: dict) -> None:
    """Every source's `format` is a registered mapping that yields its role's form, before any job."""
    for role, role_cfg in datasets.items():
        for split, form in ROLE_FORMS.get(role, {}).items():
            source = role_cfg.get(split)
            if not source:
                continue
            key = f"datasets.{role}.{split}"
            if source.get("source") == "onpolicy":
                source, key, form = source.get("from", {}), f"{key}.from", "math_eval"
            fmt = source.get("format")
            if fmt is None:
                continue
            if fmt not in FORMATS:
                raise ConfigError(f"{key}.format: unknown format '{fmt}'; known formats: {', '.join(sorted(FORMATS))}")
            if form not in FORMATS[fmt]:
                raise ConfigError(
                    f"{key}.format: format '{fmt}' cannot produce the {form} rows this split needs "
                    f"(it produces: {', '.join(sorted(FORMATS[fmt]))})"
                )


# Training options that exist for some methods only: anywhere else they would be silently ignored.
# Each with the methods it applies to and why no other method has it (said in the error).
METHOD_ONLY_OPTIONS = {
    "padding_free": (
        ("sft",),
        "TRL 1.16's DPOTrainer turns padding_free off itself (unavailable since a refactor, it warns) "
        "and its ORPO trainer has no such option",
    ),
    "precompute_reference": (("dpo",), "only DPO has a reference model"),
    "keep_dropout": (("dpo", "orpo"), "TRL disables dropout for DPO and ORPO only; SFT trains with it"),
}


def _training_sections(training: dict) -> dict[str, tuple[str, dict]]:
    """Each training section's config key -> (the method it trains, its hyperparameters)."""
    sections = {"training.warmup": ("sft", training.get("warmup") or {})}
    sections.update({f"training.adapt.{m}": (m, hp) for m, hp in (training.get("adapt") or {}).items()})
    return sections


def _check_method_options(training: dict) -> None:
    for key, (method, hp) in _training_sections(training).items():
        for option, (only, why) in METHOD_ONLY_OPTIONS.items():
            if hp.get(option) and method not in only:
                names = ", ".join(m.upper() for m in only)
                raise ConfigError(f"{key}.{option}: {names} only ({key} trains {method.upper()}: {why})")
        if hp.get("no_checkpointing_up_to_tokens") and not hp.get("gradient_checkpointing"):
            raise ConfigError(
                f"{key}.no_checkpointing_up_to_tokens: turns checkpointing off for small cells, and "
                f"{key}.gradient_checkpointing is false (every cell trains without it already)"
            )
        if hp.get("split_micro_batches") and not hp.get("no_checkpointing_up_to_tokens"):
            raise ConfigError(
                f"{key}.split_micro_batches: splits the micro-batches of cells over "
                f"{key}.no_checkpointing_up_to_tokens, which is not set"
            )


FLEX_TRAINING_ON_CPU = "torch's FlexAttention has no backward on the CPU: train on a CUDA device or set it false"


def _check_training_attention(config: dict) -> None:
    """flex_attention trains on CUDA only: torch's FlexAttention has no backward on the CPU."""
    if config.get("device") != "cpu":
        return  # auto: known only on the machine; the training job refuses it there (fast_paths)
    for key, (_method, hp) in _training_sections(config["training"]).items():
        if hp.get("flex_attention"):
            raise ConfigError(f"{key}.flex_attention: {FLEX_TRAINING_ON_CPU}")


def check(config: dict) -> None:
    """Cross-field rules the JSON schema cannot express. Raises ConfigError naming the key."""
    adapt = config["training"]["adapt"]
    for name, spec in (config.get("variants") or {}).items():
        if name in BUILTIN_VARIANTS:
            raise ConfigError(f"variants.{name}: '{name}' is built in ({BUILTIN_VARIANTS[name]}); choose another name")
        adapter = spec.get("adapter", "lora")
        if adapter != "lora" and spec.get("warmup"):
            raise ConfigError(
                f"variants.{name}.warmup: the warm-up trains a plain LoRA adapter; '{adapter}' starts fresh"
            )
        if adapter != "lora" and spec.get("init_lora_weights", "default") != "default":
            raise ConfigError(
                f"variants.{name}.init_lora_weights: peft's LoRA inits apply to adapter 'lora', not '{adapter}'"
            )
        try:
            Variant.of({key: value for key, value in spec.items() if key != "label"})
        except VariantError as err:  # its message starts with the key: "options: only adapters ..."
            raise ConfigError(f"variants.{name}.{err}") from err
    known = variants(config)
    for name, experiment in config["experiments"].items():
        key = f"experiments.{name}"
        for init in experiment["inits"]:
            if init not in known:
                raise ConfigError(
                    f"{key}.inits: '{init}' is not a known variant (known: {', '.join(sorted(known))}); "
                    "define it under `variants`"
                )
        benchmark = BENCHMARK_OF_METRIC[experiment["metric"]]
        if TASK_OF_BENCHMARK[benchmark] != experiment["task"]:
            raise ConfigError(
                f"{key}.metric: '{experiment['metric']}' is measured on task "
                f"'{TASK_OF_BENCHMARK[benchmark]}', not '{experiment['task']}'"
            )
        for method in experiment["methods"]:
            if method not in adapt:
                raise ConfigError(f"{key}.methods: '{method}' has no hyperparameters under training.adapt.{method}")
            if method in PREFERENCE_METHODS and "beta" not in adapt[method]:
                raise ConfigError(f"training.adapt.{method}.beta: required for a preference method")
            if method in PREFERENCE_METHODS and experiment["task"] == "titles":
                raise ConfigError(f"{key}.methods: '{method}' needs rejected answers, and the titles task has none")
    _check_method_options(config["training"])
    _check_training_attention(config)
    _check_formats(config["datasets"])
    for task in TASKS:
        if task not in config["datasets"] or "train" not in config["datasets"][task]:
            if max_n(config, task) > 0:
                raise ConfigError(
                    f"datasets.{task}.train: the grid trains on task '{task}' but no training source is set"
                )
            continue
        source = config["datasets"][task]["train"]
        # Known now for synthetic and local sources (local files are counted); hub and on-policy
        # sizes are known only once loaded, so for them the same check runs at preparation.
        available = available_rows(source)
        wanted = max_n(config, task)
        if available is not None and wanted > available:
            where = f" ({source_origin(source)})" if source["source"] == "local" else ""
            raise ConfigError(
                f"datasets.{task}.train: the grid asks for n={wanted} but this source provides only {available} rows{where}"
            )
    for role, placeholder in TEMPLATE_PLACEHOLDERS.items():
        template = config["datasets"].get(role, {}).get("prompt_template")
        if template is None:
            continue
        if "{" + placeholder + "}" not in template:
            raise ConfigError(f"datasets.{role}.prompt_template: must contain {{{placeholder}}}, got {template!r}")
        if "{{" in template or "}}" in template:
            raise ConfigError(
                f"datasets.{role}.prompt_template: doubled braces; templates are filled by replacing "
                f"{{{placeholder}}} (not str.format), so write a literal box as \\boxed{{}}"
            )
    needed_eval = eval_roles()
    for benchmark, _ in evaluation_jobs(config):
        role = needed_eval[benchmark]
        if "eval" not in config["datasets"].get(role, {}):
            raise ConfigError(
                f"datasets.{role}.eval: benchmark '{benchmark}' is in the grid but has no evaluation source"
            )
    # The presets' tests check files the schema has not filled: the defaults from d2lora.settings.
    gsm8k = Decoding.of(config["evaluation"]["gsm8k"], "evaluation.gsm8k")
    if gsm8k.rows_leave_every and gsm8k.cache == "static" and gsm8k.compile:
        raise ConfigError(
            "evaluation.gsm8k.rows_leave_every: finished rows leaving change the batch's shape, which "
            "a compiled decoding step cannot follow; with cache: static set compile: false"
        )
    if gsm8k.filled_cache_only and (gsm8k.cache != "static" or gsm8k.compile):
        raise ConfigError(
            "evaluation.gsm8k.filled_cache_only: the attention's length changes every step, which a "
            f"compiled decoding step cannot follow; it needs cache: static and compile: false (got cache: "
            f"{gsm8k.cache}, compile: {str(gsm8k.compile).lower()})"
        )
    if gsm8k.packed_gqa and gsm8k.native_gqa:
        raise ConfigError(
            "evaluation.gsm8k.native_gqa: packed_gqa is also on; they are two ways to attend over grouped "
            "KV heads, choose one"
        )
    if gsm8k.flex_attention and (gsm8k.packed_gqa or gsm8k.native_gqa):
        raise ConfigError(
            "evaluation.gsm8k.flex_attention: "
            + ("packed_gqa" if gsm8k.packed_gqa else "native_gqa")
            + " is also on; they are ways to attend over grouped KV heads, choose one"
        )
    if gsm8k.flex_attention and (gsm8k.cache != "static" or gsm8k.filled_cache_only):
        raise ConfigError(
            "evaluation.gsm8k.flex_attention: it skips the static cache's unwritten blocks itself; it needs "
            f"cache: static and filled_cache_only: false (got cache: {gsm8k.cache}, filled_cache_only: "
            f"{str(gsm8k.filled_cache_only).lower()})"
        )
    heads = known_attention_heads(config["model"]) if gsm8k.flex_attention else None
    if heads:
        try:
            check_flex_attention_heads(*heads)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if gsm8k.native_gqa and not gsm8k.cudnn_attention:
        raise ConfigError(
            "evaluation.gsm8k.cudnn_attention: false with native_gqa leaves SDPA only its math kernel for grouped "
            "KV heads with a mask (11 ms against 0.3 ms a layer at the 8B shape); use packed_gqa instead"
        )
    if needs_warmup(config) and "train" not in config["datasets"]["warmup"]:
        raise ConfigError("datasets.warmup.train: d2lora cells need a warm-up training source")
    check_statistics_config(config)


# ----------------------------------------------------------------------------- the statistics block
# Defaults of `statistics` (intervals and the D2LoRA-vs-LoRA tests of d2lora.results.statistics), the
# schema's: the statistics functions' keyword defaults. The default pairs depend on the grid, so they
# live here rather than in the schema.
DEFAULT_BOOTSTRAP_SAMPLES = defaults("statistics")["bootstrap_samples"]
DEFAULT_CONFIDENCE = defaults("statistics")["confidence"]
DEFAULT_SEED = defaults("statistics")["seed"]
DEFAULT_COMPARISONS = (("lora", "d2lora"),)


def comparison_targets(config: Mapping) -> list[tuple[str, str]]:
    """The (task, metric) pairs the experiments report, in config order: the significance
    table's families."""
    return list(dict.fromkeys((spec["task"], spec["metric"]) for spec in config["experiments"].values()))


def comparisons(config: Mapping) -> list[tuple[str, str]]:
    """The configured (A, B) pairs; by default lora vs d2lora where the grid has both."""
    configured = StatisticsSettings.of(config.get("statistics")).comparisons
    if configured is not None:
        return [(str(a), str(b)) for a, b in configured]
    inits = set(inits_in_grid(config))
    return [pair for pair in DEFAULT_COMPARISONS if set(pair) <= inits]


def statistics_settings(config: Mapping) -> dict:
    """The `statistics` block with defaults filled in (bootstrap_samples, confidence, seed,
    comparisons as a list of [a, b])."""
    stats = StatisticsSettings.of(config.get("statistics"))
    return {
        "bootstrap_samples": int(stats.bootstrap_samples),
        "confidence": float(stats.confidence),
        "seed": int(stats.seed),
        "comparisons": [list(pair) for pair in comparisons(config)],
    }


def compared_cells(config: Mapping, a: str, b: str) -> list[tuple[str, str, str, int]]:
    """(task, metric, method, n) where the grid evaluates both inits on a reported metric."""
    evaluated = {(c.task, benchmark, c.method, c.n, c.init) for benchmark, c in evaluation_jobs(config)}
    found = []
    for task, metric in comparison_targets(config):
        benchmark = BENCHMARK_OF_METRIC[metric]
        for t, bm, method, n, init in sorted(evaluated):
            if (t, bm, init) == (task, benchmark, a) and (t, bm, method, n, b) in evaluated:
                found.append((task, metric, method, n))
    return found


def check_statistics_config(config: Mapping) -> None:
    """Cross-field rules of the `statistics` block (part of check).

    Raises ConfigError naming the key: a comparison must name two different inits of
    the grid that are evaluated together on at least one reported metric, and no pair twice.
    """
    block = config.get("statistics") or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"statistics: expected a mapping, got {type(block).__name__}")
    block = with_defaults("statistics", block)
    samples = block["bootstrap_samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"statistics.bootstrap_samples: must be a positive integer, got {samples!r}")
    confidence = block["confidence"]
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"statistics.confidence: must lie strictly between 0 and 1, got {confidence!r}")
    seed = block["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"statistics.seed: must be a non-negative integer, got {seed!r}")
    if "comparisons" not in block:
        return
    inits = inits_in_grid(config)
    seen = set()
    for index, pair in enumerate(block["comparisons"]):
        key = f"statistics.comparisons[{index}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(i, str) for i in pair):
            raise ConfigError(f"{key}: expected a pair [a, b] of init names, got {pair!r}")
        a, b = pair
        if a == b:
            raise ConfigError(f"{key}: compares '{a}' with itself")
        for init in pair:
            if init not in inits:
                raise ConfigError(f"{key}: '{init}' is not an init of the grid (inits: {', '.join(inits)})")
        if (a, b) in seen:
            raise ConfigError(f"{key}: [{a}, {b}] is listed twice")
        seen.add((a, b))
        if not compared_cells(config, a, b):
            raise ConfigError(
                f"{key}: no experiment evaluates '{a}' and '{b}' on the same task, metric, method "
                "and n, so there is nothing to compare"
            )
