"""CPU pytest-benchmark of the guidance ops: reference (k x k Gram) vs the naive D x D covariance + eigh.

    python -m pytest bench/bench_ops.py --benchmark-only --benchmark-columns=median,iqr,rounds

Figures go to bench/RESULTS.md. The naive path is what the released sampler
does per sample (a D x D covariance and torch.linalg.eigh); the Gram trick is
what the reference op does. Each row's extra_info has ``GB/s``: the bytes of
the cloud / patch (read at least once) over the median time
(``--benchmark-columns=median`` plus ``--benchmark-json`` shows it).
"""
import pytest
import torch

from manifoldgd_fast import ops

torch.set_num_threads(2)


def naive_manifold_pull(x, cloud, k=12, d=3, scale=0.1, bandwidth=0.1, ridge=1e-5):
    """The released code's per-sample loop, D x D covariance + eigh."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        dist = torch.cdist(xb, cloud[b])
        _, idx = torch.topk(dist, k, largest=False, dim=1)
        nb = cloud[b][idx[0]]
        mu = nb.mean(0, keepdim=True)
        C = nb - mu
        cov = C.T @ C / (k - 1) + ridge * torch.eye(C.shape[1])
        e, V = torch.linalg.eigh(cov)
        U = V[:, torch.argsort(e, descending=True)[:d]]
        to_mu = xb - mu
        n = to_mu - to_mu @ U @ U.T
        out.append(scale * torch.tanh(dist.min() / bandwidth) * (-n / (n.norm() + 1e-8)))
    return torch.cat(out)


CASES = [(4, 300, 256), (4, 300, 1024)]


def _record_gbps(benchmark, rows: torch.Tensor) -> None:
    """extra_info["GB/s"]: the (B, N, D) rows' bytes over the median time of the rounds just run."""
    benchmark.extra_info["GB/s"] = round(rows.numel() * rows.element_size() / benchmark.stats.stats.median / 1e9, 3)


@pytest.mark.parametrize("B,N,D", CASES)
def test_manifold_pull_reference(benchmark, B, N, D):
    x, cloud = torch.randn(B, D), torch.randn(B, N, D)
    benchmark.extra_info.update(B=B, N=N, D=D, path="reference (Gram)")
    benchmark(ops.manifold_pull, x, cloud, backend="reference")
    _record_gbps(benchmark, cloud)


@pytest.mark.parametrize("B,N,D", CASES)
def test_manifold_pull_naive(benchmark, B, N, D):
    x, cloud = torch.randn(B, D), torch.randn(B, N, D)
    benchmark.extra_info.update(B=B, N=N, D=D, path="naive D x D eigh")
    benchmark.pedantic(naive_manifold_pull, (x, cloud), rounds=3, iterations=1)
    _record_gbps(benchmark, cloud)


@pytest.mark.parametrize("B,M,D", [(4, 500, 1024)])
def test_manifold_correct_reference(benchmark, B, M, D):
    x, patch, g = torch.randn(B, D), torch.randn(B, M, D), torch.randn(B, D)
    benchmark.extra_info.update(B=B, M=M, D=D)
    res = benchmark(ops.manifold_correct, x, patch, g, k=10, d=3, backend="reference")
    _record_gbps(benchmark, patch)
    assert res.shape == (B, D)
