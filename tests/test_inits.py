"""The init axis (d2lora.training.inits): peft's init_lora_weights variants, with and without the warm-up.

Tiny random Llama on the CPU. Tolerances: logits compared across two float32 computations of the
same function (W_res + sBA vs W + s(BA - B0A0), merged or not) agree to RELOAD_ATOL; the residual
base rebuilt from A0/B0 must be bit-identical to the one peft built.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from d2lora.io import write_jsonl
from d2lora.training import inits, variants, warm_start
from d2lora.training import run as training_run
from d2lora.training.adapters import AdapterError
from d2lora.training.checkpoints import INITIAL_ADAPTER_DIR, checkpoint_dir_for
from d2lora.training.run import run_adaptation, run_warmup

LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
HP = {"learning_rate": 5e-3, "epochs": 1, "scheduler": "cosine", "batch_size": 2, "max_length": 96}
INITS = ["default", "gaussian", "pissa", "pissa_niter_2", "olora", "eva", "corda"]
RESIDUAL = {"pissa", "pissa_niter_2", "olora", "corda"}
RELOAD_ATOL = 1e-4  # float32 logits of order 1; measured differences are ~1e-6 (printed with -s)
INIT_ATOL = 1e-5  # residual inits at initialisation: W_res + sB0A0 vs W


def _rows(count: int) -> list[dict]:
    return [
        {
            "id": f"row-{i}",
            "prompt": f"What is {i} plus {i}?",
            "chosen": f"{i} plus {i} is {2 * i}. The answer is {2 * i}.",
            "rejected": f"{i} plus {i} is {2 * i + 1}. The answer is {2 * i + 1}.",
        }
        for i in range(count)
    ]


def _variant(init: str, warmup: bool = False, rows: int = 256) -> dict:
    return {"adapter": "lora", "init_lora_weights": init, "warmup": warmup, "calibration_rows": rows}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, _rows(6))
    return path


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = inits.calibration_texts(_rows(3), tokenizer)
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def base_logits(tiny_model, batch):
    with torch.no_grad():
        return tiny_model(**batch).logits


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _fresh(tiny_model_dir, tokenizer, init: str, seed: int = 0):
    from d2lora.models import load_model

    torch.manual_seed(seed)
    texts = inits.calibration_texts(_rows(6), tokenizer)
    return inits.fresh_adapter(load_model(tiny_model_dir), LORA, _variant(init), texts, tokenizer, max_length=96)


def _lora_weights(model, which: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if f"{which}.default" in n]


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Target-layer weights under the adapter, keyed by their name in the plain model."""
    return {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("base_layer.weight")
    }


@pytest.mark.parametrize("init", INITS)
def test_an_init_starts_from_the_base_models_function(init, tiny_model_dir, tokenizer, tiny_model, batch, base_logits):
    from d2lora.models import load_model

    model = _fresh(tiny_model_dir, tokenizer, init)
    diff = float((_logits(model, batch) - base_logits).abs().max())
    print(f"\n{init}: max |logits - base| at init = {diff:.2e}")
    b_zero = all(float(b.detach().abs().max()) == 0 for b in _lora_weights(model, "lora_B"))
    original = dict(tiny_model.named_parameters())
    rewritten = _base_weights(model)
    if init in RESIDUAL:
        assert diff <= INIT_ATOL
        assert not b_zero, "a residual init puts the top components into B"
        assert any(not torch.equal(w, original[n]) for n, w in rewritten.items()), "the base weights must be W_res"
        # The residual base rebuilt from the ORIGINAL weights and A0/B0 is bit-identical to peft's.
        state = getattr(model, inits.RESIDUAL_ATTR)
        rebuilt = load_model(tiny_model_dir)
        assert inits.residualize(rebuilt, state["state_dict"], inits.scaling_of(state["config"])) == len(rewritten)
        rebuilt_params = dict(rebuilt.named_parameters())
        assert all(torch.equal(rebuilt_params[n], w) for n, w in rewritten.items())
    else:
        assert diff == 0.0 and b_zero, "B = 0: the adapter adds nothing at init"
        assert all(torch.equal(w, original[n]) for n, w in rewritten.items()), "base weights must be untouched"
        assert not hasattr(model, inits.RESIDUAL_ATTR)
    # Saved configs must never run the init again (DPO's "ref" copy, from_pretrained).
    assert model.peft_config["default"].init_lora_weights is True
    if init == "eva":
        # EVA's A rows are principal directions of the layer inputs: orthonormal, unlike a kaiming init.
        a = _lora_weights(model, "lora_A")[0]
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    if init == "gaussian":
        a = torch.cat([w.flatten() for w in _lora_weights(model, "lora_A")])
        assert abs(float(a.std()) - 1 / LORA["rank"]) < 0.05


