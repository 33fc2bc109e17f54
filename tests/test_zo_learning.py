"""What makes zeroth-order fine-tuning learn (issue 22): per-trainable-set step sizes, LoRA
inits that give ZO a signal through both factors, and the time-to-accuracy benchmark."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml

from edgetune.config import FinetuneParams
from edgetune.federated import registry, zo
from tests.conftest import REPO
from tests.helpers import build, make_clients


def test_zo_lr_and_eps_auto_follow_the_trainable_set():
    full = FinetuneParams(method="fedkseed")
    lora = FinetuneParams(method="fedkseed", trainable="lora")
    assert (full.zo_lr, full.zo_eps) == (registry.ZO_DEFAULTS["full"].lr, registry.ZO_DEFAULTS["full"].eps)
    assert (lora.zo_lr, lora.zo_eps) == (registry.ZO_DEFAULTS["lora"].lr, registry.ZO_DEFAULTS["lora"].eps)
    assert lora.zo_lr > 10 * full.zo_lr  # a LoRA step at the full-weight lr does not move the model
    pinned = FinetuneParams(method="fedkseed", trainable="lora", zo={"lr": 0.5, "eps": 0.25})
    assert (pinned.zo_lr, pinned.zo_eps) == (0.5, 0.25)
    assert pinned.resolved() == {"finetune.zo.lr_resolved": 0.5, "finetune.zo.eps_resolved": 0.25,
                                 "finetune.zo.lr_decay_rounds_resolved": 50}
    assert FinetuneParams(method="fedit").resolved() == {"finetune.lr_resolved": 1e-3}
    assert set(registry.ZO_DEFAULTS) == set(registry.TRAINABLE_SETS)


def test_the_lora_zo_step_decays_by_default_and_full_weights_keep_a_constant_one():
    """zo.lr_decay_rounds: auto: LoRA's step at its lr diverges past ~1,000 client steps unless
    it decays (docs/results.md); full weights' stays constant, and so does their resume key."""
    lora, full = FinetuneParams(method="fedkseed", trainable="lora"), FinetuneParams(method="fedkseed")
    assert lora.zo_decay_rounds == 50 and lora.zo_lr_at(50) == pytest.approx(lora.zo_lr / 2)
    assert full.zo_decay_rounds is None and full.zo_lr_at(500) == full.zo_lr
    assert full.resolved()["finetune.zo.lr_decay_rounds_resolved"] == "constant"
    assert FinetuneParams(method="fedkseed", trainable="lora", zo={"lr_decay_rounds": None}).zo_lr_at(50) == lora.zo_lr
    # auto keys resume as the value it stands for: a run made under the old `null` still resumes
    assert full.training_key() == FinetuneParams(method="fedkseed", zo={"lr_decay_rounds": None}).training_key()
    assert lora.training_key() == FinetuneParams(method="fedkseed", trainable="lora",
                                                 zo={"lr_decay_rounds": 50}).training_key()
    fedit = FinetuneParams(method="fedit")
    assert fedit.training_key() == FinetuneParams(method="fedit", zo={"lr_decay_rounds": None}).training_key()


def test_a_changed_auto_default_does_not_resume_a_run_made_under_the_old_one(monkeypatch):
    """Resume folders (finetune stage, time-to-accuracy cases) are keyed by what `auto` stood
    for, not only by the params: params.yaml says `lr: auto` before and after a new default."""
    cfg = FinetuneParams(method="fedkseed")
    before = cfg.training_key()
    monkeypatch.setitem(registry.ZO_DEFAULTS, "full", registry.ZODefaults(lr=7e-7, eps=1e-3))
    assert cfg.model_dump(mode="json") == FinetuneParams(method="fedkseed").model_dump(mode="json")
    assert FinetuneParams(method="fedkseed").training_key() != before


