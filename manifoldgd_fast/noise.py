"""Counter-based noise (Philox4x32-10) of the fused guidance ops, and its references.

The fused ops (``ops.manifold_correct_fused``, ``ops.manifold_pull_fused``) never
materialise the patch or the cloud: they draw its noise in registers from counters,
so the builders here (:func:`time_aligned_patch_philox`, :func:`official_cloud_philox`)
can draw exactly the same numbers. Counter layout (one normal per (seed, step,
stream, sample, row, col), independent of D, blocks, batch composition and launch
order):

    key      (seed mod 2^32, seed >> 32), 0 <= seed < 2^63
    counter  (col // 4, row, sample_id, step * 16 + stream), 0 <= step < 2^28
    normals  Box-Muller (Triton's pair_uniform_to_normal) on (u0, u1) -> cols 4q, 4q+1
             and on (u2, u3) -> cols 4q+2, 4q+3; u_i = Triton's uint_to_uniform_float(r_i)
    uniform  r0 of counter (0, row, sample_id, step * 16 + stream)
    streams  0 patch xi (row = patch row j, i.e. position j of the sample's order)
             1 cloud direction g_j (u_j = g_j / |g_j|), 2 cloud radius (points j >= N//2),
             3 cloud xi

``sample_ids`` (B,) default to the batch positions; pass global ids to make a
sample's noise independent of the batch it is drawn in. The Triton
materialisation (:func:`philox_normal`, backend triton) is bit-identical to the
in-kernel noise on the same device; the pure-PyTorch one has the same integer
stream exactly and normals within a few ulp (the transcendental functions differ).
"""
from __future__ import annotations

import math

import torch

from .dispatch import _kernels
from .errors import BackendError, ConfigError


# ----------------------------------------------------------------------------
# counter-based noise (the layout is in the module docstring)
# ----------------------------------------------------------------------------
STREAM_PATCH, STREAM_CLOUD_DIR, STREAM_CLOUD_RADIUS, STREAM_CLOUD_XI = 0, 1, 2, 3
_M32 = 0xFFFFFFFF
_MAX_SEED, _MAX_STEP = 2 ** 63, 2 ** 28


def _capturing(device) -> bool:
    """True while a CUDA graph captures on the current stream (no host reads allowed)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_counters(seed, step, sample_ids, B: int, device) -> torch.Tensor:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, 2^63), got {seed!r}")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < _MAX_STEP:
        raise ConfigError(f"step must be an int in [0, 2^28), got {step!r}")
    if sample_ids is None:
        return torch.arange(B, device=device, dtype=torch.long)
    sample_ids = torch.as_tensor(sample_ids, device=device)
    if sample_ids.shape != (B,) or sample_ids.is_floating_point() or sample_ids.dtype == torch.bool:
        raise ConfigError(f"sample_ids must be (B,) = ({B},) integers, got {tuple(sample_ids.shape)} {sample_ids.dtype}")
    # the range check reads the ids on the host: skipped while a CUDA graph captures (the
    # warm-up run before the capture checked the same buffer)
    # The guidance passes the same (B,) tensor at every step, and reading it on the host each time would
    # stall the eager loop on the GPU: a tensor remembers the version it was checked at (an in-place
    # change bumps it, so changed ids are checked again).
    try:
        version = sample_ids._version
    except RuntimeError:  # an inference-mode tensor keeps no version: checked every time
        version = None
    if B and not _capturing(device) and (version is None or getattr(sample_ids, "_ids_checked_at", None) != version):
        if int(sample_ids.min()) < 0 or int(sample_ids.max()) > _M32:
            raise ConfigError("sample_ids must lie in [0, 2^32)")
        if version is not None:
            sample_ids._ids_checked_at = version
    return sample_ids.long().contiguous()


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * x for a constant a < 2^32 and int64 x in [0, 2^32), overflow-free."""
    xh, xl = x >> 16, x & 0xFFFF
    pl, ph = a * xl, a * xh                                  # < 2^48 each
    return (ph + (pl >> 16)) >> 16, (pl + ((ph & 0xFFFF) << 16)) & _M32


