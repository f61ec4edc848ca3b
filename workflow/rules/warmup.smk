# D2LoRA phase 1: one LoRA adapter trained with SFT on prompt + chosen of the general set, per
# warm-started variant (d2lora, and e.g. a PiSSA-initialized one, which trains on PiSSA's residual
# base so that its adaptation cells continue on that same base).


rule warmup:
    input:
        model=f"{RESULTS}/model/base",
        data=f"{RESULTS}/data/warmup",
    output:
        adapter=directory(f"{RESULTS}/warmup/{{init}}/adapter"),
    log:
        f"{LOGS}/warmup/{{init}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/warmup/{{init}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=warmup_runtime,
        mem_mb=model_job_mem_mb,
    params:
        lora=config["training"]["lora"],
        hp=config["training"]["warmup"],
        variant=variant_spec,
        seed=config["seed"],
        device=config["device"],
    script:
        "../scripts/warmup.py"
