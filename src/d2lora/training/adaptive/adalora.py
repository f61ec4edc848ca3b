"""peft's AdaLoRA as an adaptation variant, at LoRA's rank budget."""

from __future__ import annotations

import copy
import math

import torch
from peft import AdaLoraConfig, get_peft_model

from d2lora.settings import LoraShape
from d2lora.training.adaptive.base import (
    ADAPTER,
    CONTROLLER_ATTR,
    AdaptiveAdapterError,
    AdaptiveController,
    Schedule,
    allocated_parameters,
    lora_equivalent_parameters,
    lora_layers,
    make_schedule,
)

DEFAULTS = {
    "init_r_factor": 1.5,  # init_r = ceil(1.5 r) (peft's defaults 12 -> 8 have this ratio)
    "tinit_frac": 0.1,
    "tfinal_frac": 0.2,
    "reallocations": 10,  # deltaT = budgeting steps / reallocations
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
}


def _allow_frozen_adalora_copies(peft_model) -> None:
    """DPOTrainer copies the trainable adapter into a frozen "ref" adapter with the same config
    (`model.add_adapter("ref", model.peft_config["default"])`). AdaLoraModel refuses a second
    adapter whose config is not in inference mode, so the copy is added in inference mode."""
    original = peft_model.add_adapter

    def add_adapter(adapter_name, peft_config, *args, **kwargs):
        trainable = [name for name, cfg in peft_model.peft_config.items() if not cfg.inference_mode]
        if isinstance(peft_config, AdaLoraConfig) and not peft_config.inference_mode and trainable:
            peft_config = copy.deepcopy(peft_config)
            peft_config.inference_mode = True
        return original(adapter_name, peft_config, *args, **kwargs)

    peft_model.add_adapter = add_adapter


class AdaLoRAController(AdaptiveController):
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
    label = "AdaLoRA"

    def __init__(self, model, rank: int, options: dict, schedule: Schedule, init_r: int):
        super().__init__(model, rank, options, schedule)
        self.init_r = init_r
        self.orth_reg_weight = float(options["orth_reg_weight"])
        self.current_pattern = None  # {lora_E param name: [bool]*init_r} of the latest allocation
        self.final_allocation = None  # "scheduled" | "forced at train end"
        self.allocations = 0
        self.last_orth_reg = None
        self._terms = None

    @classmethod
    def build(cls, base_model, lora: LoraShape, options: dict, total_steps: int):
        r = lora.rank
        init_r = int(math.ceil(float(options["init_r_factor"]) * r))
        if init_r <= r:
            raise AdaptiveAdapterError(
                f"adalora: init_r ({init_r}) must exceed the target rank {r}: "
                "peft's allocator masks init_bgt - budget triplets and 0 is refused"
            )
        schedule = make_schedule(total_steps, options["tinit_frac"], options["tfinal_frac"], options["reallocations"])
        config = AdaLoraConfig(
            init_r=init_r,
            target_r=r,
            lora_alpha=float(lora.alpha) * init_r / r,
            lora_dropout=float(lora.dropout),
            target_modules=lora.target_modules,
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            deltaT=schedule.interval,
            total_step=schedule.total_steps,
            beta1=float(options["beta1"]),
            beta2=float(options["beta2"]),
            orth_reg_weight=0.0,
            task_type="CAUSAL_LM",
            bias="none",
        )
        model = get_peft_model(base_model, config)
        _allow_frozen_adalora_copies(model)
        controller = cls(model, r, options, schedule, init_r)
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
        cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT = (
            self.schedule.total_steps,
            self.schedule.tinit,
            self.schedule.tfinal,
            self.schedule.interval,
        )

    def _set_schedule(self, schedule: Schedule) -> None:
        self.schedule = schedule
        cfg = self.config
        cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT = (
            schedule.total_steps,
            schedule.tinit,
            schedule.tfinal,
            schedule.interval,
        )

    def _start(self) -> None:
        self.config.orth_reg_weight = 0.0
        self.config.rank_pattern = None

    # -- per step --------------------------------------------------------------------------

    def _orth_terms(self):
        # The same selection as AdaLoraModel.forward: every lora_A / lora_B of the trained adapter.
        if self._terms is None:
            self._terms = [
                (p, "A" if "lora_A" in n else "B")
                for n, p in self.model.base_model.model.named_parameters()
                if ("lora_A" in n or "lora_B" in n) and ADAPTER in n
            ]
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
            self.history.append(
                {"step": step, "total_rank": self.total_rank(), "trainable_parameters": self.trainable_budget()}
            )

    # -- budget and report -------------------------------------------------------------------

    def _layers(self):
        return lora_layers(self.model)

    def module_ranks(self) -> dict[str, int]:
        ranks = {}
        for key, m in self._layers():
            name = f"{key}.lora_E.{ADAPTER}"
            pattern = self.current_pattern
            if pattern is None and self.finalized and self.config.rank_pattern is not None:
                pattern = {
                    f"{k}.{ADAPTER}" if not k.endswith(f".{ADAPTER}") else k: v
                    for k, v in self.config.rank_pattern.items()
                }
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

    def _report_details(self) -> dict:
        return {
            "init_r": self.init_r,
            "target_r": self.rank,
            "trainable_parameters": self.trainable_budget(),
            "allocated_parameters": allocated_parameters(self.model),
            "peak_trainable_parameters": self.init_r
            * sum(m.in_features + m.out_features + 1 for _, m in self._layers()),
            "lora_equivalent_parameters": lora_equivalent_parameters(self.model, self.rank),
            "allocations": self.allocations,
            "final_allocation": self.final_allocation,
            "orth_reg_weight": self.orth_reg_weight,
            "orth_reg_applied_by": "d2lora callback (gradient added before each optimizer step)",
            "last_orth_reg": self.last_orth_reg,
        }

    # -- checkpoint and end ------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        alloc = self.allocator
        tensors = {}
        for prefix, table in (
            ("ipt", alloc.ipt),
            ("exp_avg_ipt", alloc.exp_avg_ipt),
            ("exp_avg_unc", alloc.exp_avg_unc),
        ):
            for name, value in table.items():
                tensors[f"{prefix}/{name}"] = value
        meta = {
            "current_pattern": self.current_pattern,
            "allocations": self.allocations,
            "final_allocation": self.final_allocation,
            "history": self.history,
        }
        return meta, tensors

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
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

    def _finalize(self) -> None:
        """Fix the final rank pattern in the config (peft truncates the saved weights to it)."""
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
        self.current_pattern = None