@pytest.mark.parametrize("init, message", [
    ("eva", "computed from data"), ("corda", "computed from data"), ("loftq", "computed from data"),
    ("kaiming", "is not a LoRA init"), ("pissa_niter_", "is not a LoRA init"),
])
def test_lora_inits_clients_cannot_share_are_refused(init, message):
    with pytest.raises(ValueError, match=f"finetune.lora.init: .*{message}"):
        FinetuneParams(lora={"init": init})


def test_orthogonal_lora_init_needs_an_even_rank():
    with pytest.raises(ValueError, match="orthogonal needs an even finetune.lora.r, got 7"):
        FinetuneParams(lora={"init": "orthogonal", "r": 7})
    assert FinetuneParams(lora={"init": "pissa_niter_4"}).lora.peft_init == "pissa_niter_4"
    assert FinetuneParams().lora.peft_init is True


def lora_factors(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    named = dict(model.named_parameters())
    return ([p for n, p in named.items() if "lora_A" in n], [p for n, p in named.items() if "lora_B" in n])


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal", "pissa", "pissa_niter_2", "olora"])
def test_every_lora_init_starts_each_client_at_the_base_model_with_the_same_adapter(tiny_model_dir, init):
    """A federation needs every client to build the same adapter (seeded by finetune.seed, or
    computed from the base weights), and the model before training to be the base model."""
    from edgetune.models import load_hf

    cfg = FinetuneParams(method="fedkseed", trainable="lora", lora={"init": init})
    _, first = build(tiny_model_dir, cfg)
    _, second = build(tiny_model_dir, cfg)
    base, tok = load_hf(tiny_model_dir)
    batch = tok(["a fine movie", "dull"], return_tensors="pt", padding=True)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(logits(first, batch), logits(base, batch), atol=1e-4, rtol=1e-4)
    a, b = lora_factors(first)
    assert all(x.abs().sum() > 0 for x in a)
    assert all(x.abs().sum() > 0 for x in b) == (init not in ("default", "gaussian"))


def test_with_b_zero_perturbing_a_is_pure_noise_for_zo_and_orthogonal_init_fixes_it(tiny_model_dir, sst2_prompts):
    """The hypothesis behind finetune.lora.init for ZO: with peft's default B = 0, a
    perturbation of A alone leaves the loss exactly unchanged (no first-order signal); with
    both factors non-zero it does not."""
    gaps = {}
    for init in ("default", "orthogonal"):
        cfg = FinetuneParams(method="fedkseed", trainable="lora", lora={"init": init})
        method, model = build(tiny_model_dir, cfg)
        a, _ = lora_factors(model)
        batch = method.objective.batch(sst2_prompts[0][:8], sst2_prompts[1][:8])
        with torch.no_grad():
            before = float(method.objective.loss(model, batch))
            zo.perturb(a, seed=3, scale=1e-2)
            gaps[init] = abs(float(method.objective.loss(model, batch)) - before)
    assert gaps["default"] == 0.0
    assert gaps["orthogonal"] > 1e-7


def tiny_project(tmp_path, sst2_prompts):
    """Partition and dev files as the pipeline writes them, for the benchmark to read."""
    parts = tmp_path / "partitions"
    parts.mkdir()
    for c in make_clients(sst2_prompts, n=4, size=16):
        pd.DataFrame({"prompt": c.prompts, "label": c.targets}).to_parquet(parts / f"client_{c.client_id:04d}.parquet")
    dev = tmp_path / "eval.parquet"
    pd.DataFrame({"prompt": sst2_prompts[0][300:332], "label": sst2_prompts[1][300:332]}).to_parquet(dev)
    return parts, dev


def test_time_to_accuracy_goes_on_from_its_last_round_when_given_more(tiny_model_dir, sst2_prompts, tmp_path,
                                                                     monkeypatch, capsys):
    """A longer budget resumes the saved case instead of training it again: the second run
    trains and scores only the new rounds, a third with the same budget trains nothing, and
    the curve holds every round's point."""
    import benchmarks.common
    from benchmarks import time_to_accuracy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    parts, dev = tiny_project(tmp_path, sst2_prompts)
    args = ["--model", str(tiny_model_dir), "--partitions", str(parts), "--eval", str(dev),
            "--methods", "fedkseed", "--set", "fedkseed:trainable=lora", "--local-steps", "1",
            "--eval-every", "1", "--cache", str(tmp_path / "cache"), "--name", "tta_test"]
    time_to_accuracy.main([*args, "--rounds", "2"])
    first = capsys.readouterr().out
    time_to_accuracy.main([*args, "--rounds", "3"])
    second = capsys.readouterr().out
    assert "fedkseed round 1:" in first and "fedkseed round 2:" in first
    assert "fedkseed round 1:" not in second and "fedkseed round 3:" in second
    time_to_accuracy.main([*args, "--rounds", "3"])  # nothing left to train: the saved curve
    assert "fedkseed round" not in capsys.readouterr().out
    record = json.loads((tmp_path / "results" / "tta_test.json").read_text())
    curve = record["results"]["fedkseed"]["curve"]
    assert [p["round"] for p in curve] == [1, 2, 3]
    assert record["results"]["fedkseed"]["lr_decay_rounds"] == 50  # LoRA's auto decay, recorded
    assert [p["client_steps"] for p in curve] == [2, 4, 6]  # 2 of 4 clients x 1 step per round
    assert curve[0]["train_seconds"] < curve[1]["train_seconds"] < curve[2]["train_seconds"]
    assert (tmp_path / "results" / "tta_test.png").stat().st_size > 10_000
    assert set(record["results"]["at_equal_minutes"]["fedkseed"]) >= {"5 min", "30 min", "90 min"}
    zero = record["results"]["zero_shot"]  # the noise a reader weighs gains against: 32 dev rows
    assert zero["standard_error"] == pytest.approx((zero["accuracy"] * (1 - zero["accuracy"]) / 32) ** 0.5)
    gold = sst2_prompts[1][300:332]
    assert zero["majority_label_rate"] == max(gold.count(0), gold.count(1)) / 32
    assert (zero["gold_share_negative"], zero["gold_share_positive"]) == (gold.count(0) / 32, gold.count(1) / 32)
    favourite = max(("negative", "positive"), key=lambda w: zero[f"predicted_share_{w}"])
    assert time_to_accuracy.favourite_label(zero) == (f"predicted_share_{favourite}", favourite)
    from PIL import Image  # the plot's second row: the share answered with that label over steps
    assert Image.open(tmp_path / "results" / "tta_test.png").size[1] > 800
    for point in [zero, *curve]:  # every scoring says whether the model just answers one label
        assert point["predicted_share_negative"] + point["predicted_share_positive"] == pytest.approx(1)
        assert 0 <= point["macro_f1"] <= 1

    # A fresh clone has the committed JSON but no cache: --merge adds a case and keeps the rest.
    shutil.rmtree(tmp_path / "cache")
    more = [a if a != "fedkseed" else "job" for a in args[:args.index("--set")]] + args[args.index("--local-steps"):]
    time_to_accuracy.main([*more, "--rounds", "1", "--merge"])
    merged = json.loads((tmp_path / "results" / "tta_test.json").read_text())
    assert merged["results"]["fedkseed"]["curve"] == curve  # kept as recorded, not retrained
    assert [p["round"] for p in merged["results"]["job"]["curve"]] == [1]
    assert set(merged["results"]["at_equal_minutes"]) == {"fedkseed", "job"}
    assert "fedkseed:trainable=lora" in merged["params"]["overrides"]
    assert merged["results"]["job"]["partitions"] == str(parts)

    # --replot draws chosen cases of the JSON, training nothing; an unknown case is exit 2
    time_to_accuracy.main(["--name", "tta_test", "--replot", "tta_job", "--methods", "job"])
    assert (tmp_path / "results" / "tta_job.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results" / "tta_test.json").read_text()) == merged
    drawn = []
    monkeypatch.setattr(time_to_accuracy, "plot", lambda cases, *a, **k: drawn.extend(cases))
    time_to_accuracy.main(["--name", "tta_test", "--replot", "tta_all"])  # without --methods: every case
    assert drawn == ["fedkseed", "job"]
    with pytest.raises(SystemExit) as bad:
        time_to_accuracy.main(["--name", "tta_test", "--replot", "x", "--methods", "mezo"])
    assert bad.value.code == 2 and "has no case mezo; it has fedkseed, job" in capsys.readouterr().err

    # label_mix: a point's clients are the round's aggregated ones, with their rows' label mix;
    # for points that lack them (older curves) replaying the engine's sampling gives the same
    from benchmarks import label_mix
    from edgetune.federated.setup import load_clients

    rows = load_clients(parts)
    for point in curve:
        assert len(point["round_clients"]) == 2  # 2 of 4 clients per round
        targets = [y for c in point["round_clients"] for y in rows[c].targets]
        assert point["round_gold_share_negative"] == targets.count(0) / len(targets)
    label_mix.main(["--name", "tta_test"])
    mix_file = tmp_path / "results" / "tta_test_label_mix.json"
    mixed = json.loads(mix_file.read_text())["results"]
    assert [p["round_clients"] for p in mixed["fedkseed"]["points"]] == [p["round_clients"] for p in curve]
    for point in merged["results"]["fedkseed"]["curve"]:
        del point["round_clients"]
    (tmp_path / "results" / "tta_test.json").write_text(json.dumps(merged))
    label_mix.main(["--name", "tta_test"])
    assert json.loads(mix_file.read_text())["results"]["fedkseed"] == mixed["fedkseed"]
    label_mix.main(["--name", "tta_test", "--methods", "job"])  # a subset keeps the other cases
    assert set(json.loads(mix_file.read_text())["results"]) == {"fedkseed", "job", "label"}
    assert (tmp_path / "results" / "tta_test_label_mix.png").stat().st_size > 10_000


