from pathlib import Path

from d2lora.io import write_tsv
from d2lora.provenance import package_versions, write_provenance_bundle
from d2lora.results.provenance_tables import dataset_checksum_table, runtime_table
from d2lora.runtime import job

with job(snakemake):
    write_provenance_bundle(snakemake.params.config, package_versions(), Path(snakemake.output.config).parent)
    write_tsv(
        dataset_checksum_table([Path(d) / "manifest.json" for d in snakemake.input.data]), snakemake.output.checksums
    )
    write_tsv(runtime_table(snakemake.input.benchmarks), snakemake.output.runtimes)
