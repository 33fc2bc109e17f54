"""The ClientApp: one SuperNode's clients doing their local work, one Flower Message each.

A SuperNode's node config names what the device holds:

    partitions = "/data/partitions"   folder of client_<i>.parquet (the partition stage's output)
    clients    = "0,1"                the client ids this node owns (default: every file there)
    model      = "/models/base"       the base HF folder (the same weights the server starts from)

In the Simulation Engine a virtual node has no such config: its client id is its partition-id
and the folders come with the message (simulation.py).

Per message the ClientApp builds the method exactly as the local engine does (setup.prepare:
same seeded adapters), merges the client's personal records into the broadcast (SCAFFOLD's
correction, when the method sends one), loads the client's partition, brings a seed-scalar
model up to date by replaying the broadcasts this node kept in its context state plus the ones
the server sent to catch up, and runs the engine's client step (engine.client_reply: the method's client_update
with the client's RNG for the round, from seed, round and client alone, then finetune.attack's
corruption if the client is malicious). So the reply is bit for bit the local engine's. A worker
(method + model) is cached per process: Flower's deployment starts a process per message, the
Simulation Engine reuses its actors.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp

from edgetune.config import BadInput, FinetuneParams
from edgetune.devices import peak_rss_mb
from edgetune.federated.engine import client_reply
from edgetune.federated.flower.records import from_records, put, take, to_records, versions
from edgetune.federated.flower.transport import HISTORY, JOB, KEYS_LOST, NODE, PERSONAL

app = ClientApp()
KEPT = "broadcast"  # context.state: broadcast/<round>/{tensors,meta}, every broadcast this node saw
SECAGG = "secagg"  # context.state: the private key of each client this node owns (finetune.secagg)


@app.query("clients")
def hello(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Tell the server which clients this node owns (for secagg: with a new public key and the
    sample count of each)."""
    clients = owned_clients(context.node_config)
    answer = {"clients": json.dumps(clients)}
    if msg.content[JOB].get("secagg"):
        answer.update(register_keys(context, clients, node_paths(context.node_config, msg.content[JOB])))
    return FlowerMessage(RecordDict({NODE: ConfigRecord(answer)}), reply_to=msg)


