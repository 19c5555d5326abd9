import os
import random

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
# threads slow every other process (and test) several-fold. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_without_triton(body: str, old_version: str | None = None) -> None:
    """Run ``body`` in a fresh Python where ``import triton`` fails (and no TRITON_INTERPRET); it must
    print 'ok' last. ``torch`` is imported for it. ``old_version``: ``import triton`` gives a bare module
    of that version instead (a Triton too old for the kernels)."""
    import subprocess
    import sys

    stub = "None"
    if old_version is not None:
        stub = f"types.ModuleType('triton'); sys.modules['triton'].__version__ = {old_version!r}"
    code = f"import sys, types; sys.modules['triton'] = {stub}\nimport torch\n" + body
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET is set (Triton kernels then run on CPU tensors, interpreted)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")  # kernels.INTERPRET's rule


def requires_cuda():
    """The one place GPU-only tests skip, with the reason."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores it is ~10x faster than two under contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def anisotropic(B, M, D, dtype, seed):
    """(x (B, D), rows (B, M, D), g (B, D)) on the CPU: columns scaled 3 -> 0.1, so the top-d subspace stands apart."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, D)
    rows = (torch.randn(B, M, D, generator=gen) * scales).to(dtype)
    x = (torch.randn(B, D, generator=gen) * scales).to(dtype)
    g = torch.randn(B, D, generator=gen).to(dtype)
    return x, rows, g


def eig_test_matrices(n, gen):
    """(4, n, n) float64 symmetric: Wishart, ill-conditioned (cond 1e12), a 3-fold repeated eigenvalue, indefinite."""
    X = torch.randn(n, n, generator=gen, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    wishart = X @ X.T
    ill = Q @ torch.diag(torch.logspace(0, -12, n, dtype=torch.float64)) @ Q.T                  # cond 1e12
    rep = Q @ torch.diag(torch.tensor([3.0] * min(3, n) + [1e-3] * (n - min(3, n)), dtype=torch.float64)) @ Q.T
    indef = (X + X.T) / 2
    return torch.stack([wishart, ill, rep, indef])


def check_eig(w, V, A, rtol, rep=2):
    """Eigenvalues within rtol |A|_2 of float64; residual |A v - w v| and V^T V - I small; the repeated
    eigenvalue's invariant subspace (3 x 3.0) matches float64's as a projector."""
    from manifoldgd_fast import ops

    wr, Vr = ops.sym_eig_ref(A)
    nrm = wr.abs().max(1).values
    assert float(((w.double() - wr).abs().max(1).values / nrm).max()) < rtol
    Vd = V.double()
    res = (A @ Vd - Vd * w.double()[:, None, :]).norm(dim=1).max(1).values / nrm
    assert float(res.max()) < 10 * rtol
    n = A.shape[1]
    assert float((Vd.transpose(1, 2) @ Vd - torch.eye(n, dtype=torch.float64)).abs().max()) < 10 * rtol
    P = Vd[rep, :, :3] @ Vd[rep, :, :3].T
    Pr = Vr[rep, :, :3] @ Vr[rep, :, :3].T
    assert float((P - Pr).abs().max()) < 10 * rtol


class MeanColour(torch.nn.Module):
    """A fixed encoder: per-channel means and stds (6 features)."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """$MANIFOLDGD_CACHE in this test's folder: caches on by default (encoders, real-image
    features) are written there, not to ~/.cache."""
    monkeypatch.setenv("MANIFOLDGD_CACHE", str(tmp_path / "mgd-cache"))
    return tmp_path / "mgd-cache"


def make_image_folder(root, classes, per_class, size=20, seed=0):
    """Class folders of small PNG/JPEG images, each class a different colour pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        base = np.zeros((size, size, 3), np.float32)
        base[..., ci % 3] = 200
        for j in range(per_class):
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            ext = ".png" if j % 2 == 0 else ".JPG"
            Image.fromarray(img).save(os.path.join(root, name, f"img{j:03d}{ext}"))
    return str(root)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny image folder (3 classes x 12 images) and a tiny DiT + VAE in a pipeline-layout folder."""
    from manifoldgd_fast.models import build_dit, build_vae, save_pretrained_folder, tiny_dit_config, tiny_vae_config

    root = tmp_path_factory.mktemp("world")
    data = make_image_folder(root / "data", ["apple", "banana", "cherry"], 12, size=20)
    model_dir = root / "model"
    save_pretrained_folder(build_dit(tiny_dit_config(num_classes=3, sample_size=8), seed=0), str(model_dir / "transformer"))
    save_pretrained_folder(build_vae(tiny_vae_config(sample_size=16), seed=0), str(model_dir / "vae"))
    return {"root": str(root), "data": data, "model": str(model_dir)}


# --------------------------------------------------------------------------- torchvision's ResNet-18
def tv_resnet18_state_dict(classes: int, seed: int, prefix: str = "") -> dict:
    """A random state dict in torchvision's ``resnet18`` layout (key names and shapes written
    here from torchvision's architecture, not from our ResNet), He-initialised, with random
    batch-norm running statistics so that eval-mode normalisation is not the identity."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name, c):
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[name + ".num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for i, c in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            b = f"layer{i}.{j}"
            conv(b + ".conv1", c, cin if j == 0 else c, 3)
            bn(b + ".bn1", c)
            conv(b + ".conv2", c, c, 3)
            bn(b + ".bn2", c)
            if j == 0 and i > 1:
                conv(b + ".downsample.0", c, cin, 1)
                bn(b + ".downsample.1", c)
        cin = c
    sd["fc.weight"] = torch.randn(classes, 512, generator=g) / 512 ** 0.5
    sd["fc.bias"] = 0.1 * torch.randn(classes, generator=g)
    return {prefix + k: v for k, v in sd.items()}


def tv_resnet18_forward(sd: dict, x: torch.Tensor):
    """torchvision's ResNet-18 forward in eval mode, written functionally: (features, logits)."""
    def bn(name, h):
        return F.batch_norm(h, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], training=False, eps=1e-5)

    h = F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    h = F.max_pool2d(h, 3, 2, 1)
    for i in range(1, 5):
        for j in range(2):
            b, stride = f"layer{i}.{j}", 2 if (i > 1 and j == 0) else 1
            out = F.relu(bn(b + ".bn1", F.conv2d(h, sd[b + ".conv1.weight"], stride=stride, padding=1)))
            out = bn(b + ".bn2", F.conv2d(out, sd[b + ".conv2.weight"], padding=1))
            skip = bn(b + ".downsample.1", F.conv2d(h, sd[b + ".downsample.0.weight"], stride=stride)) \
                if b + ".downsample.0.weight" in sd else h
            h = F.relu(out + skip)
    feats = h.mean(dim=(2, 3))
    return feats, F.linear(feats, sd["fc.weight"], sd["fc.bias"])


