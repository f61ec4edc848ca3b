from pathlib import Path

from d2lora.runtime import job
from d2lora.training.run import run_warmup

with job(snakemake):
    run_warmup(
        snakemake.input.model,
        Path(snakemake.input.data) / "train.jsonl",
        lora=snakemake.params.lora,
        hp=snakemake.params.hp,
        out_dir=snakemake.output.adapter,
        seed=snakemake.params.seed,
        device=snakemake.params.device,
    )
