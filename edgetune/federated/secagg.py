"""Secure aggregation (finetune.secagg): the server learns the round's sample-weighted mean
update and mean loss, and nothing of any one client's reply.

What is summed is the method's `summand` of a reply (methods/base.py): a weight method's
update y_i - x, block by block; FedKSeed's scalars scattered over its K candidate seeds (what
its server adds up anyway). The method's `from_mean` turns the mean back into one reply.

Pairwise additive masking (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017), with one long-lived key pair per client (as Bell et al., CCS 2020,
agree keys once) and an honest-but-curious server:

- Each client makes an X25519 key pair on its device. Its public key and its sample count are
  registered with the server once: by LocalClients when it starts, by a Flower SuperNode in its
  answer to the server's hello (clientapp.py). Private keys never leave the client.
- A round's broadcast also carries the sampled clients' ids, public keys and weights
  w_i = n_i / sum of the sampled n_j (`announce`).
- Client i (`mask`) quantizes v_i = w_i * [its summand clamped to +-clip, then its loss] to
  fixed point (2^-24) and adds, for every other sampled client j, the mask
  PRG(s_ij) (+ if i < j, - if i > j) modulo 2^32. s_ij is HKDF of the X25519 secret of i and j
  and of the round and try: i and j compute it alone, and it is worth nothing for another
  round. The reply is this one int32 vector (for weights, as many bytes as the float32 blocks).
- The server adds the vectors modulo 2^32 (`unmask`): the masks of every pair that both replied
  cancel. For a sampled client j that sent nothing usable (dropped out, failed, reply
  rejected), each replying client reveals its pair seed with j and the server removes those
  masks (the recovery round trip, metered as `bytes_secagg_recovery`).
- The sum / 2^24 / (sum of the replying clients' w_i) is their sample-weighted mean summand and
  mean loss, exact up to the fixed point (2^-25 per client and coordinate). It becomes one reply
  (`from_mean`) that the method's aggregate folds as it folds the plain mean, so the server
  step, the logs and both backends work unchanged.

What it protects and what it does not: the server (and anyone reading the wire) sees uniformly
random vectors and their sum; it learns the mean of at least finetune.min_clients (>= 2)
clients, the sample counts (public, as in plain FedAvg) and who replied. It assumes the server
follows the protocol: a server that claims a client dropped when it did not can have its pair
seeds revealed and unmask it (Bonawitz et al.'s double masking with Shamir-shared self-masks
closes this; not built here). Clients that collude with the server learn the sum of the others.
Nothing can check a reply's content: robust rules, SCAFFOLD (per-client replies) and the MACs
of keyed seeds are refused with it (config.secagg_fits). finetune.dp moves its clipping to the
clients, each summand weighing 1/m (DP's fixed denominator), and its noise to the unmasked sum
or, with dp.noise: clients, into the replies themselves (privacy.py).

Written by hand: Flower's SecAgg+ (secaggplus_mod / SecAggPlusWorkflow) serves one client per
SuperNode, legacy FitIns/FitRes messages and the Strategy loop, none of which edgetune's one
round loop has. The primitives are library code: `cryptography`'s X25519 and HKDF, numpy's
Philox for the mask streams.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgetune.federated.protocol import Message

FRAC_BITS = 24  # fixed point 2^-24; |sum of w_i v_i| <= 64 < 2^(31 - 24): no wrap-around
LOSS_CAP = 64.0  # a loss above it is sent as 64 (cross-entropy on real tokens stays far below)
MASKED = "secagg.masked"  # the one tensor of a masked reply
CLIENTS, WEIGHTS, KEYS = "secagg.clients", "secagg.weights", "secagg.keys"  # the broadcast's roster
SEED_BYTES = 32


# --------------------------------------------------------------------------- keys and masks
def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def pair_seed(own: X25519PrivateKey, peer_public: bytes, round_: int, attempt: int) -> bytes:
    """The mask seed of a pair of clients for one try of one round; both compute the same."""
    secret = own.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    info = f"edgetune secagg round {round_} try {attempt}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def mask_stream(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint32 values from a pair seed (numpy's Philox keyed by its first 128 bits)."""
    gen = np.random.Generator(np.random.Philox(key=int.from_bytes(seed[:16], "little")))
    return gen.integers(0, 1 << 32, size=n, dtype=np.uint32)


