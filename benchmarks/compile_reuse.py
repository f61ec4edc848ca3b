"""Does a process that has compiled one model's forward compile it again for a new model object of
the same architecture (as the cell server builds one per cell)? Prints, per model, the seconds of
the first compiled call and dynamo's count of graphs compiled so far.

    python benchmarks/compile_reuse.py            # a 2-layer Llama on the CPU (inductor needs a C++ compiler)

On 2 CPU cores (2026-12-05): 11.3 s for the first model, 0.27 s for the second and third, one graph
in all: dynamo treats the parameters as inputs, so the graph is the architecture's, not the object's.
"""

from __future__ import annotations

import time

import torch
import transformers
from torch._dynamo.utils import counters

CONFIG = transformers.LlamaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def main() -> None:
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 8))
    for index in range(3):
        torch.manual_seed(index)
        model = transformers.LlamaForCausalLM(CONFIG).eval()
        forward = torch.compile(model.forward)
        start = time.perf_counter()
        with torch.no_grad():
            forward(input_ids=input_ids)
        graphs = counters["stats"]["unique_graphs"]
        print(f"model {index + 1}: first call {time.perf_counter() - start:.2f} s, graphs compiled so far: {graphs}")


if __name__ == "__main__":
    main()
