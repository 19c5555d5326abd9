"""Diffusion training pieces shared by the demo's training script and ``finetune`` (RSM).

DiT's loss: epsilon MSE plus the variational bound of the learned variance
(ADM's "hybrid" loss, the mean detached in the bound), on the 1000-step linear
schedule; EMA of the weights; label dropout done once per sample by the loop.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os

import numpy as np
import torch

from .schedule import linear_betas


class Diffusion:
    """The float64 tables of DiT's 1000-step linear schedule, as float32 tensors (``dtype``: tests take float64)."""

    def __init__(self, num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float32):
        b = linear_betas(num_train_timesteps)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
        self.T = num_train_timesteps
        self.sqrt_ac = t(np.sqrt(ac))
        self.sqrt_1m_ac = t(np.sqrt(1.0 - ac))
        self.sqrt_recip_ac = t(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_ac = t(np.sqrt(1.0 / ac - 1.0))
        self.coef1 = t(b * np.sqrt(ac_prev) / (1.0 - ac))
        self.coef2 = t((1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac))
        self.post_log_var = t(np.log(np.append(post_var[1], post_var[1:])))
        self.log_betas = t(np.log(b))


def _bc(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return a[t].view(-1, 1, 1, 1)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's decoder log-likelihood of x (bins of width 2/255 on [-1, 1]), elementwise (nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def hybrid_loss(model, d: Diffusion, x0, y, t, noise):
    """DiT's training loss: (mse, vb, x0_hat); the loss is mse + vb (both per sample).

    x0_hat is the model's prediction of x0, differentiable (RSM penalises its L1 norm).

    vb is L_vb in bits per dimension with the model mean detached (it trains the
    variance only): KL to the true posterior for t > 0, the decoder NLL at t = 0.
    """
    C = x0.shape[1]
    x_t = _bc(d.sqrt_ac, t) * x0 + _bc(d.sqrt_1m_ac, t) * noise
    out = model(x_t, timestep=t, class_labels=y).sample
    eps, v = out[:, :C], out[:, C:]
    mse = _mean_flat((noise - eps) ** 2)

    frac = (v + 1) / 2
    model_log_var = frac * _bc(d.log_betas, t) + (1 - frac) * _bc(d.post_log_var, t)
    pred_x0 = _bc(d.sqrt_recip_ac, t) * x_t - _bc(d.sqrt_recipm1_ac, t) * eps.detach()
    model_mean = _bc(d.coef1, t) * pred_x0 + _bc(d.coef2, t) * x_t
    true_mean = _bc(d.coef1, t) * x0 + _bc(d.coef2, t) * x_t
    kl = _mean_flat(normal_kl(true_mean, _bc(d.post_log_var, t), model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return mse, vb, predicted_x0(d, x_t, eps, t)


def rsm_loss(model, d: Diffusion, x0, y, t, noise, rsm_lambda: float):
    """RSM's fine-tuning loss, the batch mean of DiT's loss + rsm_lambda * mean|x0_hat| per sample.

    Returns (loss, mse, vb, l1), the last three per sample. The L1 term is a per-element mean, as the MSE
    is, so rsm_lambda weighs the two alike whatever the latent size.
    """
    mse, vb, x0_hat = hybrid_loss(model, d, x0, y, t, noise)
    l1 = x0_hat.to(torch.promote_types(x0_hat.dtype, torch.float32)).abs().mean(dim=tuple(range(1, x0_hat.dim())))
    return (mse + vb + rsm_lambda * l1).mean(), mse, vb, l1


def predicted_x0(d: Diffusion, x_t, eps, t):
    """x0_hat(x_t, t) = (x_t - sqrt(1 - abar) eps) / sqrt(abar), differentiable in eps (RSM's L1 target)."""
    return _bc(d.sqrt_recip_ac, t) * x_t - _bc(d.sqrt_recipm1_ac, t) * eps


def disable_internal_label_dropout(model) -> None:
    """Labels are dropped by the training loop itself (with its own generator).

    diffusers' DiT drops labels inside every block's own ``LabelEmbedding`` in
    train mode, independently per block (and again for the output layer), from
    the global RNG; one drop per sample, seen by all blocks, is what DiT does.
    The null row (id ``num_classes``) stays in the table.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            assert m.embedding_table.num_embeddings == m.num_classes + 1
            m.dropout_prob = 0.0


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


EMA_WARMUP = "min(decay, (1 + step) / (10 + step))"  # ema_decay_at's rule, as run records and --help state it


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay after optimizer step ``step`` (1, 2, ...): :data:`EMA_WARMUP`.

    The warm-up lets a short run's EMA follow the weights it trains: with a flat 0.9999 from the
    first step, 1,000 steps move the EMA (the weights written) about 5 % of the way.
    """
    return min(decay, (1 + step) / (10 + step))




def save_checkpoint(obj, path: str) -> None:
    """torch.save via a temp file + rename: a kill (or a power cut) never leaves a half-written checkpoint.

    Streamed to the file (a fine-tune's optimiser state is gigabytes: no copy in memory), under one temp
    name that the next save overwrites, so a killed save leaves no file that nothing would remove."""
    from .output import fsync_folder

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # (a full disk left the temp file, gigabytes, and the disk full)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, RuntimeError):  # torch's zip writer: "[enforce fail at inline_container.cc...] unexpected pos"
            st = os.statvfs(os.path.dirname(os.path.abspath(path)))
            full = st.f_bavail * st.f_frsize < (1 << 20)
            why = "no space left on device" if full else str(e).splitlines()[0][:200] if str(e) else "RuntimeError"
            raise OSError(errno.ENOSPC if full else errno.EIO, f"cannot write this checkpoint ({why}); the previous "
                          "one, if any, is kept", path) from None
        raise
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))
