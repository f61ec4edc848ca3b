"""The paper preset's jobs measured at the paper model's shape on one GPU (GitHub issue 15, item 1).

    python benchmarks/paper_scale.py                               # config/paper_shape.yaml, every stage
    python benchmarks/paper_scale.py --stages warmup,gsm8k         # a subset
    python benchmarks/paper_scale.py --shape tiny --out /tmp/ps    # 2 layers, a few rows, CPU: seconds

Everything runs through the pipeline's own code, as its rules call it: d2lora.models.prepare_base_model
(random init), d2lora.data.prepare.prepare_role, d2lora.training.run.run_warmup / run_adaptation,
d2lora.evaluation.run.evaluate_cell. The base model and the data are prepared before the first stage
(the model is reused when <work>/model holds one made from the same model settings).
Stages, in the order --stages names them (default warmup,sft,gsm8k,dpo,orpo,arc_easy,titles): the
warm-up; one SFT, DPO and ORPO cell (d2lora init, continuing the warm-up; plain LoRA when no warm-up
adapter exists: the same cost); GSM8K on the SFT cell's adapter (the base model when there is none), decoded as
config/paper.yaml decodes (config/paper_shape.yaml has its settings). GSM8K comes before
the preference cells by default: it is the grid's costliest job type, so a time-limited run that
ends early should lose a preference cell rather than it. Then ARC-Easy (the forgetting check) and
titles, each one evaluation on the same adapter, so that the grid estimate covers every job.

Lever stages (issue 15, item 2): levers_sft, levers_dpo, levers_orpo, levers_gsm8k (and levers_gsm8k_small,
on the mini preset's real 135M model) run each speed
setting of LEVERS[method] against the plain path (the code path before the levers) in this one process, and record
under summary["levers"][method][lever] the same figures plus the ratio to plain
(`speedup_tokens_per_second`; `speedup_with_setup`, per row and epoch, also counts the trainer's setup, where a precomputed
DPO reference does its pass; for GSM8K `speedup_generate` and the fraction of answers identical to
plain). `lever_ratios` holds DPO's seconds per pair over SFT's per example (fastest of each). A lever
that compiles the decoder layers also records `compiled_against_eager`: its trained model's logits and
loss through the compiled layers against the same layers run eagerly, and whether either path lets a
position see later tokens. Every lever records `adapter_movement`: how far its LoRA A and B moved and
its trained model's loss on fixed training rows, adapter off and on (AdapterMovement).
    python benchmarks/paper_scale.py --stages levers_sft,levers_dpo,levers_orpo,levers_gsm8k

<out>/summary.json is rewritten after every stage, so a run cut off mid-way keeps what finished.
Heavy outputs (the 16 GB base model, adapters, predictions) go to <out>/work/.

Definitions (per training method):
- tokens: training.json's train_tokens, the tokenized rows (prompt + answer; both answers for DPO and
  ORPO; each capped at max_length) x epochs. No padding; DPO's reference forward is not counted.
- tokens_per_second = tokens / train_seconds, train_seconds being trainer.train() alone; loading the
  model, building the trainer and saving the adapter are the stage's overhead_seconds.
- mfu = 4 x base parameters x tokens / train_seconds / peak, peak the measured bf16 matmul rate
  (d2lora.cost.measure_matmul_peak). 4N: forward 2N plus a frozen base's backward, which computes input
  gradients only (2N); checkpointing's recomputed forward and DPO's reference forward are not counted.
- steady_seconds_per_step, steady_tokens_per_second, steady_mfu: the same past the first STEADY_AFTER
  optimizer steps (step-end clock), at the run's mean tokens per step: what compiling the layers or
  the first steps' one-time costs leave out (unprofiled runs only).
- computed_tokens, real_tokens, padding_share: the positions the model's forward took during the
  training steps, padding included, and those its attention mask marks real (equal to tokens): the
  share of a padded cell's compute spent on padding, the most that packing its rows could save.
- compiling_steps: the optimizer steps in which dynamo made a graph (a new shape's recompile can land in
  any step); compile_free_seconds_per_step, compile_free_tokens_per_second, compile_free_mfu: the steady
  rates over the steps past STEADY_AFTER that made none.
- peak_allocated_gib: training.json's / scores.json's peak (PyTorch allocated); peak_reserved_gib:
  PyTorch's reserved peak over the same span, what a card must hold. fits_80gb: reserved <= 79 GiB
  (an 80 GB card has 79.6 GiB, less the CUDA context).
GSM8K: generated_tokens = rows x new-token columns of every generate call (what the GPU computed;
generate runs a batch until its last row stops), generate_seconds = those calls' time,
eval_seconds = evaluate_cell's (model load included).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).resolve().parent)]

from d2lora import grid  # noqa: E402
from d2lora.io import read_json, write_json  # noqa: E402
from d2lora.settings import defaults  # noqa: E402

STAGES = (
    "warmup",
    "sft",
    "dpo",
    "orpo",
    "gsm8k",
    "arc_easy",
    "titles",
    "levers_sft",
    "levers_dpo",
    "levers_orpo",
    "levers_gsm8k",
    "levers_gsm8k_small",
)
DEFAULT_ORDER = ("warmup", "sft", "gsm8k", "dpo", "orpo", "arc_easy", "titles")
# The other benchmarks' evaluations (the grid's ARC-Easy forgetting checks and titles), after training.
OTHER_BENCHMARKS = ("arc_easy", "titles")
# Speed levers (issue 15, item 2), each measured against the plain path (first in its list) in the
# same process: name -> setting overrides, applied in order. Training variants run fewer epochs than
# a paper cell (LEVER_EPOCHS): the rates, not the result, are what they measure. Plain is the code
# path before the levers: config/paper_shape.yaml's Table 2 settings (checkpointing, 8 x 2) on a
# float32 base (base_dtype auto now picks bf16 under bf16 autocast, so plain pins float32).
# Each training lever stage starts with a 2-step throwaway run (summary["lever_warmups"]): the first
# training of a process pays CUDA/cuBLAS start-up, which once made plain look 2x slower than the same
# settings run second (2026-12-02, benchmarks/RESULTS.md). Besides the training hyperparameters, an
# override may name "lora" (training.lora's keys), "row_tokens" (the math rows lengthened to that
# many tokens, lengthened_rows) and "inductor" (inductor settings for compile_layers' layers).
FLOAT32_BASE = {"base_dtype": "float32"}
# Every training lever starts from the code path before the levers: the speed settings a preset may
# switch on (config/paper.yaml does, for every method) at the schema's defaults, and Table 2's 8 x 2
# micro-batches (the preset packs SFT's 16 rows into one), so that "plain" stays plain and each lever
# names all it changes.
LEVER_SPEED_SETTINGS = (
    "cast_adapter_inputs",
    "compile_layers",
    "compile_layers_min_steps",
    "flex_attention",
    "group_by_length",
    "no_checkpointing_up_to_tokens",
    "pad_to_multiple_of",
    "padding_free",
    "split_micro_batches",
)
TABLE2_MICRO_BATCH = {"batch_size": 8, "grad_accum": 2}
NO_CHECKPOINTING = {"base_dtype": "bfloat16", "gradient_checkpointing": False}
# The LoRA branch on the base's bf16 activations (d2lora.training.fast_paths); "lora" overrides training.lora.
UNCAST = {**NO_CHECKPOINTING, "cast_adapter_inputs": False}
# The same at the presets' own setting for memory: checkpointing kept.
BF16_UNCAST = {"base_dtype": "bfloat16", "cast_adapter_inputs": False}
# GSM8K: the adapter merged, a static KV cache, the decoding step compiled with the query heads folded onto KV heads.
PACKED_STATIC = {"merge_adapter": True, "cache": "static", "packed_gqa": True}
# The 135M model's compiled decoding (mini.yaml lets finished rows leave, which a compiled step cannot follow).
PACKED_STATIC_SMALL = {"cache": "static", "compile": True, "rows_leave_every": 0, "cudnn_attention": False}
FLEX_STATIC = {"merge_adapter": True, "cache": "static", "flex_attention": True, "cudnn_attention": False}
# config/paper.yaml's DPO and ORPO speed settings since Round 28 (checkpointing kept, then turned off by
# the cell's token budget) with split_micro_batches as set by a lever: on pairs lengthened past the budget,
# the pipeline's own choice between checkpointing and smaller micro-batches.
PRESET_BUDGET = {
    "base_dtype": "bfloat16",
    "cast_adapter_inputs": False,
    "pad_to_multiple_of": 8,
    "compile_layers": True,
    "no_checkpointing_up_to_tokens": 9000,
}
# config/paper.yaml's DPO and ORPO settings in random batches (the preset's until Round 35; Round 33
# measured them 36.6 % padding), and with the pairs grouped by length: the preset whole since Round 35
# (a test holds them to the preset).
PRESET_PREFERENCE = {**PRESET_BUDGET, "split_micro_batches": True}
GROUPED = {"group_by_length": True}
# SFT as 16 packed rows in one micro-batch (Table 2's 16 a step), their attention through FlexAttention.
PACKED_16 = {**UNCAST, "padding_free": True, "flex_attention": True, "batch_size": 16, "grad_accum": 1}
# The SFT lever that trains as many steps as the grid's large SFT cells (its rate stands for theirs in the estimate).
LARGE_SFT_LEVER = "preset_918_steps"
# config/paper.yaml's warm-up and SFT speed settings since Round 30 (a test holds this to the preset).
PRESET_SFT = {
    "base_dtype": "bfloat16",
    "cast_adapter_inputs": False,
    "no_checkpointing_up_to_tokens": 6000,
    "split_micro_batches": True,
    "padding_free": True,
    "flex_attention": True,
    "batch_size": 16,
    "grad_accum": 1,
    "compile_layers": True,
    "compile_layers_min_steps": 900,
}
LEVERS = {
    "sft": {
        "plain": FLOAT32_BASE,
        "bf16_base": {"base_dtype": "bfloat16"},
        "bf16_base_no_checkpointing": NO_CHECKPOINTING,
        "no_checkpointing_padding_free": {**NO_CHECKPOINTING, "padding_free": True},
        "no_checkpointing_padding_free_batch16x1": {
            **NO_CHECKPOINTING,
            "padding_free": True,
            "batch_size": 16,
            "grad_accum": 1,
        },
        "no_checkpointing_group_by_length": {**NO_CHECKPOINTING, "group_by_length": True},
        "no_checkpointing_batch16x1": {**NO_CHECKPOINTING, "batch_size": 16, "grad_accum": 1},
        "no_checkpointing_batch4x4": {**NO_CHECKPOINTING, "batch_size": 4, "grad_accum": 4},
        "no_checkpointing_uncast_inputs": UNCAST,
        "bf16_base_uncast_inputs": BF16_UNCAST,
        "no_checkpointing_uncast_inputs_dropout0": {**UNCAST, "lora": {"dropout": 0.0}},
        # The B matmul adds into the base output (addmm, scaling 1.0 as its alpha): per projection ~4 of
        # ~20 operator calls fewer (benchmarks/lora_branch_ops.py), where eager steps are launch-bound.
        "no_checkpointing_uncast_inputs_fused_add": {**UNCAST, "fuse_adapter_add": True},
        "bf16_base_uncast_inputs_fused_add": {**BF16_UNCAST, "fuse_adapter_add": True},
        # Padding-free batches through FlexAttention: a micro-batch of 8 real-length rows is ~30 %
        # padding, and flex's block mask keeps packed rows apart without SDPA's explicit mask.
        "no_checkpointing_uncast_inputs_flex": {**UNCAST, "flex_attention": True},
        "no_checkpointing_uncast_inputs_padding_free_flex": {**UNCAST, "padding_free": True, "flex_attention": True},
        "bf16_base_uncast_inputs_padding_free_flex": {**BF16_UNCAST, "padding_free": True, "flex_attention": True},
        # Round 20: packed rows took 34 % less memory and no less time (the step follows its operator
        # calls); 16 packed rows in one micro-batch, Table 2's 16 a step, halve the calls per token.
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1": PACKED_16,
        # The same with each decoder layer compiled: inductor fuses the LoRA branch's element-wise calls, which
        # eager packed rows left in the step; compiled with dynamic shapes, as packed lengths differ every step.
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_compiled_layers": {
            **PACKED_16,
            "compile_layers": True,
        },
        # The same on rows lengthened to 384 and 512 tokens (`row_tokens`: each answer repeated), 6,144 and
        # 8,192 tokens a micro-batch: whether the paper's longer rows (not on our machines) would fit.
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_rows384": {**PACKED_16, "row_tokens": 384},
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_rows512": {**PACKED_16, "row_tokens": 512},
        # Compiled layers compute eager's loss since Round 24, in 5 GiB less at ~3,400 tokens a micro-batch: at ~7,550.
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_rows384_compiled_layers": {
            **PACKED_16,
            "row_tokens": 384,
            "compile_layers": True,
        },
        # Round 21: every compiled lever's loss leaves eager's from the second step (0.3-0.5 % lower, the same
        # entropy) on the GPU, not on the CPU; with B still ~0 at lr 1e-6 dropout masks cannot do that.
        # Without dropout, whether the compiled layers still compute another loss.
        "no_checkpointing_uncast_inputs_dropout0_compiled_layers": {
            **UNCAST,
            "lora": {"dropout": 0.0},
            "compile_layers": True,
        },
        # Round 24: compiled layers now round each fused op's bf16 output as eager does (fast_paths.COMPILE_OPTIONS),
        # which took Round 23's loss offset away; the packed compiled lever without that rounding, for its cost.
        "no_checkpointing_uncast_inputs_padding_free_flex_batch16x1_compiled_layers_unrounded": {
            **PACKED_16,
            "compile_layers": True,
            "inductor": {"emulate_precision_casts": False},
        },
        # The preset's SFT for as many optimizer steps as a cell of n = 4,896 (272 rows x 54 epochs / 16 = 918):
        # past compile_layers_min_steps, so its layers compile as a large cell's would, and its packed lengths
        # change every step for 918 steps; the whole job against the padded eager lever's rate in the same run.
        LARGE_SFT_LEVER: {**PRESET_SFT, "epochs": 54},
        "no_checkpointing_compiled_layers": {**NO_CHECKPOINTING, "compile_layers": True},
        "no_checkpointing_uncast_inputs_compiled_layers": {**UNCAST, "compile_layers": True},
        # Rows padded to a multiple of 8: inductor's alignment guard sees one case, half the graphs.
        "no_checkpointing_uncast_inputs_pad8": {**UNCAST, "pad_to_multiple_of": 8},
        "no_checkpointing_uncast_inputs_pad8_compiled_layers": {
            **UNCAST,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
        # The same again after a dynamo reset: its graphs come from inductor's on-disk cache, as for the
        # second job of a cell on a node (or any job, with TORCHINDUCTOR_CACHE_DIR on shared storage).
        "no_checkpointing_uncast_inputs_pad8_compiled_layers_warm_cache": {
            **UNCAST,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
    },
    # DPO: the presets precompute the reference now, so every DPO lever names its choice.
    "dpo": {
        "plain": {**FLOAT32_BASE, "precompute_reference": False},
        "bf16_base_no_checkpointing": {**NO_CHECKPOINTING, "precompute_reference": False},
        "no_checkpointing_precompute_reference": {**NO_CHECKPOINTING, "precompute_reference": True},
        "bf16_base_precompute_reference": {"base_dtype": "bfloat16", "precompute_reference": True},
        # The paper preset's DPO setting (checkpointing kept for memory) with the LoRA branch on bf16 inputs.
        "bf16_base_precompute_reference_uncast_inputs": {**BF16_UNCAST, "precompute_reference": True},
        "no_checkpointing_precompute_reference_uncast_inputs": {**UNCAST, "precompute_reference": True},
        "bf16_base_precompute_reference_uncast_inputs_fused_add": {
            **BF16_UNCAST,
            "precompute_reference": True,
            "fuse_adapter_add": True,
        },
        "no_checkpointing_batch4x4": {
            **NO_CHECKPOINTING,
            "batch_size": 4,
            "grad_accum": 4,
            "precompute_reference": False,
        },
        # Compiled layers compute eager's loss since Round 24 (1.33-1.36x the eager SFT step, 5-10 GiB
        # less): DPO and ORPO are 62 % of the paper grid's estimate (Round 17). At the preset's setting,
        # and without checkpointing, which eager DPO could not afford on the paper's longer rows.
        "bf16_base_precompute_reference_uncast_inputs_compiled_layers": {
            **BF16_UNCAST,
            "precompute_reference": True,
            "compile_layers": True,
        },
        "no_checkpointing_precompute_reference_uncast_inputs_compiled_layers": {
            **UNCAST,
            "precompute_reference": True,
            "compile_layers": True,
        },
        # Memory a micro-batch token at the 8B shape, for no_checkpointing_up_to_tokens: pairs whose answers are
        # each lengthened to >= 384 tokens with the prompt, >= 6,144 tokens in 16 sequences a micro-batch
        # (the summary's checkpointing.micro_batch_tokens has the largest).
        "no_checkpointing_precompute_reference_uncast_inputs_rows384": {
            **UNCAST,
            "precompute_reference": True,
            "row_tokens": 384,
        },
        "no_checkpointing_precompute_reference_uncast_inputs_pad8_compiled_layers_rows384": {
            **UNCAST,
            "precompute_reference": True,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
            "row_tokens": 384,
        },
        # Round 27: at 8 pairs a micro-batch no checkpointing fits only cells under ~6,000 tokens a micro-batch;
        # 4 pairs and accumulation 4 train the same pairs a step in half the activations.
        "no_checkpointing_batch4x4_precompute_reference_uncast_inputs_pad8_compiled_layers": {
            **UNCAST,
            "batch_size": 4,
            "grad_accum": 4,
            "precompute_reference": True,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
        # Round 25: dynamo recompiled for a row length not a multiple of 8 while the compiled levers trained;
        # padded to 8, inductor sees one alignment case (SFT's pad8 levers, Round 10).
        "bf16_base_precompute_reference_uncast_inputs_pad8_compiled_layers": {
            **BF16_UNCAST,
            "precompute_reference": True,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
        "no_checkpointing_precompute_reference_uncast_inputs_pad8_compiled_layers": {
            **UNCAST,
            "precompute_reference": True,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
        # Pairs of >= 640 tokens a sequence pass the 9,000-token budget at 8 a micro-batch (~10,900, Round 28):
        # the preset keeps checkpointing, or with split_micro_batches trains 4 x 4 without it.
        "preset_budget_checkpointed_rows640": {**PRESET_BUDGET, "precompute_reference": True, "row_tokens": 640},
        "preset_budget_split_rows640": {
            **PRESET_BUDGET,
            "precompute_reference": True,
            "split_micro_batches": True,
            "row_tokens": 640,
        },
        "preset": {**PRESET_PREFERENCE, "precompute_reference": True},
        "preset_grouped": {**PRESET_PREFERENCE, "precompute_reference": True, **GROUPED},
    },
    "orpo": {
        "plain": FLOAT32_BASE,
        "bf16_base": {"base_dtype": "bfloat16"},
        "bf16_base_no_checkpointing": NO_CHECKPOINTING,
        "no_checkpointing_batch4x4": {**NO_CHECKPOINTING, "batch_size": 4, "grad_accum": 4},
        "no_checkpointing_uncast_inputs": UNCAST,
        # The paper preset's ORPO setting (checkpointing kept: without it ORPO needs 81.5 GiB) uncast.
        "bf16_base_uncast_inputs": BF16_UNCAST,
        "bf16_base_uncast_inputs_fused_add": {**BF16_UNCAST, "fuse_adapter_add": True},
        # As DPO's: at the preset's setting, and without checkpointing (eager: 81.5 GiB, Round 5).
        "bf16_base_uncast_inputs_compiled_layers": {**BF16_UNCAST, "compile_layers": True},
        "no_checkpointing_uncast_inputs_compiled_layers": {**UNCAST, "compile_layers": True},
        # As DPO's: memory a micro-batch token on pairs lengthened to >= 384 tokens a sequence.
        "no_checkpointing_uncast_inputs_rows384": {**UNCAST, "row_tokens": 384},
        "no_checkpointing_uncast_inputs_compiled_layers_rows384": {**UNCAST, "compile_layers": True, "row_tokens": 384},
        # As DPO's: 4 pairs a micro-batch, accumulation 4, on the stand-in pairs and on the lengthened ones
        # that ran out of memory at 8 pairs (Round 27).
        "no_checkpointing_batch4x4_uncast_inputs": {**UNCAST, "batch_size": 4, "grad_accum": 4},
        # Padded to 8 since ORPO can be (the pipeline pads its halves): Round 26's compiled ORPO recompiled in step 6.
        "no_checkpointing_batch4x4_uncast_inputs_pad8_compiled_layers": {
            **UNCAST,
            "batch_size": 4,
            "grad_accum": 4,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
        },
        "no_checkpointing_batch4x4_uncast_inputs_pad8_compiled_layers_rows384": {
            **UNCAST,
            "batch_size": 4,
            "grad_accum": 4,
            "pad_to_multiple_of": 8,
            "compile_layers": True,
            "row_tokens": 384,
        },
        # Round 28: 4 pairs compiled held the >= 384-token pairs in 47 GiB; where their memory ends.
        **{
            f"no_checkpointing_batch4x4_uncast_inputs_pad8_compiled_layers_rows{tokens}": {
                **UNCAST,
                "batch_size": 4,
                "grad_accum": 4,
                "pad_to_multiple_of": 8,
                "compile_layers": True,
                "row_tokens": tokens,
            }
            for tokens in (640, 768)
        },
        # As DPO's: the preset's choice on pairs past its budget, checkpointing or 4 x 4.
        "preset_budget_checkpointed_rows640": {**PRESET_BUDGET, "row_tokens": 640},
        "preset_budget_split_rows640": {**PRESET_BUDGET, "split_micro_batches": True, "row_tokens": 640},
        "preset": PRESET_PREFERENCE,
        "preset_grouped": {**PRESET_PREFERENCE, **GROUPED},
    },
    # GSM8K: 1,319 prompts x 256 new tokens (a random model never stops: every row runs to the limit).
    # The static cache gives every batch one decoding shape, so the compiled step is built once per process.
    "gsm8k": {
        "plain": {},
        # Plain again, warm: the first generation of a process pays the allocator's growth and kernel
        # choice (Round 12), which a job served by the cell server does not.
        "plain_second": {},
        "merged": {"merge_adapter": True},
        "merged_static_cache_eager": {"merge_adapter": True, "cache": "static", "compile": False},
        # The same, attention reading only the cache positions written so far, each batch its own prompt
        # width (Round 13's profile: the attention over the whole static cache was half of a step).
        # Round 14 read a new length every step: slower (67.9 s against 40.1); now in windows of 128.
        "merged_static_cache_eager_filled": {
            "merge_adapter": True,
            "cache": "static",
            "compile": False,
            "filled_cache_only": True,
        },
        # Decoding steps through SDPA's enable_gqa with the mask instead of the folded heads (Round 14,
        # one layer on an H100: 313 us against 568 us), eager and compiled.
        "merged_static_cache_eager_native_gqa": {
            "merge_adapter": True,
            "cache": "static",
            "compile": False,
            "native_gqa": True,
        },
        "merged_static_cache_eager_native_gqa_filled": {
            "merge_adapter": True,
            "cache": "static",
            "compile": False,
            "native_gqa": True,
            "filled_cache_only": True,
        },
        "merged_static_cache_native_gqa": {"merge_adapter": True, "cache": "static", "native_gqa": True},
        "merged_static_cache_native_gqa_next_cell": {"merge_adapter": True, "cache": "static", "native_gqa": True},
        "merged_static_cache": {"merge_adapter": True, "cache": "static"},
        # The compiled step folds the query heads onto the 8 KV heads instead of copying K and V 4x.
        "merged_static_cache_packed_gqa": PACKED_STATIC,
        # The same again on a freshly loaded model in this process: the cell server's next cell. Whether
        # the compiled step (and its CUDA graphs) carries over to a new model object, or compiles again.
        "merged_static_cache_packed_gqa_next_cell": PACKED_STATIC,
        # The folded heads on SDPA's memory-efficient kernel instead of cuDNN's: one layer 455 against
        # 565 us on an H100 and the same output on every call (Round 15, benchmarks/decode_attention.py),
        # where native_gqa's cuDNN kernel gave two runs different answers.
        "merged_static_cache_packed_gqa_without_cudnn": {**PACKED_STATIC, "cudnn_attention": False},
        "merged_static_cache_packed_gqa_without_cudnn_next_cell": {**PACKED_STATIC, "cudnn_attention": False},
        # Decoding steps through FlexAttention, skipping the cache blocks all padding or unwritten (one layer:
        # 145-288 us against ~457 us for the row above's kernel, Round 15); the prefill as the row above's.
        "merged_static_cache_flex": FLEX_STATIC,
        "merged_static_cache_flex_next_cell": FLEX_STATIC,
        # Two batches of 660 instead of three of 440: the weights are read once a step for more rows.
        # Round 12 (H200): 31.9 s against 33.3 s, but 71.9 GiB allocated, 88 reserved: over an 80 GB card.
        "merged_static_cache_packed_gqa_batch660": {**PACKED_STATIC, "batch_size": 660},
        "merged_static_cache_packed_gqa_batch660_next_cell": {**PACKED_STATIC, "batch_size": 660},
        # Every batch's prompts padded to the run's longest, as through Round 14 (since then each batch
        # keeps its own width; the cache, and with it the compiled step, stays one shape either way).
        # Run it first, then the default: the second reuses the first's compiled step.
        "merged_static_cache_packed_gqa_longest_prompt": {**PACKED_STATIC, "prompt_width": "longest"},
        "merged_static_cache_packed_gqa_longest_prompt_next_cell": {**PACKED_STATIC, "prompt_width": "longest"},
    },
    # GSM8K on the real SmolLM2-135M-Instruct (SMALL_MODEL_CONFIG: its model and GSM8K settings, no
    # adapter): real answers that stop at their end, so these times depend on what the model writes.
    "gsm8k_small": {
        "plain": {},
        # Plain again in this process: a served job's time, without the process's first generation.
        "plain_next_cell": {},
        "static_cache_eager": {"cache": "static", "compile": False},
        "static_cache": {"cache": "static"},
        "static_cache_eager_rows_leave": {"cache": "static", "compile": False, "rows_leave_every": 32},
        "rows_leave": {"rows_leave_every": 32},
        "static_cache_packed_gqa": {"cache": "static", "packed_gqa": True},
        # Compiled decoding steps (one batch of 1,319 rows, every row to the end) on the folded heads and on
        # FlexAttention: whether flex_attention's real answers score as the plain path's (issue 15).
        "static_cache_compiled_packed_gqa": {**PACKED_STATIC_SMALL, "packed_gqa": True},
        "static_cache_compiled_flex": {**PACKED_STATIC_SMALL, "flex_attention": True},
        # The model's 3 KV heads repeated to its 9 query heads (the same function; flex's decoding kernel
        # needs a power of 2 query heads per KV head, here 1): flex's real answers scored against plain.
        "plain_kv_heads_repeated": {},
        "static_cache_compiled_flex_kv_heads_repeated": {**PACKED_STATIC_SMALL, "flex_attention": True},
        # The compiled steps again on a freshly loaded model: a cell server's later GSM8K jobs, which reuse
        # the first cell's compiled step instead of paying its compile (issue 15's <= 10 s for 135M).
        "static_cache_compiled_packed_gqa_next_cell": {**PACKED_STATIC_SMALL, "packed_gqa": True},
        "static_cache_compiled_flex_kv_heads_repeated_next_cell": {**PACKED_STATIC_SMALL, "flex_attention": True},
    },
}
SMALL_MODEL_CONFIG = ROOT / "config" / "mini.yaml"
GSM8K_LEVERS = ("gsm8k", "gsm8k_small")
LEVER_EPOCHS = {"sft": 1, "dpo": 2, "orpo": 1}  # DPO: two epochs, so a precomputed reference is reused once
LEVER_GSM8K_TOKENS = 256
# The plain decoding path every 8B GSM8K lever starts from (HF generate, dynamic cache, the adapter
# unmerged, transformers' attention), whatever config/paper_shape.yaml, like config/paper.yaml, decodes
# with: its gsm8k stage measures the preset's job, its levers their ratios to this path.
PLAIN_DECODING = {
    "merge_adapter": False,
    "cache": "dynamic",
    "packed_gqa": False,
    "cudnn_attention": True,
    "flex_attention": False,
}
STEADY_AFTER = 3  # steps a steady rate leaves out (summary "steady_*"): compilation lands in the first two
PROFILE_FIRST_STEP = 1  # the first optimizer step pays one-time costs (allocator growth, kernel choice)
FITS_GIB = 79.0
TINY_ARCH = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
# The tiny shape: config/paper_shape.yaml on a 2-layer model in float32 on the CPU, two rows per cell,
# one epoch, a few prompts and tokens; every stage runs the same code as at 8B (checkpointing
# included). max_length stays above the longest GSM8K prompt: a cell refuses rows TRL would drop.
TINY = {
    "device": "cpu",
    "model.dtype": "float32",
    "model.init_device": "cpu",
    "model.architecture": TINY_ARCH,
    "datasets.warmup.train.limit": 2,
    "datasets.math.train.from.limit": 6,
    "datasets.math.eval.limit": 3,
    "datasets.titles.train.limit": 4,
    "datasets.titles.eval.limit": 2,
    "datasets.forgetting.eval.limit": 3,
    "evaluation.dtype": "float32",
    "evaluation.gsm8k.max_new_tokens": 4,
    "evaluation.gsm8k.batch_size": 2,
    "evaluation.titles.max_new_tokens": 4,
    "evaluation.titles.batch_size": 2,
    "evaluation.arc_easy.batch_size": 2,
    "experiments.figure1.n": [2],
    "experiments.figure2.n": [0, 2],
    "experiments.table3.n": [0, 2],
    "experiments.figure4.n": [0, 2],
}
TINY_HPARAMS = {"batch_size": 1, "grad_accum": 1, "epochs": 1, "max_length": 256, "bf16": False}


def log(message: str) -> None:
    print(f"[paper_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- config


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        if key not in node:
            raise KeyError(f"--shape tiny: the config has no '{dotted}' (it expects config/paper_shape.yaml's layout)")
        node = node[key]
    node[last] = copy.deepcopy(value)


def _absolute_data_files(source: dict | None) -> None:
    """Relative data paths name files from the repository root, as in a run of the workflow."""
    if not isinstance(source, dict):
        return
    files = source.get("data_files")
    if isinstance(files, str):
        source["data_files"] = str((ROOT / files).resolve()) if not Path(files).is_absolute() else files
    elif isinstance(files, list):
        source["data_files"] = [str((ROOT / f).resolve()) if not Path(f).is_absolute() else f for f in files]
    _absolute_data_files(source.get("from"))


def load_config(path: Path, shape: str, device: str | None) -> dict:
    import yaml
    from snakemake.utils import validate

    grid.check_config_files([path])
    config = yaml.safe_load(path.read_text())
    if shape == "tiny":
        for dotted, value in TINY.items():
            _set(config, dotted, value)
        for hp in [config["training"]["warmup"], *config["training"]["adapt"].values()]:
            hp.update(TINY_HPARAMS)
    if device:
        config["device"] = device
    if config.get("device") == "cpu":
        # FlexAttention has no backward on the CPU (grid.check refuses it): packed rows train on SDPA there.
        for hp in [config["training"]["warmup"], *config["training"]["adapt"].values()]:
            hp["flex_attention"] = False
    for role in config["datasets"].values():
        for split in ("train", "eval"):
            _absolute_data_files(role.get(split))
    # What the workflow runs first (common.smk): the schema (which fills its defaults), then the grid rules.
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    grid.check(config)
    return config


# ----------------------------------------------------------------------------- measuring


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def free_memory(device: str) -> None:
    gc.collect()
    if _cuda(device):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reserved_gib(device: str) -> float | None:
    """PyTorch's reserved-memory peak since the last reset (the training and evaluation code reset it
    as their measured span starts)."""
    if not _cuda(device):
        return None
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**30, 2)


@contextlib.contextmanager
def timed(module, name: str, device: str, seconds: list[float]):
    """Add the wall time of every call of module.<name> to `seconds` (observing only)."""
    from d2lora.cost import synchronize

    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize(device)
            seconds.append(time.perf_counter() - start)

    setattr(module, name, wrapper)
    try:
        yield seconds
    finally:
        setattr(module, name, original)


PROFILE_TOP = 25  # operators kept in the summary (the text table keeps 60)


class ProfileSteps:
    """A Trainer callback that runs torch.profiler over optimizer steps [first, first + steps) and writes
    the operators by their own device time (CPU time on a CPU) to `out_file`: where a step's time goes."""

    def __init__(self, first: int, steps: int, out_file: Path, device: str):
        self.first, self.steps, self.out_file, self.device = first, steps, out_file, device
        self.profiler = None
        self.result: dict | None = None

    def _sort_key(self) -> str:
        return "self_device_time_total" if self.device == "cuda" else "self_cpu_time_total"

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler is None and self.result is None and state.global_step == self.first:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step >= self.first + self.steps:
            self._finish(state.global_step - self.first)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self._finish(state.global_step - self.first)

    def _finish(self, steps: int) -> None:
        from d2lora.cost import synchronize

        synchronize(self.device)
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        key = self._sort_key()
        self.out_file.write_text(averages.table(sort_by=key, row_limit=60) + "\n")
        events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
        # On a GPU both an operator (aten::mm) and the kernels it launched carry the kernels' time: the
        # total counts kernels only. CPU self times exclude children, so they add up as they are.
        from torch.autograd import DeviceType

        counted = [e for e in events if self.device != "cuda" or e.device_type == DeviceType.CUDA]
        total = sum(getattr(e, key) for e in counted) or 1.0
        self.result = {
            "steps": steps,
            "wall_seconds": round(wall, 3),
            "by": key,
            "total_self_ms": round(total / 1000, 2),
            "busy_seconds_per_step": round(total / 1e6 / max(steps, 1), 4),
            "table": self.out_file.name,
            "top": [
                {
                    "op": e.key,
                    "self_ms": round(getattr(e, key) / 1000, 2),
                    "share": round(getattr(e, key) / total, 4),
                    "calls": e.count,
                }
                for e in events[:PROFILE_TOP]
            ],
        }
        self.profiler = None


