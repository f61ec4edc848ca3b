# Provenance of every result: each trained adapter folder and each evaluation cell carries a
# manifest.json (config hash, input and output sha256, package versions, git commit, host,
# device; d2lora.manifests.build_manifest). This rule gathers them into one table for the
# report; `python -m d2lora.verify results/` re-hashes the files against them.


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
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    script:
        "../scripts/manifest_table.py"
