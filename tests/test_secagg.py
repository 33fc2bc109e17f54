"""Secure aggregation (finetune.secagg, edgetune/federated/secagg.py): the masks hide each reply
and cancel in the sum, a silent client's masks are recovered from the others' pair seeds, and
FedIT and FedKSeed train as without it (to the fixed point's resolution) on a tiny Llama with
SST-2 rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.config import FinetuneParams
from edgetune.federated import secagg
from edgetune.federated.protocol import Message
from tests.helpers import federate, make_clients

BLOCKS = {"a.weight": (3, 5), "b.bias": (7,)}
SIZE = 3 * 5 + 7


def round_of(sampled, counts, seed=0):
    """A broadcast x with the roster announced, and each client's reply y_i with its loss."""
    gen = torch.Generator().manual_seed(seed)
    keys = {c: secagg.new_key() for c in sampled}
    roster = {c: (secagg.public_bytes(keys[c]), n) for c, n in zip(sampled, counts)}
    sent = Message({k: torch.randn(s, generator=gen) for k, s in BLOCKS.items()})
    secagg.announce(sent, sampled, roster, round_=3, attempt=0)
    replies = {c: Message({k: sent.tensors[k] + 0.01 * torch.randn(s, generator=gen) for k, s in BLOCKS.items()},
                          {"num_samples": n, "loss": 0.5 + c / 10}) for c, n in zip(sampled, counts)}
    return sent, keys, replies


def plain_mean(sent, replies, clients):
    """The sample-weighted mean of the clients' blocks and losses, in float64."""
    total = sum(replies[c].meta["num_samples"] for c in clients)
    blocks = {k: sum(replies[c].tensors[k].double() * replies[c].meta["num_samples"] for c in clients) / total
              for k in BLOCKS}
    return blocks, sum(replies[c].meta["loss"] * replies[c].meta["num_samples"] for c in clients) / total


def updates(reply, sent):
    """A weight reply's summand: y - x per block, in name order (as WeightMethod.summand)."""
    return [reply.tensors[k].double() - sent.tensors[k].double() for k in sorted(BLOCKS)]


def masked_replies(sent, keys, replies, clip=1.0):
    return {c: secagg.mask(updates(r, sent), SIZE, r.meta, sent, keys[c], c, clip) for c, r in replies.items()}


def assert_mean(mean, sent, blocks):
    """`mean` (the unmasked summand) is the plain mean's update, to the fixed point's resolution."""
    expected = torch.cat([(blocks[k] - sent.tensors[k].double()).flatten() for k in sorted(BLOCKS)])
    assert (mean - expected).abs().max() < 1e-6


def test_masks_hide_each_reply_and_cancel_in_the_sum():
    sampled, counts = [0, 2, 5, 6], [30, 10, 45, 15]
    sent, keys, replies = round_of(sampled, counts)
    masked = masked_replies(sent, keys, replies)
    for c in sampled:  # what the server receives from one client: uniform noise, not its update
        plain = secagg.quantized(updates(replies[c], sent), SIZE, replies[c].meta["loss"],
                                 counts[sampled.index(c)] / sum(counts), 1.0)
        vec = masked[c].tensors[secagg.MASKED].numpy().view(np.uint32)
        assert (vec != plain).mean() > 0.95 and np.abs(vec.astype(np.float64) - 2**31).mean() > 2**29
        assert set(masked[c].meta) == {"num_samples"}  # not even the loss in the clear
    mean, mean_loss, samples = secagg.unmask(sent, masked, revealed={})
    blocks, loss = plain_mean(sent, replies, sampled)
    assert_mean(mean, sent, blocks)  # exact up to the fixed point: 2^-25 per client and coordinate
    assert abs(mean_loss - loss) < 1e-6 and samples == sum(counts)


def test_a_silent_clients_masks_are_removed_with_the_others_pair_seeds():
    sampled, counts = [1, 3, 4], [20, 20, 40]
    sent, keys, replies = round_of(sampled, counts, seed=1)
    masked = masked_replies(sent, keys, replies)
    del masked[3]  # client 3 dropped out after the broadcast
    garbled, _, _ = secagg.unmask(sent, masked, revealed={})
    blocks, loss = plain_mean(sent, replies, [1, 4])
    assert garbled.abs().max() > 1.0  # 3's masks remain
    revealed = {(i, 3): secagg.reveal(keys[i], {3: secagg.roster_of(sent)[3][0]}, 3, 0)[3] for i in (1, 4)}
    mean, mean_loss, samples = secagg.unmask(sent, masked, revealed)
    assert_mean(mean, sent, blocks)
    assert abs(mean_loss - loss) < 1e-6 and samples == 60


