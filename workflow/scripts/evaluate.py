from d2lora.evaluation.dispatch import evaluate_cell_job
from d2lora.runtime import job

with job(snakemake):
    evaluate_cell_job(
        server=snakemake.config["evaluation"].get("server"),
        log_path=snakemake.log[0],
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
