"""Batched eigen-decomposition of small symmetric matrices (n <= 64): parallel cyclic Jacobi in registers.

One program per matrix; the (K, K) matrix (K = n padded to a power of two, the
padding zero, so it decouples) lives in registers. A sweep is K - 1 rounds of
the round-robin ("chess tournament") ordering: in round r every index i has a
partner

    partner(K-1) = r,  partner(r) = K-1,  partner(i) = (2r - i) mod (K-1) otherwise,

so the K/2 rotations of a round touch disjoint index pairs and apply at once:
``A <- J^T A J``, ``V <- V J``, with the classical angle (Golub & Van Loan 8.5;
Numerical Recipes' ``jacobi``): for p < q,
``theta = (a_qq - a_pp) / (2 a_pq)``, ``t = sign(theta) / (|theta| + sqrt(theta^2 + 1))``,
``c = 1 / sqrt(t^2 + 1)``, ``s = t c``; rows/columns ``p' = p - s (q + tau p)``,
``q' = q + s (p - tau q)`` with ``tau = s / (1 + c)`` and the diagonal set to
``a_pp - t a_pq``, ``a_qq + t a_pq`` (NR's small-correction form: as accurate as LAPACK in fp32).
Both members of a pair compute the angle from the same symmetrised ``a_pq``, so
they agree bit for bit. Sweeps stop when the off-diagonal mass is below
``tol^2 |A|_F^2`` or after ``MAX_SWEEPS`` (a loop inside the kernel: no host sync,
so it can be captured in a CUDA graph). Cyclic Jacobi converges quadratically;
6-10 sweeps at n = 64 in fp32. A matrix whose largest entry lies outside
[2^-50, 2^50] is divided by it first and its eigenvalues multiplied back
(``|A|_F^2``, up to n^2 amax^2, would overflow or underflow fp32); NaN / inf entries make every
output of their matrix NaN (the sampler's finite checks then name the class).

Unlike ``torch.linalg.eigh`` (cuSOLVER; slow from n >= 33 on batches and not
capturable), this is one launch with no workspace.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox_normal import LAUNCH

MAX_SWEEPS = 20
TOL = 1e-7


@triton.jit
def jacobi_eigh(A, K: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL: tl.constexpr):
    """Eigenvalues (K,) (unsorted, on the diagonal's positions) and eigenvectors V (K, K) (columns) of symmetric A."""
    ar = tl.arange(0, K)
    ii = ar[:, None]
    jj = ar[None, :]
    eye = ii == jj
    V = tl.where(eye, 1.0, 0.0)
    A = 0.5 * A + 0.5 * tl.trans(A)            # (halves first: a + b overflows above FLT_MAX / 2)
    # largest entry outside [2^-50, 2^50]: divide by it (|A|_F^2 would overflow / underflow fp32), multiply
    # the eigenvalues back after; non-finite entries make every output NaN (as sym_eig_torch)
    amax = tl.max(tl.max(tl.abs(A), axis=1), axis=0)
    rescale = (amax > 1.125899906842624e15) | ((amax > 0.0) & (amax < 8.881784197001252e-16))
    scale = tl.where(rescale, amax, 1.0)
    bad = tl.sum(tl.sum(A * 0.0, axis=1), axis=0)
    A = A / scale
    fro2 = tl.sum(tl.sum(A * A, axis=1), axis=0)
    off2 = tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0)
    tiny = 1.4210855e-14 * tl.sqrt(fro2)      # eps^2 |A|_F: below it an entry moves nothing (and would go denormal)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (off2 > TOL * TOL * fro2):
        for r in range(K - 1):
            part = tl.where(ar == K - 1, r, tl.where(ar == r, K - 1, (2 * r - ar + K - 1) % (K - 1)))
            rows_p = tl.broadcast_to(part[:, None], (K, K))
            cols_p = tl.broadcast_to(part[None, :], (K, K))
            dg = tl.sum(tl.where(eye, A, 0.0), axis=1)                       # a_ii
            dq = tl.gather(dg, part, axis=0)                                  # a_{partner(i) partner(i)}
            Ap = tl.gather(A, rows_p, axis=0)                                 # Ap[i, :] = A[partner(i), :]
            a_ip = tl.sum(tl.where(jj == part[:, None], A, 0.0), axis=1)      # A[i, partner(i)]
            a_pi = tl.sum(tl.where(eye, Ap, 0.0), axis=1)                     # A[partner(i), i]
            apq = 0.5 * (a_ip + a_pi)
            lo = ar < part
            app = tl.where(lo, dg, dq)
            aqq = tl.where(lo, dq, dg)
            nz = apq != 0.0
            theta = (aqq - app) / (2.0 * tl.where(nz, apq, 1.0))
            big = tl.abs(theta) > 1e15                                       # theta^2 would overflow: t ~ 1/(2 theta)
            th = tl.where(big, 0.0, theta)
            t = tl.where(big, 0.5 / tl.where(big, theta, 1.0), tl.where(th >= 0, 1.0, -1.0) / (tl.abs(th) + tl.sqrt(th * th + 1.0)))
            c = 1.0 / tl.sqrt(t * t + 1.0)
            s = t * c
            t = tl.where(nz, t, 0.0)
            s = tl.where(nz, s, 0.0)
            tau = s / (1.0 + c)                                               # c = 1 - s tau
            sg = tl.where(lo, -s, s)
            stau = tl.where(lo, -tau, tau)
            # p' = p - s (q + tau p), q' = q + s (p - tau q): rows (J^T A), then columns (. J)
            A1 = A + sg[:, None] * (Ap - stau[:, None] * A)
            A1p = tl.gather(A1, cols_p, axis=1)
            A = A1 + sg[None, :] * (A1p - stau[None, :] * A1)
            # the rotated pairs are zero by construction; the new diagonal a_pp - t a_pq, a_qq + t a_pq
            A = tl.where((jj == part[:, None]) & (ii != jj), 0.0, A)
            A = tl.where(eye, (dg + tl.where(lo, -t, t) * apq)[:, None], A)
            A = tl.where((tl.abs(A) < tiny) & (ii != jj), 0.0, A)
            Vp = tl.gather(V, cols_p, axis=1)
            V = V + sg[None, :] * (Vp - stau[None, :] * V)
        off2 = tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0)
        sweep += 1
    return tl.sum(tl.where(eye, A, 0.0), axis=1) * scale + bad, V + bad


