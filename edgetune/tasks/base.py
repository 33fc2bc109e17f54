"""What a task is: where its data comes from, how an example becomes a prompt, how it is scored."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgetune.config import BadInput

if TYPE_CHECKING:
    import datasets

MIRROR_ENV = "EDGETUNE_DATA_MIRROR"

# Filled by register_task; looked up by data.task.
TASKS: dict[str, "Task"] = {}


@dataclass(frozen=True)
class Task:
    """A task: `load(split, mirror)` gives a datasets.Dataset with a `prompt` column, plus
    `label` (ClassificationTask) or `target` and `answers` (GenerationTask)."""

    name: str
    hub_id: str
    splits: tuple[str, str]  # (train split, eval split)
    loader: Callable[[str, Path | None], "datasets.Dataset"]  # (split, mirror folder or None = hub)
    packaged_loader: Callable[[str], "datasets.Dataset"] | None = None  # data shipped in edgetune

    @property
    def has_packaged(self) -> bool:
        return self.packaged_loader is not None

    def load(self, split: str, source: "DataSource | Path | None") -> "datasets.Dataset":
        """The split from `source` (a DataSource; a Path means that mirror, None the hub)."""
        if split not in self.splits:
            raise BadInput(f"task {self.name}: unknown split {split!r}; expected one of {self.splits}")
        source = DataSource.of(source)
        if source.kind == "packaged":
            if not self.has_packaged:
                raise BadInput(f"data.source: packaged data ships only for {packaged_tasks()}, not "
                               f"{self.name}; use hub or mirror")
            return self.packaged_loader(split)
        if source.kind == "mirror":
            return self.loader(split, source.mirror)
        from edgetune.hub import hub_access

        with hub_access(f"dataset {self.hub_id!r} (task {self.name})", hub_fix(self)):
            return self.loader(split, None)


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Classification scored by the label words' next-token logits (LM-BFF / MeZO style):
    the prediction is the label word whose first token has the highest logit after the prompt."""

    label_words: tuple[str, ...] = ()
    target_column = "label"
    primary_metric = "accuracy"


# Metrics a generation task can name; edgetune.generation.score computes them.
GENERATION_METRICS = ("squad", "rougeL")


@dataclass(frozen=True)
class GenerationTask(Task):
    """Answer generation scored against reference answers. `load` gives columns `prompt`
    (ends where the answer starts), `target` (the training answer: the first reference) and
    `answers` (every reference, for the metric), plus task-specific extras."""

    metric: str = "squad"        # "squad" (exact match + F1) | "rougeL"
    max_new_tokens: int = 32     # greedy tokens generated per prompt at evaluation
    stop: str | None = "\n"      # the answer ends at the first stop string (None: all new tokens)
    target_column = "target"

    @property
    def primary_metric(self) -> str:
        return {"squad": "f1", "rougeL": "rougeL"}[self.metric]

    def __post_init__(self):
        if self.metric not in GENERATION_METRICS:
            raise ValueError(f"task {self.name}: unknown metric {self.metric!r}; "
                             f"expected one of {GENERATION_METRICS}")


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BadInput(f"data.task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class DataSource:
    """Where a split is read from: data shipped in edgetune, the hub, or a mirror folder."""

    kind: str  # packaged | hub | mirror
    mirror: Path | None = None

    @classmethod
    def of(cls, value: "DataSource | Path | None") -> "DataSource":
        if isinstance(value, DataSource):
            return value
        return cls("hub") if value is None else cls("mirror", Path(value))

    def describe(self) -> str:
        return f"mirror {self.mirror}" if self.kind == "mirror" else self.kind


def packaged_tasks() -> list[str]:
    return sorted(name for name, t in TASKS.items() if t.has_packaged)


def hub_fix(task: Task) -> str:
    fix = f"set data.mirror or ${MIRROR_ENV} to a local mirror folder"
    return fix + (" or data.source: packaged" if task.has_packaged else "")


def resolve_source(source: str, mirror: str | None, has_packaged: bool) -> DataSource:
    """data.source as a DataSource. auto = the mirror if one is set (data.mirror or
    $EDGETUNE_DATA_MIRROR), else the packaged data when there is some, else the hub."""
    folder = resolve_mirror(mirror) if source in ("auto", "mirror") else None
    if source == "mirror" and folder is None:
        raise BadInput(f"data.source: mirror needs a mirror folder; set data.mirror or ${MIRROR_ENV}")
    if source == "mirror" or (source == "auto" and folder is not None):
        return DataSource("mirror", folder)
    if source == "packaged" or (source == "auto" and has_packaged):
        return DataSource("packaged")
    return DataSource("hub")


def resolve_mirror(configured: str | None) -> Path | None:
    """The mirror folder from data.mirror, else $EDGETUNE_DATA_MIRROR, else None (use the hub)."""
    value = configured or os.environ.get(MIRROR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "data.mirror" if configured else MIRROR_ENV
        raise BadInput(f"{origin}: mirror folder {str(path)!r} does not exist")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise BadInput(f"data mirror: expected file {str(path)!r} is missing")
    return path


def require_parquet(path: Path, columns: tuple[str, ...] = ("prompt",)) -> Path:
    """A Parquet file that opens, has `columns` and at least one row, checked from its footer
    (no rows read): a missing, corrupt, empty or foreign file fails in one line naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found (re-run the stage that writes it)")
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        raise BadInput(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in columns if c not in meta.schema.names]
    if missing:
        raise BadInput(f"{path}: missing column(s) {missing}; has {meta.schema.names}")
    if meta.num_rows == 0:
        raise BadInput(f"{path}: no rows")
    return path
