"""Dynamic LoRA (docs/dynamic_lora.md): a fixed total rank, moved between modules by smoothed
sensitivity, with the input-feature scale of A set once after the warm-up steps."""

from __future__ import annotations

import copy
import math

import torch
from peft import get_peft_model
from torch import nn

from d2lora.settings import LoraShape
from d2lora.training.adapters import lora_config
from d2lora.training.adaptive.base import (
    ADAPTER,
    CONTROLLER_ATTR,
    AdaptiveAdapterError,
    AdaptiveController,
    Schedule,
    lora_layers,
    make_schedule,
    param_states,
)
from d2lora.training.adaptive.dynamic_modules import DynamicA, DynamicB, Slot
from d2lora.training.adaptive.rank_moves import plan_moves

DEFAULTS = {
    "max_rank_factor": 2.0,  # room per module: max_rank = ceil(2 r)
    "min_rank": 1,
    "tinit_frac": 0.1,
    "tfinal_frac": 0.2,
    "reallocations": 10,
    "beta": 0.85,  # EMA of the component sensitivity (AdaLoRA's beta1)
    "hysteresis": 0.5,  # move only if receiver's weakest * 0.5 > donor's weakest
    "max_move_frac": 0.1,  # at most 10% of a group's rank moves per reallocation
    "grace": 2,  # a granted component cannot be pruned for 2 reallocations
    "budget": "params",  # "params": reallocate within equal-cost groups; "rank": one group
    "input_adaptation": "feature_scale",  # or "none"
    "forward": "full",  # "full": all max_rank columns (dormant ones are exact zeros);
    # "active": only the active prefix (fewer FLOPs, more kernels)
    "feature_power": 0.5,
    "feature_clip": 10.0,
    "seed": 0,
}


