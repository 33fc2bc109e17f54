"""Bad-input catalog (issue 7): what users rely on when an input is malformed.

Each case runs a stage's `main` in-process through `run_main`, as `python -m stages.<name>`
with the flags of dvc.yaml would, and checks: exit code 2; one `error:` line on stderr that
names the input (the params key, or the file); none of the stage's outputs left where DVC would
take them as valid; no MLflow run left RUNNING.
"""

from __future__ import annotations

import importlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from edgetune.cli import run_main

# The tiny-alpha Dirichlet case makes flwr-datasets warn once per sampling attempt.
pytestmark = pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")

# Every flag points into the case's folder; "=" values are NAME=DIR pairs (evaluate --model).
ARGS = {
    "model": {"--out": "out", "--metrics": "metrics.json"},
    "prepare": {"--out": "out", "--metrics": "metrics.json"},
    "partition": {"--data": "data", "--out": "out", "--plot": "plot.png", "--metrics": "metrics.json"},
    "finetune": {"--model": "model", "--partitions": "partitions", "--out": "out", "--plots": "plots",
                 "--metrics": "metrics.json"},
    "calibrate": {"--data": "data", "--model": "model", "--out": "out", "--metrics": "metrics.json"},
    "compress": {"--model": "model", "--data": "data", "--calibration": "calib", "--out": "out",
                 "--metrics": "metrics.json"},
    "evaluate": {"--data": "data", "--model": "base=model", "--metrics": "metrics.json"},
    "export": {"--model": "model", "--out": "out", "--metrics": "metrics.json"},
}
OUTPUT_FLAGS = ("--out", "--plot", "--plots", "--metrics")


@dataclass
class Case:
    id: str
    stage: str
    expect: str | tuple[str, ...]  # in the error line; "{tmp}" is the case's folder
    params: dict = field(default_factory=dict)  # params.yaml (defaults for what is left out)
    setup: Callable[[Path], None] = lambda tmp: None  # writes the stage's inputs under tmp
    args: dict = field(default_factory=dict)  # flag -> value (relative to tmp) overrides
    env: dict = field(default_factory=dict)


def key(dotted: str, value) -> dict:
    """{'a': {'b': value}} from 'a.b'."""
    *parents, last = dotted.split(".")
    out = {last: value}
    for part in reversed(parents):
        out = {part: out}
    return out


# --------------------------------------------------------------------------- input builders
def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


SST2_ROWS = "sentence\tlabel\na fine film\t1\na dull film\t0\nwarm and witty\t1\n"


def mirror(files: dict | None = None):
    """A tiny data mirror under tmp/mirror (SST-2 + WikiText-2); `files` replace files (path
    relative to the mirror -> content) or, given None, leave them out."""
    def build(tmp: Path) -> None:
        default = {"sst2/train.tsv": SST2_ROWS, "sst2/dev.tsv": SST2_ROWS,
                   "wikitext2/wiki.test.raw": "some text\n", "wikitext2/wiki.valid.tokens": "more text\n"}
        for name, content in {**default, **(files or {})}.items():
            if content is not None:
                write(tmp / "mirror" / name, content)
    return build


MIRROR = {"data": {"mirror": "{tmp}/mirror"}}
UNREACHABLE = "http://127.0.0.1:9"  # a hub endpoint that refuses connections (the discard port)


def parquet(rel: str, rows: dict | bytes | None = None):
    """Write tmp/<rel> as Parquet from column lists (default: 40 SST-2-like rows) or raw bytes."""
    def build(tmp: Path) -> None:
        import pandas as pd

        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(rows, bytes):
            path.write_bytes(rows)
        else:
            data = rows if rows is not None else {"prompt": [f"Review: film {i}\nSentiment:" for i in range(40)],
                                                  "label": [i % 2 for i in range(40)]}
            pd.DataFrame(data).to_parquet(path)
    return build


def folders(*rels: str):
    def build(tmp: Path) -> None:
        for rel in rels:
            (tmp / rel).mkdir(parents=True, exist_ok=True)
    return build


def both(*builders):
    def build(tmp: Path) -> None:
        for b in builders:
            b(tmp)
    return build


