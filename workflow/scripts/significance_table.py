from d2lora.results.per_example import load_examples
from d2lora.results.significance import significance_table, write_significance
from d2lora.runtime import job

with job(snakemake):
    settings = snakemake.params.settings
    table = significance_table(
        load_examples(snakemake.params.cells, snakemake.input.predictions),
        snakemake.params.targets,
        settings["comparisons"],
        settings["bootstrap_samples"],
        settings["confidence"],
        settings["seed"],
        snakemake.params.labels,
    )
    write_significance(table, snakemake.output.csv, snakemake.output.md)