@app.query("secagg")
def reveal_seeds(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """Secagg's recovery: one client's pair seeds with the sampled clients that sent nothing."""
    from edgetune.federated.secagg import reveal

    job = msg.content[JOB]
    peers = dict(zip((int(p) for p in job["peers"]), (bytes(k) for k in job["keys"])))
    seeds = reveal(client_key(context, int(job["client"])), peers, int(job["round"]), int(job["attempt"]))
    answer = ConfigRecord({"peers": list(seeds), "seeds": list(seeds.values())})
    return FlowerMessage(RecordDict({NODE: answer}), reply_to=msg)


@app.train()
def train(msg: FlowerMessage, context: Context) -> FlowerMessage:
    """One client's local work on the broadcast in `msg`."""
    job = msg.content[JOB]
    down = from_records(msg.content)
    if f"{PERSONAL}/tensors" in msg.content:  # this client's own tensors (method.personal)
        down.tensors.update(take(msg.content, PERSONAL).tensors)
    version = int(down.meta.get("round", int(job["round"]) - 1))
    if job["drop"]:  # a simulated dropout (finetune.dropout): got the broadcast, sends nothing
        return FlowerMessage(RecordDict({NODE: ConfigRecord({"synced": 0, "dropped": True})}), reply_to=msg)
    cfg = FinetuneParams.model_validate_json(job["finetune"])
    node = node_paths(context.node_config, job)
    method, model = worker(job["finetune"], job["task"], str(node["model"]), int(job["num_clients"]),
                           str(job.get("runtime", "null")))
    if method.replays_history:
        catch_up(method, model, context, msg.content, version)
    data = client_data(node["partitions"], int(job["client"]), job["task"])
    reply = client_reply(method, model, down, data, cfg.seed, int(job["round"]), data.client_id,
                         attack(job["finetune"], int(job["num_clients"])))
    if cfg.secagg.enabled:  # only the masked vector leaves the device
        from edgetune.federated.secagg import masked_reply

        reply = masked_reply(method, reply, down, client_key(context, data.client_id), data.client_id,
                             cfg.secagg.clip)
    node_info = ConfigRecord({"synced": version, "peak_rss_mb": peak_rss_mb()})  # beside the metered reply
    return FlowerMessage(to_records(reply, **{NODE: node_info}), reply_to=msg)


# --------------------------------------------------------------------------- node config
def owned_clients(node_config) -> list[int]:
    if "partition-id" in node_config:  # Simulation Engine: one virtual node per client
        return [int(node_config["partition-id"])]
    if "clients" in node_config and str(node_config["clients"]).strip():
        try:
            return sorted(int(c) for c in str(node_config["clients"]).split(","))
        except ValueError:
            raise BadInput(f"node config clients: {node_config['clients']!r}; expected ids like '0,1,2'") from None
    folder = Path(str(node_config.get("partitions", "")))
    files = sorted(folder.glob("client_*.parquet"))
    if not files:
        raise BadInput(f"node config partitions: {folder} holds no client_*.parquet files")
    return [int(f.stem.split("_")[1]) for f in files]


def node_paths(node_config, job) -> dict[str, Path]:
    """This node's partitions and base-model folders (node config, else the job's, in simulation)."""
    out = {}
    for key in ("partitions", "model"):
        value = node_config.get(key) or job.get(f"sim_{key}")
        if not value:
            raise BadInput(f"node config {key}: not set; start the SuperNode with --node-config \"{key}='...'\"")
        out[key] = Path(str(value))
    return out


# --------------------------------------------------------------------------- secure aggregation keys
def register_keys(context: Context, clients: list[int], paths: dict[str, Path]) -> dict:
    """A new key pair per owned client, private keys kept in the node's state; the public keys
    and sample counts for the server."""
    import pyarrow.parquet as pq

    from edgetune.federated.secagg import new_key, public_bytes

    keys = {c: new_key() for c in clients}
    kept = dict(context.state[SECAGG]) if SECAGG in context.state else {}
    kept.update({str(c): k.private_bytes_raw() for c, k in keys.items()})
    context.state[SECAGG] = ConfigRecord(kept)
    samples = [pq.read_metadata(paths["partitions"] / f"client_{c:04d}.parquet").num_rows for c in clients]
    return {"secagg_keys": [public_bytes(keys[c]) for c in clients], "secagg_samples": samples}


def client_key(context: Context, client_id: int):
    """The private key this node made for `client_id` when the server said hello."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    kept = context.state[SECAGG] if SECAGG in context.state else {}
    if str(client_id) not in kept:
        raise RuntimeError(f"secure aggregation: this node {KEYS_LOST} for client {client_id} (restarted "
                           "since the server's hello); the server drops it and says hello again next round")
    return X25519PrivateKey.from_private_bytes(bytes(kept[str(client_id)]))


# --------------------------------------------------------------------------- workers and data
@lru_cache(maxsize=1)
def worker(finetune: str, task: str, model_dir: str, num_clients: int, runtime: str = "null"):
    """(method, model) as the server and the local engine build them, on the job's model.device
    (a Simulation Engine actor with finetune.flower.client_gpus sees only its own GPU); one per
    process."""
    from edgetune.config import ModelParams
    from edgetune.federated.setup import prepare
    from edgetune.tasks import get_task

    cfg = FinetuneParams.model_validate_json(finetune)
    model = None if runtime == "null" else ModelParams.model_validate_json(runtime)
    return prepare(Path(model_dir), get_task(task), cfg, num_clients, cfg.sample_rate, model)


@lru_cache(maxsize=1)
def attack(finetune: str, num_clients: int):
    """finetune.attack's attackers (attacks.Attack), or None, as the local engine has them."""
    from edgetune.federated.setup import attack_of

    return attack_of(FinetuneParams.model_validate_json(finetune), num_clients)


@lru_cache(maxsize=8)
def client_data(partitions: Path, client_id: int, task: str):
    from edgetune.federated.setup import load_client
    from edgetune.tasks import get_task

    return load_client(partitions / f"client_{client_id:04d}.parquet", client_id, get_task(task).target_column)


# --------------------------------------------------------------------------- seed-scalar catch-up
def catch_up(method, model, context: Context, content: RecordDict, version: int) -> None:
    """Replay every broadcast between the model's round and `version` (exclusive), from this
    node's state or the server's catch-up records, then keep them all in the node's state."""
    kept = {v: take(context.state, f"{KEPT}/{v}") for v in versions(context.state, KEPT)}
    kept.update({v: take(content, f"{HISTORY}/{v}") for v in versions(content, HISTORY)})
    kept[version] = from_records(content)
    for v in range(method.model_round + 1, version):
        if v not in kept:
            raise RuntimeError(f"node misses the broadcast of round {v}; the server resends it next round")
        method.sync(model, kept[v])
    for v, msg in kept.items():
        put(context.state, f"{KEPT}/{v}", msg)
