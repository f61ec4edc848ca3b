from d2lora.results.figures import plot_curves
from d2lora.results.metrics import read_metrics, read_reference
from d2lora.results.significance import read_intervals
from d2lora.runtime import job

with job(snakemake):
    plot_curves(
        read_metrics(snakemake.input.metrics),
        snakemake.params.spec,
        read_reference(list(snakemake.input.reference)),
        snakemake.output.png,
        snakemake.output.pdf,
        intervals=read_intervals(snakemake.input.intervals),
        labels=snakemake.params.labels,
        confidence=snakemake.params.confidence,
    )