def apply_mask(total: np.ndarray, seed: bytes, sign: int) -> None:
    """total += sign * PRG(seed), modulo 2^32 (uint32 arithmetic wraps)."""
    stream = mask_stream(seed, total.size)
    if sign > 0:
        total += stream
    else:
        total -= stream


# --------------------------------------------------------------------------- the round's roster
def announce(sent: Message, sampled: list[int], roster: dict[int, tuple[bytes, int]],
             round_: int, attempt: int) -> None:
    """Add to the broadcast the sampled clients' ids, public keys and weights n_i / sum n_j."""
    counts = np.array([roster[c][1] for c in sampled], dtype=np.float64)
    sent.tensors[CLIENTS] = torch.tensor(sampled, dtype=torch.int64)
    sent.tensors[WEIGHTS] = torch.from_numpy(counts / counts.sum())
    sent.tensors[KEYS] = torch.tensor(np.frombuffer(b"".join(roster[c][0] for c in sampled), dtype=np.uint8)
                                      .reshape(len(sampled), -1).copy())
    sent.meta.update({"secagg_round": round_, "secagg_attempt": attempt})


def roster_of(down: Message) -> dict[int, tuple[bytes, float]]:
    """client id -> (public key, weight), as the broadcast announced them."""
    ids = down.tensors[CLIENTS].tolist()
    keys = down.tensors[KEYS].numpy()
    return {c: (keys[i].tobytes(), float(down.tensors[WEIGHTS][i])) for i, c in enumerate(ids)}


# --------------------------------------------------------------------------- client side
def quantized(parts, size: int, loss: float, weight: float, clip: float,
              summand_weight: float | None = None) -> np.ndarray:
    """w * [the summand's parts clamped to +-clip, loss] in fixed point, mod 2^32. `parts`:
    `size` numbers as fresh float64 CPU tensors (a method's summand), scaled in place one at a
    time, so a full model needs one block's temporaries, not the model's. `summand_weight`
    (DP: 1/m) weighs the parts instead of w."""
    out = np.empty(size + 1, dtype=np.uint32)
    scale, at = weight * 2.0 ** FRAC_BITS, 0
    part_scale = scale if summand_weight is None else summand_weight * 2.0 ** FRAC_BITS
    for part in parts:
        fixed = part.nan_to_num_().clamp_(-clip, clip).mul_(part_scale).round_().to(torch.int64).flatten()
        out[at:at + fixed.numel()] = fixed.numpy().astype(np.uint32)  # two's complement: wraps mod 2^32
        at += fixed.numel()
    loss = min(loss, LOSS_CAP) if math.isfinite(loss) else LOSS_CAP
    out[-1] = np.int64(round(scale * loss)).astype(np.uint32)
    return out


def mask(parts, size: int, meta: dict, down: Message, key: X25519PrivateKey, client_id: int,
         clip: float, fixed_denominator: bool = False) -> Message:
    """Client `client_id`'s masked reply: its weighted summand (`parts`, `size` numbers) and
    loss, hidden by one mask per other sampled client; the sample count stays in the clear.
    `fixed_denominator` (DP): the summand weighs 1 / the number sampled, the loss w_i."""
    roster = roster_of(down)
    total = quantized(parts, size, float(meta["loss"]), roster[client_id][1], clip,
                      1 / len(roster) if fixed_denominator else None)
    for peer, (peer_key, _) in roster.items():
        if peer != client_id:
            seed = pair_seed(key, peer_key, int(down.meta["secagg_round"]), int(down.meta["secagg_attempt"]))
            apply_mask(total, seed, +1 if client_id < peer else -1)
    return Message({MASKED: torch.from_numpy(total.view(np.int32))}, {"num_samples": meta["num_samples"]})


def masked_reply(method, reply: Message, down: Message, key: X25519PrivateKey, client_id: int,
                 clip: float) -> Message:
    """What a client sends under secure aggregation: its reply's summand (method.summand), with
    finetune.dp clipped by the client and noised when it adds the noise (privacy.py), masked."""
    def summand():
        return method.summand(reply, down)

    dp = method.privacy
    parts = dp.client_share(summand, client_id, int(down.meta["secagg_round"]),
                            int(down.meta["secagg_attempt"])) if dp else summand()
    return mask(parts, method.summand_size(down), reply.meta, down, key, client_id, clip, fixed_denominator=bool(dp))


def reveal(key: X25519PrivateKey, peers: dict[int, bytes], round_: int, attempt: int) -> dict[int, bytes]:
    """The pair seeds of this client with `peers` (id -> public key) that sent nothing."""
    return {peer: pair_seed(key, public, round_, attempt) for peer, public in peers.items()}


