from d2lora.data.onpolicy import sample_negatives
from d2lora.runtime import job

with job(snakemake):
    sample_negatives(
        snakemake.params.source_cfg,
        snakemake.input.model,
        snakemake.output.pairs,
        snakemake.output.manifest,
        prompt_template=snakemake.params.prompt_template,
        seed=snakemake.params.seed,
        device=snakemake.params.device,
        dtype=snakemake.params.dtype,
    )
