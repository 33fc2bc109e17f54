"""A throw-away copy of the pipeline (code, dvc.yaml, params.yaml with overrides) in a temp
folder, run as a user runs it: subprocesses, no data mirror, the hub offline (the packaged data)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import REPO


def run(cmd, cwd, env, timeout=900) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def set_params(root: Path, overrides: dict) -> str:
    """Merge {section: {key: value}} into root/params.yaml (one level deep); returns the old text."""
    old = (root / "params.yaml").read_text()
    params = yaml.safe_load(old)
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return old


def make_project(root: Path, overrides: dict, git: bool = False) -> dict[str, str]:
    """Copy the pipeline into root with params.yaml + overrides and `dvc init` it (in a git
    repository with one commit if `git`, as `dvc exp run` needs); returns the environment to
    run it with."""
    import shutil

    for name in ("edgetune", "stages", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / "params.yaml", root)
    set_params(root, overrides)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API", "EDGETUNE_DATA_MIRROR"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_HOME=str(root / ".prefect"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    if not git:
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
        return env
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    (root / ".gitignore").write_text("mlflow.db*\n.prefect/\n__pycache__/\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "pipeline"]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)
    return env


@contextlib.contextmanager
def prefect_server(env: dict[str, str], timeout: float = 90):
    """A Prefect server (its API only: no UI, no background services) for several flow runs, as
    `make prefect-ui` gives a user: sets PREFECT_API_URL in env, so each flow skips starting (and
    migrating) a temporary server."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--no-services", "--analytics-off"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start on {url}") from None
                time.sleep(0.3)
        env["PREFECT_API_URL"] = url
        yield url
    finally:
        env.pop("PREFECT_API_URL", None)
        proc.terminate()
        proc.wait(timeout=30)


def mlflow_runs(root: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["start_time ASC"])
