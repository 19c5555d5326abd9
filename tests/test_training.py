"""DiT's training loss (``training.hybrid_loss``, used by ``finetune``): its pieces against torch's own
distributions and against the identities ADM's bound must satisfy, and which output channels each term trains.

DiT (``diffusion/gaussian_diffusion.py``, ``training_losses`` with ``learn_sigma``, loss type MSE): loss =
mean((ε − ε̂)²) + L_vb, where L_vb uses the model's mean with ε̂ detached and the variance
exp(frac·log β_t + (1 − frac)·log β̃_t), frac = (v + 1)/2; KL to q(x_{t−1} | x_t, x_0) in bits per dimension
for t > 0, the discretised decoder NLL at t = 0.
"""
import math

import pytest
import torch

from manifoldgd_fast.training import Diffusion, discretized_gaussian_log_likelihood, hybrid_loss, normal_kl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normal_kl_is_torchs(seed):
    g = torch.Generator().manual_seed(seed)
    m1, m2 = torch.randn(2, 50, generator=g, dtype=torch.float64)
    lv1, lv2 = 3 * torch.randn(2, 50, generator=g, dtype=torch.float64)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.3, -5.0), (-0.9, -4.0), (1.2, 0.5), (0.0, -9.0)])
def test_decoder_likelihood_is_a_distribution_over_the_256_levels(mean, log_scale):
    """exp(log p) over x = −1 + 2i/255, i = 0..255, sums to 1 (the edge bins take the tails), peaks at the
    level nearest the mean, and an interior bin is the Gaussian's mass over it (to the tanh CDF's accuracy)."""
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    means, scales = torch.full_like(x, mean), torch.full_like(x, log_scale)
    p = discretized_gaussian_log_likelihood(x, means, scales).exp()
    assert abs(float(p.sum()) - 1.0) < 1e-9
    assert int(p.argmax()) == int((x - min(max(mean, -1.0), 1.0)).abs().argmin())
    n = torch.distributions.Normal(mean, math.exp(log_scale))
    exact = n.cdf(x[1:-1] + 1 / 255) - n.cdf(x[1:-1] - 1 / 255)
    torch.testing.assert_close(p[1:-1], exact, rtol=0, atol=5e-4)


class _Oracle(torch.nn.Module):
    """Predicts a given ε̂ and a constant v for every sample: the loss is then known in closed form."""

    def __init__(self, eps, v):
        super().__init__()
        self.eps, self.v = torch.nn.Parameter(eps.clone()), torch.nn.Parameter(torch.full_like(eps, v))

    def forward(self, x_t, timestep, class_labels):
        return type("Out", (), {"sample": torch.cat([self.eps, self.v], 1)})()


def _batch(seed, t):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(t), 4, 3, 3, generator=g, dtype=torch.float64).clamp(-0.99, 0.99)
    noise = torch.randn(len(t), 4, 3, 3, generator=g, dtype=torch.float64)
    return x0, noise, torch.tensor(t), torch.zeros(len(t), dtype=torch.long)


@pytest.mark.parametrize("seed", [0, 1])
def test_an_exact_model_has_zero_loss_and_the_variance_ends_are_the_right_ones(seed):
    """ε̂ = ε: no MSE, the model's mean is the posterior's; v = −1 is the posterior variance β̃_t (KL 0),
    v = +1 is β_t (KL = ½(log β_t/β̃_t + β̃_t/β_t − 1) per dimension, in bits). At t = 0 the bound is the
    decoder NLL instead, which is positive."""
    d = Diffusion(dtype=torch.float64)
    t = [0, 1, 10, 500, 999]
    x0, noise, tt, y = _batch(seed, t)
    mse, vb, x0_hat = hybrid_loss(_Oracle(noise, -1.0), d, x0, y, tt, noise)
    assert float(mse.detach().abs().max()) == 0.0
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    assert float(vb[1:].detach().abs().max()) < 1e-9 and float(vb[0].detach()) > 0

    _, vb_hi, _ = hybrid_loss(_Oracle(noise, 1.0), d, x0, y, tt, noise)
    lb, lpv = d.log_betas[tt[1:]], d.post_log_var[tt[1:]]
    want = 0.5 * (lb - lpv + (lpv - lb).exp() - 1.0) / math.log(2.0)
    torch.testing.assert_close(vb_hi[1:], want, rtol=1e-9, atol=1e-12)
    assert float(want.min()) > 0                      # the two ends differ at every t > 0


