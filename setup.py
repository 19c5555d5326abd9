import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """A wheel carries csrc/*.cu inside the package (manifoldgd_fast/csrc/), where kernels/cuda_ext.py
    finds the CUDA C++ source when the repo's csrc/ is not beside the package (a non-editable install)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the repo's csrc/ itself
            return
        dst = os.path.join(self.build_lib, "manifoldgd_fast", "csrc")
        self.mkpath(dst)
        for src in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "*.cu"))):
            self.copy_file(src, os.path.join(dst, os.path.basename(src)))


requires = [
    "torch>=2.4",
    "diffusers>=0.30",
    "numpy",
    "safetensors",
    "tqdm",
    "pillow",
    "pyyaml",
    "scikit-learn",  # load_digits: the embedded demo's data ships inside scikit-learn (no download)
]
if sys.platform.startswith("linux"):
    requires.append("triton")

setup(
    name="manifoldgd-fast",
    version="0.1.0",
    description="Fast diffusion dataset distillation with manifold-guided sampling (ManifoldGD), MGD3 and CGS",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the Triton kernels live in manifoldgd_fast/kernels/: a top-level `kernels` package in the repo root would
    # shadow Hugging Face's `kernels` (a transformers >= 5 dependency) whenever the root is on sys.path
    packages=["manifoldgd_fast", "manifoldgd_fast.kernels", "manifoldgd_fast.eval", "manifoldgd_fast.demo"],
    package_data={"manifoldgd_fast": ["classlists/*.txt", "weights/digits/SHA256SUMS.json",
                                      "weights/digits/*/config.json", "weights/digits/*/*.safetensors"]},
    install_requires=requires,
    extras_require={
        "cuda": ["cupy-cuda12x", "nvtx"],
        "sd": ["transformers>=4.40"],  # the Stable Diffusion backbone's CLIP text encoder and tokenizer
        # wheel: tests/test_packaging.py builds a wheel in this environment, and setuptools < 70.1 (a
        # Python 3.11 venv's own) has no bdist_wheel without it
        # nvidia-cuda-nvrtc: NVRTC for tests/test_csrc.py's check that csrc/ compiles the way cuda_ext does
        # without nvcc (torch's CUDA wheels bring it anyway)
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.40", "wheel",
                "nvidia-cuda-nvrtc; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["manifoldgd-fast=manifoldgd_fast.cli:console"]},
    cmdclass={"build_py": BuildPy},
)
