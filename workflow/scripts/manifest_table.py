from pathlib import Path

from d2lora.io import write_tsv
from d2lora.manifests import MANIFEST_NAME, manifest_table
from d2lora.runtime import job

with job(snakemake):
    paths = [Path(folder) / MANIFEST_NAME for folder in snakemake.input.adapters] + list(snakemake.input.evaluations)
    write_tsv(manifest_table(paths), snakemake.output.table)
