from d2lora.results.tables import hyperparameter_table, write_table
from d2lora.runtime import job

with job(snakemake):
    write_table(hyperparameter_table(snakemake.params.config), snakemake.output.csv, snakemake.output.md)
