"""Bad inputs, each refused before any training starts, with a message naming the key, file or row,
and nothing left behind.

Config cases go through what the workflow runs first (common.smk): the schema
(`snakemake.utils.validate` against workflow/schemas/config.schema.yaml), then `d2lora.grid.check`;
a few of them, and the file-level ones, through a real `snakemake -n` on a copy of the repository.
Data, model and adapter cases go through the Python functions the rules call.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from d2lora import grid
from d2lora.data.prepare import prepare_role, subset
from d2lora.io import DataFileError, read_jsonl, write_jsonl
from d2lora.models import ModelSourceError, prepare_base_model, require_safetensors_adapter
from d2lora.training.adapters import AdapterError, check_adapter_matches
from d2lora.training.run import run_adaptation
from d2lora.training.trainers import conversational

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def _set(path: str, value):
    """A mutation that sets config[a][b]... = value (dotted path)."""

    def mutate(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _delete(path: str):
    def mutate(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


# (case, mutation of config/tiny.yaml, pattern the error message must match: it names the key)
CONFIG_CASES = [
    ("unknown top-level key", _set("learning_rate", 1e-4), r"'learning_rate' was unexpected"),
    ("unknown nested key (typo)", _set("training.lora.rnak", 16), r"'rnak' was unexpected"),
    (
        "wrong type",
        _set("training.lora.rank", "16"),
        r"'16' is not of type 'integer'[\s\S]*\['training'\]\['lora'\]\['rank'\]",
    ),
    (
        "negative n",
        _set("experiments.figure1.n", [-1, 2]),
        r"-1 is less than the minimum of 0[\s\S]*\['figure1'\]\['n'\]",
    ),
    ("duplicate grid cells (n)", _set("experiments.figure2.n", [0, 2, 2]), r"non-unique[\s\S]*\['figure2'\]\['n'\]"),
    ("duplicate seeds", _set("seeds", [0, 0]), r"non-unique[\s\S]*\['seeds'\]"),
    ("unknown method", _set("experiments.figure1.methods", ["sft", "ppo"]), r"'ppo' is not one of"),
    (
        "unknown init",
        _set("experiments.figure2.inits", ["lora", "pissa"]),
        r"experiments\.figure2\.inits: 'pissa' is not a known variant[\s\S]*define it under `variants`",
    ),
    ("path traversal in run_name", _set("run_name", "../../etc"), r"does not match[\s\S]*\['run_name'\]"),
    ("run_name '..'", _set("run_name", ".."), r"does not match[\s\S]*\['run_name'\]"),
    ("negative checkpoint interval", _set("training.checkpoint_steps", -5), r"\['training'\]\['checkpoint_steps'\]"),
    ("unknown device", _set("device", "tpu"), r"'tpu' is not one of[\s\S]*\['device'\]"),
    ("hub model without id", _set("model", {"source": "hub"}), r"'id' is a required property[\s\S]*\['model'\]"),
    ("token value in hf_token_env", _set("hf_token_env", "hf_abc/def"), r"\['hf_token_env'\]"),
    (
        "n larger than the data",
        _set("experiments.figure4.n", [2, 400]),
        r"datasets\.math\.train: the grid asks for n=400 but this source provides only 8 rows",
    ),
    (
        "method without hyperparameters",
        _delete("training.adapt.dpo"),
        r"'dpo' has no hyperparameters under training\.adapt\.dpo",
    ),
    ("preference method without beta", _delete("training.adapt.orpo.beta"), r"training\.adapt\.orpo\.beta"),
    (
        "DPO on a task without rejected answers",
        _set("experiments.table1.methods", ["sft", "dpo"]),
        r"experiments\.table1\.methods: 'dpo' needs rejected answers",
    ),
    ("metric of another task", _set("experiments.table1.metric", "gsm8k_accuracy"), r"experiments\.table1\.metric"),
    (
        "prompt template without its placeholder",
        _set("datasets.math.prompt_template", "Solve: {q}"),
        r"datasets\.math\.prompt_template: must contain \{question\}",
    ),
    (
        "prompt template with str.format braces",
        _set("datasets.math.prompt_template", "{question} in \\boxed{{}}"),
        r"datasets\.math\.prompt_template: doubled braces",
    ),
    ("benchmark without evaluation source", _delete("datasets.forgetting.eval"), r"datasets\.forgetting\.eval"),
    ("d2lora without warm-up data", _delete("datasets.warmup.train"), r"datasets\.warmup\.train"),
    (
        "unknown data format",
        _set("datasets.titles.eval", {"source": "local", "data_files": "t.jsonl", "format": "econ"}),
        r"datasets\.titles\.eval\.format: unknown format 'econ'; known formats: .*alpaca.*arxiv_titles",
    ),
    (
        "padding-free batches for a preference method",
        _set("training.adapt.dpo.padding_free", True),
        r"training\.adapt\.dpo\.padding_free: SFT only \(training\.adapt\.dpo trains DPO: TRL 1\.16's DPOTrainer turns",
    ),
    (
        "FlexAttention training on the CPU, which has no backward for it",
        lambda c: (_set("device", "cpu")(c), _set("training.adapt.sft.flex_attention", True)(c)),
        r"training\.adapt\.sft\.flex_attention: torch's FlexAttention has no backward on the CPU",
    ),
    (
        "a token budget for turning checkpointing off where it is off already",
        lambda c: (
            _set("training.adapt.dpo.gradient_checkpointing", False)(c),
            _set("training.adapt.dpo.no_checkpointing_up_to_tokens", 6000)(c),
        ),
        r"training\.adapt\.dpo\.no_checkpointing_up_to_tokens: turns checkpointing off for small cells, and "
        r"training\.adapt\.dpo\.gradient_checkpointing is false",
    ),
    (
        "splitting micro-batches without the token budget they are split to",
        _set("training.adapt.dpo.split_micro_batches", True),
        r"training\.adapt\.dpo\.split_micro_batches: splits the micro-batches of cells over "
        r"training\.adapt\.dpo\.no_checkpointing_up_to_tokens, which is not set",
    ),
    (
        "keeping dropout in SFT, which TRL never turns off",
        _set("training.adapt.sft.keep_dropout", True),
        r"training\.adapt\.sft\.keep_dropout: DPO, ORPO only \(training\.adapt\.sft trains SFT: TRL disables dropout for DPO and ORPO only",
    ),
    (
        "rows leaving a compiled static cache",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "cache": "static", "rows_leave_every": 2}),
        r"evaluation\.gsm8k\.rows_leave_every: .*set compile: false",
    ),
    (
        "two ways to attend over grouped KV heads at once",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "packed_gqa": True, "native_gqa": True}),
        r"evaluation\.gsm8k\.native_gqa: packed_gqa is also on",
    ),
    (
        "FlexAttention and the packed heads at once",
        _set(
            "evaluation.gsm8k",
            {"max_new_tokens": 4, "batch_size": 2, "cache": "static", "packed_gqa": True, "flex_attention": True},
        ),
        r"evaluation\.gsm8k\.flex_attention: packed_gqa is also on",
    ),
    (
        "FlexAttention without the static cache",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "flex_attention": True}),
        r"evaluation\.gsm8k\.flex_attention: .*needs cache: static .*\(got cache: dynamic",
    ),
    (
        "FlexAttention for a model with 3 query heads per KV head",
        lambda config: (
            _set("model.architecture.num_attention_heads", 6)(config),
            _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "cache": "static", "flex_attention": True})(
                config
            ),
        ),
        r"evaluation\.gsm8k\.flex_attention: the model has 6 query heads over 2 KV heads, 3 each; .*power of 2",
    ),
    (
        "native grouped-query attention without cuDNN's kernel",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "native_gqa": True, "cudnn_attention": False}),
        r"evaluation\.gsm8k\.cudnn_attention: false with native_gqa .*use packed_gqa instead",
    ),
    (
        "unknown prompt width",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "prompt_width": "widest"}),
        r"'widest' is not one of[\s\S]*\['gsm8k'\]\['prompt_width'\]",
    ),
    (
        "attention over the filled cache with a compiled step",
        _set("evaluation.gsm8k", {"max_new_tokens": 4, "batch_size": 2, "cache": "static", "filled_cache_only": True}),
        r"evaluation\.gsm8k\.filled_cache_only: .*cache: static and compile: false \(got cache: static, compile: true\)",
    ),
    (
        "precomputed reference outside DPO",
        _set("training.warmup.precompute_reference", True),
        r"training\.warmup\.precompute_reference: DPO only",
    ),
    (
        "unknown base dtype",
        _set("training.adapt.sft.base_dtype", "float16"),
        r"'float16' is not one of[\s\S]*\['sft'\]\['base_dtype'\]",
    ),
    (
        "format that cannot give the split's rows",
        _set("datasets.forgetting.eval", {"source": "local", "data_files": "a.jsonl", "format": "alpaca"}),
        r"datasets\.forgetting\.eval\.format: format 'alpaca' cannot produce the multiple_choice rows",
    ),
]


def _check(config: dict) -> None:
    validate(config, SCHEMA)
    grid.check(config)


def test_the_unmodified_config_passes():
    _check(copy.deepcopy(TINY))


def test_flex_attention_passes_for_a_power_of_2_heads_per_kv_head_and_for_a_local_folder(tmp_path):
    config = copy.deepcopy(TINY)  # 4 query heads over 2 KV heads
    config["evaluation"]["gsm8k"] = {"max_new_tokens": 4, "batch_size": 2, "cache": "static", "flex_attention": True}
    _check(config)
    # a local folder's config.json names its heads: SmolLM2-135M's 9 over 3 is refused before any job
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 9, "num_key_value_heads": 3}))
    config["model"] = {"source": "local", "path": str(tmp_path)}
    with pytest.raises(grid.ConfigError, match=r"9 query heads over 3 KV heads, 3 each"):
        _check(config)


@pytest.mark.parametrize("case,mutate,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_naming_the_key(case, mutate, message):
    config = copy.deepcopy(TINY)
    mutate(config)
    with pytest.raises((WorkflowError, grid.ConfigError)) as err:
        _check(config)
    assert re.search(message, str(err.value)), f"{case}: {str(err.value)[:600]}"


def test_local_file_with_fewer_rows_than_n_is_refused_naming_the_file(tmp_path):
    data = tmp_path / "gsm8k_train.jsonl"
    write_jsonl(data, [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)])
    config = copy.deepcopy(TINY)
    config["datasets"]["math"]["train"] = {"source": "local", "data_files": str(data), "format": "gsm8k"}
    with pytest.raises(
        grid.ConfigError,
        match=r"datasets\.math\.train: the grid asks for n=4 but this source provides "
        r"only 3 rows \(.*gsm8k_train\.jsonl\)",
    ):
        _check(config)


def test_a_key_written_twice_in_a_config_file_is_refused(tmp_path):
    text = (REPO / "config" / "tiny.yaml").read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(text + "\nseeds: [0, 1]\n")
    with pytest.raises(grid.ConfigError, match=r"twice\.yaml:\d+: key 'seeds' appears twice"):
        grid.check_config_files([path])


# --- Through a real `snakemake -n` -----------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "workflow", "config", "report", "src", "envs"):
        source = REPO / name
        if source.exists():
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    return work


def _dry_run(work: Path, config_text: str, *targets: str) -> subprocess.CompletedProcess:
    (work / "config" / "bad.yaml").write_text(config_text)
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", *targets, "--configfile", "config/bad.yaml"]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)


DRY_RUN_CASES = [
    ("unknown key", lambda c: c["training"].update(learning_rate=1e-4), "'learning_rate' was unexpected"),
    ("path traversal in run_name", lambda c: c.update(run_name="../outside"), "['run_name']"),
    (
        "n larger than the data",
        lambda c: c["experiments"]["figure4"].update(n=[2, 400]),
        "datasets.math.train: the grid asks for n=400",
    ),
    (
        "unknown data format",
        lambda c: c["datasets"]["warmup"].update(
            train={"source": "local", "data_files": "w.jsonl", "format": "alpaka"}
        ),
        "datasets.warmup.train.format: unknown format 'alpaka'",
    ),
]


@pytest.mark.parametrize("case,mutate,message", DRY_RUN_CASES, ids=[c[0] for c in DRY_RUN_CASES])
def test_snakemake_dry_run_refuses_bad_config(workflow_copy, case, mutate, message):
    config = copy.deepcopy(TINY)
    mutate(config)
    result = _dry_run(workflow_copy, yaml.safe_dump(config))
    assert result.returncode != 0, case
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    assert not (workflow_copy / "results").exists() and not (workflow_copy / "logs").exists()


def test_snakemake_dry_run_refuses_a_duplicated_key(workflow_copy):
    text = (REPO / "config" / "tiny.yaml").read_text() + "\nseeds: [0, 1]\n"
    result = _dry_run(workflow_copy, text)
    assert result.returncode != 0
    assert "key 'seeds' appears twice" in result.stdout + result.stderr, result.stderr[-3000:]


def test_snakemake_refuses_a_target_outside_the_wildcard_constraints(workflow_copy):
    """Output paths are built only from constrained wildcards: a '..' cell matches no rule."""
    result = _dry_run(
        workflow_copy,
        (REPO / "config" / "tiny.yaml").read_text(),
        "results/eval/gsm8k/math/sft/lora/n2/../../../../../../outside/scores.json",
    )
    assert result.returncode != 0
    assert (
        "MissingRuleException" in result.stdout + result.stderr or "No rule to produce" in result.stdout + result.stderr
    )
    assert not (workflow_copy / "outside").exists()


def test_every_wildcard_has_a_constraint():
    """Each {wildcard} in a rule file is constrained in common.smk (so no value can hold '/' or '..')."""
    rules = "\n".join(
        line
        for p in (REPO / "workflow" / "rules").glob("*.smk")
        for line in p.read_text().splitlines()
        if "expand(" not in line
    )  # expand() fills its own placeholders: not wildcards
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    block = common.split("wildcard_constraints:", 1)[1].split("\n\n", 1)[0]
    constrained = set(re.findall(r"^\s+(\w+)=", block, flags=re.M))
    used = set(re.findall(r"\{\{(\w+)\}\}", rules)) | set(
        re.findall(r"\{(\w+)\}", common.split("CELL = ", 1)[1].split("\n")[0])
    )
    assert used and used <= constrained, used - constrained
    for pattern in re.findall(r'^\s+\w+=r?"([^"]+)"', block, flags=re.M):
        assert "." not in pattern.replace(r"\d", ""), pattern


# --- Data files -------------------------------------------------------------------------------------


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


DATA_CASES = [
    ("empty file", "", r"empty\.jsonl: file is empty"),
    (
        "malformed JSONL line",
        '{"question": "q", "answer": "#### 4"}\n{"question": \n',
        r"malformed\.jsonl:2: malformed JSON",
    ),
    ("line that is not an object", '{"question": "q", "answer": "#### 4"}\n[1, 2]\n', r"not_an_object\.jsonl:2"),
    ("missing dataset field", '{"question": "q"}\n', r"missing_field\.jsonl: row 1: missing field 'answer'"),
]


@pytest.mark.parametrize("case,text,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_refused_naming_file_and_row(tmp_path, case, text, message):
    name = {
        "empty file": "empty",
        "malformed JSONL line": "malformed",
        "line that is not an object": "not_an_object",
        "missing dataset field": "missing_field",
    }[case]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text)
    before = _files(tmp_path)
    with pytest.raises(DataFileError) as err:
        prepare_role(
            "math", {"eval": {"source": "local", "data_files": str(path), "format": "gsm8k"}}, tmp_path / "out", seed=0
        )
    assert re.search(message, str(err.value)), str(err.value)
    assert _files(tmp_path) == before, "a refused preparation leaves nothing behind"


def test_missing_data_file_is_refused(tmp_path):
    with pytest.raises(DataFileError, match=r"nope\.jsonl: file does not exist"):
        prepare_role(
            "math",
            {"eval": {"source": "local", "data_files": str(tmp_path / "nope.jsonl"), "format": "gsm8k"}},
            tmp_path / "out",
            seed=0,
        )
    with pytest.raises(DataFileError, match=r"nope\.jsonl: file does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert _files(tmp_path) == set()


def test_more_rows_than_prepared_is_refused_before_loading_a_model():
    with pytest.raises(ValueError, match=r"n=5 training rows, but there are only 3"):
        subset([{"id": str(i)} for i in range(3)], 5)
    with pytest.raises(ValueError, match=r"non-negative"):
        subset([{"id": "0"}], -1)


def test_preference_rows_without_rejected_answer_are_refused_naming_the_row():
    with pytest.raises(ValueError, match=r"row r7: method 'dpo' needs a rejected answer"):
        conversational([{"id": "r7", "prompt": "p", "chosen": "c", "rejected": None}], "dpo")


def test_multiple_choice_answer_outside_the_choices_is_refused_naming_the_item(tokenizer):
    from d2lora.evaluation.multiple_choice import build_requests

    with pytest.raises(ValueError, match=r"item arc-3: answer_index 4 outside its 2 choices"):
        build_requests(tokenizer, [{"id": "arc-3", "question": "q", "choices": ["a", "b"], "answer_index": 4}])


# --- Models and adapters ------------------------------------------------------------------------------


def test_model_path_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model\.path: .*no-such-model is not a model folder"):
        prepare_base_model({"source": "local", "path": str(tmp_path / "no-such-model")}, tmp_path / "base")
    with pytest.raises(ModelSourceError, match=r"model: GGUF file .*missing\.gguf does not exist"):
        prepare_base_model({"source": "gguf", "path": str(tmp_path / "missing.gguf")}, tmp_path / "base")
    assert _files(tmp_path) == set()


def test_tokenizer_without_chat_template_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path):
    source = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, source)
    for path in source.glob("*.jinja"):
        path.unlink()
    config_path = source / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    before = _files(tmp_path)
    with pytest.raises(ModelSourceError, match=r"has no chat template"):
        prepare_base_model({"source": "local", "path": str(source)}, tmp_path / "base")
    assert _files(tmp_path) == before


def _fake_adapter(folder: Path, rank=4, alpha=8, base=None, weights="adapter_model.safetensors") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": alpha, "base_model_name_or_path": base})
    )
    (folder / weights).write_bytes(b"\0" * 8)
    return folder


LORA = {"rank": 4, "alpha": 8}


def test_adapter_of_another_rank_is_refused(tmp_path, tiny_model_dir):
    adapter = _fake_adapter(tmp_path / "a", rank=16, base=str(tiny_model_dir))
    with pytest.raises(AdapterError, match=r"adapter has rank 16.*training\.lora asks for rank 4"):
        check_adapter_matches(adapter, LORA, tiny_model_dir)


def test_adapter_of_another_base_model_is_refused(tmp_path, tiny_model_dir):
    adapter = _fake_adapter(tmp_path / "a", base=str(tmp_path / "some-other-model"))
    with pytest.raises(AdapterError, match=r"trained on base model .*some-other-model"):
        check_adapter_matches(adapter, LORA, tiny_model_dir)


def test_pickled_bin_adapter_is_refused(tmp_path, tiny_model_dir):
    adapter = _fake_adapter(tmp_path / "a", base=str(tiny_model_dir), weights="adapter_model.bin")
    with pytest.raises(AdapterError, match=r"safetensors only.*adapter_model\.bin \(pickle\)"):
        check_adapter_matches(adapter, LORA, tiny_model_dir)
    with pytest.raises(ModelSourceError, match=r"safetensors only"):
        require_safetensors_adapter(adapter)


def test_missing_adapter_folder_is_refused_without_a_hub_lookup(tmp_path):
    with pytest.raises(ModelSourceError, match=r"not an adapter folder"):
        require_safetensors_adapter(tmp_path / "results" / "warmup" / "adapter")


def test_training_refuses_bad_arguments_before_writing_anything(tiny_model_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, [{"id": f"r{i}", "prompt": "p", "chosen": "c", "rejected": "r"} for i in range(4)])
    before = _files(tmp_path)
    hp = {"learning_rate": 1e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 64}
    lora = {"rank": 4, "alpha": 8}
    with pytest.raises(ValueError, match=r"n=0"):
        run_adaptation(
            tiny_model_dir,
            train,
            method="sft",
            init="lora",
            n=0,
            lora=lora,
            hp=hp,
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
        )
    with pytest.raises(ValueError, match=r"n=9 training rows, but there are only 4"):
        run_adaptation(
            tiny_model_dir,
            train,
            method="sft",
            init="lora",
            n=9,
            lora=lora,
            hp=hp,
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
        )
    with pytest.raises(ValueError, match=r"unknown init 'pissa'"):
        run_adaptation(
            tiny_model_dir,
            train,
            method="sft",
            init="pissa",
            n=2,
            lora=lora,
            hp=hp,
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
        )
    with pytest.raises(AdapterError, match=r"not an adapter folder"):
        run_adaptation(
            tiny_model_dir,
            train,
            method="sft",
            init="d2lora",
            n=2,
            lora=lora,
            hp=hp,
            out_dir=tmp_path / "out",
            seed=0,
            warmup_dir=tmp_path / "no-warmup",
            device="cpu",
            checkpoint_steps=1,
        )
    assert _files(tmp_path) == before


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_prompts_longer_than_max_length_are_refused_not_silently_dropped(tiny_model_dir, tmp_path, method):
    """TRL drops rows whose prompt fills max_length: the cell would train on fewer than n rows."""
    train = tmp_path / "train.jsonl"
    write_jsonl(
        train,
        [{"id": f"r{i}", "prompt": "word " * (5 + 40 * (i % 2)), "chosen": "c", "rejected": "r"} for i in range(4)],
    )
    before = _files(tmp_path)
    hp = {"learning_rate": 1e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 60, "beta": 0.1}
    with pytest.raises(ValueError, match=rf"training\.adapt\.{method}\.max_length: 2 of 4 training rows have a prompt"):
        run_adaptation(
            tiny_model_dir,
            train,
            method=method,
            init="lora",
            n=4,
            lora={"rank": 4, "alpha": 8},
            hp=hp,
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
            checkpoint_steps=1,
        )
    assert _files(tmp_path) == before, "a refused run leaves no checkpoint folder behind"


PRESETS = sorted([*(REPO / "config").glob("*.yaml"), *(REPO / "benchmarks").glob("*.yaml")])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_preset_passes_what_the_workflow_checks_first(preset, monkeypatch):
    """A preset nobody ran since the schema changed would fail only when a user starts it."""
    if "../shared/" in preset.read_text() and not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("needs ../shared/data beside the repository")
    monkeypatch.chdir(REPO)  # relative data paths resolve against the repository root, as in a run
    grid.check_config_files([preset])
    _check(yaml.safe_load(preset.read_text()))


def test_only_figures_the_paper_gave_numbers_for_get_a_paper_overlay(workflow_copy):
    """Figures 3 and 4 have no transcribed values: their jobs read no reference file."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--cores",
            "1",
            "--printshellcmds",
            "--debug-dag",
            *(f"results/figures/{f}.png" for f in ("figure2", "figure4")),
            "--configfile",
            "config/tiny.yaml",
        ],
        cwd=workflow_copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = result.stdout.split("rule figure:")[1:]
    by_figure = {re.search(r"wildcards: figure=(\w+)", job)[1]: job.split("output:")[0] for job in jobs}
    assert "paper_table3_gsm8k.csv" in by_figure["figure2"]
    assert "paper_table" not in by_figure["figure4"]
