"""Distribution metrics of a distilled set against the real data, on encoder features (SPEC 7).

- FID: Fréchet distance of Gaussians fitted to all real and all synthetic features.
- L2: per synthetic image, the Euclidean distance to the nearest real feature of
  its class, averaged (``l2``); the reverse direction, per real image the nearest
  synthetic one (how well the synthetic set covers the real one; not the "coverage"
  of Naeem et al. 2020), is ``l2_real_to_syn``.
- MMD: biased MMD² (V-statistic, exactly 0 for identical sets) with an RBF kernel
  exp(-d² / 2σ²), σ the median pairwise distance of the pooled sets.
- Representativeness and diversity, as MGD3 (appendix B) defines them, with
  cosine similarity for the t-SNE distance: per synthetic image, representativeness
  is the mean cosine similarity to its k = 50 most similar real images of its class
  (higher: more representative), diversity is 1 - the largest cosine similarity to
  another synthetic image of its class (0 for a duplicate; higher: more diverse).
  Reported as means over images, and per class.
- Trajectory variance (ManifoldGD Fig. 12): variance across samples of ‖x̂0‖ per step.

The released code's variants are reported beside them with the release's formulas
(kl.py, representativeness_diversity.py), on the same features as the metrics above
(our centre crop, not the release's Resize(224) + CenterCrop or squash to 224):

- ``l2_means``: ‖mean(real) − mean(synthetic)‖ over all classes (raw features);
- ``mmd_release``: unbiased MMD² (U-statistic) with k = exp(−γ d²),
  γ = 1 / median(d²) (the lower median of the pairwise d² of at most 5,000
  pooled points), each set capped at 6,000 random points; sqrt(max(MMD², 0));
- ``representativeness_minimax`` = min_i max_j cos(s_i, r_j) and
  ``diversity_minimax`` = 1 − max_{i≠j} cos(s_i, s_j), over all classes at once.

Encoder: by default a ResNet-18 (``nets.py``) trained here on the real folder's
images of the distilled classes and cached under ``$MANIFOLDGD_CACHE/encoders``
-- not the papers' ImageNet-pretrained ResNet-18 (``encoder="imagenet-resnet18"``);
or a user module / checkpoint (``nets.load_net``). Its ``forward_features`` (else
its output, flattened) is the feature; inputs are ImageNet-normalised images
resized (short side, PIL bicubic) and centre-cropped to ``size``. The FID's
images can instead be squashed whole to the FID encoder's size (PIL bilinear),
as the release's fid.py does (``fid_resize="squash"``). The JSON records the
encoder and the preprocessing behind each number (``metric_sources``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import decode_image, iter_class_images, read_image_uint8, reads_now
from ..config import check_out_file
from ..errors import ConfigError, DataError
from ..output import MANIFEST, atomic_write_bytes, atomic_write_text, sweep_stale_temps
from .augment import normalize, to_unit
from .inception import FIDInceptionV3
from .nets import NAMED, load_net, net_checkpoint
from ..devices import resolve_device
from .precision import amp, net_layout, prepare_net
from .protocol import (MAX_SIZE, Split, capped, check_counts, check_path, default_size, load_images, match_classes,
                       native_size, probe_net, train_net)
from .report import append_manifest, check_not_being_written, report_lock

log = logging.getLogger(__name__)

ENCODER_RECIPE = {"net": "resnet18", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                  "batch_size": 128, "schedule": "multistep x0.2 at 2/3, 5/6", "augment": "protocol + CutMix",
                  "seed": 0, "version": 1, "real_subset": "capped: seeded random per class"}


# --------------------------------------------------------------------------- closed forms
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64.

    tr (Σ1 Σ2)^½ is the sum of the singular values of Σ1^½ Σ2^½ (their squares are the
    eigenvalues of Σ1^½ Σ2 Σ1^½, which has the spectrum of Σ1 Σ2). Symmetric square
    roots and an SVD stay accurate for the singular covariances of small sets, where
    scipy's sqrtm of Σ1 Σ2 does not: a set against itself gives 0 to rounding.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"frechet_distance: mu (D,) and sigma (D, D) must agree, got {mu1.shape}, {s1.shape}, "
                          f"{mu2.shape}, {s2.shape}")
    # torch's LAPACK follows torch.set_num_threads (numpy's BLAS may oversubscribe shared cores)
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    tr_covmean = float(torch.linalg.svdvals(_psd_sqrt(t1) @ _psd_sqrt(t2)).sum())
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (ddof 1, as pytorch-fid) of (N, D) features."""
    f = np.asarray(feats.cpu() if isinstance(feats, torch.Tensor) else feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(f"features must be (N, D) with N >= 2 for FID, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid(feats_a, feats_b) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, median_points: int = 2000,
            seed: int = 0) -> dict:
    """Biased MMD² with k(a, b) = exp(-‖a − b‖² / 2σ²); σ = ``bandwidth`` or the median
    pairwise distance among (at most ``median_points`` of) the pooled points.
    x: (n, D), y: (m, D). Returns {mmd2, mmd, bandwidth}."""
    x, y = x.double(), y.double()
    if bandwidth is None:
        z = torch.cat([x, y])
        if len(z) > median_points:
            g = torch.Generator().manual_seed(seed)
            z = z[torch.randperm(len(z), generator=g)[:median_points].to(z.device)]
        d2 = _sqdist(z, z)
        iu = torch.triu_indices(len(z), len(z), 1, device=z.device)
        bandwidth = float(d2[iu[0], iu[1]].median().sqrt()) if len(z) > 1 else 1.0
        bandwidth = bandwidth if bandwidth > 0 else 1.0
    gamma = 1.0 / (2 * bandwidth ** 2)

    def k(a, b):  # the mean kernel value over all pairs, exact distances, in blocks (never an n x n matrix)
        return _kernel_sum(a, b, gamma, drop_diagonal=False, sqdist=_sqdist) / (len(a) * len(b))

    mmd2 = k(x, x) + k(y, y) - 2 * k(x, y)
    return {"mmd2": mmd2, "mmd": max(mmd2, 0.0) ** 0.5, "bandwidth": bandwidth}


def nearest_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) Euclidean distance of each row of ``a`` (n, D) to its nearest row of ``b`` (m, D)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def representativeness(syn: torch.Tensor, real: torch.Tensor, k: int = 50) -> torch.Tensor:
    """(n,) mean cosine similarity of each synthetic feature to its k most similar real ones."""
    sim = F.normalize(syn.double(), dim=1) @ F.normalize(real.double(), dim=1).T  # (n, m)
    return sim.topk(min(k, sim.shape[1]), dim=1).values.mean(1)


