"""benchmarks/paper_scale.py (the paper preset's jobs at the Llama-3.1-8B shape) and its preset.

The script runs here at the tiny shape on the CPU: the same stages, the same pipeline calls, a
2-layer model and a few rows; the 8B run happens on a GPU node (benchmarks/device/paper_scale.sh).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from d2lora import grid
from d2lora.io import read_jsonl, write_jsonl
from d2lora.models import ModelSourceError, _random_init, architecture_parameters
from d2lora.settings import TrainingHparams

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import paper_scale  # noqa: E402
from paper_scale_data import standin_negatives  # noqa: E402
from paper_scale_estimate import PAPER_WARMUP_ROWS, estimate  # noqa: E402

SHAPE = REPO / "config" / "paper_shape.yaml"
PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
NEEDS_DATA = pytest.mark.skipif(not (REPO.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
METHODS = ("warmup", "sft", "dpo", "orpo")
LLAMA_31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
}


def _close(a: float, b: float, rel: float = 2e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- the preset


@NEEDS_DATA
def test_paper_shape_preset_is_the_8b_shape_with_table2_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    grid.check_config_files([SHAPE])
    config = yaml.safe_load(SHAPE.read_text())
    validated = copy.deepcopy(config)  # validation fills the schema's defaults in
    validate(validated, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    grid.check(validated)
    model = config["model"]
    assert model["source"] == "random_init" and model["init_device"] == "auto"
    assert {k: model["architecture"][k] for k in LLAMA_31_8B} == LLAMA_31_8B
    assert model["architecture"]["rope_parameters"]["rope_type"] == "llama3"
    assert model["architecture"]["rope_parameters"]["rope_theta"] == 500000.0
    assert architecture_parameters(model["architecture"]) == 8_030_261_248  # Llama-3.1-8B's count
    assert model["tokenizer"]["source"] == "gguf"
    # Table 2: every hyperparameter of the paper preset, batch and checkpointing included.
    assert config["training"]["lora"] == PAPER["training"]["lora"]
    assert config["training"]["warmup"] == PAPER["training"]["warmup"]
    assert config["training"]["adapt"] == PAPER["training"]["adapt"]
    for hp in [config["training"]["warmup"], *config["training"]["adapt"].values()]:
        # Table 2's 16 rows a step: SFT's packed into one micro-batch (the same loss, test_training_levers).
        micro_batch = (16, 1) if hp.get("padding_free") else (8, 2)
        assert (hp["batch_size"], hp["grad_accum"]) == micro_batch
        assert (hp["max_length"], hp["gradient_checkpointing"]) == (2048, True)
    assert config["training"]["warmup"]["padding_free"] and config["training"]["adapt"]["sft"]["padding_free"]
    assert config["evaluation"]["gsm8k"]["max_new_tokens"] == 512
    # The gsm8k stage measures the paper preset's evaluate job: the same decoding settings.
    assert config["evaluation"] == {"dtype": "auto", **PAPER["evaluation"]}
    assert "limit" not in config["datasets"]["math"]["eval"], "GSM8K is evaluated on all 1,319 test questions"
    # >= 50 optimizer steps per training stage, by the trainer's own count.
    warm_rows = config["datasets"]["warmup"]["train"]["limit"] - 2  # at most the 2 empty Alpaca outputs drop
    assert TrainingHparams.of(config["training"]["warmup"]).optimizer_steps(warm_rows) >= 50
    for method in ("sft", "dpo", "orpo"):
        n = paper_scale.cell_n(config, method)
        assert TrainingHparams.of(config["training"]["adapt"][method]).optimizer_steps(n) >= 50, method
    assert config["datasets"]["math"]["train"]["from"]["limit"] >= max(
        paper_scale.cell_n(config, m) for m in ("sft", "dpo")
    )


def test_architecture_parameters_counts_what_transformers_builds():
    from transformers import LlamaConfig, LlamaForCausalLM

    for arch in (
        {
            "vocab_size": 300,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        {
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "head_dim": 8,
        },
    ):
        built = LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": True, **arch}))
        assert architecture_parameters(arch) == sum(p.numel() for p in built.parameters())


class _Tokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __len__(self):
        return 100


def test_random_init_on_a_device_in_the_stored_dtype_and_wider_vocabulary():
    import torch

    arch = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "tie_word_embeddings": False,
    }
    model = _random_init({"architecture": arch, "init_device": "cpu", "seed": 0}, _Tokenizer(), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.vocab_size == 128 and model.lm_head.weight.shape == (128, 16)
    old = _random_init({"architecture": arch, "seed": 0}, _Tokenizer(), torch.float32)  # no init_device: the old path
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = LlamaForCausalLM(LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **arch))
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(
        ModelSourceError, match=r"model\.architecture\.vocab_size: 50 rows cannot hold the tokenizer's 100"
    ):
        _random_init({"architecture": {**arch, "vocab_size": 50}}, _Tokenizer(), torch.float32)


# ----------------------------------------------------------------------------- data and estimate


def test_standin_negatives_are_other_questions_solutions(tmp_path):
    raw = [{"question": f"What is {i} + {i}?", "answer": f"{i} and {i} make {2 * i}.\n#### {2 * i}"} for i in range(5)]
    raw.append({"question": "Twice 0?", "answer": "Still 0.\n#### 0"})  # its next neighbour (row 0) also answers 0
    write_jsonl(tmp_path / "train.jsonl", raw)
    source = {
        "source": "onpolicy",
        "from": {"source": "local", "data_files": str(tmp_path / "train.jsonl"), "format": "gsm8k"},
    }
    manifest = standin_negatives(source, "{question} Box it.", 0, tmp_path / "negatives.jsonl")
    rows = read_jsonl(tmp_path / "negatives.jsonl")
    assert len(rows) == manifest["rows"] == 6
    for i, row in enumerate(rows):
        shift = 2 if i == 5 else 1  # same final answer in round 1: the next round shifts by two
        other = raw[(i + shift) % len(raw)]
        assert row["rejected"].startswith(other["answer"].split("\n####")[0])
        assert row["rejected_answer"] != row["reference_answer"]
    assert manifest["stats"]["rounds"] == 2


def test_grid_estimate_is_cells_times_tokens_over_rates():
    rates = {"warmup": 1000.0, "sft": 2000.0, "dpo": 1000.0, "orpo": 1500.0}
    per_row = {"warmup": 100.0, "math_sft": 200.0, "math_preference": 400.0, "titles_sft": 250.0}
    eval_seconds = {"gsm8k": 300.0, "arc_easy": 60.0, "titles": 20.0}
    result = estimate(PAPER, rates, per_row, job_overhead_s=30.0, eval_seconds=eval_seconds)
    assert result["complete"] and not result["missing"]
    parts = {(p["task"], p["method"]): p for p in result["training"]}
    assert parts[("warmup", "sft")]["tokens"] == PAPER_WARMUP_ROWS * 100
    # The preset compiles the warm-up's 2,514 steps, which no stage measures: the entry says so.
    assert "2,514 optimizer steps" in parts[("warmup", "sft")]["note"]
    eager_warmup = {
        **PAPER,
        "training": {**PAPER["training"], "warmup": {**PAPER["training"]["warmup"], "compile_layers": False}},
    }
    assert "note" not in estimate(eager_warmup, rates, per_row, 30.0, eval_seconds)["training"][0]
    dpo = parts[("math", "dpo")]
    # 2 inits x (1,000 + 2,000 + 5,000 + 10,000) rows x 4 epochs (Figure 4's low-data cells are ORPO only).
    assert dpo["cells"] == 8 and dpo["rows_x_epochs"] == 2 * 18_000 * 4
    assert dpo["tokens"] == 2 * 18_000 * 4 * 400 and _close(dpo["gpu_hours"], dpo["tokens"] / 1000 / 3600, 1e-3)
    assert parts[("titles", "sft")]["rows_x_epochs"] == 2 * (1000 + 2000 + 5000 + 6970) * 3
    assert result["training_job_overhead"]["jobs"] == len(grid.training_cells(PAPER)) + 1
    # 3 methods x 2 inits x 4 n, ORPO's 3 extra low-data n x 2 inits, and the 2 n = 0 cells; each
    # benchmark's jobs are the grid's own (grid.evaluation_jobs), every one costing its measured job.
    evaluations = result["evaluations"]
    assert evaluations["gsm8k"]["jobs"] == 32 and _close(evaluations["gsm8k"]["gpu_hours"], 32 * 300 / 3600, 1e-3)
    counts = {}
    for benchmark, _ in grid.evaluation_jobs(PAPER):
        counts[benchmark] = counts.get(benchmark, 0) + 1
    assert {b: e["jobs"] for b, e in evaluations.items()} == counts and set(counts) == set(eval_seconds)
    assert _close(evaluations["arc_easy"]["gpu_hours"], counts["arc_easy"] * 60 / 3600, 1e-2)
    total = (
        sum(p["gpu_hours"] for p in result["training"])
        + result["training_job_overhead"]["gpu_hours"]
        + sum(e["gpu_hours"] for e in evaluations.values())
    )
    assert _close(result["total_gpu_hours"], total, 1e-3)
    # A method whose layers compile pays its compile once per job, on top of its compile-free rate.
    compiled = estimate(PAPER, rates, per_row, 30.0, eval_seconds, compile_seconds={"dpo": 70.0})
    compiled_parts = {(p["task"], p["method"]): p for p in compiled["training"]}
    compiled_dpo = compiled_parts[("math", "dpo")]
    assert compiled_dpo["compile_seconds_per_job"] == 70.0
    assert _close(compiled_dpo["gpu_hours"], (dpo["tokens"] / 1000 + 8 * 70.0) / 3600, 1e-3)
    assert compiled_parts[("math", "orpo")] == parts[("math", "orpo")]
    assert abs(compiled["total_gpu_hours"] - result["total_gpu_hours"] - 8 * 70.0 / 3600) <= 0.011  # totals: 2 decimals
    # SFT cells of at least compile_layers_min_steps train compiled (config/paper.yaml): at their own rate.
    large = {"sft": {"tokens_per_second": 4000.0, "compile_seconds": 90.0, "min_steps": 900}}
    split = estimate(PAPER, rates, per_row, 30.0, eval_seconds, large_cells=large)
    sft = {
        (p["task"], "large_cells" in p): p for p in split["training"] if p["part"] == "adapt" and p["method"] == "sft"
    }
    assert (sft[("math", False)]["n"], sft[("math", True)]["n"]) == (
        [1000, 2000],
        [5000, 10000],
    )  # 188, 375; 938, 1875 steps
    assert (sft[("titles", False)]["n"], sft[("titles", True)]["n"]) == ([1000, 2000], [5000, 6970])
    big = sft[("math", True)]
    assert big["cells"] == 4 and big["tokens"] == 2 * 15_000 * 3 * 200 and big["compile_seconds_per_job"] == 90.0
    assert _close(big["gpu_hours"], (big["tokens"] / 4000 + 4 * 90.0) / 3600, 1e-3)
    small = sft[("math", False)]
    assert small["tokens"] == 2 * 3000 * 3 * 200 and _close(small["gpu_hours"], small["tokens"] / 2000 / 3600, 1e-3)
    assert "large_cells" not in parts[("math", "dpo")] and split["complete"]
    partial = estimate(PAPER, {k: v for k, v in rates.items() if k != "dpo"}, per_row, None, {"gsm8k": 300.0})
    assert not partial["complete"]
    assert any("math/dpo" in m for m in partial["missing"]) and "titles evaluation: not measured" in partial["missing"]
    assert "gpu_hours" not in partial["evaluations"]["arc_easy"] and "gpu_hours" in partial["evaluations"]["gsm8k"]


def test_large_sft_cells_take_the_long_levers_compile_free_rate_and_compile():
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    lever = {"compile_free_tokens_per_second": 12_000.0, "train_seconds": 350.0, "train_tokens": 3_096_000}
    summary = {"levers": {"sft": {paper_scale.LARGE_SFT_LEVER: {**lever, "compiling_steps": [1, 2]}}}}
    large = paper_scale.large_sft_cells(summary, paper)
    assert large == {"sft": {"tokens_per_second": 12_000.0, "compile_seconds": 92.0, "min_steps": 900}}
    # Not measured, failed, or never compiled (so no compile to charge): the estimate keeps one SFT rate.
    assert paper_scale.large_sft_cells({"levers": {}}, paper) == {}
    assert (
        paper_scale.large_sft_cells({"levers": {"sft": {paper_scale.LARGE_SFT_LEVER: {"error": "OOM"}}}}, paper) == {}
    )
    eager = {"levers": {"sft": {paper_scale.LARGE_SFT_LEVER: {**lever, "compiling_steps": []}}}}
    assert paper_scale.large_sft_cells(eager, paper) == {}
    # Run after stages that compiled, the lever reused their kernels: a grid job pays at least the
    # run's largest compile; a larger compile of its own stands.
    assert paper_scale.large_sft_cells(summary, paper, 120.0)["sft"]["compile_seconds"] == 120.0
    assert paper_scale.large_sft_cells(summary, paper, 50.0)["sft"]["compile_seconds"] == 92.0


def test_a_levers_speedup_with_setup_is_per_row_and_epoch(tmp_path):
    """preset_918_steps trains 54 epochs beside plain's 1: its ratio with setup compares seconds a row
    and epoch (Round 33's summary said 0.09 for a lever 4.6x faster a step)."""
    plain = {"train_seconds": 27.0, "trainer_setup_seconds": 1.0, "rows": 272, "epochs": 1, "tokens_per_second": 2000.0}
    long = {
        "train_seconds": 270.0,
        "trainer_setup_seconds": 2.0,
        "rows": 272,
        "epochs": 54,
        "tokens_per_second": 9000.0,
    }
    results = {"plain": plain, "long": long}
    paper_scale._compare_to_plain(paper_scale.Run({}, tmp_path, {"device": {"device": "cpu"}}), "sft", results)
    assert long["speedup_with_setup"] == pytest.approx((28.0 / 272) / (272.0 / (272 * 54)), abs=1e-3)
    assert long["seconds_per_row_epoch"] == pytest.approx(272.0 / (272 * 54), abs=1e-4)
    assert plain["speedup_with_setup"] == 1.0 and long["speedup_tokens_per_second"] == 4.5


def test_grouping_ratios_compare_the_grouped_lever_with_the_preset():
    preset = {"compile_free_seconds_per_step": 0.8, "computed_tokens": 1000}
    grouped = {"compile_free_seconds_per_step": 0.64, "computed_tokens": 800}
    levers = {"dpo": {"preset": preset, "preset_grouped": grouped}, "orpo": {"preset": preset}}
    assert paper_scale.lever_ratios(levers) == {"dpo_preset_over_grouped": {"step": 1.25, "computed_positions": 1.25}}
    # A failed lever, or a run too short for a compile-free step, gives what it can.
    assert paper_scale.grouping_ratios({"dpo": {"preset": preset, "preset_grouped": {"error": "OOM"}}}) == {}
    short = {"computed_tokens": 900}
    assert paper_scale.grouping_ratios({"orpo": {"preset": preset, "preset_grouped": short}}) == {
        "orpo_preset_over_grouped": {"computed_positions": 1.111}
    }


def test_training_rates_charge_a_compile_once_per_job_not_per_token():
    eager = {"tokens_per_second": 1000.0, "train_seconds": 50.0, "train_tokens": 50_000, "compiling_steps": []}
    # 52 steps: 70 s of compile in the first, then 1,400 tokens/s; the stage's mean rate is far lower.
    compiled = {
        "tokens_per_second": 560.0,
        "train_seconds": 125.0,
        "train_tokens": 77_000,
        "compiling_steps": [1],
        "compile_free_tokens_per_second": 1400.0,
    }
    too_short = {**compiled, "compile_free_tokens_per_second": None}  # too few steps for a compile-free rate
    # Compiled after dpo in the same process: 20 s, most graphs reused; a grid job compiles afresh.
    compiled_later = {**compiled, "train_seconds": 75.0}
    rates, compile_seconds = paper_scale.training_rates(
        {"sft": eager, "dpo": compiled, "warmup": too_short, "orpo": compiled_later}
    )
    assert rates == {"sft": 1000.0, "dpo": 1400.0, "warmup": 560.0, "orpo": 1400.0}
    assert set(compile_seconds) == {"dpo", "orpo"}
    assert _close(compile_seconds["dpo"], 125.0 - 77_000 / 1400.0) and compile_seconds["orpo"] == compile_seconds["dpo"]


def test_a_failed_stage_is_recorded_and_the_summary_still_written(tmp_path):
    summary = {"device": {"device": "cpu"}, "methods": {}, "errors": {}, "stages_done": [], "tokens_per_row": {}}
    run = paper_scale.Run({}, tmp_path, summary)

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    paper_scale._stage(run, "dpo", out_of_memory)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["errors"] == {"dpo": "RuntimeError: CUDA out of memory"}
    assert written["stages_done"] == [] and "grid_estimate" in written


# ----------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the script at the tiny shape; snapshots of summary.json after every write."""
    out = tmp_path_factory.mktemp("paper_scale")
    snapshots = []
    original = paper_scale.Run.write

    def write(self):
        original(self)
        snapshots.append(json.loads((self.out / "summary.json").read_text()))

    paper_scale.Run.write = write
    try:
        summary = paper_scale.main(["--shape", "tiny", "--device", "cpu", "--out", str(out)])
    finally:
        paper_scale.Run.write = original
    return out, summary, snapshots


@NEEDS_DATA
def test_tiny_run_completes_every_stage_and_writes_the_summary(tiny_run):
    out, summary, _ = tiny_run
    assert summary["status"] == "complete" and summary["errors"] == {}
    assert summary["stages_done"] == list(paper_scale.DEFAULT_ORDER)
    assert paper_scale.DEFAULT_ORDER == ("warmup", "sft", "gsm8k", "dpo", "orpo", "arc_easy", "titles")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["methods"] == json.loads(json.dumps(summary["methods"]))
    assert set(on_disk["versions"]) >= {"torch", "transformers", "peft", "trl", "git_commit"}
    assert on_disk["config"]["model"]["architecture"] == paper_scale.TINY_ARCH
    assert _positive(on_disk["device"]["peak_flops"]) and on_disk["device"]["name"]
    base = on_disk["base_model"]
    assert _positive(base["seconds"]) and base["init_device"] == "cpu" and _positive(base["parameters"])
    assert base["seconds"] >= base["init_seconds"] + base["hash_seconds"] - 0.01


@NEEDS_DATA
def test_tiny_run_writes_each_stage_as_it_ends(tiny_run):
    _, _, snapshots = tiny_run
    # One write per stage, in order: a run cut off after a stage keeps every stage before it.
    seen = [tuple(s["stages_done"]) for s in snapshots]
    for k in range(1, len(paper_scale.DEFAULT_ORDER) + 1):
        assert tuple(paper_scale.DEFAULT_ORDER[:k]) in seen
    after_warmup = next(s for s in snapshots if s["stages_done"] == ["warmup"])
    assert set(after_warmup["methods"]) == {"warmup"} and "gsm8k" not in after_warmup
    assert after_warmup["grid_estimate"]["missing"], "an estimate from one stage lists what it lacks"


@NEEDS_DATA
@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_training_numbers_are_consistent(tiny_run, method):
    _, summary, _ = tiny_run
    m = summary["methods"][method]
    training = summary["config"]["training"]
    hp = training["warmup"] if method == "warmup" else training["adapt"][method]
    for key in (
        "train_tokens",
        "train_seconds",
        "tokens_per_second",
        "seconds_per_step",
        "mfu",
        "steps",
        "model_parameters",
        "stage_seconds",
        "load_seconds",
        "grad_norm_mean",
        "tokens_per_row",
    ):
        assert _positive(m[key]), (method, key, m[key])
    assert _close(m["tokens_per_second"] * m["train_seconds"], m["train_tokens"])
    assert _close(m["seconds_per_step"] * m["steps"], m["train_seconds"])
    assert _close(
        m["mfu"], 4 * m["model_parameters"] * m["train_tokens"] / m["train_seconds"] / summary["device"]["peak_flops"]
    )
    assert summary["device"]["host_op_microseconds"] > 0
    assert "logical CPUs" in summary["device"]["host_cpu"]  # launch-bound steps go as fast as the host issues
    assert m["steps"] == math.ceil(m["rows"] / (m["batch_size"] * m["grad_accum"])) * m["epochs"]
    assert (m["batch_size"], m["grad_accum"], m["max_length"]) == (hp["batch_size"], hp["grad_accum"], hp["max_length"])
    # The paper's setting, kept at the tiny shape, and turned off under each method's token budget.
    assert m["checkpointing"]["setting"] is hp["gradient_checkpointing"] is True
    assert m["gradient_checkpointing"] is m["checkpointing"]["on"] is False
    assert m["checkpointing"]["micro_batch_tokens"] <= hp["no_checkpointing_up_to_tokens"]
    assert f"within no_checkpointing_up_to_tokens={hp['no_checkpointing_up_to_tokens']}" in m["checkpointing"]["reason"]
    # The preset's DPO and ORPO compile their layers, at the tiny shape too (CPU, float32); the warm-up's
    # and SFT's only from compile_layers_min_steps, which no tiny cell reaches.
    compiled = m["fast_paths"]["compile_layers"]
    assert compiled["setting"] is bool(hp.get("compile_layers"))
    compiles = hp.get("compile_layers") and m["steps"] >= hp.get("compile_layers_min_steps", 0)
    assert compiled["layers"] == (paper_scale.TINY_ARCH["num_hidden_layers"] if compiles else 0)
    if hp.get("compile_layers") and not compiles:
        assert "under compile_layers_min_steps=900" in compiled["reason"], compiled
    # The warm-up and SFT pack their rows (on the CPU through SDPA: FlexAttention has no CPU backward).
    assert m["fast_paths"]["flex_attention"]["setting"] is False
    assert m["rows"] == (2 if method != "warmup" else summary["data"]["warmup"]["counts"]["train"])
    assert 0 <= m["load_seconds"] <= m["overhead_seconds"] + 0.01
    assert _close(m["stage_seconds"] - m["train_seconds"], m["overhead_seconds"], 0.05)
    assert m["peak_allocated_gib"] is None and m["fits_80gb"] is None  # not measured on a CPU
    if method in ("dpo", "orpo"):
        assert m["tokens_per_row"] > 1.5 * summary["methods"]["sft"]["tokens_per_row"], "both answers are counted"
        assert m["init"] == "d2lora"
    # The tokens the rates count are the real positions the training forwards saw (DPO's reference
    # pass not among them); padded pairs compute more, packed rows nothing more.
    assert m["real_tokens"] == m["train_tokens"]
    if method in ("dpo", "orpo"):
        assert m["computed_tokens"] > m["real_tokens"] and m["padding_share"] > 0
    else:
        assert m["computed_tokens"] == m["real_tokens"] and m["padding_share"] == 0


@NEEDS_DATA
def test_tiny_run_gsm8k_counts_every_generated_token(tiny_run, tmp_path):
    out, summary, _ = tiny_run
    g = summary["gsm8k"]
    assert g["items"] == 3 and g["max_new_tokens"] == 4 and g["adapter"].endswith("sft")
    # config/paper.yaml's decoding, as the workflow's evaluate job runs it.
    assert (g["merge_adapter"], g["cache"], g["flex_attention"], g["packed_gqa"]) == (True, "static", True, False)
    # The static cache gives the last batch (1 prompt) the first's 2 rows: every row computed is counted.
    assert sum(c["rows"] for c in g["generate_calls"]) == 4
    assert g["generated_tokens"] == sum(c["rows"] * c["new_tokens"] for c in g["generate_calls"])
    assert 0 < g["generated_tokens_to_stop"] <= g["generated_tokens"] <= 4 * 4
    assert _close(g["generated_tokens_per_second"] * g["generate_seconds"], g["generated_tokens"], 0.01)
    # The answers' digest: the same for the same texts whatever the file's row order, another for another text.
    predictions = out / "work" / "eval" / "gsm8k" / "predictions.jsonl"
    rows = read_jsonl(predictions)
    assert g["outputs_sha256"] == paper_scale._outputs_digest(predictions)
    write_jsonl(tmp_path / "reversed.jsonl", reversed(rows))
    write_jsonl(tmp_path / "changed.jsonl", [{**rows[0], "output": rows[0]["output"] + " 7"}, *rows[1:]])
    assert paper_scale._outputs_digest(tmp_path / "reversed.jsonl") == g["outputs_sha256"]
    assert paper_scale._outputs_digest(tmp_path / "changed.jsonl") != g["outputs_sha256"]
    assert 0 < g["generate_seconds"] <= g["eval_seconds"] and _positive(g["load_seconds"])


@NEEDS_DATA
def test_tiny_run_evaluates_the_other_benchmarks_as_the_workflow_does(tiny_run):
    _, summary, _ = tiny_run
    arc, titles = summary["arc_easy"], summary["titles"]
    # The tiny shape's limits: 3 ARC-Easy questions, 2 abstracts, each through the SFT cell's adapter.
    assert arc["items"] == 3 and titles["items"] == 2
    assert arc["adapter"].endswith("sft") and titles["adapter"].endswith("sft")
    assert 0.0 <= arc["metrics"]["accuracy"] <= 1.0 and "rougeL" in titles["metrics"]
    assert titles["max_new_tokens"] == 4 and arc["max_new_tokens"] is None and arc["batch_size"] == 2
    for record in (arc, titles):
        assert 0 < record["load_seconds"] < record["eval_seconds"] and record["merge_adapter"] is True
        assert record["peak_allocated_gib"] is None  # not measured on a CPU


@NEEDS_DATA
def test_tiny_run_estimates_the_whole_paper_grid(tiny_run):
    _, summary, _ = tiny_run
    est = summary["grid_estimate"]
    assert est["complete"], est["missing"]
    assert sum(p["cells"] for p in est["training"]) == len(grid.training_cells(PAPER)) + 1
    assert all(_positive(p["gpu_hours"]) for p in est["training"])
    rates = {(p["task"], p["method"]): p["tokens_per_second"] for p in est["training"]}
    assert rates[("math", "dpo")] == round(summary["methods"]["dpo"]["tokens_per_second"], 1)
    assert rates[("warmup", "sft")] == round(summary["methods"]["warmup"]["tokens_per_second"], 1)
    per_row = summary["tokens_per_row"]
    assert per_row["math_preference"] > per_row["math_sft"] > 0 and per_row["titles_sft"] > 0
    assert _positive(est["total_gpu_hours"])
    for benchmark in ("gsm8k", "arc_easy", "titles"):
        assert est["evaluations"][benchmark]["seconds_per_job"] == summary[benchmark]["eval_seconds"]


def test_training_levers_start_from_the_code_path_before_the_levers():
    """config/paper_shape.yaml switches speed settings on for DPO and ORPO; a lever names all it changes."""
    preset = yaml.safe_load(SHAPE.read_text())["training"]["adapt"]
    compiled_levers = {
        "dpo": "no_checkpointing_batch4x4_precompute_reference_uncast_inputs_pad8_compiled_layers",
        "orpo": "no_checkpointing_batch4x4_uncast_inputs_pad8_compiled_layers",
    }
    for method, compiled_lever in compiled_levers.items():
        assert preset[method]["compile_layers"] and preset[method]["no_checkpointing_up_to_tokens"]
        plain = {**preset[method], **paper_scale.lever_overrides(method, paper_scale.LEVERS[method]["plain"])}
        assert plain["compile_layers"] is False and plain["no_checkpointing_up_to_tokens"] is None
        assert plain["cast_adapter_inputs"] is True and plain["pad_to_multiple_of"] is None
        assert preset[method]["split_micro_batches"] and plain["split_micro_batches"] is False
        # The preset's choice past its budget, each way: checkpointing kept, or micro-batches split.
        for lever, split in (("preset_budget_checkpointed_rows640", False), ("preset_budget_split_rows640", True)):
            hp = {**preset[method], **paper_scale.lever_overrides(method, paper_scale.LEVERS[method][lever])}
            assert hp["gradient_checkpointing"] and hp["no_checkpointing_up_to_tokens"] == 9000
            assert hp["split_micro_batches"] is split and hp["compile_layers"] and hp["row_tokens"] == 640
        # PRESET_BUDGET restates the preset's speed settings: it must still be what the preset sets.
        assert all(preset[method].get(key, value) == value for key, value in paper_scale.PRESET_BUDGET.items())
        # The lever "preset_grouped" trains the preset's settings whole (pairs grouped by length since
        # Round 35); "preset" changes only the sampling back to random batches.
        whole = {
            **preset[method],
            **paper_scale.lever_overrides(method, paper_scale.LEVERS[method]["preset_grouped"]),
        }
        # (Its epochs are a lever's; its bfloat16 base is what the preset's base_dtype auto takes under bf16.)
        schema, own = paper_scale.defaults("$defs/hparams"), {"epochs", "base_dtype"}
        assert whole["base_dtype"] == "bfloat16" and preset[method].get("base_dtype", schema["base_dtype"]) == "auto"
        assert {key: whole[key] for key in whole if key not in own} == {
            key: preset[method].get(key, schema.get(key)) for key in whole if key not in own
        }
        random_batches = {**preset[method], **paper_scale.lever_overrides(method, paper_scale.LEVERS[method]["preset"])}
        assert random_batches == {**whole, "group_by_length": False} and preset[method]["group_by_length"] is True
        assert plain["gradient_checkpointing"] is True and plain["epochs"] == paper_scale.LEVER_EPOCHS[method]
        hp = {**preset[method], **paper_scale.lever_overrides(method, paper_scale.LEVERS[method][compiled_lever])}
        assert hp["compile_layers"] and hp["pad_to_multiple_of"] == 8 and hp["cast_adapter_inputs"] is False
        assert hp["no_checkpointing_up_to_tokens"] is None and hp["gradient_checkpointing"] is False
    # SFT (and the warm-up) take the LoRA branch's inputs uncast since Round 29; SFT's levers start cast.
    training = yaml.safe_load(SHAPE.read_text())["training"]
    assert training["warmup"]["cast_adapter_inputs"] is False and preset["sft"]["cast_adapter_inputs"] is False
    for lever in ("plain", "bf16_base_no_checkpointing"):
        assert {**preset["sft"], **paper_scale.lever_overrides("sft", paper_scale.LEVERS["sft"][lever])}[
            "cast_adapter_inputs"
        ]
    # The preset packs SFT's 16 rows into one micro-batch through FlexAttention since Round 30; its levers
    # start from Table 2's padded 8 x 2, and the packed lever names all it changes.
    assert (preset["sft"]["batch_size"], preset["sft"]["padding_free"], preset["sft"]["flex_attention"]) == (
        16,
        True,
        True,
    )
    plain = {**preset["sft"], **paper_scale.lever_overrides("sft", paper_scale.LEVERS["sft"]["plain"])}
    assert (plain["batch_size"], plain["grad_accum"], plain["padding_free"], plain["flex_attention"]) == (
        8,
        2,
        False,
        False,
    )
    assert plain["compile_layers"] is False and plain["split_micro_batches"] is False
    # PRESET_SFT restates the warm-up's and SFT's speed settings: it must still be what the preset sets.
    for hp in (preset["sft"], training["warmup"]):
        assert all(hp.get(key, value) == value for key, value in paper_scale.PRESET_SFT.items())
    long = {**preset["sft"], **paper_scale.lever_overrides("sft", paper_scale.LEVERS["sft"]["preset_918_steps"])}
    assert {key: long[key] for key in paper_scale.PRESET_SFT} == paper_scale.PRESET_SFT
    rows = paper_scale.cell_n(yaml.safe_load(SHAPE.read_text()), "sft")  # what a lever trains on
    assert TrainingHparams.of(long).optimizer_steps(rows) == 918 >= long["compile_layers_min_steps"]
    packed = {**preset["sft"], **paper_scale.lever_overrides("sft", paper_scale.PACKED_16)}
    assert (packed["batch_size"], packed["grad_accum"], packed["padding_free"], packed["flex_attention"]) == (
        16,
        1,
        True,
        True,
    )


def test_tiny_shape_refuses_a_config_of_another_layout(tmp_path):
    config = copy.deepcopy(yaml.safe_load(SHAPE.read_text()))
    config["datasets"]["math"]["train"] = {"source": "local", "data_files": "x.jsonl", "format": "gsm8k"}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(KeyError, match=r"no 'datasets\.math\.train\.from\.limit'"):
        paper_scale.load_config(path, "tiny", "cpu")


# ----------------------------------------------------------------------------- the speed levers


@NEEDS_DATA
def test_without_plain_runs_only_the_named_levers(tmp_path, monkeypatch):
    """--without-plain: two preference levers side by side and nothing else (no plain, no warm-up run),
    the grouped one recorded as grouped; refused without training levers to run."""
    # Eager: which levers run and what grouping computes are tested here, compiled layers elsewhere
    # (their compile on 2 CPU cores was most of this test's time).
    eager = {name: {**settings, "compile_layers": False} for name, settings in paper_scale.LEVERS["orpo"].items()}
    monkeypatch.setitem(paper_scale.LEVERS, "orpo", eager)
    summary = paper_scale.main(
        [
            *("--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), "--stages", "levers_orpo"),
            *("--levers", "orpo:preset,orpo:preset_grouped", "--without-plain"),
        ]
    )
    orpo = summary["levers"]["orpo"]
    assert set(orpo) == {"preset", "preset_grouped"} and "lever_warmups" not in summary
    assert orpo["preset_grouped"]["group_by_length"] is True and orpo["preset"]["group_by_length"] is False
    assert orpo["preset"]["real_tokens"] == orpo["preset_grouped"]["real_tokens"] > 0
    assert all("speedup_tokens_per_second" not in lever and "error" not in lever for lever in orpo.values())
    positions = orpo["preset"]["computed_tokens"] / orpo["preset_grouped"]["computed_tokens"]
    assert summary["lever_ratios"]["orpo_preset_over_grouped"]["computed_positions"] == round(positions, 3)
    for bad in (["--without-plain"], ["--levers", "gsm8k:merged", "--without-plain"]):
        with pytest.raises(SystemExit):
            paper_scale.parse_args(["--shape", "tiny", *bad])


@NEEDS_DATA
def test_levers_run_each_setting_against_the_plain_path_in_one_process(tmp_path, monkeypatch):
    """A few levers of each kind at the tiny shape: each is recorded with its settings as they took effect
    and its ratio to plain, and a lever that fails is recorded without stopping the next."""
    levers = {
        "sft": {
            k: paper_scale.LEVERS["sft"][k]
            for k in (
                "plain",
                "no_checkpointing_padding_free",
                "no_checkpointing_uncast_inputs_dropout0",
                "no_checkpointing_uncast_inputs_dropout0_compiled_layers",
            )
        }
        | {"rows300": {"base_dtype": "bfloat16", "row_tokens": 300, "max_length": 512}},
        "dpo": {k: paper_scale.LEVERS["dpo"][k] for k in ("plain", "no_checkpointing_precompute_reference")},
        "gsm8k": {
            "plain": {},
            "merged": {"merge_adapter": True},
            "merged_next_cell": {"merge_adapter": True, "cudnn_attention": False},
            "broken": {"cache": "paged"},
        },
        "gsm8k_small": {k: paper_scale.LEVERS["gsm8k_small"][k] for k in ("plain", "static_cache_eager")}
        # a lever's next cell decodes the model its first cell decodes (here the repeated heads)
        | {"plain_kv_heads_repeated_next_cell": {}},
    }
    monkeypatch.setattr(paper_scale, "LEVERS", levers)
    summary = paper_scale.main(
        [
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--stages",
            "levers_sft,levers_dpo,levers_gsm8k,levers_gsm8k_small",
        ]
    )
    sft, dpo, gsm8k = (summary["levers"][m] for m in ("sft", "dpo", "gsm8k"))
    assert sft["plain"]["speedup_tokens_per_second"] == 1.0
    plain, fast = sft["plain"], sft["no_checkpointing_padding_free"]
    assert (plain["base_dtype"], plain["gradient_checkpointing"], plain["padding_free"]) == ("float32", True, False)
    assert (fast["base_dtype"], fast["gradient_checkpointing"], fast["padding_free"]) == ("bfloat16", False, True)
    assert fast["speedup_tokens_per_second"] == pytest.approx(
        fast["tokens_per_second"] / plain["tokens_per_second"], abs=1e-3
    )
    uncast = sft["no_checkpointing_uncast_inputs_dropout0"]
    assert uncast["lora_dropout"] == 0.0 and plain["lora_dropout"] == summary["config"]["training"]["lora"]["dropout"]
    # bf16 autocast is on where the CPU computes bf16 natively; the record says what took effect.
    taken = uncast["fast_paths"]["cast_adapter_inputs"]
    assert taken["setting"] is False and (taken["layers"] > 0) == uncast["bf16"]
    assert plain["fast_paths"]["cast_adapter_inputs"] == {"setting": True, "layers": 0}
    assert all("steady_seconds_per_step" in run for run in sft.values())
    # Only the compiled lever makes graphs, in its first step at least.
    assert sft["no_checkpointing_uncast_inputs_dropout0_compiled_layers"]["compiling_steps"][:1] == [1]
    assert uncast["compiling_steps"] == []
    # A compiled lever's trained model, compiled against eager on rows of new lengths (Round 21's probe).
    probe = sft["no_checkpointing_uncast_inputs_dropout0_compiled_layers"]["compiled_against_eager"]
    assert set(probe) == {str(n) for n in paper_scale.PROBE_LENGTHS}
    for record in probe.values():
        assert record["compiled_loss"] == pytest.approx(record["eager_loss"], rel=1e-2)
        assert record["compiled_causal_leak"] < 0.1 and record["eager_causal_leak"] < 0.1
    assert "compiled_against_eager" not in uncast
    # Every lever: how far its adapter moved, and its loss on the same fixed rows with the adapter off
    # and on (Round 22). At the tiny preset's learning rate the adapter moves; off, the base loss is
    # the same model's whatever the lever, and a compiled model's own forward agrees with eager.
    compiled = sft["no_checkpointing_uncast_inputs_dropout0_compiled_layers"]["adapter_movement"]
    for lever in ("plain", "no_checkpointing_uncast_inputs_dropout0"):
        movement = sft[lever]["adapter_movement"]
        assert "error" not in movement, movement
        assert movement["moved"]["lora_A"] > 0 and movement["moved"]["lora_B"] > 0
        assert movement["fixed_rows"] == min(paper_scale.FIXED_ROWS, plain["rows"])
        assert movement["trained_eager_loss"] != movement["base_loss"]
        assert movement["base_loss"] == pytest.approx(compiled["base_loss"], rel=2e-2)
        assert "trained_compiled_loss" not in movement
    assert compiled["trained_compiled_loss"] == pytest.approx(compiled["trained_eager_loss"], rel=1e-2)
    # What the LoRA branch adds, eager and compiled (a tiny B under bf16 rounding here: the figures
    # are compared in test_lora_branch_*, on a branch larger than the rounding).
    branch = compiled["lora_branch"]
    assert branch["positions"] > 0 and branch["eager_norm"] > 0 and branch["compiled_norm"] > 0
    scaled = compiled["lora_branch_scaled"]
    assert (branch["scale"], scaled["scale"]) == (1.0, paper_scale.LORA_BRANCH_SCALE)
    assert scaled["positions"] == branch["positions"] and scaled["eager_norm"] > branch["eager_norm"]
    assert set(compiled["leaks_scaled"]) == {"scale", "rows", "middle", "eager", "compiled"}
    for lever in dpo.values():  # a preference lever: how far its adapter moved, no fixed-row loss
        movement = lever["adapter_movement"]
        assert movement["moved"]["lora_B"] > 0 and movement["fixed_rows"] == 0 and "error" not in movement
    assert compiled["leaks_scaled"]["eager"]["causal"] < 1e-3
    # Lengthened rows (row_tokens): the same rows, each at least 300 tokens, as the record counts them.
    assert sft["rows300"]["tokens_per_row"] >= 300 > plain["tokens_per_row"]
    assert sft["rows300"]["rows"] == plain["rows"]
    assert (
        plain["epochs"] == paper_scale.LEVER_EPOCHS["sft"] and dpo["plain"]["epochs"] == paper_scale.LEVER_EPOCHS["dpo"]
    )
    assert dpo["no_checkpointing_precompute_reference"]["precompute_reference"] is True
    assert summary["lever_ratios"]["dpo_pair_over_sft_example"] > 0
    # Every 8B GSM8K lever starts from HF generate's plain path, not from the preset's decoding.
    plain_decoding = gsm8k["plain"]
    assert (
        plain_decoding["merge_adapter"],
        plain_decoding["cache"],
        plain_decoding["packed_gqa"],
        plain_decoding["flex_attention"],
    ) == (False, "dynamic", False, False)
    assert gsm8k["merged"]["merge_adapter"] is True and gsm8k["merged"]["outputs_equal_to_plain"] is not None
    assert gsm8k["merged"]["cache"] == "dynamic"
    assert gsm8k["merged"]["adapter"].endswith("levers_sft_plain")
    # A lever run again in the same process is compared with its first run: on a CPU (no cuDNN
    # kernel to leave out) the answers repeat exactly.
    again = gsm8k["merged_next_cell"]
    assert again["outputs_equal_to_first_cell"] == 1.0 and again["cudnn_attention"] is False
    assert "outputs_equal_to_first_cell" not in gsm8k["merged"] and gsm8k["merged"]["cudnn_attention"] is True
    assert "cache" in gsm8k["broken"]["error"] and summary["errors"] == {}
    # Every training lever stage began with a throwaway run of plain, outside the results.
    assert set(summary["lever_warmups"]) == {"sft", "dpo"} and all(
        "error" not in w for w in summary["lever_warmups"].values()
    )
    assert "process_warmup" not in sft
    # The real small model (the mini preset's), no adapter: the static cache changes no answer in float32.
    small = summary["levers"]["gsm8k_small"]
    assert small["plain"]["adapter"] is None and small["plain"]["random_weights"] is False
    assert small["static_cache_eager"]["cache"] == "static" and small["static_cache_eager"]["compile"] is False
    assert small["static_cache_eager"]["outputs_equal_to_plain"] == 1.0
    # the same answers: no difference in accuracy, an interval of one point
    assert small["static_cache_eager"]["accuracy_minus_plain"] == {
        "difference": 0.0,
        "ci95": [0.0, 0.0],
        "within_noise": True,
    }
    assert summary["small_model"]["parameters"] > 100_000_000
    repeated = small["plain_kv_heads_repeated_next_cell"]
    assert repeated["model"] == f"small{paper_scale.KV_HEADS_REPEATED}" and small["plain"]["model"] == "small"
    # the same function with every KV head repeated: the same greedy answers in float32
    assert repeated["outputs_equal_to_plain"] == 1.0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written["levers"]["gsm8k"]) == {"plain", "merged", "merged_next_cell", "broken"}


def test_profiled_training_stage_records_where_its_steps_go(tmp_path):
    """--profile-steps: torch.profiler over optimizer steps after the first of each training stage, a
    table file beside the summary and its top operators in it (CPU time on the CPU)."""
    summary = paper_scale.main(
        ["--shape", "tiny", "--device", "cpu", "--out", str(tmp_path), "--stages", "sft", "--profile-steps", "1"]
    )
    profile = summary["methods"]["sft"]["profile"]
    assert profile["steps"] == 1 and profile["by"] == "self_cpu_time_total" and profile["total_self_ms"] > 0
    assert profile["busy_seconds_per_step"] == pytest.approx(profile["total_self_ms"] / 1000, rel=1e-2)
    assert profile["top"] and all(op["self_ms"] >= 0 and op["calls"] >= 1 for op in profile["top"])
    assert sum(op["share"] for op in profile["top"]) <= 1.0 + 1e-6
    assert any("aten::" in op["op"] for op in profile["top"])
    assert (tmp_path / profile["table"]).read_text().count("\n") > 10


def test_steady_rates_leave_out_the_first_steps():
    clock = paper_scale.StepClock("cpu")
    clock.times = [10.0, 13.0, 14.0, 15.0, 15.5, 16.0]  # compilation in the first steps, then 0.5 s/step
    assert paper_scale.STEADY_AFTER == 3
    assert clock.steady_seconds_per_step() == pytest.approx(2.0 / 3)
    rates = paper_scale.steady_rates({"train_tokens": 600, "steps": 6, "model_parameters": 10}, 0.5, 1e4)
    assert rates["steady_tokens_per_second"] == 200 and rates["steady_mfu"] == pytest.approx(4 * 10 * 200 / 1e4)
    clock.times = clock.times[:4]
    assert clock.steady_seconds_per_step() is None


def test_compile_free_rates_leave_out_the_steps_that_compiled():
    clock = paper_scale.StepClock("cpu")
    clock.graphs_before = 0
    # steps 1-2 compile, step 5 recompiles for a new shape (4 s), the rest take 0.5 s
    clock.times = [10.0, 13.0, 13.5, 14.0, 18.0, 18.5, 19.0]
    clock.graphs = [2, 4, 4, 4, 6, 6, 6]
    assert clock.compiling_steps() == [1, 2, 5]
    assert clock.steady_seconds_per_step() == pytest.approx(5.5 / 4)
    assert clock.compile_free_seconds_per_step() == pytest.approx(0.5)
    rates = paper_scale.compile_free_rates({"train_tokens": 700, "steps": 7, "model_parameters": 10}, clock, 1e4)
    assert rates["compiling_steps"] == [1, 2, 5]
    assert rates["compile_free_seconds_per_step"] == 0.5 and rates["compile_free_tokens_per_second"] == 200
    clock.graphs = [2, 4, 4, 6, 8, 8, 10]  # one compile-free step past the first three is no rate
    assert clock.compile_free_seconds_per_step() is None
    assert paper_scale.steady_rates({}, None, 1e4) == {"steady_seconds_per_step": None}


@NEEDS_DATA
def test_print_eval_settings_gives_the_evaluate_rules_settings_with_overrides(capsys):
    """What benchmarks/device/paper_scale.sh hands benchmarks/evaluate_startup.py at this shape."""
    with pytest.raises(SystemExit) as done:
        paper_scale.main(["--shape", "tiny", "--print-eval-settings", '{"cache": "static", "batch_size": 660}'])
    assert done.value.code == 0
    settings = json.loads(capsys.readouterr().out)
    config = yaml.safe_load(SHAPE.read_text())
    assert settings["prompt_template"] == config["datasets"]["math"]["prompt_template"]
    assert settings["cache"] == "static" and settings["batch_size"] == 660  # the overrides win over the tiny shape's
    assert settings["max_new_tokens"] == paper_scale.TINY["evaluation.gsm8k.max_new_tokens"]
    for bad in ("[1]", "{cache", '{"cudnn": false}'):
        with pytest.raises(SystemExit) as refused:
            paper_scale.main(["--shape", "tiny", "--print-eval-settings", bad])
        assert refused.value.code == 2
    assert "unknown ['cudnn']" in capsys.readouterr().err and "cudnn_attention" in paper_scale.gsm8k_setting_names()


def test_accuracy_against_plain_is_a_paired_difference_with_its_interval(tmp_path):
    def predictions(name, correct):
        path = tmp_path / name
        write_jsonl(path, [{"id": f"q{i}", "output": str(c), "correct": c} for i, c in enumerate(correct)])
        return paper_scale._predictions_by_id(path)

    plain = predictions("plain.jsonl", [True] * 10 + [False] * 90)
    slightly_better = predictions("b.jsonl", [True] * 11 + [False] * 89)
    much_better = predictions("c.jsonl", [True] * 60 + [False] * 40)
    close = paper_scale._accuracy_against(plain, slightly_better)
    assert close["difference"] == pytest.approx(0.01) and close["within_noise"]
    assert close["ci95"][0] <= 0.0 <= close["ci95"][1]
    far = paper_scale._accuracy_against(plain, much_better)
    assert far["difference"] == pytest.approx(0.5) and not far["within_noise"] and far["ci95"][0] > 0.3
    assert paper_scale._accuracy_against(plain, paper_scale._predictions_by_id(tmp_path / "missing.jsonl")) is None


def test_kv_heads_repeated_is_the_same_function_with_one_kv_head_per_query_head(tmp_path):
    import torch
    from conftest import TINY_ARCH
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    grouped = LlamaForCausalLM(LlamaConfig(vocab_size=64, initializer_range=0.3, **TINY_ARCH)).eval()
    grouped.save_pretrained(tmp_path / "grouped")
    folder = paper_scale.kv_heads_repeated(tmp_path / "grouped", tmp_path / "repeated")
    repeated = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert repeated.config.num_key_value_heads == repeated.config.num_attention_heads == 4
    assert repeated.model.layers[0].self_attn.k_proj.weight.shape == (32, 32)  # 4 heads x 8, was 2 x 8
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(repeated(tokens).logits, grouped(tokens).logits)
    assert paper_scale.kv_heads_repeated(tmp_path / "grouped", folder) == folder, "made once"


def tiny_lora_with_drawn_b(tiny_model_dir, dropout: float, b_std: float):
    """The tiny Llama in float32 with LoRA on every linear layer, B drawn (seed 0) instead of zero, so
    that the branch, and dropout on it, move the logits."""
    import torch
    from peft import get_peft_model

    from d2lora.models import load_model
    from d2lora.training.adapters import lora_config

    torch.manual_seed(0)
    model = get_peft_model(
        load_model(tiny_model_dir, dtype="float32", device="cpu"),
        lora_config({"rank": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"}),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=b_std)
    return model


def test_compiled_against_eager_finds_no_difference_in_a_causal_model_compiled_by_layers(tiny_model_dir):
    """The probe on what compile_layers makes (dynamo's graphs run eagerly: inductor's CUDA kernels are
    what it is for on the GPU): the same logits and loss either way, and a causal model, with dropout
    on and B not zero, so that fresh dropout masks would move every logit."""
    import torch._dynamo

    from d2lora.training import fast_paths

    model = tiny_lora_with_drawn_b(tiny_model_dir, dropout=0.5, b_std=0.5)
    torch._dynamo.reset()
    try:
        fast_paths.compile_decoder_layers(model, backend="eager")
        result = paper_scale.compiled_against_eager(model, model.config.vocab_size, bf16=False, lengths=(40, 53))
    finally:
        torch._dynamo.reset()
    assert set(result) == {"40", "53"}
    for record in result.values():
        assert record["max_abs_logit_difference"] < 1e-4
        assert record["compiled_loss"] == pytest.approx(record["eager_loss"], abs=1e-5)
        assert record["compiled_loss"] > 0
        assert record["compiled_causal_leak"] < 1e-4 and record["eager_causal_leak"] < 1e-4


def body_as_causal_lm(body, vocab_size: int):
    """A stand-in for a transformers causal LM around `body` (token ids -> logits), the body compiled
    by dynamo alone: what the compiled-against-eager probes call, and nothing else."""
    import torch

    class Output:
        def __init__(self, logits):
            self.logits = logits

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"vocab_size": vocab_size})()
            self.body = body

        def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False):
            return Output(self.body(input_ids))

    body.compile(backend="eager")
    return Model()


def test_compiled_against_eager_flags_a_compiled_forward_that_differs_and_one_that_sees_ahead():
    """The probe can fail: a body that adds 1 only when traced, and mixes every position into every other."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 50)

        def forward(self, input_ids):
            hidden = self.embedding(input_ids)
            hidden = hidden + hidden.mean(dim=1, keepdim=True)  # every position sees the whole row
            return hidden + 1.0 if torch.compiler.is_compiling() else hidden

    torch.manual_seed(0)
    model = body_as_causal_lm(Body(), vocab_size=50)
    model.eval()
    record = paper_scale.compiled_against_eager(model, 50, bf16=False, lengths=(40,))["40"]
    assert not model.training  # the probe runs in training mode and leaves the mode it found
    assert record["max_abs_logit_difference"] == pytest.approx(1.0, abs=1e-5)
    assert record["compiled_causal_leak"] > 1e-3 and record["eager_causal_leak"] > 1e-3


def test_lora_branch_is_the_same_through_layers_compiled_by_dynamo(tiny_model_dir):
    """float32, B drawn large enough to dominate rounding: the compiled layers add what eager adds."""
    import torch
    import torch._dynamo

    from d2lora.training import fast_paths

    model = tiny_lora_with_drawn_b(tiny_model_dir, dropout=0.0, b_std=0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    kept = lora_b.detach().clone()
    measure = paper_scale.AdapterMovement
    torch._dynamo.reset()
    try:
        fast_paths.compile_decoder_layers(model, backend="eager")
        model.eval()
        branch = measure.lora_branch(model, batch, "cpu", contextlib.nullcontext())
        scaled = measure.lora_branch(model, batch, "cpu", contextlib.nullcontext(), scale=3.0)
        leaks = measure.leaks(model, batch, "cpu", contextlib.nullcontext(), scale=3.0)
    finally:
        torch._dynamo.reset()
    assert branch["positions"] == 54
    assert branch["eager_norm"] > 1.0
    assert branch["norm_ratio"] == pytest.approx(1.0, abs=1e-4) and branch["cosine"] > 0.9999
    assert branch["base_max_abs_difference"] < 1e-4 and branch["trained_max_abs_difference"] < 1e-4
    assert branch["trained_compiled_loss"] == pytest.approx(branch["trained_eager_loss"], abs=1e-5)
    assert branch["base_compiled_loss"] == pytest.approx(branch["base_eager_loss"], abs=1e-5)
    assert branch["base_eager_loss"] != branch["trained_eager_loss"]
    assert scaled["norm_ratio"] == pytest.approx(1.0, abs=1e-4) and scaled["eager_norm"] > branch["eager_norm"]
    assert (leaks["rows"], leaks["middle"]) == (2, 15)
    for path in ("eager", "compiled"):
        assert leaks[path]["causal"] < 1e-5 and leaks[path]["cross_row"] < 1e-5
    assert torch.equal(lora_b, kept), "B is put back as it was after the scaled and zeroed passes"


def test_lora_branch_flags_a_compiled_branch_that_is_scaled():
    """The measure can fail: a body whose B branch counts twice only when traced."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 8)
            self.lora_B = torch.nn.Linear(8, 8, bias=False)
            self.head = torch.nn.Linear(8, 50, bias=False)

        def forward(self, input_ids):
            hidden = self.embedding(input_ids)
            branch = self.lora_B(hidden)
            return self.head(hidden + (2.0 * branch if torch.compiler.is_compiling() else branch))

    torch.manual_seed(0)
    model = body_as_causal_lm(Body(), vocab_size=50)
    ids = torch.randint(0, 50, (2, 12))
    branch = paper_scale.AdapterMovement.lora_branch(
        model, {"input_ids": ids, "labels": ids}, "cpu", contextlib.nullcontext()
    )
    assert branch["positions"] == 24
    assert branch["norm_ratio"] == pytest.approx(2.0, abs=1e-4) and branch["cosine"] > 0.9999
    assert branch["base_max_abs_difference"] < 1e-5 and branch["trained_max_abs_difference"] > 1e-3


def test_leaks_flag_a_compiled_branch_that_sees_later_tokens_and_other_rows():
    """The check can fail: a B branch that, only when traced, adds the next position's and the next
    row's input; eagerly the same body stays causal and row-wise."""
    import torch

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 8)
            self.lora_B = torch.nn.Linear(8, 8, bias=False)
            self.head = torch.nn.Linear(8, 50, bias=False)

        def forward(self, input_ids):
            hidden = self.embedding(input_ids)
            seen = hidden
            if torch.compiler.is_compiling():
                seen = hidden + hidden.roll(-1, dims=1) + hidden.roll(-1, dims=0)
            return self.head(hidden + self.lora_B(seen))

    torch.manual_seed(0)
    model = body_as_causal_lm(Body(), vocab_size=50)
    ids = torch.randint(0, 50, (3, 12))
    leaks = paper_scale.AdapterMovement.leaks(
        model,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
        "cpu",
        contextlib.nullcontext(),
    )
    assert leaks["eager"] == {"causal": 0.0, "cross_row": 0.0}
    assert leaks["compiled"]["causal"] > 1e-3 and leaks["compiled"]["cross_row"] > 1e-3


