"""Cost of the adaptive-rank adapters against plain LoRA: time per optimizer step and peak memory.

    python benchmarks/dynamic_lora_overhead.py                                   # tiny random Llama, CPU
    python benchmarks/dynamic_lora_overhead.py --arch smollm2-135m --device cuda --batch 32 --seq-len 512
    python benchmarks/dynamic_lora_overhead.py --model results/model/base --device cuda --batch 32 --seq-len 512

What is measured. The Dynamic LoRA abstract (arXiv 2501.14859) claims "only 0.1% more resources
than standard LoRA" without saying which resource. Here: for plain LoRA of rank r, peft's AdaLoRA
and our Dynamic LoRA at the same rank budget (d2lora.training.adaptive), on the same model,
the same batches and the same seed, the wall-clock time of each optimizer step (forward, backward,
gradient clipping, the variants' callbacks, optimizer step, zero_grad; the batch is already
loaded), timed from the Trainer's on_step_begin to on_step_end with the device synchronized. The
mean over the measured steps includes the reallocation steps (the amortized cost); the median
shows the typical step; the max shows the worst (a reallocation). On CUDA, also the peak memory
allocated during training. The overhead ratio is variant / LoRA. Training is a
`transformers.Trainer` with a causal-LM loss computed outside the model (as TRL does), so
AdaLoRA's in-forward regularizer is not computed; its gradient is added by our callback.

Needs only torch, transformers, peft (and safetensors); imports d2lora.training.adaptive from
this checkout's src/ (that package imports nothing else from d2lora). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from d2lora.training.adaptive import adapter_report, adaptive_adapter  # noqa: E402

CLAIM = (
    "Dynamic LoRA abstract: 'only 0.1% more resources than standard LoRA' (resource unspecified). "
    "Measured here: wall-clock seconds per optimizer step (mean incl. reallocation steps, median, max) "
    "and peak CUDA memory, same model/batches/seed; ratio = variant / LoRA."
)

ARCHS = {
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
    # The shapes of SmolLM2-135M-Instruct (the pipeline's stand-in model), random weights: the
    # adapters' cost depends on the shapes only.
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a saved causal LM folder; default: a random Llama of --arch built here")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS), help="shapes of the random model (no --model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off for CPU), fp32 weights as in the pipeline",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured first steps per variant")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["lora", "adalora", "dynamic"],
        help="variants, each NAME or NAME:option=value:... (options of d2lora.training.adaptive.DEFAULTS), "
        "e.g. dynamic:forward=active",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat the variants, interleaved, this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the result JSON here")
    return p.parse_args(argv)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(**ARCHS[args.arch]))
    return model.to(args.device)


class Batches(torch.utils.data.Dataset):
    """Fixed random token rows (same for every variant), labels = inputs."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


class StepTimer(TrainerCallback):
    def __init__(self, device: str):
        self.device, self.times, self._t0 = device, [], None

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def parse_variant(spec: str) -> dict:
    name, *pairs = spec.split(":")
    variant = {"adapter": name}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            variant[key] = json.loads(value)
        except json.JSONDecodeError:
            variant[key] = value
    return variant


def run_variant(spec: str, args) -> dict:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = build_model(args)
    total = args.warmup + args.steps
    lora = {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": args.target_modules}
    variant = parse_variant(spec)
    if variant["adapter"] == "dynamic":
        variant.setdefault("seed", args.seed)
    torch.manual_seed(args.seed)
    model, callbacks = adaptive_adapter(base, lora, variant, total)
    timer = StepTimer(args.device)
    bf16 = args.bf16 if args.bf16 is not None else args.device == "cuda"
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=args.device == "cpu",
            bf16=bf16,
            seed=args.seed,
            data_seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        data = Batches(total * args.batch, args.seq_len, base.config.vocab_size, args.seed)
        trainer = Trainer(
            model=model, args=targs, train_dataset=data, callbacks=[*callbacks, timer], compute_loss_func=causal_lm_loss
        )
        trainer.train()
    measured = timer.times[args.warmup :]
    report = adapter_report(model)
    result = {
        "mean_s": statistics.fmean(measured),
        "median_s": statistics.median(measured),
        "max_s": max(measured),
        "steps_measured": len(measured),
        "trainable_parameters": report["trainable_parameters"],
        "allocated_parameters": report.get(
            "peak_allocated_parameters", report.get("peak_trainable_parameters", report["allocated_parameters"])
        ),
        "total_rank": report["total_rank"],
        "reallocations": report.get("reallocations", report.get("allocations", 0)),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    }
    del trainer, model, base
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [v.strip() for v in args.variants if v.strip()]
    if "lora" not in names:
        names.insert(0, "lora")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            runs[name].append(run_variant(name, args))
            print(f"{name}: {runs[name][-1]['mean_s'] * 1e3:.2f} ms/step (mean)", file=sys.stderr)
    results = {}
    for name, rs in runs.items():
        merged = dict(rs[0])
        for key in ("mean_s", "median_s", "max_s"):
            merged[key] = statistics.median(r[key] for r in rs)
        if args.device == "cuda":
            merged["peak_memory_mib"] = max(r["peak_memory_mib"] for r in rs)
        merged["rounds"] = [{k: r[k] for k in ("mean_s", "median_s", "max_s")} for r in rs]
        results[name] = merged
    ref = results["lora"]
    for name, r in results.items():
        r["time_ratio_mean"] = r["mean_s"] / ref["mean_s"]
        r["time_ratio_median"] = r["median_s"] / ref["median_s"]
        r["memory_ratio"] = (r["peak_memory_mib"] / ref["peak_memory_mib"]) if args.device == "cuda" else None

    print(f"\n{CLAIM}")
    print(
        f"model={args.model or 'random Llama ' + args.arch + ' ' + json.dumps(ARCHS[args.arch])} device={args.device} "
        f"batch={args.batch} seq_len={args.seq_len} steps={args.steps} (+{args.warmup} warm-up) rank={args.rank} "
        f"rounds={args.rounds} torch threads={torch.get_num_threads()}"
    )
    width = max(9, *(len(n) for n in results))
    header = (
        f"{'variant':<{width}} {'mean ms':>9} {'median ms':>10} {'max ms':>9} {'x LoRA mean':>12} {'x LoRA med':>11} "
        f"{'peak MiB':>9} {'x LoRA mem':>11} {'trainable':>10} {'allocated':>10} {'realloc':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        mem = f"{r['peak_memory_mib']:9.1f}" if r["peak_memory_mib"] is not None else f"{'-':>9}"
        memr = f"{r['memory_ratio']:11.4f}" if r["memory_ratio"] is not None else f"{'-':>11}"
        print(
            f"{name:<{width}} {r['mean_s'] * 1e3:9.2f} {r['median_s'] * 1e3:10.2f} {r['max_s'] * 1e3:9.2f} "
            f"{r['time_ratio_mean']:12.4f} {r['time_ratio_median']:11.4f} {mem} {memr} "
            f"{r['trainable_parameters']:10d} {r['allocated_parameters']:10d} {r['reallocations']:7d}"
        )
    summary = {
        "benchmark": "dynamic_lora_overhead",
        "claim_checked": CLAIM,
        "model": args.model or f"random-llama-{args.arch}",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "bf16": args.bf16 if args.bf16 is not None else args.device == "cuda",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "rank": args.rank,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "results": results,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