class StepClock:
    """The wall time at the end of every optimizer step, after the device finishes it, so the steady
    rate past the first STEADY_AFTER steps (compilation, allocator growth, kernel choice) can be told
    from the whole run's; and how many graphs dynamo had made by then, so the steps that compiled (a
    recompile for a new shape can land anywhere in a short lever) can be left out as well."""

    def __init__(self, device: str):
        self.device, self.times, self.graphs, self.graphs_before = device, [], [], None

    def on_step_begin(self, *args, **kwargs):
        if self.graphs_before is None:
            self.graphs_before = dynamo_graphs()

    def on_step_end(self, *args, **kwargs):
        from d2lora.cost import synchronize

        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.graphs.append(dynamo_graphs())

    def on_train_end(self, *args, **kwargs):
        pass

    def steady_seconds_per_step(self) -> float | None:
        if len(self.times) < STEADY_AFTER + 2:
            return None
        return (self.times[-1] - self.times[STEADY_AFTER - 1]) / (len(self.times) - STEADY_AFTER)

    def compiling_steps(self) -> list[int]:
        """The optimizer steps (1-based) in which dynamo made a graph."""
        before = [self.graphs_before or 0] + self.graphs[:-1]
        return [i + 1 for i, (was, now) in enumerate(zip(before, self.graphs)) if now != was]

    def compile_free_seconds_per_step(self) -> float | None:
        """The mean step past the first STEADY_AFTER, leaving out every step that compiled."""
        compiled = set(self.compiling_steps())
        seconds = [
            self.times[i] - self.times[i - 1] for i in range(STEADY_AFTER, len(self.times)) if i + 1 not in compiled
        ]
        return sum(seconds) / len(seconds) if len(seconds) >= 2 else None


