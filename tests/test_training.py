"""Training: warm-up and adaptation on the tiny model, and the DPO reference policy."""

from __future__ import annotations

import json

import pytest
import torch

from d2lora.io import write_jsonl
from d2lora.training.adapters import AdapterError, check_adapter_matches
from d2lora.training.run import run_adaptation, run_warmup
from d2lora.training.trainers import build_trainer, conversational

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
HP = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 96}


def _pairs(count: int) -> list[dict]:
    return [
        {
            "id": f"row-{i}",
            "prompt": f"What is {i} plus {i}?",
            "chosen": f"{i} plus {i} is {2 * i}. The answer is \\boxed{{{2 * i}}}.",
            "rejected": f"{i} plus {i} is {2 * i + 1}. The answer is \\boxed{{{2 * i + 1}}}.",
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, _pairs(6))
    return path


@pytest.fixture(scope="module")
def warmup_adapter(tiny_model_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("warmup") / "adapter"
    run_warmup(tiny_model_dir, train_file, lora=LORA, hp=HP, out_dir=out, seed=0, device="cpu")
    return out


def test_warmup_writes_a_safetensors_adapter_and_a_record(warmup_adapter):
    names = {p.name for p in warmup_adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    record = json.loads((warmup_adapter / "training.json").read_text())
    assert record["phase"] == "warmup" and record["rows"] == 6 and record["global_steps"] == 3
    assert record["train_tokens"] > 0
    # HP leaves bf16 unset (auto); the suite reads auto as no native bf16 (conftest).
    assert record["hparams"]["bf16"] is False
    assert record["precision"]["setting"] == "auto" and "D2LORA_NATIVE_BF16=0" in record["precision"]["reason"]
    manifest = json.loads((warmup_adapter / "manifest.json").read_text())
    assert manifest["params"]["precision"] == record["precision"]


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
@pytest.mark.parametrize("init", ["lora", "d2lora"])
def test_adaptation_trains_on_the_first_n_rows(method, init, tiny_model_dir, train_file, warmup_adapter, tmp_path):
    out = tmp_path / "adapter"
    hp = dict(HP, beta=0.1) if method in ("dpo", "orpo") else HP
    record = run_adaptation(
        tiny_model_dir,
        train_file,
        method=method,
        init=init,
        n=4,
        lora=LORA,
        hp=hp,
        out_dir=out,
        seed=0,
        warmup_dir=warmup_adapter if init == "d2lora" else None,
        device="cpu",
    )
    assert record["train_ids"] == ["row-0", "row-1", "row-2", "row-3"]
    assert record["global_steps"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == LORA["rank"]


def test_d2lora_starts_from_the_warmup_weights(tiny_model_dir, warmup_adapter):
    from safetensors.torch import load_file

    from d2lora.models import load_model

    model = load_model(tiny_model_dir, adapter_dir=warmup_adapter, trainable=True)
    saved = load_file(str(warmup_adapter / "adapter_model.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(float(v.abs().sum()) > 0 for v in loaded.values())
    key = next(k for k in saved if "lora_B" in k)
    match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
    assert match and torch.equal(match[0], saved[key])


def test_adapter_of_another_rank_is_refused(warmup_adapter, tiny_model_dir):
    with pytest.raises(AdapterError, match="rank 4"):
        check_adapter_matches(warmup_adapter, {"rank": 8, "alpha": 8}, tiny_model_dir)


def test_n_zero_trains_nothing(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError, match="n=0"):
        run_adaptation(
            tiny_model_dir, train_file, method="sft", init="lora", n=0, lora=LORA, hp=HP, out_dir=tmp_path / "a", seed=0
        )


def _sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs, computed here without TRL, for chosen and rejected halves."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1).chunk(2)


def _dpo_trainer(tiny_model_dir, warmup_adapter, reference, tmp_path):
    from datasets import Dataset

    from d2lora.models import load_model, load_tokenizer
    from d2lora.training.warm_start import warm_started_adapter

    model = warm_started_adapter(load_model(tiny_model_dir), warmup_adapter, LORA, None, tiny_model_dir)
    dataset = Dataset.from_list(conversational(_pairs(4), "dpo"))
    hp = dict(HP, beta=0.1, reference=reference)
    return build_trainer(
        "dpo", model, load_tokenizer(tiny_model_dir), dataset, hp=hp, output_dir=str(tmp_path), seed=0, use_cpu=True
    )


def test_dpo_reference_is_the_policy_as_adaptation_starts(tiny_model_dir, warmup_adapter, tmp_path):
    trainer = _dpo_trainer(tiny_model_dir, warmup_adapter, "initial_policy", tmp_path)
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
        policy_chosen, policy_rejected = _sequence_logps(model, batch)
        with model.disable_adapter():
            base_chosen, _ = _sequence_logps(model, batch)
    torch.testing.assert_close(ref_chosen, policy_chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref_rejected, policy_rejected, atol=1e-4, rtol=1e-5)
    # The warm-up adapter moved the policy away from the base, so this comparison can fail.
    assert not torch.allclose(ref_chosen, base_chosen, atol=1e-3)


def test_dpo_reference_can_be_the_bare_base(tiny_model_dir, warmup_adapter, tmp_path):
    trainer = _dpo_trainer(tiny_model_dir, warmup_adapter, "base", tmp_path)
    model = trainer.model
    assert set(model.peft_config) == {"default"}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ref_chosen, _ = trainer.compute_ref_log_probs(model, batch)
        with model.disable_adapter():
            base_chosen, _ = _sequence_logps(model, batch)
    torch.testing.assert_close(ref_chosen, base_chosen, atol=1e-4, rtol=1e-5)


def test_token_counts_are_comparable_across_methods(tiny_model_dir, train_file, tmp_path):
    """train_tokens = tokenized sequences x epochs for every method: a preference row runs two
    sequences (prompt + chosen, prompt + rejected), an SFT row one (prompt + chosen)."""
    records = {}
    for method in ("sft", "dpo", "orpo"):
        hp = dict(HP, beta=0.1) if method != "sft" else HP
        records[method] = run_adaptation(
            tiny_model_dir,
            train_file,
            method=method,
            init="lora",
            n=4,
            lora=LORA,
            hp=hp,
            out_dir=tmp_path / method,
            seed=0,
            device="cpu",
        )
    for method, record in records.items():
        assert record["train_tokens"] == round(record["sequence_tokens_per_epoch"] * float(HP["epochs"])), method
        assert record["model_parameters"] > record["trainable_parameters"] > 0
        assert record["peak_gpu_memory_mb"] is None  # not measured on the CPU
    sft, dpo, orpo = (records[m]["sequence_tokens_per_epoch"] for m in ("sft", "dpo", "orpo"))
    assert dpo > sft and orpo > sft  # two sequences per row
    # DPO and ORPO tokenize the same conversations: their counts agree up to template details.
    assert abs(dpo - orpo) <= 0.1 * dpo