# --------------------------------------------------------------------------- server side
def reply_problem(reply: Message, length: int, num_samples: int) -> str | None:
    """Why a masked reply cannot be summed (None when it can): one int32 vector of `length`
    and the sample count the client registered."""
    if set(reply.tensors) != {MASKED}:
        return f"a masked reply holds only {MASKED!r}, got {sorted(reply.tensors)}"
    vec = reply.tensors[MASKED]
    if vec.dtype != torch.int32 or tuple(vec.shape) != (length,):
        return f"{MASKED} is {vec.dtype} {tuple(vec.shape)}, expected torch.int32 ({length},)"
    if reply.meta.get("num_samples") != num_samples:
        return f"meta num_samples is {reply.meta.get('num_samples')!r}, registered {num_samples}"
    return None


def unmask(sent: Message, replies: dict[int, Message], revealed: dict[tuple[int, int], bytes],
           fixed_denominator: bool = False):
    """(mean summand as float64, mean loss, total samples) of the round's masked `replies`
    (client id -> reply), weighted as announced. `revealed[(i, j)]`: replying client i's pair
    seed with j, a sampled client that sent nothing. `fixed_denominator` (DP): the summand's
    sum as it is (weights 1/m), not divided by the replying clients' share of the weight."""
    roster = roster_of(sent)
    total = np.zeros(len(next(iter(replies.values())).tensors[MASKED]), dtype=np.uint32)
    for reply in replies.values():
        total += reply.tensors[MASKED].numpy().view(np.uint32)
    for (i, j), seed in sorted(revealed.items()):
        apply_mask(total, seed, -1 if i < j else +1)  # take out what i added for j
    weight = sum(roster[c][1] for c in replies)
    summed = torch.from_numpy(total.view(np.int32).astype(np.float64) / 2.0 ** FRAC_BITS)
    mean = summed[:-1] if fixed_denominator else summed[:-1] / weight
    return mean, float(summed[-1] / weight), int(sum(r.meta["num_samples"] for r in replies.values()))


def recovery_bytes(requests: dict[int, dict[int, bytes]]) -> int:
    """Bytes of the recovery round trip: per (replying, silent) pair, the silent client's id and
    public key down, the pair seed up."""
    return sum(len(peers) for peers in requests.values()) * (8 + 32 + SEED_BYTES)


class SecureAggregation:
    """The server's side of one run: the registered roster (client id -> (public key, sample
    count), from the pool), each round's announcement, the screen of masked replies, and the
    unmasking into one reply."""

    def __init__(self, method, clients):
        self.method, self.clients = method, clients
        self.roster: dict[int, tuple[bytes, int]] = {}  # the attempt's, read when it is announced

    def announce(self, sent: Message, sampled: list[int], round_: int, attempt: int) -> None:
        self.roster = self.clients.secagg_roster()  # a restarted Flower node registers new keys
        announce(sent, sampled, self.roster, round_, attempt)

    def reply_problem(self, reply: Message, client_id: int, sent: Message) -> str | None:
        return reply_problem(reply, self.method.summand_size(sent) + 1, self.roster[client_id][1])

    def unmask(self, attempt, sent: Message, round_: int, try_: int, clients) -> bool:
        """Replace the attempt's masked replies by the one reply they stand for; the replying
        clients first reveal their seeds with the sampled clients that sent nothing. False
        (replies cleared, error noted) when a replying client did not reveal them."""
        kept = dict(zip(attempt.replied, attempt.replies))
        silent = [c for c in attempt.sampled if c not in kept]
        requests = {i: {j: self.roster[j][0] for j in silent} for i in kept} if silent else {}
        revealed = clients.reveal(requests, round_, try_) if requests else {}
        attempt.recovery = recovery_bytes(requests)
        missing = sorted(i for i in requests if any((i, j) not in revealed for j in requests[i]))
        if missing:
            attempt.errors.append(f"secure aggregation: clients {missing} did not reveal their seeds "
                                  f"with the silent clients {silent}; the round's sum cannot be unmasked")
            attempt.replies = []
            return False
        mean, loss, samples = unmask(sent, kept, revealed, fixed_denominator=self.method.privacy is not None)
        attempt.replies = [self.method.from_mean(mean, sent, {"num_samples": samples, "loss": loss})]
        return True