def _train_a_few_steps(model, batch, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("init", INITS)
def test_saved_adapter_loads_on_the_original_base_to_the_trained_function(
    init, tiny_model_dir, tokenizer, batch, base_logits, tmp_path
):
    from peft import PeftModel

    from d2lora.models import load_model

    model = _fresh(tiny_model_dir, tokenizer, init)
    _train_a_few_steps(model, batch)
    trained = _logits(model, batch)
    assert float((trained - base_logits).abs().max()) > 100 * RELOAD_ATOL, "training must move the function"
    out = tmp_path / "adapter"
    warm_start.save_adapter(model, out, _variant(init))

    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir), str(out))  # what evaluation does
    diff = float((_logits(reloaded, batch) - trained).abs().max())
    merged = load_model(tiny_model_dir, adapter_dir=out, merge_adapter=True)  # evaluation's merged path
    diff_merged = float((_logits(merged, batch) - trained).abs().max())
    config = json.loads((out / "adapter_config.json").read_text())
    print(
        f"\n{init}: reload on the original base: max |logits diff| {diff:.2e} (merged {diff_merged:.2e}); "
        f"saved rank {config['r']}"
    )
    assert diff <= RELOAD_ATOL and diff_merged <= RELOAD_ATOL
    assert config["init_lora_weights"] is True
    if init in RESIDUAL:
        assert config["r"] == 2 * LORA["rank"] and config["lora_alpha"] == 2 * LORA["alpha"]
        names = {p.name for p in (out / "residual").iterdir()}
        assert names == {"adapter_config.json", "initial.safetensors", "trained.safetensors", "residual.json"}
        assert not list(out.rglob("*/adapter_model.safetensors")), "d2lora.verify would take it for a result"
        assert warm_start.residual_record(out)["init_lora_weights"] == init
    else:
        assert config["r"] == LORA["rank"] and not (out / "residual").exists()