def dynamo_graphs() -> int:
    """How many graphs dynamo has made in this process (its own counter, 0 before any compile)."""
    # why: importing torch._dynamo at module level would slow every CPU-only use of this script
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


PROBE_LENGTHS = (1000, 1237)  # two row lengths no stage trains on; the second not a multiple of 8


def path_stance(eager: bool):
    """The eager path of a model with compiled layers (torch.compiler's force_eager stance), or its
    compiled graphs as they are."""
    import torch

    return torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()


@contextlib.contextmanager
def lora_b_scaled(model, scale: float):
    """Every LoRA B multiplied by `scale` in place for the block (0 zeroes the branch), then put back
    exactly: a parameter's values, so no compiled graph recompiles."""
    import torch

    factors = [p for n, p in model.named_parameters() if "lora_B" in n]
    kept = [p.detach().clone() for p in factors]
    try:
        with torch.no_grad():
            for p in factors:
                p.mul_(scale)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(factors, kept):
                p.copy_(value)


def compiled_against_eager(model, vocab_size: int, bf16: bool, lengths=PROBE_LENGTHS, seed: int = 0) -> dict:
    """A trained model's logits through its compiled layers against the same layers run eagerly
    (torch.compiler's force_eager stance), in training mode with gradients on, as training ran them:
    per row length, two rows (the second right-padded by 37), the largest absolute logit difference
    and each path's loss on the rows. `causal_leak` is how far a position's logits move when only the
    tokens after it change (zero for a causal model): whether a compiled graph lost the causal mask.
    Each forward starts from torch's seed `seed`, so dropout draws the same masks on both inputs."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()

    def logits(ids, mask, eager: bool):
        # The same dropout masks for every forward (Round 24: with dropout 0.05 fresh masks moved a
        # random model's early logits by ~0.3 and read as a causal leak).
        torch.manual_seed(seed)
        with path_stance(eager), autocast:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach().float()

    def loss(out, ids, mask):
        labels = ids.masked_fill(mask == 0, -100)[:, 1:]
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels.reshape(-1)).item()

    result = {}
    try:
        for length in lengths:
            ids = torch.randint(0, vocab_size, (2, length), generator=generator)
            mask = torch.ones_like(ids)
            mask[1, length - 37 :] = 0
            changed = ids.clone()
            half = length // 2
            changed[:, half:] = torch.randint(0, vocab_size, (2, length - half), generator=generator)
            ids, mask, changed = ids.to(device), mask.to(device), changed.to(device)
            record, outputs = {}, {}
            for path, eager in (("compiled", False), ("eager", True)):
                outputs[path] = out = logits(ids, mask, eager)
                record[f"{path}_loss"] = round(loss(out, ids, mask), 6)
                leak = (logits(changed, mask, eager)[:, :half] - out[:, :half]).abs().max().item()
                record[f"{path}_causal_leak"] = leak
            difference = (outputs["compiled"] - outputs["eager"])[mask.bool()]
            record["max_abs_logit_difference"] = difference.abs().max().item()
            result[str(length)] = record
            del outputs, out, difference
    finally:
        model.train(was_training)
    return result


class CompiledAgainstEager:
    """Observer: keeps the trained model (its compiled layers) at the end of training, so that `run`
    probes it once the stage's time and memory are taken, not inside trainer.train()'s."""

    def __init__(self):
        self.model, self.bf16 = None, False

    def on_step_begin(self, *args, **kwargs):
        pass

    def on_step_end(self, *args, **kwargs):
        pass

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model, self.bf16 = model, bool(args.bf16)

    def run(self) -> dict:
        """compiled_against_eager on the kept model, which it then lets go."""
        model, self.model = self.model, None
        if model is None:
            return {"error": "training kept no model"}
        try:
            return compiled_against_eager(model, model.config.vocab_size, self.bf16)
        except Exception as err:  # noqa: BLE001 -- a diagnostic; the lever's numbers stand without it
            return {"error": f"{type(err).__name__}: {err}"[:500]}


FIXED_ROWS = 16  # one optimizer step's rows at Table 2's 8 x 2
# B after Table 2's 17 steps at 1e-6 has a norm of ~0.02 (Round 23): scaled by 1,000 its branch moves
# the logits well past bf16 rounding, so the eager and compiled branches can be compared as vectors.
LORA_BRANCH_SCALE = 1000.0


class ComputedTokens:
    """Observer: the token positions the model's forward computed during the training steps, padding
    included, against the real (attention-masked) ones: how much of a padded cell's compute is padding,
    the most that packing its rows could save. A packed batch has no attention mask: every position is
    real. Counted at the top model's forward, so checkpointing's recomputed layers count once; from
    the first optimizer step, so DPO's precomputed reference pass (before it) is not counted."""

    def __init__(self):
        self.computed, self.real, self.handle = 0, 0, None

    def _count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.computed += int(input_ids.numel())
        # Summed on the device and read once at the end: reading it here would wait for the GPU every forward.
        self.real = self.real + (mask.sum() if mask is not None and mask.dim() == 2 else int(input_ids.numel()))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is None and model is not None:
            self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_step_end(self, *args, **kwargs):
        pass

    def on_train_end(self, *args, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def result(self) -> dict:
        real = int(self.real)
        return {
            "computed_tokens": self.computed,
            "real_tokens": real,
            "padding_share": round(1 - real / self.computed, 4) if self.computed else None,
        }


class AdapterMovement:
    """Observer: how far training moved the adapter, and what that did to the loss, so that two levers
    that log different losses on the same rows can be told apart: by their weights (Round 22: compiled
    layers' logged loss fell 0.05 below eager's while their gradient norms agreed to 1e-3).

    At the first step it keeps a copy of every trainable tensor; at the end of training
    `moved` is the Frobenius norm of (trained - initial) over the LoRA A and over the LoRA B matrices.
    `run` then takes the first FIXED_ROWS training rows, collated as training collated them, and
    gives their loss with the adapter off (the base model) and on, both eagerly (torch.compiler's
    force_eager stance) and, for a model with compiled layers, also through them, in eval mode without
    gradients: a lever that trains what eager trains moves the loss by what its steps can move it.
    For a compiled model also, on the first micro-batch, `lora_branch` (what the branch adds to the
    logits, eager against compiled, as trained and with B scaled by LORA_BRANCH_SCALE) and
    `leaks_scaled` (whether a logit moves when later tokens or another row change)."""

    def __init__(self):
        self.initial, self.moved = None, {}
        self.model, self.rows, self.collate, self.micro_batch, self.bf16 = None, None, None, 1, False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.initial is None and model is not None:
            # On the host: the card's peak memory is what the lever is measured by.
            self.initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, *args, **kwargs):
        pass

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        import torch

        if model is None or self.initial is None:
            return
        squares = {"lora_A": 0.0, "lora_B": 0.0, "other": 0.0}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.initial:
                    kind = next((k for k in ("lora_A", "lora_B") if k in name), "other")
                    moved = param.detach().to("cpu", torch.float32) - self.initial[name].float()
                    squares[kind] += moved.pow(2).sum().item()
        self.initial = None
        self.moved = {kind: round(total**0.5, 8) for kind, total in squares.items() if kind != "other" or total}
        self.model, self.bf16, self.micro_batch = model, bool(args.bf16), int(args.per_device_train_batch_size)
        if train_dataloader is not None:
            dataset = train_dataloader.dataset
            self.rows = [dataset[i] for i in range(min(FIXED_ROWS, len(dataset)))]
            self.collate = train_dataloader.collate_fn

    def run(self) -> dict:
        """`moved` and, on the fixed rows, the base, trained (eager) and trained (compiled) losses; the
        kept model is then let go."""
        model, rows, self.model, self.rows = self.model, self.rows, None, None
        result = {"moved": self.moved}
        if model is None or not rows:
            return result | {"error": "training kept no model or rows"}
        if "input_ids" not in rows[0]:
            return result | {"fixed_rows": 0, "why": "SFT rows only: a preference pair is no one sequence"}
        try:
            return result | {"fixed_rows": len(rows)} | self.fixed_rows_loss(model, rows)
        except Exception as err:  # noqa: BLE001 -- a diagnostic; the lever's numbers stand without it
            return result | {"error": f"{type(err).__name__}: {err}"[:500]}

    def fixed_rows_loss(self, model, rows: list) -> dict:
        import torch

        from d2lora.training.fast_paths import decoder_layers

        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        batches = [self.collate(rows[i : i + self.micro_batch]) for i in range(0, len(rows), self.micro_batch)]

        def loss(eager: bool) -> float:
            total, labels = 0.0, 0
            with path_stance(eager), autocast, torch.no_grad():
                for batch in batches:
                    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                    count = int((batch["labels"][:, 1:] != -100).sum())
                    total += model(**batch, use_cache=False).loss.float().item() * count
                    labels += count
            return round(total / labels, 6)

        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                losses = {"base_loss": loss(eager=True)}
            losses["trained_eager_loss"] = loss(eager=True)
            if any(
                hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl for layer in decoder_layers(model)
            ):
                losses["trained_compiled_loss"] = loss(eager=False)
                losses["lora_branch"] = self.lora_branch(model, batches[0], device, autocast)
                # Round 23: the trained branch drowned in rounding (cosine ~0); scaled, it does not.
                losses["lora_branch_scaled"] = self.lora_branch(
                    model, batches[0], device, autocast, scale=LORA_BRANCH_SCALE
                )
                losses["leaks_scaled"] = self.leaks(model, batches[0], device, autocast, scale=LORA_BRANCH_SCALE)
        finally:
            model.train(was_training)
        return losses

    @staticmethod
    def leaks(model, batch: dict, device, autocast, scale: float = 1.0, seed: int = 0) -> dict:
        """Per path (eager, compiled), with every B multiplied by `scale` (put back after), on a real
        micro-batch: `causal`, the largest change of any logit before the middle of the rows when the
        tokens from the middle on are redrawn (zero for a causal model), and `cross_row`, the largest
        change of any logit of the other rows when the first row's tokens are redrawn (zero when rows
        do not see each other)."""
        import torch

        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ids, real = batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        generator = torch.Generator().manual_seed(seed)
        middle = ids.shape[1] // 2
        later = ids.clone()
        later[:, middle:] = torch.randint(0, model.config.vocab_size, later[:, middle:].shape, generator=generator).to(
            ids.device
        )
        first_row = ids.clone()
        first_row[0] = torch.randint(0, model.config.vocab_size, ids[0].shape, generator=generator).to(ids.device)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}

        def logits(tokens, eager: bool):
            with path_stance(eager), autocast, torch.no_grad():
                return model(input_ids=tokens, **inputs, use_cache=False).logits

        result = {"scale": scale, "rows": int(ids.shape[0]), "middle": middle}
        with lora_b_scaled(model, scale):
            for path in ("eager", "compiled"):
                reference = logits(ids, path == "eager")
                early = real[:, :middle]
                causal = (logits(later, path == "eager")[:, :middle] - reference[:, :middle])[early]
                others = (logits(first_row, path == "eager")[1:] - reference[1:])[real[1:]]
                result[path] = {
                    "causal": causal.abs().max().item() if causal.numel() else None,
                    "cross_row": others.abs().max().item() if others.numel() else None,
                }
                del reference, causal, others
        return result

    @staticmethod
    def lora_branch(model, batch: dict, device, autocast, scale: float = 1.0) -> dict:
        """What the LoRA branch adds to the logits of one fixed micro-batch (at its labelled positions),
        eagerly and through the compiled layers: the model's logits with every B multiplied by `scale`
        less its logits with every B zeroed, both in place (a parameter's values, so no graph
        recompiles; the trained B is put back). `norm_ratio` is the compiled branch's norm over the
        eager one's (1 when both compute the same branch), `cosine` their alignment; a trained B too
        small to outlast bf16 rounding gives two branches of rounding noise (cosine ~0), which a
        large `scale` lifts above it. `base_max_abs_difference` compares the two paths with B zeroed,
        the base model alone; each of the four passes' loss on the micro-batch where the model gives
        one."""
        import torch

        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        labelled = batch["labels"] != -100
        losses = {}

        def logits(eager: bool, weights: str):
            with path_stance(eager), autocast, torch.no_grad():
                out = model(**batch, use_cache=False)
            if getattr(out, "loss", None) is not None:
                losses[f"{weights}_{'eager' if eager else 'compiled'}_loss"] = round(out.loss.float().item(), 6)
            return out.logits[labelled].float()

        with lora_b_scaled(model, scale):
            trained = {path: logits(path == "eager", "trained") for path in ("eager", "compiled")}
        with lora_b_scaled(model, 0.0):
            base = {path: logits(path == "eager", "base") for path in ("eager", "compiled")}
        branch = {path: trained[path] - base[path] for path in trained}
        eager_norm, compiled_norm = branch["eager"].norm().item(), branch["compiled"].norm().item()
        cosine = torch.nn.functional.cosine_similarity(branch["eager"].flatten(), branch["compiled"].flatten(), dim=0)
        return {
            "scale": scale,
            "positions": int(labelled.sum()),
            "eager_norm": round(eager_norm, 6),
            "compiled_norm": round(compiled_norm, 6),
            "norm_ratio": round(compiled_norm / eager_norm, 6) if eager_norm else None,
            "cosine": round(cosine.item(), 6),
            "base_max_abs_difference": (base["compiled"] - base["eager"]).abs().max().item(),
            "trained_max_abs_difference": (trained["compiled"] - trained["eager"]).abs().max().item(),
        } | losses


