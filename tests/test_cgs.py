"""CGS: closed-form gradients against autograd and finite differences; the set is one set."""

import pytest
import torch

from manifoldgd_fast.cgs import CGS, dm_grad, dm_grad_ref, dm_loss, dpp_grad, dpp_grad_ref, dpp_loss
from manifoldgd_fast.models import build_dit, tiny_dit_config
from manifoldgd_fast.sampler import sample
from manifoldgd_fast.schedule import make_schedule


@pytest.mark.parametrize("N,D", [(2, 5), (7, 64), (10, 256), (13, 31)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_dpp_gradient_matches_autograd(N, D, seed, eps):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[1] = x[0] + 0.1 * x[1]          # two similar samples: a real repulsion
    torch.testing.assert_close(dpp_grad(x, eps), dpp_grad_ref(x, eps), atol=1e-9, rtol=1e-7)


def test_dpp_gradient_matches_finite_difference():
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = dpp_grad(x, 1e-2)
    h = 1e-6
    for i, j in [(0, 0), (2, 3), (3, 5)]:
        e = torch.zeros_like(x)
        e[i, j] = h
        fd = (dpp_loss(x + e, 1e-2) - dpp_loss(x - e, 1e-2)) / (2 * h)
        assert abs(float(fd) - float(g[i, j])) < 1e-6 * max(1.0, abs(float(fd)))


def test_dpp_gradient_descent_spreads_the_set():
    x = torch.randn(5, 32, dtype=torch.float64) * 0.1 + torch.randn(32, dtype=torch.float64)
    before = dpp_loss(x)
    for _ in range(20):
        x = x - 0.5 * dpp_grad(x)
    assert dpp_loss(x) < before - 1.0        # less similar, lower loss
    assert float(dpp_grad(x[:1]).abs().max()) < 1e-12  # one sample: nothing to repel


def test_dm_gradient_closed_form():
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    mu = torch.randn(4, 2, 2, dtype=torch.float64)
    g = dm_grad(x, mu, 0.3)
    torch.testing.assert_close(g, dm_grad_ref(x, mu, 0.3))
    want = 2 / 6 * (x.mean(0) - 0.3 ** 0.5 * mu)
    assert torch.allclose(g, want.expand_as(x))
    # a step against it moves the set mean towards sqrt(abar) mu
    assert dm_loss(x - 0.5 * g, mu, 0.3) < dm_loss(x, mu, 0.3)


def test_set_is_one_set_with_chunked_forward():
    """A set larger than the forward batch is still one set: chunked forwards give the same result."""
    model = build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=1)
    sched = make_schedule(8, "ddpm")
    x_T = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.full((5,), 1)
    mu = torch.randn(4, 8, 8)

    def run(chunk, **kw):
        gens = [torch.Generator().manual_seed(s) for s in range(5)]
        return sample(model, sched, x_T, y, null_class=3, generators=gens, t_stop=4, forward_batch=chunk, **kw)

    cgs = CGS(mu, eta_dpp=1.0, eta_dm=0.5)
    whole, chunked = run(None, cgs=cgs), run(2, cgs=cgs)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    plain = run(None)
    assert not torch.allclose(plain, whole, atol=1e-3)
    # the coupling is real: a sample's result depends on the others in its set
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    first3 = sample(model, sched, x_T[:3], y[:3], null_class=3, generators=gens, t_stop=4, cgs=cgs)
    assert not torch.allclose(first3, whole[:3], atol=1e-4)
    # the set mean ends closer to the class mean than without CGS (strong eta_dm)
    strong = run(None, cgs=CGS(mu, eta_dpp=0.0, eta_dm=1.0))
    assert (strong.mean(0) - mu).norm() < (plain.mean(0) - mu).norm()


def test_correction_names_the_bad_tensor():
    from manifoldgd_fast.errors import ConfigError

    cgs = CGS(torch.zeros(4, 2, 2), eta_dpp=0.1, eta_dm=0.1)
    x = torch.randn(3, 4, 2, 2)
    assert cgs.correction(x, x.clone(), 0.5).shape == x.shape
    with pytest.raises(ConfigError, match="x0 must have x_t's shape"):
        cgs.correction(x, x[:2], 0.5)
    with pytest.raises(ConfigError, match="16 values per sample"):
        cgs.correction(torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), 0.5)
