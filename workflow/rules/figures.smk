# Figures, tables and provenance, all regenerated from the cached metrics table and the
# per-example predictions. The plotting, table and statistics code is an input, so editing it
# reruns these jobs and nothing upstream.
from d2lora.grid import comparison_targets, statistics_settings  # noqa: E402

FIGURE_CODE = "src/d2lora/results/figures.py"
TABLE_CODE = "src/d2lora/results/tables.py"
# the methods, the per-example values they read, the tables they write
STATS_CODE = [
    "src/d2lora/results/statistics.py",
    "src/d2lora/results/per_example.py",
    "src/d2lora/results/significance.py",
]
# config `statistics` with defaults
STATISTICS = statistics_settings(config)


rule intervals:
    input:
        predictions=prediction_paths(),
        metrics=f"{RESULTS}/metrics/metrics.tsv",
        code=STATS_CODE,
    output:
        intervals=report(
            f"{RESULTS}/metrics/intervals.tsv",
            caption="../../report/intervals.rst",
            category="Metrics",
        ),
    log:
        f"{LOGS}/intervals.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=30,
        mem_mb=4000,
    params:
        cells=prediction_cells(),
        settings={k: STATISTICS[k] for k in ("bootstrap_samples", "confidence", "seed")},
    script:
        "../scripts/intervals.py"


rule significance_table:
    input:
        predictions=prediction_paths(),
        code=STATS_CODE,
        table_code=TABLE_CODE,
    output:
        csv=report(
            f"{RESULTS}/tables/significance.csv",
            caption="../../report/significance.rst",
            category="Tables",
        ),
        md=f"{RESULTS}/tables/significance.md",
    log:
        f"{LOGS}/table/significance.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=30,
        mem_mb=4000,
    params:
        cells=prediction_cells(),
        targets=comparison_targets(config),
        settings=STATISTICS,
        labels=INIT_LABELS,
    script:
        "../scripts/significance_table.py"


rule figure:
    input:
        metrics=f"{RESULTS}/metrics/metrics.tsv",
        intervals=f"{RESULTS}/metrics/intervals.tsv",
        reference=lambda wc: figure_reference(wc.figure),
        code=FIGURE_CODE,
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            caption="../../report/figure.rst",
            category="Figures",
        ),
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
    log:
        f"{LOGS}/figure/{{figure}}.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    params:
        spec=lambda wc: config["experiments"][wc.figure],
        labels=lambda wc: spec_labels(wc.figure),
        confidence=STATISTICS["confidence"],
    script:
        "../scripts/figure.py"


rule comparison_table:
    input:
        metrics=f"{RESULTS}/metrics/metrics.tsv",
        reference=lambda wc: REFERENCE[config["experiments"][wc.table]["task"]],
        code=TABLE_CODE,
    output:
        csv=report(
            f"{RESULTS}/tables/{{table}}.csv",
            caption="../../report/comparison_table.rst",
            category="Tables",
        ),
        md=f"{RESULTS}/tables/{{table}}.md",
    log:
        f"{LOGS}/table/{{table}}.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    params:
        spec=lambda wc: config["experiments"][wc.table],
        labels=lambda wc: spec_labels(wc.table),
    script:
        "../scripts/comparison_table.py"


rule hyperparameter_table:
    input:
        code=TABLE_CODE,
    output:
        csv=report(
            f"{RESULTS}/tables/table2.csv",
            caption="../../report/table2.rst",
            category="Tables",
        ),
        md=f"{RESULTS}/tables/table2.md",
    log:
        f"{LOGS}/table/table2.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    params:
        config=config,
    script:
        "../scripts/hyperparameter_table.py"


rule provenance:
    input:
        data=data_dirs(),
        model=f"{RESULTS}/model/base",
        benchmarks=benchmark_paths(),
    output:
        config=report(
            f"{RESULTS}/provenance/config_used.yaml", caption="../../report/config.rst", category="Provenance"
        ),
        versions=report(
            f"{RESULTS}/provenance/versions.tsv", caption="../../report/versions.rst", category="Provenance"
        ),
        checksums=report(
            f"{RESULTS}/provenance/dataset_checksums.tsv", caption="../../report/checksums.rst", category="Provenance"
        ),
        runtimes=report(
            f"{RESULTS}/provenance/runtimes.tsv", caption="../../report/runtimes.rst", category="Provenance"
        ),
    log:
        f"{LOGS}/provenance.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=15,
        mem_mb=2000,
    params:
        config=config,
    script:
        "../scripts/provenance.py"
