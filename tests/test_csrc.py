"""The CUDA C++ extension on a machine without a GPU: its host side compiles, and its kernel runs.

``.ci/run`` compiles ``csrc/*.cu`` with nvcc for sm_80 / sm_90. What that leaves out is the
C++ binding ``manifoldgd_fast/kernels/cuda_ext.py`` hands to ``torch.utils.cpp_extension.load_inline`` at run
time on a GPU machine; a typo there would only show on the first GPU run (and quietly fall back
to the Triton eigensolver). So it is compiled here, syntax and types, against this torch's headers
with the host compiler, as load_inline would (plus the pybind11 module it generates).

The kernel itself runs here too, emulated: ``tests/cuda_host/cuda_runtime.h`` makes each CUDA
thread a host thread, ``__syncthreads`` a barrier over the block and a warp shuffle a barrier over
its warp, so the block-parallel Jacobi (its round structure and shared-memory updates) is checked
against float64. Its synchronisation is checked by running the threads also one at a time between
barriers, lowest id first and highest id first: a race gives other bits in one order, and a barrier
not every thread reaches stops the run at once (a mutant of each is caught here). The device's own
float intrinsics (``rsqrtf``), its memory model and real warp scheduling stay for a GPU to check
(with ``compute-sanitizer --tool racecheck,synccheck``).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import torch

import pytest
from conftest import check_eig, check_eig_extremes, eig_test_matrices, requires_cuda

CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _torch_cxx_std() -> str:
    """The C++ standard torch's own extension builds pass (load_inline adds it): torch 2.14's headers need
    C++20, older ones compile as C++17 too."""
    import torch.utils.cpp_extension as ce

    with open(ce.__file__) as f:
        return "c++20" if "'c++20'" in f.read() else "c++17"


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++ / g++) on this machine")
def test_cuda_ext_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    from manifoldgd_fast.kernels import cuda_ext

    src = tmp_path / "binding.cpp"
    src.write_text(cuda_ext._BINDING + '\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sym_eig", &sym_eig); }\n')
    cmd = [CXX, f"-std={_torch_cxx_std()}", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=manifoldgd_sym_eig",
           *(f"-I{p}" for p in include_paths()), f"-I{sysconfig.get_paths()['include']}", str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_cuda_ext_declares_the_launcher_csrc_defines():
    """The binding's extern "C" declaration and csrc/sym_eig.cu's definition have the same parameter list
    (an extern "C" mismatch links fine and fails at run time)."""
    from manifoldgd_fast.kernels import cuda_ext

    cu = cuda_ext.source()

    def params(text):
        m = re.search(r'extern "C" int mgd_sym_eig_f32_launch\(([^)]*)\)', text)
        assert m, "no extern \"C\" mgd_sym_eig_f32_launch(...)"
        return " ".join(m.group(1).split())

    assert params(cuda_ext._BINDING) == params(cu)
    assert 'extern "C" const char* mgd_cuda_error_string(int err)' in cu
    assert 'extern "C" const char* mgd_cuda_error_string(int err);' in cuda_ext._BINDING


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


def _libnvrtc() -> str | None:
    """NVRTC's shared library: the CUDA toolkit's, else a pip package's (nvidia-cuda-nvrtc), else the loader's."""
    import ctypes.util
    import glob
    import site

    home = _cuda_home()
    roots = [os.path.join(home, d) for d in ("lib64", "lib")] if home else []
    roots += [os.path.join(p, "nvidia", "*", "lib") for p in site.getsitepackages()]
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "libnvrtc.so*")))
        found = [f for f in found if "builtins" not in f and ".alt." not in f]
        if found:
            return found[0]
    return ctypes.util.find_library("nvrtc")


def _nvrtc_compile(source: str, options: list[str]) -> tuple[int, str, str]:
    """(result, log, ptx) of NVRTC on ``source``, through its C API (no CuPy needed)."""
    import ctypes

    lib = ctypes.CDLL(_libnvrtc())
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"sym_eig.cu", 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    result = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if result == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace"), ptx.decode(errors="replace")


@pytest.mark.skipif(_libnvrtc() is None, reason="no NVRTC library (CUDA toolkit or nvidia-cuda-nvrtc) here")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_sym_eig_source_compiles_under_nvrtc_to_the_kernel_alone(arch):
    """cuda_ext's way without nvcc (CuPy's RawModule) hands sym_eig.cu to NVRTC, which has no host compiler
    and no cuda_runtime.h: the file must compile there (its header and host launcher guarded by
    __CUDACC_RTC__) to the extern "C" kernel cuda_ext.KERNEL, and nothing else."""
    from manifoldgd_fast.kernels import cuda_ext

    src = cuda_ext.source()
    result, log, ptx = _nvrtc_compile(src, [f"--gpu-architecture={arch}", "-std=c++17"])
    assert result == 0, log[-4000:]
    entries = re.findall(r"\.entry\s+(\w+)", ptx)
    assert entries == [cuda_ext.KERNEL], entries


def test_nvrtc_launch_matches_the_cpp_launcher():
    """The Python launch of the NVRTC way makes the C++ launcher's: a block of kThreads threads per matrix, the
    kernel's name and parameter list, and its scalars at the kernel's widths (a Python int would go as 8
    bytes where the kernel reads an int)."""
    import numpy as np

    from manifoldgd_fast.kernels import cuda_ext

    cu = cuda_ext.source()
    assert int(re.search(r"constexpr int kThreads = (\d+);", cu).group(1)) == cuda_ext.THREADS
    assert int(re.search(r"constexpr int kMaxN = (\d+);", cu).group(1)) == cuda_ext._MAX_N
    assert re.search(r"mgd_sym_eig_f32<<<batch, kThreads, 0, ", cu)
    m = re.search(r'extern "C" __global__ void __launch_bounds__\(kThreads\)\s*(\w+)\(([^)]*)\)', cu)
    assert m and m.group(1) == cuda_ext.KERNEL
    kinds = [p.split()[0] if "*" not in p else "ptr" for p in m.group(2).replace("const ", "").split(",")]
    assert kinds == ["ptr", "ptr", "ptr", "int", "int", "float"], kinds
    A = torch.randn(3, 5, 5)
    w, V = torch.empty(3, 5), torch.empty(3, 5, 5)
    args = cuda_ext.launch_args(A, w, V, 40, 1e-7)
    width = {"ptr": np.uint64, "int": np.int32, "float": np.float32}
    assert [type(a) for a in args] == [width[k] for k in kinds]
    assert [int(a) for a in args[:4]] == [A.data_ptr(), w.data_ptr(), V.data_ptr(), 5] and int(args[4]) == 40
    assert args[5] == np.float32(1e-7)


def test_cuda_ext_load_names_each_way_it_tried(monkeypatch):
    """load() tries nvcc, then NVRTC, and where neither works says why for each (or for the one forced by
    MANIFOLDGD_CUDA_EXT); a bad MANIFOLDGD_CUDA_EXT is named."""
    from manifoldgd_fast.kernels import cuda_ext

    def fail(name):
        def way():
            raise RuntimeError(f"{name} is missing")
        return way

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "load_nvcc", fail("nvcc"))
    monkeypatch.setattr(cuda_ext, "load_nvrtc", fail("cupy"))
    for choice, want in [(None, "nvcc: RuntimeError: nvcc is missing; nvrtc: RuntimeError: cupy is missing"),
                         ("nvrtc", "nvrtc: RuntimeError: cupy is missing"),
                         ("cuda", "MANIFOLDGD_CUDA_EXT='cuda': expected nvcc, nvrtc or auto")]:
        monkeypatch.setattr(cuda_ext, "_MODULE", None)
        monkeypatch.setattr(cuda_ext, "_REASON", None)
        if choice is None:
            monkeypatch.delenv("MANIFOLDGD_CUDA_EXT", raising=False)
        else:
            monkeypatch.setenv("MANIFOLDGD_CUDA_EXT", choice)
        mod, reason = cuda_ext.load()
        assert mod is None and want in reason, reason
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.setattr(cuda_ext, "_REASON", None)
    monkeypatch.delenv("MANIFOLDGD_CUDA_EXT", raising=False)
    monkeypatch.setattr(cuda_ext, "load_nvrtc", lambda: "the nvrtc module")
    monkeypatch.setattr(cuda_ext, "_current_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cuda_ext, "self_test", lambda module, device: None)  # its launch: the next test
    assert cuda_ext.load() == ("the nvrtc module", None)


def test_cuda_ext_load_launches_each_way_once_and_falls_through_when_that_fails(monkeypatch):
    """A module that builds but fails its first launch (no kernel image for the GPU, an old driver) or gives
    wrong eigenvalues is not taken: load() names why and tries the next way (it used to take the nvcc build
    unlaunched, and the run then failed mid-way with a bare cudaError number)."""
    from manifoldgd_fast.kernels import cuda_ext

    class Module:
        def __init__(self, how):
            self.how, self.calls = how, []

        def sym_eig(self, A, max_sweeps, tol, stream):
            self.calls.append((tuple(A.shape), max_sweeps, tol, stream))
            if self.how == "no image":
                raise RuntimeError("sym_eig: kernel launch failed: no kernel image is available for execution on "
                                   "the device (cudaError 209)")
            w, V = torch.linalg.eigh(A.double())
            w = w.flip(-1).float() * (1.5 if self.how == "wrong" else 1.0)
            return [w, V.flip(-1).float()]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "_current_device", lambda: torch.device("cpu"))
    monkeypatch.delenv("MANIFOLDGD_CUDA_EXT", raising=False)
    for first, says in (("no image", "nvcc: RuntimeError: sym_eig: kernel launch failed: no kernel image"),
                        ("wrong", "nvcc: RuntimeError: self-test on cpu: eigenvalues [7.5, 4.5, 1.5] where "
                                  "[5.0, 3.0, 1.0] are right")):
        nvcc, nvrtc = Module(first), Module("right")
        monkeypatch.setattr(cuda_ext, "load_nvcc", lambda: nvcc)
        monkeypatch.setattr(cuda_ext, "load_nvrtc", lambda: nvrtc)
        monkeypatch.setattr(cuda_ext, "_MODULE", None)
        monkeypatch.setattr(cuda_ext, "_REASON", None)
        assert cuda_ext.load() == (nvrtc, None)
        assert nvcc.calls == [((1, 3, 3), 20, 1e-7, 0)] and len(nvrtc.calls) == 1
        monkeypatch.setattr(cuda_ext, "load_nvrtc", lambda: Module("no image"))
        monkeypatch.setattr(cuda_ext, "_MODULE", None)
        monkeypatch.setattr(cuda_ext, "_REASON", None)
        mod, reason = cuda_ext.load()
        assert mod is None and reason.startswith(says) and "; nvrtc: RuntimeError: sym_eig: kernel launch" in reason
    # an error another call left pending is not the build's: it is taken (the run's next CUDA call reports it)
    pending = Module("right")
    pending.sym_eig = lambda *a: (_ for _ in ()).throw(RuntimeError(f"sym_eig: {cuda_ext.PENDING}: an illegal "
                                                                    "memory access was encountered"))
    monkeypatch.setattr(cuda_ext, "load_nvcc", lambda: pending)
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.setattr(cuda_ext, "_REASON", None)
    assert cuda_ext.load() == (pending, None)
    assert cuda_ext.PENDING in cuda_ext._BINDING


def test_cuda_ext_build_failure_keeps_the_compilers_error():
    """torch's build error begins with the whole nvcc command line; the reason keeps the error lines."""
    from manifoldgd_fast.kernels import cuda_ext

    flags = " ".join(f"-I/very/long/include/path/number/{i}" for i in range(40))
    text = (f"Error building extension 'manifoldgd_sym_eig_0123': [1/3] /usr/local/cuda/bin/nvcc {flags} -c sym_eig.cu\n"
            f"FAILED: cuda.cuda.o\n/usr/local/cuda/bin/nvcc {flags} -c sym_eig.cu\n"
            "sym_eig.cu(42): error: identifier \"kMaxM\" is undefined\n1 error detected in the compilation of "
            "\"sym_eig.cu\".\nninja: build stopped: subcommand failed.\n")
    got = cuda_ext.build_error_summary(text)
    assert len(got) < 600 and got.startswith("Error building extension 'manifoldgd_sym_eig_0123': [1/3]")
    assert 'sym_eig.cu(42): error: identifier "kMaxM" is undefined' in got and "1 error detected" in got


