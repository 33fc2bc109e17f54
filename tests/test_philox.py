"""The portable perturbation generator (edgetune/federated/philox.py) and the versioned seed -> z
contract (zo.Sampler): Philox4x32-10 bit for bit against a reference, any chunking and thread
count; the default sampler is the original stream; a seed made by another sampler is refused."""

from __future__ import annotations

import random

import pytest
import torch

from edgetune.config import RunFailed
from edgetune.federated import philox, zo

M = 0xFFFFFFFF
# Random123's published known-answer vectors (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEEDS = [0, 1, 7, 0x299F31D0A4093822, (1 << 64) - 1, 4_294_967_295]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_reference_matches_random123_known_answers(counter, key, expected):
    assert philox.reference(counter, key) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_tensor_philox_equals_the_reference_bit_for_bit(seed):
    first = random.Random(seed).randrange(1 << 40)  # also counters past 2**32 (high word in use)
    got = philox.blocks(seed, first, 37, None).tolist()
    assert got == [list(philox.reference(((first + i) & M, (first + i) >> 32, 0, 0), philox.key_of(seed)))
                   for i in range(37)]


def test_randomgen_philox4x32_agrees_when_installed():
    """A second, independent implementation (randomgen's C Philox4x32-10), when installed."""
    randomgen = pytest.importorskip("randomgen")
    seed = 0x0123456789ABCDEF
    gen = randomgen.Philox(key=seed, counter=0, number=4, width=32)
    raw = gen.random_raw(4 * 16)  # its counter is incremented before each block
    ours = philox.blocks(seed, 1, 16, None).reshape(-1).tolist()
    assert [int(x) & M for x in raw] == ours


def reference_rademacher(seed: int, start: int, n: int) -> list[float]:
    """The documented layout in plain Python: element j is bit j % 32 of word (j // 32) % 4 of
    block j // 128; 1 -> -1."""
    out = []
    for j in range(start, start + n):
        block, bit = divmod(j, 128)
        word = philox.reference((block & M, block >> 32, 0, 0), philox.key_of(seed))[bit // 32]
        out.append(-1.0 if word >> (bit % 32) & 1 else 1.0)
    return out


@pytest.mark.parametrize("seed, start, n", [(3, 0, 300), (3, 77, 260), (2**63 + 5, 1_000_003, 129)])
def test_rademacher_follows_the_reference_layout(seed, start, n):
    assert philox.rademacher(seed, start, n).tolist() == reference_rademacher(seed, start, n)


def chunked(draw, seed: int, n: int, cuts: list[int]) -> torch.Tensor:
    edges = [0, *sorted(cuts), n]
    return torch.cat([draw(seed, a, b - a) for a, b in zip(edges, edges[1:]) if b > a])


@pytest.mark.parametrize("name", ["rademacher", "gaussian"])
@pytest.mark.parametrize("threads", [1, 2])
def test_any_chunking_and_thread_count_draw_the_same_bits(name, threads):
    draw, n = philox.DISTRIBUTIONS[name], 70_001
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = draw(11, 0, n)
        for cuts in ([1], [127, 128, 129], [4_096 * 9 + 3], random.Random(0).sample(range(1, n), 40)):
            assert torch.equal(chunked(draw, 11, n, cuts), whole)
        assert torch.equal(draw(11, 5, n - 5, out=torch.empty(n + philox.SLACK)), whole[5:])
    finally:
        torch.set_num_threads(before)


def test_gaussian_is_box_muller_of_the_reference_words():
    import math

    z = philox.gaussian(5, 0, 8).tolist()
    for block in range(2):
        w = philox.reference((block, 0, 0, 0), philox.key_of(5))
        u = [((x >> 8) + 0.5) / 2**24 for x in w]
        for pair in range(2):
            r, a = math.sqrt(-2 * math.log(u[2 * pair])), 2 * math.pi * u[2 * pair + 1]
            expected = [r * math.cos(a), r * math.sin(a)]
            got = z[4 * block + 2 * pair: 4 * block + 2 * pair + 2]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_moments():
    g, r = philox.gaussian(9, 0, 400_000), philox.rademacher(9, 0, 400_000)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01 and abs(r.mean()) < 0.01
    assert set(r.unique().tolist()) == {-1.0, 1.0}


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(11))]


