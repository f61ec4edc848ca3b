"""Adaptive-rank adapters for the adaptation phase: peft's AdaLoRA and our Dynamic LoRA.

Dynamic LoRA (Liao et al. 2025, arXiv 2501.14859) is published as an abstract only; what is
implemented here, and every choice the abstract leaves open, is in docs/dynamic_lora.md. In short:

* a LoRA adapter with room for `max_rank` components per target module, of which a fixed total
  (rank `r` per module on average, i.e. exactly the trainable parameters of plain LoRA of rank r)
  is active; inactive components are exact zeros and are not computed (the forward uses only the
  active prefix of A's rows and B's columns);
* module importance scored every step from the gradient-weight sensitivity of each component's
  factors, smoothed by an EMA; at scheduled steps rank moves from the module whose weakest
  component matters least to the module whose weakest component matters most, within groups of
  modules of equal per-rank parameter cost, so the total rank AND the trainable-parameter count
  stay exactly fixed;
* the input-feature-based part: the A factor sees the module's input channels rescaled by a
  diagonal computed from the input distribution measured during the warm-up steps (set once,
  function-preserving, then frozen); it is folded into A when the adapter is saved.

The saved result is a standard peft LoRA (per-module `rank_pattern`/`alpha_pattern`) that plain
`PeftModel.from_pretrained(base, folder)` loads to the same function. AdaLoRA is saved by peft's
own AdaLoRA code, which also loads with `PeftModel.from_pretrained`.

Public API (used by d2lora.training.run):
    adaptive_adapter(base_model, lora, variant, total_steps) -> (peft_model, callbacks)
    trainable_budget(model) -> int        # active trainable parameters, exact
    allocated_parameters(model) -> int    # parameters held in memory (peak)
    rank_pattern(model) -> {module: rank}
    adapter_report(model) -> dict         # for training.json

Only torch, transformers, peft (and safetensors, a dependency of both) are imported, so
benchmarks/dynamic_lora_overhead.py can use this file without the rest of the package.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

ADAPTER = "default"
CONTROLLER_ATTR = "d2lora_adaptive"
STATE_FILE = "d2lora_adaptive_state"  # .json + .safetensors inside a Trainer checkpoint folder

DEFAULTS = {
    "adalora": {
        "init_r_factor": 1.5,     # init_r = ceil(1.5 r) (peft's defaults 12 -> 8 have this ratio)
        "tinit_frac": 0.1,
        "tfinal_frac": 0.2,
        "reallocations": 10,      # deltaT = budgeting steps / reallocations
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
    },
    "dynamic": {
        "max_rank_factor": 2.0,   # room per module: max_rank = ceil(2 r)
        "min_rank": 1,
        "tinit_frac": 0.1,
        "tfinal_frac": 0.2,
        "reallocations": 10,
        "beta": 0.85,             # EMA of the component sensitivity (AdaLoRA's beta1)
        "hysteresis": 0.5,        # move only if receiver's weakest * 0.5 > donor's weakest
        "max_move_frac": 0.1,     # at most 10% of a group's rank moves per reallocation
        "grace": 2,               # a granted component cannot be pruned for 2 reallocations
        "budget": "params",       # "params": reallocate within equal-cost groups; "rank": one group
        "input_adaptation": "feature_scale",  # or "none"
        "forward": "full",        # "full": all max_rank columns (dormant ones are exact zeros);
                                  # "active": only the active prefix (fewer FLOPs, more kernels)
        "feature_power": 0.5,
        "feature_clip": 10.0,
        "seed": 0,
    },
}


class AdaptiveAdapterError(ValueError):
    """A variant configuration this module cannot build."""


# ----------------------------------------------------------------------------------------------
# shared helpers


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


def _module_key(name: str) -> str:
    """The module's name in the base model, the key peft's rank_pattern/alpha_pattern match."""
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def _lora_layers(model, adapter: str = ADAPTER) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(_module_key(name), module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A]


def _unwrap_optimizer(optimizer):
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _param_states(optimizer, param) -> dict:
    """The optimizer's per-element state tensors of `param` (Adam: exp_avg, exp_avg_sq)."""
    optimizer = _unwrap_optimizer(optimizer)
    if optimizer is None:
        return {}
    state = optimizer.state.get(param, {})
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}


def _merge_options(adapter: str, variant: dict) -> dict:
    known = DEFAULTS[adapter]
    unknown = sorted(set(variant) - set(known) - {"adapter"})
    if unknown:
        raise AdaptiveAdapterError(f"variant '{adapter}': unknown option(s) {unknown}; known: {sorted(known)}")
    return {**known, **{k: v for k, v in variant.items() if k != "adapter"}}


def _controller(model):
    return getattr(model, CONTROLLER_ATTR, None)


# ----------------------------------------------------------------------------------------------
# public API


