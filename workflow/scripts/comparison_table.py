from d2lora.results.metrics import read_metrics, read_reference
from d2lora.results.tables import comparison_table, write_table
from d2lora.runtime import job

with job(snakemake):
    table = comparison_table(
        read_metrics(snakemake.input.metrics),
        snakemake.params.spec,
        read_reference([snakemake.input.reference]),
        labels=snakemake.params.labels,
    )
    write_table(table, snakemake.output.csv, snakemake.output.md)
