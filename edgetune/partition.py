"""Split a task's train split over simulated clients with flwr-datasets partitioners.

Schemes: `iid` (shuffled equal shards), `dirichlet` (label shares ~ Dir(alpha), Hsu et al. 2019),
`pathological` (k labels per client, McMahan et al. 2017) and `natural` (one client per value of
a column, e.g. Dolly's category). The partitioning itself is flwr-datasets'; this module adds
seeding, the minimum-size check and the per-client statistics the stage writes and plots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgetune.config import BadInput, PartitionParams

if TYPE_CHECKING:
    import datasets


def make_partitioner(p: PartitionParams):
    from flwr_datasets import partitioner as fp

    if p.scheme == "iid":
        return fp.IidPartitioner(num_partitions=p.num_clients)
    if p.scheme == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=p.num_clients, partition_by=p.by, alpha=p.alpha,
            min_partition_size=p.min_size, self_balancing=False, seed=p.seed,
        )
    if p.scheme == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=p.num_clients, partition_by=p.by,
            num_classes_per_partition=p.labels_per_client, seed=p.seed,
        )
    return fp.NaturalIdPartitioner(partition_by=p.by)


def partition(ds: "datasets.Dataset", p: PartitionParams) -> list["datasets.Dataset"]:
    """Return one dataset per client. Raises BadInput if a client gets fewer than min_size rows."""
    if p.scheme != "iid" and p.by not in ds.column_names:
        raise BadInput(f"partition.by: column {p.by!r} not in the data; have {ds.column_names}")
    if p.scheme != "natural" and len(ds) < p.num_clients * p.min_size:
        raise BadInput(
            f"partition.num_clients: {p.num_clients} clients x min_size {p.min_size} needs "
            f"{p.num_clients * p.min_size} rows; the train split has {len(ds)}"
        )
    # IidPartitioner shards in order, so shuffle first; the others shuffle with their own seed.
    ds = ds.shuffle(seed=p.seed).flatten_indices()
    partitioner = make_partitioner(p)
    partitioner.dataset = ds
    try:
        clients = [partitioner.load_partition(i) for i in range(partitioner.num_partitions)]
    except ValueError as e:  # e.g. Dirichlet could not meet min_partition_size
        raise BadInput(f"partition: {p.scheme} partitioner failed: {e}") from None
    if p.scheme == "natural" and len(clients) != p.num_clients:
        raise BadInput(
            f"partition.num_clients: natural split by {p.by!r} gives {len(clients)} clients, "
            f"not {p.num_clients}"
        )
    small = [(i, len(c)) for i, c in enumerate(clients) if len(c) < p.min_size]
    if small:
        raise BadInput(
            f"partition.min_size: client {small[0][0]} got {small[0][1]} rows (< {p.min_size}); "
            f"{len(small)} client(s) too small: raise alpha, lower num_clients or min_size"
        )
    return clients


def client_stats(clients: list["datasets.Dataset"], label_column: str | None = "label") -> dict:
    """Per-client size and share of each value of `label_column` (e.g. label, category), plus
    the value set, as a JSON-able dict. Without a column (a generation task split iid), every
    row counts as the one value "all"."""
    from collections import Counter

    def column(c):
        return c[label_column] if label_column else ["all"] * len(c)

    labels = sorted({y for c in clients for y in column(c)})
    rows = []
    for i, c in enumerate(clients):
        counts = Counter(column(c))
        rows.append({
            "client": i,
            "size": len(c),
            "label_share": {str(y): counts.get(y, 0) / max(len(c), 1) for y in labels},
        })
    sizes = [r["size"] for r in rows]
    return {
        "num_clients": len(clients),
        "column": label_column or "none",
        "labels": [str(y) for y in labels],
        "total": sum(sizes),
        "min_size": min(sizes),
        "max_size": max(sizes),
        "clients": rows,
    }


def plot_label_share(stats: dict, path) -> None:
    """Heatmap: clients x labels, cell = share of that label in the client's data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = stats["labels"]
    grid = np.array([[r["label_share"][y] for y in labels] for r in stats["clients"]])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.35 * len(grid)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(grid)), [f"{r['client']} (n={r['size']})" for r in stats["clients"]])
    ax.set_xlabel(stats.get("column", "label"))
    ax.set_ylabel("client (size)")
    ax.set_title(f"{stats.get('column', 'label')} share per client")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