def adaptive_adapter(base_model, lora: dict, variant: dict, total_steps: int):
    """A fresh adapter of the given variant on `base_model` and the callbacks that drive it.

    lora: {rank, alpha, dropout, target_modules} (the pipeline's training.lora);
    variant: {"adapter": "lora" | "adalora" | "dynamic", **options} (defaults: DEFAULTS);
    total_steps: the number of optimizer steps planned. It only has to be positive here: at
    on_train_begin the callbacks re-derive the schedule from the Trainer's own state.max_steps.

    Pass every returned callback to the Trainer (before any callback that marks a checkpoint
    complete in on_save: ours write their state into the checkpoint there).
    """
    variant = dict(variant or {})
    adapter = variant.get("adapter", "lora")
    if adapter == "lora":
        if set(variant) - {"adapter"}:
            raise AdaptiveAdapterError(f"variant 'lora' takes no options, got {sorted(set(variant) - {'adapter'})}")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                            lora_dropout=float(lora.get("dropout", 0.0)),
                            target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM", bias="none")
        return get_peft_model(base_model, config), []
    if adapter == "adalora":
        controller = AdaLoRAController.build(base_model, lora, _merge_options("adalora", variant), total_steps)
    elif adapter == "dynamic":
        controller = DynamicLoRAController.build(base_model, lora, _merge_options("dynamic", variant), total_steps)
    else:
        raise AdaptiveAdapterError(f"unknown adapter variant '{adapter}' (known: lora, adalora, dynamic)")
    return controller.model, [AdaptiveRankCallback(controller)]


def trainable_budget(model) -> int:
    """Trainable parameters that take part in the adapter's function, counted exactly.

    Plain LoRA (and a finalized Dynamic LoRA): every element of A and B of the "default" adapter.
    Dynamic LoRA in training: sum over modules of active_rank * (in + out).
    AdaLoRA: sum over modules of rank * (in + out + 1) (P, Q and the singular values E), where
    rank counts the triplets the latest allocation kept (all init_r before the first one).
    """
    controller = _controller(model)
    if controller is not None:
        return controller.trainable_budget()
    return sum(m.lora_A[ADAPTER].weight.numel() + m.lora_B[ADAPTER].weight.numel() for _, m in _lora_layers(model))


def allocated_parameters(model) -> int:
    """Parameters of the trained adapter held in memory (its peak size during training)."""
    total = 0
    for name, param in model.named_parameters():
        if f".{ADAPTER}." in f"{name}." and ("lora_" in name):
            total += param.numel()
    return total


def lora_equivalent_parameters(model, rank: int) -> int:
    """Trainable parameters of plain LoRA of rank `rank` on the same target modules."""
    return int(rank) * sum(m.in_features + m.out_features for _, m in _lora_layers(model))


def rank_pattern(model) -> dict[str, int]:
    """Per-module rank of the adapter as it stands (after training: as it is saved)."""
    controller = _controller(model)
    if controller is not None:
        return controller.rank_pattern()
    return {key: int(m.r[ADAPTER]) for key, m in _lora_layers(model)}


def adapter_report(model) -> dict:
    """What training.json should record about the adapter: variant, ranks, budgets, schedule."""
    controller = _controller(model)
    if controller is not None:
        return controller.report()
    ranks = rank_pattern(model)
    return {
        "adapter": "lora",
        "rank_pattern": ranks,
        "total_rank": sum(ranks.values()),
        "modules": len(ranks),
        "trainable_parameters": trainable_budget(model),
        "allocated_parameters": allocated_parameters(model),
    }


class AdaptiveRankCallback(TrainerCallback):
    """Drives a controller from the Trainer's loop.

    transformers 5 order per optimizer step: clip gradients -> on_pre_optimizer_step ->
    optimizer.step() -> on_optimizer_step -> scheduler -> zero_grad -> global_step += 1 ->
    on_step_end. Both hooks see the gradients; state.global_step is the 0-based step index.
    """

    def __init__(self, controller):
        self.controller = controller
        self.events = {"pre_optimizer_step": 0, "optimizer_step": 0}

    def on_train_begin(self, args, state, control, **kwargs):
        resume = None
        if state.global_step > 0:
            resume = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.controller.begin(int(state.max_steps), resume)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.events["pre_optimizer_step"] += 1
        self.controller.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.events["optimizer_step"] += 1
        self.controller.after_optimizer_step(state.global_step, kwargs.get("optimizer"))

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.controller.save_state(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.finalize()


def _write_state(folder: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
              str(folder / f"{STATE_FILE}.safetensors"))
    (folder / f"{STATE_FILE}.json").write_text(json.dumps(meta, sort_keys=True))


def _read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta_file, tensor_file = folder / f"{STATE_FILE}.json", folder / f"{STATE_FILE}.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise RuntimeError(f"{folder}: resuming an adaptive-rank adapter needs {meta_file.name} and "
                           f"{tensor_file.name} there (written by its callback's on_save); they are missing")
    return json.loads(meta_file.read_text()), load_file(str(tensor_file))


# ----------------------------------------------------------------------------------------------
# AdaLoRA (peft)


def _allow_frozen_adalora_copies(peft_model) -> None:
    """DPOTrainer copies the trainable adapter into a frozen "ref" adapter with the same config
    (`model.add_adapter("ref", model.peft_config["default"])`). AdaLoraModel refuses a second
    adapter whose config is not in inference mode, so the copy is added in inference mode."""
    from peft import AdaLoraConfig

    original = peft_model.add_adapter

    def add_adapter(adapter_name, peft_config, *args, **kwargs):
        trainable = [name for name, cfg in peft_model.peft_config.items() if not cfg.inference_mode]
        if isinstance(peft_config, AdaLoraConfig) and not peft_config.inference_mode and trainable:
            peft_config = copy.deepcopy(peft_config)
            peft_config.inference_mode = True
        return original(adapter_name, peft_config, *args, **kwargs)

    peft_model.add_adapter = add_adapter


