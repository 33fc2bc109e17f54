"""Run the federated fine-tuning of params.yaml on Flower as a Prefect flow: start the
federation (or use a running SuperLink), submit the run, wait for its result.

    python -m flows.federation                          # SuperLink + finetune.flower.nodes SuperNodes on loopback
    python -m flows.federation --superlink host:8000    # a running SuperLink (README: across machines)
    python -m flows.federation --simulation             # Flower's Simulation Engine (Ray)

Tasks: `start federation` (SuperLink and SuperNodes as child processes, their logs in
<out>.flower/logs), `run on flower` (`flwr run` with the job, polled until it finishes),
`collect` (round logs -> metrics JSON, loss plot). The ServerApp logs every round to this
flow's MLflow run (run name `federation`). Reads the pipeline's data/partitions and
models/base; writes <out> like the finetune stage (merged/, checkpoint/), outside DVC.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from edgetune.cli import run_main, stage, write_metrics


def build_flow():
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    from edgetune.federated.flower import launch

    @task(name="start federation", cache_policy=NO_CACHE)
    def start_federation(stack: ExitStack, job, path: Path, partitions: Path, cfg) -> Path | None:
        home = launch.open_federation(stack, job, path, partitions, cfg)
        get_run_logger().info("flower: %s (logs: %s)", "Simulation Engine" if cfg.flower.simulation else
                              cfg.flower.superlink or f"{cfg.flower.nodes} SuperNodes on loopback",
                              path.parent / "logs")
        return home

    @task(name="run on flower", cache_policy=NO_CACHE)
    def run_on_flower(home: Path | None, job: Path, cfg, num_clients: int) -> None:
        run = launch.run_job(home, job, cfg, num_clients)
        if run:
            get_run_logger().info("flower run %s: %s, traffic %s", run.get("run-id"), run["status"],
                                  run.get("network-traffic"))

    @task(name="collect", cache_policy=NO_CACHE)
    def collect(out: Path, cfg, num_clients: int, metrics: Path) -> dict:
        from edgetune.federated.train import plot_history

        summary, history = launch.read_history(out, cfg, num_clients)
        plots = Path(f"{out}.flower") / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        plot_history(history, plots / "loss.png", plots / "rounds.csv")
        write_metrics(metrics, summary)
        return summary

    @flow(name="edgetune-federation")
    def federation(params_file: str, model: str, partitions: str, out: str, superlink: str | None,
                   simulation: bool) -> dict:
        from edgetune.federated.setup import load_clients
        from edgetune.tasks import get_task

        with stage("federation", params_file, [model, partitions], [out], section="finetune") as (params, _):
            cfg = flower_params(params.finetune, superlink, simulation)
            clients = load_clients(Path(partitions), get_task(params.data.task).target_column)
            launch.preflight(Path(model), cfg, len(clients))
            job, path = launch.write_job(Path(model), Path(partitions), params.data.task, cfg, Path(out), len(clients))
            with ExitStack() as stack:
                home = start_federation(stack, job, path, Path(partitions), cfg)
                run_on_flower(home, path, cfg, len(clients))
            return collect(Path(out), cfg, len(clients), Path(out) / "metrics.json")

    return federation


def flower_params(finetune, superlink: str | None, simulation: bool):
    """params.finetune on the Flower backend, with the command line's SuperLink or simulation."""
    flower = finetune.flower.model_copy(update={"simulation": simulation or finetune.flower.simulation,
                                                "superlink": superlink or finetune.flower.superlink})
    return finetune.model_copy(update={"backend": "flower", "flower": flower})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--model", default="models/base", help="base HF folder (the model stage's output)")
    p.add_argument("--partitions", default="data/partitions", help="the partition stage's output")
    p.add_argument("--out", default="models/finetuned-flower")
    p.add_argument("--superlink", help="host:port of a running SuperLink (default: finetune.flower.superlink, "
                   "else start one here)")
    p.add_argument("--simulation", action="store_true", help="Flower's Simulation Engine instead")
    args = p.parse_args(argv)
    summary = build_flow()(args.params, args.model, args.partitions, args.out, args.superlink, args.simulation)
    print(f"federation done: final train loss {summary['final_train_loss']:.4f}, "
          f"{summary['wire_bytes_up_total'] + summary['wire_bytes_down_total']:.0f} bytes on Flower's wire")


if __name__ == "__main__":
    run_main(lambda argv: sys.exit(main(argv)))
