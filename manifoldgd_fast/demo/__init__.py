"""The package's own small world: scikit-learn's digits and a DiT + VAE trained on them.

Real DiT-XL/2 and SD-VAE checkpoints cannot be downloaded at run time, so the
package ships a complete, tiny stand-in that runs end to end on a CPU:

- :mod:`manifoldgd_fast.demo.digits` turns scikit-learn's bundled
  ``load_digits`` (1,797 8x8 images, 10 classes; no download) into 32x32 RGB
  image folders ``<cache>/digits/{train,test}/<class>/<i>.png``.
- :mod:`manifoldgd_fast.demo.train` trains a small ``AutoencoderKL``
  (32x32x3 -> 4x8x8) and a small class-conditional ``DiTTransformer2DModel``
  (learned sigma, null class 10) on the train split, writes them to
  ``manifoldgd_fast/weights/digits`` and, with ``--check``, measures how often a
  classifier trained on real digits recognises plain-DiT samples.
- :func:`manifoldgd_fast.shipped.shipped_model_dir` gives the shipped folder,
  which loads through :func:`manifoldgd_fast.models.load_dit` / ``load_vae``.
"""
from .digits import DIGIT_CLASSES, default_cache_dir, digits_arrays, export_digits

__all__ = ["DIGIT_CLASSES", "default_cache_dir", "digits_arrays", "export_digits"]