class AdaLoRAController:
    """peft's AdaLoRA with `update_and_allocate` called after every optimizer step.

    Equal budget with LoRA of rank r: target_r = r, so the final total rank is r * modules, the
    same as LoRA's; init_r = ceil(init_r_factor * r) sets the peak; lora_alpha = alpha * init_r / r
    so AdaLoRA's scaling (lora_alpha / init_r, fixed) equals LoRA's alpha / r.

    The orthogonality regularizer: AdaLoraModel.forward adds it to `outputs.loss`, which TRL's
    SFT (1.16: loss from the fused LM head's log-probs), DPO and ORPO trainers never use. So the
    config's weight is set to 0 during training and this controller adds the regularizer's
    gradient itself, once per optimizer step, in on_pre_optimizer_step (after gradient clipping),
    for every method alike. The weight is written back into the config at the end.

    Between steps the rank pattern lives here, not in the config: peft truncates the saved
    weights to config.rank_pattern, which would make mid-training checkpoints unresumable.
    """

    variant = "adalora"

    def __init__(self, model, lora: dict, options: dict, schedule: Schedule, init_r: int):
        self.model = model
        self.options = dict(options)
        self.schedule = schedule
        self.init_r = init_r
        self.target_r = int(lora["rank"])
        self.orth_reg_weight = float(options["orth_reg_weight"])
        self.current_pattern = None       # {lora_E param name: [bool]*init_r} of the latest allocation
        self.final_allocation = None      # "scheduled" | "forced at train end"
        self.allocations = 0
        self.history: list[dict] = []
        self.last_orth_reg = None
        self.finalized = False
        self.total_steps_requested = schedule.total_steps

    @classmethod
    def build(cls, base_model, lora: dict, options: dict, total_steps: int):
        from peft import AdaLoraConfig, get_peft_model

        r = int(lora["rank"])
        init_r = int(math.ceil(float(options["init_r_factor"]) * r))
        if init_r <= r:
            raise AdaptiveAdapterError(f"adalora: init_r ({init_r}) must exceed the target rank {r}: "
                                       "peft's allocator masks init_bgt - budget triplets and 0 is refused")
        schedule = make_schedule(total_steps, options["tinit_frac"], options["tfinal_frac"], options["reallocations"])
        config = AdaLoraConfig(
            init_r=init_r, target_r=r, lora_alpha=float(lora["alpha"]) * init_r / r,
            lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules", "all-linear"),
            tinit=schedule.tinit, tfinal=schedule.tfinal, deltaT=schedule.interval, total_step=schedule.total_steps,
            beta1=float(options["beta1"]), beta2=float(options["beta2"]), orth_reg_weight=0.0,
            task_type="CAUSAL_LM", bias="none",
        )
        model = get_peft_model(base_model, config)
        _allow_frozen_adalora_copies(model)
        controller = cls(model, lora, options, schedule, init_r)
        setattr(model, CONTROLLER_ATTR, controller)
        return controller

    @property
    def config(self):
        return self.model.peft_config[ADAPTER]

    @property
    def allocator(self):
        return self.model.base_model.rankallocator

    def _set_schedule(self, total_steps: int) -> None:
        o = self.options
        self.schedule = make_schedule(total_steps, o["tinit_frac"], o["tfinal_frac"], o["reallocations"])
        cfg = self.config
        cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT = (self.schedule.total_steps, self.schedule.tinit,
                                                             self.schedule.tfinal, self.schedule.interval)

    def begin(self, max_steps: int, resume: Path | None) -> None:
        if self.finalized:
            raise RuntimeError("this AdaLoRA adapter was finalized by an earlier train(); build a new one")
        if max_steps > 0 and max_steps != self.schedule.total_steps:
            self._set_schedule(max_steps)
        self.config.orth_reg_weight = 0.0
        self.config.rank_pattern = None
        if resume is not None:
            self._load_state(resume)

    # -- per step --------------------------------------------------------------------------

    def _orth_terms(self):
        # The same selection as AdaLoraModel.forward: every lora_A / lora_B of the trained adapter.
        if getattr(self, "_terms", None) is None:
            self._terms = [(p, "A" if "lora_A" in n else "B") for n, p in self.model.base_model.model.named_parameters()
                           if ("lora_A" in n or "lora_B" in n) and ADAPTER in n]
        return self._terms

    def regularizer_value(self) -> torch.Tensor:
        terms = self._orth_terms()
        total = 0.0
        for p, kind in terms:
            cov = p @ p.T if kind == "A" else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
        return total / max(1, len(terms))

    def add_orthogonal_gradient(self) -> None:
        if self.orth_reg_weight <= 0:
            return
        terms = [(p, kind) for p, kind in self._orth_terms() if p.requires_grad and p.numel() > 0]
        if not terms:
            return
        params = [p for p, _ in terms]
        with torch.enable_grad():
            reg = self.regularizer_value()
            grads = torch.autograd.grad(self.orth_reg_weight * reg, params, allow_unused=True)
        self.last_orth_reg = float(reg.detach())
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def before_optimizer_step(self, step: int) -> None:
        self.add_orthogonal_gradient()

    def after_optimizer_step(self, step: int, optimizer) -> None:
        cfg = self.config
        cfg.rank_pattern = self.current_pattern
        before = self.current_pattern
        self.model.base_model.update_and_allocate(step)
        pattern = cfg.rank_pattern
        cfg.rank_pattern = None
        if step == self.schedule.budget_end:
            self.final_allocation = "scheduled"
        if pattern is not None and pattern is not before:
            self.current_pattern = pattern
            self.allocations += 1
            self.history.append({"step": step, "total_rank": self.total_rank(), "trainable_parameters":
                                 self.trainable_budget()})

    # -- budget and report -------------------------------------------------------------------

    def _layers(self):
        return _lora_layers(self.model)

    def module_ranks(self) -> dict[str, int]:
        ranks = {}
        for key, m in self._layers():
            name = f"{key}.lora_E.{ADAPTER}"
            pattern = self.current_pattern
            if pattern is None and self.finalized and self.config.rank_pattern is not None:
                pattern = {f"{k}.{ADAPTER}" if not k.endswith(f".{ADAPTER}") else k: v
                           for k, v in self.config.rank_pattern.items()}
            if pattern is not None and name in pattern:
                ranks[key] = int(sum(bool(x) for x in pattern[name]))
            else:
                ranks[key] = int(m.lora_E[ADAPTER].shape[0])
        return ranks

    def rank_pattern(self) -> dict[str, int]:
        return self.module_ranks()

    def total_rank(self) -> int:
        return sum(self.module_ranks().values())

    def trainable_budget(self) -> int:
        shapes = {key: (m.in_features, m.out_features) for key, m in self._layers()}
        return sum(r * (shapes[k][0] + shapes[k][1] + 1) for k, r in self.module_ranks().items())

    def report(self) -> dict:
        ranks = self.module_ranks()
        return {
            "adapter": "adalora",
            "rank_pattern": ranks,
            "total_rank": sum(ranks.values()),
            "rank_budget": self.target_r * len(ranks),
            "modules": len(ranks),
            "init_r": self.init_r,
            "target_r": self.target_r,
            "trainable_parameters": self.trainable_budget(),
            "allocated_parameters": allocated_parameters(self.model),
            "peak_trainable_parameters": self.init_r * sum(m.in_features + m.out_features + 1
                                                           for _, m in self._layers()),
            "lora_equivalent_parameters": lora_equivalent_parameters(self.model, self.target_r),
            "schedule": asdict(self.schedule),
            "total_steps_requested": self.total_steps_requested,
            "allocations": self.allocations,
            "final_allocation": self.final_allocation,
            "orth_reg_weight": self.orth_reg_weight,
            "orth_reg_applied_by": "d2lora callback (gradient added before each optimizer step)",
            "last_orth_reg": self.last_orth_reg,
            "options": self.options,
            "history": self.history,
        }

    # -- checkpoint and end ------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        alloc = self.allocator
        tensors = {}
        for prefix, table in (("ipt", alloc.ipt), ("exp_avg_ipt", alloc.exp_avg_ipt), ("exp_avg_unc", alloc.exp_avg_unc)):
            for name, value in table.items():
                tensors[f"{prefix}/{name}"] = value
        meta = {"variant": self.variant, "current_pattern": self.current_pattern, "allocations": self.allocations,
                "final_allocation": self.final_allocation, "history": self.history, "schedule": asdict(self.schedule)}
        _write_state(folder, meta, tensors)

    def _load_state(self, folder: Path) -> None:
        meta, tensors = _read_state(folder)
        if meta.get("variant") != self.variant:
            raise RuntimeError(f"{folder}: adaptive state of variant {meta.get('variant')}, not {self.variant}")
        alloc = self.allocator
        alloc.reset_ipt()
        device = next(self.model.parameters()).device
        for key, value in tensors.items():
            prefix, name = key.split("/", 1)
            getattr(alloc, prefix)[name] = value.to(device)
        self.current_pattern = meta["current_pattern"]
        self.allocations = meta["allocations"]
        self.final_allocation = meta["final_allocation"]
        self.history = meta["history"]

    def finalize(self) -> None:
        """Fix the final rank pattern in the config (peft truncates the saved weights to it)."""
        if self.finalized:
            return
        if self.final_allocation is None:
            # Training stopped before step total - tfinal (fewer steps than planned): allocate the
            # target budget now from the smoothed scores gathered so far.
            if not self.allocator.exp_avg_ipt:
                raise RuntimeError("adalora: training ended before any importance score was computed")
            self.current_pattern = self.allocator.mask_to_budget(self.model.base_model.model, self.allocator.target_bgt)
            self.final_allocation = "forced at train end"
            self.allocations += 1
        cfg = self.config
        cfg.rank_pattern = self.current_pattern
        cfg.orth_reg_weight = self.orth_reg_weight
        self.finalized = True
        self.current_pattern = None


