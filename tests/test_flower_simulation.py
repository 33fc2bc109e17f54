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