@pytest.fixture(scope="module")
def pissa_warmup(tiny_model_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("warmup-pissa") / "adapter"
    run_warmup(
        tiny_model_dir,
        train_file,
        lora=LORA,
        hp=HP,
        out_dir=out,
        seed=0,
        device="cpu",
        variant=_variant("pissa", warmup=True),
    )
    return out


def _first_batch_loss(model, tokenizer, tmp_path) -> float:
    from datasets import Dataset

    from d2lora.training.trainers import build_trainer, conversational

    trainer = build_trainer(
        "sft",
        model,
        tokenizer,
        Dataset.from_list(conversational(_rows(4), "sft")),
        hp=HP,
        output_dir=str(tmp_path),
        seed=0,
        use_cpu=True,
    )
    collated = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        return float(
            model(
                input_ids=collated["input_ids"], attention_mask=collated["attention_mask"], labels=collated["labels"]
            ).loss
        )


def test_adaptation_continues_a_pissa_warmup_on_the_same_residual_base(
    pissa_warmup, tiny_model_dir, tokenizer, batch, base_logits, tiny_model, train_file, tmp_path
):
    from peft import PeftModel
    from safetensors.torch import load_file

    from d2lora.models import load_model

    record = json.loads((pissa_warmup / "training.json").read_text())
    assert record["variant"]["init_lora_weights"] == "pissa" and record["variant"]["warmup"] is True
    assert "residual/initial.safetensors" in record["files"] and "residual/trained.safetensors" in record["files"]

    warm_fn = PeftModel.from_pretrained(load_model(tiny_model_dir), str(pissa_warmup))  # the warm-up's function
    variant = _variant("pissa", warmup=True)
    started = warm_start.warm_started_adapter(load_model(tiny_model_dir), pissa_warmup, LORA, variant, tiny_model_dir)
    diff = float((_logits(started, batch) - _logits(warm_fn, batch)).abs().max())
    assert float((_logits(warm_fn, batch) - base_logits).abs().max()) > 100 * RELOAD_ATOL, "warm-up moved nothing"
    assert diff <= RELOAD_ATOL
    # Its base is the warm-up's residual one: W - s·B0A0 with the warm-up's A0/B0, bit for bit.
    initial = load_file(str(pissa_warmup / "residual" / "initial.safetensors"))
    expected = load_model(tiny_model_dir)
    inits.residualize(expected, initial, LORA["alpha"] / LORA["rank"])
    expected_params = dict(expected.named_parameters())
    original = dict(tiny_model.named_parameters())
    rewritten = _base_weights(started)
    assert all(torch.equal(expected_params[n], w) for n, w in rewritten.items())
    assert all(not torch.equal(original[n], w) for n, w in rewritten.items())
    # The trainer's loss at step 0 is the warm-up's loss.
    loss_started = _first_batch_loss(started, tokenizer, tmp_path / "a")
    loss_warm = _first_batch_loss(
        PeftModel.from_pretrained(load_model(tiny_model_dir), str(pissa_warmup), is_trainable=True),
        tokenizer,
        tmp_path / "b",
    )
    print(
        f"\npissa warm start: max |logits diff| {diff:.2e}; step-0 loss {loss_started:.6f} vs warm-up {loss_warm:.6f}"
    )
    assert loss_started == pytest.approx(loss_warm, abs=1e-5)

    # A real adaptation from it: saved against the same A0/B0, loadable on the original base.
    out = tmp_path / "results" / "adapt"
    result = run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init="d2lora-pissa",
        n=4,
        lora=LORA,
        hp=HP,
        out_dir=out,
        seed=0,
        warmup_dir=pissa_warmup,
        device="cpu",
        variant=variant,
    )
    assert result["residual_base"]["init_lora_weights"] == "pissa" and result["global_steps"] == 2
    adapted_initial = load_file(str(out / "residual" / "initial.safetensors"))
    assert initial.keys() == adapted_initial.keys() and all(
        torch.equal(initial[k], adapted_initial[k]) for k in initial
    )
    chained = warm_start.warm_started_adapter(load_model(tiny_model_dir), out, LORA, variant, tiny_model_dir)
    plain = PeftModel.from_pretrained(load_model(tiny_model_dir), str(out))
    assert float((_logits(chained, batch) - _logits(plain, batch)).abs().max()) <= RELOAD_ATOL
    assert float((_logits(plain, batch) - _logits(warm_fn, batch)).abs().max()) > 100 * RELOAD_ATOL, (
        "adaptation moved nothing"
    )
    from d2lora.verify import verify

    findings, checked = verify(tmp_path / "results")
    assert checked > 0 and not [f for f in findings if f.fails], findings


def test_dpo_reference_copy_does_not_rerun_a_residual_init(pissa_warmup, tiny_model_dir, tokenizer, tmp_path):
    """TRL adds the "ref" adapter with the policy's config: were it still init 'pissa', the base
    would lose a second decomposition."""
    from datasets import Dataset

    from d2lora.models import load_model
    from d2lora.training.trainers import build_trainer, conversational

    model = warm_start.warm_started_adapter(
        load_model(tiny_model_dir), pissa_warmup, LORA, _variant("pissa", True), tiny_model_dir
    )
    before = _base_weights(model)
    trainer = build_trainer(
        "dpo",
        model,
        tokenizer,
        Dataset.from_list(conversational(_rows(4), "dpo")),
        hp=dict(HP, beta=0.1),
        output_dir=str(tmp_path),
        seed=0,
        use_cpu=True,
    )
    assert set(trainer.model.peft_config) == {"default", "ref"}
    after = _base_weights(trainer.model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5), "the reference is the policy as adaptation starts"


def test_dpo_against_the_bare_base_is_refused_for_residual_inits(tiny_model_dir, train_file, tmp_path):
    with pytest.raises(ValueError, match=r"training\.adapt\.dpo\.reference: 'base'.*'olora'"):
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="dpo",
            init="olora",
            n=4,
            lora=LORA,
            hp=dict(HP, beta=0.1, reference="base"),
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
            variant=_variant("olora"),
        )
    assert not list(tmp_path.iterdir())