@contextlib.contextmanager
def observed_trainer(training_module, observers: list):
    """Hand every observer (on_step_begin/on_step_end/on_train_end, observing only) to the trainer
    training_module.build_trainer builds."""
    from transformers import TrainerCallback

    original = training_module.build_trainer

    class Hook(TrainerCallback):
        def on_step_begin(self, *a, **k):
            for observer in observers:
                observer.on_step_begin(*a, **k)

        def on_step_end(self, *a, **k):
            for observer in observers:
                observer.on_step_end(*a, **k)

        def on_train_end(self, *a, **k):
            for observer in observers:
                observer.on_train_end(*a, **k)

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Hook())
        return trainer

    training_module.build_trainer = build
    try:
        yield
    finally:
        training_module.build_trainer = original


@contextlib.contextmanager
def counting_generate(device: str):
    """Record rows, new tokens and seconds of every transformers generate call (observing only)."""
    import torch
    from transformers.generation.utils import GenerationMixin

    from d2lora.cost import synchronize

    original = GenerationMixin.generate
    calls: list[dict] = []

    def generate(self, *args, **kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        synchronize(device)
        start = time.perf_counter()
        output = original(self, *args, **kwargs)
        synchronize(device)
        seconds = time.perf_counter() - start
        new = output[:, input_ids.shape[1] :]
        stops = getattr(kwargs.get("generation_config"), "eos_token_id", None)
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        # A row needs its tokens up to and including its first stop token; a row that never stops, all.
        is_stop = (
            torch.isin(new, torch.tensor(stops, device=new.device))
            if stops
            else torch.zeros_like(new, dtype=torch.bool)
        )
        first = torch.where(
            is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, torch.full_like(new[:, 0], new.shape[1])
        )
        calls.append(
            {
                "rows": int(new.shape[0]),
                "prompt_width": int(input_ids.shape[1]),
                "new_tokens": int(new.shape[1]),
                "tokens_to_stop": int(first.sum()),
                "seconds": round(seconds, 3),
            }
        )
        log(f"generate: {new.shape[0]} rows x {new.shape[1]} new tokens in {seconds:.1f} s")
        return output

    GenerationMixin.generate = generate
    try:
        yield calls
    finally:
        GenerationMixin.generate = original


def host_op_microseconds(device: str, ops: int = 2000, repeats: int = 3) -> float:
    """Microseconds the host takes to issue one small eager operator on `device` (a one-element
    add_, best of `repeats` loops of `ops`, synchronized at each loop's end): on a GPU, the rate at
    which a step of thousands of small kernels (the LoRA branches') can be launched at all, which
    differs from node to node with the host CPU (Round 16)."""
    import torch

    x = torch.zeros(1, device=device)
    loops = []
    for _ in range(repeats + 1):
        if _cuda(device):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        if _cuda(device):
            torch.cuda.synchronize(device)
        loops.append(time.perf_counter() - start)
    return round(min(loops[1:]) / ops * 1e6, 2)  # the first loop is a warm-up


def device_info(device: str) -> dict:
    import torch

    from d2lora.cost import measure_matmul_peak
    from d2lora.precision import cpu_model

    info = {
        "device": device,
        "host_cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "host_op_microseconds": host_op_microseconds(device),
    }
    if _cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            total_memory_gib=round(props.total_memory / 2**30, 2),
            cuda=torch.version.cuda,
            peak_flops=measure_matmul_peak(device),
            peak_flops_source="bf16 8192^3 matmul, mean of 10 (d2lora.cost)",
        )
    else:
        # A small product: the tiny shape's MFU is a smoke figure, not a CPU benchmark.
        info.update(
            name=f"cpu ({os.cpu_count()} cores)",
            peak_flops=measure_matmul_peak("cpu", size=256, repeats=3),
            peak_flops_source="bf16 256^3 matmul on the CPU, mean of 3 (d2lora.cost)",
        )
    return info


