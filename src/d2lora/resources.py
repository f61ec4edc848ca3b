"""Job resources for cluster runs: runtime (minutes) and host memory (MB) of every workflow job,
sized from the config, so that a preset asks for what it needs without editing rules.

They are rough upper bounds from the model's size, the rows a job trains on or evaluates and the
device; where jobs go (account, partition, GPU type) is the profile's business (profiles/slurm,
docs/cluster.md). A retry (`attempt` 2, 3, ...) gets `attempt` times the time and half as much
memory again per retry. workflow/rules/common.smk hands each rule its function of (wildcards,
attempt); any of them can be overridden per rule: --set-resources adapt:runtime=720.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Mapping

from d2lora.benchmarks import eval_roles
from d2lora.data.sources import available_rows
from d2lora.models import architecture_parameters
from d2lora.settings import TrainingHparams, with_defaults

GPU_FLOPS = 2e14  # sustained training FLOP/s of one GPU (a quarter of an H100's 8e14 bf16 matmul, SPEC)
CPU_FLOPS = 2e10  # the same for one CPU core
UNKNOWN_ROWS = {"train": 50_000, "eval": 2_500}  # hub sources, whose size is known only once loaded
METHOD_PASSES = {"sft": 1, "orpo": 2, "dpo": 3}  # chosen + rejected; DPO also runs its reference
# auto is sized as float32: the job may resolve it either way, and the estimate must hold for both.
DTYPE_BYTES = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_PARAMS_B = 8.0  # a model whose name gives no size: ask for too much, not too little


def params_from_name(name: str) -> float | None:
    """Billions of parameters from a model's name ('SmolLM2-135M-Instruct' 0.135, 'Llama-3.1-8B' 8.0)."""
    sizes = re.findall(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([MB])(?![A-Za-z])", Path(name).name)
    if not sizes:
        return None
    number, unit = sizes[-1]
    return float(number) / (1000 if unit == "M" else 1)


class ResourceModel:
    """The estimates for one validated config."""

    def __init__(self, config: Mapping):
        self.config = config
        self.eval_roles = eval_roles()

    @functools.cached_property
    def params_b(self) -> float:
        """The model's size in billions of parameters: from its architecture for random_init (at least
        0.01, the tiny ones), else from its name."""
        model = self.config["model"]
        if model["source"] == "random_init":
            return max(0.01, architecture_parameters(model.get("architecture") or {}) / 1e9)
        found = params_from_name(str(model.get("id") or model.get("file") or model.get("path") or ""))
        return DEFAULT_PARAMS_B if found is None else found

    @property
    def on_gpu(self) -> bool:
        return with_defaults("", self.config)["device"] != "cpu"

    def weights_mb(self, dtype: str | None = None) -> float:
        return self.params_b * 1000 * DTYPE_BYTES[dtype or with_defaults("model", self.config["model"])["dtype"]]

    @functools.cache
    def source_rows(self, role: str, split: str) -> int:
        source = self.config["datasets"].get(role, {}).get(split)
        if not source:
            return 0
        if source["source"] == "onpolicy":
            source = {**source["from"], **{k: source[k] for k in ("limit", "skip") if k in source}}
        return available_rows(source) or UNKNOWN_ROWS[split]

    # ---- time

    def minutes(self, seconds: float, attempt: int) -> int:
        """Loading the model (a minute per billion parameters, at least 5) plus `seconds` of work,
        rounded up to 5 minutes, times the attempt."""
        load = 60 * max(5.0, self.params_b)
        return int(attempt * 5 * math.ceil((load + seconds) / 300))

    def train_seconds(self, rows: int, hp: Mapping, method: str) -> float:
        """6 FLOPs per parameter and token (forward, backward, recomputation), every example padded
        to max_length."""
        hp = TrainingHparams.of(hp)
        tokens = rows * hp.epochs * hp.max_length * METHOD_PASSES[method]
        return 6 * self.params_b * 1e9 * tokens / (GPU_FLOPS if self.on_gpu else CPU_FLOPS)

    def generate_seconds(self, rows: int, batch_size: int, max_new_tokens: int, rounds: int = 1) -> float:
        """One decoding step per new token and batch; a step reads every weight once."""
        steps = rounds * math.ceil(rows / batch_size) * max_new_tokens
        if self.on_gpu:
            step = 0.1 + self.weights_mb() * 1e6 / 1e12  # overhead, and the weights at 1 TB/s
        else:
            step = 0.2 + self.weights_mb() * 1e6 / 1e10
        return steps * step

    def warmup_runtime(self, attempt: int) -> int:
        hp = self.config["training"]["warmup"]
        return self.minutes(self.train_seconds(self.source_rows("warmup", "train"), hp, "sft"), attempt)

    def adapt_runtime(self, method: str, n: int, attempt: int) -> int:
        return self.minutes(self.train_seconds(n, self.config["training"]["adapt"][method], method), attempt)

    def evaluate_runtime(self, benchmark: str, attempt: int) -> int:
        settings = self.config["evaluation"][benchmark]
        rows = self.source_rows(self.eval_roles[benchmark], "eval")
        if benchmark == "arc_easy":  # four scored choices of ~256 tokens, forward only
            flops = rows * 4 * 256 * 2 * self.params_b * 1e9
            return self.minutes(flops / (GPU_FLOPS if self.on_gpu else CPU_FLOPS), attempt)
        return self.minutes(self.generate_seconds(rows, settings["batch_size"], settings["max_new_tokens"]), attempt)

    def sample_negatives_runtime(self, task: str, attempt: int) -> int:
        source = self.config["datasets"][task]["train"]
        settings = {"samples": 4, "max_new_tokens": 384, "batch_size": 64, **source}  # d2lora.data.onpolicy defaults
        rows = self.source_rows(task, "train")
        seconds = self.generate_seconds(rows, settings["batch_size"], settings["max_new_tokens"], settings["samples"])
        return self.minutes(seconds, attempt)

    def prepare_model_runtime(self, attempt: int) -> int:
        download = self.weights_mb() / 20 if self.config["model"]["source"] == "hub" else 0  # at 20 MB/s
        return self.minutes(download, attempt)

    def data_runtime(self, role: str, attempt: int) -> int:
        return attempt * (30 if self.reads_files(role) else 10)

    # ---- memory

    @staticmethod
    def _retry_mb(need: float, attempt: int) -> int:
        return int(1000 * math.ceil(need * (1 + 0.5 * (attempt - 1)) / 1000))

    def model_job_mem_mb(self, attempt: int) -> int:
        """Host memory of a job that loads the model: the weights pass through RAM as they load (on a
        CPU device they stay, with activations and LoRA optimizer state), 4 GB for Python, torch and
        data on top."""
        return self._retry_mb(4000 + (1.5 if self.on_gpu else 3) * self.weights_mb(), attempt)

    def prepare_model_mem_mb(self, attempt: int) -> int:
        """Loading (a .gguf is dequantized to float32) and writing the weights once more."""
        weights = self.weights_mb("float32" if self.config["model"]["source"] == "gguf" else None)
        return self._retry_mb(max(8000, 4000 + 2 * weights), attempt)

    def reads_files(self, role: str) -> bool:
        """Whether a role's data come from hub or local files (read, maybe downloaded, and hashed)
        rather than being generated in seconds."""
        return any(
            part.get("source") != "synthetic"
            for part in self.config["datasets"][role].values()
            if isinstance(part, dict)
        )

    def data_mem_mb(self, role: str, attempt: int) -> int:
        return attempt * (8000 if self.reads_files(role) else 2000)
