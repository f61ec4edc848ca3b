# Provenance of every result: each trained adapter folder and each evaluation cell carries a
# manifest.json (config hash, input and output sha256, package versions, git commit, host,
# device; d2lora.provenance.build_manifest). This rule gathers them into one table for the
# report; `python -m d2lora.verify results/` re-hashes the files against them.


def result_manifest_inputs():
    adapters = [f"{RESULTS}/adapters/" + CELL.format(**cell.wildcards) for cell in grid.training_cells(config)]
    adapters += [warmup_adapter_path(init) for init in grid.warm_inits(config)]
    evaluations = [path.replace("/scores.json", "/manifest.json") for path in eval_score_paths()]
    return {"adapters": adapters, "evaluations": evaluations}


rule manifest_table:
    input:
        **result_manifest_inputs(),
    output:
        table=report(
            f"{RESULTS}/provenance/manifests.tsv",
            caption="../../report/manifests.rst",
            category="Provenance",
        ),
    log:
        f"{LOGS}/manifest_table.log",
    resources:
        runtime=10,
        mem_mb=2000,
    conda:
        "../../envs/plot.yaml"
    script:
        "../scripts/manifest_table.py"
