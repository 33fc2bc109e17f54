"""Shared by the benchmark scripts: the model to measure, a real batch, and result logging."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from edgetune.devices import peak_rss_mb, reset_peak_rss  # noqa: F401 (the benchmarks' meters)

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache"


def model_dir(arg: str | None) -> Path:
    """The HF folder to benchmark: --model if given, else the pipeline's models/base, else the
    packaged SmolLM2-135M converted once into benchmarks/.cache/base."""
    if arg:
        return Path(arg)
    if Path("models/base/config.json").is_file():
        return Path("models/base")
    out = CACHE / "base"
    if not (out / "config.json").is_file():
        from edgetune.models import load_source, parse_source, save_hf

        model, tok = load_source(parse_source("packaged"))
        save_hf(model, tok, out)
    return out


def scorer_arguments(p) -> None:
    """What DevScorer reads: the model, the partition stage's clients, the dev split, the params
    and the task."""
    p.add_argument("--model", help="HF folder (default: models/base or the packaged SmolLM2)")
    p.add_argument("--partitions", default="data/partitions")
    p.add_argument("--eval", default="data/prepared/eval.parquet")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--max-eval", type=int, help="first N dev examples (default: all)")
    p.add_argument("--task", default="sst2", help="task whose label words score the prompts")


def case_arguments(p, methods: list[str]) -> None:
    """The arguments every side-by-side benchmark of federated cases takes (methods.py,
    time_to_accuracy.py): DevScorer's (scorer_arguments), cases and their overrides."""
    scorer_arguments(p)
    p.add_argument("--methods", nargs="+", metavar="LABEL", default=methods,
                   help="cases to run; a label that is not a method name needs --set LABEL:method=NAME "
                   "(e.g. two configurations of one method side by side)")
    p.add_argument("--set", action="append", default=[], metavar="LABEL:KEY=VALUE",
                   help="per-case finetune override, e.g. fedkseed:zo.lr=1e-3 (repeatable)")
    p.add_argument("--local-steps", type=int)


class DevScorer:
    """What the time-to-accuracy style benchmarks share: the params, the model folder, the task,
    the partition stage's clients and a scorer of a model's accuracy on the dev split (the
    first --max-eval rows), with the base model's zero-shot metrics measured once and the
    rate of always answering the most frequent gold label (what a label bias alone scores)."""

    def __init__(self, args):
        import pandas as pd

        from edgetune.config import load_params
        from edgetune.federated.setup import load_clients
        from edgetune.models import load_hf
        from edgetune.scoring import label_token_ids, metric_word
        from edgetune.tasks import get_task

        self.params, self.path = load_params(args.params), str(model_dir(args.model))
        self.task, self.clients = get_task(args.task), load_clients(args.partitions)
        frame = pd.read_parquet(args.eval)
        frame = frame.head(args.max_eval) if args.max_eval else frame
        self.prompts, self.gold = frame["prompt"].tolist(), frame["label"].astype(int).tolist()
        base, self.tok = load_hf(self.path)
        self.ids = label_token_ids(self.tok, self.task.label_words)
        self.zero_shot_metrics = self.metrics(base, "zero-shot")
        self.zero_shot = self.zero_shot_metrics["accuracy"]
        self.majority_rate = max(self.gold.count(c) for c in set(self.gold)) / len(self.gold)
        self.gold_shares = {f"gold_share_{metric_word(w, i)}": self.gold.count(i) / len(self.gold)
                            for i, w in enumerate(self.task.label_words)}  # what a model should answer

    def __call__(self, model, what: str) -> float:
        return self.metrics(model, what)["accuracy"]

    def metrics(self, model, what: str) -> dict[str, float]:
        """accuracy, macro-F1 and the share of each predicted label (scoring.classification_metrics)."""
        from edgetune.scoring import classification_metrics, predict

        predictions = predict(model, self.tok, self.prompts, self.ids, 16, 128, what)
        return classification_metrics(predictions, self.gold, self.task.label_words)


