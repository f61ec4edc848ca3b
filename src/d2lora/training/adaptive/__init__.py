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

Modules: base (schedule, checkpoint state, the controller life cycle both variants share),
adalora, dynamic (+ dynamic_modules, rank_moves), callback. Only torch, transformers, peft (and
safetensors, a dependency of both) are imported, so benchmarks/dynamic_lora_overhead.py can use
this package without the rest of d2lora.
"""

from __future__ import annotations

from peft import get_peft_model

from d2lora.settings import LoraShape
from d2lora.training.adapters import lora_config
from d2lora.training.adaptive import adalora, dynamic
from d2lora.training.adaptive.base import (
    ADAPTER,
    CONTROLLER_ATTR,
    AdaptiveAdapterError,
    allocated_parameters,
    lora_layers,
)
from d2lora.training.adaptive.callback import AdaptiveRankCallback

CONTROLLERS = {"adalora": adalora.AdaLoRAController, "dynamic": dynamic.DynamicLoRAController}
DEFAULTS = {"adalora": adalora.DEFAULTS, "dynamic": dynamic.DEFAULTS}


def _merge_options(adapter: str, variant: dict) -> dict:
    known = DEFAULTS[adapter]
    unknown = sorted(set(variant) - set(known) - {"adapter"})
    if unknown:
        raise AdaptiveAdapterError(f"variant '{adapter}': unknown option(s) {unknown}; known: {sorted(known)}")
    return {**known, **{k: v for k, v in variant.items() if k != "adapter"}}


def _controller(model):
    return getattr(model, CONTROLLER_ATTR, None)


def adaptive_adapter(base_model, lora: LoraShape | dict, variant: dict, total_steps: int):
    """A fresh adapter of the given variant on `base_model` and the callbacks that drive it.

    lora: {rank, alpha, dropout, target_modules} (the pipeline's training.lora);
    variant: {"adapter": "lora" | "adalora" | "dynamic", **options} (defaults: DEFAULTS);
    total_steps: the number of optimizer steps planned. It only has to be positive here: at
    on_train_begin the callbacks re-derive the schedule from the Trainer's own state.max_steps.

    Pass every returned callback to the Trainer (before any callback that marks a checkpoint
    complete in on_save: ours write their state into the checkpoint there).
    """
    lora = LoraShape.of(lora, "training.lora")
    variant = dict(variant or {})
    adapter = variant.setdefault("adapter", "lora")
    if adapter == "lora":
        if set(variant) - {"adapter"}:
            raise AdaptiveAdapterError(f"variant 'lora' takes no options, got {sorted(set(variant) - {'adapter'})}")
        return get_peft_model(base_model, lora_config(lora)), []
    if adapter not in CONTROLLERS:
        raise AdaptiveAdapterError(f"unknown adapter variant '{adapter}' (known: lora, {', '.join(CONTROLLERS)})")
    controller = CONTROLLERS[adapter].build(base_model, lora, _merge_options(adapter, variant), total_steps)
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
    return sum(m.lora_A[ADAPTER].weight.numel() + m.lora_B[ADAPTER].weight.numel() for _, m in lora_layers(model))


def rank_pattern(model) -> dict[str, int]:
    """Per-module rank of the adapter as it stands (after training: as it is saved)."""
    controller = _controller(model)
    if controller is not None:
        return controller.rank_pattern()
    return {key: int(m.r[ADAPTER]) for key, m in lora_layers(model)}


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
