from pathlib import Path

from d2lora.runtime import job
from d2lora.training.run import run_adaptation

with job(snakemake):
    wc = snakemake.wildcards
    run_adaptation(
        snakemake.input.model,
        Path(snakemake.input.data) / "train.jsonl",
        method=wc.method,
        init=wc.init,
        n=int(wc.n),
        lora=snakemake.params.lora,
        hp=snakemake.params.hp,
        out_dir=snakemake.output.adapter,
        seed=int(wc.seed),
        warmup_dir=snakemake.input.get("warmup"),
        variant=snakemake.params.variant,
        device=snakemake.params.device,
        # Read from the config, not params: the interval changes no result, so it reruns nothing.
        checkpoint_steps=snakemake.config["training"]["checkpoint_steps"],
    )
