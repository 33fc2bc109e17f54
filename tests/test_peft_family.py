"""The PEFT family behind the one engine (issue 4): FedPepTAO-style prefix tuning, FedSelFT,
prompt tuning, BitFit and federated full fine-tuning, plus the server optimizers -- on a tiny
Llama with the real tokenizer and real SST-2."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import FinetuneParams, ServerParams
from edgetune.federated.methods.fedselft import rank_layers
from edgetune.federated.protocol import Message, from_bytes, to_bytes
from edgetune.federated.server_opt import ServerOptimizer
from edgetune.federated.trainable import layer_of
from edgetune.models import load_hf
from edgetune.scoring import encode
from tests import helpers
from tests.helpers import make_clients


def params(method, **overrides) -> FinetuneParams:
    return FinetuneParams(**{"method": method, "num_rounds": 3, "sample_rate": 0.5, "local_steps": 3,
                             "batch_size": 8, "lr": 5e-3, **overrides})


def build(tiny_model_dir, method, **overrides):
    cfg = params(method, **overrides)
    m, model = helpers.build(tiny_model_dir, cfg)
    return m, model, m.tok, cfg


def run(tiny_model_dir, clients, method, rounds=3, **overrides):
    m, model, state, history = helpers.federate(tiny_model_dir, clients, params(method, num_rounds=rounds, **overrides))
    return m, model, m.tok, state, history


def pooled_loss(method, model, tok, clients) -> float:
    prompts = [p for c in clients for p in c.prompts]
    labels = [y for c in clients for y in c.targets]
    with torch.no_grad():
        return method.loss(model, prompts, labels).item()


@pytest.mark.parametrize("name, trained, lr", [
    ("fedprompt", "prompt_encoder", 0.3), ("fedbitfit", "norm.weight", 0.05), ("fedfull", "", 5e-3),
])
def test_each_method_trains_only_its_set_and_lowers_the_loss(tiny_model_dir, sst2_prompts, name, trained, lr):
    clients = make_clients(sst2_prompts)
    m, model, tok, _ = build(tiny_model_dir, name)
    before = pooled_loss(m, model, tok, clients)
    m, model, tok, state, history = run(tiny_model_dir, clients, name, rounds=5, lr=lr)
    m.apply_global(model, state)
    assert all(trained in k for k in state)
    assert pooled_loss(m, model, tok, clients) < before - 0.01
    payload = sum(t.numel() * t.element_size() for t in state.values())
    assert payload < history[-1].bytes_up_per_client < payload + 64 * len(state) + 4096


def test_bitfit_and_prompt_move_far_fewer_bytes_than_full(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    up = {n: run(tiny_model_dir, clients, n, rounds=1)[4][0].bytes_up_per_client
          for n in ("fedbitfit", "fedprompt", "fedfull")}
    assert up["fedbitfit"] * 50 < up["fedfull"] and up["fedprompt"] * 50 < up["fedfull"]


def test_selft_top_trains_and_sends_only_its_layers(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    m, model, tok, _ = build(tiny_model_dir, "fedselft", selft={"strategy": "top", "layers": 1})
    down = m.downlink(m.init_state(model))
    assert down.tensors == {}  # nothing has moved away from the pretrained weights yet
    reply = m.client_update(model, from_bytes(to_bytes(down)), clients[0], torch.Generator().manual_seed(0))
    assert reply.tensors and {layer_of(k) for k in reply.tensors} == {1}  # the last of 2 layers
    state = m.aggregate(m.init_state(model), [reply])
    assert {layer_of(k) for k in m.down_keys(state)} == {1}


def test_selft_budgets_differ_per_client(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    m, model, tok, _ = build(tiny_model_dir, "fedselft", selft={"strategy": "bottom", "layers": [1, 2]})
    layers = [{layer_of(k) for k in m.client_update(model, Message(), c, torch.Generator().manual_seed(0)).tensors}
              for c in clients[:2]]
    assert layers == [{0}, {0, 1}]


def test_selft_gradient_variance_ranks_layers_after_round_one(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    m, model, tok, state, history = run(tiny_model_dir, clients, "fedselft", rounds=2,
                                        selft={"strategy": "gradient-variance", "layers": 1})
    assert sorted(state["_ranking"].tolist()) == [0, 1]
    best = int(state["_ranking"][0])
    reply = m.client_update(model, m.downlink(state), clients[0], torch.Generator().manual_seed(1))
    assert {layer_of(k) for k in reply.tensors} == {best}


def test_rank_layers_prefers_large_consistent_gradients():
    norms = torch.tensor([[4.0, 100.0, 1.0], [4.0, 0.0, 1.0]])  # layer 1: large but inconsistent
    assert rank_layers(norms).tolist()[0] == 0


def test_peptao_scores_first_then_exchanges_only_selected_prefixes(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    m, model, tok, state, history = run(tiny_model_dir, clients, "fedpeptao", rounds=3,
                                        peptao={"layer_ratio": 0.5})
    assert history[0].bytes_up_per_client < 1024  # round 1: per-layer scores only
    selected = state["_selected"].tolist()
    assert len(selected) == 1
    blocks = [k for k in state if k.startswith("prefix.")]
    moved = [k for k in blocks if not torch.equal(state[k], m.initial[k])]
    assert moved == [f"prefix.layer{selected[0]}"]
    reply = m.client_update(model, m.downlink(state), clients[0], torch.Generator().manual_seed(2))
    assert set(reply.tensors) == {f"prefix.layer{selected[0]}"}


def test_prefix_model_exports_as_an_adapter_folder_that_reloads(tiny_model_dir, sst2_prompts, tmp_path):
    from edgetune.compress import apply_steps
    from edgetune.config import Int8Step

    m, model, tok, state, _ = run(tiny_model_dir, make_clients(sst2_prompts), "fedpeptao", rounds=2)
    m.apply_global(model, state)
    batch = encode(tok, ["Review: good\nSentiment:"], 32)
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
    m.export(model, state, tmp_path)
    loaded, _ = load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits[:, -1], expected, atol=1e-5, rtol=1e-5)
    apply_steps(tmp_path / "merged", [Int8Step()], tmp_path / "int8")
    q8, _ = load_hf(tmp_path / "int8")
    with torch.no_grad():
        got = q8(**batch).logits[:, -1]
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_server_optimizers_follow_fedopt():
    state, mean = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.0, 2.0])}
    assert torch.equal(ServerOptimizer(ServerParams(), "fedavg").step(state, mean)["w"], mean["w"])
    plain = ServerOptimizer(ServerParams(momentum=0.0, lr=1.0), "fedavgm").step(state, mean)
    torch.testing.assert_close(plain["w"], mean["w"])  # no momentum, lr 1: FedAvg
    opt = ServerOptimizer(ServerParams(momentum=0.5, lr=1.0), "fedavgm")
    s1 = opt.step(state, mean)
    s2 = opt.step(s1, s1)  # clients sent back the global: momentum still moves it
    torch.testing.assert_close(s2["w"], torch.tensor([-0.5, 2.5]))
    adam = ServerOptimizer(ServerParams(lr=0.1), "fedadam").step(state, mean)["w"]
    assert adam[0] < 1 < adam[1]  # moves toward the mean, by about lr
    untouched = ServerOptimizer(ServerParams(), "fedadam").step({**state, "b": torch.ones(1)}, mean)
    assert torch.equal(untouched["b"], torch.ones(1))  # a block no client sent stays put


def test_server_momentum_changes_the_federation(tiny_model_dir, sst2_prompts):
    clients = make_clients(sst2_prompts)
    a = run(tiny_model_dir, clients, "fedit", rounds=2)[3]
    b = run(tiny_model_dir, clients, "fedit", rounds=2, server={"optimizer": "fedavgm"})[3]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_zo_methods_can_train_prefixes(tiny_model_dir, sst2_prompts):
    m, model, tok, state, history = run(tiny_model_dir, make_clients(sst2_prompts), "fedkseed",
                                        rounds=1, trainable="prefix", zo={"K": 16})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["prompt_encoder.default.embedding.weight"]
    assert history[0].bytes_up_per_client < 1024


def test_weight_methods_reject_another_trainable_set():
    with pytest.raises(ValueError, match="fedselft trains layers"):
        FinetuneParams(method="fedselft", trainable="lora")
