"""The round loop, once for every federated method (nanoGPT-style: one loop, commented phases).

Per round: (1) sample clients, (2) broadcast the global state as a serialized message (plus,
for a method with per-client state such as SCAFFOLD, each client's own `personal` message),
(3) each sampled client does its local work and replies with a serialized message,
(4) the method aggregates the replies into the next global state, (5) checkpoint and log.
A method (see methods/base.py) only says what a client sends, how the server folds replies,
and how the global state becomes model weights; it never owns a loop over rounds. Where the
clients run is a pool's business: LocalClients (below) runs them all in this process, and
flower/transport.py's FlowerClients sends each one's broadcast to a Flower SuperNode.

Client failures: after the broadcast a sampled client may drop out (probability `dropout`,
drawn from the round's own generator) or its local update may raise (logged as a warning);
either way it uploads nothing and the round aggregates the clients that replied. A round left
with fewer than `min_clients` replies is sampled afresh, up to `round_retries` times, and then
the run stops with TooFewClients. Bytes are metered as exchanged: every sampled client received
the broadcast, only the clients that replied uploaded.

Byzantine clients (attacks.py) corrupt their reply in step 3, before it is serialized; the
server drops a malformed reply (wrong tensors, shapes, dtypes, NaN, impossible seeds:
validation.py) before step 4, and robust rules (aggregation.py) act inside each method's
aggregate in step 4.

Secure aggregation (secagg.py, finetune.secagg): the broadcast also names the sampled clients'
public keys and weights, each client masks its reply, the server checks only each masked
vector's form in step 3 and, in step 4, aggregates the one reply their sum stands for (after
the replying clients reveal their masks with any silent one).

Resume (resume.py): with a ResumeFolder, every round also saves what the next rounds depend
on (with the pool's own state: Flower's broadcasts kept for catch-up), and a run finding a saved round restores it and goes on from the next one, bit-identical
to a run never stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from edgetune.config import BadInput, RunFailed, clients_per_round
from edgetune.federated.protocol import Message, from_bytes, to_bytes
from edgetune.federated.secagg import SecureAggregation, masked_reply, new_key, public_bytes, reveal

LOG = logging.getLogger(__name__)
ROUND_STREAM = 0x5EED_D0  # keeps the round generator's entropy apart from the clients'


class TooFewClients(RunFailed):
    """A round kept fewer than min_clients replies after all its retries (exit code 1)."""


@dataclass
class ClientData:
    """One client's local data: prompts and their targets (integer labels for classification,
    answer strings for generation)."""

    client_id: int
    prompts: list[str]
    targets: list

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class RoundLog:
    round: int
    clients: list[int]  # the clients whose replies were aggregated
    train_loss: float  # sample-weighted mean of the clients' local losses
    bytes_up_per_client: float  # mean reply size
    bytes_down_per_client: float  # broadcast size
    seconds: float
    dropped: list[int] = field(default_factory=list)  # sampled, sent nothing (every try of the round)
    rejected: list[int] = field(default_factory=list)  # sent a malformed reply (validation.py)
    retries: int = 0  # fresh samples taken to reach min_clients
    bytes_exchanged: int = 0  # every broadcast received and every reply sent, retries included
    extra: dict[str, float] = field(default_factory=dict)  # method-specific, e.g. FwdLLM's n

    def metrics(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("clients")
        d.pop("dropped")
        d.pop("rejected")
        d.pop("round")
        d.update(d.pop("extra"))
        d["clients_aggregated"] = len(self.clients)
        d["clients_dropped"] = len(self.dropped)
        d["clients_rejected"] = len(self.rejected)
        return d


@dataclass
class Attempt:
    """One try at a round's local work: who was sampled, who replied, what crossed the wire."""

    sampled: list[int]
    down_size: int  # the broadcast, received by every sampled client
    down_personal: int = 0  # the personal messages' bytes, all sampled clients together
    recovery: int = 0  # secure aggregation's recovery round trip (secagg.py), both ways
    replied: list[int] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    up_sizes: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)  # replied, but malformed: never aggregated
    errors: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # a pool's own counters, e.g. Flower's
    # wire bytes (a round adds them up over its tries; a "peak" counter takes the largest)

    @property
    def bytes(self) -> int:
        return self.down_size * len(self.sampled) + self.down_personal + sum(self.up_sizes) + self.recovery

    @property
    def bytes_down_per_client(self) -> float:
        return self.down_size + self.down_personal / len(self.sampled)


