"""The CUDA C++ extension's host side compiles, on a machine without a GPU.

``.ci/run`` compiles ``csrc/*.cu`` with nvcc for sm_80 / sm_90. What that leaves out is the
C++ binding ``kernels/cuda_ext.py`` hands to ``torch.utils.cpp_extension.load_inline`` at run
time on a GPU machine; a typo there would only show on the first GPU run (and quietly fall back
to the Triton eigensolver). So it is compiled here, syntax and types, against this torch's headers
with the host compiler, as load_inline would (plus the pybind11 module it generates).
"""
import os
import shutil
import subprocess
import sysconfig

import pytest

CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++ / g++) on this machine")
def test_cuda_ext_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    from manifoldgd_fast.kernels import cuda_ext

    src = tmp_path / "binding.cpp"
    src.write_text(cuda_ext._BINDING + '\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sym_eig", &sym_eig); }\n')
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=manifoldgd_sym_eig",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_cuda_ext_declares_the_launcher_csrc_defines():
    """The binding's extern "C" declaration and csrc/sym_eig.cu's definition have the same parameter list
    (an extern "C" mismatch links fine and fails at run time)."""
    import re

    from manifoldgd_fast.kernels import cuda_ext

    with open(cuda_ext._SRC, encoding="utf-8") as f:
        cu = f.read()

    def params(text):
        m = re.search(r'extern "C" int mgd_sym_eig_f32_launch\(([^)]*)\)', text)
        assert m, "no extern \"C\" mgd_sym_eig_f32_launch(...)"
        return " ".join(m.group(1).split())

    assert params(cuda_ext._BINDING) == params(cu)