def versions() -> dict:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from d2lora.provenance import git_commit

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": sys.version.split()[0],
        "git_commit": git_commit(ROOT),
    }


# ----------------------------------------------------------------------------- stages


class Run:
    """One invocation: the config, where things go, and the summary rewritten after every stage."""

    def __init__(self, config: dict, out: Path, summary: dict):
        self.config, self.out, self.summary = config, out, summary
        self.work = out / "work"
        self.model_dir = self.work / "model" / "base"
        self.data_dir = self.work / "data"
        self.device = summary["device"]["device"]
        self.levers: dict[str, set] = {}  # lever stages: method -> the levers to run (none named: all)
        # Training levers' micro-batches: Table 2's, or the tiny shape's own (TINY_HPARAMS).
        self.lever_micro_batch = TABLE2_MICRO_BATCH
        self.without_plain = False  # lever stages: skip plain and the process warm-up (--without-plain)
        self.profile_steps = 0  # training stages: optimizer steps to profile (0: none)
        self.write()

    def write(self) -> None:
        self.summary["updated_utc"] = _now()
        write_json(self.out / "summary.json", self.summary)

    def adapter(self, stage: str) -> Path:
        return self.work / "adapters" / stage

    def trained(self, stage: str) -> bool:
        return (self.adapter(stage) / "training.json").is_file()


def ensure_base_model(run: Run) -> dict:
    from d2lora import models

    timing_path = run.work / "model" / "prepare.json"
    wanted = {
        k: run.config["model"].get(k) for k in ("source", "architecture", "tokenizer", "seed", "dtype", "init_device")
    }
    if (
        (run.model_dir / "source.json").is_file()
        and timing_path.is_file()
        and read_json(timing_path)["wanted"] == wanted
    ):
        log(f"base model: reusing {run.model_dir}")
        return {**read_json(timing_path)["result"], "reused": True}
    log(f"base model: {run.config['model']['source']} {run.config['model'].get('architecture')}")
    init_s: list[float] = []
    hash_s: list[float] = []
    start = time.perf_counter()
    with timed(models, "_random_init", run.device, init_s), timed(models, "sha256_file", "cpu", hash_s):
        record = models.prepare_base_model(run.config["model"], run.model_dir)
    seconds = time.perf_counter() - start
    weights = sum(p.stat().st_size for p in run.model_dir.glob("*.safetensors"))
    result = {
        "seconds": round(seconds, 2),
        "init_seconds": round(sum(init_s), 2),
        "hash_seconds": round(sum(hash_s), 2),
        "save_and_tokenizer_seconds": round(seconds - sum(init_s) - sum(hash_s), 2),
        "parameters": record["parameters"],
        "dtype": record["dtype"],
        "init_device": record.get("init_device", "cpu"),
        "weights_gb": round(weights / 1e9, 3),
        "folder": str(run.model_dir),
        "reused": False,
    }
    write_json(timing_path, {"wanted": wanted, "result": result})
    log(f"base model: {record['parameters']:,} parameters, {result['weights_gb']} GB in {seconds:.1f} s")
    return result


def lengthened_rows(rows: list[dict], tokenizer, tokens: int) -> list[dict]:
    """Training rows whose answers (chosen, and rejected where a row has one) are each repeated until
    prompt and answer hold at least `tokens` tokens (the chat template's few aside): rows and pairs
    as long as a longer dataset's, made from the rows at hand."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def repeated(prompt: int, answer: str) -> str:
        copies = max(1, -(-(tokens - prompt) // max(count(answer), 1)))
        return "\n\n".join([answer] * copies)

    out = []
    for row in rows:
        prompt = count(row["prompt"])
        longer = {"chosen": repeated(prompt, row["chosen"])}
        if row.get("rejected") is not None:
            longer["rejected"] = repeated(prompt, row["rejected"])
        out.append({**row, **longer})
    return out


def lengthened_train_file(run: Run, tokens: int) -> Path:
    """The math training rows lengthened to `tokens` (lengthened_rows), written once under work/data."""
    from d2lora.io import read_jsonl, write_jsonl
    from d2lora.models import load_tokenizer

    path = run.data_dir / f"math_rows{tokens}" / "train.jsonl"
    if not path.is_file():
        rows = lengthened_rows(read_jsonl(run.data_dir / "math" / "train.jsonl"), load_tokenizer(run.model_dir), tokens)
        write_jsonl(path, rows)
    return path


def cell_n(config: dict, method: str) -> int:
    sizes = [c.n for c in grid.training_cells(config) if c.method == method and c.task == "math"]
    if not sizes:
        raise ValueError(f"the config's experiments train no math cell with method '{method}'")
    return max(sizes)


def _gib(mb: float | None) -> float | None:
    return None if mb is None else round(mb / 1024, 2)


def method_summary(
    record: dict, stage_seconds: float, load_seconds: float, peak_flops: float | None, reserved: float | None
) -> dict:
    """Rates of one training record (training.json), in the units the summary reports."""
    hp = record["hparams"]
    tokens, seconds, steps = int(record["train_tokens"]), float(record["train_seconds"]), int(record["global_steps"])
    params = int(record["model_parameters"])
    grad_norms = [float(e["grad_norm"]) for e in record["log_history"] if "grad_norm" in e]
    allocated = _gib(record.get("peak_gpu_memory_mb"))
    return {
        "phase": record["phase"],
        "method": record["method"],
        "init": record.get("init", "d2lora warm-up"),
        "n": record.get("n"),
        "rows": record["rows_trained"],
        "epochs": hp["epochs"],
        "steps": steps,
        "batch_size": int(hp["batch_size"]),
        "grad_accum": int(hp.get("grad_accum", 1)),
        "rows_per_step": int(hp["batch_size"]) * int(hp.get("grad_accum", 1)),
        "max_length": int(hp.get("max_length", 1024)),
        # What the cell trained with: no_checkpointing_up_to_tokens may have turned the setting off.
        "gradient_checkpointing": bool(
            record.get("checkpointing", {}).get("on", hp.get("gradient_checkpointing", False))
        ),
        "checkpointing": record.get("checkpointing"),
        "bf16": bool(hp["bf16"]),
        "base_dtype": record.get("base_weights_dtype"),
        "padding_free": bool(hp.get("padding_free", False)),
        "group_by_length": bool(hp.get("group_by_length", False)),
        "precompute_reference": bool(hp.get("precompute_reference", False)),
        # What trained: TRL turns every dropout off for DPO and ORPO unless keep_dropout.
        "lora_dropout": float(record.get("dropout", {}).get("while_training", record["lora"].get("dropout", 0.0))),
        "fast_paths": record.get("fast_paths"),
        "trainer_setup_seconds": record.get("trainer_setup_seconds"),
        "precision": record["precision"],
        "train_tokens": tokens,
        "tokens_per_row": round(record["sequence_tokens_per_epoch"] / record["rows_trained"], 2),
        "train_seconds": seconds,
        "tokens_per_second": round(tokens / seconds, 2),
        "seconds_per_step": round(seconds / steps, 4),
        "mfu": 4.0 * params * tokens / seconds / peak_flops if peak_flops else None,
        "model_parameters": params,
        "trainable_parameters": int(record["trainable_parameters"]),
        "peak_allocated_gib": allocated,
        "peak_reserved_gib": reserved,
        "fits_80gb": None if reserved is None else reserved <= FITS_GIB,
        "stage_seconds": round(stage_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "overhead_seconds": round(stage_seconds - seconds, 2),
        "grad_norm_mean": sum(grad_norms) / len(grad_norms) if grad_norms else None,
        "train_loss": record["train_loss"],
    }


def steady_rates(result: dict, seconds_per_step: float | None, peak_flops: float | None) -> dict:
    """Rates past the first STEADY_AFTER steps, at the run's mean tokens per step."""
    if seconds_per_step is None:
        return {"steady_seconds_per_step": None}
    tokens_per_second = result["train_tokens"] / result["steps"] / seconds_per_step
    return {
        "steady_seconds_per_step": round(seconds_per_step, 4),
        "steady_tokens_per_second": round(tokens_per_second, 2),
        "steady_mfu": 4.0 * result["model_parameters"] * tokens_per_second / peak_flops if peak_flops else None,
    }


