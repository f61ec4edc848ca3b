"""The Trainer callback that drives an adaptive-rank controller."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


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