def diversity(syn: torch.Tensor) -> torch.Tensor:
    """(n,) 1 − the largest cosine similarity of each feature to another one (NaN for n = 1)."""
    z = F.normalize(syn.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    return (1 - sim.max(1).values).clamp_(min=0) if len(z) > 1 else torch.full((len(z),), float("nan"))


# --------------------------------------------------------------------------- the release's variants
def l2_between_means(syn: torch.Tensor, real: torch.Tensor) -> float:
    """kl.py's L2: ‖mean(syn) − mean(real)‖ of raw (N, D) features, in float64."""
    return float((syn.mean(0, dtype=torch.float64) - real.mean(0, dtype=torch.float64)).norm())


def _sqdist_expanded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a‖² + ‖b‖² − 2 a·b, (n, m): kl.py's pairwise squared distances (not clamped)."""
    return (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, drop_diagonal: bool, block: int = 2048,
                sqdist=_sqdist_expanded) -> float:
    """Σ exp(−γ max(d², 0)) over all pairs (minus the pairs i = i when ``drop_diagonal``), in blocks of
    ``block`` x ``block``; ``sqdist``: the squared distances (kl.py's expansion by default)."""
    total = a.new_zeros(())
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            k = torch.exp(-gamma * sqdist(a[i:i + block], b[j:j + block]).clamp_min(0))
            total += k.sum()
            if drop_diagonal and i == j:
                total -= k.diagonal().sum()  # the computed k(x_i, x_i), as kl.py subtracts it
    return float(total)


def mmd_release(x: torch.Tensor, y: torch.Tensor, max_samples: int = 6000, median_samples: int = 5000,
                seed: int = 0) -> dict:
    """kl.py's MMD: unbiased MMD² (Gretton's U-statistic) with k(a, b) = exp(−γ ‖a − b‖²).

    Each set is first capped at ``max_samples`` random points (x first, then y); γ =
    1 / (median + 1e-12), the median (torch's: the lower one) of the pairwise squared
    distances, each clamped to >= 1e-12, among at most ``median_samples`` random points
    of the pooled capped sets. The random subsets come from one generator seeded
    ``seed`` (the release: the global RNG). x: (n, D) synthetic, y: (m, D) real
    (kl.py's dataset1 / dataset2); float64 here (the release: float32).
    Returns {mmd = sqrt(max(MMD², 0)), mmd2 = max(MMD², 0), gamma, n_x, n_y}.
    """
    gen = torch.Generator().manual_seed(seed)

    def cap(z, n):
        if n <= 0 or len(z) <= n:
            return z
        return z[torch.randperm(len(z), generator=gen)[:n].to(z.device)]

    x, y = cap(x, max_samples).double(), cap(y, max_samples).double()
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ConfigError(f"mmd_release: needs at least 2 points in each set, got {n} and {m}")
    z = cap(torch.cat([x, y]), median_samples)
    iu = torch.triu_indices(len(z), len(z), 1, device=z.device)
    median = float(_sqdist_expanded(z, z)[iu[0], iu[1]].clamp_min(1e-12).median())
    gamma = 1.0 / (median + 1e-12)
    mmd2 = (_kernel_sum(x, x, gamma, True) / (n * (n - 1)) + _kernel_sum(y, y, gamma, True) / (m * (m - 1))
            - 2.0 * _kernel_sum(x, y, gamma, False) / (n * m))
    mmd2 = max(mmd2, 0.0)
    return {"mmd": mmd2 ** 0.5, "mmd2": mmd2, "gamma": gamma, "n_x": n, "n_y": m}


def _max_cosine(a: torch.Tensor, b: torch.Tensor, same: bool = False, block: int = 2048) -> torch.Tensor:
    """(n,) max_j cos(a_i, b_j), in blocks (never the n x m matrix); ``same``: a is b and j != i."""
    za = F.normalize(a.double(), dim=1)
    best = torch.full((len(za),), float("-inf"), dtype=torch.float64, device=za.device)
    for j in range(0, len(b), block):
        zb = F.normalize(b[j:j + block].double(), dim=1)  # per block: ImageNet's real set stays float32
        for i in range(0, len(za), block):
            sim = za[i:i + block] @ zb.T
            if same and i == j:
                sim.fill_diagonal_(float("-inf"))
            best[i:i + block] = torch.maximum(best[i:i + block], sim.max(1).values)
    return best


def representativeness_minimax(syn: torch.Tensor, real: torch.Tensor) -> float:
    """representativeness_diversity.py's score: min over synthetic i of max over real j of cos(s_i, r_j)."""
    return float(_max_cosine(syn, real).min())


def diversity_minimax(syn: torch.Tensor) -> float | None:
    """representativeness_diversity.py's score: 1 − max over pairs i != j of cos(s_i, s_j) (None below 2 images)."""
    if len(syn) < 2:
        return None
    return 1.0 - float(_max_cosine(syn, syn, same=True).max())


def latent_norms(x0: torch.Tensor) -> torch.Tensor:
    """‖x̂0‖ per sample: (B, ...) -> (B,) float32; one column of a trajectory trace."""
    return x0.detach().flatten(1).float().norm(dim=1)


def trajectory_variance(norm_traces, correction: int = 0) -> tuple[torch.Tensor, float]:
    """ManifoldGD's trajectory variance: variance across samples of ‖x̂0‖ at each step.

    norm_traces: (n_samples, n_steps), row i the norms of sample i along the reverse
    process (e.g. stacked :func:`latent_norms`). correction: 0 = population variance
    (numpy's default), 1 = unbiased. Returns (per-step variance (n_steps,), final
    variance = the last step's, float).
    """
    t = torch.as_tensor(norm_traces, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1 or t.shape[0] <= correction:
        raise ConfigError(f"norm_traces must be (n_samples, n_steps) with n_samples > {correction}, "
                          f"got {tuple(t.shape)}")
    per_step = t.var(dim=0, correction=correction)
    return per_step, float(per_step[-1])


# --------------------------------------------------------------------------- encoder
def _raw_features(encoder: torch.nn.Module, u: torch.Tensor, uint8_fwd=None):
    """The encoder's output for uint8 images u (b, 3, S, S): ``uint8_fwd(u)`` (FID Inception's
    ``forward_features_uint8`` on squashed images) or its ``forward_features`` (else forward) of the
    ImageNet-normalised images; :func:`extract_features` flattens it to (b, F) float32."""
    if callable(uint8_fwd):
        return uint8_fwd(u)
    x = net_layout(normalize(to_unit(u)))
    fwd = getattr(encoder, "forward_features", None)
    return fwd(x) if callable(fwd) else encoder(x)


PROBE_IMAGES = 2  # check_encoder's batch: two, so that an output not per image shows


def check_encoder(encoder: torch.nn.Module, size: int, device: torch.device, what: str,
                  resize: str = "crop") -> None:
    """Run ``encoder`` once as :func:`extract_features` will (same entry point, device and autocast) on
    :data:`PROBE_IMAGES` random uint8 images of ``size`` px: an encoder built for another input, one that gives
    no (B, F) feature matrix, or NaN / inf features fails here in one line (ConfigError naming ``what``, e.g.
    ``--encoder enc.pt``), before the feature passes and the default encoder's training, not as a traceback
    from the features or the FID's linear algebra."""
    fp32 = bool(getattr(encoder, "fp32_features", False))
    encoder = prepare_net(encoder, device).eval()
    uint8_fwd = getattr(encoder, "forward_features_uint8", None) if resize == "squash" else None
    u = torch.randint(0, 256, (PROBE_IMAGES, 3, size, size), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8).to(device)

    def call(u):
        with contextlib.nullcontext() if fp32 else amp(device):
            return _raw_features(encoder, u, uint8_fwd)

    out = probe_net(encoder, call, u, what)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != len(u) or out[0].numel() < 1:
        got = f"outputs of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"{what}: gives {got} on a {tuple(u.shape)} batch at {size} px, expected a (B, F) "
                          f"feature matrix (B = {len(u)} images)")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"{what}: gives non-finite features (NaN or inf) on a {tuple(u.shape)} batch at {size} px")


