from d2lora.results.cost import cost_table, plot_score_vs_cost, write_cost_table
from d2lora.results.metrics import read_metrics
from d2lora.runtime import job

with job(snakemake):
    table = cost_table(snakemake.params.cells, snakemake.params.warmups)
    write_cost_table(table, snakemake.output.table)
    plot_score_vs_cost(
        read_metrics(snakemake.input.metrics),
        table,
        snakemake.params.experiments,
        snakemake.output.png,
        snakemake.output.pdf,
        labels=snakemake.params.labels,
    )