def test_warmup_of_another_init_is_refused(pissa_warmup, tiny_model_dir, train_file, tmp_path):
    with pytest.raises(AdapterError, match=r"initialised with init_lora_weights 'pissa'.*'olora'"):
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="d2lora-olora",
            n=4,
            lora=LORA,
            hp=HP,
            out_dir=tmp_path / "out",
            seed=0,
            warmup_dir=pissa_warmup,
            device="cpu",
            variant=_variant("olora", warmup=True),
        )
    with pytest.raises(AdapterError, match=r"rank 4"):
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="d2lora-pissa",
            n=4,
            lora=dict(LORA, rank=8),
            hp=HP,
            out_dir=tmp_path / "out",
            seed=0,
            warmup_dir=pissa_warmup,
            device="cpu",
            variant=_variant("pissa", warmup=True),
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_driven_inits_record_their_calibration_rows(init, tiny_model_dir, train_file, tmp_path):
    from peft import PeftModel

    from d2lora.models import load_model

    out = tmp_path / "adapter"
    record = run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init=init,
        n=4,
        lora=LORA,
        hp=HP,
        out_dir=out,
        seed=0,
        device="cpu",
        variant=_variant(init, rows=3),
    )
    saved = json.loads((out / "training.json").read_text())
    assert saved["calibration"]["ids"] == record["train_ids"][:3] == ["row-0", "row-1", "row-2"]
    assert saved["calibration"]["rows"] == 3 and saved["calibration"]["phase"] == "adapt"
    assert saved["variant"] == _variant(init, rows=3)
    PeftModel.from_pretrained(load_model(tiny_model_dir), str(out))  # loads on the original base
    # Other inits read no data and record none.
    plain = (
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="pissa",
            n=2,
            lora=LORA,
            hp=HP,
            out_dir=tmp_path / "p",
            seed=0,
            device="cpu",
            variant=_variant("pissa", rows=3),
        )
        if init == "eva"
        else None
    )
    assert plain is None or plain["calibration"] is None


def test_warmup_calibration_reads_the_warmup_rows(tiny_model_dir, train_file, tmp_path):
    out = tmp_path / "warmup"
    record = run_warmup(
        tiny_model_dir,
        train_file,
        lora=LORA,
        hp=HP,
        out_dir=out,
        seed=0,
        device="cpu",
        variant=_variant("corda", warmup=True, rows=2),
    )
    assert record["calibration"]["ids"] == ["row-0", "row-1"] and record["calibration"]["phase"] == "warmup"
    adapted = run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init="d2lora-corda",
        n=2,
        lora=LORA,
        hp=HP,
        out_dir=tmp_path / "adapt",
        seed=0,
        warmup_dir=out,
        device="cpu",
        variant=_variant("corda", warmup=True, rows=2),
    )
    assert adapted["calibration"]["ids"] == ["row-0", "row-1"] and adapted["calibration"]["from_warmup"] == str(out)
    with pytest.raises(AdapterError, match=r"read 2 calibration rows.*calibration_rows=256"):
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="d2lora-corda",
            n=2,
            lora=LORA,
            hp=HP,
            out_dir=tmp_path / "x",
            seed=0,
            warmup_dir=out,
            device="cpu",
            variant=_variant("corda", warmup=True),
        )


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"init_lora_weights": "pisa"}, r"init_lora_weights: unknown init 'pisa' \(known: default, gaussian, pissa"),
        ({"init_lora_weights": "pissa_niter_"}, r"init_lora_weights: unknown init 'pissa_niter_'"),
        ({"init_lora_weights": "pissa", "rank": 8}, r"rank: unknown key"),
        ({"adapter": "vera"}, r"adapter: unknown adapter 'vera'"),
        ({"adapter": "dynamic", "label": "x"}, r"label: unknown key of a dynamic variant"),
        ({"options": {"initial_rank": 2}}, r"options: only adapters adalora and dynamic take options"),
        ({"init_lora_weights": "eva", "calibration_rows": 0}, r"calibration_rows: expected a positive integer"),
    ],
)
def test_a_bad_variant_fails_naming_its_key(variant, message, tiny_model_dir, train_file, tmp_path):
    with pytest.raises(variants.VariantError, match=message):
        variants.Variant.of(variant)
    with pytest.raises(variants.VariantError, match=message):
        run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="x",
            n=2,
            lora=LORA,
            hp=HP,
            out_dir=tmp_path / "out",
            seed=0,
            device="cpu",
            variant=variant,
        )
    assert not list(tmp_path.iterdir())
    assert variants.Variant.of(None, "lora").as_dict() == _variant("default")
    assert variants.Variant.of(None, "d2lora").as_dict() == _variant("default", warmup=True)


