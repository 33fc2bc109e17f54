"""finetune.flower.simulation: Flower's Simulation Engine (Ray, one virtual node per client)
ends where the local backend ends, bit for bit. A file of its own: Ray's start-up is the
suite's longest single cost, and pytest-xdist then runs it beside tests/test_flower.py."""

from __future__ import annotations

import pytest

from edgetune.config import FinetuneParams
from tests.test_flower import finetune_params, partitions, run, same  # noqa: F401 (partitions: a fixture)

pytestmark = pytest.mark.flower


def test_simulation_engine_matches_the_local_backend(tiny_model_dir, partitions, tmp_path):
    pytest.importorskip("ray")
    raw = finetune_params("fedkseed", rounds=2)
    _, local, local_state = run(tiny_model_dir, partitions, tmp_path / "local", FinetuneParams(**raw))
    cfg = FinetuneParams(**{**raw, "flower": {**raw["flower"], "simulation": True}}, backend="flower")
    summary, sim, sim_state = run(tiny_model_dir, partitions, tmp_path / "sim", cfg)
    assert same(local_state, sim_state)
    assert [(h.clients, h.train_loss) for h in local] == [(h.clients, h.train_loss) for h in sim]
    assert summary["backend"] == "flower-simulation"


def test_fedkseed_with_secure_aggregation_on_the_simulation_engine_matches_the_local_backend(
        tiny_model_dir, partitions, tmp_path):
    """A virtual node learns its partition's folder from the server's hello (finetune.secagg
    registers each client's sample count there); FedKSeed's masked K-vectors, clipped and noised
    by the ClientApps (DP with the clients' noise), sum to the local backend's scalars, with a
    dropped client's masks recovered."""
    pytest.importorskip("ray")
    raw = {**finetune_params("fedkseed", rounds=2), "sample_rate": 0.75, "dropout": 0.3, "min_clients": 2,
           "secagg": {"enabled": True}, "dp": {"noise_multiplier": 0.5, "clip": 1.0, "noise": "clients"}}
    _, local, local_state = run(tiny_model_dir, partitions, tmp_path / "local", FinetuneParams(**raw))
    cfg = FinetuneParams(**{**raw, "flower": {**raw["flower"], "simulation": True}}, backend="flower")
    _, sim, sim_state = run(tiny_model_dir, partitions, tmp_path / "sim", cfg)
    assert same(local_state, sim_state)
    assert [(h.clients, h.dropped, h.train_loss) for h in local] == [(h.clients, h.dropped, h.train_loss) for h in sim]
    assert sim[0].dropped and sim[0].extra["bytes_secagg_recovery"] > 0
    assert bool((sim_state["history"] != 0).all())  # the clients' noise lands on every candidate
    epsilons = [h.extra["dp_epsilon"] for h in local]
    assert epsilons == [h.extra["dp_epsilon"] for h in sim] and epsilons[-1] > 0
