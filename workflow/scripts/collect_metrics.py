from d2lora.results.metrics import collect_metrics, write_metrics
from d2lora.runtime import job

with job(snakemake):
    write_metrics(collect_metrics(snakemake.input.scores), snakemake.output.metrics)