def compile_free_rates(result: dict, clock: StepClock, peak_flops: float | None) -> dict:
    """steady_rates over the steps past STEADY_AFTER that made no graph, and which steps did."""
    rates = steady_rates(result, clock.compile_free_seconds_per_step(), peak_flops)
    return {
        "compiling_steps": clock.compiling_steps(),
        **{key.replace("steady_", "compile_free_"): value for key, value in rates.items()},
    }


@contextlib.contextmanager
def inductor_config(settings: dict | None):
    """Compiled decoder layers made with inductor's `settings` over the pipeline's own
    (fast_paths.COMPILE_OPTIONS) for the block (nothing when None); an unknown name is refused before
    anything runs."""
    if not settings:
        yield
        return
    import torch._inductor.config

    from d2lora.training import fast_paths

    unknown = sorted(k for k in settings if not hasattr(torch._inductor.config, k))
    if unknown:
        raise ValueError(f"inductor: unknown torch._inductor.config settings {unknown}")
    with mock.patch.dict(fast_paths.COMPILE_OPTIONS, settings):
        yield


def train_stage(
    run: Run, stage: str, overrides: dict | None = None, name: str | None = None, n: int | None = None
) -> dict:
    """One training stage: the warm-up or one cell of `stage`'s method (n rows: the config's cell by
    default), its hyperparameters updated with `overrides`, the adapter written as `name` (default: the
    stage). An override "inductor" sets inductor's options for the stage's compiled layers, and is
    recorded as such."""
    overrides = dict(overrides or {})
    inductor = overrides.pop("inductor", None)
    with inductor_config(inductor):
        result = train_once(run, stage, overrides, name=name, n=n)
    if inductor:
        result["inductor"] = inductor
    return result


def train_once(run: Run, stage: str, overrides: dict, name: str | None = None, n: int | None = None) -> dict:
    """train_stage with torch's settings as they are."""
    from d2lora.training import run as training

    cfg, seed = run.config, int(run.config["seed"])
    name = name or stage
    overrides = dict(overrides)
    lora = {**cfg["training"]["lora"], **overrides.pop("lora", {})}
    row_tokens = overrides.pop("row_tokens", None)
    train_file = lengthened_train_file(run, int(row_tokens)) if row_tokens else run.data_dir / "math" / "train.jsonl"
    hparams = dict(cfg["training"]["warmup"] if stage == "warmup" else cfg["training"]["adapt"][stage], **overrides)
    checkpoints = int(cfg["training"]["checkpoint_steps"])  # validated: the schema filled it
    loads: list[float] = []
    profile = None
    if run.profile_steps > 0 and not name.endswith("process_warmup"):
        profile = ProfileSteps(PROFILE_FIRST_STEP, run.profile_steps, run.out / f"profile_{name}.txt", run.device)
    if hparams.get("compile_layers"):
        # A pipeline job compiles in a fresh process: no graphs (or recompile count) from an earlier stage.
        import torch._dynamo

        torch._dynamo.reset()
    clock = StepClock(run.device)
    start = time.perf_counter()
    observers = [clock] + ([profile] if profile is not None else [])
    # Round 21: compiled layers' loss left eager's from the second step on the GPU; this says whether
    # the trained model's compiled forward still computes the eager one, and whether it stays causal.
    probe = CompiledAgainstEager() if hparams.get("compile_layers") else None
    observers += [probe] if probe is not None else []
    # Round 22: compiled layers' logged loss fell below eager's with equal gradient norms; every lever
    # records how far its adapter moved and its loss on fixed rows, so levers compare by their weights.
    movement = AdapterMovement() if name.startswith("levers_") and not name.endswith("process_warmup") else None
    observers += [movement] if movement is not None else []
    computed = ComputedTokens()
    observers.append(computed)
    with timed(training, "load_model", run.device, loads), observed_trainer(training, observers):
        if stage == "warmup":
            record = training.run_warmup(
                run.model_dir,
                run.data_dir / "warmup" / "train.jsonl",
                lora=lora,
                hp=hparams,
                out_dir=run.adapter(name),
                seed=seed,
                device=run.device,
                checkpoint_steps=checkpoints,
            )
        else:
            warm = run.trained("warmup")
            record = training.run_adaptation(
                run.model_dir,
                train_file,
                method=stage,
                init="d2lora" if warm else "lora",
                n=n or cell_n(cfg, stage),
                lora=lora,
                hp=hparams,
                out_dir=run.adapter(name),
                seed=seed,
                warmup_dir=run.adapter("warmup") if warm else None,
                device=run.device,
                checkpoint_steps=checkpoints,
            )
    result = method_summary(
        record, time.perf_counter() - start, sum(loads), run.summary["device"]["peak_flops"], reserved_gib(run.device)
    )
    result.update(computed.result())
    if probe is not None:
        result["compiled_against_eager"] = probe.run()
    if movement is not None:
        result["adapter_movement"] = movement.run()
        log(f"{name}: adapter_movement {result['adapter_movement']}")
    if profile is not None:
        result["profile"] = profile.result
    else:  # a profiled step runs several times slower
        result.update(steady_rates(result, clock.steady_seconds_per_step(), run.summary["device"]["peak_flops"]))
        result.update(compile_free_rates(result, clock, run.summary["device"]["peak_flops"]))
    log(
        f"{name}: {result['steps']} steps, {result['tokens_per_second']:.0f} tokens/s, {result['seconds_per_step']:.2f} s/step, "
        f"padding {result['padding_share']} of the computed tokens, "
        f"peak {result['peak_allocated_gib']} GiB allocated / {result['peak_reserved_gib']} reserved"
    )
    return result


def eval_settings(config: dict, benchmark: str = "gsm8k") -> dict:
    """The settings the workflow's evaluate rule passes (common.smk eval_settings) for `benchmark`."""
    settings = dict(config["evaluation"][benchmark])
    settings["dtype"] = config["evaluation"].get("dtype", "auto")
    settings["engine"] = config["evaluation"].get("engine", "pipeline")
    if config["evaluation"].get("merge_adapter"):
        settings["merge_adapter"] = True
    if benchmark == "gsm8k":
        settings["prompt_template"] = config["datasets"]["math"]["prompt_template"]
    return settings


def gsm8k_setting_names() -> set[str]:
    """Every key eval_settings may give: the schema's evaluation.gsm8k and what eval_settings adds."""
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    gsm8k = schema["properties"]["evaluation"]["properties"]["gsm8k"]["properties"]
    return set(gsm8k) | {"dtype", "engine", "merge_adapter", "prompt_template"}


def small_model(run: Run) -> tuple[Path, dict]:
    """SMALL_MODEL_CONFIG's real model, prepared once into work/model/small, and its GSM8K settings."""
    import yaml
    from snakemake.utils import validate

    from d2lora import models

    config = yaml.safe_load(SMALL_MODEL_CONFIG.read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))  # fills the schema's defaults
    folder = run.work / "model" / "small"
    if not (folder / "source.json").is_file():
        start = time.perf_counter()
        record = models.prepare_base_model(config["model"], folder)
        run.summary["small_model"] = {
            "config": str(SMALL_MODEL_CONFIG.relative_to(ROOT)),
            "parameters": record["parameters"],
            "seconds": round(time.perf_counter() - start, 2),
        }
        log(f"small model: {record['parameters']:,} parameters in {folder}")
    settings = eval_settings(config)
    if run.summary["shape"] == "tiny":
        settings.update(
            max_new_tokens=TINY["evaluation.gsm8k.max_new_tokens"],
            batch_size=TINY["evaluation.gsm8k.batch_size"],
            dtype=TINY["evaluation.dtype"],
        )
    return folder, settings


KV_HEADS_REPEATED = "_kv_heads_repeated"
# A lever named <lever>_next_cell repeats <lever>'s settings later in the same process (a server's next cell).
NEXT_CELL = "_next_cell"


