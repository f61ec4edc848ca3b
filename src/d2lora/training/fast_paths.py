"""Training speed settings that change the arithmetic of a step, not what it computes.

- `cast_adapter_inputs: false`: under bf16 autocast, peft first copies a LoRA layer's input to the
  adapter's float32 and autocast then copies it back to bf16 for the branch's matmul. Switched off,
  the branch takes the base layer's bf16 activations as they are: the same bf16 products, and two
  full-width copies (and their backward) fewer per projection, which at the 8B shape were a large
  part of a step's element-wise kernels (benchmarks/RESULTS.md, Round 7). Without autocast the
  input must match the adapter's dtype, so the cast then stays.
- `compile_layers: true`: each decoder layer compiled in place (torch.compile, regional: the layers
  share one code object, so the same graphs serve all of them), which fuses the LoRA branch's small
  element-wise kernels. The first steps pay the compilation. Compiled with dynamic shapes from the
  start, so row lengths need no graph of their own: two graphs on the CPU (the first layer's input
  needs no grad), four on CUDA (inductor also splits lengths that are a multiple of 8 from the rest),
  where a static first compile recompiles for lengths too and reaches dynamo's recompile limit.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer

from d2lora.settings import TrainingHparams


def keep_adapter_inputs(model) -> int:
    """LoRA layers take their input in the dtype it comes in (peft's cast_input_dtype_enabled off);
    the number of layers changed."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model: the classes it names in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("compile_layers: the model names no decoder layer class (_no_split_modules)")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def apply(model, hp: TrainingHparams) -> dict:
    """Both settings as `hp` has them (bf16 already resolved for the device); what took effect, and why."""
    record = {}
    if hp.cast_adapter_inputs:
        record["cast_adapter_inputs"] = {"setting": True, "layers": 0}
    elif hp.bf16 is not True:
        record["cast_adapter_inputs"] = {"setting": False, "layers": 0, "reason": "kept: bf16 autocast is off"}
    else:
        record["cast_adapter_inputs"] = {"setting": False, "layers": keep_adapter_inputs(model)}
    record["compile_layers"] = {
        "setting": hp.compile_layers,
        "layers": compile_decoder_layers(model) if hp.compile_layers else 0,
    }
    return record
