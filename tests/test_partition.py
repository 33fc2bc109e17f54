"""Client partitions: every scheme covers the data exactly once, is seeded, and checks sizes."""

from __future__ import annotations

import json

import datasets
import pytest

from edgetune.config import BadInput, PartitionParams
from edgetune.partition import client_stats, partition, plot_label_share


@pytest.fixture(scope="module")
def train(sst2_prompts):
    prompts, labels = sst2_prompts
    return datasets.Dataset.from_dict({"prompt": prompts, "label": labels})


@pytest.mark.parametrize("scheme, extra", [
    ("iid", {}), ("dirichlet", {"alpha": 0.5}), ("pathological", {"labels_per_client": 1}),
])
def test_every_row_lands_in_exactly_one_client(train, scheme, extra):
    clients = partition(train, PartitionParams(scheme=scheme, num_clients=4, min_size=5, **extra))
    assert len(clients) == 4
    prompts = [p for c in clients for p in c["prompt"]]
    assert sorted(prompts) == sorted(train["prompt"])


def test_same_seed_same_split_other_seed_other_split(train):
    p = PartitionParams(scheme="dirichlet", num_clients=4, alpha=0.5, min_size=5, seed=3)
    a = [c["prompt"] for c in partition(train, p)]
    b = [c["prompt"] for c in partition(train, p)]
    c = [c["prompt"] for c in partition(train, p.model_copy(update={"seed": 4}))]
    assert a == b and a != c


def test_pathological_gives_one_label_per_client(train):
    clients = partition(train, PartitionParams(scheme="pathological", num_clients=4,
                                               labels_per_client=1, min_size=5))
    assert all(len(set(c["label"])) == 1 for c in clients)


def test_low_alpha_is_more_skewed_than_iid(train):
    def skew(scheme, **kw):
        stats = client_stats(partition(train, PartitionParams(scheme=scheme, num_clients=4,
                                                              min_size=5, **kw)))
        return max(abs(r["label_share"]["1"] - 0.5) for r in stats["clients"])

    assert skew("dirichlet", alpha=0.1) > skew("iid") + 0.2


def test_natural_split_by_column(train):
    ds = train.map(lambda row, i: {"source": f"s{i % 3}"}, with_indices=True)
    clients = partition(ds, PartitionParams(scheme="natural", by="source", num_clients=3, min_size=5))
    assert sorted(len(set(c["source"])) for c in clients) == [1, 1, 1]


def test_too_small_clients_are_an_error(train):
    with pytest.raises(BadInput, match="partition.num_clients"):
        partition(train.select(range(30)), PartitionParams(scheme="iid", num_clients=8, min_size=10))
    with pytest.raises(BadInput, match="partition.num_clients: natural"):
        partition(train, PartitionParams(scheme="natural", by="label", num_clients=5, min_size=5))


def test_missing_column_is_an_error(train):
    with pytest.raises(BadInput, match="partition.by"):
        partition(train, PartitionParams(scheme="dirichlet", by="category", num_clients=2))


def test_stats_and_heatmap(train, tmp_path):
    clients = partition(train, PartitionParams(scheme="dirichlet", num_clients=4, alpha=0.5, min_size=5))
    stats = client_stats(clients)
    assert stats["total"] == len(train) and stats["labels"] == ["0", "1"]
    for row in stats["clients"]:
        assert abs(sum(row["label_share"].values()) - 1) < 1e-9
    json.dumps(stats)
    plot_label_share(stats, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