def sample_clients(rng: np.random.Generator, num_clients: int, rate: float) -> list[int]:
    """Uniform sampling without replacement of max(1, round(rate * N)) clients."""
    k = clients_per_round(num_clients, rate)
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def client_generator(seed: int, round_: int, client_id: int) -> torch.Generator:
    """A client's RNG for one round, derived from (seed, round, client) alone: reproducible
    whatever order or process clients run in."""
    entropy = np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(entropy))


def round_generator(seed: int, round_: int, attempt: int) -> np.random.Generator:
    """A round's own RNG for dropouts and a retry's fresh sample, from (seed, round, attempt)
    alone: it never draws from the sampling stream, so dropout 0 changes no other draw."""
    return np.random.default_rng([ROUND_STREAM, seed, round_, attempt])


def drop_out(rng: np.random.Generator, sampled: list[int], p: float) -> set[int]:
    """The sampled clients that drop out after the broadcast, each with probability p."""
    return {cid for cid, u in zip(sampled, rng.random(len(sampled))) if u < p}


def received(down: bytes, personal: bytes | None) -> Message:
    """What a client decodes: the broadcast, with its personal tensors (if any) merged in."""
    msg = from_bytes(down)
    if personal:
        msg.tensors.update(from_bytes(personal).tensors)
    return msg


def personal_messages(method, sampled: list[int]) -> dict[int, bytes]:
    """Each sampled client's own message (method.personal), serialized; {} for most methods."""
    out = {}
    for cid in sampled:
        msg = method.personal(cid)
        if msg is not None:
            out[cid] = to_bytes(msg)
    return out


def client_reply(method, model, down: Message, data: ClientData, seed: int, round_: int,
                 client_id: int, attack=None) -> Message:
    """One client's reply to a broadcast: its local work with its RNG for the round, corrupted
    first when `attack` (attacks.Attack) makes the client malicious. Every backend's client step."""
    reply = method.client_update(model, down, data, client_generator(seed, round_, client_id))
    return reply if attack is None else attack.corrupt(method, round_, client_id, down, reply)


def client_failed(attempt: Attempt, round_: int, cid: int, error: str) -> None:
    """Record a client whose local work failed: dropped from the round, with a warning."""
    LOG.warning("round %d: client %d failed and is dropped from the round (%s)", round_, cid, error)
    attempt.dropped.append(cid)
    attempt.errors.append(f"client {cid}: {error}")


class LocalClients:
    """The clients of a simulated federation, all in this process: every client's data here,
    one model object shared by all (a method leaves it as it found it). The engine sees any
    pool of clients only through `len()`, `refresh()` and `run()` (and secagg's `secagg_roster()`
    and `reveal()`); flower/transport.py's FlowerClients is the same interface over Flower
    SuperNodes."""

    def __init__(self, method, model, data: list[ClientData], seed: int, attack=None, secagg=None):
        self.method, self.model, self.data, self.seed, self.attack = method, model, data, seed, attack
        self.secagg = secagg  # finetune.secagg: each client masks its reply with its own key
        self.keys = {c.client_id: new_key() for c in data} if secagg is not None else {}

    def __len__(self) -> int:
        return len(self.data)

    def refresh(self) -> None:
        """Before each round: nothing changes in a local pool (Flower's: nodes that restarted)."""

    def run(self, sampled: list[int], down: bytes, round_: int, dropouts: set[int],
            personal: dict[int, bytes] | None = None) -> Attempt:
        """Local work of every sampled client that stays, on the broadcast `down` and its own
        `personal` message. A client whose update raises is dropped from the round with a
        warning (bad input still stops the run); it sends nothing. With an `attack`
        (attacks.Attack), malicious clients corrupt their reply before sending it."""
        from edgetune.devices import metered

        personal = personal or {}
        attempt = Attempt(sampled, len(down), sum(len(personal.get(c, b"")) for c in sampled))
        device = next(self.model.parameters()).device
        for cid in sampled:
            if cid in dropouts:
                attempt.dropped.append(cid)
                continue
            try:
                msg = received(down, personal.get(cid))
                with metered(device, attempt.extra):  # CUDA: the client step's peak GPU memory
                    reply = client_reply(self.method, self.model, msg, self.data[cid], self.seed, round_,
                                         cid, self.attack)
                wire = to_bytes(self.masked(reply, msg, cid))
            except BadInput:
                raise
            except Exception as e:
                client_failed(attempt, round_, cid, f"{type(e).__name__}: {e}")
                continue
            attempt.replied.append(cid)
            attempt.up_sizes.append(len(wire))
            attempt.replies.append(from_bytes(wire))
        return attempt

    def masked(self, reply: Message, down: Message, cid: int) -> Message:
        """The reply as the client sends it: masked under finetune.secagg, else as it is."""
        if self.secagg is None:
            return reply
        return masked_reply(self.method, reply, down, self.keys[cid], cid, self.secagg.clip)

    def secagg_roster(self) -> dict[int, tuple[bytes, int]]:
        """client id -> (public key, sample count): what each client registers for secagg."""
        return {cid: (public_bytes(key), len(self.data[cid])) for cid, key in self.keys.items()}

    def reveal(self, requests: dict[int, dict[int, bytes]], round_: int, attempt: int) -> dict:
        """Each replying client's pair seeds with the silent ones (secagg's recovery)."""
        return {(i, j): seed for i, peers in requests.items()
                for j, seed in reveal(self.keys[i], peers, round_, attempt).items()}

    def checkpoint_state(self) -> dict:
        """What the pool keeps across rounds (saved for resume): nothing, here (secagg keys are
        made afresh and registered again: the masks cancel whatever they are)."""
        return {}

    def restore(self, saved: dict) -> None:
        pass


