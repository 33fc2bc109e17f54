"""Running a Flower federation: a SuperLink and SuperNodes on loopback, `flwr run` of
edgetune's Flower App, and waiting for the run's result.

    LoopbackFederation   one SuperLink and N SuperNodes as child processes on 127.0.0.1 (each
                         SuperNode owns a block of clients through its --node-config); what the
                         finetune stage starts when finetune.flower.superlink is null, and what
                         the tests and flows/federation.py use
    submit               `flwr run` the app with a job, poll `flwr ls` until the run finishes,
                         raise RunFailed with the ServerApp's log tail when it did not complete

The SuperLink runs with --disable-runtime-dependency-installation: the app's components are
imported from the installed edgetune (app/pyproject.toml), nothing is pip-installed at run time.
For machines other than this one, README "Run a federation across machines" has the commands.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edgetune.config import RunFailed

APP_DIR = Path(__file__).parent / "app"
BIN = Path(sys.executable).parent  # the venv's flwr, flower-superlink, flower-supernode
CONNECTION = "edgetune"
# Flower fails a ServerApp / ClientApp task whose heartbeat (every ~20 s) is missing for
# HEARTBEAT_PATIENCE x 30 s = 60 s. Loopback federations share a few cores with everything else
# on the machine (a 2-core CI runner failed a run that way), so the processes
# started here allow LOOPBACK_PATIENCE x 30 s; a federation across machines keeps Flower's default.
LOOPBACK_PATIENCE = 10
ENTRY_POINTS = {"flower-superlink": "flwr.superlink.cli:flower_superlink",
                "flower-supernode": "flwr.supernode.cli:flower_supernode"}


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: its home, no telemetry or update check, a fast task
    poll, and this venv's executables first on PATH (SuperLink / SuperNode start theirs by name)."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def node_threads(nodes: int) -> dict[str, str]:
    """Loopback SuperNodes share this machine's cores: give each node's ClientApps an equal share
    of torch's threads (OMP_NUM_THREADS), unless the user set it; oversubscribed, two ClientApps
    with a thread per core each ran 3x slower here."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nodes))}


def write_connection(home: Path, address: str, insecure: bool = True,
                     root_certificates: str | None = None) -> None:
    """$FLWR_HOME/config.toml naming the SuperLink `flwr run <app> edgetune` submits to (without
    it the CLI would start a simulation SuperLink of its own)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps(address)}", f"insecure = {str(insecure).lower()}"]
    if root_certificates:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).absolute()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config(values: dict[str, object]) -> str:
    """--node-config's `key=value ...` form (values as TOML: strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def client_blocks(num_clients: int, nodes: int) -> list[list[int]]:
    """Clients 0..n-1 split into `nodes` (<= n) contiguous blocks, as even as possible."""
    size, extra = divmod(num_clients, nodes)
    starts = [i * size + min(i, extra) for i in range(nodes + 1)]
    return [list(range(starts[i], starts[i + 1])) for i in range(nodes)]


class LoopbackFederation:
    """A SuperLink and one SuperNode per entry of `nodes` (its node config) on 127.0.0.1, logs
    in `folder`/logs. Use as a context manager; every process is stopped on exit."""

    def __init__(self, folder: Path, nodes: list[dict[str, object]]):
        self.folder, self.nodes = Path(folder).absolute(), nodes
        self.home = self.folder / "flwr-home"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "LoopbackFederation":
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        write_connection(self.home, self.address)
        try:
            self.spawn("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                     "--host", "127.0.0.1", "--port", str(self.port)])
            wait_healthy(f"http://{self.address}/health", self.procs[0], self.folder / "logs" / "superlink.log")
            threads = node_threads(len(self.nodes))
            for i, values in enumerate(self.nodes):
                self.spawn(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink", self.address,
                                             "--port", str(free_port()), "--node-config", node_config(values)],
                           threads)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.folder / "logs" / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(patient_command(cmd), env={**flower_env(self.home), **(env or {})},
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           cwd=self.folder))

    def stop(self) -> None:
        """SIGTERM each process group (a SuperNode's SuperExec and ClientApps with it), then SIGKILL."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def patient_command(cmd: list[str]) -> list[str]:
    """`cmd` (a Flower executable and its arguments) as `python -c`, with Flower's heartbeat
    patience raised to LOOPBACK_PATIENCE before any of Flower's modules read it."""
    module, function = ENTRY_POINTS[cmd[0]].split(":")
    code = (f"import sys, flwr.common.constant as c; c.HEARTBEAT_PATIENCE = {LOOPBACK_PATIENCE}; "
            f"from {module} import {function}; sys.argv[0] = {cmd[0]!r}; sys.exit({function}())")
    return [sys.executable, "-c", code, *cmd[1:]]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"flower-superlink exited with code {proc.returncode}: {tail(log)}")
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RunFailed(f"flower-superlink: no answer at {url} after {timeout:.0f} s")


def tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])


def flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(home), capture_output=True, text=True)


def submit(home: Path, job: Path, timeout: float) -> dict:
    """`flwr run` edgetune's app with `job` on the SuperLink of $FLWR_HOME/config.toml, then
    wait until the run finishes; returns `flwr ls`'s record of it. RunFailed (with the
    ServerApp's last log lines) if it failed, was stopped, or did not finish within `timeout`."""
    started = flwr(home, "run", str(APP_DIR), CONNECTION, "--format", "json",
                   "--run-config", f"job={json.dumps(str(Path(job).absolute()))}")
    try:
        run_id = json.loads(started.stdout)["run-id"]
    except (ValueError, KeyError):
        raise RunFailed(f"flwr run: {(started.stdout + started.stderr).strip()[-500:]}") from None
    deadline = time.monotonic() + timeout
    while True:
        listed = flwr(home, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            run = json.loads(listed.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            run = {"status": "unknown"}
        if run["status"].startswith("finished"):
            break
        if time.monotonic() > deadline:
            flwr(home, "stop", str(run_id), CONNECTION)
            raise RunFailed(f"flower run {run_id}: not finished after {timeout:.0f} s (stopped)")
        time.sleep(2.0)
    if run["status"] != "finished:completed":
        log = flwr(home, "log", str(run_id), CONNECTION, "--show").stdout.strip().splitlines()
        reason = run.get("status-details") or " | ".join(log[-3:])
        raise RunFailed(f"flower run {run_id} {run['status']}: {reason}")
    return run