def test_methods_side_by_side_score_each_case_and_update_keeps_the_others(tiny_model_dir, sst2_prompts, tmp_path,
                                                                         monkeypatch):
    """benchmarks/methods.py: each case's global model is scored like the evaluate stage
    (accuracy, macro-F1, predicted label shares) beside zero-shot; --update re-runs one case
    and keeps the rest of the results file."""
    import benchmarks.common
    from benchmarks import methods

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    parts, dev = tiny_project(tmp_path, sst2_prompts)
    args = ["--model", str(tiny_model_dir), "--partitions", str(parts), "--eval", str(dev),
            "--rounds", "1", "--local-steps", "1", "--name", "methods_test"]
    methods.main([*args, "--methods", "fedit", "job"])
    first = json.loads((tmp_path / "results" / "methods_test.json").read_text())["results"]
    methods.main([*args, "--methods", "job", "--update", "--set", "job:zo.lr=1e-2"])
    record = json.loads((tmp_path / "results" / "methods_test.json").read_text())
    results = record["results"]
    assert set(results) == {"zero_shot", "fedit", "job"} and results["fedit"] == first["fedit"]
    assert results["job"]["overrides"] == "job:zo.lr=1e-2" and record["params"]["eval_examples"] == 32
    for row in results.values():
        assert row["predicted_share_negative"] + row["predicted_share_positive"] == pytest.approx(1)
        assert 0 <= row["macro_f1"] <= 1 and 0 <= row["accuracy"] <= 1


