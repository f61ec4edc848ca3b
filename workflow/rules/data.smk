# Data preparation: every role (warmup, math, titles, forgetting) into one canonical form, with
# the training rows shuffled once by `seed` so that the subset of size n is the first n rows.


rule prepare_data:
    output:
        data=directory(f"{RESULTS}/data/{{role}}"),
    params:
        role_cfg=role_config,
        seed=config["seed"],
        max_n=role_max_n,
    log:
        f"{LOGS}/prepare_data/{{role}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_data/{{role}}.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/prepare_data.py"