def screen(method, attempt: Attempt, down: Message, round_: int, secure=None) -> None:
    """Keep only the replies `method` can aggregate (method.reply_problem, validation.py; under
    secure aggregation, `secure`, only the masked vector's form can be checked): a
    malformed one is logged with its client and reason and left out of the round; the bytes
    it cost stay metered. A kept reply is stamped with the client it came from (meta
    client_id, the server's knowledge, not the client's claim) for methods with per-client
    state."""
    kept = []
    for cid, reply in zip(attempt.replied, attempt.replies):
        problem = secure.reply_problem(reply, cid, down) if secure else method.reply_problem(reply, down)
        if problem is None:
            reply.meta["client_id"] = cid
            kept.append((cid, reply))
            continue
        LOG.warning("round %d: reply of client %d rejected: %s", round_, cid, problem)
        attempt.rejected.append(cid)
        attempt.errors.append(f"client {cid}: rejected: {problem}")
    attempt.replied, attempt.replies = [c for c, _ in kept], [r for _, r in kept]


def too_few(round_: int, tries: list[Attempt], min_clients: int) -> TooFewClients:
    last = tries[-1]
    error = f"; last client error: {last.errors[-1]}" if last.errors else ""
    failures = len(last.errors) - len(last.rejected)
    return TooFewClients(
        f"round {round_}: {len(last.replies)} of {len(last.sampled)} sampled clients replied, fewer "
        f"than finetune.min_clients = {min_clients}, after {len(tries) - 1} retries (dropouts: "
        f"{len(last.dropped) - failures}, failures: {failures}, rejected: {len(last.rejected)}{error})")


def merged_extras(tries: list[Attempt]) -> dict[str, float]:
    """A round's pool counters over its tries: summed, or the largest for a "peak" counter."""
    keys = {k for t in tries for k in t.extra}
    return {k: (max if "peak" in k else sum)(t.extra.get(k, 0.0) for t in tries) for k in keys}