def test_methods_run_again_after_a_crash_takes_the_finished_cases_from_its_tmp(tiny_model_dir, sst2_prompts,
                                                                             tmp_path, monkeypatch, capsys):
    """benchmarks/methods.py killed in its second case: the same command again does not train
    the first one again (its numbers come from <name>.tmp), a changed case is trained anew, and
    the .tmp is gone once the results file is written."""
    import benchmarks.common
    import edgetune.federated.engine
    from benchmarks import methods

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    parts, dev = tiny_project(tmp_path, sst2_prompts)
    args = ["--model", str(tiny_model_dir), "--partitions", str(parts), "--eval", str(dev),
            "--rounds", "1", "--local-steps", "1", "--name", "methods_crash", "--methods", "fedit", "job"]
    real, trained = edgetune.federated.engine.run_federation, []

    def crash_on_job(method, *a, **k):
        trained.append(method.name)
        if method.name == "job" and len(trained) == 2:
            raise KeyboardInterrupt  # the first run dies in its second case
        return real(method, *a, **k)

    monkeypatch.setattr(edgetune.federated.engine, "run_federation", crash_on_job)
    with pytest.raises(KeyboardInterrupt):
        methods.main(args)
    partial = tmp_path / "results" / "methods_crash.tmp"
    fedit = json.loads(partial.read_text())["results"]["fedit"]
    capsys.readouterr()
    methods.main(args)
    assert trained == ["fedit", "job", "job"]  # fedit is not trained twice
    assert "fedit: finished by an earlier run" in capsys.readouterr().out
    results = json.loads((tmp_path / "results" / "methods_crash.json").read_text())["results"]
    assert results["fedit"] == fedit and set(results) == {"zero_shot", "fedit", "job"}
    assert not partial.exists()
    partial.write_text(json.dumps({"keys": {"fedit": "0" * 16}, "results": {"fedit": fedit}}))
    methods.main([*args[:-1]])  # a .tmp made under another config is not taken
    assert trained[-1] == "fedit" and len(trained) == 4