def test_a_lever_trains_under_its_inductor_settings_and_records_them(monkeypatch):
    from d2lora.training import fast_paths

    before = dict(fast_paths.COMPILE_OPTIONS)
    seen = {}

    def train_once(run, stage, overrides, name=None, n=None):
        seen["options"], seen["overrides"] = dict(fast_paths.COMPILE_OPTIONS), overrides
        return {"steps": 1}

    monkeypatch.setattr(paper_scale, "train_once", train_once)
    lever = paper_scale.LEVERS["sft"][
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_compiled_layers_unrounded"
    ]
    result = paper_scale.train_stage(None, "sft", lever, name="levers_sft_x")
    assert before == {"emulate_precision_casts": True}, "the pipeline's compiled layers round as eager does"
    assert seen["options"] == {"emulate_precision_casts": False} and "inductor" not in seen["overrides"]
    assert seen["overrides"]["compile_layers"] is True
    assert result == {"steps": 1, "inductor": {"emulate_precision_casts": False}}
    assert fast_paths.COMPILE_OPTIONS == before
    assert paper_scale.train_stage(None, "sft", {"batch_size": 4}) == {"steps": 1}
    assert seen["options"] == before
    with pytest.raises(ValueError, match=r"unknown torch._inductor.config settings \['no_such_setting'\]"):
        paper_scale.train_stage(None, "sft", {"inductor": {"no_such_setting": 1}})