def save_checkpoint(state: dict[str, torch.Tensor], round_: int, folder: Path) -> None:
    """Write the global state after a round; write-then-rename so a crash leaves the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "global.tmp"
    tmp.write_bytes(to_bytes(Message(state, {"round": round_})))
    tmp.replace(folder / "global.safetensors")


def save_resume(resume, rnd: int, state, rng: np.random.Generator, history: list[RoundLog],
                method, clients) -> None:
    """What rounds after `rnd` depend on: global state, RNG streams, history, method and pool state."""
    resume.save(rnd, {"state": state, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                      "history": [asdict(h) for h in history], "method": method.checkpoint_state(),
                      "clients": clients.checkpoint_state()})


def restore(resume, method, model, clients, rng: np.random.Generator):
    """(round, global state, history) of the last saved round, the RNGs, method and pool
    restored; None when nothing was saved."""
    saved = resume.load()
    if saved is None:
        return None
    history = [RoundLog(**h) for h in saved["history"]]
    rng.bit_generator.state = saved["rng"]
    torch.set_rng_state(saved["torch_rng"])
    method.restore(model, saved["state"], saved["method"])
    clients.restore(saved.get("clients", {}))
    LOG.info("resuming after round %d of %s", history[-1].round, resume.folder)
    return history[-1].round, saved["state"], history


def run_federation(method, model, clients, *, num_rounds: int,
                   sample_rate: float, seed: int, checkpoint_dir: Path | None = None,
                   on_round: Callable[[RoundLog], None] | None = None, dropout: float = 0.0,
                   min_clients: int = 1, round_retries: int = 2, attack=None, resume=None,
                   on_global: Callable[[int, dict], None] | None = None, secagg=None):
    """Run all rounds; returns (final global state, list of RoundLog). `clients`: a list of
    ClientData (simulated here, LocalClients) or any pool with len() and run() (Flower's).
    Clients that drop out or fail are left out of their round (see the module docstring);
    TooFewClients if a round cannot reach min_clients replies. `attack` (attacks.Attack) makes
    some local clients malicious. `resume` (resume.ResumeFolder): go on after its last saved
    round (whose logs are passed to `on_round` again) and save every round there.
    `on_global(round, state)` sees each new global state after its round is saved (e.g. a
    benchmark scoring the global model every few rounds, benchmarks/time_to_accuracy.py).
    `secagg` (config.SecAggParams): clients mask their replies and the server aggregates only
    their sum (secagg.py)."""
    if isinstance(clients, list):
        clients = LocalClients(method, model, clients, seed, attack, secagg)
    secure = SecureAggregation(method, clients) if secagg is not None else None
    if min_clients > clients_per_round(len(clients), sample_rate):
        raise TooFewClients(f"finetune.min_clients = {min_clients}, but a round samples only "
                            f"{clients_per_round(len(clients), sample_rate)} clients")
    rng = np.random.default_rng(seed)
    state = method.init_state(model)
    history: list[RoundLog] = []
    start = 1
    if resume is not None and (saved := restore(resume, method, model, clients, rng)) is not None:
        done_rounds, state, history = saved
        start = done_rounds + 1
        if checkpoint_dir is not None:  # the outputs went with the killed attempt
            save_checkpoint(state, done_rounds, checkpoint_dir)
        for log in history if on_round is not None else []:
            on_round(log)
    bar = tqdm(range(start, num_rounds + 1), desc=f"{method.name} rounds", unit="round",
               initial=start - 1, total=num_rounds)
    for rnd in bar:
        t0 = time.perf_counter()
        tries: list[Attempt] = []
        for attempt in range(round_retries + 1):
            clients.refresh()  # Flower: SuperNodes that (re)connected say hello; local: nothing
            round_rng = round_generator(seed, rnd, attempt)
            # 1) sample this round's clients (a retry samples afresh from the round's own RNG)
            sampled = sample_clients(round_rng if attempt else rng, len(clients), sample_rate)
            # 2) broadcast: every sampled client decodes the same bytes (and its own, if any)
            sent = method.downlink(state)
            if secure is not None:  # the sampled clients' ids, public keys and weights
                secure.announce(sent, sampled, rnd, attempt)
            down = to_bytes(sent)
            personal = personal_messages(method, sampled)
            # 3) local work on each client that stays; only the serialized reply reaches the
            #    server, which drops a malformed one before it can reach aggregation
            tries.append(clients.run(sampled, down, rnd, drop_out(round_rng, sampled, dropout), personal))
            screen(method, tries[-1], sent, rnd, secure)
            if len(tries[-1].replies) >= min_clients and (
                    secure is None or secure.unmask(tries[-1], sent, rnd, attempt, clients)):
                break  # (secure aggregation: the masked replies are now their one unmasked mean)
        else:
            raise too_few(rnd, tries, min_clients)
        done = tries[-1]
        # 4) aggregate into the next global state (by finetune.aggregation's rule)
        state = method.aggregate(state, done.replies)
        # 5) checkpoint and log
        if checkpoint_dir is not None:
            save_checkpoint(state, rnd, checkpoint_dir)
        weights = np.array([r.meta["num_samples"] for r in done.replies], dtype=float)
        losses = np.array([r.meta["loss"] for r in done.replies], dtype=float)
        log = RoundLog(
            round=rnd, clients=done.replied,
            train_loss=float((weights * losses).sum() / weights.sum()),
            bytes_up_per_client=float(np.mean(done.up_sizes)),
            bytes_down_per_client=float(done.bytes_down_per_client),
            seconds=time.perf_counter() - t0,
            dropped=[cid for t in tries for cid in t.dropped],
            rejected=[cid for t in tries for cid in t.rejected],
            retries=len(tries) - 1,
            bytes_exchanged=sum(t.bytes for t in tries),
            extra={**method.round_metrics(state), **merged_extras(tries),
                   **({"bytes_secagg_recovery": float(sum(t.recovery for t in tries))} if secure else {})},
        )
        history.append(log)
        if resume is not None:
            save_resume(resume, rnd, state, rng, history, method, clients)
        bar.set_postfix(loss=f"{log.train_loss:.4f}")
        if on_round is not None:
            on_round(log)
        if on_global is not None:
            on_global(rnd, state)
    return state, history