def philox4x32_ref(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011; Triton's ``tl.random.philox``) on int64 tensors holding uint32.

    Key (seed mod 2^32, seed >> 32). Returns the four output words as int64 tensors in [0, 2^32).
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hb, lb = _mulhilo32(0xCD9E8D57, c2)
        ha, la = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hb ^ c1 ^ k0, lb, ha ^ c3 ^ k1, la
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _unit_float(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: r as int32, negative -> ~r, times 4.6566127342e-10 (fp32), in [0, 1)."""
    v = torch.where(r >= 2 ** 31, r ^ _M32, r)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=r.device)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal, in fp32."""
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32, device=u1.device) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def _counters(seed, step, stream, sample_ids, n_rows, n_cols):
    B = sample_ids.shape[0]
    dev = sample_ids.device
    shape = (B, n_rows, n_cols)
    c0 = torch.arange(n_cols, device=dev).view(1, 1, n_cols).expand(shape)
    c1 = torch.arange(n_rows, device=dev).view(1, n_rows, 1).expand(shape)
    c2 = (sample_ids.long() & _M32).view(B, 1, 1).expand(shape)
    c3 = torch.full(shape, (step * 16 + stream) & _M32, device=dev, dtype=torch.long)
    return philox4x32_ref(seed, c0, c1, c2, c3)


def philox_normal_ref(seed: int, step: int, stream: int, sample_ids: torch.Tensor, n_rows: int, D: int) -> torch.Tensor:
    """Reference of :func:`philox_normal` in PyTorch: (B, n_rows, D) fp32 (integer stream exact, normals to a few ulp)."""
    nq = (D + 3) // 4
    r = _counters(seed, step, stream, sample_ids, n_rows, nq)
    n0, n1 = _box_muller(_unit_float(r[0]), _unit_float(r[1]))
    n2, n3 = _box_muller(_unit_float(r[2]), _unit_float(r[3]))
    return torch.stack([n0, n1, n2, n3], -1).reshape(sample_ids.shape[0], n_rows, 4 * nq)[..., :D]


def philox_uniform_ref(seed: int, step: int, stream: int, sample_ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(B, n_rows) fp32 uniforms in [0, 1): r0 of counter (0, row, sample, step * 16 + stream). Exact on any device."""
    return _unit_float(_counters(seed, step, stream, sample_ids, n_rows, 1)[0][..., 0])


def philox_normal(seed: int, step: int, stream: int, sample_ids, n_rows: int, D: int, *, backend: str = "auto"):
    """(B, n_rows, D) fp32 standard normals of ``stream`` at ``step`` (counter layout in the module docstring).

    Args:
        seed: int in [0, 2^63). step: int in [0, 2^28). stream: 0..15 (``STREAM_*``).
        sample_ids: (B,) integers in [0, 2^32), the c2 counter of each sample.
        n_rows, D: rows and columns drawn (a value does not depend on D).
        backend: "triton" (the kernels' own helper: bit-identical to the in-kernel noise on the
            same device), "reference" (PyTorch) or "auto" (triton where it can run, else reference).
    """
    if not 0 <= stream < 16:
        raise ConfigError(f"stream must be in [0, 16), got {stream}")
    dev = torch.as_tensor(sample_ids).device
    sample_ids = _check_counters(seed, step, sample_ids, torch.as_tensor(sample_ids).shape[0], dev)
    if backend not in ("auto", "triton", "reference"):
        raise ConfigError(f"backend must be auto, triton or reference, got {backend!r}")
    if backend == "reference":  # never imports the kernels
        return philox_normal_ref(seed, step, stream, sample_ids, n_rows, D)
    kern, why = _kernels()
    usable = kern is not None and kern.triton_device_ok(dev)
    if backend == "triton" and not usable:
        raise BackendError(f"backend 'triton' cannot draw the noise: {why or f'sample_ids are on {dev}'}")
    if not usable:
        return philox_normal_ref(seed, step, stream, sample_ids, n_rows, D)
    from .kernels import philox_normal as pn

    return pn.philox_normal(seed, step, stream, sample_ids, n_rows, D)


def time_aligned_patch_philox(latents, order, lengths, alpha_bar, *, seed, step, sample_ids=None, backend="auto"):
    """:func:`manifoldgd_fast.ops.time_aligned_patch` with counter-based noise: the patch the fused kernels see (the
    noise bit for bit; ``sqrt(abar) z + sqrt(1 - abar) xi`` to an ulp, where a GPU fuses it into one FMA).

    ``P_t[b, j] = sqrt(abar) latents[order[b, j]] + sqrt(1 - abar) xi(b, j)`` for j < lengths[b]
    (xi: stream ``STREAM_PATCH``, row counter j), zero beyond. Returns (B, M, D) fp32, M = max(lengths).
    """
    B = order.shape[0]
    sample_ids = _check_counters(seed, step, sample_ids, B, latents.device)
    lengths = torch.as_tensor(lengths, device=latents.device).long()
    M, D = int(lengths.max()), latents.shape[1]
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    xi = philox_normal(seed, step, STREAM_PATCH, sample_ids, M, D, backend=backend)      # (B, M, D)
    patch = a * latents[order[:, :M].clamp(0, latents.shape[0] - 1)].float() + s * xi  # padding: masked below
    valid = torch.arange(M, device=latents.device)[None, :] < lengths[:, None]
    return patch * valid[:, :, None]


def official_cloud_radii(radius: float, *, seed: int, step: int, n_points: int, sample_ids) -> torch.Tensor:
    """(B, N) fp32 radii of the cloud: ``linspace(0.1, radius, N//2)``, then ``radius * U[0, 1)`` (stream 2, row j)."""
    sample_ids = torch.as_tensor(sample_ids)
    dev = sample_ids.device
    n_lin = n_points // 2
    lin = torch.linspace(0.1, radius, n_lin, device=dev).expand(sample_ids.shape[0], n_lin)
    u = philox_uniform_ref(seed, step, STREAM_CLOUD_RADIUS, sample_ids, n_points)[:, n_lin:]
    return torch.cat([lin, u * radius], 1)


def official_cloud_philox(modes, radius, alpha_bar, *, seed, step, n_points=300, sample_ids=None, backend="auto"):
    """:func:`manifoldgd_fast.ops.official_cloud` with counter-based noise: exactly the cloud the fused kernels never store.

    Point j: ``sqrt(abar) (m + rho_j g_j / |g_j|) + sqrt(1 - abar) xi_j`` with g (stream 1), rho
    (:func:`official_cloud_radii`), xi (stream 3). Returns (B, N, D) fp32.
    """
    B, D = modes.shape
    sample_ids = _check_counters(seed, step, sample_ids, B, modes.device)
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    g = philox_normal(seed, step, STREAM_CLOUD_DIR, sample_ids, n_points, D, backend=backend)   # (B, N, D)
    u = g / g.norm(dim=2, keepdim=True)
    rho = official_cloud_radii(radius, seed=seed, step=step, n_points=n_points, sample_ids=sample_ids)
    pts = modes.float()[:, None, :] + rho[:, :, None] * u
    xi = philox_normal(seed, step, STREAM_CLOUD_XI, sample_ids, n_points, D, backend=backend)
    return a * pts + s * xi
