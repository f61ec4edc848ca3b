"""The cluster resource model (d2lora.resources): what each preset's jobs ask SLURM for."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from d2lora.resources import DEFAULT_PARAMS_B, ResourceModel, params_from_name

REPO = Path(__file__).resolve().parents[1]


def _model(preset: str, **changes) -> ResourceModel:
    config = yaml.safe_load((REPO / "config" / preset).read_text())
    config.update(copy.deepcopy(changes))
    return ResourceModel(config)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", 0.135),
        ("meta-llama/Llama-3.1-8B-Instruct", 8.0),
        ("Qwen2.5-0.5B", 0.5),
        ("mistral-instruct", None),
        ("model-v2", None),
    ],
)
def test_params_from_name(name, expected):
    assert params_from_name(name) == expected


def test_model_sizes_of_the_presets():
    assert _model("paper.yaml").params_b == 8.0
    assert _model("config.yaml").params_b == pytest.approx(0.135)
    assert _model("tiny.yaml").params_b == 0.01  # a 2-layer random model, floored
    assert _model("paper.yaml", model={"source": "local", "path": "/models/custom"}).params_b == DEFAULT_PARAMS_B


def test_runtime_grows_with_the_work_and_the_attempt():
    paper = _model("paper.yaml")
    small, large = paper.adapt_runtime("sft", 1000, 1), paper.adapt_runtime("sft", 10000, 1)
    assert 0 < small < large and small % 5 == 0
    assert paper.adapt_runtime("dpo", 1000, 1) > small  # chosen, rejected and the reference
    assert paper.adapt_runtime("sft", 1000, 2) == 2 * small
    # The model's load (five minutes for anything up to 5B parameters) plus the work, in 5-minute steps.
    default = _model("config.yaml")
    assert default.minutes(0, 1) == 5 and default.evaluate_runtime("arc_easy", 1) == 10


def test_the_same_job_asks_for_more_time_on_a_cpu():
    gpu, cpu = _model("paper.yaml"), _model("paper.yaml", device="cpu")
    assert cpu.adapt_runtime("sft", 1000, 1) > gpu.adapt_runtime("sft", 1000, 1)
    assert cpu.evaluate_runtime("gsm8k", 1) > gpu.evaluate_runtime("gsm8k", 1)


def test_memory_holds_the_weights_and_grows_on_retry():
    paper = _model("paper.yaml")
    first = paper.model_job_mem_mb(1)
    assert first >= 4000 + 1.5 * 8 * 1000 * 4 and first % 1000 == 0  # auto is sized as float32
    assert paper.model_job_mem_mb(2) >= 1.5 * first - 1000
    assert _model("paper.yaml", device="cpu").model_job_mem_mb(1) > first  # the weights stay in RAM
    assert _model("config.yaml").prepare_model_mem_mb(1) == 8000  # a 135M GGUF: the floor


def test_hub_sources_of_unknown_size_count_as_large_and_local_ones_are_counted():
    paper, default = _model("paper.yaml"), _model("config.yaml")
    assert paper.source_rows("math", "eval") == 2_500  # hub: sized before it is loaded
    assert (
        default.source_rows("math", "eval") == default.config["datasets"]["math"]["eval"]["rows"]
    )  # synthetic: its own size
    assert paper.data_runtime("math", 1) == 30 and paper.data_mem_mb("math", 2) == 16000
    assert default.data_runtime("math", 1) == 10  # generated in seconds
