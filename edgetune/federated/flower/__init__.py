"""edgetune's federated methods on Flower (finetune.backend: flower).

The same round loop (engine.run_federation) and the same method modules run on both backends;
only the pool of clients differs. Locally, LocalClients runs every client in this process.
On Flower, the ServerApp runs the round loop with FlowerClients, which sends each sampled
client's broadcast as a Flower Message to the SuperNode that owns the client's partition, and
a ClientApp there runs the method's client_update and replies:

    job.py         what a run needs (params, paths, MLflow run), written by the finetune stage
    records.py     edgetune messages <-> Flower records, and their size on Flower's wire
    transport.py   FlowerClients: node discovery, one message per sampled client, catch-up of
                   missed broadcasts for seed-scalar methods, wire bytes per round
    serverapp.py   ServerApp: the round loop, checkpoints, MLflow logging, the exported model
    clientapp.py   ClientApp: a node's partitions and model, local work of one client per message
    deploy.py      SuperLink + SuperNodes on loopback (tests, single machine) and `flwr run`
    simulation.py  Flower's Simulation Engine (Ray): many virtual clients in one machine
"""