class FeatureCache:
    """Real-image features of one encoder, one safetensors file a class:
    ``ROOT/features/<encoder fingerprint>-<size>px/<class key>.safetensors``.

    The encoder fingerprint hashes its type, its tensors and how features are
    computed (fp32 or bf16 autocast, device type); the class key hashes the
    class folder and its (capped) file list with each file's size and mtime, so
    an edited, added or removed image recomputes that class only. Metrics of
    several distilled sets against one real folder (ImageNet-1k's 1.28 M images)
    then encode the real images once.
    """

    def __init__(self, root: str, encoder: torch.nn.Module, size: int, precision: str, device: torch.device,
                 resize: str = "crop"):
        kind = f"{type(encoder).__module__}.{type(encoder).__qualname__}|{precision}|{device.type}"
        kind += "|squash" if resize == "squash" else ""  # crop keeps the keys caches were written under
        h = hashlib.sha1(kind.encode())
        for m in encoder.modules():  # TorchScript's are all RecursiveScriptModules: their code tells them apart
            if isinstance(m, torch.jit.ScriptModule):
                with contextlib.suppress(RuntimeError, AttributeError):  # (a scripted container without forward)
                    h.update(f"{m.original_name}:{m.code}".encode())
        for name, t in encoder.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.size = size
        self.folder = os.path.join(root, "features", f"{h.hexdigest()[:16]}-{size}px")
        sweep_stale_temps(self.folder)  # killed writes' temps (the cache is shared and unlocked: old ones only)

    def path(self, entry) -> str:
        files = []
        for f in entry.files:
            st = os.stat(f)
            files.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
        desc = json.dumps({"folder": os.path.abspath(entry.folder or os.path.dirname(entry.files[0])), "files": files})
        return os.path.join(self.folder, hashlib.sha1(desc.encode()).hexdigest()[:20] + ".safetensors")

    def load(self, path: str, entry=None, read=None) -> torch.Tensor | None:
        """The cached features, or None: no file, a damaged one, or (given ``entry`` and its ``read``) an image
        it skipped as unreadable that reads now (a chmod or a remounted disk changes no stamp of the key)."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                features, meta = f.get_tensor("features"), f.metadata() or {}
        except (SafetensorError, OSError, KeyError) as e:  # a damaged cache file is recomputed
            log.warning("recomputing features: cannot read %s (%s)", path, e)
            return None
        if entry is not None and len(features) < len(entry.files):
            try:
                skipped = json.loads(meta["skipped"])
            except (KeyError, ValueError):  # (a file written before skips were recorded: recomputed once)
                return None
            if reads_now(entry.folder or os.path.dirname(entry.files[0]), skipped, read, self.size) is not None:
                return None
        return features

    @staticmethod
    def save(path: str, features: torch.Tensor, skipped: list[str] = ()) -> None:
        """skipped: the class's image files not read (their names in its folder)."""
        from safetensors.torch import save

        atomic_write_bytes(path, save({"features": features.float().cpu().contiguous()},
                                      metadata={"skipped": json.dumps([os.path.basename(p) for p in skipped])}))


