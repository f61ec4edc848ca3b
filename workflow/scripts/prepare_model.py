from d2lora.models import prepare_base_model
from d2lora.runtime import job

with job(snakemake):
    prepare_base_model(snakemake.params.model_cfg, snakemake.output.model)
