from d2lora.data.prepare import prepare_role
from d2lora.runtime import job

with job(snakemake):
    prepare_role(
        snakemake.wildcards.role,
        snakemake.params.role_cfg,
        snakemake.output.data,
        seed=snakemake.params.seed,
        max_n=snakemake.params.max_n,
    )
