# D2LoRA phase 2, fanned out over task x method x init x n x seed (n > 0 only: n = 0 trains
# nothing). The init names a variant (d2lora.grid): lora starts a fresh adapter, d2lora keeps
# training the warm-up adapter; config `variants` adds peft inits, AdaLoRA and Dynamic LoRA.


rule adapt:
    input:
        unpack(warmup_for_init),
        model=f"{RESULTS}/model/base",
        data=f"{RESULTS}/data/{{task}}",
    output:
        adapter=directory(f"{RESULTS}/adapters/{CELL}"),
    log:
        f"{LOGS}/adapt/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/adapt/{CELL}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=adapt_runtime,
        mem_mb=model_job_mem_mb,
    params:
        lora=config["training"]["lora"],
        hp=adapt_hparams,
        variant=variant_spec,
        device=config["device"],
    script:
        "../scripts/adapt.py"