def test_cuda_ext_build_name_follows_the_source_and_a_stale_lock_goes(monkeypatch, tmp_path):
    """The build's name in torch's per-user cache hashes the source, binding and flags (two checkouts never
    load each other's build); a lock a killed build left (torch waits on it forever) is removed with a
    warning once STALE_LOCK_S old, a fresh one is left to its build."""
    import time

    from manifoldgd_fast.kernels import cuda_ext

    name = cuda_ext.build_name()
    assert re.fullmatch(r"manifoldgd_sym_eig_[0-9a-f]{12}", name)
    monkeypatch.setattr(cuda_ext, "source", lambda: "// another version\n")
    assert cuda_ext.build_name() != name
    lock = tmp_path / "lock"
    lock.write_text("")
    cuda_ext._clear_stale_lock(name, str(tmp_path))
    assert lock.exists()
    old = time.time() - cuda_ext.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="removing the build lock .* a killed build left it"):
        cuda_ext._clear_stale_lock(name, str(tmp_path))
    assert not lock.exists()


@requires_cuda()
@pytest.mark.parametrize("n", [10, 33, 64])
def test_nvrtc_sym_eig_on_the_gpu_against_float64(n):
    """The NVRTC way (CuPy compiles, Python launches) on a GPU, at the nvcc way's tolerances against float64
    (test_kernels_triton.py checks that one); the extremes (rescaling, NaN) as every solver's."""
    pytest.importorskip("cupy", reason="the NVRTC way needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)")
    from manifoldgd_fast.kernels import cuda_ext, sym_eig as sym_eig_k

    mod = cuda_ext.load_nvrtc()
    A = eig_test_matrices(n, torch.Generator().manual_seed(n))
    Ac = A.float().cuda()
    stream = torch.cuda.current_stream().cuda_stream
    w, V = mod.sym_eig(Ac, sym_eig_k.MAX_SWEEPS, sym_eig_k.TOL, stream)
    check_eig(w.cpu(), V.cpu(), A, 2e-6 if n <= 16 else 5e-6)
    check_eig_extremes(lambda M: [t.cpu() for t in mod.sym_eig(M.float().cuda(), sym_eig_k.MAX_SWEEPS,
                                                                 sym_eig_k.TOL, stream)], n, 5e-6)


