"""FlowerClients: the engine's pool of clients (engine.LocalClients' interface) over Flower.

Each sampled client gets one Flower Message, addressed to the SuperNode that owns its
partition: the round's broadcast as records (records.py), the client's personal message if the
method has one (SCAFFOLD's correction, under `personal/`), and a `job` ConfigRecord (client id,
round, the finetune params, whether the client drops out). The ClientApp (clientapp.py) runs
the method's client_update and replies with the method's reply as records. A reply with an
error, or none before `round_timeout`, drops the client from the round, as a local client
that raises is dropped.

Seed-scalar methods: a client needs every earlier broadcast to rebuild the global weights. A
SuperNode keeps the broadcasts it has seen in its context state; the server remembers, per
node, the last round the node confirmed and sends the broadcasts it missed along with the new
one ("catch-up", FedKSeed's clients pulling the scalar history they missed). Those bytes are
logged as `bytes_catchup`: the local engine, whose clients share one synced model, has none.

Per round, `wire_bytes_down` / `wire_bytes_up` are the bytes of the Flower messages themselves
(records.wire_size), next to the engine's safetensors metering of the same payloads.

Secure aggregation (finetune.secagg, secagg.py): each SuperNode makes a key pair per client it
owns when the server says hello, keeps the private keys in its context state and answers with
the public keys and sample counts (the roster). Its ClientApp masks each reply; when a sampled
client sent nothing, the server asks the replying clients' nodes for their pair seeds with it
(a `query.secagg` message each).

SuperNodes restart (a phone reboots): before every round the server says hello to the nodes
that connected since its last hello, since a SuperNode without an auth key comes back under a
new node id, and again to a node whose ClientApp lost its secagg keys (back under the same id).
The clients such a node owns move to it, with its new keys in the roster, and it gets every
broadcast it missed. Until then their messages go unanswered and the clients are dropped, as
any client that does not reply.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord
from flwr.app import Message as FlowerMessage

from edgetune.config import BadInput
from edgetune.federated.engine import Attempt, client_failed
from edgetune.federated.flower.records import from_records, put, to_records, wire_size
from edgetune.federated.protocol import Message, from_bytes, to_bytes

JOB, NODE = "job", "node"
HELLO, TRAIN, REVEAL = "query.clients", "train", "query.secagg"
HISTORY = "history"  # catch-up records in a train message
KEYS_LOST = "holds no secure-aggregation key"  # a ClientApp's error when its node restarted since the hello
PERSONAL = "personal"  # the client's own records in a train message (method.personal)
POLL_S = 0.2


def catchup_records(broadcasts: dict[int, Message], missed: list[int]) -> dict:
    """The broadcasts of rounds `missed` as records keyed history/<round>/{tensors,meta}."""
    out: dict = {}
    for v in missed:
        put(out, f"{HISTORY}/{v}", broadcasts[v])
    return out


class FlowerClients:
    def __init__(self, grid, job, method):
        self.grid, self.job = grid, job
        self.replays = method.replays_history
        self.broadcasts: dict[int, Message] = {}  # version -> broadcast (seed-scalar catch-up)
        self.synced: dict[int, int] = {}  # node id -> last version it confirmed
        self.secagg = job.params.secagg.enabled
        self.roster: dict[int, tuple[bytes, int]] = {}  # secagg: client id -> (public key, samples)
        self.asked: set[int] = set()  # nodes said hello to
        self.lost_keys: set[int] = set()  # nodes whose ClientApps had no secagg key: hello again
        self.node_of = self.discover()

    # ----------------------------------------------------------------- setup
    def discover(self) -> dict[int, int]:
        """client id -> node id, from each SuperNode's answer to a hello; waits (connect_timeout)
        until every client 0..num_clients-1 is owned by a node."""
        deadline = time.monotonic() + self.job.connect_timeout
        owner: dict[int, int] = {}
        asked = self.asked
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                replies = self.exchange([self.hello_message(n) for n in new],
                                        timeout=max(1.0, deadline - time.monotonic()))[0]
                for node, reply in zip(new, replies):
                    if reply is None:
                        continue
                    asked.add(node)
                    if reply.has_error():  # e.g. a node config naming no partitions
                        raise BadInput(f"flower: SuperNode {node} cannot say which clients it owns: "
                                       f"{reply.error.reason} (see its log)")
                    for cid in json.loads(reply.content[NODE]["clients"]):
                        if cid in owner and owner[cid] != node:
                            raise BadInput(f"flower: client {cid} is owned by two SuperNodes ({owner[cid]}, {node}); "
                                           "give each node its own clients in --node-config")
                        owner[cid] = node
                    self.register(reply.content[NODE])
            missing = sorted(set(range(self.job.num_clients)) - set(owner))
            if not missing:
                return owner
            if time.monotonic() > deadline:
                raise BadInput(f"flower: after {self.job.connect_timeout:.0f} s no SuperNode owns clients "
                               f"{missing[:10]}{'...' if len(missing) > 10 else ''} of {self.job.num_clients} "
                               f"(nodes that answered: {len(asked)}); "
                               "start SuperNodes whose node config covers them")
            time.sleep(1.0)

    def hello_message(self, node: int) -> FlowerMessage:
        """The hello's question to `node`: which clients it owns (and, for secagg, their keys)."""
        sim = {k: v for k, v in self.job.extra.items() if k.startswith("sim_")}  # a virtual node's folders
        return FlowerMessage(to_records(Message(), **{JOB: ConfigRecord({"ask": "clients", "secagg": self.secagg,
                                                                           **sim})}),
                             dst_node_id=node, message_type=HELLO)

    def refresh(self) -> None:
        """Before a round: hello to the nodes that connected since the last one, and again to
        those that lost their secagg keys; the clients they own move to them (with new keys,
        and every broadcast they missed). A node that does not answer within round_timeout is
        not asked again (a restart brings it back under a new id)."""
        due = [n for n in self.grid.get_node_ids() if n not in self.asked or n in self.lost_keys]
        if not due:
            return
        replies = self.exchange([self.hello_message(n) for n in due], timeout=self.job.round_timeout)[0]
        for node, reply in zip(due, replies):
            self.asked.add(node)
            self.lost_keys.discard(node)
            if reply is None or reply.has_error():
                continue
            for cid in json.loads(reply.content[NODE]["clients"]):
                self.node_of[cid] = node
            self.synced.pop(node, None)  # a restarted node kept no broadcast
            self.register(reply.content[NODE])

    def register(self, answer: ConfigRecord) -> None:
        """Keep the public keys and sample counts a node registered for secagg."""
        if self.secagg:
            clients = json.loads(answer["clients"])
            self.roster.update({c: (bytes(k), int(n)) for c, k, n in
                                zip(clients, answer["secagg_keys"], answer["secagg_samples"])})

    def __len__(self) -> int:
        return self.job.num_clients

    def secagg_roster(self) -> dict[int, tuple[bytes, int]]:
        return dict(self.roster)

    def reveal(self, requests: dict[int, dict[int, bytes]], round_: int, attempt: int) -> dict:
        """Ask each replying client's node for its pair seeds with the silent clients; a node
        that does not answer within round_timeout leaves its seeds out."""
        asked = list(requests)
        msgs = [FlowerMessage(to_records(Message(), **{JOB: ConfigRecord({
                    "client": i, "round": round_, "attempt": attempt, "peers": list(requests[i]),
                    "keys": list(requests[i].values())})}), dst_node_id=self.node_of[i], message_type=REVEAL)
                for i in asked]
        replies, _ = self.exchange(msgs, timeout=self.job.round_timeout)
        out = {}
        for i, reply in zip(asked, replies):
            if reply is not None and not reply.has_error():
                answer = reply.content[NODE]
                out.update({(i, int(j)): bytes(seed) for j, seed in zip(answer["peers"], answer["seeds"])})
        return out

    # ----------------------------------------------------------------- one round
    def run(self, sampled: list[int], down: bytes, round_: int, dropouts: set[int],
            personal: dict[int, bytes] | None = None) -> Attempt:
        """Send each sampled client its broadcast (and its `personal` message), wait for the
        replies, and account for them as LocalClients.run does (a dropout, an error or no reply
        leaves the client out)."""
        broadcast = from_bytes(down)
        version = int(broadcast.meta.get("round", round_ - 1))
        if self.replays:
            self.broadcasts[version] = broadcast
        personal = personal or {}
        msgs, catchup = zip(*[self.train_message(cid, broadcast, version, round_, cid in dropouts,
                                                 personal.get(cid)) for cid in sampled])
        replies, _ = self.exchange(list(msgs), timeout=self.job.round_timeout)
        own = sum(len(personal.get(c, b"")) for c in sampled)
        attempt = self.collect(Attempt(sampled, len(down), own), replies, round_, dropouts)
        attempt.extra.update({"wire_bytes_down": float(sum(wire_size(m) for m in msgs)),
                              "bytes_catchup": float(sum(catchup))})
        return attempt

    def train_message(self, cid: int, broadcast: Message, version: int, round_: int,
                      drop: bool, personal: bytes | None = None) -> tuple[FlowerMessage, int]:
        """(the message to client `cid`'s node, the bytes of the catch-up records it carries)."""
        node = self.node_of[cid]
        history = catchup_records(self.broadcasts, self.missed(node, version))
        own: dict = {}
        if personal:
            put(own, PERSONAL, from_bytes(personal))
        job = ConfigRecord({"client": cid, "round": round_, "task": self.job.task, "drop": drop,
                            "finetune": json.dumps(self.job.finetune, sort_keys=True),
                            "runtime": json.dumps(self.job.runtime, sort_keys=True),
                            "num_clients": self.job.num_clients,
                            **{k: v for k, v in self.job.extra.items() if k.startswith("sim_")}})
        msg = FlowerMessage(to_records(broadcast, **{JOB: job}, **history, **own), dst_node_id=node,
                            message_type=TRAIN, group_id=str(round_))
        return msg, sum(wire_size(r) for r in history.values())

    def collect(self, attempt: Attempt, replies: list, round_: int, dropouts: set[int]) -> Attempt:
        wire_up, client_rss = 0, 0.0
        for cid, reply in zip(attempt.sampled, replies):
            if cid in dropouts:
                attempt.dropped.append(cid)
            elif reply is None:
                client_failed(attempt, round_, cid, f"no reply within finetune.flower.round_timeout "
                                                    f"= {self.job.round_timeout:.0f} s")
            elif reply.has_error():
                self.synced.pop(self.node_of[cid], None)  # e.g. its node lost its state: resend all
                if KEYS_LOST in reply.error.reason:
                    self.lost_keys.add(self.node_of[cid])
                client_failed(attempt, round_, cid, f"ClientApp error: {reply.error.reason}")
            else:
                node_info = reply.content[NODE]  # beside the reply, not part of what is metered
                self.synced[self.node_of[cid]] = int(node_info["synced"])
                wire_up += wire_size(reply) - wire_size(node_info)
                client_rss = max(client_rss, float(node_info["peak_rss_mb"]))
                msg = from_records(reply.content)
                attempt.replied.append(cid)
                attempt.up_sizes.append(len(to_bytes(msg)))
                attempt.replies.append(msg)
        attempt.extra = {"wire_bytes_up": float(wire_up), "client_peak_rss_mb": client_rss}
        return attempt

    def checkpoint_state(self) -> dict:
        """The broadcasts kept for catch-up (saved for resume: a restarted federation's nodes
        have none, and get every one they missed)."""
        return {"broadcasts": dict(self.broadcasts)}

    def restore(self, saved: dict) -> None:
        self.broadcasts = dict(saved.get("broadcasts", {}))

    def missed(self, node: int, version: int) -> list[int]:
        """The earlier broadcasts a node has not confirmed (seed-scalar methods only)."""
        if not self.replays:
            return []
        return [v for v in sorted(self.broadcasts) if self.synced.get(node, 0) < v < version]

    def exchange(self, msgs: list[FlowerMessage], timeout: float):
        """Push `msgs`, pull replies until all came or `timeout`; (replies in msgs' order, None
        where none came, message ids)."""
        ids = list(self.grid.push_messages(msgs))
        waiting, got = set(ids), {}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(waiting)):
                got[reply.metadata.reply_to_message_id] = reply
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                time.sleep(POLL_S)
        return [got.get(i) for i in ids], ids
