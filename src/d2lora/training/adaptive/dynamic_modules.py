"""Dynamic LoRA's factors: peft's lora_A / lora_B weights behind a forward that uses only the
active components, and the per-module slot the controller keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DynamicA(nn.Linear):
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
        self.register_buffer(
            "input_scale",
            torch.ones(linear.in_features, device=linear.weight.device, dtype=torch.float32),
            persistent=False,
        )
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


class DynamicB(nn.Linear):
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
class Slot:
    key: str
    layer: nn.Module
    a: DynamicA
    b: DynamicB
    ema: torch.Tensor  # (max_rank,) smoothed sensitivity per component
    protect_until: list[int]  # per component: prunable only at reallocations > this index

    @property
    def active(self) -> int:
        return self.a.active

    def set_active(self, n: int) -> None:
        self.a.active = n
        self.b.active = n

    @property
    def cost(self) -> int:
        return self.a.in_features + self.b.out_features
