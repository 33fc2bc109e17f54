"""Client-level differential privacy (edgetune/federated/privacy.py): the clip-and-noise step
on hand-made updates, the accountant's epsilon, tiny FedIT / FedKSeed runs, and the params checks."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import FinetuneParams, ParamsError, PrivacyParams, parse_params
from edgetune.federated.privacy import GaussianMechanism, epsilon
from tests.helpers import federate, make_clients


def mechanism(noise=0.0, clip=1.0, m=4, n=8):
    return GaussianMechanism(PrivacyParams(noise_multiplier=noise, clip=clip), seed=0,
                             clients_per_round=m, num_clients=n)


# --------------------------------------------------------------------------- unit
def test_clipping_bounds_one_clients_influence_on_the_mean():
    honest = [{"w": torch.tensor([0.1, 0.0, 0.0])} for _ in range(3)]
    huge = {"w": torch.tensor([1e6, -1e6, 1e6])}
    like = {"w": torch.zeros(3)}
    without = mechanism(clip=1.0).noisy_mean(honest, like)["w"]
    with_attacker = mechanism(clip=1.0).noisy_mean(honest + [huge], like)["w"]
    # fixed denominator m = 4: whatever a client sends, it moves the mean by at most clip / m
    assert (with_attacker - without).norm() <= 1.0 / 4 + 1e-6
    assert torch.allclose(without, torch.tensor([0.075, 0.0, 0.0]))  # 3 x 0.1 / 4, unclipped


def test_noise_has_the_stated_scale_and_is_seeded():
    like = {"w": torch.zeros(20_000)}
    zero = [{"w": torch.zeros(20_000)}]
    a = mechanism(noise=2.0, clip=0.5, m=4).noisy_mean(zero, like)["w"]
    assert a.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)  # noise_multiplier x clip / m
    again = mechanism(noise=2.0, clip=0.5, m=4)
    assert torch.equal(again.noisy_mean(zero, like)["w"], a)  # same seed, same round: same noise
    assert not torch.equal(again.noisy_mean(zero, like)["w"], a)  # the next round draws afresh
    assert again.rounds == 2


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    e1, e10 = epsilon(1.0, 0.5, 1, 1e-5), epsilon(1.0, 0.5, 10, 1e-5)
    assert 0 < e1 < e10
    assert epsilon(2.0, 0.5, 10, 1e-5) < e10
    assert epsilon(1.0, 0.05, 10, 1e-5) < e10  # sampling fewer clients amplifies privacy
    assert epsilon(1.0, 0.5, 0, 1e-5) == 0.0


# --------------------------------------------------------------------------- tiny runs
def run(tiny_model_dir, clients, name, **dp):
    cfg = FinetuneParams(method=name, num_rounds=2, sample_rate=1.0, local_steps=2, batch_size=4, lr=5e-3,
                         zo={"K": 8, "lr": 1e-4}, dp=dp)
    return federate(tiny_model_dir, clients, cfg)[2:]  # with DP: every client in each round


@pytest.mark.parametrize("name", ["fedit", "fedkseed"])
def test_dp_run_logs_epsilon_and_noise_moves_the_model(tiny_model_dir, sst2_prompts, name):
    clients = make_clients(sst2_prompts, n=4, size=16)
    plain, _ = run(tiny_model_dir, clients, name)
    small, h_small = run(tiny_model_dir, clients, name, noise_multiplier=0.5, clip=0.1)
    big, h_big = run(tiny_model_dir, clients, name, noise_multiplier=5.0, clip=0.1)
    eps = [h.extra["dp_epsilon"] for h in h_small]
    assert 0 < eps[0] < eps[1]  # spent per round, accumulating
    assert h_big[-1].extra["dp_epsilon"] < eps[-1]  # more noise, less epsilon
    keys = ["history"] if name == "fedkseed" else list(plain)
    dist = lambda s: float(sum((s[k] - plain[k]).double().pow(2).sum() for k in keys).sqrt())
    assert 0 < dist(small) < dist(big)
    if name == "fedkseed":  # noise on every candidate seed: all K scalars are non-zero
        assert bool((small["history"] != 0).all())


def test_dp_params_are_checked():
    with pytest.raises(ParamsError, match=r"finetune\.dp: job's clients never share a seed"):
        parse_params({"finetune": {"method": "job", "dp": {"noise_multiplier": 1.0}}})
    with pytest.raises(ParamsError, match=r"finetune\.dp: .*rule to mean \(got median\)"):
        parse_params({"finetune": {"dp": {"noise_multiplier": 1.0}, "aggregation": {"rule": "median"}}})
    for key, value in [("noise_multiplier", -1), ("clip", 0), ("delta", 1.5), ("epsilon", 3)]:
        with pytest.raises(ParamsError, match="finetune.dp"):
            parse_params({"finetune": {"dp": {key: value}}})
    parse_params({"finetune": {"method": "job", "dp": {"noise_multiplier": 0.0}}})  # off: any method
