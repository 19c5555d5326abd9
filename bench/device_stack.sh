#!/usr/bin/env bash
# The test suite under the GPU image's Python stack, on this CPU machine (no GPU needed).
#
# The GPU machines run their own image, not our pins: Python 3.12, torch 2.11 (a CUDA 13 build), Triton 3.6,
# transformers 5.17, huggingface_hub 1.33, numpy 2.5.2, safetensors 0.8.0, tokenizers 0.23.2 (the device
# library's KINDS.md, read 2026-11-17; diffusers is carried there as the wheel of our own version). A GPU
# session is minutes long: what breaks under that stack should break here first. torch's CUDA build runs on
# the CPU, and with nvcc here it also builds the CUDA C++ extension (tests/test_csrc.py).
#
#     bash bench/device_stack.sh                 # the whole suite (about 7 minutes on 2 cores)
#     bash bench/device_stack.sh tests/test_sd.py -k prompts
#
# The venv ($VENV, default /tmp/device-stack) is made once: about 5 GB, a minute from the package registry.
# The package is not installed into it (an install would rewrite the repo's egg-info, which other
# environments' editable installs read): the tree is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/device-stack}
if [ ! -x "$VENV/bin/python" ]; then
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" 2>/dev/null; then
    python3.12 -m venv "$VENV"
  elif command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12 pyenv exec python -c "" 2>/dev/null; then
    PYENV_VERSION=3.12 pyenv exec python -m venv "$VENV"
  else
    echo "device_stack: no Python 3.12 (python3.12, or pyenv's 3.12)" >&2; exit 2
  fi
  diffusers=$(python3 -c "import diffusers; print(diffusers.__version__)" 2>/dev/null || echo 0.42.1)
  # setup.py's requires and its dev extra, at the image's versions where it has them
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "diffusers==$diffusers" transformers==5.17.0 \
      huggingface_hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tokenizers==0.23.2 \
      tqdm pillow pyyaml scikit-learn pytest pytest-benchmark hypothesis wheel nvidia-cuda-nvrtc
fi
"$VENV/bin/python" -c "import sys, torch, triton, diffusers, transformers, huggingface_hub, numpy
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| diffusers',
      diffusers.__version__, '| transformers', transformers.__version__, '| huggingface_hub',
      huggingface_hub.__version__, '| numpy', numpy.__version__)"
[ $# -ge 1 ] || set -- tests
# CI=0 unless set: there the kernel-interpreter test skips saying why (Triton 3.6's interpreter cannot run our
# loops beside NumPy 2.5); CI=true makes that a failure, as on CI, where it is the kernels' only check
CI=${CI:-0} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "$@"
