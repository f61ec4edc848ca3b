"""What AdaLoRA and Dynamic LoRA share: the schedule, the peft helpers, the checkpoint state and
the controller's life cycle (begin -> per-step hooks -> save/resume -> finalize -> report)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER = "default"
CONTROLLER_ATTR = "d2lora_adaptive"
STATE_FILE = "d2lora_adaptive_state"  # .json + .safetensors inside a Trainer checkpoint folder


class AdaptiveAdapterError(ValueError):
    """A variant configuration this package cannot build."""


@dataclass(frozen=True)
class Schedule:
    """Steps are 0-based optimizer-step indices (the Trainer's state.global_step before the step).

    warm-up: steps [0, tinit); reallocation at steps t in [tinit, total - tfinal) with
    (t - tinit) % interval == 0; final phase: steps [total - tfinal, total), ranks frozen.
    """

    total_steps: int
    tinit: int
    tfinal: int
    interval: int

    @property
    def budget_end(self) -> int:
        return self.total_steps - self.tfinal

    def reallocates_at(self, step: int) -> bool:
        return self.tinit <= step < self.budget_end and (step - self.tinit) % self.interval == 0


def make_schedule(total_steps: int, tinit_frac: float, tfinal_frac: float, reallocations: int) -> Schedule:
    total = int(total_steps)
    if total < 1:
        raise AdaptiveAdapterError(f"total_steps must be >= 1, got {total_steps}")
    tinit = max(1, round(tinit_frac * total)) if tinit_frac > 0 else 0
    tfinal = max(1, round(tfinal_frac * total)) if tfinal_frac > 0 else 0
    while tinit > 0 and tinit >= total - tfinal:  # keep a budgeting phase: shorten warm-up first
        tinit -= 1
    while tfinal > 0 and tinit >= total - tfinal:
        tfinal -= 1
    interval = max(1, (total - tfinal - tinit) // max(1, int(reallocations)))
    return Schedule(total, tinit, tfinal, interval)


def module_key(name: str) -> str:
    """The module's name in the base model, the key peft's rank_pattern/alpha_pattern match."""
    prefix = "base_model.model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def lora_layers(model, adapter: str = ADAPTER) -> list[tuple[str, nn.Module]]:
    return [
        (module_key(name), module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    ]


def param_states(optimizer, param) -> dict:
    """The optimizer's per-element state tensors of `param` (Adam: exp_avg, exp_avg_sq)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}


def allocated_parameters(model) -> int:
    """Parameters of the trained adapter held in memory (its peak size during training)."""
    return sum(
        param.numel() for name, param in model.named_parameters() if f".{ADAPTER}." in f"{name}." and "lora_" in name
    )


def lora_equivalent_parameters(model, rank: int) -> int:
    """Trainable parameters of plain LoRA of rank `rank` on the same target modules."""
    return int(rank) * sum(m.in_features + m.out_features for _, m in lora_layers(model))


def write_state(folder: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    save_file(
        {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
        str(folder / f"{STATE_FILE}.safetensors"),
    )
    (folder / f"{STATE_FILE}.json").write_text(json.dumps(meta, sort_keys=True))


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta_file, tensor_file = folder / f"{STATE_FILE}.json", folder / f"{STATE_FILE}.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise RuntimeError(
            f"{folder}: resuming an adaptive-rank adapter needs {meta_file.name} and "
            f"{tensor_file.name} there (written by its callback's on_save); they are missing"
        )
    return json.loads(meta_file.read_text()), load_file(str(tensor_file))


class AdaptiveController:
    """The life cycle both variants share; a variant fills in the hooks below.

    begin(max_steps, resume) re-derives the schedule from the Trainer's step count, lets the
    variant prepare (`_start`) and restores a checkpoint's state; save_state / load_state write and
    read the variant's `_state()` with its name and schedule; finalize() runs `_finalize` once;
    report() is the head every variant shares around its `_report_details()`.
    """

    variant = ""
    label = ""  # in messages

    def __init__(self, model, rank: int, options: dict, schedule: Schedule):
        self.model = model
        self.rank = int(rank)
        self.options = dict(options)
        self.schedule = schedule
        self.total_steps_requested = schedule.total_steps
        self.history: list[dict] = []
        self.finalized = False

    # -- hooks of a variant ----------------------------------------------------------------

    def _set_schedule(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def _start(self) -> None:
        """Prepare the first step (after the schedule is final, before a checkpoint is restored)."""

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _finalize(self) -> None:
        raise NotImplementedError

    def _report_details(self) -> dict:
        raise NotImplementedError

    def rank_pattern(self) -> dict[str, int]:
        raise NotImplementedError

    def trainable_budget(self) -> int:
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, optimizer) -> None:
        raise NotImplementedError

    # -- shared life cycle -----------------------------------------------------------------

    def begin(self, max_steps: int, resume: Path | None) -> None:
        if self.finalized:
            raise RuntimeError(f"this {self.label} adapter was finalized by an earlier train(); build a new one")
        if max_steps > 0 and max_steps != self.schedule.total_steps:
            o = self.options
            self._set_schedule(make_schedule(max_steps, o["tinit_frac"], o["tfinal_frac"], o["reallocations"]))
        self._start()
        if resume is not None:
            self.load_state(resume)

    def save_state(self, folder: Path) -> None:
        meta, tensors = self._state()
        write_state(folder, {"variant": self.variant, **meta, "schedule": asdict(self.schedule)}, tensors)

    def load_state(self, folder: Path) -> None:
        meta, tensors = read_state(folder)
        if meta.get("variant") != self.variant:
            raise RuntimeError(f"{folder}: adaptive state of variant {meta.get('variant')}, not {self.variant}")
        self._restore(meta, tensors)

    def finalize(self) -> None:
        if self.finalized:
            return
        self._finalize()
        self.finalized = True

    def report(self) -> dict:
        ranks = self.rank_pattern()
        return {
            "adapter": self.variant,
            "rank_pattern": ranks,
            "total_rank": sum(ranks.values()),
            "rank_budget": self.rank * len(ranks),
            "modules": len(ranks),
            **self._report_details(),
            "schedule": asdict(self.schedule),
            "total_steps_requested": self.total_steps_requested,
            "options": self.options,
            "history": self.history,
        }
