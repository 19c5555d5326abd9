"""Tangent-space step of both manifold terms, after the kNN: Gram, eigen-step, apply.

With the k chosen rows p_j regenerated in registers (``row_source``) and shifted
by the nearest of them, ``y_j = p_j - p_0`` and ``u = x - p_0`` (centring is
shift-invariant; shifting by a row of the set keeps G's entries at the set's own
scale, so C G C loses nothing to cancellation however far x lies from the rows,
where a shift by x loses (|x - c| / spread)^2 x eps), everything the projection
needs is k x k:

    G = Y Y^T,  h = Y v (v = g, or u for the pull),  uu = |u|^2,  C = I - 11^T / k  (on the k valid rows)
    X = C Y,   X X^T = C G C,   X g = C h,   x - c = u - Y^T 1 / k,   X (x - c) = C (h - G 1 / k)

With ``C G C v = mu v`` (top-d, directions with mu <= rel_tol * mu_max dropped
as in ``tangent_basis_ref``) and ``w = sum_j v_j (v_j . rhs) / mu_j``:

* paper (``manifold_correct``): ``P_T g = X^T w = Y^T C w`` (rhs = C h), so
  ``g - lam P_N g = (1 - lam) g + Y^T (lam C w)``;
* official (``manifold_pull``): ``n = (x - c) - P_T (x - c) = u + Y^T cn`` with ``cn = -1/k - C w``
  (rhs = X (x - c)), ``delta_min = |u|`` (x to the nearest row, exact, not the kNN's dot-product
  expansion), term ``= s n``, ``s = -scale tanh(dmin/b) / (|n| + 1e-8)``. |n| is summed from n itself
  by the apply pass: its k x k expansion ``uu + 2 cn.h + cn^T G cn`` cancels where x lies near the
  rows' tangent plane (|n| << |u|), and s then grew by orders of magnitude.

So each sample's output is ``alpha v + Y^T coef_b`` (v = g, or u; the pull: n, then times s): three
kernels, and a fourth that scales n for the pull.

1. ``_gram_kernel`` (B, D-splits): G, h and uu partial sums over a slice of D (gather + Gram via
   ``tl.dot`` in IEEE fp32 + Y v, one pass);
2. ``_coef_kernel`` (B,): sum the partials, centre, Jacobi (``sym_eig.jacobi_eigh``), top-d, coef/alpha;
3. ``_apply_kernel`` (B, D-blocks): ``alpha v + Y^T coef`` regenerating Y, fused with
   ``eps - lambda_M sigma (.)`` (paper eps update); for the pull (NORM) n and its blocks' |n|^2;
4. ``_scale_kernel`` (B, D-blocks, pull only): ``s n``, fused with ``mean + (.)`` (official posterior mean).

Between 1 and 3 only (B, splits, K, K) floats touch memory; between 3 and 4 (the pull) n, (B, D) fp32, and
its (B, D-blocks) partial sums of squares.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .knn_rows import block_d_for, pow2_at_least, warps_for
from .philox_normal import LAUNCH
from .row_source import rows_tile
from .sym_eig import MAX_SWEEPS, TOL, jacobi_eigh

EXT_NONE, EXT_EPS, EXT_MEAN = 0, 1, 2


@triton.jit
def _shifted_tile(SRC: tl.constexpr, b, rows, jmask, d0, cols, cmask, x_ptr, D,
                  src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, sample, step16,
                  K: tl.constexpr, BLOCK_D: tl.constexpr):
    """At ``cols``: the (K, BLOCK_D) fp32 tile of y_j = p_j - p_0 (zero outside ``jmask`` x ``cmask``)
    and the (BLOCK_D,) slice of u = x - p_0 (zero outside ``cmask``); p_0 is rows[0], the nearest."""
    p = rows_tile(SRC, b, rows, jmask, d0, cols, cmask, src_ptr, src_sb, src_sm, ord_ptr, ord_sb,
                  rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, sample, step16, BLOCK_D)
    first = tl.arange(0, K) == 0
    p0 = tl.sum(tl.where(first[:, None], p, 0.0), axis=0)                       # (BLOCK_D,)
    xv = tl.load(x_ptr + b.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
    y = tl.where(jmask[:, None] & cmask[None, :], p - p0[None, :], 0.0)
    u = tl.where(cmask, xv - p0, 0.0)
    return y, u


@triton.jit
def _gram_kernel(x_ptr, g_ptr, idx_ptr, sid_ptr, gram_ptr, h_ptr, uu_ptr,
                 src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, step16,
                 D, k, d_per_split, n_dsplit,
                 SRC: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_G: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    sample = tl.load(sid_ptr + b)
    jj = tl.arange(0, K)
    jmask = jj < k
    rows = tl.load(idx_ptr + b64 * k + jj, mask=jmask, other=0)
    G = tl.zeros((K, K), dtype=tl.float32)
    h = tl.zeros((K,), dtype=tl.float32)
    uu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    d_lo = s * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d_hi
        y, u = _shifted_tile(SRC, b, rows, jmask, d0, cols, cmask, x_ptr, D, src_ptr, src_sb, src_sm, ord_ptr,
                             ord_sb, rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, sample, step16, K, BLOCK_D)
        G += tl.dot(y, tl.trans(y), input_precision="ieee")
        if HAS_G:
            v = tl.load(g_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            v = u
        h += tl.sum(y * v[None, :], axis=1)
        uu += u * u
    base = b64 * n_dsplit + s
    tl.store(gram_ptr + base * K * K + jj[:, None] * K + jj[None, :], G)
    tl.store(h_ptr + base * K + jj, h)
    tl.store(uu_ptr + base, tl.sum(uu, axis=0))


@triton.jit
def _coef_kernel(gram_ptr, h_ptr, uu_ptr, coef_ptr, alpha_ptr, gc_ptr, ew_ptr, ev_ptr, n_dsplit, k, d,
                 lam, scale, inv_bw, rel_tol,
                 PULL: tl.constexpr, K: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL: tl.constexpr,
                 PHASE: tl.constexpr):
    """PHASE 0: the whole step with the in-register Jacobi. With an external eigensolver (CUDA C++):
    PHASE 1 writes the centred (B, k, k) Gram to ``gc_ptr`` and stops; PHASE 2 redoes the (cheap)
    sums and takes the eigenpairs from ``ew_ptr`` (B, k) / ``ev_ptr`` (B, k, k, columns)."""
    b = tl.program_id(0).to(tl.int64)
    ar = tl.arange(0, K)
    ii = ar[:, None]
    jj = ar[None, :]
    G = tl.zeros((K, K), dtype=tl.float32)
    h = tl.zeros((K,), dtype=tl.float32)
    uu = 0.0
    for s in range(n_dsplit):
        base = b * n_dsplit + s
        G += tl.load(gram_ptr + base * K * K + ii * K + jj)
        h += tl.load(h_ptr + base * K + ar)
        uu += tl.load(uu_ptr + base)
    valid = ar < k
    kf = k.to(tl.float32)
    # G 1 / k and 1^T G 1 / k^2 summed from G / k: no overflow short of the Jacobi's own range (3.4e38)
    rk = tl.sum(G / kf, axis=1)                                           # (padding rows are zero)
    totk = tl.sum(rk / kf, axis=0)
    Gc = G - rk[:, None] - rk[None, :] + totk                             # C G C
    vv = valid[:, None] & valid[None, :]
    Gc = tl.where(vv, Gc, 0.0)
    if PHASE == 1:
        tl.store(gc_ptr + b * k * k + ii * k + jj, Gc, mask=vv)
    else:
        if PHASE == 2:
            mu_all = tl.load(ew_ptr + b * k + ar, mask=valid, other=0.0)
            V = tl.load(ev_ptr + b * k * k + ii * k + jj, mask=vv, other=0.0)
        else:
            mu_all, V = jacobi_eigh(Gc, K, MAX_SWEEPS, TOL)
        c, alpha = _finish(h, rk, uu, mu_all, V, k, d, lam, scale, inv_bw, rel_tol, PULL, K)
        tl.store(coef_ptr + b * K + ar, c)
        tl.store(alpha_ptr + b, alpha)


@triton.jit
def _tanh_nonneg(a):
    """tanh(a) for a >= 0 to a few ulps: 1 - 2 / (e^2a + 1) loses eps / tanh(a) relative to cancellation,
    so below 0.3 the Taylor series to a^9 (truncation < 1e-8 relative) is used instead."""
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    closed = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * a, 80.0)) + 1.0)
    return tl.where(a < 0.3, series, closed)


@triton.jit
def _finish(h, rk, uu, mu_all, V, k, d, lam, scale, inv_bw, rel_tol,
            PULL: tl.constexpr, K: tl.constexpr):
    """coef (K,), alpha from h = Y v, rk = G 1 / k (G the Gram), uu = |u|^2 and the eigenpairs of C G C."""
    ar = tl.arange(0, K)
    jj = ar[None, :]
    valid = ar < k
    kf = k.to(tl.float32)
    if PULL:
        q = tl.where(valid, h - rk, 0.0)
        rhs = tl.where(valid, q - tl.sum(q, axis=0) / kf, 0.0)            # X (x - c) = C (h - G 1 / k)
    else:
        rhs = tl.where(valid, h - tl.sum(tl.where(valid, h, 0.0), axis=0) / kf, 0.0)  # X g = C h
    # only the k real eigenpairs are candidates (the padding stays decoupled in Jacobi)
    cand = tl.where(valid, mu_all, float("-inf"))
    mu0 = tl.max(cand, axis=0)
    w = tl.zeros((K,), dtype=tl.float32)
    for t in range(d):
        mu = tl.max(cand, axis=0)
        j = tl.argmax(cand, axis=0)
        cand = tl.where(ar == j, float("-inf"), cand)
        v = tl.sum(tl.where(jj == j, V, 0.0), axis=1)                      # eigenvector j (K,)
        keep = (mu > rel_tol * mu0) & (mu > 0.0)                          # scale-free, as the reference
        w += tl.where(keep, tl.sum(v * rhs, axis=0) / tl.where(keep, mu, 1.0), 0.0) * v
    cw = tl.where(valid, w - tl.sum(tl.where(valid, w, 0.0), axis=0) / kf, 0.0)   # C w
    if PULL:
        coef = tl.where(valid, -1.0 / kf, 0.0) - cw                        # n = u + Y^T cn
        alpha = -scale * _tanh_nonneg(tl.sqrt(uu) * inv_bw)                # s (|n| + 1e-8): see _scale_kernel
    else:
        coef = lam * cw
        alpha = 1.0 - lam
    return coef, alpha


@triton.jit
def _apply_kernel(x_ptr, g_ptr, idx_ptr, sid_ptr, coef_ptr, alpha_ptr, ext_ptr, out_ptr, nsq_ptr,
                  src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, step16,
                  D, k, ext_scale, n_blocks,
                  SRC: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_G: tl.constexpr,
                  EXT: tl.constexpr, NORM: tl.constexpr):
    """``alpha v + Y^T coef`` (+ EXT); NORM (the pull): ``v + Y^T coef`` (= n) in fp32 and, per block, its
    sum of squares to ``nsq_ptr`` (B, n_blocks), for :func:`_scale_kernel`."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    sample = tl.load(sid_ptr + b)
    jj = tl.arange(0, K)
    jmask = jj < k
    rows = tl.load(idx_ptr + b64 * k + jj, mask=jmask, other=0)
    coef = tl.load(coef_ptr + b64 * K + jj)
    cols = d0 + tl.arange(0, BLOCK_D)
    cmask = cols < D
    y, u = _shifted_tile(SRC, b, rows, jmask, d0, cols, cmask, x_ptr, D, src_ptr, src_sb, src_sm, ord_ptr, ord_sb,
                         rho_ptr, gn_ptr, aux_sb, sqa, sig, seed, sample, step16, K, BLOCK_D)
    if HAS_G:
        v = tl.load(g_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        v = u
    if NORM:
        res = v + tl.sum(coef[:, None] * y, axis=0)                                  # n = u + Y^T cn
        tl.store(nsq_ptr + b64 * n_blocks + tl.program_id(1), tl.sum(tl.where(cmask, res * res, 0.0), axis=0))
    else:
        res = tl.load(alpha_ptr + b) * v + tl.sum(coef[:, None] * y, axis=0)       # alpha v + Y^T coef
    if EXT == 1:
        res = tl.load(ext_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32) - ext_scale * res
    elif EXT == 2:
        res = tl.load(ext_ptr + b64 * D + cols, mask=cmask, other=0.0).to(tl.float32) + res
    tl.store(out_ptr + b64 * D + cols, res.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scale_kernel(n_ptr, nsq_ptr, alpha_ptr, ext_ptr, out_ptr, D, n_blocks,
                  BLOCK_D: tl.constexpr, NB: tl.constexpr, HAS_EXT: tl.constexpr):
    """The pull: ``alpha n / (|n| + 1e-8)`` (+ ``ext``: the posterior mean), |n|^2 summed from the apply
    pass's (B, n_blocks) partials in a fixed order (the same bits whatever the launch)."""
    b = tl.program_id(0).to(tl.int64)
    nb = tl.arange(0, NB)
    n2 = tl.sum(tl.load(nsq_ptr + b * n_blocks + nb, mask=nb < n_blocks, other=0.0), axis=0)
    f = tl.load(alpha_ptr + b) / (tl.sqrt(n2) + 1e-8)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    res = f * tl.load(n_ptr + b * D + cols, mask=cmask, other=0.0)
    if HAS_EXT:
        res = tl.load(ext_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32) + res
    tl.store(out_ptr + b * D + cols, res.to(out_ptr.dtype.element_ty), mask=cmask)


def plan_dsplits(B: int, D: int, block_d: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(d_per_split, n_dsplit) for the Gram pass: ~4 programs per SM on a GPU, d_per_split a multiple of block_d."""
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, (4 * sms + B - 1) // B)
        else:
            splits = 2
    splits = max(1, min(splits, triton.cdiv(D, block_d)))
    per = triton.cdiv(triton.cdiv(D, splits), block_d) * block_d
    return per, triton.cdiv(D, per)


def gram(x, g, idx, sample_ids, k, src, splits=None):
    """Partial sums over D-splits: (B, S, K, K) Gram matrices of Y = rows - rows[:, 0], (B, S, K) Y v
    (v = g, or u = x - rows[:, 0] when g is None) and (B, S) |u|^2, as one tuple for :func:`coef`."""
    B, D = x.shape
    K = pow2_at_least(k)
    BLOCK_D = block_d_for(K, D)
    per, n_dsplit = plan_dsplits(B, D, BLOCK_D, x.device, splits)
    Gp = torch.empty(B, n_dsplit, K, K, device=x.device, dtype=torch.float32)
    hp = torch.empty(B, n_dsplit, K, device=x.device, dtype=torch.float32)
    up = torch.empty(B, n_dsplit, device=x.device, dtype=torch.float32)
    _gram_kernel[(B, n_dsplit)](x, g if g is not None else x, idx, sample_ids, Gp, hp, up, *src.args(),
                                D, k, per, n_dsplit, SRC=src.kind, K=K, BLOCK_D=BLOCK_D, HAS_G=g is not None,
                                num_warps=warps_for(K, BLOCK_D), **LAUNCH)
    return Gp, hp, up


def coef(parts, k, d, *, pull, lam=1.0, scale=0.0, bandwidth=1.0, rel_tol=1e-6, eig=None):
    """(coef (B, K), alpha (B,)) so that each output is ``alpha v + Y^T coef`` (see the module docstring).

    ``parts``: :func:`gram`'s tuple. ``eig`` None: the Jacobi runs inside this kernel. Otherwise a function
    ``(B, k, k) fp32 -> (w (B, k), V (B, k, k))`` (the CUDA C++ eigensolver): the
    kernel runs twice around it (centre, then finish).
    """
    Gp, hp, up = parts
    B, n_dsplit, K, _ = Gp.shape
    c = torch.empty(B, K, device=Gp.device, dtype=torch.float32)
    alpha = torch.empty(B, device=Gp.device, dtype=torch.float32)
    scal = (n_dsplit, k, d, float(lam), float(scale), 1.0 / float(bandwidth), float(rel_tol))
    meta = dict(PULL=bool(pull), K=K, MAX_SWEEPS=MAX_SWEEPS, TOL=TOL, num_warps=warps_for(K), **LAUNCH)
    if eig is None:
        _coef_kernel[(B,)](Gp, hp, up, c, alpha, Gp, Gp, Gp, *scal, PHASE=0, **meta)
        return c, alpha
    Gc = torch.empty(B, k, k, device=Gp.device, dtype=torch.float32)
    _coef_kernel[(B,)](Gp, hp, up, c, alpha, Gc, Gp, Gp, *scal, PHASE=1, **meta)
    w, V = eig(Gc)
    _coef_kernel[(B,)](Gp, hp, up, c, alpha, Gc, w.contiguous(), V.contiguous(), *scal, PHASE=2, **meta)
    return c, alpha


def apply(x, g, idx, sample_ids, c, alpha, k, src, *, ext=None, ext_kind=EXT_NONE, ext_scale=0.0, out_dtype=None,
          norm=False):
    """``alpha v + Y^T coef`` (B, D) (v = g, or x - rows[:, 0] when g is None), then ``ext - ext_scale * (.)``
    (EXT_EPS) or ``ext + (.)`` (EXT_MEAN). ``norm`` (the pull, :func:`coef` with pull=True): ``alpha n / (|n| +
    1e-8)`` with ``n = v + Y^T coef``, then ``ext + (.)`` where ``ext`` is given."""
    B, D = x.shape
    K = c.shape[1]
    BLOCK_D = block_d_for(K, D)
    n_blocks = triton.cdiv(D, BLOCK_D)
    out = torch.empty(B, D, device=x.device, dtype=out_dtype or x.dtype)
    if not norm:
        _apply_kernel[(B, n_blocks)](x, g if g is not None else x, idx, sample_ids, c, alpha,
                                     ext if ext is not None else x, out, alpha, *src.args(), D, k,
                                     float(ext_scale), n_blocks, SRC=src.kind, K=K, BLOCK_D=BLOCK_D,
                                     HAS_G=g is not None, EXT=ext_kind, NORM=False, **LAUNCH)
        return out
    n = torch.empty(B, D, device=x.device, dtype=torch.float32)
    nsq = torch.empty(B, n_blocks, device=x.device, dtype=torch.float32)
    _apply_kernel[(B, n_blocks)](x, g if g is not None else x, idx, sample_ids, c, alpha, x, n, nsq, *src.args(),
                                 D, k, 0.0, n_blocks, SRC=src.kind, K=K, BLOCK_D=BLOCK_D, HAS_G=g is not None,
                                 EXT=EXT_NONE, NORM=True, **LAUNCH)
    _scale_kernel[(B, n_blocks)](n, nsq, alpha, ext if ext is not None else n, out, D, n_blocks,
                                 BLOCK_D=BLOCK_D, NB=pow2_at_least(n_blocks), HAS_EXT=ext is not None, **LAUNCH)
    return out