# ----------------------------------------------------------------------------------------------
# Dynamic LoRA


class _DynamicA(nn.Linear):
    """lora_A of one module: uses the first `active` rows, sees the input scaled by `input_scale`.

    The weight is the parameter peft created (same name, so checkpoints keep peft's layout).
    input_scale is a non-persistent buffer (not in peft's state dict); the controller keeps it in
    its own checkpoint state and folds it into the weight when the adapter is finalized.
    """

    def __init__(self, linear: nn.Linear, active: int, sliced: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.sliced = sliced
        self.register_buffer("input_scale", torch.ones(linear.in_features, device=linear.weight.device,
                                                       dtype=torch.float32), persistent=False)
        self.active = int(active)
        self.scaled = False
        self.collect = False
        self.sq_sum: torch.Tensor | None = None
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collect and self.training:
            with torch.no_grad():
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                sq = flat.pow(2).sum(0)
                self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
                self.count += flat.shape[0]
        weight = self.weight[: self.active] if self.sliced else self.weight
        if self.scaled:
            weight = weight * self.input_scale.to(weight.dtype)
        return F.linear(x, weight)


class _DynamicB(nn.Linear):
    """lora_B of one module: uses the first `active` columns (all of them unless sliced)."""

    def __init__(self, linear: nn.Linear, active: int, sliced: bool = False):
        nn.Module.__init__(self)
        self.sliced = sliced
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if linear.bias is not None:
            self.bias = linear.bias
        else:
            self.register_parameter("bias", None)
        self.active = int(active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : self.active] if self.sliced else self.weight, self.bias)