def test_adaptive_adapters_dispatch_to_dynamic_lora(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """AdaLoRA and Dynamic LoRA are built by d2lora.training.adaptive with the variant's options, the
    run's step count and, for Dynamic LoRA only (it draws the A rows of granted rank), the run's seed;
    the callbacks it returns join the trainer."""
    from peft import get_peft_model
    from transformers import TrainerCallback

    from d2lora.training.adapters import lora_config

    calls, steps = [], []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    def adaptive_adapter(base_model, lora, variant, total_steps):
        calls.append((variant, total_steps))
        return get_peft_model(base_model, lora_config(lora)), [Count()]

    monkeypatch.setattr(training_run, "adaptive_adapter", adaptive_adapter)
    monkeypatch.setattr(
        training_run, "DEFAULTS", {"adalora": {"reallocations": 10}, "dynamic": {"reallocations": 10, "seed": 0}}
    )
    monkeypatch.setattr(training_run, "adapter_report", lambda model: {"ranks": "reported"})
    record = run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init="adalora",
        n=4,
        lora=LORA,
        hp=HP,
        out_dir=tmp_path / "a",
        seed=7,
        device="cpu",
        variant={"adapter": "adalora", "options": {"reallocations": 3}},
    )
    assert calls == [({"adapter": "adalora", "reallocations": 3}, 2)] and steps == [1, 2]
    assert record["variant"]["adapter"] == "adalora" and record["adapter"] == {"ranks": "reported"}

    calls.clear()
    run_adaptation(
        tiny_model_dir,
        train_file,
        method="sft",
        init="dynamic",
        n=4,
        lora=LORA,
        hp=HP,
        out_dir=tmp_path / "b",
        seed=7,
        device="cpu",
        variant={"adapter": "dynamic"},
    )
    assert calls == [({"adapter": "dynamic", "seed": 7}, 2)]


def test_resumed_residual_run_rebuilds_the_same_residual_base(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """A checkpointed fresh-PiSSA run stopped after its first checkpoint and rerun: the resumed run
    rebuilds W_res from the original weights and the saved A0/B0, and ends with the same adapter."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import d2lora.training.run as run_module

    lora = dict(LORA, dropout=0.1)  # dropout: the restored RNG matters
    hp = dict(HP, epochs=2)  # 4 steps of 2 rows
    variant = _variant("pissa")

    def train(out):
        return run_adaptation(
            tiny_model_dir,
            train_file,
            method="sft",
            init="pissa",
            n=4,
            lora=lora,
            hp=hp,
            out_dir=out,
            seed=0,
            device="cpu",
            checkpoint_steps=2,
            variant=variant,
        )

    reference = train(tmp_path / "reference")

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed")

    real_build = run_module.build_trainer

    def build_and_stop(*args, callbacks=None, **kwargs):
        return real_build(*args, callbacks=(callbacks or []) + [Stop()], **kwargs)

    resumed_out = tmp_path / "resumed"
    monkeypatch.setattr(run_module, "build_trainer", build_and_stop)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_out)
    monkeypatch.setattr(run_module, "build_trainer", real_build)
    checkpoints = checkpoint_dir_for(resumed_out)
    assert (checkpoints / INITIAL_ADAPTER_DIR / inits.INITIAL_FILE).is_file()
    assert not resumed_out.exists()
    resumed = train(resumed_out)
    assert resumed["resumed_from_step"] == 2 and reference["resumed_from_step"] is None
    assert not checkpoints.exists()
    for rel in ("adapter_model.safetensors", "residual/trained.safetensors", "residual/initial.safetensors"):
        a, b = load_file(str(tmp_path / "reference" / rel)), load_file(str(resumed_out / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs"
    losses = [[e["loss"] for e in r["log_history"] if "loss" in e] for r in (reference, resumed)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