def z_of(sampler, seed=4) -> torch.Tensor:
    ps = [torch.zeros(300, 7), torch.zeros(11)]
    zo.perturb(ps, seed, 1.0, sampler)
    return torch.cat([p.flatten() for p in ps])


def test_the_default_sampler_is_the_original_stream():
    """torch-cpu / gaussian: chunk i (here: one per tensor) drawn by torch.randn from
    manual_seed(chunk_seed(seed, i))."""
    expected = torch.cat([torch.randn(n, generator=torch.Generator().manual_seed(zo.chunk_seed(4, i)))
                          for i, n in enumerate((300 * 7, 11))])
    assert zo.LEGACY == zo.Sampler("torch-cpu", "gaussian")
    assert torch.equal(z_of(zo.LEGACY), expected) and torch.equal(z_of(zo.Sampler()), expected)


@pytest.mark.parametrize("distribution", zo.DISTRIBUTIONS)
def test_philox_perturbations_do_not_depend_on_the_chunk_size(monkeypatch, distribution):
    sampler = zo.Sampler("philox", distribution)
    whole = z_of(sampler)
    assert torch.equal(whole, torch.cat([philox.DISTRIBUTIONS[distribution](4, 0, whole.numel())]))
    for chunk in (64, 1000, 333):
        monkeypatch.setattr(zo, "CHUNK", chunk)
        assert torch.equal(z_of(sampler), whole)
        assert torch.equal(zo.materialize([torch.zeros(300, 7), torch.zeros(11)], 4, sampler), whole)


@pytest.mark.parametrize("sampler", [zo.Sampler("philox", "rademacher"), zo.Sampler("torch-cpu", "rademacher")])
def test_rademacher_replays_bit_identically(sampler):
    before = params()
    a, b = params(), params()
    for x in (a, b):
        zo.replay(x, [1, 2, 3], [0.5, -0.25, 2.0], lr=1e-2, sampler=sampler)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], before[0])
    assert set(z_of(sampler).unique().tolist()) == {-1.0, 1.0}


def test_samplers_draw_different_streams_and_tag_their_version():
    tags = {zo.Sampler(g, d).tag for g in zo.GENERATORS for d in zo.DISTRIBUTIONS}
    assert len(tags) == 4 and zo.LEGACY.tag == "torch-cpu/gaussian@1"
    assert not torch.equal(z_of(zo.Sampler("philox", "gaussian")), z_of(zo.LEGACY))
    with pytest.raises(ValueError):
        zo.Sampler("mt19937", "gaussian")


def test_a_seed_from_another_sampler_is_refused(tiny_model_dir):
    from edgetune.config import FinetuneParams
    from edgetune.federated.protocol import Message
    from tests.helpers import build

    method, model = build(tiny_model_dir, FinetuneParams(method="job", zo={"generator": "philox",
                                                                            "distribution": "rademacher"}))
    down = method.downlink(method.init_state(model))
    assert down.meta["zo"] == "philox/rademacher@1"
    with pytest.raises(RunFailed, match="torch-cpu/gaussian@1"):  # no tag: the original stream
        method.sync(model, Message(down.tensors, {"round": 0}))
    with pytest.raises(RunFailed, match="checkpoint"):
        method.restore(model, method.init_state(model), {})
    legacy, model = build(tiny_model_dir, FinetuneParams(method="job"))
    assert "zo" not in legacy.downlink(legacy.init_state(model)).meta  # the default's bytes unchanged
    legacy.restore(model, legacy.init_state(model), {})  # an old checkpoint: no tag, original stream
