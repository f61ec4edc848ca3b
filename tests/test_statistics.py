"""Statistics: bootstrap CIs over examples, exact McNemar, paired bootstrap, Holm, the tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from d2lora.grid import ConfigError, check_statistics_config, comparison_targets, statistics_settings
from d2lora.io import DataFileError
from d2lora.results.metrics import BENCHMARK_METRICS, collect_metrics
from d2lora.results.per_example import (
    EXAMPLE_METRICS,
    CellKey,
    cell_examples,
    load_examples,
    paired_values,
    read_predictions,
)
from d2lora.results.significance import (
    INTERVAL_COLUMNS,
    SIGNIFICANCE_COLUMNS,
    check_against_metrics,
    interval_table,
    read_intervals,
    significance_table,
    write_intervals,
    write_significance,
)
from d2lora.results.statistics import bootstrap_ci, bootstrap_means, holm, mcnemar_exact, mcnemar_test, paired_bootstrap

# ---------------------------------------------------------------------------- McNemar


def test_mcnemar_against_a_hand_computed_binomial():
    # b = 10, c = 2: P(X <= 2), X ~ Bin(12, 1/2) = (1 + 12 + 66) / 4096; two-sided doubles it.
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert round(mcnemar_exact(10, 2), 4) == 0.0386
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence
    assert mcnemar_exact(5, 5) == 1.0  # doubling a tail above 1/2 is capped
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant pairs one way


@pytest.mark.parametrize("b,c", [(10, 2), (0, 7), (3, 4), (17, 9), (40, 60), (250, 300), (1, 1000)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_test_counts_discordant_pairs():
    a = [1, 1, 1, 0, 0, 0, 1, 0]
    b = [1, 0, 0, 1, 0, 0, 0, 1]
    result = mcnemar_test(a, b)
    assert (result.only_a, result.only_b) == (3, 2)
    assert result.p == mcnemar_exact(3, 2) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_test([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="non-negative integers"):
        mcnemar_exact(-1, 3)


# ---------------------------------------------------------------------------- bootstrap CI


def test_bootstrap_ci_coverage_on_a_simulated_bernoulli():
    """About 95% of 400 percentile-bootstrap CIs cover the true accuracy (seeded, loose bounds)."""
    rng = np.random.default_rng(12345)
    truth, size = 0.3, 200
    covered = 0
    for replicate in range(400):
        sample = (rng.random(size) < truth).astype(float)
        interval = bootstrap_ci(sample, samples=1000, confidence=0.95, seed=replicate)
        covered += interval.low <= truth <= interval.high
    assert 0.91 <= covered / 400 <= 0.98, covered


def test_bootstrap_ci_agrees_with_the_normal_approximation_for_many_examples():
    rng = np.random.default_rng(7)
    sample = (rng.random(4000) < 0.4).astype(float)
    interval = bootstrap_ci(sample, samples=4000, seed=1)
    half = 1.959964 * math.sqrt(sample.mean() * (1 - sample.mean()) / sample.size)
    assert interval.mean == pytest.approx(sample.mean())
    assert interval.low == pytest.approx(sample.mean() - half, abs=0.003)
    assert interval.high == pytest.approx(sample.mean() + half, abs=0.003)


def test_bootstrap_ci_of_constant_values_is_a_point():
    assert tuple(bootstrap_ci([0.25] * 30, samples=200)) == (0.25, 0.25, 0.25)


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.random.default_rng(3).random(137)
    first = bootstrap_ci(values, samples=3000, seed=11)
    assert bootstrap_ci(values, samples=3000, seed=11) == first  # bit for bit
    assert bootstrap_ci(values, samples=3000, seed=12) != first
    assert np.array_equal(bootstrap_means(values, 500, 4), bootstrap_means(values, 500, 4))


def test_bootstrap_blocks_do_not_change_the_stream(monkeypatch):
    """Resamples are drawn in blocks; results depend on the number of examples only."""
    from d2lora.results import statistics

    values = np.random.default_rng(5).random(51)  # odd draws per block
    whole = bootstrap_means(values, 300, seed=9)
    monkeypatch.setattr(statistics, "BLOCK_ELEMENTS", 51 * 7)  # 7 resamples per block
    blocked = bootstrap_means(values, 300, seed=9)
    # A block of rows is drawn in one call; the generator's stream is row-major, so the values agree.
    assert np.array_equal(whole, blocked)


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="no examples"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.0, 1.0], confidence=1.0)
    with pytest.raises(ValueError, match="positive integer"):
        bootstrap_ci([0.0, 1.0], samples=0)


# ---------------------------------------------------------------------------- paired bootstrap


def test_identical_arms_give_p_one_and_a_ci_with_zero():
    a = (np.random.default_rng(0).random(300) < 0.5).astype(float)
    result = paired_bootstrap(a, a.copy(), samples=2000, seed=0)
    assert result.diff == 0.0 and result.p == 1.0
    assert result.low <= 0.0 <= result.high
    assert mcnemar_test(a, a).p == 1.0


def test_equal_means_with_discordant_examples_are_not_significant():
    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    ones, zeros = np.flatnonzero(a == 1)[:15], np.flatnonzero(a == 0)[:15]
    b[ones], b[zeros] = 0.0, 1.0  # 15 flips each way: same mean, 30 discordant examples
    result = paired_bootstrap(a, b, samples=2000, seed=0)
    assert result.diff == 0.0 and result.p == 1.0 and result.low < 0.0 < result.high
    assert mcnemar_test(a, b) == (15, 15, 1.0)


def test_a_large_true_difference_is_significant():
    rng = np.random.default_rng(2)
    a = (rng.random(1000) < 0.30).astype(float)
    b = (rng.random(1000) < 0.60).astype(float)
    result = paired_bootstrap(a, b, samples=10_000, seed=0)
    assert result.p < 0.001 and result.p == pytest.approx(1 / 10_001)
    assert 0.2 < result.low < result.diff < result.high < 0.4
    assert mcnemar_test(a, b).p < 1e-20


def test_paired_bootstrap_p_is_roughly_uniform_under_the_null():
    """Under no difference about 5% of tests reject at 0.05 (seeded, loose bounds)."""
    rng = np.random.default_rng(99)
    rejected = 0
    for replicate in range(200):
        a = rng.random(150)
        b = rng.random(150)  # same distribution, paired by position
        rejected += paired_bootstrap(a, b, samples=500, seed=replicate).p < 0.05
    assert 2 <= rejected <= 22, rejected


def test_paired_bootstrap_on_rouge_like_values_matches_the_mean_difference():
    rng = np.random.default_rng(4)
    a = rng.beta(2, 5, size=100)
    b = np.clip(a + 0.05 + rng.normal(0, 0.02, size=100), 0, 1)
    result = paired_bootstrap(a, b, samples=2000, seed=3)
    assert result.diff == pytest.approx(float((b - a).mean()))
    assert result.low > 0.0 and result.p < 0.001
    assert paired_bootstrap(a, b, samples=2000, seed=3) == result


def test_paired_arms_must_have_the_same_examples():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="misaligned example ids.*1 example id\\(s\\) only in A.*'q3'"):
        paired_values(["q1", "q2", "q3"], [1, 0, 1], ["q1", "q2", "q4"], [1, 1, 0])
    with pytest.raises(ValueError, match="duplicate"):
        paired_values(["q1", "q1"], [1, 0], ["q1", "q2"], [1, 1])
    a, b = paired_values(["q1", "q2", "q3"], [1, 0, 1], ["q3", "q1", "q2"], [0.0, 1.0, 0.5])
    assert a.tolist() == [1, 0, 1] and b.tolist() == [1.0, 0.5, 0.0]  # B reordered to A's ids


# ---------------------------------------------------------------------------- Holm


def test_holm_against_hand_computed_values():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1, but monotone: 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2]).tolist() == [0.2]
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    assert holm([]).tolist() == []
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        holm([0.1, float("nan")])


# ---------------------------------------------------------------------------- cells and seeds


def test_a_cell_with_several_seeds_is_the_mean_over_seeds_per_example():
    cell = cell_examples({1: {"a": 1.0, "b": 0.0, "c": 1.0}, 0: {"c": 0.0, "a": 1.0, "b": 0.0}})
    assert cell.ids == ("a", "b", "c") and cell.seeds == (0, 1)
    assert cell.per_example.tolist() == [1.0, 0.0, 0.5]
    seed_means = cell.values.mean(axis=1)  # 1/3 and 2/3
    assert bootstrap_ci(cell.per_example, samples=100).mean == pytest.approx(seed_means.mean())


def test_seeds_of_one_cell_must_share_example_ids():
    with pytest.raises(ValueError, match="misaligned example ids between seeds 0 and 1"):
        cell_examples({0: {"a": 1.0, "b": 0.0}, 1: {"a": 1.0, "z": 0.0}}, name="gsm8k/math/sft/lora/n4")


def test_every_reported_metric_has_a_per_example_source():
    for benchmark, metrics in BENCHMARK_METRICS.items():
        for name, _ in metrics.values():
            assert EXAMPLE_METRICS[name].benchmark == benchmark


def test_evaluation_records_carry_the_fields_statistics_reads(tmp_path):
    """The per-example records the evaluators write hold the fields EXAMPLE_METRICS names."""
    from d2lora.evaluation.math_eval import score_math_output
    from d2lora.evaluation.multiple_choice import score_item

    records = {
        "gsm8k": [score_math_output({"id": "m1", "answer": "4"}, "2+2?", "so \\boxed{4}")],
        "arc_easy": [
            score_item(
                {"id": "s1", "choices": ["ab", "c"], "answer_index": 1, "labels": ["A", "B"]}, [-3.0, -1.0], [2, 1]
            )
        ],
    }
    pytest.importorskip("rouge_score")
    from d2lora.evaluation.titles_eval import make_scorer, score_title

    records["titles"] = [
        score_title(make_scorer(), {"id": "t1", "prompt": "p", "reference": "Tax and growth"}, "Title: Tax and growth")
    ]
    for benchmark, rows in records.items():
        path = tmp_path / f"{benchmark}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        fields = sorted({m.field for m in EXAMPLE_METRICS.values() if m.benchmark == benchmark})
        values = read_predictions(path, fields)
        assert all(values[field][rows[0]["id"]] == 1.0 for field in fields), (benchmark, values)


def test_read_predictions_refuses_missing_fields_and_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "correct": true}\n{"id": "b"}\n')
    with pytest.raises(DataFileError, match="id b.*'correct'"):
        read_predictions(path, ["correct"])
    path.write_text('{"id": "a", "correct": true}\n{"id": "a", "correct": false}\n')
    with pytest.raises(DataFileError, match="appears twice"):
        read_predictions(path, ["correct"])


# ---------------------------------------------------------------------------- tables from files

IDS = [f"q{i:03d}" for i in range(60)]


def correct_flags(init: str, n: int) -> list[bool]:
    """Per-example outcomes: at n = 0 both inits get every other example right (identical arms);
    at n = 4 lora gets the first 20 of 60 right and d2lora the first 40."""
    if n == 0:
        return [i % 2 == 0 for i in range(len(IDS))]
    right = {"lora": 20, "d2lora": 40}[init]
    return [i < right for i in range(len(IDS))]


def write_cell(root: Path, benchmark: str, cell: dict, rows: list[dict], score: dict) -> Path:
    folder = root / benchmark / cell["task"] / cell["method"] / cell["init"] / f"n{cell['n']}" / f"s{cell['seed']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "scores.json").write_text(json.dumps({"benchmark": benchmark, **cell, "metrics": score}))
    return folder / "predictions.jsonl"


@pytest.fixture
def evaluated(tmp_path):
    """A small grid: GSM8K (n = 0 base, n = 4 with seeds 0 and 1) and titles (n = 4, one seed)."""
    cells, paths, scores = [], [], []
    for init in ("lora", "d2lora"):
        jobs = [("none", 0, 0), ("sft", 4, 0), ("sft", 4, 1)]
        for method, n, seed in jobs:
            cell = {"task": "math", "method": method, "init": init, "n": n, "seed": seed}
            flags = correct_flags(init, n)
            if seed == 1:
                flags = flags[1:] + flags[:1]  # another seed, other examples right, same count
            rows = [{"id": i, "correct": f, "output": "..."} for i, f in zip(IDS, flags)]
            paths.append(write_cell(tmp_path, "gsm8k", cell, rows, {"accuracy": sum(flags) / len(flags)}))
            cells.append({"benchmark": "gsm8k", **cell})
        cell = {"task": "titles", "method": "sft", "init": init, "n": 4, "seed": 0}
        rouge = [0.2 + 0.3 * (init == "d2lora") + 0.01 * k for k in range(10)]
        rows = [{"id": f"t{k}", "rouge1": r, "rouge2": r / 2, "rougeL": r} for k, r in enumerate(rouge)]
        score = {"rouge1": 100 * sum(rouge) / 10, "rouge2": 50 * sum(rouge) / 10, "rougeL": 100 * sum(rouge) / 10}
        paths.append(write_cell(tmp_path, "titles", cell, rows, score))
        cells.append({"benchmark": "titles", **cell})
    scores = [p.with_name("scores.json") for p in paths]
    return cells, paths, scores


def test_interval_table_from_predictions(evaluated):
    cells, paths, scores = evaluated
    examples = load_examples(cells, paths)
    table = interval_table(examples, samples=2000, seed=0)
    assert list(table.columns) == INTERVAL_COLUMNS
    # 2 inits x (base + sft n4) on gsm8k, 2 inits x 3 ROUGE metrics on titles
    assert len(table) == 4 + 6
    sft = table[(table["metric"] == "gsm8k_accuracy") & (table["init"] == "d2lora") & (table["n"] == 4)].iloc[0]
    assert (sft["seeds"], sft["examples"], sft["mean"]) == (2, 60, pytest.approx(100 * 40 / 60))
    assert sft["ci_low"] < sft["mean"] < sft["ci_high"]
    # Seeds are averaged per example first: two seeds of 40/60 each keep the mean at 66.7%.
    check_against_metrics(table, collect_metrics(scores))  # per-example means equal scores.json


def test_intervals_disagreeing_with_scores_are_refused(evaluated):
    cells, paths, scores = evaluated
    metrics = collect_metrics(scores)
    table = interval_table(load_examples(cells, paths), samples=200)
    metrics.loc[(metrics["metric"] == "rougeL") & (metrics["init"] == "lora"), "value"] += 1.0
    with pytest.raises(DataFileError, match="titles/sft/lora/n4 rougeL: per-example mean"):
        check_against_metrics(table, metrics)
    with pytest.raises(DataFileError, match="not in the metrics table"):
        check_against_metrics(table, metrics[metrics["metric"] != "rouge2"])


def test_write_and_read_intervals_are_byte_stable(tmp_path, evaluated):
    cells, paths, _ = evaluated
    table = interval_table(load_examples(cells, paths), samples=500)
    write_intervals(table, tmp_path / "a.tsv")
    write_intervals(interval_table(load_examples(cells[::-1], paths[::-1]), samples=500), tmp_path / "b.tsv")
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    back = read_intervals(tmp_path / "a.tsv")
    assert back[["task", "metric", "init", "n"]].equals(
        table.sort_values(INTERVAL_COLUMNS[:6]).reset_index(drop=True)[["task", "metric", "init", "n"]]
    )
    assert (tmp_path / "a.tsv").read_text().splitlines()[0] == "\t".join(INTERVAL_COLUMNS)


def test_significance_table(tmp_path, evaluated):
    cells, paths, _ = evaluated
    examples = load_examples(cells, paths)
    targets = [("math", "gsm8k_accuracy"), ("titles", "rougeL")]
    table = significance_table(
        examples, targets, [("lora", "d2lora")], samples=2000, seed=0, labels={"lora": "LoRA", "d2lora": "D2LoRA"}
    )
    assert list(table.columns) == SIGNIFICANCE_COLUMNS
    assert table[["task", "metric", "method", "n"]].values.tolist() == [
        ["math", "gsm8k_accuracy", "none", 0],
        ["math", "gsm8k_accuracy", "sft", 4],
        ["titles", "rougeL", "sft", 4],
    ]
    base, sft, titles = (table.iloc[i] for i in range(3))
    # n = 0: the same 30 of 60 examples right in both arms: nothing to detect.
    assert (base["test"], base["p_mcnemar"], base["p_bootstrap"], base["significant"]) == ("mcnemar", 1.0, 1.0, "no")
    # n = 4: two seeds per arm, per-example means are not 0/1, so only the bootstrap applies.
    assert sft["test"] == "bootstrap" and pd.isna(sft["p_mcnemar"]) and pd.isna(sft["only_a"])
    assert sft["diff"] == pytest.approx(100 * 20 / 60) and sft["diff_ci_low"] > 0
    assert sft["p_bootstrap"] == pytest.approx(1 / 2001) and sft["significant"] == "yes"
    assert sft["comparison"] == "D2LoRA vs LoRA" and (sft["a"], sft["b"]) == ("lora", "d2lora")
    # Holm within the GSM8K family (2 rows): the smaller p doubled.
    assert sft["p_holm"] == pytest.approx(2 / 2001)
    assert titles["diff"] == pytest.approx(30.0) and titles["p_holm"] == titles["p_bootstrap"]
    write_significance(table, tmp_path / "s.csv", tmp_path / "s.md")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == ",".join(SIGNIFICANCE_COLUMNS)
    assert lines[2].startswith("math,gsm8k_accuracy,sft,4,lora,d2lora,D2LoRA vs LoRA,60,2,2,33.33,66.67,33.33,")
    assert ",,,,0.0005,bootstrap,0.001,yes" in lines[2]
    assert (tmp_path / "s.md").read_text().count("\n") == 2 + len(table)


def test_significance_table_with_one_seed_uses_mcnemar(evaluated):
    cells, paths, _ = evaluated
    keep = [i for i, c in enumerate(cells) if c["seed"] == 0]
    examples = load_examples([cells[i] for i in keep], [paths[i] for i in keep])
    table = significance_table(examples, [("math", "gsm8k_accuracy")], [("lora", "d2lora")], samples=1000)
    sft = table[table["method"] == "sft"].iloc[0]
    assert (sft["only_a"], sft["only_b"], sft["test"]) == (0, 20, "mcnemar")
    assert sft["p_mcnemar"] == pytest.approx(2 / 2**20)
    assert sft["p_holm"] == pytest.approx(min(1.0, 2 * sft["p_mcnemar"]))


def test_significance_table_refuses_misaligned_arms(tmp_path, evaluated):
    cells, paths, _ = evaluated
    lora_sft = next(
        i
        for i, c in enumerate(cells)
        if (c["benchmark"], c["init"], c["method"], c["seed"]) == ("gsm8k", "lora", "sft", 0)
    )
    rows = [json.loads(line) for line in paths[lora_sft].read_text().splitlines()]
    rows[0]["id"] = "other"
    paths[lora_sft].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="misaligned example ids between seeds"):
        load_examples(cells, paths)
    keep = [i for i, c in enumerate(cells) if c["seed"] == 0]
    examples = load_examples([cells[i] for i in keep], [paths[i] for i in keep])
    with pytest.raises(ValueError, match="misaligned example ids.*gsm8k/math/sft/lora/n4"):
        significance_table(examples, [("math", "gsm8k_accuracy")], [("lora", "d2lora")], samples=100)


def test_load_examples_refuses_a_seed_twice(evaluated):
    cells, paths, _ = evaluated
    with pytest.raises(DataFileError, match="given twice"):
        load_examples([cells[0], cells[0]], [paths[0], paths[0]])
    with pytest.raises(ValueError, match="2 cells but 1"):
        load_examples(cells[:2], paths[:1])
    examples = load_examples(cells, paths)
    assert CellKey("math", "gsm8k", "gsm8k_accuracy", "none", "lora", 0) in examples


# ---------------------------------------------------------------------------- config


def grid_config(**statistics) -> dict:
    config = {
        "seeds": [0],
        "experiments": {
            "figure1": {"task": "math", "metric": "gsm8k_accuracy", "methods": ["sft"], "inits": ["lora"], "n": [4]},
            "figure2": {
                "task": "math",
                "metric": "gsm8k_accuracy",
                "methods": ["sft"],
                "inits": ["lora", "d2lora"],
                "n": [0, 4],
            },
            "table1": {"task": "titles", "metric": "rougeL", "methods": ["sft"], "inits": ["lora", "pissa"], "n": [4]},
        },
        "variants": {"pissa": {"init_lora_weights": "pissa", "label": "PiSSA"}},
    }
    if statistics:
        config["statistics"] = statistics
    return config


def test_statistics_settings_defaults():
    settings = statistics_settings(grid_config())
    assert settings == {"bootstrap_samples": 10_000, "confidence": 0.95, "seed": 0, "comparisons": [["lora", "d2lora"]]}
    only_lora = grid_config()
    only_lora["experiments"] = {"figure1": only_lora["experiments"]["figure1"]}
    assert statistics_settings(only_lora)["comparisons"] == []  # the default needs both in the grid
    check_statistics_config(only_lora)
    custom = statistics_settings(grid_config(bootstrap_samples=500, comparisons=[["lora", "pissa"]]))
    assert (custom["bootstrap_samples"], custom["comparisons"]) == (500, [["lora", "pissa"]])
    assert comparison_targets(grid_config()) == [("math", "gsm8k_accuracy"), ("titles", "rougeL")]


def test_check_statistics_config():
    check_statistics_config(grid_config())
    check_statistics_config(grid_config(comparisons=[["lora", "d2lora"], ["lora", "pissa"]], confidence=0.9))
    bad = {
        "not an init of the grid": {"comparisons": [["lora", "olora"]]},
        "with itself": {"comparisons": [["lora", "lora"]]},
        "listed twice": {"comparisons": [["lora", "d2lora"], ["lora", "d2lora"]]},
        "nothing to compare": {"comparisons": [["d2lora", "pissa"]]},
        "a pair": {"comparisons": [["lora"]]},
        "statistics.confidence": {"confidence": 1.5},
        "statistics.bootstrap_samples": {"bootstrap_samples": 0},
    }
    for message, block in bad.items():
        with pytest.raises(ConfigError, match=message):
            check_statistics_config(grid_config(**block))