def round_label_mix(clients, client_ids: list[int], label_words: tuple[str, ...]) -> dict[str, float]:
    """`round_gold_share_<word>`: the share of each label among the rows of `client_ids` (a
    round's aggregated clients): what that round's updates pull the model towards."""
    from edgetune.scoring import metric_word

    targets = [y for c in client_ids for y in clients[c].targets]
    return {f"round_gold_share_{metric_word(w, i)}": targets.count(i) / len(targets)
            for i, w in enumerate(label_words)}


def parse_overrides(pairs: list[str]) -> dict[str, dict]:
    """'label:key.sub=value' -> {label: {key: {sub: value}}} (values parsed as YAML)."""
    import yaml

    out: dict[str, dict] = {}
    for pair in pairs:
        label, assignment = pair.split(":", 1)
        key, value = assignment.split("=", 1)
        node = out.setdefault(label, {})
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def method_config(finetune, label: str, budget: dict, overrides: dict[str, dict]):
    """The FinetuneParams of one benchmarked case: params.yaml's finetune block, the shared
    budget (rounds, steps), method = label, then the label's --set overrides (which may name
    another method: two configurations of one method side by side)."""
    from edgetune.config import FinetuneParams

    raw = {**finetune.model_dump(), **budget, "method": label}
    for key, value in overrides.get(label, {}).items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return FinetuneParams.model_validate(raw)


def real_batch(tok, mirror: str | None, batch_size: int, seq_len: int):
    """batch_size real SST-2 train prompts, padded/truncated to exactly seq_len tokens."""
    import torch

    from edgetune.tasks import get_task, resolve_mirror

    ds = get_task("sst2").load("train", resolve_mirror(mirror)).select(range(batch_size))
    enc = tok(list(ds["prompt"]), return_tensors="pt", padding="max_length", truncation=True,
              max_length=seq_len)
    mask = enc["attention_mask"]
    return ({"input_ids": enc["input_ids"], "attention_mask": mask,
             "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)},
            torch.tensor(list(ds["label"])))


def standard_error(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy scored on n examples: how far a score moves
    by chance, drawn as a band around zero-shot so a curve's gain can be read against it."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def draw_zero_shot(ax, zero_shot: float, n_eval: int) -> None:
    """The base model's score on a curve plot: a dashed line and a band of ± 1 standard error."""
    se = standard_error(zero_shot, n_eval)
    ax.axhline(zero_shot, color="grey", ls="--", lw=1, label="zero-shot")
    ax.axhspan(zero_shot - se, zero_shot + se, color="grey", alpha=0.15, lw=0,
               label=f"zero-shot ± 1 standard error ({n_eval} rows)")


def save(name: str, results: dict, params: dict, children: dict[str, dict] | None = None,
         artifacts: list[Path] = ()) -> Path:
    """Write benchmarks/results/<name>.json and log the same numbers to MLflow; `children`
    (label -> params) adds one child run per label with results[label]'s metrics, so the
    MLflow compare view lines the cases up."""
    from edgetune import tracking

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": {"cpu_count": os.cpu_count(),
                                             "platform": platform.platform()},
              "params": params, "results": results}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    mlflow = tracking.configure("edgetune-benchmarks")
    with mlflow.start_run(run_name=name, tags={"edgetune.benchmark": name,
                                               "mlflow.source.git.commit": tracking.git_commit()}):
        mlflow.log_params(params)
        mlflow.log_metrics(tracking.numeric(results))
        for artifact in [path, *artifacts]:
            mlflow.log_artifact(str(artifact))
        for label, child_params in (children or {}).items():
            with mlflow.start_run(run_name=label, nested=True, tags={"edgetune.benchmark": name}):
                mlflow.log_params(child_params)
                mlflow.log_metrics(tracking.numeric(results[label]))
    return path
