"""model.device / model.dtype (edgetune/devices.py, placed once in federated/setup.prepare).

The tests marked `gpu` run on --device (default cuda; skipped without it): every method's
client step on the device, mixed precision, and the philox contract across devices (CUDA vs
CPU). benchmarks/gpu_check.sh runs them on a GPU machine; `--device cpu` runs them here. They
need neither the packaged GGUF nor the data mirror (a GPU machine has neither): a tiny Llama
with a word-level tokenizer built here, and synthetic review prompts."""

from __future__ import annotations

import pytest
import torch

from edgetune.config import BadInput, FinetuneParams, ModelParams
from edgetune.devices import MixedPrecision, peak_memory, resolve
from edgetune.federated import philox, registry, zo
from tests.conftest import save_tiny_llama
from tests.helpers import federate, make_clients

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Review", ":", "Sentiment", "positive", "negative", "a", "fine",
         "dull", "warm", "flat", "film", "story", "and", "witty", "slow", "."]


@pytest.fixture(scope="module")
def offline_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer is a word-level vocabulary built here (no GGUF, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    folder = tmp_path_factory.mktemp("offline-tok")
    tok.save_pretrained(folder)
    return save_tiny_llama(folder, tmp_path_factory.mktemp("offline-llama"))


@pytest.fixture(scope="module")
def prompts():
    """32 synthetic SST-2-style (prompts, labels)."""
    adjectives = [("fine", 1), ("dull", 0), ("warm", 1), ("flat", 0), ("witty", 1), ("slow", 0)]
    rows = [(f"Review: a {w} {n} .\nSentiment:", y) for n in ("film", "story") for w, y in adjectives] * 3
    return [r[0] for r in rows[:32]], [r[1] for r in rows[:32]]


def test_cpu_and_auto_resolve_here():
    assert resolve("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve("auto").type == (expected or resolve("auto").type)
    if not torch.cuda.is_available():
        assert resolve("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("name, message", [("cuda:99", "model.device: cuda:99 requested"),
                                           ("tpu", "'tpu' is not a device")])
def test_a_device_not_there_is_bad_input(name, message):
    with pytest.raises(BadInput, match=message):
        resolve(name)


def test_float32_is_the_plain_path_and_cpu_memory_is_vmhwm():
    assert not MixedPrecision(torch.device("cpu"), "float32").enabled
    assert set(peak_memory(torch.device("cpu"))) == {"peak_rss_mb"}


def run(model_dir, prompts, method, runtime, rounds=1, **cfg):
    cfg = FinetuneParams(method=method, num_rounds=rounds, local_steps=1, batch_size=4, sample_rate=0.5,
                         zo={"K": 16, "lr": 1e-4, **cfg.pop("zo", {})}, **cfg)
    clients = make_clients(prompts, n=2, size=8)
    method, model, state, history = federate(model_dir, clients, cfg, runtime=runtime)
    return method, model, history


def test_bfloat16_backprop_autocasts_float32_weights_and_zo_runs_in_bfloat16(offline_model_dir, prompts):
    bf16 = ModelParams(device="cpu", dtype="bfloat16")
    method, model, history = run(offline_model_dir, prompts, "fedit", bf16)
    assert method.precision.enabled and {p.dtype for p in model.parameters()} == {torch.float32}
    method, model, history = run(offline_model_dir, prompts, "fedkseed", bf16,
                                 zo={"generator": "philox", "distribution": "rademacher"})
    assert method.precision is None and {p.dtype for p in method.params} == {torch.bfloat16}
    assert history[-1].train_loss == history[-1].train_loss  # not NaN


# --------------------------------------------------------------------------- on --device
@pytest.mark.gpu
@pytest.mark.parametrize("method", registry.names())
def test_every_method_runs_a_client_step_on_the_device(offline_model_dir, prompts, device, method):
    runtime = ModelParams(device=str(device), dtype="float32")
    zo_cfg = {"generator": "philox"} if registry.lookup(method).family != "weights" else {}
    m, model, history = run(offline_model_dir, prompts, method, runtime, rounds=2, zo=zo_cfg)
    assert {p.device.type for p in model.parameters()} == {device.type}
    assert all(h.train_loss == h.train_loss for h in history)
    if device.type == "cuda":
        assert history[-1].extra["client_peak_gpu_mb"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_the_device(offline_model_dir, prompts, device, dtype):
    runtime = ModelParams(device=str(device), dtype=dtype)
    for method in ("fedit", "job"):
        _, _, history = run(offline_model_dir, prompts, method, runtime, rounds=2,
                            zo={"generator": "philox", "distribution": "rademacher"})
        assert all(h.train_loss == h.train_loss for h in history)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rademacher_replays_bit_identically_on_the_device_and_the_cpu(device, dtype):
    """The cross-device contract: the same dictionary replayed on --device and on the CPU."""
    sampler = zo.Sampler("philox", "rademacher")
    torch.manual_seed(0)
    base = [torch.randn(3000, 17).to(dtype), torch.randn(5).to(dtype)]
    weights = []
    for where in ("cpu", device):
        ps = [p.clone().to(where) for p in base]
        zo.replay(ps, [11, 2**40 + 3, 7], [0.5, -1.25, 3.0], lr=1e-3, weight_decay=0.01, sampler=sampler)
        weights.append([p.cpu() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*weights)) and not torch.equal(weights[0][0], base[0])


@pytest.mark.gpu
def test_philox_words_are_the_same_on_the_device(device):
    assert torch.equal(philox.blocks(2**63 + 9, 2**33, 4096, device).cpu(), philox.blocks(2**63 + 9, 2**33, 4096, None))
    g = philox.gaussian(5, 3, 100_000, device).cpu() - philox.gaussian(5, 3, 100_000)
    assert g.abs().max() < 1e-5  # transcendental functions may differ in the last bits
