"""manifoldgd_fast: diffusion dataset distillation with manifold-guided sampling.

Image folder in, small synthetic image folder out: ``distill(config)`` or the
``manifoldgd-fast`` command. As a guidance backend for another sampling loop:
``StepGuidance`` (one call per denoising step) and the ops ``manifold_correct`` /
``manifold_pull`` (``manifoldgd_fast.ops``, with their ``_ref`` twins).
"""
__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402
from .errors import BackendError, ConfigError, DataError, ManifoldGDError, ModelError  # noqa: E402


def distill(config):
    """Run a distillation; ``config`` is a DistillConfig or a dict of its fields. See pipeline.distill."""
    from .pipeline import distill as _distill

    return _distill(config)


def __getattr__(name):  # the backend API, imported when first asked for (it pulls in the ops and diffusers' pieces)
    if name == "StepGuidance":
        from .guidance import StepGuidance

        return StepGuidance
    if name in ("manifold_correct", "manifold_pull"):
        from . import ops

        return getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DistillConfig", "distill", "StepGuidance", "manifold_correct", "manifold_pull", "ManifoldGDError",
           "ConfigError", "DataError", "ModelError", "BackendError", "__version__"]
