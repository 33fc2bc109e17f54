"""The method registry is the one place a method is declared: a method added by one module and
one registration is validated, defaulted and federated like the built-in ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgetune.config import ParamsError, parse_params
from edgetune.federated import registry
from edgetune.federated.methods.weights import WeightMethod
from tests.conftest import REPO
from tests.helpers import federate, make_clients


class FedToy(WeightMethod):
    """A toy method: clients train the norm gains and send them; the server keeps the last reply."""

    def client_mean(self, state, replies):
        return dict(replies[-1].tensors)


@pytest.fixture
def toy():
    spec = registry.register(registry.MethodSpec(
        "fedtoy", "weights", "bitfit", f"{__name__}:FedToy", lr=4e-3, shares_seeds=False, flower=False))
    yield spec
    registry.unregister(spec.name)


def test_registry_and_config_import_without_torch():
    code = ("import sys, edgetune.config, edgetune.federated.registry, edgetune.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ParamsError, match=r"finetune\.method: 'nope' is not a registered method; "
                                          r"expected one of \['fedit', .*'fwdllm'\]$"):
        parse_params({"finetune": {"method": "nope"}})


def test_a_registered_method_is_validated_from_its_spec(toy):
    ft = parse_params({"finetune": {"method": "fedtoy"}}).finetune
    assert (ft.trainable_set, ft.client_lr, ft.server_optimizer) == ("bitfit", 4e-3, "fedavg")
    for finetune, error in [
        ({"trainable": "lora"}, r"finetune\.trainable: fedtoy trains bitfit; use auto"),
        ({"aggregation": {"rule": "median"}}, r"fedtoy's clients never share a seed"),
        ({"backend": "flower"}, r"finetune\.backend: fedtoy does not run on Flower"),
    ]:
        with pytest.raises(ParamsError, match=error):
            parse_params({"finetune": {"method": "fedtoy", **finetune}})


def test_a_registered_method_runs_two_rounds(toy, tiny_model_dir, sst2_prompts):
    cfg = parse_params({"finetune": {"method": "fedtoy", "num_rounds": 2, "local_steps": 2,
                                     "batch_size": 4}}).finetune
    method, model, state, history = federate(tiny_model_dir, make_clients(sst2_prompts), cfg)
    assert type(method) is FedToy and method.name == "fedtoy"
    assert [h.round for h in history] == [1, 2] and all(h.train_loss > 0 for h in history)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("norm" in n for n in trained) and set(state) == set(method.blocks)
