"""The official formulation against the authors' released sampler itself, not a transcription of it.

The release (github.com/AyushRoy2001/ManifoldGD) is not vendored here: set ``MANIFOLDGD_RELEASE_REPO``
to a checkout of it (the folder holding its ``diffusion/`` package) to run these. Both samplers take
the same stand-in model (DiT's ``forward_with_cfg`` around an analytic Gaussian eps, a small conv
perturbation and a learned-range variance channel), and the release's global RNG and our per-sample
generator are seeded alike and drawn in the same order (the step noise, then the cloud), so the two
runs are comparable number for number over all 50 steps.
"""
import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch

from manifoldgd_fast.config import DistillConfig
from manifoldgd_fast.guidance import Guidance
from manifoldgd_fast.sampler import Sampling, denoise_step
from manifoldgd_fast.schedule import make_schedule

RELEASE = os.environ.get("MANIFOLDGD_RELEASE_REPO")
pytestmark = pytest.mark.skipif(
    not RELEASE or not os.path.isdir(os.path.join(RELEASE or "", "diffusion")),
    reason="set MANIFOLDGD_RELEASE_REPO to a checkout of the authors' release (AyushRoy2001/ManifoldGD) to compare "
           "with its own sampler; its code is not vendored here")

C, H, NULL, Y = 4, 8, 1000, 5
ABAR = np.cumprod(1 - np.linspace(1e-4, 2e-2, 1000))


class StandIn(torch.nn.Module):
    """eps of a Gaussian class-conditional latent law, a small conv perturbation, a learned-range channel."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.w = torch.nn.Parameter(torch.randn(8, C, 3, 3, generator=g) * 0.2)
        self.temb = torch.randn(1000, 8, generator=g) * 0.3
        self.cemb = torch.randn(NULL + 1, 8, generator=g) * 0.5

    def raw(self, x, t, y):
        ab = torch.as_tensor(ABAR, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        mu = self.cemb[y][:, :C, None, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * 0.25 + 1 - ab)
        pert = 0.05 * torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1))
        return torch.cat([eps + pert[:, :C], torch.tanh(pert[:, C:] * 10 + self.temb[t][:, C:, None, None])], 1)

    def forward_with_cfg(self, x, t, y, cfg_scale, **_):
        """DiT's forward_with_cfg (models.py of DiT and of the release): CFG on the first 3 eps channels."""
        half = x[: len(x) // 2]
        out = self.raw(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        mixed = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([mixed, mixed]), rest], 1)

    def forward(self, x, timestep=None, class_labels=None):   # the diffusers call our sampler makes
        return types.SimpleNamespace(sample=self.raw(x, timestep, class_labels))


@pytest.fixture(scope="module")
def release():
    sys.path.insert(0, RELEASE)
    try:
        yield importlib.import_module("diffusion")
    finally:
        sys.path.remove(RELEASE)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_official_loop_gives_the_release_latents(release, sampler, scale):
    model, seed, r, b = StandIn(), 0, 0.05, 0.2
    g0 = torch.Generator().manual_seed(77)
    z = torch.randn(1, C, H, H, generator=g0)
    mode = torch.randn(1, C, H, H, generator=g0) * 0.8

    diffusion = release.create_diffusion(("ddim" if sampler == "ddim" else "") + "50")
    kw = dict(clip_denoised=False, model_kwargs=dict(y=torch.tensor([Y, NULL]), cfg_scale=4.0), progress=False,
              device="cpu", mode_features=mode, stop_t=25, mode_guidance_scale=0.1, manifold_radius=r,
              manifold_guidance_scale=scale, density_bandwidth=b, tangent_dim=3, radius_warm_steps=5,
              radius_max_mult=2.0, radius_schedule="exp")
    torch.manual_seed(seed)
    with torch.no_grad():
        if sampler == "ddim":
            want = diffusion.ddim_sample_loop_with_mode_guidance(model.forward_with_cfg, (2, C, H, H),
                                                                 noise=torch.cat([z, z]), eta=0.0, **kw)[:1]
        else:
            want = diffusion.p_sample_loop_with_mode_guidance(model.forward_with_cfg, (2, C, H, H),
                                                              torch.cat([z, z]), **kw)[:1]

    cfg = DistillConfig(steps=50, t_stop=25, ipc=1, formulation="official", method="manifoldgd", sampler=sampler,
                        guidance_noise="generator", backend="reference", manifold_scale=scale, manifold_radius=r,
                        bandwidth=b).resolve(10)
    sched = make_schedule(50, sampler)
    g = torch.Generator().manual_seed(seed)          # the release's global RNG, drawn in its order
    guidance = Guidance(cfg, sched, mode, [g])
    run = Sampling(model, sched, NULL, cfg_scale=4.0, cfg_channels="3", formulation="official")
    x = z.clone()
    with torch.no_grad():
        for i in reversed(range(50)):
            if sampler == "ddpm":     # the release draws the step noise (both CFG halves) before the cloud
                noise = torch.randn(2, C, H, H, generator=g)[:1]
                x = denoise_step(run, i, x, torch.tensor([Y]), lambda q, n=noise: n, guidance=guidance)
            else:                     # its DDIM draws (unused at eta 0) noise after the cloud
                x = denoise_step(run, i, x, torch.tensor([Y]), torch.zeros_like, guidance=guidance)
                torch.randn(2, C, H, H, generator=g)
    assert want.abs().max() > 1.0   # a real trajectory, not a vanishing one
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
