"""The CUDA C++ extension on a machine without a GPU: its host side compiles, and its kernel runs.

``.ci/run`` compiles ``csrc/*.cu`` with nvcc for sm_80 / sm_90. What that leaves out is the
C++ binding ``manifoldgd_fast/kernels/cuda_ext.py`` hands to ``torch.utils.cpp_extension.load_inline`` at run
time on a GPU machine; a typo there would only show on the first GPU run (and quietly fall back
to the Triton eigensolver). So it is compiled here, syntax and types, against this torch's headers
with the host compiler, as load_inline would (plus the pybind11 module it generates).

The kernel itself runs here too, emulated: ``tests/cuda_host/cuda_runtime.h`` makes each CUDA
thread a host thread and ``__syncthreads`` a barrier, so the block-parallel Jacobi (its round
structure, its shared-memory updates and their synchronisation) is checked against float64.
The device's own float intrinsics (``rsqrtf``) and scheduling stay for a GPU to check.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import torch

import pytest
from conftest import check_eig, check_eig_extremes, eig_test_matrices

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

    with open(cuda_ext.source_path(), encoding="utf-8") as f:
        cu = f.read()

    def params(text):
        m = re.search(r'extern "C" int mgd_sym_eig_f32_launch\(([^)]*)\)', text)
        assert m, "no extern \"C\" mgd_sym_eig_f32_launch(...)"
        return " ".join(m.group(1).split())

    assert params(cuda_ext._BINDING) == params(cu)


def _cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME, /usr/local/cuda, else two folders above the real nvcc (not a wrapper's)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


@pytest.mark.skipif(torch.version.cuda is None,
                    reason="this torch is a CPU build: load_inline cannot build a CUDA extension against it")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_ext_builds_links_and_imports_with_load_inline(tmp_path):
    """What the first CUDA eigen-step does on a GPU machine, without the GPU: cuda_ext.build() compiles the
    binding and sym_eig.cu with torch's load_inline (nvcc, the host compiler), links them against torch's CUDA
    libraries and imports the module. Architectures from TORCH_CUDA_ARCH_LIST (sm_90 where unset), since no
    device says them; in a child process, so that this process's extension state is untouched."""
    env = {**os.environ, "CUDA_HOME": _cuda_home(), "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    code = ("import sys; from manifoldgd_fast.kernels import cuda_ext; "
            "m = cuda_ext.build(build_directory=sys.argv[1]); print(m.__file__); print(callable(m.sym_eig))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    so, ok = proc.stdout.strip().splitlines()[-2:]
    assert os.path.isfile(so) and so.startswith(str(tmp_path)) and ok == "True", proc.stdout


_HARNESS = r"""
#include <cstdio>
#include <thread>
#include <vector>

#include "sym_eig_kernel.cu"

// stdin: int32 batch, n, max_sweeps; float32 tol; batch*n*n float32 A. stdout: w (batch*n), V (batch*n*n).
int main() {
  int hdr[3];
  float tol;
  if (fread(hdr, sizeof(int), 3, stdin) != 3 || fread(&tol, sizeof(float), 1, stdin) != 1) return 2;
  const int batch = hdr[0], n = hdr[1], max_sweeps = hdr[2];
  std::vector<float> A(size_t(batch) * n * n), w(size_t(batch) * n), V(size_t(batch) * n * n);
  if (fread(A.data(), sizeof(float), A.size(), stdin) != A.size()) return 2;
  std::barrier<> block(kThreads);
  mgd_block_barrier = &block;
  for (int b = 0; b < batch; ++b) {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        mgd_sym_eig_f32(A.data(), w.data(), V.data(), n, max_sweeps, tol);
      });
    for (auto& th : threads) th.join();
  }
  fwrite(w.data(), sizeof(float), w.size(), stdout);
  fwrite(V.data(), sizeof(float), V.size(), stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def emulated_sym_eig(tmp_path_factory):
    """csrc/sym_eig.cu's kernel (its <<<>>> launcher cut off) built for the host against the emulation header."""
    if CXX is None:
        pytest.skip("no host C++ compiler (c++ / g++) on this machine")
    import re

    from manifoldgd_fast.kernels import cuda_ext

    with open(cuda_ext.source_path(), encoding="utf-8") as f:
        cu = f.read()
    cut = re.search(r'^extern "C" int mgd_sym_eig_f32_launch', cu, flags=re.M)
    assert cut, "csrc/sym_eig.cu: no host launcher where expected"
    d = tmp_path_factory.mktemp("sym_eig_host")
    (d / "probe.cpp").write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    probe = subprocess.run([CXX, "-std=c++20", "-pthread", str(d / "probe.cpp"), "-o", str(d / "probe")],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"the host compiler has no C++20 std::barrier: {probe.stderr.strip().splitlines()[-1:]}")
    (d / "sym_eig_kernel.cu").write_text(cu[:cut.start()])
    (d / "main.cpp").write_text(_HARNESS)
    exe = d / "sym_eig_host"
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [CXX, "-std=c++20", "-O2", "-pthread", "-w", f"-I{os.path.join(here, 'cuda_host')}", f"-I{d}",
           str(d / "main.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def run(A: torch.Tensor, max_sweeps: int, tol: float):
        B, n, _ = A.shape
        stdin = (np.array([B, n, max_sweeps], np.int32).tobytes() + np.array([tol], np.float32).tobytes()
                 + A.float().numpy().tobytes())
        out = subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        flat = np.frombuffer(out.stdout, np.float32)
        assert flat.size == B * n + B * n * n, flat.size
        return torch.from_numpy(flat[:B * n].reshape(B, n).copy()), torch.from_numpy(flat[B * n:].reshape(B, n, n).copy())

    return run


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33, 64])
def test_cuda_sym_eig_kernel_emulated_on_the_host(emulated_sym_eig, n):
    """The CUDA C++ Jacobi kernel, run by the host emulation, against float64: the same matrices and
    bounds as the Triton solver's test (ill-conditioned, repeated, indefinite; odd n pads to even)."""
    from manifoldgd_fast.kernels.sym_eig import MAX_SWEEPS, TOL

    if n < 4:   # too small for the 3-fold repeated eigenvalue: a random symmetric matrix, and a zero one
        X = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        A = torch.stack([X + X.T, torch.zeros(n, n, dtype=torch.float64)])
        w, V = emulated_sym_eig(A, MAX_SWEEPS, TOL)
        wr, _ = torch.linalg.eigh(A)
        torch.testing.assert_close(w.double(), wr.flip(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(V.double() @ torch.diag_embed(w.double()) @ V.double().transpose(1, 2), A,
                                   atol=1e-5, rtol=1e-5)
        return
    A = eig_test_matrices(n, torch.Generator().manual_seed(n))
    w, V = emulated_sym_eig(A, MAX_SWEEPS, TOL)
    check_eig(w, V, A, 2e-6 if n <= 16 else 5e-6)



def test_cuda_sym_eig_kernel_rescales_huge_and_tiny_matrices_and_propagates_nan(emulated_sym_eig):
    from manifoldgd_fast.kernels.sym_eig import MAX_SWEEPS, TOL

    check_eig_extremes(lambda A: emulated_sym_eig(A, MAX_SWEEPS, TOL), 10, 2e-6)
