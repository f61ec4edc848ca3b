# Evaluation of every cell on its benchmark(s): GSM8K-style accuracy (math), ROUGE (titles),
# ARC-Easy multiple choice (forgetting). Per-example outputs sit beside every score.


rule evaluate:
    input:
        unpack(adapter_for_cell),
        unpack(lm_eval_task_input),
        model=f"{RESULTS}/model/base",
        data=lambda wc: f"{RESULTS}/data/{EVAL_ROLE[wc.benchmark]}",
    output:
        scores=f"{RESULTS}/eval/{{benchmark}}/{CELL}/scores.json",
        predictions=f"{RESULTS}/eval/{{benchmark}}/{CELL}/predictions.jsonl",
        manifest=f"{RESULTS}/eval/{{benchmark}}/{CELL}/manifest.json",
    log:
        f"{LOGS}/evaluate/{{benchmark}}/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{benchmark}}/{CELL}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        runtime=evaluate_runtime,
        mem_mb=model_job_mem_mb,
    params:
        settings=eval_settings,
        device=config["device"],
    script:
        "../scripts/evaluate.py"


rule collect_metrics:
    input:
        scores=eval_score_paths(),
    output:
        metrics=report(
            f"{RESULTS}/metrics/metrics.tsv",
            caption="../../report/metrics.rst",
            category="Metrics",
        ),
    log:
        f"{LOGS}/collect_metrics.log",
    conda:
        "../../envs/plot.yaml"
    resources:
        runtime=10,
        mem_mb=2000,
    script:
        "../scripts/collect_metrics.py"