def gguf_file(rel: str, arch: str | None):
    """A GGUF file of architecture `arch` (one tiny tensor); arch None writes garbage bytes."""
    def build(tmp: Path) -> None:
        path = tmp / rel
        if arch is None:
            path.write_bytes(b"not a gguf file")
            return
        import gguf
        import numpy as np

        w = gguf.GGUFWriter(str(path), arch)
        w.add_tensor("x", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return build


def text(rel: str, content: str = "some text"):
    return lambda tmp: write(tmp / rel, content)


EMPTY = {"prompt": [], "label": []}
CORRUPT = b"PAR1 this is not parquet"
# Dirichlet with a tiny alpha puts each label on one client: the others stay empty.
SKEWED = {"partition": {"scheme": "dirichlet", "alpha": 0.001, "num_clients": 4, "min_size": 2}}
# Pathological split, one label per client: two clients share label 1's four rows, 2 each.
TWO_POSITIVES = {"prompt": [f"p{i}" for i in range(24)], "label": [0] * 20 + [1] * 4}
PATHOLOGICAL = {"partition": {"scheme": "pathological", "num_clients": 4, "labels_per_client": 1,
                              "min_size": 3}}
BLOCKER = text("blocker", "a file where a folder should be")
HF_STUB = text("model/config.json", "{}")  # passes the HF-folder check; never loaded
PREPARED = both(folders("model", "calib"), parquet("data/train.parquet"))
EVAL_INPUTS = both(folders("model"), parquet("data/eval.parquet"), text("data/wikitext2_test.txt"))
HF_MODEL_AND_ONE_CLIENT = both(text("model/config.json", "{}"), parquet("partitions/client_0000.parquet"))

CASES = [
    # ------------------------------------------------------------------ params
    Case("params-wrong-type-int", "partition", "partition.num_clients", key("partition.num_clients", "eight")),
    Case("params-wrong-type-list", "finetune", "finetune.lora.targets", key("finetune.lora.targets", 7)),
    Case("params-out-of-range", "finetune", "finetune.sample_rate", key("finetune.sample_rate", 1.5)),
    Case("params-out-of-range-negative", "partition", "partition.alpha", key("partition.alpha", -1)),
    Case("params-out-of-range-nested", "calibrate", "compress.calibration.seq_len",
         key("compress.calibration.seq_len", 8)),
    Case("params-unknown-top-level-key", "model", "trainer: unknown key", {"trainer": {"lr": 1}}),
    Case("params-unknown-nested-key", "finetune", "finetune.lora.rank: unknown key", key("finetune.lora.rank", 8)),
    Case("params-unknown-method", "finetune", "finetune.method", key("finetune.method", "fedsgd")),
    Case("params-unknown-scheme", "partition", "partition.scheme", key("partition.scheme", "random")),
    Case("params-unknown-task", "prepare", "data.task", key("data.task", "imdb")),
    Case("params-trainable-not-the-methods", "finetune", "finetune.trainable",
         {"finetune": {"method": "fedit", "trainable": "prefix"}}),
    Case("params-compress-unknown-step", "compress", "compress.steps.0", key("compress.steps", [{"method": "zip"}])),
    Case("params-compress-step-bad-option", "compress", "compress.steps.0.gptq.bits",
         key("compress.steps", [{"method": "gptq", "bits": 3}])),
    Case("params-compress-step-unknown-option", "compress", "compress.steps.0.int8.bits: unknown key",
         key("compress.steps", [{"method": "int8", "bits": 4}])),
    Case("params-compress-steps-not-a-list", "compress", "compress.steps", key("compress.steps", {"method": "int8"})),
    Case("params-empty-experiment", "model", "tracking.experiment", key("tracking.experiment", "")),
    Case("params-unknown-device", "finetune", "model.device: 'gpu' is not a device", key("model.device", "gpu")),
    Case("params-unknown-dtype", "model", "model.dtype", key("model.dtype", "float8")),
    Case("params-unknown-zo-distribution", "finetune", "finetune.zo.distribution",
         key("finetune.zo.distribution", "uniform")),
    Case("params-zo-lr-not-auto", "finetune", "finetune.zo.lr", key("finetune.zo.lr", "fast")),
    Case("params-lora-init-data-dependent", "finetune", "finetune.lora.init: eva is computed from data",
         key("finetune.lora.init", "eva")),
    Case("params-lora-init-orthogonal-odd-rank", "finetune", "finetune.lora.init: orthogonal needs an even",
         {"finetune": {"lora": {"init": "orthogonal", "r": 5}}}),
    Case("params-sgd-without-lr", "finetune", "finetune.lr: auto stands for the method's AdamW lr",
         key("finetune.client_optimizer", "sgd")),
    Case("params-scaffold-on-a-zo-method", "finetune", "finetune.scaffold: fedkseed trains by zeroth order",
         {"finetune": {"method": "fedkseed", "scaffold": True}}),
    Case("params-secagg-with-one-client-minimum", "finetune", "finetune.secagg: the sum of one reply",
         {"finetune": {"secagg": {"enabled": True}}}),
    Case("params-dp-client-noise-without-secagg", "finetune", "finetune.dp.noise: clients add their shares",
         {"finetune": {"dp": {"noise_multiplier": 1.0, "noise": "clients"}}}),
    Case("params-bad-seed-attack-on-weights", "finetune", "finetune.attack.kind: bad_seed",
         {"finetune": {"attack": {"fraction": 0.5, "kind": "bad_seed"}}}),
    # the memorization audit (edgetune/audit.py): checked before any row is planted
    Case("params-audit-client-missing", "partition", "audit.clients: client 9 does not exist",
         {"audit": {"canaries": 1, "clients": [9]}}),
    Case("params-audit-template-without-secret", "partition", "audit.template",
         {"audit": {"canaries": 1, "template": "my account number is"}}),
    Case("data-audit-too-many-non-members", "partition", "audit.members: 30 non-members to hold out of 40",
         {"audit": {"members": 30}}, parquet("data/train.parquet")),
    # a device this machine lacks (cuda:99 on any machine): named before any model is loaded
    Case("device-missing-finetune", "finetune", "model.device: cuda:99 requested", key("model.device", "cuda:99"),
         HF_MODEL_AND_ONE_CLIENT),
    Case("device-missing-evaluate", "evaluate", "model.device: cuda:99 requested", key("model.device", "cuda:99"),
         both(EVAL_INPUTS, HF_STUB)),
    Case("params-file-missing", "model", "{tmp}/nope.yaml", args={"--params": "nope.yaml"}),
    Case("params-file-not-yaml", "model", "{tmp}/bad.yaml", args={"--params": "bad.yaml"},
         setup=text("bad.yaml", "model: [unclosed\n")),
    Case("params-file-not-a-mapping", "model", "{tmp}/list.yaml", args={"--params": "list.yaml"},
         setup=text("list.yaml", "- model\n- data\n")),
    # ------------------------------------------------------------------ data
    Case("data-mirror-folder-missing", "prepare", "data.mirror", key("data.mirror", "{tmp}/nope")),
    Case("data-source-mirror-without-folder", "prepare", ("data.source: mirror needs a mirror folder",
                                                          "EDGETUNE_DATA_MIRROR"),
         key("data.source", "mirror"), env={"EDGETUNE_DATA_MIRROR": ""}),
    Case("data-source-packaged-task-without", "prepare", "data.source: packaged data ships only for ['sst2'], not qnli",
         {"data": {"task": "qnli", "source": "packaged"}}),
    Case("data-hub-unreachable", "prepare", ("cannot reach the Hugging Face hub for dataset 'nyu-mll/glue'",
                                             "set data.mirror or $EDGETUNE_DATA_MIRROR"),
         {"data": {"task": "qnli", "source": "hub"}}, env={"HF_ENDPOINT": UNREACHABLE}),
    Case("data-hub-unreachable-packaged-hint", "prepare", ("hub for dataset 'stanfordnlp/sst2'",
                                                           "or data.source: packaged"),
         key("data.source", "hub"), env={"HF_ENDPOINT": UNREACHABLE}),
    Case("data-mirror-file-missing", "prepare", "{tmp}/mirror/sst2/dev.tsv", MIRROR, mirror({"sst2/dev.tsv": None})),
    Case("data-corrupt-tsv", "prepare", "{tmp}/mirror/sst2/train.tsv", MIRROR,
         mirror({"sst2/train.tsv": "sentence\tlabel\na film\t1\nbroken\trow\twith\textra\tfields\n"})),
    Case("data-tsv-missing-column", "prepare", "{tmp}/mirror/sst2/train.tsv", MIRROR,
         mirror({"sst2/train.tsv": "sentence\na fine film\n"})),
    Case("data-tsv-bad-label", "prepare", "{tmp}/mirror/sst2/dev.tsv", MIRROR,
         mirror({"sst2/dev.tsv": "sentence\tlabel\na fine film\tpositive\n"})),
    Case("data-tsv-empty-split", "prepare", "{tmp}/mirror/sst2/train.tsv", MIRROR,
         mirror({"sst2/train.tsv": "sentence\tlabel\n"})),
    # fails after train.parquet and eval.parquet are written: the half-written out/ must go
    Case("data-wikitext-missing", "prepare", "{tmp}/mirror/wikitext2/wiki.test.raw", MIRROR,
         mirror({"wikitext2/wiki.test.raw": None})),
    Case("data-train-parquet-missing", "partition", "{tmp}/data/train.parquet", setup=folders("data")),
    Case("data-corrupt-parquet", "partition", "{tmp}/data/train.parquet",
         setup=parquet("data/train.parquet", CORRUPT)),
    Case("data-missing-column", "partition", "{tmp}/data/train.parquet",
         setup=parquet("data/train.parquet", {"text": ["a", "b"], "label": [0, 1]})),
    Case("data-missing-partition-column", "partition", "partition.by", key("partition.by", "topic"),
         parquet("data/train.parquet")),
    Case("data-empty-split", "partition", "{tmp}/data/train.parquet", setup=parquet("data/train.parquet", EMPTY)),
    Case("data-client-left-empty", "partition", "partition: dirichlet partitioner failed", SKEWED,
         parquet("data/train.parquet")),
    Case("data-client-too-small", "partition", ("partition.min_size: client", "got 2 rows (< 3)"), PATHOLOGICAL,
         parquet("data/train.parquet", TWO_POSITIVES)),
    Case("data-no-client-files", "finetune", "{tmp}/partitions", setup=folders("model", "partitions")),
    Case("data-empty-client-file", "finetune", "{tmp}/partitions/client_0001.parquet",
         setup=both(folders("model"), parquet("partitions/client_0000.parquet"),
                    parquet("partitions/client_0001.parquet", EMPTY))),
    Case("data-corrupt-client-file", "finetune", "{tmp}/partitions/client_0000.parquet",
         setup=both(folders("model"), parquet("partitions/client_0000.parquet", CORRUPT))),
    Case("data-client-missing-column", "finetune", "{tmp}/partitions/client_0000.parquet",
         setup=both(folders("model"), parquet("partitions/client_0000.parquet", {"label": [0, 1]}))),
    Case("data-calibration-text-missing", "calibrate", "{tmp}/data/wikitext2_valid.txt",
         setup=both(folders("data"), HF_STUB)),
    Case("data-calibration-file-missing", "compress", "{tmp}/calib/calibration.parquet",
         setup=both(PREPARED, HF_STUB)),
    Case("data-corrupt-eval-parquet", "evaluate", "{tmp}/data/eval.parquet",
         setup=both(EVAL_INPUTS, parquet("data/eval.parquet", CORRUPT), HF_STUB)),
    # ------------------------------------------------------------------ model
    Case("model-hub-unreachable", "model", ("cannot reach the Hugging Face hub for model 'someone/some-model'",
                                            "set model.source to a local HF folder"),
         key("model.source", "someone/some-model"), env={"HF_ENDPOINT": UNREACHABLE}),
    Case("model-source-missing-path", "model", "model.source: '{tmp}/nope'", key("model.source", "{tmp}/nope")),
    Case("model-source-not-hf-folder", "model", "model.source: '{tmp}/model' is not a Hugging Face folder",
         key("model.source", "{tmp}/model"), folders("model")),
    Case("model-source-gguf-missing", "model", "model.source: GGUF file '{tmp}/nope.gguf'",
         key("model.source", "{tmp}/nope.gguf")),
    Case("model-source-gguf-unsupported-arch", "model", ("model.source: cannot load '{tmp}/m.gguf'", "not supported"),
         key("model.source", "{tmp}/m.gguf"), gguf_file("m.gguf", "edgetune-unknown-arch")),
    Case("model-source-gguf-corrupt", "model", ("model.source: cannot load '{tmp}/m.gguf'", "not a GGUF file"),
         key("model.source", "{tmp}/m.gguf"), gguf_file("m.gguf", None)),
    Case("model-finetune-not-hf-folder", "finetune", "{tmp}/model", setup=both(
        folders("model"), parquet("partitions/client_0000.parquet"))),
    Case("model-calibrate-not-hf-folder", "calibrate", "{tmp}/model",
         setup=both(folders("model"), text("data/wikitext2_valid.txt"))),
    Case("model-compress-not-hf-folder", "compress", "{tmp}/model",
         setup=both(PREPARED, parquet("calib/calibration.parquet", {"input_ids": [[1, 2, 3]]}))),
    Case("model-evaluate-not-hf-folder", "evaluate", "{tmp}/model", setup=EVAL_INPUTS),
    Case("model-evaluate-flag-without-name", "evaluate", "--model", args={"--model": "model"}, setup=EVAL_INPUTS),
    # ------------------------------------------------------------------ finetune on Flower
    Case("params-flower-centralized-method", "finetune", "finetune.backend: mezo",
         {"finetune": {"method": "mezo", "backend": "flower"}}),
    Case("flower-more-nodes-than-clients", "finetune", "finetune.flower.nodes: 3 SuperNodes for 1 clients",
         {"finetune": {"backend": "flower", "flower": {"nodes": 3}}}, HF_MODEL_AND_ONE_CLIENT),
    Case("flower-superlink-unreachable", "finetune", "finetune.flower.superlink '127.0.0.1:9': cannot reach",
         {"finetune": {"backend": "flower", "flower": {"superlink": "127.0.0.1:9"}}}, HF_MODEL_AND_ONE_CLIENT),
    Case("flower-model-not-hf-folder", "finetune", "{tmp}/model", key("finetune.backend", "flower"),
         both(folders("model"), parquet("partitions/client_0000.parquet"))),
    # ------------------------------------------------------------------ export to edge runtimes
    Case("params-export-unknown-format", "export", "export.formats: unknown format 'gguf-q3'",
         key("export.formats", ["gguf-q3"])),
    Case("params-export-prefix-tuned", "export", ("export.formats: finetune.method fedpeptao trains prefix",
                                                  "a GGUF model cannot hold"),
         {"finetune": {"method": "fedpeptao"}, "export": {"formats": ["gguf-q8_0"]}}),
    Case("params-export-prompt-tuned-zo", "finetune", "export.formats: finetune.method fedkseed trains prompt",
         {"finetune": {"method": "fedkseed", "trainable": "prompt"}, "export": {"formats": ["gguf-q4_0"]}}),
    Case("model-export-not-hf-folder", "export", "{tmp}/model", key("export.formats", ["gguf-q8_0"]),
         folders("model")),
    Case("evaluate-export-file-missing", "evaluate", "{tmp}/exported/gguf-q8_0/model.gguf: not found",
         key("export.formats", ["gguf-q8_0"]),
         both(text("model/config.json", "{}"), parquet("data/eval.parquet"), text("data/wikitext2_test.txt"),
              folders("exported")),
         args={"--exported": "exported"}),
    # ------------------------------------------------------------------ outputs
    Case("outputs-parent-is-a-file", "model", "{tmp}/blocker", args={"--out": "blocker/base"}, setup=BLOCKER),
    Case("outputs-metrics-parent-is-a-file", "prepare", "{tmp}/blocker", MIRROR, both(mirror(), BLOCKER),
         args={"--metrics": "blocker/prepare.json"}),
    Case("outputs-plot-parent-is-a-file", "partition", "{tmp}/blocker",
         {"partition": {"num_clients": 2, "min_size": 5}}, both(parquet("data/train.parquet"), BLOCKER),
         args={"--plot": "blocker/deep/p.png"}),
    # ------------------------------------------------------------------ tracking
    Case("tracking-unreachable-server", "prepare", "MLFLOW_TRACKING_URI 'http://127.0.0.1:9': cannot reach",
         MIRROR, mirror(), env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    Case("tracking-unsupported-uri-scheme", "prepare", "MLFLOW_TRACKING_URI 'sqlite3:///{tmp}/mlflow.db'",
         MIRROR, mirror(), env={"MLFLOW_TRACKING_URI": "sqlite3:///{tmp}/mlflow.db"}),
]


def expand(value, tmp: Path):
    """Replace {tmp} in strings, recursively through dicts and lists."""
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: expand(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, tmp) for v in value]
    return value


def argv_for(case: Case, tmp: Path) -> tuple[list[str], list[Path]]:
    """The stage's command line (every path under tmp) and its output paths."""
    flags = {"--params": "params.yaml", **ARGS[case.stage], **case.args}

    def path(value: str) -> str:
        name, eq, rel = value.rpartition("=")
        return f"{name}{eq}{tmp / rel}" if eq else str(tmp / value)

    argv = [a for flag, value in flags.items() for a in (flag, path(value))]
    return argv, [tmp / flags[f] for f in OUTPUT_FLAGS if f in flags]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for every case (creating a store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def sigterm_restored():
    """run_main installs a SIGTERM handler; give pytest its own back."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_catalog_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tracking_uri, monkeypatch, capsys, sigterm_restored):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for name, value in case.env.items():
        monkeypatch.setenv(name, expand(value, tmp_path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(expand(case.params, tmp_path)))
    case.setup(tmp_path)
    argv, outputs = argv_for(case, tmp_path)

    with pytest.raises(SystemExit) as exit_:
        run_main(importlib.import_module(f"stages.{case.stage}").main, argv)

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == errors[0]  # the message itself is one line
    for text in [case.expect] if isinstance(case.expect, str) else case.expect:
        assert expand(text, tmp_path) in errors[0]
    assert [p for p in outputs if p.exists()] == []
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
    assert running == []
