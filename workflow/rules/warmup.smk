# D2LoRA phase 1: one LoRA adapter trained with SFT on prompt + chosen of the general set.


rule warmup:
    input:
        model=f"{RESULTS}/model/base",
        data=f"{RESULTS}/data/warmup",
    output:
        adapter=directory(f"{RESULTS}/warmup/adapter"),
    params:
        lora=config["training"]["lora"],
        hp=config["training"]["warmup"],
        seed=config["seed"],
        device=config.get("device", "auto"),
    log:
        f"{LOGS}/warmup/warmup.log",
    benchmark:
        f"{RESULTS}/benchmarks/warmup/warmup.tsv"
    threads: 1
    resources:
        gpu=1,
        runtime=warmup_runtime,
        mem_mb=model_job_mem_mb,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/warmup.py"
