# The base model, converted once into a plain safetensors folder that every later rule loads.


rule prepare_model:
    output:
        model=directory(f"{RESULTS}/model/base"),
    log:
        f"{LOGS}/prepare_model/base.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_model/base.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        runtime=prepare_model_runtime,
        mem_mb=prepare_model_mem_mb,
    params:
        model_cfg=config["model"],
    script:
        "../scripts/prepare_model.py"
