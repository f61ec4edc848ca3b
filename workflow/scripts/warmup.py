from pathlib import Path

from d2lora.runtime import job
from d2lora.training.dispatch import train_cell_job

with job(snakemake):
    train_cell_job(
        "run_warmup",
        server=snakemake.config["training"].get("server"),
        log_path=snakemake.log[0],
        model_dir=snakemake.input.model,
        train_path=str(Path(snakemake.input.data) / "train.jsonl"),
        lora=snakemake.params.lora,
        hp=snakemake.params.hp,
        out_dir=snakemake.output.adapter,
        seed=snakemake.params.seed,
        variant=snakemake.params.variant,
        device=snakemake.params.device,
        # Read from the config, not params: the interval changes no result, so it reruns nothing.
        checkpoint_steps=snakemake.config["training"]["checkpoint_steps"],
    )
