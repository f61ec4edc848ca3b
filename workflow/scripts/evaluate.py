from d2lora.evaluation.run import evaluate_cell
from d2lora.runtime import job

with job(snakemake):
    evaluate_cell(
        benchmark=snakemake.wildcards.benchmark,
        cell=dict(snakemake.wildcards.items()),
        model_dir=snakemake.input.model,
        adapter_dir=snakemake.input.get("adapter"),
        data_dir=snakemake.input.data,
        settings=snakemake.params.settings,
        scores_path=snakemake.output.scores,
        predictions_path=snakemake.output.predictions,
        device=snakemake.params.device,
    )