@dataclass
class _Slot:
    key: str
    layer: nn.Module
    a: _DynamicA
    b: _DynamicB
    ema: torch.Tensor                # (max_rank,) smoothed sensitivity per component
    protect_until: list[int]         # per component: prunable only at reallocations > this index

    @property
    def active(self) -> int:
        return self.a.active

    def set_active(self, n: int) -> None:
        self.a.active = n
        self.b.active = n

    @property
    def cost(self) -> int:
        return self.a.in_features + self.b.out_features


def plan_moves(scores: list[list[float]], active: list[int], protected: list[list[bool]], groups: list[list[int]],
               min_rank: int, max_rank: int, hysteresis: float, max_moves: list[int]) -> list[tuple[int, int, int]]:
    """Which components move where, as (donor module, donor component, receiver module).

    Within each group, repeatedly: the donor is the module whose weakest prunable active
    component has the lowest smoothed sensitivity (and which is above min_rank); the receiver is
    the module (below max_rank) whose weakest prunable component has the highest. A component
    moves only if hysteresis * receiver's weakest > donor's weakest: rank goes where the marginal
    component is clearly worth more, which is the optimality condition of keeping the highest
    scoring components under a fixed total (AdaLoRA's global threshold), plus a margin against
    churn. A module that donated this round does not receive, and the other way round.
    """
    moves: list[tuple[int, int, int]] = []
    active = list(active)
    # per module: its prunable active components sorted weakest first (score, index)
    queues = {m: sorted((scores[m][i], i) for i in range(active[m]) if not protected[m][i])
              for group in groups for m in group}
    heads = {m: 0 for m in queues}
    for group, budget in zip(groups, max_moves):
        role: dict[int, str] = {}
        for _ in range(max(0, int(budget))):
            def weakest(m):
                q = queues[m]
                return q[heads[m]] if heads[m] < len(q) else None

            donors = [(w[0], m, w[1]) for m in group
                      if role.get(m) != "receiver" and active[m] > min_rank and (w := weakest(m)) is not None]
            if not donors:
                break
            d_score, donor, component = min(donors)
            receivers = [(-w[0], m) for m in group if m != donor and role.get(m) != "donor"
                         and active[m] < max_rank and (w := weakest(m)) is not None]
            if not receivers:
                break
            neg_score, receiver = min(receivers)
            if not hysteresis * (-neg_score) > d_score:
                break
            moves.append((donor, component, receiver))
            heads[donor] += 1
            active[donor] -= 1
            active[receiver] += 1
            role[donor], role[receiver] = "donor", "receiver"
    return moves


