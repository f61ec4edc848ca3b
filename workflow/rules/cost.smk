# What every cell cost: device-seconds and tokens of its adaptation plus its share of the warm-up
# (trained once, amortized over the tasks that start from it), and the score against that cost.
# Seconds vary from run to run, so they live here and not in metrics.tsv, which is byte-identical
# across runs of one config.
COST_CODE = "src/d2lora/results/cost.py"


rule cost_table:
    input:
        **cost_inputs(),
        metrics=f"{RESULTS}/metrics/metrics.tsv",
        code=COST_CODE,
    output:
        table=report(
            f"{RESULTS}/metrics/cost.tsv",
            caption="../../report/cost.rst",
            category="Metrics",
        ),
        png=report(
            f"{RESULTS}/figures/score_vs_cost.png",
            caption="../../report/score_vs_cost.rst",
            category="Figures",
        ),
        pdf=f"{RESULTS}/figures/score_vs_cost.pdf",
    log:
        f"{LOGS}/cost_table.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    params:
        cells=cost_cells(),
        warmups={init: f"{warmup_adapter_path(init)}/training.json" for init in grid.warm_inits(config)},
        experiments=config["experiments"],
        labels=INIT_LABELS,
    script:
        "../scripts/cost_table.py"