def test_pair_seeds_are_per_round_and_try():
    a, b = secagg.new_key(), secagg.new_key()
    seed = secagg.pair_seed(a, secagg.public_bytes(b), 3, 0)
    assert seed == secagg.pair_seed(b, secagg.public_bytes(a), 3, 0)  # both ends agree
    assert seed not in {secagg.pair_seed(a, secagg.public_bytes(b), 4, 0), secagg.pair_seed(a, secagg.public_bytes(b), 3, 1)}


def test_an_update_beyond_clip_is_clamped_not_wrapped():
    sampled, counts = [0, 1], [10, 10]
    sent, keys, replies = round_of(sampled, counts)
    replies[0].tensors["b.bias"][0] = sent.tensors["b.bias"][0] + 500.0  # far beyond clip = 1
    replies[1].tensors["b.bias"][0] = float("nan")
    mean, _, _ = secagg.unmask(sent, masked_replies(sent, keys, replies), {})
    assert abs(float(mean[15]) - 0.5) < 1e-6  # b.bias[0]: (clip 1 + NaN as 0) / 2


def test_fedit_with_secure_aggregation_trains_as_without_it(tiny_model_dir, sst2_prompts):
    """Same clients, dropouts, losses and weights (to 1e-6) as plain FedIT; the upload is an int32
    vector as large as the float32 blocks; a round with dropouts pays the recovery trip."""
    clients = make_clients(sst2_prompts)
    cfg = FinetuneParams(num_rounds=3, sample_rate=0.75, local_steps=2, batch_size=4, lr=5e-3, dropout=0.3,
                         min_clients=2)
    plain_states, states = {}, {}
    _, _, plain_state, plain = federate(tiny_model_dir, clients, cfg, on_global=plain_states.__setitem__)
    secure = cfg.model_copy(update={"secagg": cfg.secagg.model_copy(update={"enabled": True})})
    _, _, state, history = federate(tiny_model_dir, clients, secure, on_global=states.__setitem__)
    assert any(h.dropped for h in history), "the seed drops no client; pick another"
    coordinates = sum(v.numel() for v in state.values()) + 1  # every block's, and the loss
    for a, b in zip(plain, history):
        assert (a.clients, a.dropped) == (b.clients, b.dropped)
        assert abs(a.train_loss - b.train_loss) < 1e-5
        # one int32 per float32 coordinate; one tensor's header instead of one per block
        assert 4 * coordinates < b.bytes_up_per_client < min(a.bytes_up_per_client, 4 * coordinates + 256)
        assert (b.extra["bytes_secagg_recovery"] > 0) == bool(b.dropped)
        assert b.bytes_down_per_client > a.bytes_down_per_client  # the roster: ids, keys, weights
    # after round 1: the plain mean to the fixed point's resolution (3 clients x 2^-25) and float32
    # rounding; later rounds start from those weights, and AdamW's first steps (about lr x the
    # gradient's sign) carry the difference on, still far below one step
    for k in state:
        assert (states[1][k] - plain_states[1][k]).abs().max() < 3e-7
        assert (state[k] - plain_state[k]).abs().max() < 1e-4
    assert any(not torch.equal(state[k], plain_state[k]) for k in state)  # it did go through the masks


def test_fedkseed_with_secure_aggregation_sums_its_scalars_over_the_candidates(tiny_model_dir, sst2_prompts):
    """FedKSeed's server adds each client's weighted scalars into its K candidates; under secure
    aggregation a client sends that K-vector masked (4 bytes per candidate instead of 8 per
    step), and the rounds' scalars are the plain ones to the fixed point's resolution."""
    clients = make_clients(sst2_prompts)
    cfg = FinetuneParams(method="fedkseed", trainable="lora", num_rounds=3, sample_rate=0.75, local_steps=2,
                         batch_size=4, dropout=0.3, min_clients=2, zo={"K": 64, "lr": 1e-3, "eps": 1e-2})
    _, _, plain_state, plain = federate(tiny_model_dir, clients, cfg)
    secure = cfg.model_copy(update={"secagg": cfg.secagg.model_copy(update={"enabled": True})})
    _, _, state, history = federate(tiny_model_dir, clients, secure)
    assert any(h.dropped and h.extra["bytes_secagg_recovery"] > 0 for h in history)
    for a, b in zip(plain, history):
        assert (a.clients, a.dropped) == (b.clients, b.dropped)
        assert abs(a.train_loss - b.train_loss) < 1e-5
        assert 4 * 65 < b.bytes_up_per_client < 4 * 65 + 256 and a.bytes_up_per_client < 256
    scalars, plain_scalars = state["history"], plain_state["history"]
    assert scalars.shape == plain_scalars.shape == (3, 64)
    assert torch.equal(scalars != 0, plain_scalars != 0)  # the same candidates replayed
    assert (scalars - plain_scalars).abs().max() < 1e-5 * plain_scalars.abs().max()