@triton.jit
def _sym_eig_kernel(a_ptr, w_ptr, v_ptr, n, K: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL: tl.constexpr):
    """Eigenpairs of one (n, n) matrix, sorted by eigenvalue descending (ties: lower position first)."""
    b = tl.program_id(0).to(tl.int64)
    ar = tl.arange(0, K)
    m2 = (ar[:, None] < n) & (ar[None, :] < n)
    offs = b * n * n + ar[:, None] * n + ar[None, :]
    A = tl.load(a_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    w, V = jacobi_eigh(A, K, MAX_SWEEPS, TOL)
    # descending order by rank (padding, beyond n, sorts last whatever its value)
    wv = tl.where(ar < n, w, float("-inf"))
    before = (wv[None, :] > wv[:, None]) | ((wv[None, :] == wv[:, None]) & (ar[None, :] < ar[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)                           # position of eigenpair i
    sel = rank[:, None] == ar[None, :]                                    # sel[i, r]: pair i goes to slot r
    w_sorted = tl.sum(tl.where(sel, w[:, None], 0.0), axis=0)
    w_sorted += tl.sum(tl.where(ar < n, w, 0.0) * 0.0, axis=0)            # NaN eigenvalues (NaN input): all NaN
    V_sorted = tl.dot(V, sel.to(tl.float32), input_precision="ieee")      # column r = V[:, i(r)]
    tl.store(w_ptr + b * n + ar, w_sorted, mask=ar < n)
    tl.store(v_ptr + offs, V_sorted, mask=m2)


def sym_eig(A: torch.Tensor, max_sweeps: int = MAX_SWEEPS, tol: float = TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of symmetric A (B, n, n), n <= 64: (w (B, n) descending, V (B, n, n) columns), fp32."""
    B, n, _ = A.shape
    A = A.contiguous()
    w = torch.empty(B, n, device=A.device, dtype=torch.float32)
    V = torch.empty(B, n, n, device=A.device, dtype=torch.float32)
    K = max(16, triton.next_power_of_2(n))
    _sym_eig_kernel[(B,)](A, w, V, n, K=K, MAX_SWEEPS=max_sweeps, TOL=tol, num_warps=8 if K >= 64 else 4,
                          **LAUNCH)
    return w, V
