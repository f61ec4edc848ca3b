from d2lora.results.metrics import read_metrics
from d2lora.results.per_example import load_examples
from d2lora.results.significance import check_against_metrics, interval_table, write_intervals
from d2lora.runtime import job

with job(snakemake):
    settings = snakemake.params.settings
    examples = load_examples(snakemake.params.cells, snakemake.input.predictions)
    table = interval_table(examples, settings["bootstrap_samples"], settings["confidence"], settings["seed"])
    check_against_metrics(table, read_metrics(snakemake.input.metrics))
    write_intervals(table, snakemake.output.intervals)
