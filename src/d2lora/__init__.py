"""D2LoRA reproduction pipeline: the logic behind the Snakemake workflow."""
