"""The seed -> z contract of the zeroth-order core (edgetune/federated/zo.py)."""

import pytest
import torch

from edgetune.federated import zo


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(11))]


def test_plus_one_minus_two_plus_one_restores_the_weights():
    ps = params()
    before = zo.snapshot(ps)
    for scale in (1e-3, -2e-3, 1e-3):
        zo.perturb(ps, seed=42, scale=scale)
    for p, b in zip(ps, before):
        torch.testing.assert_close(p.data, b, atol=1e-6, rtol=0)


def test_same_seed_regenerates_the_same_z_and_other_seeds_do_not():
    def z(seed):
        ps = [torch.nn.Parameter(torch.zeros(300, 7)), torch.nn.Parameter(torch.zeros(11))]
        zo.perturb(ps, seed, 1.0)
        return torch.cat([p.data.flatten() for p in ps])

    assert torch.equal(z(5), z(5))
    assert not torch.equal(z(5), z(6))
    assert abs(z(5).std().item() - 1) < 0.1  # standard normal


def test_large_tensors_are_perturbed_chunk_by_chunk_deterministically(monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 64)
    a, b = [torch.zeros(1000)], [torch.zeros(1000)]
    zo.perturb(a, 3, 1.0)
    zo.perturb(b, 3, 1.0)
    assert torch.equal(a[0], b[0]) and a[0].abs().min() > 0


def test_projected_gradient_is_the_directional_derivative():
    ps = params()
    loss = lambda: 0.5 * sum((p ** 2).sum() for p in ps)  # gradient = theta
    g, _ = zo.projected_gradient(ps, loss, seed=9, eps=1e-3)
    z = [torch.zeros_like(p) for p in ps]
    zo.perturb(z, 9, 1.0)
    expected = sum((zi * p).sum() for zi, p in zip(z, ps)).item()
    assert abs(g - expected) < 1e-2 * abs(expected) + 1e-2


def test_zo_steps_descend_a_quadratic():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(10))]
    loss = lambda: 0.5 * sum((p ** 2).sum() for p in ps).item()
    start = loss()
    for seed in range(200):
        g, _ = zo.projected_gradient(ps, loss, seed, 1e-3)
        zo.apply_update(ps, seed, g, lr=1e-2)  # ZO needs lr well below 1 / dimension
    assert loss() < 0.5 * start


def test_replay_is_bit_identical():
    a, b = params(), params()
    zo.replay(a, [1, 2, 3], [0.5, -0.25, 2.0], lr=1e-2)
    zo.replay(b, [1, 2, 3], [0.5, -0.25, 2.0], lr=1e-2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_materialize_draws_exactly_what_perturb_adds(monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 100)
    ps = [torch.zeros(250), torch.zeros(3, 7)]
    zo.perturb(ps, 11, 1.0)
    torch.testing.assert_close(zo.materialize(ps, 11), torch.cat([p.flatten() for p in ps]),
                               atol=0, rtol=0)


def test_fused_step_equals_gradient_then_update():
    a, b = params(), params()
    loss_a = lambda: 0.5 * sum((p ** 2).sum() for p in a)
    loss_b = lambda: 0.5 * sum((p ** 2).sum() for p in b)
    g_fused, _ = zo.step(a, loss_a, seed=3, eps=1e-3, lr=1e-2)
    g, _ = zo.projected_gradient(b, loss_b, seed=3, eps=1e-3)
    zo.apply_update(b, 3, g, lr=1e-2)
    assert g_fused == g
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_sparse_mezo_perturbs_only_each_matrix_smallest_weights_and_vectors_in_full(monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 500)  # the 2100-weight matrix spans several chunks
    ps = params()
    sampler = zo.Sampler(distribution="rademacher", mask=zo.SparseMask(ps, 0.75))
    before = zo.snapshot(ps)
    zo.perturb(ps, 7, 1.0, sampler)
    moved = [(p.data - b) != 0 for p, b in zip(ps, before)]
    small = before[0].abs() <= before[0].abs().flatten().kthvalue(525).values
    assert torch.equal(moved[0], small) and int(small.sum()) == 525  # a quarter of the matrix
    assert bool(moved[1].all())  # the vector keeps its full z
    assert sampler.tag == "torch-cpu/rademacher@1+sparse0.75" and sampler != zo.Sampler("torch-cpu", "rademacher")
    torch.testing.assert_close(zo.materialize(ps, 7, sampler),
                               torch.cat([(p.data - b).flatten() for p, b in zip(ps, before)]), atol=1e-6, rtol=0)


def test_sparse_mezo_mask_follows_weights_moved_after_it_was_built():
    """federated/setup.py places the model on its device after the method built the mask;
    module.to() gives every parameter new storage. z must stay masked (not silently full)."""
    ps = params()
    sampler = zo.Sampler(distribution="rademacher", mask=zo.SparseMask(ps, 0.75))
    for p in ps:
        p.data = p.data.clone()  # new storage, as model.to(device) does
    before = zo.snapshot(ps)
    zo.perturb(ps, 7, 1.0, sampler)
    assert int(((ps[0].data - before[0]) != 0).sum()) == 525 and bool((ps[1].data != before[1]).all())
    with pytest.raises(RuntimeError, match="not one of the masked parameters"):
        zo.perturb([torch.zeros(30, 70)], 7, 1.0, sampler)


def test_sparse_mezo_replays_bit_identically_from_the_initial_weights():
    """Every party builds the mask from the round-0 weights it holds, then replays the same
    pairs: the same bits, also after the weights have moved away from the masked threshold."""
    def party():
        ps = params()
        return ps, zo.Sampler(mask=zo.SparseMask(ps, 0.5))

    (a, sa), (b, sb) = party(), party()
    zo.replay(a, [1, 2, 3], [50.0, -25.0, 20.0], lr=1e-2, sampler=sa)
    zo.replay(b, [1, 2, 3], [50.0, -25.0, 20.0], lr=1e-2, sampler=sb)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
