# Figures, tables and provenance, all regenerated from the cached metrics table. The plotting
# and table code is an input, so editing it reruns these jobs and nothing upstream.

FIGURE_CODE = "src/d2lora/results/figures.py"
TABLE_CODE = "src/d2lora/results/tables.py"
REFERENCE = {
    "math": "workflow/resources/reference/paper_table3_gsm8k.csv",
    "titles": "workflow/resources/reference/paper_table1_rouge.csv",
}


rule figure:
    input:
        metrics=f"{RESULTS}/metrics/metrics.tsv",
        reference=lambda wc: REFERENCE[config["experiments"][wc.figure]["task"]],
        code=FIGURE_CODE,
    output:
        png=report(
            f"{RESULTS}/figures/{{figure}}.png",
            caption="../../report/figure.rst",
            category="Figures",
        ),
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
    params:
        spec=lambda wc: config["experiments"][wc.figure],
    log:
        f"{LOGS}/figure/{{figure}}.log",
    resources:
        runtime=10,
        mem_mb=2000,
    conda:
        "../../envs/plot.yaml"
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
    params:
        spec=lambda wc: config["experiments"][wc.table],
    log:
        f"{LOGS}/table/{{table}}.log",
    resources:
        runtime=10,
        mem_mb=2000,
    conda:
        "../../envs/plot.yaml"
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
    params:
        config=config,
    log:
        f"{LOGS}/table/table2.log",
    resources:
        runtime=10,
        mem_mb=2000,
    conda:
        "../../envs/plot.yaml"
    script:
        "../scripts/hyperparameter_table.py"


rule provenance:
    input:
        data=data_dirs(),
        model=f"{RESULTS}/model/base",
        benchmarks=benchmark_paths(),
    output:
        config=report(f"{RESULTS}/provenance/config_used.yaml", caption="../../report/config.rst", category="Provenance"),
        versions=report(f"{RESULTS}/provenance/versions.tsv", caption="../../report/versions.rst", category="Provenance"),
        checksums=report(
            f"{RESULTS}/provenance/dataset_checksums.tsv", caption="../../report/checksums.rst", category="Provenance"
        ),
        runtimes=report(f"{RESULTS}/provenance/runtimes.tsv", caption="../../report/runtimes.rst", category="Provenance"),
    params:
        config=config,
    log:
        f"{LOGS}/provenance.log",
    resources:
        runtime=15,
        mem_mb=2000,
    conda:
        "../../envs/plot.yaml"
    script:
        "../scripts/provenance.py"
