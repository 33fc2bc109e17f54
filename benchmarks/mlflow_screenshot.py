"""A PNG of the MLflow UI on real pipeline runs, taken with headless Chromium.

Starts `mlflow server` on the given tracking store (loopback, a free port), opens one view of
the experiment, lets the page's JavaScript render, saves the screenshot and stops the server.
Views (--view): `compare` (default: the chart view `make run` links to, the fine-tuned score
against bytes per client per round and peak memory, edgetune/tracking.py: compare_view_url),
`landing` (the experiment as it opens), `runs` (the pipeline runs with their Dataset and Models
columns), `models` (the logged models), `compare-runs` (MLflow's compare page of the runs).

    python -m benchmarks.mlflow_screenshot --tracking-uri sqlite:///mlflow.db \\
        --experiment edgetune-sst2 --out docs/mlflow_compare.png

Needs Chromium (Debian: `apt-get install chromium`); `--browser` points at another binary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from edgetune.cli import run_main
from edgetune.config import BadInput


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow server did not answer {url} within {seconds:.0f} s")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare-runs route: run ids and experiment ids as JSON lists in the hash query."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{base}/#/compare-runs?{query}"


def view_url(view: str, base: str, experiment_id: str, run_ids: list[str]) -> str:
    from edgetune import tracking

    pipeline_runs = urllib.parse.urlencode({"searchFilter": tracking.PIPELINE_RUNS})
    return {
        "compare": lambda: tracking.compare_view_url(base, experiment_id),
        "landing": lambda: tracking.experiment_url(base, experiment_id),
        "runs": lambda: f"{base}/#/experiments/{experiment_id}/runs?{pipeline_runs}&workflowType=machine_learning",
        "models": lambda: f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning",
        "compare-runs": lambda: compare_url(base, experiment_id, run_ids),
    }[view]()


def screenshot(browser: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
           f"--screenshot={out.resolve()}", url]
    for attempt in (1, 2):  # headless Chromium's virtual clock now and then never runs out: kill, retry once
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            break
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise RuntimeError(f"{browser} did not finish the screenshot in 240 s, twice") from None
    if proc.returncode or not out.is_file():
        raise RuntimeError(f"{browser} failed: {proc.stderr.strip().splitlines()[-1:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="MLflow backend store, e.g. sqlite:///mlflow.db")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    p.add_argument("--view", choices=["compare", "landing", "runs", "models", "compare-runs"], default="compare")
    p.add_argument("--max-runs", type=int, default=8)
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    p.add_argument("--size", default="1600x1400", help="window WIDTHxHEIGHT in pixels")
    p.add_argument("--wait-ms", type=int, default=60000, help="virtual time the page gets to render")
    args = p.parse_args(argv)
    if not shutil.which(args.browser):
        raise BadInput(f"--browser: {args.browser} not found; install Chromium (Debian: apt-get install chromium)")
    width, height = (int(v) for v in args.size.lower().split("x"))

    import mlflow

    from edgetune import report

    mlflow.set_tracking_uri(args.tracking_uri)
    experiment = mlflow.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise BadInput(f"--experiment: no experiment named {args.experiment!r} in {args.tracking_uri}")
    runs = report.pipeline_runs(args.experiment, tracking_uri=args.tracking_uri)
    if runs.empty:
        raise BadInput(f"--experiment: {args.experiment!r} has no finished pipeline run to compare")
    run_ids = runs["run_id"].head(args.max_runs).tolist()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"{base}/health", server)
        screenshot(args.browser, view_url(args.view, base, experiment.experiment_id, run_ids), args.out,
                   width, height, args.wait_ms)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out} ({args.view} view, {len(run_ids)} pipeline runs of {args.experiment})")


if __name__ == "__main__":
    run_main(main)