@pytest.mark.parametrize("update, message", [
    ({"method": "job"}, "job clients never share a seed"),
    ({"method": "mezo"}, "mezo runs one client"),
    ({"method": "fedkseed", "zo": {"secret": "env:KEY"}}, "the MACs of keyed seeds"),
    ({"method": "fedselft"}, "send only some blocks"),
    ({"scaffold": True}, "SCAFFOLD computes each client's control variate"),
    ({"aggregation": {"rule": "median"}}, "a robust rule (median)"),
    ({"min_clients": 1}, "the sum of one reply is that client's update"),
])
def test_secure_aggregation_is_refused_where_the_server_needs_each_reply(update, message, monkeypatch):
    monkeypatch.setenv("KEY", "5e" * 32)  # a federation key for zo.secret
    with pytest.raises(ValueError, match="finetune.secagg: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneParams(**{"min_clients": 2, **update, "secagg": {"enabled": True}})


def test_a_flower_node_that_lost_its_keys_is_asked_again_and_its_clients_move():
    """FlowerClients' bookkeeping (transport.py), Flower's I/O faked: a ClientApp answering that
    its node holds no secagg key marks the node; before the next round the server says hello
    again to it and to a node that connected since; the clients each now owns move to it with
    its new public key in the roster, and it will get every broadcast it missed. (The Deployment
    Engine run of a killed and restarted SuperNode: tests/test_flower.py.)"""
    import json
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    from edgetune.federated.engine import Attempt
    from edgetune.federated.flower import transport

    def answer(clients: list[int], key: bytes):
        content = {transport.NODE: ConfigRecord({"clients": json.dumps(clients), "secagg_keys": [key] * len(clients),
                                                 "secagg_samples": [24] * len(clients)})}
        return SimpleNamespace(has_error=lambda: False, content=content)

    pool = object.__new__(transport.FlowerClients)  # no SuperLink: its fields, as discover() leaves them
    pool.secagg, pool.replays, pool.synced, pool.broadcasts = True, True, {10: 1, 20: 1}, {}
    pool.job = SimpleNamespace(round_timeout=5.0, num_clients=4, extra={})
    pool.asked, pool.lost_keys = {10, 20}, set()
    pool.node_of = {0: 10, 1: 10, 2: 20, 3: 20}
    pool.roster = {c: (b"old", 24) for c in range(4)}
    lost = SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(
        reason=f"RuntimeError: secure aggregation: this node {transport.KEYS_LOST} for client 2"))
    attempt = pool.collect(Attempt([2], 0, 0), [lost], 2, set())
    assert attempt.dropped == [2] and pool.lost_keys == {20} and 20 not in pool.synced

    asked = []
    pool.grid = SimpleNamespace(get_node_ids=lambda: [10, 20, 30])  # 30: a node that connected since

    def exchange(msgs, timeout):
        asked.extend(m.metadata.dst_node_id for m in msgs)
        return [{20: answer([2], b"new20"), 30: answer([3], b"new30")}[m.metadata.dst_node_id] for m in msgs], []

    pool.exchange, pool.hello_message = exchange, lambda node: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))
    pool.refresh()
    assert sorted(asked) == [20, 30] and pool.lost_keys == set() and pool.asked == {10, 20, 30}
    assert pool.node_of == {0: 10, 1: 10, 2: 20, 3: 30}
    assert pool.secagg_roster() == {0: (b"old", 24), 1: (b"old", 24), 2: (b"new20", 24), 3: (b"new30", 24)}
    assert pool.synced == {10: 1}  # 20 and 30 get every broadcast they missed
    asked.clear()
    pool.refresh()  # nothing new: no hello
    assert asked == []