def check_eig_extremes(solve, n, rtol):
    """``solve(A (B, n, n) float64) -> (w, V)`` on matrices scaled by 1e30 and 1e-30 (|A|_F^2 overflows /
    underflows fp32 unless the solver rescales) and to a largest entry of 2^59 (at n = 64 |A|_F^2 overflowed
    below the old 2^60 threshold) and 2^-59, within ``rtol`` of float64; a diagonal near FLT_MAX (where
    a + b overflows) exactly; a NaN or an inf in one matrix makes all of its outputs NaN and none of its neighbour's."""
    A = eig_test_matrices(n, torch.Generator().manual_seed(n))[[0, 3]]  # Wishart, indefinite
    amax = float(A.abs().max())
    for s in (1e30, 1e-30, 2.0 ** 59 / amax, 2.0 ** -59 / amax):
        w, V = solve(A * s)
        wr = torch.linalg.eigvalsh(A).flip(-1)
        err = ((w.double() / s - wr).abs().max(1).values / wr.abs().max(1).values).max()
        assert float(err) < rtol, (s, float(err))
        Vd = V.double()
        assert float((Vd.transpose(1, 2) @ Vd - torch.eye(n, dtype=torch.float64)).abs().max()) < 10 * rtol, s
    d = torch.linspace(3e38, 1e37, n, dtype=torch.float64)     # diagonal: exact eigenpairs near FLT_MAX
    w, V = solve(torch.diag_embed(d).expand(2, n, n))
    assert float((w.double() / d - 1).abs().max()) < rtol and torch.equal(V[0].abs(), torch.eye(n)), w
    w1, V1 = solve(A[1:])
    for x in (float("nan"), float("inf")):
        bad = A.clone()
        bad[0, 1, 2] = bad[0, 2, 1] = x
        w, V = solve(bad)
        assert bool(w[0].isnan().all()) and bool(V[0].isnan().all()), x
        assert torch.equal(w[1], w1[0]) and torch.equal(V[1], V1[0])


@pytest.fixture(scope="session")
def sd_world(tmp_path_factory):
    """3 classes x 12 images and a tiny SD folder (UNet on 4x8x8 latents, VAE 16 px <-> 4x8x8)."""
    pytest.importorskip("transformers", reason="the Stable Diffusion path needs transformers (CLIP; in the dev extra)")
    from sd_helpers import CLASSES

    from manifoldgd_fast import sd as SD

    root = tmp_path_factory.mktemp("sdworld")
    data = make_image_folder(root / "data", CLASSES, 12, size=20)
    model = SD.build_tiny_sd_folder(str(root / "sd"), sample_size=8, vae_sample_size=16)
    return {"root": str(root), "data": data, "model": model, "cache": str(root / "cache")}


@pytest.fixture(scope="session")
def sd_denoiser(sd_world):
    """The tiny SD folder's denoiser with two prompts (labels 0, 1)."""
    from manifoldgd_fast import sd as SD

    return SD.load_sd_denoiser(sd_world["model"], {0: "a photo of a cherry", 1: "a photo of a dog"})