def test_benchmarks_run_the_engine_with_every_finetune_knob(tiny_model_dir, sst2_prompts, tmp_path, monkeypatch):
    """time_to_accuracy and comm hand the engine what the finetune stage does (setup.
    engine_options): a --set / params.yaml dropout, min_clients or secagg is not dropped."""
    import benchmarks.common
    import edgetune.federated.engine
    from benchmarks import comm, time_to_accuracy

    class Seen(Exception):
        pass

    seen = []

    def capture(method, model, clients, **options):
        seen.append(options)
        raise Seen

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(edgetune.federated.engine, "run_federation", capture)
    parts, dev = tiny_project(tmp_path, sst2_prompts)
    with pytest.raises(Seen):
        time_to_accuracy.main(["--model", str(tiny_model_dir), "--partitions", str(parts), "--eval", str(dev),
                               "--methods", "fedkseed", "--set", "fedkseed:trainable=lora",
                               "--set", "fedkseed:dropout=0.25", "--set", "fedkseed:min_clients=2",
                               "--rounds", "1", "--cache", str(tmp_path / "cache"), "--name", "tta_knobs"])
    assert seen[-1]["dropout"] == 0.25 and seen[-1]["min_clients"] == 2 and seen[-1]["num_rounds"] == 1
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"].update(dropout=0.5, min_clients=2, secagg={"enabled": True})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(Seen):
        comm.main(["--model", str(tiny_model_dir), "--params", str(tmp_path / "params.yaml")])
    assert seen[-1]["dropout"] == 0.5 and seen[-1]["secagg"].enabled and seen[-1]["num_rounds"] == 2


