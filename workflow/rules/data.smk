# Data preparation: every role (warmup, math, titles, forgetting) into one canonical form, with
# the training rows shuffled once by `seed` so that the subset of size n is the first n rows.


rule prepare_data:
    input:
        files=role_input_files,
    output:
        data=directory(f"{RESULTS}/data/{{role}}"),
    log:
        f"{LOGS}/prepare_data/{{role}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_data/{{role}}.tsv"
    conda:
        "../../envs/data.yaml"
    resources:
        runtime=data_runtime,
        mem_mb=data_mem_mb,
    params:
        role_cfg=role_config,
        seed=config["seed"],
        max_n=role_max_n,
    script:
        "../scripts/prepare_data.py"


# On-policy negatives (a math train source `{source: onpolicy, from: <gsm8k source>, ...}`): the
# base model's own sampled solutions with a wrong final answer become the rejected answers, the
# reference solutions the chosen ones (SPEC's stand-in for Math-Step-DPO-10K; d2lora.data.onpolicy).
rule sample_negatives:
    input:
        model=f"{RESULTS}/model/base",
        files=onpolicy_source_files,
    output:
        pairs=f"{ONPOLICY}/negatives.jsonl",
        manifest=f"{ONPOLICY}/manifest.json",
    log:
        f"{LOGS}/sample_negatives/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample_negatives/{{task}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=sample_negatives_runtime,
        mem_mb=model_job_mem_mb,
    params:
        source_cfg=lambda wc: config["datasets"][wc.task]["train"],
        prompt_template=lambda wc: config["datasets"][wc.task].get("prompt_template"),
        seed=config["seed"],
        device=config["device"],
        dtype=config["evaluation"]["dtype"],
    script:
        "../scripts/sample_negatives.py"