RESIZES = ("crop", "squash")


def load_squashed(path: str, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the whole image resized to size x size with PIL's bilinear
    filter, as torchvision's ``Resize((size, size))`` does to a PIL image (the release's fid.py).
    Raises DataError naming the file."""
    from PIL import Image

    # (opened as every other reader opens one: the same files read or skipped, whatever --fid-resize is)
    arr = decode_image(path, lambda rgb: np.array(rgb.resize((size, size), resample=Image.BILINEAR)))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def describe_preprocess(encoder: torch.nn.Module, size: int, resize: str = "crop") -> str:
    """How :func:`extract_features` turns a file into the encoder's input, in words (recorded in the JSON)."""
    if resize == "squash":
        geometry = f"whole image to {size}x{size} (PIL bilinear, torchvision's Resize(({size}, {size})))"
    else:
        geometry = f"short side to {size} (PIL box-halving + bicubic), centre crop {size}x{size}"
    if callable(getattr(encoder, "forward_features_uint8", None)):
        scale = "(u - 128) / 128 (torchmetrics' FID)" if resize == "squash" else "u / 127.5 - 1 (pytorch-fid)"
    else:
        scale = "ImageNet mean / std"
    return f"{geometry}; pixels u -> {scale}"


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, entries, size: int, device: torch.device, *, batch_size: int = 256,
                     max_per_class: int | None = None, progress: bool = False, desc: str = "features",
                     cache_dir: str | None = None, stats: dict | None = None, resize: str = "crop",
                     what: str = "the encoder"):
    """Encoder features of every image of ``entries`` (streamed per class, not held in memory),
    under bf16 autocast on CUDA unless the encoder sets ``fp32_features`` (the papers' encoders).
    resize: "crop" (short side to ``size``, centre crop; see data.load_image) or "squash"
    (:func:`load_squashed`; an encoder with ``forward_features_uint8``, FID's Inception,
    then takes the uint8 pixels as torchmetrics does). cache_dir: keep each class's
    features in a :class:`FeatureCache` there and reuse them (None: no cache); ``stats``
    (a dict) then counts ``cached`` and ``computed`` classes. what: the encoder as errors
    name it (ConfigError for NaN or inf features, which are never cached).
    Returns (features (N, D) float32 on the device, labels (N,))."""
    if resize not in RESIZES:
        raise ConfigError(f"--fid-resize {resize}: must be one of {', '.join(RESIZES)}")
    squash = resize == "squash"
    fp32 = bool(getattr(encoder, "fp32_features", False))
    maybe_amp = contextlib.nullcontext if fp32 else functools.partial(amp, device)
    precision = "fp32" if fp32 or device.type != "cuda" else "bf16-autocast"
    cache = FeatureCache(cache_dir, encoder, size, precision, device, resize) if cache_dir else None
    encoder = prepare_net(encoder, device).eval()
    uint8_fwd = getattr(encoder, "forward_features_uint8", None) if squash else None
    stats = {} if stats is None else stats
    stats.update(cached=0, computed=0)
    feats, labels = [], []
    subs = [capped(e, max_per_class) for e in entries]
    with tqdm(total=sum(len(e.files) for e in subs), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for sub in subs:
            read = load_squashed if squash else read_image_uint8
            path = cache.path(sub) if cache and sub.files else None
            f = cache.load(path, sub, read) if path else None
            if f is None:
                parts = []
                images = iter_class_images(sub, size, batch_size, read=read)
                for batch, _ in images:
                    u = batch.to(device)  # (b, 3, size, size) uint8
                    with maybe_amp():
                        parts.append(_raw_features(encoder, u, uint8_fwd).flatten(1).float())
                    bar.update(len(batch))
                if not parts:
                    continue
                f = torch.cat(parts)
                bad = int((~torch.isfinite(f).all(1)).sum())
                if bad:  # (was a LinAlgError from the FID's SVD, after every feature pass; and never cached)
                    raise ConfigError(f"{what}: gives non-finite features (NaN or inf) for {bad} of the "
                                      f"{len(f)} images of class {sub.name} "
                                      f"({sub.folder or os.path.dirname(sub.files[0])})")
                if path:
                    cache.save(path, f, images.skipped)
                stats["computed"] += 1
            else:
                f = f.to(device)
                bar.update(len(sub.files))
                stats["cached"] += 1
            feats.append(f)
            labels.append(torch.full((len(f),), sub.label, dtype=torch.long))
    return torch.cat(feats), torch.cat(labels).to(device)


def _encoder_key(real: str, entries, size: int, epochs: int, cap: int) -> str:
    """What the default encoder was trained from: the real images by name, size and modification time
    (an image rewritten under the same name trains another encoder), and the recipe."""
    from .resume import files_digest

    desc = {"real": os.path.abspath(real), "classes": [[e.name, len(e.files)] for e in entries], "size": size,
            "epochs": epochs, "max_per_class": cap, "recipe": ENCODER_RECIPE, "files": files_digest(entries)}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def default_encoder(real: str, entries, size: int, device: torch.device, *, epochs: int = 30,
                    max_per_class: int | None = None, cache_dir: str | None = None, progress: bool = True):
    """The cached ResNet-18 trained on ``entries`` of the real folder (train it if absent).

    At most ``max_per_class`` images a class (default 50,000 // classes, so the set
    stays on the device). Returns (module, info dict with the cache path).
    """
    from ..latents import cache_root

    cap = max_per_class or max(1, 50_000 // len(entries))
    path = os.path.join(cache_root(cache_dir or None), "encoders",
                        f"resnet18-{_encoder_key(real, entries, size, epochs, cap)}.pt")
    sweep_stale_temps(os.path.dirname(path))  # killed writes' temps (shared and unlocked: old ones only)
    info = {"kind": "resnet18 trained on the real folder", "cache": path, "epochs": epochs,
            "note": "the default encoder: not the papers' ImageNet-pretrained ResNet-18 "
                    "(--encoder imagenet-resnet18)",
            "max_per_class": cap, "recipe": ENCODER_RECIPE}
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        info["train_top1"] = ck.get("train_top1")
        return load_net(ck, what=f"encoder cache {path}"), {**info, "cached": True}
    x, y = load_images(entries, size, max_per_class=cap, progress=progress, desc="load real (encoder)")
    data = Split.place(x, y, device)
    hp = {k: ENCODER_RECIPE[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "batch_size")}
    hp["schedule"] = "multistep"
    run = train_net("resnet18", data, data, len(entries), size=size, epochs=epochs, hp=hp,
                    seed=ENCODER_RECIPE["seed"], device=device, eval_every=epochs, progress=progress,
                    desc="encoder resnet18", return_model=True)
    model = run["model"].cpu()
    buf = io.BytesIO()
    torch.save(net_checkpoint(model, train_top1=run["final"], real=os.path.abspath(real),
                              classes=[e.name for e in entries]), buf)
    atomic_write_bytes(path, buf.getvalue())
    return model, {**info, "cached": False, "train_top1": run["final"]}


# --------------------------------------------------------------------------- entry point
def compute_metrics(distilled: str, real: str, *, encoder=None, size: int | None = None, device: str = "auto",
                    k: int = 50, max_real_per_class: int | None = None, mmd_max_real: int = 5000,
                    encoder_epochs: int = 30, cache_dir: str | None = None, out_json: str | None = None,
                    fid_encoder=None, fid_resize: str | None = None, feature_cache: bool = True,
                    progress: bool = True) -> dict:
    """FID, L2, MMD, representativeness, diversity of ``distilled`` against ``real``.

    distilled: OUT/<class>/<i>.png; real: a real (training) folder holding every
    distilled class (others are ignored). encoder: None (the cached ResNet-18
    trained on ``real``), ``"imagenet-resnet18"`` (torchvision's ImageNet weights
    from torch.hub's cache: the papers' encoder), an nn.Module (copied: yours is left as it
    was) or a file for nets.load_net. size: None = the encoder's ``input_size`` if it has one (224
    for ImageNet nets), else 224 for images of >= 224 px, else their size. max_real_per_class: cap on
    the real images used a class (None: all; :func:`~.protocol.capped`'s seeded subset); mmd_max_real:
    real points in the MMD (random subset, seed 0). fid_encoder: None (FID on ``encoder``'s features, SPEC 7)
    or another encoder for the FID alone, e.g. ``"fid-inception"`` (FID's
    Inception-V3 at 299 px, as the papers' FID columns). fid_resize: the FID's images
    "crop" (short side resized, centre crop, as every other metric) or
    "squash" (the whole image resized to the FID encoder's size, PIL bilinear; with
    fid-inception the pixels are scaled (u - 128) / 128: the release's fid.py through
    torchmetrics); None: "squash" where ``fid_encoder`` is FID's Inception (``"fid-inception"``, or its
    weights' file: the papers' FID), else "crop" (also with no ``fid_encoder``: the FID on ``encoder``'s features).
    Besides SPEC 7's metrics the release's variants are reported
    (``l2_means``, ``mmd_release``, ``representativeness_minimax``, ``diversity_minimax``;
    see the module docstring), on the same features. feature_cache: keep the
    real images' features under ``cache_dir`` (see :class:`FeatureCache`) and reuse
    them in later runs against the same real folder. Writes ``out_json`` (default OUT/metrics.json) and appends a
    summary to OUT/manifest.json's "metrics" list if it exists. Returns that dict.
    """
    distilled, real = check_path(distilled, "--distilled"), check_path(real, "--real")
    check_counts((("--size", size), ("--k", k), ("--max-real-per-class", max_real_per_class),
                  ("--mmd-max-real", mmd_max_real), ("--encoder-epochs", encoder_epochs)))
    if cache_dir is not None:
        cache_dir = check_path(cache_dir, "--cache-dir")
    if size is not None and size > MAX_SIZE:
        raise ConfigError(f"--size {size}: must be <= {MAX_SIZE} px")
    if fid_resize is not None and fid_resize not in RESIZES:
        raise ConfigError(f"--fid-resize {fid_resize}: must be one of {', '.join(RESIZES)}")
    # before the encoder is trained, not after; the default lies in the distilled folder, which may be read-only
    flag = "--out-json" if out_json is not None else "--out-json (default)"   # ('' refused, not the default)
    out_json = out_json if out_json is not None else os.path.join(distilled, "metrics.json")
    if flag == "--out-json" or os.path.isdir(distilled):  # (a missing --distilled is named below, not as --out-json)
        check_out_file(out_json, flag, inputs={"--real": real, "--encoder": encoder, "--fid-encoder": fid_encoder}
                       if flag == "--out-json" else None)   # (the default: OUT's own)
    # (a file there: 'Not a directory' once the default encoder had trained)
    _check_cache_root(cache_dir, [*(["encoders"] if encoder is None else []), *(["features"] if feature_cache else [])])
    check_not_being_written(distilled)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    classes, dist, ref = match_classes(distilled, real, exact=False, what="real")
    with report_lock(out_json, "another metrics run"):
        fallback_size = default_size(native_size(dist))
        if encoder is None:
            size = size or fallback_size
        else:
            enc = load_net(encoder, num_classes=len(classes), size=size or fallback_size, what="--encoder")
            size = size or getattr(enc, "input_size", None) or fallback_size
            enc_info = _source_info(encoder)
        fid_info, fid_enc, fid_size = None, None, size
        if fid_encoder is not None:  # before the default encoder trains (minutes): a missing file stops the run at once
            fid_enc = load_net(fid_encoder, num_classes=len(classes), size=size, what="--fid-encoder")
            fid_size = getattr(fid_enc, "input_size", None) or size
        if fid_resize is None:  # by the --fid-encoder loaded: FID's Inception, named or given by its file
            fid_resize = "squash" if fid_encoder is not None and isinstance(fid_enc, FIDInceptionV3) else "crop"
        # each encoder given runs once on a small batch, as the feature passes will run it: one that does not fit
        # stops here, not with a traceback after the default encoder's training or the real set's features
        enc_what = f"--encoder {_source_label(encoder)}"
        if encoder is not None:
            check_encoder(enc, size, dev, enc_what)
            if fid_encoder is None and fid_resize == "squash" \
                    and callable(getattr(enc, "forward_features_uint8", None)):
                check_encoder(enc, size, dev, enc_what, "squash")    # (the FID's images go to its uint8 entry)
        fid_what = f"--fid-encoder {_source_label(fid_encoder)}" if fid_encoder is not None else enc_what
        if fid_encoder is not None:
            check_encoder(fid_enc, fid_size, dev, fid_what, fid_resize)
        if encoder is None:
            enc, enc_info = default_encoder(real, ref, size, dev, epochs=encoder_epochs, cache_dir=cache_dir,
                                            progress=progress)
        fid_enc = enc if fid_enc is None else fid_enc
        from ..latents import cache_root

        real_kw = dict(max_per_class=max_real_per_class, progress=progress,
                       cache_dir=cache_root(cache_dir or None) if feature_cache else None)
        real_stats = {"encoder": {}, "fid_encoder": {}}
        if encoder is None:
            enc_what = fid_what = f"the default encoder {enc_info['cache']}"
        fs, ys = extract_features(enc, dist, size, dev, progress=progress, desc="features distilled", what=enc_what)
        fr, yr = extract_features(enc, ref, size, dev, desc="features real", stats=real_stats["encoder"], what=enc_what,
                                  **real_kw)
        for labels, folder, side in ((ys, distilled, "distilled"), (yr, real, "real")):
            have = set(labels.unique().tolist())
            missing = [name for c, name in enumerate(classes) if c not in have]
            if missing:  # every image of the class unreadable (each was warned about): no metric can use it
                raise DataError(f"class {missing[0]} in {folder}: none of its {side} images could be read"
                                + (f" (nor those of {len(missing) - 1} more class(es))" if len(missing) > 1 else ""))
        for feats, folder, side in ((fs, distilled, "distilled"), (fr, real, "real")):
            if len(feats) < 2:  # a covariance needs two (was gaussian_stats' error, naming neither folder nor side)
                raise DataError(f"{folder}: the FID needs at least 2 readable {side} images, found {len(feats)}")
        if fid_encoder is not None or fid_resize != "crop":
            if fid_encoder is not None:
                fid_info = {**_source_info(fid_encoder), "size": fid_size, "resize": fid_resize}
            else:
                fid_info = {"kind": f"the --encoder ({enc_info['kind']})", "size": size, "resize": fid_resize}
            fid_value = fid(extract_features(fid_enc, ref, fid_size, dev, desc="FID features real", resize=fid_resize,
                                             stats=real_stats["fid_encoder"], what=fid_what, **real_kw)[0],
                            extract_features(fid_enc, dist, fid_size, dev, progress=progress, resize=fid_resize,
                                             desc="FID features distilled", what=fid_what)[0])
        else:
            fid_value = fid(fr, fs)
        mmd_real = fr
        if len(fr) > mmd_max_real:
            mmd_real = fr[torch.randperm(len(fr), generator=torch.Generator().manual_seed(0))[:mmd_max_real].to(dev)]
        mmd = mmd_rbf(mmd_real, fs)

        per_class, pooled = {}, {key: [] for key in ("l2", "l2_real_to_syn", "representativeness", "diversity")}
        for c, name in enumerate(classes):
            s, r = fs[ys == c], fr[yr == c]
            values = {"l2": nearest_distance(s, r), "l2_real_to_syn": nearest_distance(r, s),
                      "representativeness": representativeness(s, r, k), "diversity": diversity(s)}
            for key, v in values.items():
                pooled[key].append(v)
            per_class[name] = {"n_syn": len(s), "n_real": len(r), **{key: _mean(v) for key, v in values.items()},
                               "representativeness_k": min(k, len(r))}
        short = {name: v["n_real"] for name, v in per_class.items() if v["n_real"] < k}
        if short:  # their representativeness averages fewer neighbours: not comparable with the others'
            name, n = next(iter(short.items()))
            log.warning("representativeness: class %s has %d real images, fewer than --k %d, and averages over them%s "
                        "(per_class[...].representativeness_k)", name, n, k,
                        f" (and {len(short) - 1} more class(es))" if len(short) > 1 else "")
        means = {key: _mean(torch.cat(v)) for key, v in pooled.items()}
        mmd_rel = mmd_release(fs, fr) if len(fs) > 1 and len(fr) > 1 else None
        release = {"l2_means": l2_between_means(fs, fr), "mmd_release": mmd_rel and mmd_rel["mmd"],
                   "mmd2_release": mmd_rel and mmd_rel["mmd2"], "mmd_release_gamma": mmd_rel and mmd_rel["gamma"],
                   "representativeness_minimax": representativeness_minimax(fs, fr),
                   "diversity_minimax": diversity_minimax(fs)}
        enc_kind = (f"{enc_info['kind']} (the default encoder, not the papers' ImageNet ResNet-18)" if encoder is None
                    else f"--encoder {enc_info['kind']}")
        features = f"features of {enc_kind}; {describe_preprocess(enc, size)}"
        fid_features = (features if fid_info is None else
                        f"features of {fid_info['kind'] if fid_encoder is None else '--fid-encoder ' + fid_info['kind']}; "
                        f"{describe_preprocess(fid_enc, fid_size, fid_resize)}")
        sources = {"fid": fid_features, **{key: features for key in (
            "l2", "l2_real_to_syn", "mmd", "representativeness", "diversity", *release)}}
        result = {
            "format": "manifoldgd_fast.metrics/1", "distilled": os.path.abspath(distilled),
            "real": os.path.abspath(real),
            "classes": classes, "size": size, "n_syn": len(fs), "n_real": len(fr), "feature_dim": fs.shape[1],
            "encoder": enc_info, "fid": fid_value, "fid_encoder": fid_info,
            "real_features": {"cache": real_kw["cache_dir"], **{k: v for k, v in real_stats.items() if v}},
            "mmd2": mmd["mmd2"], "mmd": mmd["mmd"],
            "mmd_bandwidth": mmd["bandwidth"], "mmd_n_real": len(mmd_real), **means, "representativeness_k": k,
            "representativeness_k_min": min(v["representativeness_k"] for v in per_class.values()),
            **release, "mmd_release_n": mmd_rel and [mmd_rel["n_x"], mmd_rel["n_y"]],
            "fid_resize": fid_resize, "preprocess": describe_preprocess(enc, size),
            "metric_sources": sources, "definitions": DEFINITIONS,
            "per_class": per_class,
            "device": str(dev), "versions": {"torch": torch.__version__, "numpy": np.__version__},
            "time_s": round(time.perf_counter() - t0, 3),
        }
        result["file"] = os.path.abspath(out_json)
        man = os.path.join(os.path.abspath(distilled), MANIFEST)
        result["manifest"] = man if os.path.isfile(man) else None
        atomic_write_text(out_json, json.dumps(result, indent=2, sort_keys=True, default=str))
        # after the result: a distilled folder we cannot write loses only its summary
        result["manifest"] = append_manifest(os.path.abspath(distilled), "metrics", {
            "file": result["file"], "encoder": enc_info.get("cache", enc_info["kind"]), "size": size,
            "fid_encoder": fid_info and fid_info["kind"], "fid_resize": fid_resize,
            **{key: result[key] for key in ("fid", "mmd", "l2", "representativeness", "diversity", *release)}})
        return result


DEFINITIONS = {
    "fid": "SPEC 7: Frechet distance of Gaussians fitted to all real and all synthetic features",
    "l2": "SPEC 7: mean over synthetic images of the distance to the nearest real feature of the class",
    "l2_real_to_syn": "per real image, the distance to the nearest synthetic feature of the class, averaged",
    "mmd": "SPEC 7: biased MMD (V-statistic), RBF exp(-d^2 / 2 sigma^2), sigma = median pairwise distance",
    "representativeness": "MGD3: mean over synthetic images of the mean cosine to its k most similar real "
                          "images of its class",
    "diversity": "MGD3: mean over synthetic images of 1 - the largest cosine to another synthetic image of its class",
    "l2_means": "release kl.py: norm of mean(real) - mean(synthetic), all classes, raw features",
    "mmd_release": "release kl.py: sqrt(max(unbiased MMD^2, 0)), exp(-gamma d^2), gamma = 1 / median(d^2), "
                   "each set capped at 6000 random points",
    "representativeness_minimax": "release representativeness_diversity.py: min_i max_j cos(s_i, r_j), all classes",
    "diversity_minimax": "release representativeness_diversity.py: 1 - max_{i != j} cos(s_i, s_j), all classes",
}


def _source_info(source) -> dict:
    """What the metrics record of an encoder given by the user: its name or path, and the file a name stands for."""
    if not isinstance(source, str):
        return {"kind": f"module {type(source).__name__}"}
    return {"kind": source, **({"file": NAMED[source][0]()} if source in NAMED else {})}


def _source_label(source) -> str:
    """An encoder given by the user as errors name it: its path or name, or a module's type."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _check_cache_root(cache_dir, subs) -> None:
    """The cache root and its ``subs`` folders (``encoders``, ``features``) a run will write: each a folder or
    a path that can become one, checked before the work (ConfigError naming --cache-dir, or $MANIFOLDGD_CACHE
    where that gave the root)."""
    from ..config import check_out_dir, nearest_existing
    from ..latents import CACHE_ENV, cache_root

    if not subs:
        return
    root = cache_root(cache_dir or None)
    flag = "--cache-dir" if cache_dir else f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "--cache-dir (default)"
    for path in (root, *(os.path.join(root, s) for s in subs)):
        check_out_dir(path, flag)
    up = nearest_existing(os.path.abspath(root))
    if not os.path.isdir(up):
        raise ConfigError(f"{flag} {root}: {up} is a file, not a folder")


def _mean(v: torch.Tensor) -> float | None:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if len(v) else None