def test_the_mse_is_the_mean_square_and_the_decoder_nll_is_in_bits():
    """An inexact ε̂: the MSE is mean((ε − ε̂)²) per sample (not half of it), and at t = 0 the bound is the
    decoder NLL of x0 under the model's mean and variance, divided by ln 2 (bits, as the KL at t > 0)."""
    d = Diffusion(dtype=torch.float64)
    x0, noise, tt, y = _batch(4, [0, 0, 5])
    eps = noise + 0.3 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mse, vb, _ = hybrid_loss(_Oracle(eps, 0.2), d, x0, y, tt, noise)
    torch.testing.assert_close(mse.detach(), ((noise - eps) ** 2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    c = lambda table: table[tt].view(-1, 1, 1, 1)  # noqa: E731
    x_t = c(d.sqrt_ac) * x0 + c(d.sqrt_1m_ac) * noise
    mean = c(d.coef1) * (c(d.sqrt_recip_ac) * x_t - c(d.sqrt_recipm1_ac) * eps) + c(d.coef2) * x_t
    log_var = 0.6 * c(d.log_betas) + 0.4 * c(d.post_log_var)                 # frac = (0.2 + 1) / 2
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean((1, 2, 3)) / math.log(2.0)
    torch.testing.assert_close(vb.detach()[:2], nll[:2], rtol=1e-10, atol=0)


def test_the_mse_trains_the_mean_and_the_bound_only_the_variance():
    """DiT detaches the mean inside the bound: the MSE's gradient reaches the ε̂ channels only and the
    bound's the v channels only (both at t > 0; at t = 0 the decoder NLL likewise trains only v)."""
    d = Diffusion(dtype=torch.float64)
    x0, noise, tt, y = _batch(3, [0, 7, 400])
    model = _Oracle(noise + 0.1 * torch.randn_like(noise), 0.3)
    mse, vb, _ = hybrid_loss(model, d, x0, y, tt, noise)
    g_eps, g_v = torch.autograd.grad(mse.sum(), [model.eps, model.v], allow_unused=True)
    assert float(g_eps.abs().min()) > 0 and (g_v is None or float(g_v.abs().max()) == 0)
    g_eps, g_v = torch.autograd.grad(vb.sum(), [model.eps, model.v], allow_unused=True)
    assert (g_eps is None or float(g_eps.abs().max()) == 0) and float(g_v.abs().sum(dim=(1, 2, 3)).min()) > 0


def test_schedule_tables_are_ddpm_linear():
    """The tables hybrid_loss reads: ᾱ of β linear 1e-4..0.02 over 1,000 steps, the posterior coefficients
    and the clipped posterior log-variance (its t = 0 entry is t = 1's, as ADM clips it)."""
    d = Diffusion()
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    pv = b * (1 - ac_prev) / (1 - ac)
    for got, want in ((d.sqrt_ac, ac.sqrt()), (d.sqrt_1m_ac, (1 - ac).sqrt()), (d.log_betas, b.log()),
                      (d.coef1, b * ac_prev.sqrt() / (1 - ac)), (d.coef2, (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)),
                      (d.post_log_var, torch.cat([pv[1:2], pv[1:]]).log())):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5])
def test_rsm_loss_adds_lambda_times_the_mean_l1_of_x0_hat(lam):
    """finetune's loss: mean over the batch of mse + vb + λ·mean|x̂0|; the L1 term's gradient on ε̂ is
    −λ·sqrt(1/ᾱ − 1)·sign(x̂0) / (B·D) (sign and scale pinned, not only "the weights differ")."""
    from manifoldgd_fast.training import predicted_x0, rsm_loss

    d = Diffusion(dtype=torch.float64)
    x0, noise, tt, y = _batch(4, [3, 250, 900])
    model = _Oracle(noise + 0.2 * torch.randn_like(noise), -0.4)
    loss, mse, vb, l1 = rsm_loss(model, d, x0, y, tt, noise, lam)
    x_t = d.sqrt_ac[tt].view(-1, 1, 1, 1) * x0 + d.sqrt_1m_ac[tt].view(-1, 1, 1, 1) * noise
    x0_hat = predicted_x0(d, x_t, model.eps.detach(), tt)
    torch.testing.assert_close(l1, x0_hat.abs().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(loss, (mse + vb).mean() + lam * x0_hat.abs().mean())
    (g,) = torch.autograd.grad(loss, model.eps)
    (g0,) = torch.autograd.grad(rsm_loss(model, d, x0, y, tt, noise, 0.0)[0], model.eps)
    want = -lam * d.sqrt_recipm1_ac[tt].view(-1, 1, 1, 1) * x0_hat.sign() / x0_hat.numel()
    torch.testing.assert_close(g - g0, want)
