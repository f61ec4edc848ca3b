"""Adaptive-rank adapters (d2lora.training.adaptive): AdaLoRA and Dynamic LoRA.

Budgets, reallocation under a fixed budget, TRL runs with the callbacks, save -> reload on a fresh
base, determinism, resume from a checkpoint, and where AdaLoRA's orthogonality regularizer goes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from d2lora.training import adaptive as dl
from d2lora.training.adaptive import base as adaptive_base
from d2lora.training.adaptive.rank_moves import plan_moves
from d2lora.training.trainers import build_trainer, conversational

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
HP = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "constant", "batch_size": 2, "max_length": 96}
# TINY_ARCH (tests/conftest.py): hidden 32, intermediate 64, 4 heads of 8, 2 kv heads (k/v out 16), 2 layers.
# in+out per layer: q 64 + k 48 + v 48 + o 64 + gate 96 + up 96 + down 96 = 512; 14 modules in all.
SUM_IN_OUT = 2 * 512
MODULES = 14


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


def _base(tiny_model_dir, seed: int = 0):
    from transformers import set_seed

    from d2lora.models import load_model

    set_seed(seed)
    return load_model(tiny_model_dir)


def _kill_mlp_of_layer_1(model) -> None:
    """Layer 1's MLP gets a zero input: its adapters (gate, up, down) can change nothing."""
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.zero_()


def _train(
    tiny_model_dir,
    tokenizer,
    tmp_path,
    variant: dict,
    method: str = "sft",
    rows: int = 6,
    seed: int = 0,
    kill_layer_1_mlp: bool = False,
    checkpoint_steps: int = 0,
    resume_from=None,
    out_name: str = "out",
):
    from datasets import Dataset

    base = _base(tiny_model_dir, seed)
    if kill_layer_1_mlp:
        _kill_mlp_of_layer_1(base)
    steps = rows // HP["batch_size"]
    model, callbacks = dl.adaptive_adapter(
        base, LORA, dict(variant, **({"seed": seed} if variant["adapter"] == "dynamic" else {})), steps
    )
    hp = dict(HP, beta=0.1) if method in ("dpo", "orpo") else HP
    trainer = build_trainer(
        method,
        model,
        tokenizer,
        Dataset.from_list(conversational(_pairs(rows), method)),
        hp=hp,
        output_dir=str(tmp_path / out_name),
        seed=seed,
        use_cpu=True,
        checkpoint_steps=checkpoint_steps,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return model, callbacks, result


def _adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}


# --------------------------------------------------------------------------------------------
# budgets


