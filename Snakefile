# D2LoRA reproduction: data -> model -> warm-up -> adaptation fan-out -> evaluation -> figures,
# tables and the HTML report. Read the rule files in order to see the DAG.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a preset is given with --configfile: presets are complete, and
# merging one over the default would mix their keys.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/warmup.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/cost.smk"
include: "workflow/rules/manifests.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
        f"{RESULTS}/provenance/manifests.tsv",
