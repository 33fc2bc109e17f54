"""Time and memory per round, local engine vs Flower's Deployment Engine, same params (issue 8).

For each method (FedIT, FedKSeed-LoRA) on the real SmolLM2-135M and SST-2 partitions: the
local backend (every client in this process) and finetune.backend flower (a SuperLink and two
SuperNodes on loopback, a ClientApp process per message), with the same clients per round.
Reports seconds per round, peak resident memory (local: this process; Flower: the ServerApp
process and the largest ClientApp process), metered bytes next to Flower's wire bytes, and
whether the final global states are bit-identical.

    python -m benchmarks.flower_vs_local                    # -> results/flower_vs_local.json
    python -m benchmarks.flower_vs_local --methods fedit --rounds 3

Uses the 10-client SST-2 partition of benchmarks/robustness.py (benchmarks/.cache/robust).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import CACHE, model_dir, peak_rss_mb, reset_peak_rss, save

METHODS = {"fedit": {}, "fedkseed": {"trainable": "lora", "zo": {"lr": 1e-2, "eps": 1e-2}}}


def run_case(method: str, backend: str, args, base: Path, parts: Path, out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from edgetune.config import FinetuneParams
    from edgetune.federated.train import finetune

    cfg = FinetuneParams(method=method, num_rounds=args.rounds, sample_rate=args.sample_rate,
                         local_steps=args.local_steps, batch_size=8, backend=backend,
                         flower={"nodes": args.nodes}, **METHODS[method])
    reset_peak_rss()
    summary, history = finetune(base, parts, "sst2", cfg, out)
    seconds = [h.seconds for h in history]
    row = {"seconds_per_round": sum(seconds) / len(seconds), "seconds_first_round": seconds[0],
           "seconds_later_rounds": sum(seconds[1:]) / max(1, len(seconds) - 1),
           "bytes_metered": sum(h.bytes_exchanged for h in history), "clients": [h.clients for h in history]}
    if backend == "local":
        row["peak_rss_mb"] = peak_rss_mb()
    else:
        row.update({k: summary[k] for k in ("server_peak_rss_mb", "client_peak_rss_mb", "wire_bytes_up_total",
                                            "wire_bytes_down_total", "bytes_catchup_total")})
    return row, load_file(out / "checkpoint" / "global.safetensors")


def main(argv=None) -> None:
    from benchmarks.robustness import partition

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--sample-rate", type=float, default=0.4, help="clients per round / 10")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--prepared", default="data/prepared")
    args = p.parse_args(argv)
    base, parts = model_dir(None), partition(CACHE / "robust", args.prepared)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            local, local_state = run_case(method, "local", args, base, parts, Path(tmp) / f"{method}-local")
            flower, flower_state = run_case(method, "flower", args, base, parts, Path(tmp) / f"{method}-flower")
            same = local_state.keys() == flower_state.keys() and all(local_state[k].equal(flower_state[k])
                                                                     for k in local_state)
            results[method] = {
                "local_seconds_per_round": local["seconds_per_round"],
                "flower_seconds_per_round": flower["seconds_per_round"],
                "flower_seconds_later_rounds": flower["seconds_later_rounds"],
                "flower_over_local_time": flower["seconds_per_round"] / local["seconds_per_round"],
                "local_peak_rss_mb": local["peak_rss_mb"],
                "flower_server_peak_rss_mb": flower["server_peak_rss_mb"],
                "flower_client_peak_rss_mb": flower["client_peak_rss_mb"],
                "bytes_metered": local["bytes_metered"],
                "flower_wire_bytes": flower["wire_bytes_up_total"] + flower["wire_bytes_down_total"],
                "flower_catchup_bytes": flower["bytes_catchup_total"],
                "same_clients": local["clients"] == flower["clients"],
                "bit_identical": same,
            }
            print(method, results[method])
    save("flower_vs_local", results, {"rounds": args.rounds, "local_steps": args.local_steps,
                                      "sample_rate": args.sample_rate, "nodes": args.nodes, "clients": 10,
                                      "model": str(base), "task": "sst2"})


if __name__ == "__main__":
    main()