def test_budgets_are_equal_at_the_same_rank(tiny_model_dir):
    base_shapes = [
        (m.in_features, m.out_features)
        for name, m in _base(tiny_model_dir).named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    assert len(base_shapes) == MODULES and sum(i + o for i, o in base_shapes) == SUM_IN_OUT

    lora, _ = dl.adaptive_adapter(_base(tiny_model_dir), LORA, {"adapter": "lora"}, 10)
    dynamic, _ = dl.adaptive_adapter(_base(tiny_model_dir), LORA, {"adapter": "dynamic"}, 10)
    adalora, _ = dl.adaptive_adapter(_base(tiny_model_dir), LORA, {"adapter": "adalora"}, 10)

    expected = LORA["rank"] * SUM_IN_OUT  # 4096
    assert expected == 4096
    assert dl.trainable_budget(lora) == expected == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert dl.trainable_budget(dynamic) == expected
    assert dl.allocated_parameters(dynamic) == 8 * SUM_IN_OUT  # room for max_rank = 2r components
    assert sum(dl.rank_pattern(dynamic).values()) == sum(dl.rank_pattern(lora).values()) == 4 * MODULES
    # AdaLoRA before its first allocation: all init_r = 6 triplets live (P, Q and one singular value each).
    assert dl.trainable_budget(adalora) == 6 * (SUM_IN_OUT + MODULES) == 6228
    assert dl.allocated_parameters(adalora) == 6228 == sum(p.numel() for p in adalora.parameters() if p.requires_grad)
    assert dl.adapter_report(adalora)["rank_budget"] == 4 * MODULES


def test_plan_moves_gives_rank_where_the_weakest_component_matters_most():
    strong, weak, flat = [5.0, 4.0, 3.0, 2.0], [0.1, 0.05, 0.02, 0.01], [3.0, 2.5, 2.0, 1.5]
    none = [[False] * 8] * 3
    moves = plan_moves(
        [strong + [0] * 4, weak + [0] * 4, flat + [0] * 4],
        [4, 4, 4],
        none,
        [[0, 1, 2]],
        min_rank=1,
        max_rank=8,
        hysteresis=0.5,
        max_moves=[10],
    )
    # The weak module gives its weakest components (0.01, 0.02, 0.05) to the strongest tail (2.0);
    # the flat one (tail 1.5 > 0.5 * 2.0) keeps its rank;
    # the weak module keeps min_rank.
    assert moves == [(1, 3, 0), (1, 2, 0), (1, 1, 0)]
    # Same spectra everywhere: nothing moves (hysteresis), and nothing crosses a group.
    assert plan_moves([strong + [0] * 4] * 2, [4, 4], none[:2], [[0, 1]], 1, 8, 0.5, [10]) == []
    assert plan_moves([strong + [0] * 4, weak + [0] * 4], [4, 4], none[:2], [[0], [1]], 1, 8, 0.5, [10, 10]) == []
    # Protected (just granted) components are never pruned; max_moves caps a round.
    protected = [[False] * 8, [False, False, False, True] + [False] * 4]
    assert plan_moves([strong + [0] * 4, weak + [0] * 4], [4, 4], protected, [[0, 1]], 1, 8, 0.5, [1]) == [(1, 2, 0)]


# --------------------------------------------------------------------------------------------
# reallocation in a real TRL run


@pytest.fixture(scope="module")
def dead_layer_run(tiny_model_dir, tokenizer, tmp_path_factory):
    model, callbacks, result = _train(
        tiny_model_dir,
        tokenizer,
        tmp_path_factory.mktemp("dead"),
        {"adapter": "dynamic"},
        rows=16,
        kill_layer_1_mlp=True,
    )
    return model, callbacks, result


def test_dynamic_moves_rank_to_the_layer_that_matters_under_a_fixed_budget(dead_layer_run):
    model, callbacks, result = dead_layer_run
    report = dl.adapter_report(model)
    assert result.global_step == 8 and callbacks[0].events["optimizer_step"] == 8
    assert report["reallocations"] >= 3 and report["moves"] > 0
    keys = list(report["rank_pattern"])
    mlp = {k: i for i, k in enumerate(keys) if ".mlp." in k}
    dead = [i for k, i in mlp.items() if ".layers.1." in k]
    alive = [i for k, i in mlp.items() if ".layers.0." in k]
    assert len(dead) == len(alive) == 3
    for entry in report["history"]:
        # After every reallocation: the total rank and the trainable-parameter count are LoRA's,
        # and so is the rank of each equal-cost group (gate/up/down all cost 96 per rank).
        assert entry["total_rank"] == LORA["rank"] * MODULES
        assert entry["trainable_parameters"] == LORA["rank"] * SUM_IN_OUT
        assert sum(entry["ranks"][i] for i in dead + alive) == 6 * LORA["rank"]
    final = report["history"][-1]["ranks"]
    assert all(final[i] == 1 for i in dead)  # the dead MLP kept only min_rank
    assert sum(final[i] for i in alive) == 6 * LORA["rank"] - 3
    assert report["rank_pattern"] == {k: final[i] for i, k in enumerate(keys)}
    # Saved as a standard LoRA of exactly LoRA's size.
    assert dl.trainable_budget(model) == LORA["rank"] * SUM_IN_OUT
    cfg = model.peft_config["default"]
    assert cfg.rank_pattern == report["rank_pattern"]
    assert all(cfg.alpha_pattern[k] == LORA["alpha"] * r / LORA["rank"] for k, r in cfg.rank_pattern.items())


def test_dynamic_is_deterministic(dead_layer_run, tiny_model_dir, tokenizer, tmp_path):
    model, _, _ = dead_layer_run
    again, _, _ = _train(tiny_model_dir, tokenizer, tmp_path, {"adapter": "dynamic"}, rows=16, kill_layer_1_mlp=True)
    assert dl.adapter_report(again)["history"] == dl.adapter_report(model)["history"]
    first, second = _adapter_state(model), _adapter_state(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------
# each variant through TRL, saved and reloaded


@pytest.fixture(scope="module")
def sft_runs(tiny_model_dir, tokenizer, tmp_path_factory):
    runs = {}
    for adapter in ("adalora", "dynamic"):
        runs[adapter] = _train(tiny_model_dir, tokenizer, tmp_path_factory.mktemp(adapter), {"adapter": adapter})
    return runs


@pytest.mark.parametrize("adapter", ["adalora", "dynamic"])
def test_three_step_sft_runs_the_callback(adapter, sft_runs):
    model, callbacks, result = sft_runs[adapter]
    assert result.global_step == 3
    assert callbacks[0].events == {"pre_optimizer_step": 3, "optimizer_step": 3}
    report = dl.adapter_report(model)
    assert report["adapter"] == adapter and report["total_rank"] == LORA["rank"] * MODULES
    if adapter == "adalora":
        assert report["final_allocation"] == "scheduled" and report["allocations"] >= 1
        assert report["last_orth_reg"] is not None and report["last_orth_reg"] > 0
        # Masked triplets have a zero singular value in the live model.
        for key, layer in adaptive_base.lora_layers(model):
            assert int((layer.lora_E["default"] != 0).sum()) <= report["rank_pattern"][key]
    else:
        assert report["reallocations"] == 1 and report["input_scale"]["set_at_step"] == 0
        assert report["input_scale"]["mean_abs_log"] > 0.01  # the input scale is not the identity


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("adapter", ["adalora", "dynamic"])
def test_saved_adapter_reloads_to_the_same_function(adapter, sft_runs, tiny_model_dir, tmp_path):
    from d2lora.models import load_model

    model, _, _ = sft_runs[adapter]
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11]])
    expected = _logits(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"), selected_adapters=["default"], safe_serialization=True)
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("ADALORA" if adapter == "adalora" else "LORA")
    reloaded = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter")  # how evaluation loads adapters
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(load_model(tiny_model_dir), ids), expected, atol=1e-3)
    ranks = dl.rank_pattern(reloaded) if adapter == "dynamic" else None
    if adapter == "dynamic":
        assert ranks == dl.rank_pattern(model) and sum(ranks.values()) == LORA["rank"] * MODULES
    else:
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        kept = sum(v.shape[0] for k, v in saved.items() if k.endswith("lora_E"))
        assert kept == LORA["rank"] * MODULES