@requires_cuda()
def test_nvrtc_sym_eig_captures_in_a_cuda_graph():
    """The Python launch (CuPy on torch's current stream, taken as an external stream) is captured by torch's CUDA
    graph and replays the eager call's bits: the fused step stays capturable on the NVRTC way."""
    pytest.importorskip("cupy", reason="the NVRTC way needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)")
    from triton_helpers import assert_graph_replay_equals_eager

    from manifoldgd_fast.kernels import cuda_ext, sym_eig as sym_eig_k

    mod = cuda_ext.load_nvrtc()
    A = eig_test_matrices(12, torch.Generator().manual_seed(0)).float().cuda().repeat(64, 1, 1)

    def step():
        w, V = mod.sym_eig(A, sym_eig_k.MAX_SWEEPS, sym_eig_k.TOL, torch.cuda.current_stream().cuda_stream)
        return torch.cat([w.flatten(), V.flatten()])

    assert_graph_replay_equals_eager(step)


_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

// the kernel as NVRTC sees it (the host launcher and the runtime header drop out under __CUDACC_RTC__),
// with the emulation's runtime header in their place
#include <cuda_runtime.h>
#define __CUDACC_RTC__ 1
#include "sym_eig_kernel.cu"
#undef __CUDACC_RTC__

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
  for (int i = 0; i < kThreads / 32; ++i) mgd_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  const char* order = getenv("MGD_EMU_ORDER");  // free (default), forward or reverse
  mgd_order = !order || !strcmp(order, "free") ? 0 : !strcmp(order, "forward") ? 1 : -1;
  for (int b = 0; b < batch; ++b) {
    if (mgd_order) mgd_sched.reset(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        if (mgd_order) mgd_sched.start();
        mgd_sym_eig_f32(A.data(), w.data(), V.data(), n, max_sweeps, tol);
        if (mgd_order) mgd_sched.finish();
      });
    if (mgd_order) {  // the first thread in the order starts
      std::lock_guard<std::mutex> lk(mgd_sched.m);
      mgd_sched.go[mgd_sched.first_runnable()]->release();
    }
    for (auto& th : threads) th.join();
  }
  fwrite(w.data(), sizeof(float), w.size(), stdout);
  fwrite(V.data(), sizeof(float), V.size(), stdout);
  return 0;
}
"""


def _build_emulation(cu: str, d) -> "callable":
    """``cu`` (a sym_eig.cu text) built in folder ``d`` for the host against the emulation header, as NVRTC
    compiles it (under __CUDACC_RTC__: no <<<>>> launcher); returns run(A, max_sweeps, tol, order="free")
    (order: free, forward or reverse, tests/cuda_host/cuda_runtime.h's ways to run the threads)."""
    (d / "sym_eig_kernel.cu").write_text(cu)
    (d / "main.cpp").write_text(_HARNESS)
    exe = d / "sym_eig_host"
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [CXX, "-std=c++20", "-O2", "-pthread", "-w", f"-I{os.path.join(here, 'cuda_host')}", f"-I{d}",
           str(d / "main.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def run(A: torch.Tensor, max_sweeps: int, tol: float, order: str = "free"):
        B, n, _ = A.shape
        stdin = (np.array([B, n, max_sweeps], np.int32).tobytes() + np.array([tol], np.float32).tobytes()
                 + A.float().numpy().tobytes())
        out = subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=300,
                             env={**os.environ, "MGD_EMU_ORDER": order})
        assert out.returncode == 0, out.stderr[-2000:]
        flat = np.frombuffer(out.stdout, np.float32)
        assert flat.size == B * n + B * n * n, flat.size
        return torch.from_numpy(flat[:B * n].reshape(B, n).copy()), torch.from_numpy(flat[B * n:].reshape(B, n, n).copy())

    return run


@pytest.fixture(scope="module")
def emulation_builder(tmp_path_factory):
    """_build_emulation in a fresh folder, once the host compiler is known to have C++20's std::barrier."""
    if CXX is None:
        pytest.skip("no host C++ compiler (c++ / g++) on this machine")
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.cpp").write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    probe = subprocess.run([CXX, "-std=c++20", "-pthread", str(d / "probe.cpp"), "-o", str(d / "probe")],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"the host compiler has no C++20 std::barrier: {probe.stderr.strip().splitlines()[-1:]}")
    return lambda cu: _build_emulation(cu, tmp_path_factory.mktemp("sym_eig_host"))


@pytest.fixture(scope="module")
def emulated_sym_eig(emulation_builder):
    """csrc/sym_eig.cu's kernel, emulated on the host."""
    from manifoldgd_fast.kernels import cuda_ext

    return emulation_builder(cuda_ext.source())


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



@pytest.mark.parametrize("n", [10, 64])   # 64: |A|_F^2 of a largest entry 2^59 overflows fp32 only there
def test_cuda_sym_eig_kernel_rescales_huge_and_tiny_matrices_and_propagates_nan(emulated_sym_eig, n):
    from manifoldgd_fast.kernels.sym_eig import MAX_SWEEPS, TOL

    check_eig_extremes(lambda A: emulated_sym_eig(A, MAX_SWEEPS, TOL), n, 2e-6 if n <= 16 else 5e-6)


@pytest.mark.parametrize("n", [10, 33, 64])
def test_cuda_sym_eig_kernel_gives_the_same_bits_in_any_thread_order(emulated_sym_eig, n):
    """The kernel's threads run free, then one at a time between barriers lowest id first, then highest id
    first: a race (two threads touching one shared word between the same two barriers) gives other bits in
    one of the orders (the next test shows it does). Two matrices per size (Wishart, ill-conditioned)."""
    from manifoldgd_fast.kernels.sym_eig import MAX_SWEEPS, TOL

    A = eig_test_matrices(n, torch.Generator().manual_seed(n))[:2]
    free = emulated_sym_eig(A, MAX_SWEEPS, TOL)
    for order in ("forward", "reverse"):
        w, V = emulated_sym_eig(A, MAX_SWEEPS, TOL, order)
        assert torch.equal(w, free[0]) and torch.equal(V, free[1]), order


def test_the_ordered_emulation_finds_a_missing_barrier(emulation_builder):
    """What the test above would catch: block_sum without the barrier before its warps write red[] (a warp
    overwrites a partial sum the previous reduction's readers still need; the free-running emulation, whose
    shuffles used to be block barriers, passed it) changes the results in an ordered run; without the
    barrier after the write, threads read different sums, leave the sweep loop at different times, and the
    ordered run stops at once on the deadlock (a free run hangs)."""
    from manifoldgd_fast.kernels import cuda_ext
    from manifoldgd_fast.kernels.sym_eig import MAX_SWEEPS, TOL

    cu = cuda_ext.source()
    write = "  __syncthreads();\n  if (lane == 0) red[warp] = v;\n  __syncthreads();\n"
    assert cu.count(write) == 2, "block_sum / block_max changed: update this test's mutants"
    A = eig_test_matrices(10, torch.Generator().manual_seed(10))[:2]
    right = emulation_builder(cu)(A, MAX_SWEEPS, TOL)
    before = emulation_builder(cu.replace(write, "  if (lane == 0) red[warp] = v;\n  __syncthreads();\n", 1))
    outs = [before(A, MAX_SWEEPS, TOL, order) for order in ("forward", "reverse")]
    assert any(not (torch.equal(w, right[0]) and torch.equal(V, right[1])) for w, V in outs)
    after = emulation_builder(cu.replace(write, "  __syncthreads();\n  if (lane == 0) red[warp] = v;\n", 1))
    with pytest.raises(AssertionError, match="cuda emulation: deadlock: no thread can run"):
        after(A, MAX_SWEEPS, TOL, "reverse")
