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
def run(tiny_model_dir, clients, name, extra=None, **dp):
    cfg = FinetuneParams(method=name, num_rounds=2, sample_rate=1.0, local_steps=2, batch_size=4, lr=5e-3,
                         zo={"K": 8, "lr": 1e-4}, dp=dp, **(extra or {}))
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


# --------------------------------------------------------------------------- with secure aggregation
def summed_round(noise: str, z: float, clip: float, sampled, updates, min_clients: int, replied=None):
    """One round of DP under secagg on hand-made updates (name -> tensor): the clients clip (and
    noise) and mask, the server unmasks and noises; returns the noisy mean update."""
    from edgetune.federated import secagg
    from edgetune.federated.protocol import Message

    cfg = PrivacyParams(noise_multiplier=z, clip=clip, noise=noise)
    mech = GaussianMechanism(cfg, seed=0, clients_per_round=len(sampled), num_clients=8, min_clients=min_clients)
    keys = {c: secagg.new_key() for c in sampled}
    sent = Message({"w": torch.zeros_like(next(iter(updates.values())))})
    secagg.announce(sent, sampled, {c: (secagg.public_bytes(keys[c]), 10 + c) for c in sampled}, 1, 0)
    replied = replied or sampled
    masked = {}
    for c in replied:
        share = mech.client_share(lambda: iter([updates[c].double().clone()]), c, 1, 0)
        masked[c] = secagg.mask(share, updates[c].numel(), {"num_samples": 10 + c, "loss": 1.0}, sent,
                                keys[c], c, 64.0, fixed_denominator=True)
    silent = [j for j in sampled if j not in replied]
    revealed = {(i, j): s for i in replied for j, s in secagg.reveal(
        keys[i], {j: secagg.public_bytes(keys[j]) for j in silent}, 1, 0).items()}
    mean, loss, _ = secagg.unmask(sent, masked, revealed, fixed_denominator=True)
    assert loss == pytest.approx(1.0, abs=1e-6)  # the loss: still the mean over the replies
    return mech.noisy_mean([{"w": mean.float()}], {"w": sent.tensors["w"]})["w"]


def test_clients_clip_their_own_updates_under_secure_aggregation():
    """The server sees only the masked sum, so each client clips before masking: one client's
    huge update moves the mean by at most clip / m, as in central DP, to the fixed point."""
    honest = {c: torch.tensor([0.1, 0.0, 0.0]) for c in range(3)}
    attacked = {**honest, 3: torch.tensor([1e6, -1e6, 1e6])}
    central = mechanism(noise=1e-9, clip=1.0).noisy_mean([{"w": u} for u in attacked.values()], {"w": torch.zeros(3)})
    for noise in ("server", "clients"):
        with_attacker = summed_round(noise, 1e-9, 1.0, [0, 1, 2, 3], attacked, min_clients=2)
        assert (with_attacker - central["w"]).abs().max() < 1e-6


def test_server_noise_under_secure_aggregation_is_central_dps_noise():
    """dp.noise: server draws the same noise from the same stream as without secagg, so the
    noisy mean is central DP's to the fixed point's resolution."""
    gen = torch.Generator().manual_seed(1)
    updates = {c: 0.3 * torch.randn(5_000, generator=gen) for c in range(4)}
    central = mechanism(noise=1.5, clip=2.0).noisy_mean([{"w": u} for u in updates.values()],
                                                        {"w": torch.zeros(5_000)})["w"]
    summed = summed_round("server", 1.5, 2.0, [0, 1, 2, 3], updates, min_clients=2)
    assert (summed - central).abs().max() < 1e-6


@pytest.mark.parametrize("replied", [[0, 1, 2, 3], [0, 2, 3]])
def test_clients_shares_add_up_to_at_least_the_central_noise(replied):
    """dp.noise: clients: each adds N(0, (z C)^2 / min_clients); the k replies' sum carries
    variance k / min_clients times central DP's, whoever dropped out (std measured on 40,000
    coordinates of zero updates), and nothing of it comes from the server."""
    zero = {c: torch.zeros(40_000) for c in range(4)}
    mean = summed_round("clients", 2.0, 0.5, [0, 1, 2, 3], zero, min_clients=2, replied=replied)
    expected = 2.0 * 0.5 * (len(replied) / 2) ** 0.5 / 4  # z C sqrt(k / t) / m
    assert mean.std().item() == pytest.approx(expected, rel=0.03)
    again = summed_round("clients", 2.0, 0.5, [0, 1, 2, 3], zero, min_clients=2, replied=replied)
    assert torch.equal(mean, again)  # noise_entropy seed: the shares are reproducible


def test_device_entropy_shares_differ_run_to_run():
    mech = GaussianMechanism(PrivacyParams(noise_multiplier=1.0, noise="clients", noise_entropy="device"),
                             seed=0, clients_per_round=4, num_clients=8, min_clients=2)
    draw = lambda: next(mech.client_share(lambda: iter([torch.zeros(64, dtype=torch.float64)]), 0, 1, 0))
    assert not torch.equal(draw(), draw())


@pytest.mark.parametrize("name", ["fedit", "fedkseed", "fedfull"])
def test_dp_with_secure_aggregation_trains_as_central_dp(tiny_model_dir, sst2_prompts, name):
    """FedIT / FedKSeed / FedFull with DP under secagg (server noise): the clients clip, the
    server noises the unmasked sum, and the run ends where central DP ends, to float rounding;
    with the clients' noise it moves the model as much, reproducibly. FedFull's clients read
    their whole-model summand twice (its norm, then the clipped share) without holding it."""
    clients = make_clients(sst2_prompts, n=4, size=16)
    dp = {"noise_multiplier": 0.5, "clip": 0.1}
    central, h_central = run(tiny_model_dir, clients, name, **dp)
    extra = {"secagg": {"enabled": True}, "min_clients": 2}
    server, h_server = run(tiny_model_dir, clients, name, extra=extra, **dp)
    keys = ["history"] if name == "fedkseed" else list(central)
    if name == "fedfull":  # round 1 agrees to 1.2e-7; in round 2 AdamW's normalised step turns
        # last-bit differences at a few of the 3.3M weights into up to 1e-4: compare the mean
        numel = sum(central[k].numel() for k in keys)
        assert sum(float((server[k] - central[k]).abs().sum()) for k in keys) / numel < 1e-8
    else:
        assert all((server[k] - central[k]).abs().max() < 1e-5 for k in keys)
    assert [h.extra["dp_epsilon"] for h in h_server] == [h.extra["dp_epsilon"] for h in h_central]
    shared, _ = run(tiny_model_dir, clients, name, extra=extra, noise="clients", **dp)
    again, _ = run(tiny_model_dir, clients, name, extra=extra, noise="clients", **dp)
    assert all(torch.equal(shared[k], again[k]) for k in keys)
    assert any((shared[k] - central[k]).abs().max() > 1e-3 for k in keys)  # other noise, drawn by the clients


@pytest.mark.parametrize("update, message", [
    ({"dp": {"noise_multiplier": 1.0, "noise": "clients"}},
     r"finetune\.dp\.noise: clients add .* enable finetune\.secagg"),
    ({"dp": {"noise": "clients"}, "secagg": {"enabled": True}, "min_clients": 2}, r"noise_multiplier is 0"),
    ({"dp": {"noise_multiplier": 1.0, "noise_entropy": "device"}},
     r"noise_entropy: device .* takes finetune\.dp\.noise clients"),
])
def test_dp_noise_placement_is_checked(update, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"finetune": update})
