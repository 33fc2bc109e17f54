"""Memorization audit: planted canaries and their exposure, plus loss-based membership inference.

- Canaries (Carlini et al. 2019, "The Secret Sharer"): `audit.canaries` random secrets in a
  fixed template ("my account number is 4821 3951") are planted in chosen clients' training data,
  canary i repeated `repetitions[i % len]` times. After fine-tuning, each canary's log-perplexity
  (of the tokens from the secret on, given the template's prefix) is ranked among
  `audit.candidates` random secrets of the same form; exposure = log2(candidates + 1) -
  log2(rank), in bits: 0 = no better than a random secret, log2(candidates + 1) = the most
  likely of all. Beyond that cap, `exposure_fit` extrapolates with a skew-normal fitted to the
  candidates' log-perplexities (the paper's Sec. 4.3 approximation; scipy).
- Membership inference (Yeom et al. 2018): score = -loss of the task objective; AUC of members
  (rows drawn from all clients' data) against non-members (rows held out of every client's
  data before partitioning: the same distribution) with scikit-learn's roc_auc_score.

A canary is a training row: for a generation task the prompt is the template's prefix and the
target the secret (the answer loss trains on it, as an LM trains on its corpus); for a
classification task the whole sentence is the prompt and the label is 0 (the label-word
objective never trains on the secret's tokens, so little exposure is expected: measured, not
presumed). The partition stage plants canaries and holds non-members out (`audited_partition`), writing
audit/ beside the client files, so every backend trains on them; the evaluate stage scores them
(`measure`). The secrets are drawn from audit.seed, never from the data.

Hand-written: no maintained library computes canary exposure for a causal LM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetune.config import AuditParams, BadInput

if TYPE_CHECKING:
    import datasets

AUDIT_DIR = "audit"  # beside client_*.parquet in the partitions folder


def secrets(cfg: AuditParams) -> tuple[list[str], list[str]]:
    """(canary secrets, candidate secrets): distinct random digit strings of cfg.digits digits,
    grouped by four ("4821 3951"), drawn from cfg.seed; candidates never equal a canary."""
    rng = np.random.default_rng(cfg.seed)
    space = 10 ** cfg.digits
    need = cfg.canaries + cfg.candidates
    if need > space // 2:
        raise BadInput(f"audit.candidates: {cfg.candidates} candidates + {cfg.canaries} canaries do not "
                       f"fit a space of 10^{cfg.digits} secrets; raise audit.digits")
    drawn: list[int] = []
    seen: set[int] = set()
    while len(drawn) < need:
        for v in rng.integers(0, space, size=need).tolist():
            if v not in seen and len(drawn) < need:
                seen.add(v)
                drawn.append(v)
    text = [group_digits(str(v).zfill(cfg.digits)) for v in drawn]
    return text[:cfg.canaries], text[cfg.canaries:]


def group_digits(digits: str) -> str:
    return " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around the template's one {secret}."""
    prefix, _, suffix = template.partition("{secret}")
    return prefix, suffix


def canary_rows(cfg: AuditParams, like: dict, target_column: str) -> list[dict]:
    """One training row per planted copy (canary i: repetitions[i % len] copies); `like` is a row
    of the client's data whose other columns the canary rows copy (so dtypes match)."""
    prefix, suffix = split_template(cfg.template)
    rows = []
    for i, secret in enumerate(secrets(cfg)[0]):
        if target_column == "label":
            row = {**like, "prompt": prefix + secret + suffix, "label": 0}
        else:
            answer = (secret + suffix)
            row = {**like, "prompt": prefix, "target": answer}
            if "answers" in like:
                row["answers"] = [answer]
        rows += [row] * cfg.repetitions[i % len(cfg.repetitions)]
    return rows


def hold_out(train: "datasets.Dataset", cfg: AuditParams) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """(rows that go on to be partitioned, audit.members rows held out of every client: the
    non-members), drawn with audit.seed."""
    if not cfg.members:
        return train, train.select([])
    if cfg.members * 2 > len(train):
        raise BadInput(f"audit.members: {cfg.members} non-members to hold out of {len(train)} train rows "
                       "leaves too few to train on; lower it or raise data.max_train")
    parts = train.train_test_split(test_size=cfg.members, seed=cfg.seed, shuffle=True)
    return parts["train"], parts["test"]


def plant(clients: list["datasets.Dataset"], cfg: AuditParams, target_column: str,
          nonmembers: "datasets.Dataset", out: Path) -> list["datasets.Dataset"]:
    """The clients' data with the canaries planted (copies dealt round-robin over audit.clients,
    then each audited client shuffled with audit.seed), and out/audit/ holding canaries.json,
    members.parquet (audit.members rows drawn from the clients' own rows, canaries aside) and
    nonmembers.parquet."""
    import datasets

    bad = [c for c in cfg.clients if c >= len(clients)]
    if bad:
        raise BadInput(f"audit.clients: client {bad[0]} does not exist (partition.num_clients is {len(clients)})")
    folder = Path(out) / AUDIT_DIR
    folder.mkdir(parents=True)
    members = member_rows(clients, cfg)
    rows = canary_rows(cfg, clients[cfg.clients[0]][0], target_column) if cfg.canaries else []
    planted = list(clients)
    for k, c in enumerate(cfg.clients):
        mine = rows[k::len(cfg.clients)]
        if mine:
            extra = datasets.Dataset.from_list(mine, features=clients[c].features)
            planted[c] = datasets.concatenate_datasets([clients[c], extra]).shuffle(seed=cfg.seed).flatten_indices()
    members.to_parquet(folder / "members.parquet")
    nonmembers.to_parquet(folder / "nonmembers.parquet")
    canaries, _ = secrets(cfg)
    (folder / "canaries.json").write_text(json.dumps({
        "template": cfg.template, "clients": cfg.clients,
        "canaries": [{"secret": s, "repetitions": cfg.repetitions[i % len(cfg.repetitions)]}
                     for i, s in enumerate(canaries)]}, indent=2))
    return planted


