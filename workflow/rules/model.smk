# The base model, converted once into a plain safetensors folder that every later rule loads.


rule prepare_model:
    output:
        model=directory(f"{RESULTS}/model/base"),
    params:
        model_cfg=config["model"],
    log:
        f"{LOGS}/prepare_model/base.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_model/base.tsv"
    resources:
        mem_mb=8000,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/prepare_model.py"
