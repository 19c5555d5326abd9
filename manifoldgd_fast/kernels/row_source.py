"""Where the rows a guidance kernel looks at come from, as one Triton helper.

Three sources, chosen by the constexpr ``SRC``; every kernel (kNN, Gram, apply)
reads its (R, BLOCK_D) tile of rows through :func:`rows_tile`, so a row is
regenerated bit-identically wherever it is needed:

* ``SRC_ROWS``  (B, M, D) materialised rows (a patch or cloud built elsewhere);
* ``SRC_PATCH`` the paper's time-aligned patch, never stored:
  ``p_j = sqrt(abar) * latents[order[b, j]] + sigma * xi(b, j)``
  with xi the Philox stream ``STREAM_PATCH`` (row counter = patch row j);
* ``SRC_CLOUD`` the official cloud, never stored:
  ``p_j = sqrt(abar) * (m_b + rho_j * g_j / |g_j|) + sigma * xi_j``
  with g the stream ``STREAM_CLOUD_DIR``, xi the stream ``STREAM_CLOUD_XI``,
  rho_j and |g_j|^2 read from small (B, N) side tables.

The noise needs whole column quads: ``d0`` and ``BLOCK_D`` are multiples of 4.
"""
import triton
import triton.language as tl

from .philox_normal import STREAM_CLOUD_DIR, STREAM_CLOUD_XI, STREAM_PATCH, normal_tile

SRC_ROWS = 0
SRC_PATCH = 1
SRC_CLOUD = 2

_ST_PATCH = tl.constexpr(STREAM_PATCH)
_ST_DIR = tl.constexpr(STREAM_CLOUD_DIR)
_ST_XI = tl.constexpr(STREAM_CLOUD_XI)


@triton.jit
def rows_tile(SRC: tl.constexpr, b, rows, rmask, d0, cols, cmask,
              src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb,
              sqa, sig, seed, sample, step16, BLOCK_D: tl.constexpr):
    """(R, BLOCK_D) fp32 rows ``rows`` (R,) of sample ``b`` at columns ``cols`` = d0 + arange(BLOCK_D).

    Entries outside ``rmask`` x ``cmask`` are unspecified (finite): callers mask them.
    Index arithmetic is int64 (B * M * D passes 2^31 at the supported sizes).
    """
    m2 = rmask[:, None] & cmask[None, :]
    b64 = b.to(tl.int64)
    if SRC == 0:
        offs = b64 * src_sb + rows[:, None].to(tl.int64) * src_sm + cols[None, :]
        p = tl.load(src_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    elif SRC == 1:
        lat_row = tl.load(ord_ptr + b64 * ord_sb + rows, mask=rmask, other=0).to(tl.int64)
        z = tl.load(src_ptr + lat_row[:, None] * src_sm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        xi = normal_tile(seed, rows, sample, step16 + _ST_PATCH, d0 // 4, BLOCK_D // 4)
        p = sqa * z + sig * xi
    else:
        m = tl.load(src_ptr + b64 * src_sb + cols, mask=cmask, other=0.0).to(tl.float32)
        rho = tl.load(rho_ptr + b64 * aux_sb + rows, mask=rmask, other=0.0)
        gn = tl.load(gn_ptr + b64 * aux_sb + rows, mask=rmask, other=1.0)
        g = normal_tile(seed, rows, sample, step16 + _ST_DIR, d0 // 4, BLOCK_D // 4)
        xi = normal_tile(seed, rows, sample, step16 + _ST_XI, d0 // 4, BLOCK_D // 4)
        u = g / tl.sqrt(gn)[:, None]
        p = sqa * (m[None, :] + rho[:, None] * u) + sig * xi
    return p


class Source:
    """The host side of a row source: the tensors and scalars every kernel's source argument block takes.

    ``Source.rows(rows)``, ``Source.patch(latents, order, ...)``, ``Source.cloud(modes, rho, gn, ...)``;
    ``args()`` is the block ``src_ptr, src_sb, src_sm, ord_ptr, ord_sb, rho_ptr, gn_ptr, aux_sb,
    sqa, sig, seed, step16`` in the kernels' order; ``n_rows`` bounds the row index (M, n or N).
    """

    def __init__(self, kind, t, n_rows, order=None, rho=None, gn=None, sqa=1.0, sig=0.0, seed=0, step=0):
        self.kind, self.t, self.n_rows = kind, t, n_rows
        self.order, self.rho, self.gn = order, rho, gn
        self.sqa, self.sig, self.seed, self.step16 = float(sqa), float(sig), int(seed), int(step) * 16

    @classmethod
    def rows(cls, rows):
        return cls(SRC_ROWS, rows, rows.shape[1])

    @classmethod
    def patch(cls, latents, order, sqa, sig, seed, step):
        return cls(SRC_PATCH, latents, order.shape[1], order=order, sqa=sqa, sig=sig, seed=seed, step=step)

    @classmethod
    def cloud(cls, modes, rho, gn, sqa, sig, seed, step):
        return cls(SRC_CLOUD, modes, rho.shape[1], rho=rho, gn=gn, sqa=sqa, sig=sig, seed=seed, step=step)

    def args(self):
        t = self.t
        if self.kind == SRC_ROWS:
            sb, sm = t.stride(0), t.stride(1)
        elif self.kind == SRC_PATCH:
            sb, sm = 0, t.stride(0)
        else:
            sb, sm = t.stride(0), 0
        order = self.order if self.order is not None else t
        ord_sb = self.order.stride(0) if self.order is not None else 0
        rho = self.rho if self.rho is not None else t
        gn = self.gn if self.gn is not None else t
        aux_sb = self.rho.stride(0) if self.rho is not None else 0
        return (t, sb, sm, order, ord_sb, rho, gn, aux_sb, self.sqa, self.sig, self.seed, self.step16)