def kv_heads_repeated(source: Path, folder: Path) -> Path:
    """A copy of the model in `source` with every KV head repeated for each query head it serves (as
    transformers' repeat_kv does at run time): the same function with one query head per KV head."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                weight = projection.weight.unflatten(0, (config.num_key_value_heads, head_dim))
                projection.weight = torch.nn.Parameter(weight.repeat_interleave(groups, dim=0).flatten(0, 1))
                if projection.bias is not None:
                    bias = projection.bias.unflatten(0, (config.num_key_value_heads, head_dim))
                    projection.bias = torch.nn.Parameter(bias.repeat_interleave(groups, dim=0).flatten())
            layer.self_attn.num_key_value_groups = 1
    config.num_key_value_heads = config.num_attention_heads
    shutil.copytree(
        source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "config.json")
    )
    model.save_pretrained(folder)
    log(f"small model, {config.num_attention_heads} KV heads (from {config.num_attention_heads // groups}): {folder}")
    return folder


def eval_cell(run: Run, adapter: Path | None) -> dict:
    """The cell an evaluation records: the math SFT cell whose adapter it reads, or the base model."""
    return {
        "task": "math",
        "method": "sft" if adapter else "none",
        "init": read_json(adapter / "training.json")["init"] if adapter else "lora",
        "n": cell_n(run.config, "sft") if adapter else 0,
        "seed": int(run.config["seed"]),
    }


def gsm8k_stage(
    run: Run,
    overrides: dict | None = None,
    name: str = "gsm8k",
    adapter_stage: str | None = "sft",
    model_dir: Path | None = None,
    settings: dict | None = None,
) -> dict:
    """One GSM8K evaluation through the pipeline's evaluator: by default the paper-shape model with the
    `adapter_stage` adapter (if trained) at the config's settings; `model_dir`/`settings` name another."""
    from d2lora.evaluation import run as evaluation
    from d2lora.evaluation.partial import sidecar_path

    adapter = run.adapter(adapter_stage) if adapter_stage and run.trained(adapter_stage) else None
    cell = eval_cell(run, adapter)
    out = run.work / "eval" / name
    predictions = out / "predictions.jsonl"
    sidecar_path(predictions).unlink(missing_ok=True)  # measure a whole run, not a resumed one
    loads: list[float] = []
    with counting_generate(run.device) as calls, timed(evaluation, "load_model", run.device, loads):
        record = evaluation.evaluate_cell(
            "gsm8k",
            cell=cell,
            model_dir=model_dir or run.model_dir,
            adapter_dir=adapter,
            data_dir=run.data_dir / "math",
            settings={**(settings or eval_settings(run.config)), **(overrides or {})},
            scores_path=out / "scores.json",
            predictions_path=predictions,
            device=run.device,
        )
    generated = sum(c["rows"] * c["new_tokens"] for c in calls)
    generate_seconds = sum(c["seconds"] for c in calls)
    reserved = reserved_gib(run.device)
    result = {
        "cell": cell,
        "adapter": str(adapter) if adapter else None,
        "items": record["n_items"],
        "max_new_tokens": int(record["settings"]["max_new_tokens"]),
        "batch_size": int(record["settings"]["batch_size"]),
        "dtype": record["settings"]["dtype"],
        "merge_adapter": bool(record["settings"].get("merge_adapter", False)),
        "cache": record["settings"].get("cache", "dynamic"),
        "compile": record["settings"].get("compile", True),
        "rows_leave_every": record["settings"].get("rows_leave_every", 0),
        "packed_gqa": record["settings"].get("packed_gqa", False),
        "filled_cache_only": record["settings"].get("filled_cache_only", False),
        "native_gqa": record["settings"].get("native_gqa", False),
        "prompt_width": record["settings"].get("prompt_width", "batch"),
        "cudnn_attention": record["settings"].get("cudnn_attention", True),
        "flex_attention": record["settings"].get("flex_attention", False),
        "eval_seconds": record["eval_seconds"],
        "load_seconds": round(sum(loads), 2),
        "generate_seconds": round(generate_seconds, 3),
        "generated_tokens": generated,
        "generated_tokens_to_stop": sum(c["tokens_to_stop"] for c in calls),
        "generated_tokens_per_second": round(generated / generate_seconds, 2) if generate_seconds else None,
        "generated_tokens_per_eval_second": round(generated / record["eval_seconds"], 2),
        "peak_allocated_gib": _gib(record["peak_gpu_memory_mb"]),
        "peak_reserved_gib": reserved,
        "fits_80gb": None if reserved is None else reserved <= FITS_GIB,
        "accuracy": record["metrics"]["accuracy"],
        "outputs_sha256": _outputs_digest(predictions),
        "random_weights": model_dir is None,
        "model": (model_dir or run.model_dir).name,
        "generate_calls": calls,
    }
    log(
        f"{name}: {result['items']} items, {generated:,} tokens in {generate_seconds:.1f} s of generate, "
        f"{record['eval_seconds']:.1f} s in all"
    )
    return result


def benchmark_stage(run: Run, benchmark: str) -> dict:
    """One evaluation of another benchmark of the grid (ARC-Easy, titles) through the pipeline's
    evaluator, on the SFT cell's adapter (the base model when there is none): what such a job costs,
    not what it scores (every evaluation of the grid reads the same model shape)."""
    from d2lora.benchmarks import eval_roles
    from d2lora.evaluation import run as evaluation
    from d2lora.evaluation.partial import sidecar_path

    adapter = run.adapter("sft") if run.trained("sft") else None
    cell = eval_cell(run, adapter)
    out = run.work / "eval" / benchmark
    predictions = out / "predictions.jsonl"
    sidecar_path(predictions).unlink(missing_ok=True)  # measure a whole run, not a resumed one
    settings = eval_settings(run.config, benchmark)
    record = evaluation.evaluate_cell(
        benchmark,
        cell=cell,
        model_dir=run.model_dir,
        adapter_dir=adapter,
        data_dir=run.data_dir / eval_roles()[benchmark],
        settings=settings,
        scores_path=out / "scores.json",
        predictions_path=predictions,
        device=run.device,
    )
    reserved = reserved_gib(run.device)
    result = {
        "cell": cell,
        "adapter": str(adapter) if adapter else None,
        "items": record["n_items"],
        "batch_size": int(settings["batch_size"]),
        "max_new_tokens": settings.get("max_new_tokens"),
        "merge_adapter": bool(record["settings"].get("merge_adapter", False)),
        "dtype": record["settings"]["dtype"],
        "eval_seconds": record["eval_seconds"],
        "load_seconds": record["load_seconds"],
        "items_per_second": record["items_per_second"],
        "peak_allocated_gib": _gib(record["peak_gpu_memory_mb"]),
        "peak_reserved_gib": reserved,
        "fits_80gb": None if reserved is None else reserved <= FITS_GIB,
        "metrics": record["metrics"],
    }
    log(
        f"{benchmark}: {result['items']} items in {record['eval_seconds']:.1f} s (loading {record['load_seconds']:.1f} s)"
    )
    return result


def _outputs_digest(predictions: Path) -> str:
    """SHA-256 of the generated texts in item order: equal in two summaries exactly when every answer
    is, so runs in other processes or on other nodes compare without their predictions files."""
    from d2lora.io import read_jsonl

    outputs = sorted((r["id"], r["output"]) for r in read_jsonl(predictions))
    return hashlib.sha256(json.dumps(outputs, ensure_ascii=False).encode()).hexdigest()


def _predictions_by_id(path: Path) -> dict | None:
    """A predictions file's rows by item id; None where the file is missing (its lever failed)."""
    from d2lora.io import read_jsonl

    return {r["id"]: r for r in read_jsonl(path)} if path.is_file() else None


def _same_outputs(left: dict | None, right: dict | None) -> float | None:
    """Fraction of items whose generated text is identical in two predictions (_predictions_by_id)."""
    if not (left and right is not None):
        return None
    return round(sum(left[i]["output"] == right.get(i, {}).get("output") for i in left) / len(left), 4)


def _accuracy_against(left: dict | None, right: dict | None) -> dict | None:
    """Accuracy of predictions `right` minus `left` (_predictions_by_id) over the same items, with the
    paired bootstrap's 95 % interval (d2lora.results.statistics): whether a decoding lever changes the
    score beyond noise."""
    from d2lora.results.statistics import paired_bootstrap

    if not left or right is None or set(left) != set(right) or any("correct" not in r for r in left.values()):
        return None
    items = sorted(left)
    result = paired_bootstrap([float(left[i]["correct"]) for i in items], [float(right[i]["correct"]) for i in items])
    return {
        "difference": round(result.diff, 5),
        "ci95": [round(result.low, 5), round(result.high, 5)],
        "within_noise": result.low <= 0.0 <= result.high,
    }


def lever_stage(run: Run, method: str) -> dict:
    """Every lever of LEVERS[method] in turn, each against the plain path (the first) in this process:
    results by lever name, each with its speed-up over plain. One lever failing (say, out of memory)
    is recorded and the next one runs."""
    results = run.summary.setdefault("levers", {}).setdefault(method, {})
    if method not in GSM8K_LEVERS and not run.without_plain:
        process_warmup(run, method)
    small = small_model(run) if method == "gsm8k_small" else None
    chosen = run.levers.get(method)
    for lever, overrides in LEVERS[method].items():
        if chosen is not None and lever not in chosen:
            continue
        name = f"levers_{method}_{lever}"
        log(f"lever {method}/{lever}: {overrides or 'plain'}")
        free_memory(run.device)
        try:
            if method == "gsm8k":
                tokens = min(LEVER_GSM8K_TOKENS, int(run.config["evaluation"]["gsm8k"]["max_new_tokens"]))
                result = gsm8k_stage(
                    run,
                    {"max_new_tokens": tokens, **PLAIN_DECODING, **overrides},
                    name=name,
                    adapter_stage="levers_sft_plain",
                )
            elif method == "gsm8k_small":
                folder = small[0]
                if lever.removesuffix(NEXT_CELL).endswith(KV_HEADS_REPEATED):
                    folder = kv_heads_repeated(folder, run.work / "model" / f"small{KV_HEADS_REPEATED}")
                result = gsm8k_stage(run, overrides, name=name, adapter_stage=None, model_dir=folder, settings=small[1])
            else:
                result = train_stage(run, method, lever_overrides(method, overrides, run.lever_micro_batch), name=name)
        except Exception as err:  # noqa: BLE001 -- the next lever still runs
            import traceback

            traceback.print_exc()
            results[lever] = {"overrides": overrides, "error": f"{type(err).__name__}: {err}"[:2000]}
            log(f"lever {method}/{lever} failed: {type(err).__name__}: {str(err)[:300]}")
        else:
            results[lever] = {"overrides": overrides, **result}
        finally:
            free_memory(run.device)
        _compare_to_plain(run, method, results)
        run.write()
    return results


def lever_overrides(method: str, overrides: dict, micro_batch: dict = TABLE2_MICRO_BATCH) -> dict:
    """A training lever's overrides of the preset's settings: LEVER_EPOCHS, LEVER_SPEED_SETTINGS at the
    schema's defaults and `micro_batch` (Table 2's), then the lever's own."""
    speed = {key: value for key, value in defaults("$defs/hparams").items() if key in LEVER_SPEED_SETTINGS}
    return {"epochs": LEVER_EPOCHS[method], **speed, **micro_batch, **overrides}


def process_warmup(run: Run, method: str) -> None:
    """Two optimizer steps of plain `method`, thrown away, so that no measured lever pays the process's
    first-training costs (CUDA context, cuBLAS handles and heuristics, the caching allocator's growth)."""
    hp = run.config["training"]["adapt"][method]
    rows = int(hp["batch_size"]) * int(hp.get("grad_accum", 1)) * 2
    start = time.perf_counter()
    try:
        plain = {**lever_overrides(method, LEVERS[method]["plain"], run.lever_micro_batch), "epochs": 1}
        train_stage(run, method, plain, name=f"levers_{method}_process_warmup", n=rows)
        outcome = {"rows": rows, "seconds": round(time.perf_counter() - start, 2)}
    except Exception as err:  # noqa: BLE001 -- a failed warm-up only means the levers run cold
        outcome = {"rows": rows, "error": f"{type(err).__name__}: {err}"[:500]}
    run.summary.setdefault("lever_warmups", {})[method] = outcome
    free_memory(run.device)


def _compare_to_plain(run: Run, method: str, results: dict) -> None:
    plain = results.get("plain")
    if not plain or "error" in plain:
        return

    def predictions(lever: str) -> dict | None:
        return _predictions_by_id(run.work / "eval" / f"levers_{method}_{lever}" / "predictions.jsonl")

    plain_predictions = predictions("plain") if method in GSM8K_LEVERS else None
    for lever, result in results.items():
        if "error" in result:
            continue
        if method in GSM8K_LEVERS:
            result["speedup_generate"] = round(plain["generate_seconds"] / result["generate_seconds"], 3)
            result["speedup_eval"] = round(plain["eval_seconds"] / result["eval_seconds"], 3)
            lever_predictions = predictions(lever)
            result["outputs_equal_to_plain"] = _same_outputs(plain_predictions, lever_predictions)
            result["accuracy_minus_plain"] = _accuracy_against(plain_predictions, lever_predictions)
            first_cell = lever.removesuffix(NEXT_CELL)
            if first_cell != lever and first_cell in results:
                # the same settings twice in one process: whether the answers repeat bit for bit
                result["outputs_equal_to_first_cell"] = _same_outputs(predictions(first_cell), lever_predictions)
        else:
            # Training time plus the trainer's setup (tokenizing; a precomputed reference's pass), per row
            # and epoch: levers may train other epochs than plain (preset_918_steps: 54 against 1).
            def cost(r):
                return (r["train_seconds"] + (r.get("trainer_setup_seconds") or 0.0)) / (r["rows"] * r["epochs"])

            result["speedup_tokens_per_second"] = round(result["tokens_per_second"] / plain["tokens_per_second"], 3)
            result["speedup_with_setup"] = round(cost(plain) / cost(result), 3)
            result["seconds_per_row_epoch"] = round(cost(result), 4)


