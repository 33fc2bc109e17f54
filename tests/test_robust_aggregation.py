"""Byzantine robustness: robust aggregation rules (edgetune/federated/aggregation.py) on
hand-made updates and on tiny runs with simulated attackers (edgetune/federated/attacks.py),
and the params checks of finetune.aggregation / finetune.attack."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import AggregationParams, FinetuneParams, ParamsError, parse_params
from edgetune.federated.aggregation import robust_blocks, robust_scalars
from edgetune.federated.attacks import Attack, malicious_clients
from edgetune.federated.protocol import Message
from tests.helpers import federate, make_clients


def replies(*rows, n=10):
    return [Message({"w": torch.tensor(r, dtype=torch.float32)}, {"num_samples": n, "loss": 0.0}) for r in rows]


GLOBAL = {"w": torch.zeros(3)}
HONEST = [[1.0, 1.0, 1.0], [1.1, 0.9, 1.0], [0.9, 1.1, 1.0], [1.0, 1.0, 1.2]]
OUTLIER = [1e6, -1e6, 1e6]


# --------------------------------------------------------------------------- unit: hand-made updates
def test_median_ignores_one_huge_outlier():
    out = robust_blocks(AggregationParams(rule="median"), GLOBAL, replies(*HONEST, OUTLIER))["w"]
    assert torch.allclose(out, torch.tensor([1.0, 1.0, 1.0]))


def test_trimmed_mean_cuts_beta_per_side():
    rows = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    cut = robust_blocks(AggregationParams(rule="trimmed_mean", beta=0.2), {"w": torch.zeros(1)}, replies(*rows))
    assert torch.allclose(cut["w"], torch.tensor([2.0]))  # mean of 1, 2, 3
    none = robust_blocks(AggregationParams(rule="trimmed_mean", beta=0.0), {"w": torch.zeros(1)}, replies(*rows))
    assert torch.allclose(none["w"], torch.tensor([21.2]))


def test_krum_picks_an_honest_update_and_multi_krum_averages_the_honest_ones():
    sent = replies(*HONEST, OUTLIER, [-5e5, 5e5, 0.0])
    one = robust_blocks(AggregationParams(rule="krum", krum_f=2, krum_keep=1), GLOBAL, sent)["w"]
    assert any(torch.equal(one, torch.tensor(h)) for h in HONEST)
    multi = robust_blocks(AggregationParams(rule="krum", krum_f=2), GLOBAL, sent)["w"]  # keeps 6 - 2
    assert torch.allclose(multi, torch.tensor(HONEST).mean(0))


def test_clipped_mean_bounds_an_attackers_influence():
    tau = 2.0
    out = robust_blocks(AggregationParams(rule="clipped_mean", tau=tau), GLOBAL, replies(*HONEST, OUTLIER))["w"]
    honest_mean = torch.tensor(HONEST).mean(0)
    # the attacker moves the mean by at most tau / n, whatever it sends
    assert (out - torch.tensor(HONEST).mean(0) * 4 / 5).norm() <= tau / 5 + 1e-5
    assert (out - honest_mean).norm() < 1.0
    # below tau nothing is clipped: the plain weighted mean
    small = robust_blocks(AggregationParams(rule="clipped_mean", tau=100.0), GLOBAL, replies(*HONEST))["w"]
    assert torch.allclose(small, honest_mean)


def test_robust_scalars_per_shared_seed_over_the_clients_that_drew_it():
    vectors = torch.tensor([[1.0, 0.0, 2.0], [1.2, 0.0, 2.1], [0.8, 0.1, 1.9], [-50.0, 0.0, -50.0]])
    drawn = vectors != 0
    w = [0.25] * 4
    # seed 0: median of 4 drawers (0.9 and 1.0 average) x their share 1.0; seed 1: one vote,
    # too few to outvote an attacker (left out); seed 2: median of 4
    median = robust_scalars(AggregationParams(rule="median"), vectors, w, drawn)
    assert torch.allclose(median, torch.tensor([0.9, 0.0, 1.95]))
    krum = robust_scalars(AggregationParams(rule="krum", krum_f=1, krum_keep=1), vectors, w, drawn)
    assert any(torch.equal(krum, v) for v in vectors[:3])
    clipped = robust_scalars(AggregationParams(rule="clipped_mean", tau=3.0), vectors, w, drawn)
    assert clipped.norm() < 3.0
    # trimmed mean: beta x n clients (here 2 of 10) may all sit on one seed, so each seed's votes
    # lose 2 per side; a seed with 4 votes (an attacker among them) takes their median
    ten = torch.zeros(10, 2)
    ten[:6, 0] = torch.tensor([1.0, 1.1, 0.9, 1.2, 50.0, 60.0])  # 6 votes: keeps 1.1 and 1.2
    ten[:4, 1] = torch.tensor([1.0, 2.0, 3.0, -90.0])  # 4 votes: their median 1.5
    trimmed = robust_scalars(AggregationParams(rule="trimmed_mean", beta=0.2), ten, [0.1] * 10, ten != 0)
    assert torch.allclose(trimmed, torch.tensor([1.15 * 0.6, 1.5 * 0.4]))
    # every drawer agreeing: the per-seed rules give the mean's value
    same = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]])
    for rule in ("median", "trimmed_mean"):
        out = robust_scalars(AggregationParams(rule=rule, beta=0.2), same, [1 / 3] * 3, same != 0)
        assert torch.allclose(out, torch.tensor([0.5, 0.0]))


def test_malicious_clients_are_a_seeded_choice():
    bad = malicious_clients(0.25, 8, seed=0)
    assert len(bad) == 2 and bad == malicious_clients(0.25, 8, seed=0)
    assert malicious_clients(0.0, 8, 0) == set()


def test_attacks_corrupt_the_update():
    class M:  # a weight method's starting blocks
        initial = {"w": torch.zeros(2)}
    down = Message({"w": torch.tensor([1.0, 1.0])})
    reply = Message({"w": torch.tensor([2.0, 3.0])}, {"num_samples": 1, "loss": 0.0})
    flip = Attack(FinetuneParams().attack.model_copy(update={"fraction": 1.0, "kind": "sign_flip", "scale": 2.0}), 1, 0)
    assert torch.equal(flip.corrupt(M, 1, 0, down, reply).tensors["w"], torch.tensor([-1.0, -3.0]))
    rnd = Attack(FinetuneParams().attack.model_copy(update={"fraction": 1.0, "kind": "random"}), 1, 0)
    noisy = rnd.corrupt(M, 1, 0, down, reply).tensors["w"] - 1
    assert torch.isclose(noisy.norm(), torch.tensor([1.0, 2.0]).norm())
    replay = Attack(FinetuneParams().attack.model_copy(update={"fraction": 1.0, "kind": "replayed_seeds"}), 1, 0)
    seeds = Message({"seeds": torch.tensor([1, 2]), "grads": torch.tensor([0.5, -0.5])}, {"num_samples": 1})
    assert replay.corrupt(M, 1, 0, Message(), seeds) is seeds  # first time: honest
    later = Message({"seeds": torch.tensor([3, 4]), "grads": torch.tensor([9.0, 9.0])}, {"num_samples": 1})
    resent = replay.corrupt(M, 2, 0, Message(), later)
    assert resent.tensors["seeds"].tolist() == [1, 2] and resent.tensors["grads"].tolist() == [0.5, -0.5]


# --------------------------------------------------------------------------- tiny runs
def run(tiny_model_dir, clients, name="fedit", rounds=2, attack=None, K=16, **aggregation):
    cfg = FinetuneParams(method=name, num_rounds=rounds, sample_rate=1.0, local_steps=2, batch_size=4,
                         lr=5e-3, zo={"K": K, "lr": 1e-4}, aggregation=aggregation, attack=attack or {})
    return federate(tiny_model_dir, clients, cfg)[2:]  # finetune.attack's attackers included


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def distance(a, b, keys) -> float:
    return float(torch.sqrt(sum((a[k].double() - b[k].double()).pow(2).sum() for k in keys)))


@pytest.mark.parametrize("name", ["fedit", "fedkseed"])
def test_mean_rule_and_no_attack_are_bit_identical(tiny_model_dir, sst2_prompts, name):
    clients = make_clients(sst2_prompts, n=3, size=16)
    s0, h0 = run(tiny_model_dir, clients, name)
    s1, h1 = run(tiny_model_dir, clients, name, attack={"fraction": 0.0, "kind": "none"}, rule="mean",
                 beta=0.2, tau=3.0)
    assert same_state(s0, s1)
    assert [(h.train_loss, h.bytes_up_per_client) for h in h0] == [(h.train_loss, h.bytes_up_per_client) for h in h1]
    assert FinetuneParams() == FinetuneParams(aggregation={"rule": "mean"}, attack={"kind": "none"})


SIGN_FLIP = {"fraction": 0.25, "kind": "sign_flip", "scale": 10.0}


@pytest.mark.parametrize("name, rule, keys", [
    ("fedit", {"rule": "median"}, None),
    ("fedkseed", {"rule": "median", "K": 2}, ["history"]),  # per-seed rules need shared seeds
    ("job", {"rule": "clipped_mean", "tau": 0.5}, ["grads"]),
])
def test_robust_rule_resists_a_sign_flipper(tiny_model_dir, sst2_prompts, name, rule, keys):
    clients = make_clients(sst2_prompts, n=4, size=16)
    rule = dict(rule)
    K = rule.pop("K", 16)
    clean, _ = run(tiny_model_dir, clients, name, K=K)
    attacked, h = run(tiny_model_dir, clients, name, attack=SIGN_FLIP, K=K)
    robust, _ = run(tiny_model_dir, clients, name, attack=SIGN_FLIP, K=K, **rule)
    keys = keys or list(clean)
    assert not same_state(clean, attacked)
    assert distance(robust, clean, keys) < distance(attacked, clean, keys)
    # the attacker's reply is metered as sent: the same size as an honest one
    assert h[-1].bytes_exchanged > 0


# --------------------------------------------------------------------------- params
def test_aggregation_and_attack_params_are_checked():
    for beta in (-0.1, 0.5):
        with pytest.raises(ParamsError, match="finetune.aggregation.beta"):
            parse_params({"finetune": {"aggregation": {"rule": "trimmed_mean", "beta": beta}}})
    parse_params({"finetune": {"aggregation": {"rule": "trimmed_mean", "beta": 0.0}}})
    parse_params({"partition": {"num_clients": 10},
                  "finetune": {"sample_rate": 0.5, "aggregation": {"rule": "krum", "krum_f": 1}}})
    with pytest.raises(ParamsError, match=r"finetune\.aggregation\.krum_f: 2 needs at least .* 7 .* samples 5"):
        parse_params({"partition": {"num_clients": 10},
                      "finetune": {"sample_rate": 0.5, "aggregation": {"rule": "krum", "krum_f": 2}}})
    with pytest.raises(ParamsError, match=r"finetune\.aggregation\.krum_keep"):
        parse_params({"finetune": {"aggregation": {"rule": "krum", "krum_keep": 0}}})
    with pytest.raises(ParamsError, match=r"finetune\.aggregation\.rule: median .*job"):
        parse_params({"finetune": {"method": "job", "aggregation": {"rule": "median"}}})
    parse_params({"finetune": {"method": "job", "aggregation": {"rule": "clipped_mean"}}})
    for key, value in [("fraction", 1.5), ("kind", "evil"), ("bogus", 1)]:
        with pytest.raises(ParamsError, match="finetune.attack"):
            parse_params({"finetune": {"attack": {key: value}}})
    with pytest.raises(ParamsError, match="finetune.aggregation.tau"):
        parse_params({"finetune": {"aggregation": {"rule": "clipped_mean", "tau": 0}}})