def test_lengthened_rows_repeat_each_answer_to_the_length_asked(tiny_model_dir):
    from d2lora.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    rows = [
        {"id": "a", "prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. \\boxed{5}", "rejected": "6"},
        {"id": "b", "prompt": "Add " + " plus ".join(map(str, range(40))), "chosen": "780", "rejected": "7"},
    ]
    longer = paper_scale.lengthened_rows(rows, tokenizer, 64)

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    short, long = longer
    assert (short["id"], short["prompt"]) == ("a", rows[0]["prompt"])
    for answer in ("chosen", "rejected"):  # a preference pair's two sequences both lengthened
        assert short[answer].startswith(rows[0][answer] + "\n\n")
        total = tokens(short["prompt"]) + tokens(short[answer])
        # at least the length asked; one answer copy (and its separators) over it at most
        assert 64 <= total <= 64 + tokens(rows[0][answer]) + 2 * short[answer].count("\n\n")
    # a row whose prompt alone is longer keeps its one answer
    assert tokens(rows[1]["prompt"]) > 64 and long == rows[1]
    assert paper_scale.lengthened_rows(rows, tokenizer, 5) == rows
    sft_row = {key: value for key, value in rows[0].items() if key != "rejected"}
    assert "rejected" not in paper_scale.lengthened_rows([sft_row], tokenizer, 64)[0]