@pytest.mark.parametrize("method", ["dpo", "orpo"])
@pytest.mark.parametrize("adapter", ["adalora", "dynamic"])
def test_preference_methods_train_and_save(adapter, method, tiny_model_dir, tokenizer, tmp_path):
    from d2lora.models import load_model

    model, callbacks, result = _train(tiny_model_dir, tokenizer, tmp_path, {"adapter": adapter}, method=method, rows=4)
    assert result.global_step == 2 and callbacks[0].events["optimizer_step"] == 2
    if method == "dpo":
        assert set(model.peft_config) == {"default", "ref"}
    model.set_adapter("default")
    ids = torch.tensor([[1, 5, 9, 23, 42]])
    expected = _logits(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"), selected_adapters=["default"], safe_serialization=True)
    reloaded = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# AdaLoRA's orthogonality regularizer


def test_orthogonal_regularizer_matches_peft_and_is_added_to_the_gradient(tiny_model_dir):
    model, callbacks = dl.adaptive_adapter(_base(tiny_model_dir), LORA, {"adapter": "adalora"}, 10)
    controller = callbacks[0].controller
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    params = [p for p, _ in controller._orth_terms()]
    cfg = model.peft_config["default"]

    def loss(weight):
        cfg.orth_reg_weight = weight
        return model(input_ids=ids, labels=ids).loss

    peft_term = loss(0.5) - loss(0.0)  # what AdaLoraModel.forward adds to outputs.loss
    torch.testing.assert_close(peft_term, 0.5 * controller.regularizer_value(), rtol=1e-5, atol=1e-7)
    expected = torch.autograd.grad(peft_term, params)
    cfg.orth_reg_weight = 0.0
    for p in params:
        p.grad = None
    controller.add_orthogonal_gradient()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_trl_losses_ignore_adaloras_regularizer(method, tiny_model_dir, tokenizer, tmp_path):
    """Why the callback adds it: TRL 1.16 builds these losses without `outputs.loss`."""
    from datasets import Dataset

    model, callbacks = dl.adaptive_adapter(_base(tiny_model_dir), LORA, {"adapter": "adalora"}, 2)
    hp = dict(HP, beta=0.1) if method != "sft" else HP
    trainer = build_trainer(
        method,
        model,
        tokenizer,
        Dataset.from_list(conversational(_pairs(2), method)),
        hp=hp,
        output_dir=str(tmp_path),
        seed=0,
        use_cpu=True,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    cfg = model.peft_config["default"]
    losses = []
    for weight in (0.0, 50.0):
        cfg.orth_reg_weight = weight
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(model, dict(batch))))
    assert losses[0] == losses[1]


# --------------------------------------------------------------------------------------------
# resume from a checkpoint


@pytest.mark.parametrize("adapter", ["adalora", "dynamic"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(adapter, tiny_model_dir, tokenizer, tmp_path):
    full, _, _ = _train(
        tiny_model_dir, tokenizer, tmp_path, {"adapter": adapter}, rows=12, checkpoint_steps=3, out_name="full"
    )
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / f"{adaptive_base.STATE_FILE}.json").is_file()
    # As in d2lora.training.run: the killed run's checkpoints sit in the Trainer's output_dir.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed, _, result = _train(
        tiny_model_dir,
        tokenizer,
        tmp_path,
        {"adapter": adapter},
        rows=12,
        checkpoint_steps=3,
        resume_from=tmp_path / "resumed" / "checkpoint-3",
        out_name="resumed",
    )
    assert result.global_step == 6
    full_report, resumed_report = dl.adapter_report(full), dl.adapter_report(resumed)
    assert resumed_report["rank_pattern"] == full_report["rank_pattern"]
    assert resumed_report["history"] == full_report["history"]
    first, second = _adapter_state(full), _adapter_state(resumed)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=1e-5)
