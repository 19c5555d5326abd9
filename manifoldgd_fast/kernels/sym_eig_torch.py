"""The batched parallel Jacobi of ``sym_eig`` in plain PyTorch ops: the portable backend.

Same round-robin ordering and angles as the Triton kernel, a fixed number of
sweeps (no data-dependent control flow, no ``torch.linalg``), so it can be
captured in a CUDA graph and runs on any device. It is the fallback where
neither the CUDA C++ nor the Triton kernel can run, and a readable statement of
what those compute. Imports no Triton.
"""
from __future__ import annotations

import functools

import torch

SWEEPS = 10      # fp32: converged after 6-9 sweeps up to n = 64 (quadratic convergence)
SWEEPS_FP64 = 18
# A matrix whose largest entry lies outside [2^-50, 2^50] is divided by it first (its eigenvalues
# multiplied back after): |A|_F^2, up to n^2 amax^2 (2^112 at n = 64), would overflow (or underflow)
# fp32 further out. Inside, nothing changes.
RESCALE_ABOVE = 2.0 ** 50
RESCALE_BELOW = 2.0 ** -50


@functools.lru_cache(maxsize=None)
def _partners(K: int) -> torch.Tensor:
    """(K - 1, K) partner of every index in each round of the round-robin ordering (K even)."""
    ar = torch.arange(K)
    out = []
    for r in range(K - 1):
        p = (2 * r - ar + K - 1) % (K - 1)
        p[r] = K - 1
        p[K - 1] = r
        out.append(p)
    return torch.stack(out)


def jacobi_eigh(A: torch.Tensor, sweeps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric A (B, n, n): (w (B, n) descending, V (B, n, n) columns), in A's dtype (>= fp32).

    ``sweeps``: a fixed count (no data-dependent exit, so the whole loop can be graph-captured);
    default 10 in fp32, 18 in fp64."""
    B, n, _ = A.shape
    dt = torch.promote_types(A.dtype, torch.float32)
    if sweeps is None:
        sweeps = SWEEPS_FP64 if dt == torch.float64 else SWEEPS
    K = n + (n % 2)                                  # round-robin needs an even count: pad one zero row/column
    M = torch.zeros(B, K, K, device=A.device, dtype=dt)
    M[:, :n, :n] = A.to(dt)
    M = 0.5 * M + 0.5 * M.transpose(1, 2)           # halves first: a + b overflows above FLT_MAX / 2
    amax = M.abs().flatten(1).amax(1)
    scale = torch.where((amax > RESCALE_ABOVE) | ((amax > 0) & (amax < RESCALE_BELOW)), amax,
                        torch.ones_like(amax))[:, None, None]
    bad = (M * 0).flatten(1).sum(1)                 # 0, or NaN where A holds NaN / inf: its outputs become NaN
    M = M / scale
    V = torch.eye(K, device=A.device, dtype=dt).expand(B, K, K).clone()
    # off-diagonal entries below eps^2 |A|_F move no eigenvalue and would only decay into denormals,
    # which cost 100x on CPUs without flush-to-zero: they are set to zero after each round
    tiny = torch.finfo(dt).eps ** 2 * M.flatten(1).norm(dim=1)[:, None, None]
    off = ~torch.eye(K, dtype=torch.bool, device=A.device)
    parts = _partners(K).to(A.device)
    ar = torch.arange(K, device=A.device)
    eye = ~off
    one = torch.ones((), device=A.device, dtype=dt)
    zero = torch.zeros((), device=A.device, dtype=dt)
    # index_select / where only (advanced indexing costs ms per call on the CPU), and hypot, not sqrt
    # (torch's CPU sqrt/exp/log take ~6 ms on tiny tensors once set_num_threads(2) is called)
    for _ in range(sweeps):
        for r in range(K - 1):
            part = parts[r]                                               # (K,)
            pair = ar[:, None] == part[None, :]                          # (K, K) the rotated entries
            dg = torch.diagonal(M, dim1=1, dim2=2)                       # (B, K)
            dq = dg.index_select(1, part)
            Mrow = M.index_select(1, part)                               # Mrow[:, i] = M[:, partner(i)]
            apq = 0.5 * (torch.where(pair, M, zero).sum(2) + torch.where(eye, Mrow, zero).sum(2))
            lo = ar < part
            app = torch.where(lo, dg, dq)
            aqq = torch.where(lo, dq, dg)
            nz = apq != 0
            theta = (aqq - app) / (2 * torch.where(nz, apq, one))
            big = theta.abs() > 1e15                                       # theta^2 would overflow: t ~ 1/(2 theta)
            th = torch.where(big, zero, theta)
            t = torch.where(big, 0.5 / torch.where(big, theta, one),
                            torch.where(th >= 0, one, -one) / (th.abs() + torch.hypot(th, one)))
            c = torch.rsqrt(t * t + 1)
            t = torch.where(nz, t, zero)
            s = t * c
            tau = s / (1 + c)                                             # c = 1 - s tau: small corrections
            sg = torch.where(lo, -s, s)
            st = torch.where(lo, -tau, tau)
            # p' = p - s (q + tau p),  q' = q + s (p - tau q)  (Numerical Recipes' jacobi)
            Mr = M + sg[:, :, None] * (Mrow - st[:, :, None] * M)
            M = Mr + sg[:, None, :] * (Mr.index_select(2, part) - st[:, None, :] * Mr)
            newd = dg + torch.where(lo, -t, t) * apq                      # a_pp - t a_pq, a_qq + t a_pq
            M = torch.where(eye, torch.diag_embed(newd), torch.where(pair | (M.abs() < tiny), zero, M))
            V = V + sg[:, None, :] * (V.index_select(2, part) - st[:, None, :] * V)
    w = torch.diagonal(M, dim1=1, dim2=2)[:, :n] * scale[:, :, 0] + bad[:, None]
    V = V[:, :n, :n] + bad[:, None, None]
    order = torch.sort(w, dim=1, descending=True, stable=True).indices
    return torch.gather(w, 1, order), torch.gather(V, 2, order[:, None, :].expand(B, n, n))
