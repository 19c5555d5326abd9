"""manifoldgd_fast: diffusion dataset distillation with manifold-guided sampling.

Image folder in, small synthetic image folder out: ``distill(config)`` or the
``manifoldgd-fast`` command. The guidance ops are in ``manifoldgd_fast.ops``.
"""
__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402
from .errors import BackendError, ConfigError, DataError, ManifoldGDError, ModelError  # noqa: E402


def distill(config):
    """Run a distillation; ``config`` is a DistillConfig or a dict of its fields. See pipeline.distill."""
    from .pipeline import distill as _distill

    return _distill(config)


__all__ = ["DistillConfig", "distill", "ManifoldGDError", "ConfigError", "DataError", "ModelError",
           "BackendError", "__version__"]
