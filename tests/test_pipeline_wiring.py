"""Pipeline wiring on a tiny model (fast tier): the Prefect flow over the DVC stages, MLflow
parent / child runs, DVC caching (the zero-shot scores cached apart from fine-tuning; a
compression chain re-running compress only), switching to prefix tuning, no model measured
twice, and a failing stage. The same flow on the real SmolLM2 with real metrics is
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import sys

import pytest

from tests.pipeline_project import make_project, mlflow_runs, prefect_server, ran_stages, run, set_params

STAGES = {"model", "prepare", "partition", "finetune", "calibrate", "compress", "export", "zeroshot", "evaluate"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("wiring")
    env = make_project(root, {
        "model": {"source": str(tiny_model_dir)},
        "data": {"max_train": 200, "max_eval": 16},
        "partition": {"num_clients": 4, "min_size": 10},
        "finetune": {"num_rounds": 2, "local_steps": 1, "batch_size": 4},
        "compress": {"calibration": {"samples": 4, "seq_len": 32}, "evaluate_steps": True},
        "evaluate": {"ppl_windows": 1, "ppl_seq_len": 32, "latency_new_tokens": 2},
        "audit": {"canaries": 2, "repetitions": [1, 4], "clients": [0, 1], "members": 8, "candidates": 100},
        "tracking": {"experiment": "wiring"},
    })
    with prefect_server(env):  # one server for the module's three flow runs (the e2e tests
        rc, output = run([sys.executable, "-m", "flows.pipeline"], root, env)  # use a temporary one)
        assert rc == 0, output[-4000:]
        yield root, env, output


def parent_and_children(root):
    client, runs = mlflow_runs(root, "wiring")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][-1]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id], runs


def test_flow_runs_every_stage_once_with_a_child_run_each(project):
    root, _, output = project
    assert ran_stages(output) == STAGES
    parent, children, runs = parent_and_children(root)
    assert sorted(r.data.tags["edgetune.stage"] for r in children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "accuracy_zero_shot" in parent.data.metrics and "accuracy_compressed" in parent.data.metrics
    assert "gain over zero-shot" in output and f"runs/{parent.info.run_id}" in output


def test_each_model_is_measured_once(project):
    root, _, output = project
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    zero_shot = json.loads((root / "metrics" / "zeroshot.json").read_text())
    last_step = json.loads((root / "metrics" / "compress.json").read_text())["steps"]["0_int8"]
    assert ev["base"] == zero_shot
    assert ev["compressed"]["measured_by"] == "compress"
    assert ev["compressed"]["accuracy"] == last_step["accuracy"]
    evaluate_log = output.split("Running stage 'evaluate'")[-1]
    assert "finetuned accuracy" in evaluate_log and "compressed accuracy" not in evaluate_log


def test_runs_are_named_and_know_their_data_and_models(project):
    """What the MLflow UI shows: the experiment opens on its runs, the parent run is named by
    what sets it apart and tags the changed knobs, the prepared splits and partitions are its
    dataset inputs, and the three models it made are logged models with metrics and params."""
    import mlflow

    root, _, _ = project
    parent, children, _ = parent_and_children(root)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name.startswith("fedit/lora sst2 ")
    assert parent.data.tags["knob.finetune.num_rounds"] == "2" and "knob.finetune.method" not in parent.data.tags
    inputs = {(d.dataset.name, d.tags[0].value) for d in parent.inputs.dataset_inputs}
    assert inputs == {("sst2-train", "training"), ("sst2-eval", "evaluation"), ("sst2-partitions", "training")}
    models = client.search_logged_models([experiment.experiment_id])
    ours = {m.model_id: m for m in models if m.source_run_id == parent.info.run_id}
    assert sorted(m.name for m in ours.values()) == ["compressed", "fine_tuned", "zero_shot"]
    assert {o.model_id for o in parent.outputs.model_outputs} == set(ours)
    for m in ours.values():
        assert m.tags["edgetune.folder"] in ("models/base", "models/finetuned/merged", "models/compressed")
        assert {"accuracy", "size_mb", "score"} <= {x.key for x in m.metrics}
        assert (m.name == "zero_shot") == ("finetune.method" not in m.params)
    compressed = next(m for m in ours.values() if m.name == "compressed")
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())["compressed"]
    assert {x.key: x.value for x in compressed.metrics}["accuracy"] == ev["accuracy"]


def test_the_audit_plants_canaries_in_partition_and_evaluate_scores_them(project):
    """audit.*: the partition stage deals the canaries' copies over the audited clients and
    holds the non-members out; evaluate reports exposure per repetition count and the
    membership AUC of the fine-tuned model, in its metrics and its MLflow run."""
    import pandas as pd

    root, _, _ = project
    canaries = json.loads((root / "data" / "partitions" / "audit" / "canaries.json").read_text())["canaries"]
    assert [c["repetitions"] for c in canaries] == [1, 4]
    prompts = [p for i in range(4) for p in pd.read_parquet(root / f"data/partitions/client_{i:04d}.parquet")["prompt"]]
    assert [sum(c["secret"] in p for p in prompts) for c in canaries] == [1, 4]
    held = set(pd.read_parquet(root / "data/partitions/audit/nonmembers.parquet")["prompt"])
    assert len(held) == 8 and not held & set(prompts)
    audit = json.loads((root / "metrics" / "evaluate.json").read_text())["audit"]
    assert {"exposure_rep1", "exposure_rep4", "mia_auc"} <= audit.keys()
    assert 0 <= audit["exposure_rep4"] <= audit["exposure_max_bits"] == pytest.approx(6.658, abs=1e-3)
    _, children, _ = parent_and_children(root)
    evaluate = next(r for r in children if r.data.tags["edgetune.stage"] == "evaluate")
    assert evaluate.data.metrics["audit.mia_auc"] == audit["mia_auc"]


def test_immediate_second_repro_runs_nothing(project):
    root, env, _ = project
    rc, output = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert rc == 0, output
    assert ran_stages(output) == set() and "Data and pipelines are up to date" in output


def test_a_finetune_knob_reruns_only_finetune_and_what_follows(project):
    """finetune.method=fedpeptao (prefix tuning): the zero-shot scores and the calibration do
    not depend on finetune.*, so the flow takes them from DVC's cache and links their cached
    runs under the new parent run; the adapter-folder output goes through compress and
    evaluate and reloads as a PeftModel."""
    root, env, _ = project
    # round 1 scores layers, round 2 trains the selected ones
    old = set_params(root, {"finetune": {"method": "fedpeptao", "num_rounds": 2}})
    try:
        rc, output = run([sys.executable, "-m", "flows.pipeline"], root, env)
        assert rc == 0, output[-4000:]
        assert ran_stages(output) == {"finetune", "compress", "export", "evaluate"}
        parent, children, runs = parent_and_children(root)
        cached = {r.data.tags["edgetune.stage"] for r in children if r.data.tags["edgetune.cached"] == "true"}
        assert cached == STAGES - {"finetune", "compress", "export", "evaluate"} and len(children) == len(STAGES)
        assert parent.data.params["finetune.method"] == "fedpeptao" and "accuracy_finetuned" in parent.data.metrics
        assert all(r.info.status == "FINISHED" for r in runs)
        ft = json.loads((root / "metrics" / "finetune.json").read_text())
        assert ft["trainable_set"] == "prefix" and ft["bytes_up_per_client_round"] < 100_000
        ev = json.loads((root / "metrics" / "evaluate.json").read_text())
        assert ev["finetuned"]["perplexity"] != ev["base"]["perplexity"]  # the prefix is applied
        code = ("import sys; from edgetune.models import load_hf; "
                "print([type(load_hf(p)[0]).__name__ for p in sys.argv[1:]])")
        rc, out = run([sys.executable, "-c", code, "models/finetuned/merged", "models/compressed"], root, env)
        assert rc == 0 and out.count("PeftModel") == 2, out[-2000:]
    finally:
        (root / "params.yaml").write_text(old)


def test_a_compression_chain_reruns_compress_only_and_reloads(project):
    """structural pruning + recovery -> W4 (round-to-nearest): fine-tuning and calibration come
    from DVC's cache, every step is measured, evaluate takes the last step's measurement, and
    the final folder reloads with a plain from_pretrained. Half the tiny model's MLP channels
    go (0.0075 of its parameters: tests/test_structural.py)."""
    root, env, _ = project
    old = set_params(root, {"compress": {"steps": [
        {"method": "structural", "ratio": 0.0075, "recovery_steps": 2, "recovery_batch_size": 4},
        {"method": "rtn", "bits": 4, "group_size": 64}]}})
    try:
        rc, output = run([sys.executable, "-m", "dvc", "repro"], root, env)
        assert rc == 0, output[-4000:]
        assert ran_stages(output) == {"compress", "export", "evaluate"}
        steps = json.loads((root / "metrics" / "compress.json").read_text())["steps"]
        pruned, quantized = steps["0_structural"], steps["1_rtn"]
        assert pruned["params_removed_share"] == pytest.approx(0.0075, rel=0.05)
        assert pruned["params"] == quantized["params"] < pruned["params_before"]
        assert (pruned["bits"], quantized["bits"]) == (32, 4)
        assert quantized["size_mb"] < pruned["size_mb"]
        assert all(0 <= s["accuracy"] <= 1 and s["perplexity"] > 1 for s in (pruned, quantized))
        ev = json.loads((root / "metrics" / "evaluate.json").read_text())
        assert ev["compressed"]["measured_by"] == "compress"  # not measured a second time
        assert ev["compressed"]["accuracy"] == quantized["accuracy"]
        code = ("import sys; from transformers import AutoModelForCausalLM as M; "
                "m = M.from_pretrained(sys.argv[1]); print('intermediate_size', m.config.intermediate_size)")
        rc, out = run([sys.executable, "-c", code, "models/compressed"], root, env)
        assert rc == 0 and "intermediate_size 64" in out.splitlines(), out[-2000:]
    finally:
        (root / "params.yaml").write_text(old)


def test_failing_stage_fails_the_flow_and_leaves_no_running_run(project):
    root, env, _ = project
    old = set_params(root, {"finetune": {"lora": {"targets": ["no_such_module"]}}})
    try:
        rc, output = run([sys.executable, "-m", "flows.pipeline"], root, env)
        assert rc == 1
        assert "stage 'finetune' failed" in output and "no_such_module" in output
        _, _, runs = parent_and_children(root)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert not (root / "models" / "finetuned").exists()
    finally:
        (root / "params.yaml").write_text(old)