def audited_partition(train: "datasets.Dataset", p, cfg: AuditParams, target_column: str,
                      out: Path) -> list["datasets.Dataset"]:
    """partition.partition with the audit around it: non-members held out of the train split
    first, canaries planted in the clients' data after (out/audit/). The partition stage and
    benchmarks/memorization.py both split data this way."""
    from edgetune.partition import partition

    rest, nonmembers = hold_out(train, cfg)
    return plant(partition(rest, p), cfg, target_column, nonmembers, out)


def member_rows(clients: list["datasets.Dataset"], cfg: AuditParams) -> "datasets.Dataset":
    """audit.members rows drawn (audit.seed) uniformly from all clients' data: the same
    distribution as the non-members, a uniform sample of the train split. (Drawn from one
    client of a label-skewed split, members would differ from non-members by their labels,
    and the AUC would measure that.)"""
    import datasets

    pool = datasets.concatenate_datasets(clients)
    if cfg.members > len(pool):
        raise BadInput(f"audit.members: {cfg.members} members asked, the clients hold {len(pool)} rows")
    rng = np.random.default_rng(cfg.seed)
    return pool.select(sorted(rng.choice(len(pool), size=cfg.members, replace=False).tolist()))


# ------------------------------------------------------------------ measurement
def sequence_nll(model, tok, prefix: str, continuations: list[str], batch_size: int = 64) -> np.ndarray:
    """Log-perplexity (summed NLL, nats) of each continuation's tokens given `prefix`."""
    import torch

    from edgetune.generation import answer_batch_loss, encode_answers

    out = []
    with torch.no_grad():
        for start in range(0, len(continuations), batch_size):
            chunk = continuations[start:start + batch_size]
            batch = encode_answers(tok, [prefix] * len(chunk), chunk, max_length=128, eos_id=None)
            # No EOS scored: drop it from the labels (encode_answers appends one).
            batch["labels"][:, -1] = -100
            mean, _ = answer_batch_loss(model, batch, reduction="none")
            counted = (batch["labels"] != -100).sum(-1)
            out.append((mean.float().cpu() * counted).numpy())
    return np.concatenate(out)


def exposure(canary_nll: float, candidate_nll: np.ndarray) -> dict[str, float]:
    """Rank exposure among the candidates, and the skew-normal extrapolation (Carlini et al.
    2019, Sec. 4.3)."""
    from scipy.stats import skewnorm

    rank = 1 + int((candidate_nll < canary_nll).sum())
    by_rank = math.log2(len(candidate_nll) + 1) - math.log2(rank)
    shape, loc, scale = skewnorm.fit(candidate_nll)
    tail = float(skewnorm.cdf(canary_nll, shape, loc, scale))
    return {"rank": rank, "exposure": by_rank, "exposure_fit": -math.log2(max(tail, 1e-300))}


def example_losses(model, tok, task, frame, max_length: int, batch_size: int = 16) -> np.ndarray:
    """The task objective's loss of each row (label-word CE or answer CE; objectives.py)."""
    import torch

    from edgetune.objectives import objective_for

    objective = objective_for(task, tok, max_length, model)
    prompts, targets = frame["prompt"].tolist(), frame[objective.target_column].tolist()
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            batch = objective.batch(prompts[s:s + batch_size], targets[s:s + batch_size])
            out.append(objective.row_losses(model, batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def membership_auc(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """AUC of the loss attack (lower loss = member); 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    return float(roc_auc_score(labels, -np.r_[member_loss, nonmember_loss]))


def measure(model, tok, task, audit_dir: Path, cfg: AuditParams, max_length: int) -> dict:
    """Exposure of every canary (and the mean per repetition count) and the membership AUC of
    one model, from the partition stage's audit/ folder."""
    import pandas as pd

    audit_dir = Path(audit_dir)
    if not (audit_dir / "canaries.json").is_file():
        raise BadInput(f"{audit_dir}/canaries.json: not found (audit.* is set: re-run the partition stage)")
    model.eval()
    result: dict = {}
    planted = json.loads((audit_dir / "canaries.json").read_text())["canaries"]
    if planted:
        prefix, suffix = split_template(cfg.template)
        _, candidates = secrets(cfg)
        candidate_nll = sequence_nll(model, tok, prefix, [c + suffix for c in candidates])
        canary_nll = sequence_nll(model, tok, prefix, [p["secret"] + suffix for p in planted])
        rows = [{"repetitions": p["repetitions"], **exposure(float(n), candidate_nll)}
                for p, n in zip(planted, canary_nll)]
        result["canaries"] = rows
        for reps in sorted({r["repetitions"] for r in rows}):
            mine = [r for r in rows if r["repetitions"] == reps]
            result[f"exposure_rep{reps}"] = float(np.mean([r["exposure"] for r in mine]))
            result[f"exposure_fit_rep{reps}"] = float(np.mean([r["exposure_fit"] for r in mine]))
        result["exposure_max_bits"] = math.log2(len(candidates) + 1)
    members = pd.read_parquet(audit_dir / "members.parquet")
    nonmembers = pd.read_parquet(audit_dir / "nonmembers.parquet")
    if len(members) and len(nonmembers):
        m = example_losses(model, tok, task, members, max_length)
        n = example_losses(model, tok, task, nonmembers, max_length)
        result |= {"mia_auc": membership_auc(m, n), "member_loss": float(m.mean()),
                   "nonmember_loss": float(n.mean())}
    return result

