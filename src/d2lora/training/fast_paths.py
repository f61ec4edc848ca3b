"""Training speed settings that change the arithmetic of a step, not what it computes.

- `cast_adapter_inputs: false`: under bf16 autocast, peft first copies a LoRA layer's input to the
  adapter's float32 and autocast then copies it back to bf16 for the branch's matmul. Switched off,
  the branch takes the base layer's bf16 activations as they are: the same bf16 products, and two
  full-width copies (and their backward) fewer per projection, which at the 8B shape were a large
  part of a step's element-wise kernels (benchmarks/RESULTS.md, Round 7). Without autocast the
  input must match the adapter's dtype, so the cast then stays.
- `fuse_adapter_add: true`: peft adds the branch to the base layer's output as
  `result + lora_B(h) * scaling`: a matmul, a multiply (by 1.0 at Table 2's alpha = r) and an add,
  and the multiply again backward. Here the B matmul adds into the output itself,
  `addmm(result, h, B^T, alpha=scaling)`: one call for three, and autograd skips the multiply by an
  alpha of 1. The same sum with one rounding instead of three, so bf16 results differ within
  rounding (float32: tests). Through peft's extension point for a layer's forward (LoraVariant),
  only on plain LoRA layers (no DoRA or other variant, no lora_bias, not dynamic LoRA's sliced
  factors: a layer whose B is no longer a plain linear layer takes peft's sum).
- `compile_layers: true`: each decoder layer compiled in place (torch.compile, regional: the layers
  share one code object, so the same graphs serve all of them), which fuses the LoRA branch's small
  element-wise kernels. The first steps pay the compilation. Compiled with dynamic shapes from the
  start, so row lengths need no graph of their own: two graphs on the CPU (the first layer's input
  needs no grad), four on CUDA (inductor also splits lengths that are a multiple of 8 from the rest),
  where a static first compile recompiles for lengths too and reaches dynamo's recompile limit.
  Inductor is asked to round each fused operation's bf16 output as eager does
  (`emulate_precision_casts`): by default it keeps a fused kernel's intermediates in float32, and on
  CUDA that made the compiled forward of a trained adapter 0.03 lower in loss than its eager forward
  at the 8B shape, once B was not zero (a near-zero branch survives unrounded sums and is rounded
  away in eager's). Rounded, the two agree to 0.001 on the GPU and bit for bit on a Xeon CPU (tests),
  and a compiled step of 16 packed rows at the 8B shape took 0.296 s against 0.280 s unrounded and
  0.393 s eager (benchmarks/RESULTS.md, Rounds 21-24). Compiling costs a job a fixed ~70-100 s
  there, so `compile_layers_min_steps` leaves cells shorter than that many optimizer steps eager.
- `flex_attention: true`: the base model's attention through FlexAttention instead of SDPA. What it
  is for is `padding_free`: a micro-batch of 8 real-length rows, each padded to the batch's longest,
  is ~30 % padding (benchmarks/batch_padding.py), and padding-free batches drop it, but transformers
  gives SDPA their packed-sequence mask as an explicit tensor, which rules out its flash kernel
  (0.73x at the 8B shape). FlexAttention takes the same mask as a block mask and skips the blocks
  between rows. transformers compiles flex_attention once per process; the model's other code stays
  eager. At the 8B shape padding-free batches through it took 34 % less memory and no less time: the
  eager step follows its operator calls, not its tokens (benchmarks/RESULTS.md, Round 20). The memory
  it frees holds 16 packed rows in one micro-batch instead of two of 8, half the calls per token:
  1.47x the padded step, 35 % MFU (Round 21).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer

from d2lora.grid import FLEX_TRAINING_ON_CPU
from d2lora.settings import TrainingHparams


def keep_adapter_inputs(model) -> int:
    """LoRA layers take their input in the dtype it comes in (peft's cast_input_dtype_enabled off);
    the number of layers changed."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


class FusedAdapterAdd(LoraVariant):
    """Plain LoRA whose B matmul adds into the base layer's output (addmm); merging is peft's own."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        return None

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_b = module.lora_B[active_adapter]
        hidden = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        scaling = module.scaling[active_adapter]
        unfusable = not _plain_linear(lora_b) or (
            # addmm takes one dtype; peft's own sum casts the branch to the output's type
            not torch.is_autocast_enabled(result.device.type) and hidden.dtype != result.dtype
        )
        if unfusable:
            return result + lora_b(hidden) * scaling
        fused = torch.addmm(
            result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), lora_b.weight.t(), alpha=scaling
        )
        return fused.view(result.shape)


def _plain_linear(module) -> bool:
    """An nn.Linear itself without bias, whose output is `x @ weight.T` (not dynamic LoRA's sliced B)."""
    return type(module) is torch.nn.Linear and module.bias is None


def fuse_adapter_add(model) -> int:
    """FusedAdapterAdd on every plain LoRA linear layer's adapters; the number of layers changed."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        plain = [
            name
            for name in module.lora_A
            if name not in module.lora_variant
            and not module.lora_bias.get(name, False)
            and _plain_linear(module.lora_B[name])
        ]
        for name in plain:
            module.lora_variant[name] = FusedAdapterAdd()
        changed += bool(plain)
    return changed


def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model: the classes it names in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


# Inductor's settings for compiled decoder layers: eager's bf16 rounding after every fused op, so a
# compiled step computes what the eager one does (module-level so a benchmark can measure without it).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("compile_layers: the model names no decoder layer class (_no_split_modules)")
    # Only inductor takes options; the tests' "eager" backend runs dynamo's graphs as they are.
    options = {"options": dict(COMPILE_OPTIONS)} if backend == "inductor" else {}
    for layer in layers:
        layer.compile(backend=backend, dynamic=True, **options)
    return len(layers)


def use_flex_attention(model) -> str:
    """The model's attention set to transformers' flex_attention; the implementation now in use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.device.type == "cpu":
        raise ValueError(f"flex_attention: {FLEX_TRAINING_ON_CPU}")
    base.set_attn_implementation("flex_attention")
    return base.config._attn_implementation


def apply(model, hp: TrainingHparams, steps: int | None = None) -> dict:
    """The settings as `hp` has them (bf16 already resolved for the device) for a cell of `steps`
    optimizer steps (None: unknown, no step threshold applies); what took effect, and why."""
    record = {}
    if hp.cast_adapter_inputs:
        record["cast_adapter_inputs"] = {"setting": True, "layers": 0}
    elif hp.bf16 is not True:
        record["cast_adapter_inputs"] = {"setting": False, "layers": 0, "reason": "kept: bf16 autocast is off"}
    else:
        record["cast_adapter_inputs"] = {"setting": False, "layers": keep_adapter_inputs(model)}
    record["fuse_adapter_add"] = {
        "setting": hp.fuse_adapter_add,
        "layers": fuse_adapter_add(model) if hp.fuse_adapter_add else 0,
    }
    record["flex_attention"] = {"setting": hp.flex_attention}
    if hp.flex_attention:
        record["flex_attention"]["attention"] = use_flex_attention(model)
    record["compile_layers"] = {"setting": hp.compile_layers, "layers": 0}
    if hp.compiles_layers(steps):
        record["compile_layers"].update(layers=compile_decoder_layers(model), inductor=dict(COMPILE_OPTIONS))
    elif hp.compile_layers:
        record["compile_layers"]["reason"] = (
            f"not compiled: {steps} optimizer steps, under compile_layers_min_steps={hp.compile_layers_min_steps}"
        )
    return record
