"""Collaborative guided sampling (CGS, SPEC 5): the IPC samples of a class are denoised as one set.

At each denoising step (the source applies it "at each denoising step"; ``steps=`` narrows it), with
X the set's x0_hat (N, D) and x_t the set (N, D):

* DPP diversity loss ``L_dpp = -log det(K + eps I)``, ``K_ij = cos(X_i, X_j)``;
* distribution matching ``L_dm = || mean_i x_t,i - sqrt(abar_t) mu_c ||^2``,
  mu_c the class mean latent;

and the step's result x_{t-1} moves by ``-(eta_dpp grad L_dpp + eta_dm grad L_dm)``. Conventions
(the source leaves them open): X is the model's own prediction after CFG, before any mode or manifold
guidance, on every sampler and formulation; grad L_dpp is taken with respect to X and grad L_dm with
respect to x_t, and both are subtracted from x_{t-1} as they are (no 1 / sqrt(abar_t) chain factor).

Closed-form gradients (no autograd in the hot loop, graph-capturable): with
``Nh`` the row-normalised X and ``A = K + eps I``,
``dL/dNh = -2 A^{-1} Nh`` (a Cholesky solve on the N x N matrix), and through
the normalisation ``dL/dX_i = (h_i - n_i (n_i . h_i)) / |X_i|``. The
``*_ref`` twins go through autograd.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import DPP_EPS_MIN
from .errors import ConfigError


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        raise ConfigError(f"the set must be (N, ...) with one row per sample, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))


def dpp_loss(x0: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """-log det(K + eps I) of the cosine-similarity matrix of the rows of x0 (N, ...)."""
    X = _rows(x0)
    n = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    A = n @ n.T + eps * torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
    return -torch.linalg.slogdet(A)[1]


def dpp_grad(x0: torch.Tensor, eps: float = 1e-3, sets: int = 1) -> torch.Tensor:
    """d L_dpp / d x0 in closed form, shape of x0.

    ``sets`` > 1: the rows of x0 are that many equal sets, one after the other, and each set's
    loss is its own (the gradient of the sum of the sets' losses, a batched Cholesky).
    """
    # In float64: with more samples than dimensions (N > D) K is singular and A's smallest
    # eigenvalue is eps, which float32's Cholesky resolves badly (a 40% error at N = 50, D = 4,
    # eps = 1e-5). The N x N work is tiny beside the model (N <= IPC), so it is done in double.
    X = _rows(x0).double()
    if sets > 1:
        X = X.reshape(sets, X.shape[0] // sets, X.shape[1])        # (G, N, D)
    norms = X.norm(dim=-1, keepdim=True).clamp_min(1e-12)         # (..., N, 1)
    n = X / norms                                                # (..., N, D)
    A = n @ n.mT + eps * torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    # A = K + eps I is positive definite. The unchecked Cholesky and two triangular solves never
    # sync with the host (cholesky / cholesky_solve check an info flag), so a CUDA graph can capture them.
    L, _info = torch.linalg.cholesky_ex(A)
    w = torch.linalg.solve_triangular(L, n, upper=False)
    h = -2.0 * torch.linalg.solve_triangular(L.mT, w, upper=True)   # dL/dn = -2 A^{-1} n, (..., N, D)
    g = (h - n * (n * h).sum(-1, keepdim=True)) / norms          # through n = X / |X|
    return g.reshape(x0.shape).to(x0.dtype)


def dpp_grad_ref(x0: torch.Tensor, eps: float = 1e-3, sets: int = 1) -> torch.Tensor:
    """Reference of :func:`dpp_grad` through autograd (a loop over the sets)."""
    with torch.enable_grad():
        X = x0.detach().clone().to(torch.promote_types(x0.dtype, torch.float32)).requires_grad_(True)
        (g,) = torch.autograd.grad(sum(dpp_loss(part, eps) for part in X.chunk(sets)), X)
    return g.to(x0.dtype)


def dm_loss(x_t: torch.Tensor, mu: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """|| mean_i x_t,i - sqrt(abar) mu ||^2 for the set x_t (N, ...) and the class mean mu (...)."""
    X = _rows(x_t)
    return ((X.mean(0) - math.sqrt(alpha_bar) * mu.reshape(-1).to(X.dtype)) ** 2).sum()


def dm_grad(x_t: torch.Tensor, mu: torch.Tensor, alpha_bar: float, sets: int = 1) -> torch.Tensor:
    """d L_dm / d x_t,i = (2 / N) (mean - sqrt(abar) mu), the same for every sample of a set.

    ``sets`` > 1: the rows are that many equal sets in order, ``mu`` (sets, ...) their class means.
    """
    X = _rows(x_t)
    if sets == 1:
        r = X.mean(0) - math.sqrt(alpha_bar) * mu.reshape(-1).to(X.dtype)
        return (2.0 / X.shape[0] * r).expand_as(X).reshape(x_t.shape).to(x_t.dtype)
    X = X.reshape(sets, X.shape[0] // sets, X.shape[1])           # (G, N, D)
    r = X.mean(1, keepdim=True) - math.sqrt(alpha_bar) * mu.reshape(sets, 1, -1).to(X.dtype)
    return (2.0 / X.shape[1] * r).expand_as(X).reshape(x_t.shape).to(x_t.dtype)


def dm_grad_ref(x_t: torch.Tensor, mu: torch.Tensor, alpha_bar: float, sets: int = 1) -> torch.Tensor:
    """Reference of :func:`dm_grad` through autograd (a loop over the sets)."""
    with torch.enable_grad():
        X = x_t.detach().clone().to(torch.promote_types(x_t.dtype, torch.float32)).requires_grad_(True)
        mus = mu.reshape(sets, -1)
        (g,) = torch.autograd.grad(sum(dm_loss(part, m, alpha_bar) for part, m in zip(X.chunk(sets), mus)), X)
    return g.to(x_t.dtype)


def check_sets(y: torch.Tensor, sets: int = 1) -> None:
    """CGS pulls each set towards one class mean: the batch must split into ``sets`` equal runs of
    rows, and every label within a run must be the same."""
    B = y.numel()
    if B % sets:
        raise ConfigError(f"CGS: a batch of {B} samples does not split into {sets} equal sets")
    runs = y.reshape(sets, B // sets)
    if B > sets and bool((runs != runs[:, :1]).any()):
        raise ConfigError(f"CGS denoises each class's samples as a set: the labels of a set must all be equal, "
                          f"got {[sorted(set(r.tolist())) for r in runs][:4]}")


class CGS:
    """The CGS correction of one class's set, or of several classes' sets sampled in one batch.

    Args:
        class_mean: (C, h, w) or (D,) mean latent of the class (mu_c); with ``sets`` > 1,
            (sets, C, h, w) or (sets, D): one mean per set.
        eta_dpp, eta_dm: step sizes of the two gradients.
        eps: the DPP ridge.
        steps: the respaced step indices (S-1 ... 0) it acts on; None: every step.
        sets: the batch is this many equal sets of rows, one after the other (set g: rows
            g N ... (g + 1) N - 1), each corrected as its own set, as if sampled alone.
    """

    def __init__(self, class_mean: torch.Tensor, *, eta_dpp: float, eta_dm: float, eps: float = 1e-3,
                 steps: Iterable[int] | None = None, sets: int = 1):
        if sets < 1 or (sets > 1 and class_mean.shape[0] != sets):
            raise ConfigError(f"CGS with {sets} sets needs one class mean per set ({sets}, ...), "
                              f"got {tuple(class_mean.shape)}")
        for name, val, lo in (("eta_dpp", eta_dpp, 0.0), ("eta_dm", eta_dm, 0.0), ("eps", eps, None)):
            ok = isinstance(val, (int, float)) and math.isfinite(val) and (val > 0 if lo is None else val >= lo)
            if not ok:
                raise ConfigError(f"CGS {name} must be a finite number {'> 0' if lo is None else '>= 0'}, got {val!r}")
        if eps < DPP_EPS_MIN:  # what --dpp-eps refuses: below it the Cholesky of a singular K fails (NaN samples)
            raise ConfigError(f"CGS eps {eps:g} is below {DPP_EPS_MIN:g}: K + eps I is singular with more samples "
                              "than latent dimensions or with identical samples")
        self.mu = class_mean.float()
        self.sets = int(sets)
        self.eta_dpp, self.eta_dm, self.eps = float(eta_dpp), float(eta_dm), float(eps)
        self.steps = None if steps is None else frozenset(int(i) for i in steps)
        if self.steps is not None and (not self.steps or min(self.steps) < 0):
            # (as the config refuses a --cgs-steps guided window holding no step: a CGS that acts on none
            # would be plain sampling under CGS's name)
            raise ConfigError(f"CGS steps= must hold respaced step indices >= 0 (None: every step), got "
                              f"{sorted(self.steps) or '[]'}")

    @classmethod
    def for_run(cls, cfg, class_mean: torch.Tensor, sets: int = 1) -> "CGS":
        """The correction a resolved DistillConfig asks for (``cgs_steps`` "all", or "guided": the guidance's steps)."""
        from .guidance import is_guided

        steps = None
        if cfg.cgs_steps == "guided":
            steps = [i for i in range(cfg.steps) if is_guided(cfg.formulation, i, cfg.steps, cfg.t_stop)]
        return cls(class_mean, eta_dpp=cfg.eta_dpp, eta_dm=cfg.eta_dm, eps=cfg.dpp_eps, steps=steps, sets=sets)

    def check_labels(self, y: torch.Tensor) -> None:
        """The labels y (B,) of the batch: each set's all equal (:func:`check_sets`)."""
        check_sets(y, self.sets)

    def active(self, i: int) -> bool:
        """Whether the correction acts on respaced step i."""
        return self.steps is None or i in self.steps

    def correction(self, x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """eta_dpp grad L_dpp(x0) + eta_dm grad L_dm(x_t): subtract it from the step's result."""
        if x0.shape != x_t.shape:
            raise ConfigError(f"x0 must have x_t's shape {tuple(x_t.shape)}, got {tuple(x0.shape)}")
        D = self.mu.numel() // self.sets
        if x_t.dim() < 2 or x_t[0].numel() != D or x_t.shape[0] % self.sets:
            raise ConfigError(f"x_t must be (N, ...) with {D} values per sample (the class mean's) and N a multiple "
                              f"of the {self.sets} set(s), got {tuple(x_t.shape)}")
        out = torch.zeros_like(x_t, dtype=torch.float32)
        if self.eta_dpp > 0 and x0.shape[0] > self.sets:
            out = out + self.eta_dpp * dpp_grad(x0.float(), self.eps, self.sets)
        if self.eta_dm > 0:
            out = out + self.eta_dm * dm_grad(x_t.float(), self.mu.to(x_t.device), alpha_bar, self.sets)
        return out