class DynamicLoRAController(AdaptiveController):
    """Dynamic LoRA: fixed total rank, reallocated across modules by smoothed sensitivity."""

    variant = "dynamic"
    label = "Dynamic LoRA"

    def __init__(
        self,
        model,
        lora: LoraShape,
        options: dict,
        schedule: Schedule,
        slots: list[Slot],
        max_rank: int,
        ema: torch.Tensor,
    ):
        super().__init__(model, lora.rank, options, schedule)
        self.slots = slots
        self.ema = ema  # (modules, max_rank); each slot's ema is a row view of it
        self.alpha = float(lora.alpha)
        self.max_rank = max_rank
        self.min_rank = int(options["min_rank"])
        self.reallocations = 0
        self.moves_total = 0
        self.input_scale_set_at: int | None = None
        self.collecting = False
        self.scale_summary: dict | None = None
        self.groups = self._groups()

    @classmethod
    def build(cls, base_model, lora: LoraShape, options: dict, total_steps: int):
        r = lora.rank
        max_rank = int(math.ceil(float(options["max_rank_factor"]) * r))
        min_rank = int(options["min_rank"])
        if not 1 <= min_rank <= r < max_rank:
            raise AdaptiveAdapterError(
                f"dynamic: need 1 <= min_rank ({min_rank}) <= rank ({r}) < max_rank "
                f"({max_rank}); a saved LoRA module cannot have rank 0"
            )
        if options["budget"] not in ("params", "rank"):
            raise AdaptiveAdapterError(f"dynamic: budget must be 'params' or 'rank', got {options['budget']!r}")
        if options["forward"] not in ("full", "active"):
            raise AdaptiveAdapterError(f"dynamic: forward must be 'full' or 'active', got {options['forward']!r}")
        if options["input_adaptation"] not in ("feature_scale", "none"):
            raise AdaptiveAdapterError(
                f"dynamic: input_adaptation must be 'feature_scale' or 'none', got {options['input_adaptation']!r}"
            )
        schedule = make_schedule(total_steps, options["tinit_frac"], options["tfinal_frac"], options["reallocations"])
        # Room for max_rank components; lora_alpha scaled so peft's scaling alpha'/max_rank = alpha/r.
        model = get_peft_model(base_model, lora_config(lora, rank=max_rank))
        slots = []
        layers = lora_layers(model)
        if not layers:
            raise AdaptiveAdapterError(f"dynamic: no LoRA module matched target_modules {lora.target_modules}")
        # One (modules, max_rank) table of smoothed scores; each slot holds a row view of it.
        ema = torch.zeros(len(layers), max_rank, dtype=torch.float32, device=layers[0][1].lora_A[ADAPTER].weight.device)
        sliced = options["forward"] == "active"
        with torch.no_grad():
            for i, (key, layer) in enumerate(layers):
                old_a, old_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
                old_a.weight[r:] = 0.0  # dormant components are exact zeros (B starts at zero anyway)
                a, b = DynamicA(old_a, r, sliced), DynamicB(old_b, r, sliced)
                layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = a, b
                slots.append(Slot(key, layer, a, b, ema[i], [-1] * max_rank))
        controller = cls(model, lora, options, schedule, slots, max_rank, ema)
        setattr(model, CONTROLLER_ATTR, controller)
        return controller

    def _groups(self) -> list[list[int]]:
        if self.options["budget"] == "rank":
            return [list(range(len(self.slots)))]
        by_cost: dict[int, list[int]] = {}
        for i, slot in enumerate(self.slots):
            by_cost.setdefault(slot.cost, []).append(i)
        return [by_cost[c] for c in sorted(by_cost)]

    def _start(self) -> None:
        self.collecting = self.options["input_adaptation"] == "feature_scale" and self.schedule.tinit > 0
        for slot in self.slots:
            slot.a.collect = self.collecting

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
            for name, value in param_states(optimizer, a.weight).items():
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
        moves = plan_moves(
            scores,
            active,
            protected,
            self.groups,
            self.min_rank,
            self.max_rank,
            float(self.options["hysteresis"]),
            self._max_moves(),
        )
        pruned: dict[int, list[int]] = {}
        granted: dict[int, int] = {}
        for donor, component, receiver in moves:
            pruned.setdefault(donor, []).append(component)
            granted[receiver] = granted.get(receiver, 0) + 1
        for m in sorted(set(pruned) | set(granted)):
            self._apply(m, pruned.get(m, []), granted.get(m, 0), step, index, optimizer)
        self.reallocations += 1
        self.moves_total += len(moves)
        self.history.append(
            {
                "step": step,
                "moves": len(moves),
                "ranks": [s.active for s in self.slots],
                "total_rank": sum(s.active for s in self.slots),
                "trainable_parameters": self.trainable_budget(),
            }
        )

    def _apply(self, m: int, pruned: list[int], grants: int, step: int, index: int, optimizer) -> None:
        slot = self.slots[m]
        a_w, b_w = slot.a.weight, slot.b.weight
        a_states, b_states = param_states(optimizer, a_w), param_states(optimizer, b_w)
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
            a_w[n : n + grants] = new_rows.to(device=device, dtype=a_w.dtype)
            b_w[:, n : n + grants] = 0.0
            for name, v in a_states.items():
                v[n : n + grants] = v[:n].mean(0, keepdim=True) if "sq" in name else 0.0
            for name, v in b_states.items():
                v[:, n : n + grants] = v[:, :n].mean(1, keepdim=True) if "sq" in name else 0.0
            slot.ema[n : n + grants] = 0.0
            for i in range(n, n + grants):
                slot.protect_until[i] = index + int(self.options["grace"])
            slot.set_active(n + grants)

    # -- budget and report -------------------------------------------------------------------

    def rank_pattern(self) -> dict[str, int]:
        return {s.key: s.active for s in self.slots}

    def trainable_budget(self) -> int:
        return sum(s.active * s.cost for s in self.slots)

    def _report_details(self) -> dict:
        return {
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
            "trainable_parameters": self.trainable_budget(),
            "allocated_parameters": self.max_rank * sum(s.cost for s in self.slots)
            if not self.finalized
            else self.trainable_budget(),
            "peak_allocated_parameters": self.max_rank * sum(s.cost for s in self.slots),
            "lora_equivalent_parameters": self.rank * sum(s.cost for s in self.slots),
            "module_importance": {s.key: float(s.ema[: s.active].sum()) for s in self.slots},
            "groups": [[self.slots[m].key for m in g] for g in self.groups],
            "reallocations": self.reallocations,
            "moves": self.moves_total,
            "input_scale": {
                "set_at_step": self.input_scale_set_at,
                **self._scale_summary(),
                "folded_into_lora_A": self.finalized,
            },
        }

    def _scale_summary(self) -> dict:
        if self.scale_summary is not None:
            return self.scale_summary
        scales = torch.cat([s.a.input_scale for s in self.slots])
        return {
            "min": float(scales.min()),
            "max": float(scales.max()),
            "mean_abs_log": float(scales.log().abs().mean()),
        }

    # -- checkpoint and end ------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {}
        for s in self.slots:
            tensors[f"{s.key}/ema"] = s.ema.clone()
            tensors[f"{s.key}/input_scale"] = s.a.input_scale
            if s.a.sq_sum is not None:
                tensors[f"{s.key}/sq_sum"] = s.a.sq_sum
        meta = {
            "active": {s.key: s.active for s in self.slots},
            "protect_until": {s.key: s.protect_until for s in self.slots},
            "count": {s.key: s.a.count for s in self.slots},
            "scaled": {s.key: s.a.scaled for s in self.slots},
            "collect": {s.key: s.a.collect for s in self.slots},
            "reallocations": self.reallocations,
            "moves_total": self.moves_total,
            "history": self.history,
            "input_scale_set_at": self.input_scale_set_at,
            "collecting": self.collecting,
        }
        return meta, tensors

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
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
    def _finalize(self) -> None:
        """Turn the model into a standard peft LoRA: truncate every module to its active rank,
        fold the input scale into A, and record the per-module rank_pattern / alpha_pattern
        (alpha_m = alpha * r_m / r keeps each module's scaling at alpha / r)."""
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
            s.a, s.b = DynamicA(new_a, n), DynamicB(new_b, n)  # wrappers for reporting only, not in the model
            s.a.input_scale.fill_(1.0)
        config = copy.deepcopy(self.model.peft_config[ADAPTER])  # DPO's "ref" adapter shares the object
        config.r = self.rank
        config.lora_alpha = self.alpha
        config.rank_pattern = ranks
        config.alpha_pattern = alphas
        self.model.peft_config[ADAPTER] = config