def test_tail_average_scores_the_mean_of_a_finished_cases_last_rounds(tiny_model_dir, sst2_prompts, tmp_path,
                                                                       monkeypatch, capsys):
    """benchmarks/tail_average.py trains nothing: it replays the time-to-accuracy cache and scores,
    at the chosen rounds, the model zo.average_rounds would save; a cache trained under another
    config is refused, not replayed into wrong weights."""
    import benchmarks.common
    from benchmarks import tail_average, time_to_accuracy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    parts, dev = tiny_project(tmp_path, sst2_prompts)
    common = ["--model", str(tiny_model_dir), "--partitions", str(parts), "--eval", str(dev),
              "--methods", "fk", "--set", "fk:method=fedkseed", "--set", "fk:zo.lr=1e-2", "--local-steps", "1",
              "--cache", str(tmp_path / "cache"), "--name", "tta_test"]
    time_to_accuracy.main([*common, "--rounds", "3", "--eval-every", "1"])
    saved = tmp_path / "cache" / "tta_test" / "fk" / "round-0003.pt"
    stamp = saved.stat().st_mtime_ns
    tail_average.main([*common, "--average", "2", "--from", "2", "--every", "5"])
    assert saved.stat().st_mtime_ns == stamp and len(list(saved.parent.glob("round-*.pt"))) == 1
    average = json.loads((tmp_path / "results" / "tta_test_average.json").read_text())["results"]
    record, zero = average["fk"], average["zero_shot"]
    assert zero["standard_error"] == pytest.approx((zero["accuracy"] * (1 - zero["accuracy"]) / 32) ** 0.5)
    curve = json.loads((tmp_path / "results" / "tta_test.json").read_text())["results"]["fk"]["curve"]
    assert [p["round"] for p in record["curve"]] == [2, 3]  # from 2, and always the last
    assert [p["last_accuracy"] for p in record["curve"]] == [p["accuracy"] for p in curve[1:]]
    for p in record["curve"]:  # the averaged model's balance between labels, as every scoring has
        assert p["averaged_predicted_share_negative"] + p["averaged_predicted_share_positive"] == pytest.approx(1)
        assert 0 <= p["averaged_macro_f1"] <= 1
    png = tmp_path / "results" / "tta_test_average.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    capsys.readouterr()
    tail_average.main(["--name", "tta_test", "--replot"])  # redrawn from the JSON, nothing scored
    assert png.stat().st_size > 10_000 and "zero-shot" not in capsys.readouterr().err
    other = [a if a != "fk:zo.lr=1e-2" else "fk:zo.lr=1e-3" for a in common]
    with pytest.raises(SystemExit, match="trained under another config"):
        tail_average.main([*other, "--average", "2"])


def test_sparse_fedkseed_moves_only_the_small_weights_and_says_so_in_its_messages(tiny_model_dir, sst2_prompts):
    """finetune.zo.sparsity (Sparse MeZO): a federation's global model changes only on each
    matrix's masked (small-magnitude) entries, and every message carries the mask in its tag,
    so a party with another sparsity refuses it instead of replaying into other weights."""
    from tests.helpers import federate

    cfg = FinetuneParams(method="fedkseed", num_rounds=2, local_steps=2, batch_size=4,
                         zo={"sparsity": 0.8, "lr": 1e-2})
    _, model = build(tiny_model_dir, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method, model, state, _ = federate(tiny_model_dir, make_clients(sst2_prompts, n=2, size=16), cfg)
    method.apply_global(model, state)
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name])
        if p.dim() >= 2:
            large = before[name].abs() > before[name].abs().flatten().kthvalue(round(0.2 * p.numel())).values
            assert not changed[large].any(), name
    assert any(bool((p.detach() != before[n]).any()) for n, p in model.named_parameters())
    assert method.downlink(state).meta["zo"] == "torch-cpu/gaussian@1+sparse0.8"


def test_a_decaying_zo_step_is_replayed_round_by_round(tiny_model_dir, sst2_prompts):
    """finetune.zo.lr_decay_rounds: round r steps with lr * T / (T + r), and every replay of
    round r's pairs uses that step: a model rebuilt from the history alone equals the one the
    clients synced, while replaying the same pairs with the constant step gives other weights."""
    from tests.helpers import federate
    from tests.rebuild_from_checkpoint import weights_hash

    zo_knobs = {"lr": 1e-3, "lr_decay_rounds": 1}
    cfg = FinetuneParams(method="fedkseed", num_rounds=3, local_steps=2, batch_size=4, zo={**zo_knobs, "K": 64})
    assert [cfg.zo_lr_at(r) for r in range(3)] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    method, model, state, _ = federate(tiny_model_dir, make_clients(sst2_prompts, n=2, size=16), cfg)
    method.apply_global(model, state)
    synced = weights_hash(method.params)

    rebuilt, rebuilt_model = build(tiny_model_dir, cfg)
    rebuilt.rebuild(rebuilt_model, state)
    assert weights_hash(rebuilt.params) == synced
    constant = cfg.model_copy(update={"zo": cfg.zo.model_copy(update={"lr_decay_rounds": None})})
    replayed, replayed_model = build(tiny_model_dir, constant)
    replayed.rebuild(replayed_model, state)
    assert weights_hash(replayed.params) != synced