def lever_ratios(levers: dict) -> dict:
    """The issue's per-method comparisons, from the fastest lever of each method that ran."""

    def best(method, key):
        runs = [r for r in levers.get(method, {}).values() if "error" not in r and key in r]
        return min(runs, key=lambda r: r[key]) if runs else None

    out = {}
    sft, dpo = best("sft", "seconds_per_row_epoch"), best("dpo", "seconds_per_row_epoch")
    if sft and dpo:
        out["dpo_pair_over_sft_example"] = round(dpo["seconds_per_row_epoch"] / sft["seconds_per_row_epoch"], 3)
    fastest = best("sft", "seconds_per_row_epoch")
    if fastest:
        out["sft_best_mfu"] = fastest["mfu"]
    for method in GSM8K_LEVERS:
        gen = best(method, "generate_seconds")
        if gen:
            out[f"{method}_best_generate_seconds"] = gen["generate_seconds"]
    out.update(grouping_ratios(levers))
    return out


def grouping_ratios(levers: dict) -> dict:
    """Where a preference method's preset and preset_grouped levers both ran (with or without plain):
    the grouped lever's compile-free step against the preset's (same pairs a step, so a step ratio is
    the speed-up) and the positions each computed, whose ratio bounds what the step could gain."""
    out = {}
    for method in ("dpo", "orpo"):
        runs = levers.get(method, {})
        preset, grouped = runs.get("preset"), runs.get("preset_grouped")
        if not (preset and grouped) or "error" in preset or "error" in grouped:
            continue
        ratio = {}
        if preset.get("compile_free_seconds_per_step") and grouped.get("compile_free_seconds_per_step"):
            ratio["step"] = round(preset["compile_free_seconds_per_step"] / grouped["compile_free_seconds_per_step"], 3)
        if preset.get("computed_tokens") and grouped.get("computed_tokens"):
            ratio["computed_positions"] = round(preset["computed_tokens"] / grouped["computed_tokens"], 3)
        if ratio:
            out[f"{method}_preset_over_grouped"] = ratio
    return out


def training_rates(methods: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Per training stage, the tokens/s a grid cell trains at, and for a stage whose layers compiled the
    seconds beyond its compile-free rate: the compile (and the first steps), which a job pays once. A
    50-step stage's mean rate would charge that compile to every token of a 2,500-step cell.
    Every compiled stage is charged the largest compile of the run: a grid job is a fresh process,
    while a later stage of this one reuses much of what the first compiled (Round 29: ORPO after
    DPO paid 22.6 s against DPO's 70.1)."""
    rates, compile_seconds = {}, {}
    for stage, m in methods.items():
        compiled = compile_split(m)
        if compiled:
            rates[stage], compile_seconds[stage] = compiled
        else:
            rates[stage] = m["tokens_per_second"]
    fresh_process_compile = max(compile_seconds.values(), default=0.0)
    return rates, {stage: fresh_process_compile for stage in compile_seconds}


def compile_split(m: dict) -> tuple[float, float] | None:
    """A training run whose first steps compiled: its compile-free tokens/s and the seconds beyond that
    rate (the compile, which a job pays once); None where nothing compiled."""
    free = m.get("compile_free_tokens_per_second")
    if not (m.get("compiling_steps") and free):
        return None
    return free, max(0.0, m["train_seconds"] - m["train_tokens"] / free)


def grid_estimate(run: Run) -> dict:
    import yaml
    from paper_scale_estimate import estimate

    methods = run.summary["methods"]
    overheads = [m["overhead_seconds"] for m in methods.values()]
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    rates, compile_seconds = training_rates(methods)
    return estimate(
        paper,
        rates,
        {k: v for k, v in run.summary["tokens_per_row"].items() if isinstance(v, (int, float))},
        sum(overheads) / len(overheads) if overheads else None,
        {b: run.summary[b]["eval_seconds"] for b in ("gsm8k", *OTHER_BENCHMARKS) if b in run.summary},
        compile_seconds,
        large_sft_cells(run.summary, paper, max(compile_seconds.values(), default=0.0)),
    )


def large_sft_cells(summary: dict, paper: dict, fresh_process_compile: float = 0.0) -> dict:
    """The preset compiles the layers of SFT cells of at least compile_layers_min_steps steps, which
    the sft stage's few hundred rows never reach: where the lever preset_918_steps ran, its
    compile-free rate and compile stand for those cells (estimate's large_cells); else none.
    Its compile is charged at least the run's largest (fresh_process_compile): after stages that
    compiled in the same process the lever reuses their kernels (Round 33: 41 s, against 103 s
    as a process's first compile in Round 32), while a grid job is a fresh process."""
    compiled = compile_split(summary.get("levers", {}).get("sft", {}).get(LARGE_SFT_LEVER, {}))
    hp = paper["training"]["adapt"]["sft"]
    if not compiled or not hp.get("compile_layers"):
        return {}
    spec = {"tokens_per_second": compiled[0], "compile_seconds": max(compiled[1], fresh_process_compile)}
    return {"sft": {**spec, "min_steps": int(hp.get("compile_layers_min_steps", 0))}}


def _stage(run: Run, stage: str, work) -> None:
    """Run one stage, keep its result or its error, and rewrite the summary either way."""
    log(f"stage {stage}")
    free_memory(run.device)
    try:
        result = work()
    except Exception as err:  # one stage failing (say, out of memory) must not lose the others
        import traceback

        traceback.print_exc()
        run.summary["errors"][stage] = f"{type(err).__name__}: {err}"[:2000]
        log(f"stage {stage} failed: {type(err).__name__}: {str(err)[:300]}")
    else:
        if stage == "gsm8k" or stage in OTHER_BENCHMARKS:
            run.summary[stage] = result
        elif stage.startswith("levers_"):
            run.summary["lever_ratios"] = lever_ratios(run.summary["levers"])
        else:
            run.summary["methods"][stage] = result
        run.summary["stages_done"].append(stage)
    finally:
        free_memory(run.device)
    run.summary["grid_estimate"] = grid_estimate(run)
    run.write()


def stage_work(run: Run, stage: str):
    if stage.startswith("levers_"):
        return lever_stage(run, stage.removeprefix("levers_"))
    if stage in OTHER_BENCHMARKS:
        return benchmark_stage(run, stage)
    return gsm8k_stage(run) if stage == "gsm8k" else train_stage(run, stage)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "paper_shape.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_paper_scale")
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_ORDER),
        help=f"comma-separated subset of {','.join(STAGES)}, run in the order given; "
        "'prepare': none, only the base model and the data (what benchmarks/evaluate_startup.py reads)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    parser.add_argument(
        "--levers",
        default="",
        help="lever stages run only these levers, e.g. sft:plain,sft:no_checkpointing_batch16x1 "
        "(plain is always run too, so every ratio has its plain run beside it, unless --without-plain)",
    )
    parser.add_argument(
        "--without-plain",
        action="store_true",
        help="with --levers: run only the named training levers, without plain and the process's warm-up "
        "run (no speed-up ratios; the levers compare with each other by their compile-free rates), "
        "for a short run of two levers side by side",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help=f"profile this many optimizer steps of every training stage (from step {PROFILE_FIRST_STEP}: after the first), "
        "writing profile_<stage>.txt and the top operators into the summary",
    )
    parser.add_argument(
        "--shape",
        choices=["paper", "tiny"],
        default="paper",
        help="tiny: a 2-layer model, a few rows, steps, prompts and tokens (tests, CPU)",
    )
    parser.add_argument(
        "--print-eval-settings",
        metavar="JSON",
        help="print the GSM8K settings the evaluate rule would pass for --config and --shape, updated with "
        'JSON (e.g. \'{"cache": "static"}\'), as JSON, and exit (for benchmarks/evaluate_startup.py)',
    )
    args = parser.parse_args(argv)
    if args.print_eval_settings is not None:
        try:
            args.print_eval_settings = json.loads(args.print_eval_settings)
        except json.JSONDecodeError as err:
            parser.error(f"--print-eval-settings: not JSON: {err}")
        if not isinstance(args.print_eval_settings, dict):
            parser.error("--print-eval-settings: give a JSON object of settings")
        unknown = sorted(set(args.print_eval_settings) - gsm8k_setting_names())
        if unknown:
            # A misspelt key would otherwise reach the evaluator as a setting nothing reads.
            parser.error(f"--print-eval-settings: unknown {unknown}; known: {', '.join(sorted(gsm8k_setting_names()))}")
    args.stages = list(dict.fromkeys(s.strip() for s in args.stages.split(",") if s.strip()))
    levers: dict[str, set] = {}
    for item in filter(None, (x.strip() for x in args.levers.split(","))):
        method, _, lever = item.partition(":")
        if method not in LEVERS or lever not in LEVERS[method]:
            parser.error(
                f"--levers: unknown '{item}'; known: " + ", ".join(f"{m}:{name}" for m in LEVERS for name in LEVERS[m])
            )
        levers.setdefault(method, set() if args.without_plain else {"plain"}).add(lever)
    if args.without_plain and (not levers or set(levers) & set(GSM8K_LEVERS)):
        # GSM8K levers read the plain SFT lever's adapter; a training lever's ratios need no plain run.
        parser.error("--without-plain: name training levers (sft, dpo, orpo) with --levers")
    args.levers = levers
    if args.stages == ["prepare"]:
        args.stages = []
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {', '.join(STAGES)}, or prepare alone")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from paper_scale_data import prepare_data, tokens_per_row

    from d2lora.models import resolve_device

    config = load_config(args.config, args.shape, args.device)
    if args.print_eval_settings is not None:
        settings = {**eval_settings(config), **args.print_eval_settings}  # load_config applied the tiny shape
        print(json.dumps(settings))
        sys.exit(0)
    device = resolve_device(config.get("device", "auto"))
    log(f"config {args.config} (shape {args.shape}) on {device}; out {args.out}")
    summary = {
        "kind": "paper_scale",
        "status": "running",
        "shape": args.shape,
        "started_utc": _now(),
        "config_path": str(args.config),
        "stages_requested": args.stages,
        "stages_done": [],
        "errors": {},
        "methods": {},
        "versions": versions(),
        "device": device_info(device),
        "config": config,
    }
    run = Run(config, args.out.resolve(), summary)
    if args.shape == "tiny":
        run.lever_micro_batch = {key: TINY_HPARAMS[key] for key in TABLE2_MICRO_BATCH}
    run.levers = args.levers
    run.without_plain = args.without_plain
    run.profile_steps = max(0, args.profile_steps)
    log(f"device {summary['device']['name']}: peak {summary['device']['peak_flops'] / 1e12:.1f} TFLOP/s")
    summary["base_model"] = ensure_base_model(run)
    run.write()
    start = time.perf_counter()
    summary["data"] = prepare_data(config, run.data_dir)
    from d2lora.models import load_tokenizer

    summary["tokens_per_row"] = tokens_per_row(
        load_tokenizer(run.model_dir), run.data_dir, int(config["training"]["warmup"].get("max_length", 1024))
    )
    summary["data"]["seconds"] = round(time.perf_counter() - start, 2)
    run.write()
    for stage in summary["stages_requested"]:
        _stage(run, stage, lambda s=stage: stage_work(run, s))
    summary.setdefault("grid_estimate", grid_estimate(run))  # set by every stage; none ran for 'prepare'
    summary["status"] = "complete" if not summary["errors"] else "complete with errors"
    summary["wall_seconds"] = round(time.perf_counter() - began, 2)
    run.write()
    log(
        f"done: {run.out / 'summary.json'}; paper grid ~{summary['grid_estimate']['total_gpu_hours']} GPU-hours"
        f"{'' if summary['grid_estimate']['complete'] else ' (partial: ' + '; '.join(summary['grid_estimate']['missing']) + ')'}"
    )
    return summary


if __name__ == "__main__":
    sys.exit(0 if not main()["errors"] else 1)