class DynamicLoRAController:
    """Dynamic LoRA: fixed total rank, reallocated across modules by smoothed sensitivity."""

    variant = "dynamic"

    def __init__(self, model, lora: dict, options: dict, schedule: Schedule, slots: list[_Slot], max_rank: int):
        self.model = model
        self.options = dict(options)
        self.schedule = schedule
        self.slots = slots
        self.rank = int(lora["rank"])
        self.alpha = float(lora["alpha"])
        self.max_rank = max_rank
        self.min_rank = int(options["min_rank"])
        self.reallocations = 0
        self.moves_total = 0
        self.history: list[dict] = []
        self.input_scale_set_at: int | None = None
        self.collecting = False
        self.scale_summary: dict | None = None
        self.finalized = False
        self.total_steps_requested = schedule.total_steps
        self.groups = self._groups()

    @classmethod
    def build(cls, base_model, lora: dict, options: dict, total_steps: int):
        from peft import LoraConfig, get_peft_model

        r = int(lora["rank"])
        max_rank = int(math.ceil(float(options["max_rank_factor"]) * r))
        min_rank = int(options["min_rank"])
        if not 1 <= min_rank <= r < max_rank:
            raise AdaptiveAdapterError(f"dynamic: need 1 <= min_rank ({min_rank}) <= rank ({r}) < max_rank "
                                       f"({max_rank}); a saved LoRA module cannot have rank 0")
        if options["budget"] not in ("params", "rank"):
            raise AdaptiveAdapterError(f"dynamic: budget must be 'params' or 'rank', got {options['budget']!r}")
        if options["forward"] not in ("full", "active"):
            raise AdaptiveAdapterError(f"dynamic: forward must be 'full' or 'active', got {options['forward']!r}")
        if options["input_adaptation"] not in ("feature_scale", "none"):
            raise AdaptiveAdapterError(f"dynamic: input_adaptation must be 'feature_scale' or 'none', "
                                       f"got {options['input_adaptation']!r}")
        schedule = make_schedule(total_steps, options["tinit_frac"], options["tfinal_frac"], options["reallocations"])
        # Room for max_rank components; lora_alpha scaled so peft's scaling alpha'/max_rank = alpha/r.
        config = LoraConfig(r=max_rank, lora_alpha=float(lora["alpha"]) * max_rank / r,
                            lora_dropout=float(lora.get("dropout", 0.0)),
                            target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(base_model, config)
        slots = []
        layers = _lora_layers(model)
        if not layers:
            raise AdaptiveAdapterError(f"dynamic: no LoRA module matched target_modules {lora.get('target_modules')}")
        # One (modules, max_rank) table of smoothed scores; each slot holds a row view of it.
        ema = torch.zeros(len(layers), max_rank, dtype=torch.float32,
                          device=layers[0][1].lora_A[ADAPTER].weight.device)
        sliced = options["forward"] == "active"
        with torch.no_grad():
            for i, (key, layer) in enumerate(layers):
                old_a, old_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
                old_a.weight[r:] = 0.0  # dormant components are exact zeros (B starts at zero anyway)
                a, b = _DynamicA(old_a, r, sliced), _DynamicB(old_b, r, sliced)
                layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = a, b
                slots.append(_Slot(key, layer, a, b, ema[i], [-1] * max_rank))
        controller = cls(model, lora, options, schedule, slots, max_rank)
        controller.ema = ema
        setattr(model, CONTROLLER_ATTR, controller)
        return controller

    def _groups(self) -> list[list[int]]:
        if self.options["budget"] == "rank":
            return [list(range(len(self.slots)))]
        by_cost: dict[int, list[int]] = {}
        for i, slot in enumerate(self.slots):
            by_cost.setdefault(slot.cost, []).append(i)
        return [by_cost[c] for c in sorted(by_cost)]

    def begin(self, max_steps: int, resume: Path | None) -> None:
        if self.finalized:
            raise RuntimeError("this Dynamic LoRA adapter was finalized by an earlier train(); build a new one")
        if max_steps > 0 and max_steps != self.schedule.total_steps:
            o = self.options
            self.schedule = make_schedule(max_steps, o["tinit_frac"], o["tfinal_frac"], o["reallocations"])
        self.collecting = self.options["input_adaptation"] == "feature_scale" and self.schedule.tinit > 0
        for slot in self.slots:
            slot.a.collect = self.collecting
        if resume is not None:
            self._load_state(resume)

    # -- per step --------------------------------------------------------------------------

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        """Score every component from the gradients of this step (pre-update weights)."""
        if step >= self.schedule.budget_end:
            return  # ranks are frozen in the final phase; nothing reads the scores any more
        beta = float(self.options["beta"])
        a_w = [s.a.weight for s in self.slots]
        b_w = [s.b.weight for s in self.slots]
        a_g = [w.grad for w in a_w]
        b_g = [w.grad for w in b_w]
        if any(g is None for g in a_g + b_g):  # a module outside the graph this step: score the others
            for slot, ga, gb in zip(self.slots, a_g, b_g):
                if ga is not None and gb is not None:
                    inst = (slot.a.weight * ga).abs().sum(1) + (slot.b.weight * gb).abs().sum(0)
                    slot.ema.mul_(beta).add_(inst.float(), alpha=1.0 - beta)
            return
        # Batched over modules (multi-tensor kernels): few launches per step.
        pa = torch._foreach_mul(a_w, a_g)
        torch._foreach_abs_(pa)
        pb = torch._foreach_mul(b_w, b_g)
        torch._foreach_abs_(pb)
        inst = torch.stack([x.sum(1) for x in pa]) + torch.stack([x.sum(0) for x in pb])
        self.ema.mul_(beta).add_(inst.float(), alpha=1.0 - beta)

    def after_optimizer_step(self, step: int, optimizer) -> None:
        if self.collecting and step >= self.schedule.tinit - 1:
            self._set_input_scale(step, optimizer)
        if self.schedule.reallocates_at(step):
            self._reallocate(step, optimizer)

    @torch.no_grad()
    def _set_input_scale(self, step: int, optimizer) -> None:
        """s_j = (mean_k rms_k / rms_j) ** p, clipped: the A factor sees standardized channels.

        Function-preserving: A's columns are divided by the change of s (and Adam's moments are
        transformed as the reparametrization requires), so only later updates feel it.
        """
        power, clip = float(self.options["feature_power"]), float(self.options["feature_clip"])
        for slot in self.slots:
            a = slot.a
            a.collect = False
            if a.sq_sum is None or a.count == 0:
                continue
            rms = (a.sq_sum / a.count).sqrt()
            ref = rms.mean()
            if float(ref) <= 0.0:
                new = torch.ones_like(rms)
            else:
                new = (ref / rms.clamp_min(float(ref) * 1e-6)).pow(power).clamp(1.0 / clip, clip)
            ratio = (new / a.input_scale).to(a.weight.dtype)
            a.weight.div_(ratio)
            for name, value in _param_states(optimizer, a.weight).items():
                value.mul_(ratio * ratio if "sq" in name else ratio)
            a.input_scale.copy_(new)
            a.scaled = True
            a.sq_sum, a.count = None, 0
        self.collecting = False
        self.input_scale_set_at = step

    def _max_moves(self) -> list[int]:
        frac = float(self.options["max_move_frac"])
        return [max(1, math.ceil(frac * sum(self.slots[m].active for m in g))) for g in self.groups]

    @torch.no_grad()
    def _reallocate(self, step: int, optimizer) -> None:
        index = self.reallocations
        scores = torch.stack([s.ema for s in self.slots]).cpu().tolist()
        active = [s.active for s in self.slots]
        protected = [[s.protect_until[i] >= index for i in range(self.max_rank)] for s in self.slots]
        moves = plan_moves(scores, active, protected, self.groups, self.min_rank, self.max_rank,
                           float(self.options["hysteresis"]), self._max_moves())
        pruned: dict[int, list[int]] = {}
        granted: dict[int, int] = {}
        for donor, component, receiver in moves:
            pruned.setdefault(donor, []).append(component)
            granted[receiver] = granted.get(receiver, 0) + 1
        for m in sorted(set(pruned) | set(granted)):
            self._apply(m, pruned.get(m, []), granted.get(m, 0), step, index, optimizer)
        self.reallocations += 1
        self.moves_total += len(moves)
        self.history.append({"step": step, "moves": len(moves), "ranks": [s.active for s in self.slots],
                             "total_rank": sum(s.active for s in self.slots),
                             "trainable_parameters": self.trainable_budget()})

    def _apply(self, m: int, pruned: list[int], grants: int, step: int, index: int, optimizer) -> None:
        slot = self.slots[m]
        a_w, b_w = slot.a.weight, slot.b.weight
        a_states, b_states = _param_states(optimizer, a_w), _param_states(optimizer, b_w)
        device = a_w.device
        if pruned:
            idx = torch.tensor(pruned, device=device)
            a_w[idx] = 0.0
            b_w[:, idx] = 0.0
            for v in a_states.values():
                v[idx] = 0.0
            for v in b_states.values():
                v[:, idx] = 0.0
            slot.ema[idx] = 0.0
            # active components first (in their order), then the dormant slots, then the pruned
            keep = [i for i in range(slot.active) if i not in set(pruned)]
            order = keep + list(range(slot.active, self.max_rank)) + sorted(pruned)
            perm = torch.tensor(order, device=device)
            a_w.copy_(a_w[perm])
            b_w.copy_(b_w[:, perm])
            for v in a_states.values():
                v.copy_(v[perm])
            for v in b_states.values():
                v.copy_(v[:, perm])
            slot.ema.copy_(slot.ema[perm])
            slot.protect_until = [slot.protect_until[i] for i in order]
            for i in range(len(keep), self.max_rank):
                slot.protect_until[i] = -1
            slot.set_active(len(keep))
        if grants:
            n = slot.active
            gen = torch.Generator().manual_seed(int(self.options["seed"]) * 1_000_003 + step * 1_009 + m)
            bound = 1.0 / math.sqrt(slot.a.in_features)  # peft's kaiming_uniform(a=sqrt(5)) on lora_A
            new_rows = (torch.rand(grants, slot.a.in_features, generator=gen) * 2 - 1) * bound
            a_w[n:n + grants] = new_rows.to(device=device, dtype=a_w.dtype)
            b_w[:, n:n + grants] = 0.0
            for name, v in a_states.items():
                v[n:n + grants] = v[:n].mean(0, keepdim=True) if "sq" in name else 0.0
            for name, v in b_states.items():
                v[:, n:n + grants] = v[:, :n].mean(1, keepdim=True) if "sq" in name else 0.0
            slot.ema[n:n + grants] = 0.0
            for i in range(n, n + grants):
                slot.protect_until[i] = index + int(self.options["grace"])
            slot.set_active(n + grants)

    # -- budget and report -------------------------------------------------------------------

    def rank_pattern(self) -> dict[str, int]:
        return {s.key: s.active for s in self.slots}

    def trainable_budget(self) -> int:
        return sum(s.active * s.cost for s in self.slots)

    def report(self) -> dict:
        ranks = self.rank_pattern()
        return {
            "adapter": "dynamic",
            "rank_pattern": ranks,
            "total_rank": sum(ranks.values()),
            "rank_budget": self.rank * len(ranks),
            "modules": len(ranks),
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
            "trainable_parameters": self.trainable_budget(),
            "allocated_parameters": self.max_rank * sum(s.cost for s in self.slots) if not self.finalized
            else self.trainable_budget(),
            "peak_allocated_parameters": self.max_rank * sum(s.cost for s in self.slots),
            "lora_equivalent_parameters": self.rank * sum(s.cost for s in self.slots),
            "module_importance": {s.key: float(s.ema[: s.active].sum()) for s in self.slots},
            "groups": [[self.slots[m].key for m in g] for g in self.groups],
            "schedule": asdict(self.schedule),
            "total_steps_requested": self.total_steps_requested,
            "reallocations": self.reallocations,
            "moves": self.moves_total,
            "input_scale": {"set_at_step": self.input_scale_set_at, **self._scale_summary(),
                            "folded_into_lora_A": self.finalized},
            "options": self.options,
            "history": self.history,
        }

    def _scale_summary(self) -> dict:
        if self.scale_summary is not None:
            return self.scale_summary
        scales = torch.cat([s.a.input_scale for s in self.slots])
        return {"min": float(scales.min()), "max": float(scales.max()),
                "mean_abs_log": float(scales.log().abs().mean())}

    # -- checkpoint and end ------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        tensors = {}
        for s in self.slots:
            tensors[f"{s.key}/ema"] = s.ema.clone()
            tensors[f"{s.key}/input_scale"] = s.a.input_scale
            if s.a.sq_sum is not None:
                tensors[f"{s.key}/sq_sum"] = s.a.sq_sum
        meta = {
            "variant": self.variant,
            "active": {s.key: s.active for s in self.slots},
            "protect_until": {s.key: s.protect_until for s in self.slots},
            "count": {s.key: s.a.count for s in self.slots},
            "scaled": {s.key: s.a.scaled for s in self.slots},
            "collect": {s.key: s.a.collect for s in self.slots},
            "reallocations": self.reallocations, "moves_total": self.moves_total, "history": self.history,
            "input_scale_set_at": self.input_scale_set_at, "collecting": self.collecting,
            "schedule": asdict(self.schedule),
        }
        _write_state(folder, meta, tensors)

    def _load_state(self, folder: Path) -> None:
        meta, tensors = _read_state(folder)
        if meta.get("variant") != self.variant:
            raise RuntimeError(f"{folder}: adaptive state of variant {meta.get('variant')}, not {self.variant}")
        for s in self.slots:
            s.set_active(int(meta["active"][s.key]))
            s.protect_until = list(meta["protect_until"][s.key])
            s.ema.copy_(tensors[f"{s.key}/ema"].to(s.ema.device))
            s.a.input_scale.copy_(tensors[f"{s.key}/input_scale"].to(s.a.input_scale.device))
            s.a.scaled = bool(meta["scaled"][s.key])
            s.a.collect = bool(meta["collect"][s.key])
            s.a.count = int(meta["count"][s.key])
            sq = tensors.get(f"{s.key}/sq_sum")
            s.a.sq_sum = sq.to(s.a.input_scale.device) if sq is not None else None
        self.reallocations = meta["reallocations"]
        self.moves_total = meta["moves_total"]
        self.history = meta["history"]
        self.input_scale_set_at = meta["input_scale_set_at"]
        self.collecting = bool(meta["collecting"])

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the model into a standard peft LoRA: truncate every module to its active rank,
        fold the input scale into A, and record the per-module rank_pattern / alpha_pattern
        (alpha_m = alpha * r_m / r keeps each module's scaling at alpha / r)."""
        if self.finalized:
            return
        self.scale_summary = self._scale_summary()
        ranks, alphas = {}, {}
        for s in self.slots:
            n = s.active
            a_w = (s.a.weight[:n] * s.a.input_scale.to(s.a.weight.dtype)).detach().clone()
            b_w = s.b.weight[:, :n].detach().clone()
            new_a = nn.Linear(s.a.in_features, n, bias=False, device=a_w.device, dtype=a_w.dtype)
            new_b = nn.Linear(n, s.b.out_features, bias=s.b.bias is not None, device=b_w.device, dtype=b_w.dtype)
            new_a.weight.copy_(a_w)
            new_b.weight.copy_(b_w)
            if s.b.bias is not None:
                new_b.bias.copy_(s.b.bias)
            trainable = s.a.weight.requires_grad
            new_a.requires_grad_(trainable)
            new_b.requires_grad_(trainable)
            s.layer.lora_A[ADAPTER], s.layer.lora_B[ADAPTER] = new_a, new_b
            alpha_m = self.alpha * n / self.rank
            s.layer.r[ADAPTER] = n
            s.layer.lora_alpha[ADAPTER] = alpha_m
            s.layer.scaling[ADAPTER] = alpha_m / n
            ranks[s.key], alphas[s.key] = n, alpha_m
            s.a, s.b = _DynamicA(new_a, n), _DynamicB(new_b, n)  # wrappers for reporting only, not in the model
            s.a.input_scale.fill_(1.0)
        config = copy.deepcopy(self.model.peft_config[ADAPTER])  # DPO's "ref" adapter shares the object
        config.r = self.rank
        config.lora_alpha = self.alpha
        config.rank_pattern = ranks
        config.alpha_pattern = alphas
        self.model.peft_config[ADAPTER] = config
        self.finalized = True