def test_the_saved_model_is_the_mean_of_the_last_rounds_global_models(tiny_model_dir, sst2_prompts, tmp_path):
    """finetune.zo.average_rounds: 2 saves (theta_2 + theta_3) / 2, rebuilt from the pairs
    alone; the run itself (its history, so its resume key) is the one without averaging."""
    from tests.helpers import federate

    cfg = FinetuneParams(method="fedkseed", num_rounds=3, local_steps=2, batch_size=4,
                         zo={"lr": 1e-2, "K": 64, "average_rounds": 2})
    method, model, state, _ = federate(tiny_model_dir, make_clients(sst2_prompts, n=2, size=16), cfg)
    assert cfg.training_key() == cfg.model_copy(update={"zo": cfg.zo.model_copy(
        update={"average_rounds": None})}).training_key()

    replayer, replayed = build(tiny_model_dir, cfg)
    rounds = replayer.history(state)
    for s in range(2):
        zo.replay(replayer.params, *rounds[s], cfg.zo_lr_at(s), 0.0, replayer.sampler)
    theta_2 = zo.snapshot(replayer.params)
    zo.replay(replayer.params, *rounds[2], cfg.zo_lr_at(2), 0.0, replayer.sampler)
    theta_3 = zo.snapshot(replayer.params)

    method.export(model, state, tmp_path)
    saved = zo.trainable(type(model).from_pretrained(tmp_path / "merged"))
    for p, a, b in zip(saved, theta_2, theta_3):
        torch.testing.assert_close(p, (a + b) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, b) for p, b in zip(saved, theta_3))


@pytest.mark.parametrize("knobs, message", [
    ({"method": "fedit", "zo": {"average_rounds": 4}}, "fedit sends weights"),
    ({"method": "fedkseed", "weight_decay": 0.01, "zo": {"average_rounds": 4}}, "exact only without weight decay"),
])
def test_averaging_rounds_is_refused_where_pairs_cannot_rebuild_the_mean(knobs, message):
    with pytest.raises(ValueError, match=f"finetune.zo.average_rounds: .*{message}"):
        FinetuneParams(**knobs)


def test_client_drift_records_each_clients_update_norm_and_loss(tiny_model_dir, sst2_prompts, tmp_path, monkeypatch):
    """benchmarks/client_drift.py: one round of local work per client from the same global state,
    per case; every client's loss and update norm (reply minus that state) and per case their r.
    Plain SGD at a small lr moves a client less than AdamW at the same lr moves it."""
    import benchmarks.common
    from benchmarks import client_drift

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    parts, _ = tiny_project(tmp_path, sst2_prompts)
    client_drift.main(["--model", str(tiny_model_dir), "--partitions", str(parts), "--local-steps", "1",
                       "--name", "drift_test", "--methods", "fedit", "fedit-sgd", "--set", "fedit:lr=0.01",
                       "--set", "fedit-sgd:method=fedit", "--set", "fedit-sgd:client_optimizer=sgd",
                       "--set", "fedit-sgd:lr=0.01"])
    results = json.loads((tmp_path / "results" / "drift_test.json").read_text())["results"]
    for case in results.values():
        assert [c["client"] for c in case["clients"]] == [0, 1, 2, 3]
        assert all(c["rows"] == 16 and c["loss"] > 0 and 0 <= c["gold_share_negative"] <= 1 for c in case["clients"])
        assert -1 <= case["pearson_r_norm_loss"] <= 1
    adam, sgd = ([c["update_norm"] for c in results[k]["clients"]] for k in ("fedit", "fedit-sgd"))
    assert all(0 < s < a for s, a in zip(sgd, adam))
    assert (tmp_path / "results" / "drift_test.png").stat().st_size > 10_000
