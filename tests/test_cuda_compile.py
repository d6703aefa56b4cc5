"""The bundled CUDA kernels compile with NVRTC for every architecture CI names (no GPU needed).

Needs ``cuda-bindings`` and the NVRTC library (``nvidia-cuda-nvrtc-cu12`` or, for CUDA 13,
``nvidia-cuda-nvrtc``). Without them the tests skip, unless ``OCTREENCA_REQUIRE_NVRTC=1`` or
``CI=true`` (set by CI), where a missing compiler fails. The main venv has NVRTC 12; the GPU
check's rehearsal (tests/test_gpu_check.py) runs this file again under NVRTC 13.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from napari_octreenca.nca.errors import BackendUnavailable

nvrtc_compile = pytest.importorskip("napari_octreenca.backends.cuda.nvrtc")

PATHOLOGY = {"NCA_C": 16, "NCA_IN": 3, "NCA_H": 64}


@pytest.fixture(scope="module")
def need_nvrtc() -> None:
    try:
        nvrtc_compile.nvrtc_version()
    except BackendUnavailable as exc:
        if os.environ.get("OCTREENCA_REQUIRE_NVRTC") == "1" or os.environ.get("CI") == "true":
            pytest.fail(f"NVRTC is required here but unavailable: {exc}")
        pytest.skip(f"NVRTC unavailable: {exc}")


@pytest.mark.usefixtures("need_nvrtc")
def test_compiles_for_ci_archs() -> None:
    jobs = [(arch, PATHOLOGY) for arch in nvrtc_compile.CI_ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        cubins = list(pool.map(lambda job: nvrtc_compile.compile_cubin(*job), jobs))
    for (arch, _), cubin in zip(jobs, cubins):
        assert cubin[:4] == b"\x7fELF", arch
        assert nvrtc_compile.cubin_arch(cubin) == int(arch[3:])
        for name in nvrtc_compile.ENTRY_POINTS:
            assert name.encode() in cubin, f"{name} missing from the {arch} cubin"


@pytest.mark.usefixtures("need_nvrtc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_v2_compiles(arch) -> None:
    """Kernel v2 (tensor-core mma.sync) for the preset shape and a padded one (2C, H, C - IN not multiples)."""
    _, entries = nvrtc_compile.VARIANTS["v2"]
    for defines in (PATHOLOGY, {"NCA_C": 10, "NCA_IN": 1, "NCA_H": 24}):
        cubin = nvrtc_compile.compile_cubin(arch, defines, "v2")
        assert nvrtc_compile.cubin_arch(cubin) == int(arch[3:])
        for name in entries:
            assert name.encode() in cubin, f"{name} missing from the {arch} v2 cubin"
    with pytest.raises(nvrtc_compile.KernelCompileError, match="sm_80 or newer"):
        nvrtc_compile.compile_cubin("sm_75", PATHOLOGY, "v2")


@pytest.mark.usefixtures("need_nvrtc")
def test_compile_error_carries_the_log() -> None:
    with pytest.raises(nvrtc_compile.KernelCompileError, match="nca_step.cu"):
        # A hidden size of 0 makes a zero-length array: the compiler must reject it.
        nvrtc_compile.compile_cubin("sm_80", {"NCA_C": 0, "NCA_IN": 3, "NCA_H": 64})


@pytest.mark.usefixtures("need_nvrtc")
def test_cache_reuses_the_binary(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OCTREENCA_CACHE", str(tmp_path))
    calls: list[str] = []
    real = nvrtc_compile.compile_kernels

    def counting(arch, defines, variant="v1"):
        calls.append(arch)
        return real(arch, defines, variant)

    monkeypatch.setattr(nvrtc_compile, "compile_kernels", counting)
    small = {"NCA_C": 4, "NCA_IN": 1, "NCA_H": 8}
    data, path = nvrtc_compile.cached_cubin("sm_86", small)
    assert path.parent == tmp_path and path.name.endswith("-sm_86.cubin") and path.read_bytes() == data
    again, path2 = nvrtc_compile.cached_cubin("sm_86", small)
    assert again == data and path2 == path and calls == ["sm_86"]
    # Another shape is another binary.
    _, path3 = nvrtc_compile.cached_cubin("sm_86", {**small, "NCA_H": 12})
    assert path3 != path and calls == ["sm_86", "sm_86"]


@pytest.mark.usefixtures("need_nvrtc")
def test_supported_archs_cover_ci() -> None:
    archs = nvrtc_compile.supported_archs()
    assert all(int(a[3:]) in archs for a in nvrtc_compile.CI_ARCHS)


# -- the CUDA backend's host-side logic (runs without a GPU) -----------------------------------


def test_cuda_backend_without_gpu_says_why_and_auto_falls_back() -> None:
    import torch

    from napari_octreenca.backends import get_backend
    from napari_octreenca.backends.cuda.backend import CudaBackend

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/gpu covers the backend")
    ok, why = CudaBackend.availability()
    assert not ok and "GPU" in why
    with pytest.raises(BackendUnavailable, match="not available"):
        get_backend("cuda", "cpu")
    assert get_backend("auto", "cpu", torch.float32).name != "cuda"
    assert not CudaBackend().supports(torch.device("cpu"), torch.float32)
    assert CudaBackend().supports(torch.device("cuda", 0), torch.bfloat16)
    assert not CudaBackend().supports(torch.device("cuda", 0), torch.float16)


def test_arch_choice_and_grid() -> None:
    from napari_octreenca.backends.cuda.backend import (
        CELLS_PER_BLOCK,
        MAX_GRID,
        grid_size,
        pick_arch,
    )

    assert pick_arch((9, 0), [80, 86, 89, 90]) == "sm_90"  # the exact arch: a cubin
    assert pick_arch((8, 7), [80, 86, 89, 90]) == "sm_86"  # same major, newest below: still a cubin
    # A GPU newer than everything NVRTC knows: PTX for the newest known arch (driver JIT).
    assert pick_arch((12, 0), [80, 90]) == "compute_90"
    assert pick_arch((10, 0), [75, 80, 86, 90, 100, 120]) == "sm_100"
    with pytest.raises(BackendUnavailable, match="compute capability 5.0"):
        pick_arch((5, 0), [75, 80, 90])  # older than NVRTC supports (CUDA 13 dropped sm_5x)
    assert grid_size(1) == 1 and grid_size(CELLS_PER_BLOCK + 1) == 2
    assert grid_size(13600 * 13600) == -(-13600 * 13600 // CELLS_PER_BLOCK)
    assert grid_size(2**50) == MAX_GRID


def test_kernel_constants_match_backend() -> None:
    """The launch geometry the backend assumes is the one the kernel source defines."""
    import re

    from napari_octreenca.backends.cuda.backend import BLOCK, CANDIDATES

    src = nvrtc_compile.kernel_sources()[nvrtc_compile.SOURCE]
    assert int(re.search(r"#define NCA_BLOCK (\d+)", src).group(1)) == BLOCK
    assert int(re.search(r"#define NCA_CANDIDATES (\d+)", src).group(1)) == CANDIDATES
    for name in nvrtc_compile.ENTRY_POINTS:
        assert f"NCA_ENTRY({name}," in src
    # The weights are the by-value last argument (launch_args packs them there).
    assert "const __grid_constant__ nca_weights<DIMS> weights" in src
    assert "__constant__ float" not in src, "a shared constant weight array would let concurrent runs interleave"


# -- CUDA ELF headers: CUDA 12 and CUDA 13 layouts ---------------------------------------------


def _elf_header(osabi: int, abi_version: int, e_flags: int) -> bytes:
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    head[4:9] = bytes([2, 1, 1, osabi, abi_version])  # 64-bit, little-endian, version 1
    head[0x30:0x34] = e_flags.to_bytes(4, "little")
    return bytes(head)


@pytest.mark.parametrize(
    "osabi,abi,flags,sm",
    [
        (0x33, 7, 0x500550, 80),  # NVRTC 12.9, sm_80
        (0x33, 7, 0x5A055A, 90),  # NVRTC 12.9, sm_90
        (0x41, 8, 0x6005004, 80),  # NVRTC / nvcc 13.0, sm_80
        (0x41, 8, 0x6005A04, 90),  # NVRTC / nvcc 13.0, sm_90 (the old parser said 4)
        (0x41, 8, 0x6006402, 100),  # NVRTC 12.9 and 13.0, sm_100
        (0x41, 8, 0x6007802, 120),  # sm_120
    ],
)
def test_cubin_arch_reads_cuda12_and_cuda13_headers(osabi, abi, flags, sm) -> None:
    """e_flags values copied from real cubins made on this machine (NVRTC 12.9, nvcc/NVRTC 13.0)."""
    assert nvrtc_compile.cubin_arch(_elf_header(osabi, abi, flags)) == sm


def test_cubin_arch_rejects_non_cubins() -> None:
    with pytest.raises(ValueError, match="not an ELF"):
        nvrtc_compile.cubin_arch(b"// PTX text")
    with pytest.raises(ValueError, match="64-bit little-endian"):
        nvrtc_compile.cubin_arch(b"\x7fELF" + bytes([1, 1]) + bytes(58))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cubin_arch_of_a_real_nvcc_cubin(tmp_path, arch) -> None:
    """The kernels built by the CUDA toolkit's nvcc (13.0 on this machine: a CUDA 13 cubin)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH (the CUDA 13 cubin layout is still covered by the header test)")
    from napari_octreenca.resources import resource_path

    out = tmp_path / f"nca_{arch}.cubin"
    src = resource_path("kernels") / nvrtc_compile.SOURCE
    subprocess.run(
        [nvcc, "-cubin", f"-arch={arch}", "-std=c++17", str(src), "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert nvrtc_compile.cubin_arch(out.read_bytes()) == int(arch[3:])


@pytest.mark.usefixtures("need_nvrtc")
def test_cubin_arch_of_this_nvrtc() -> None:
    """Whatever NVRTC is installed (12 in the main venv, 13 in the GPU check's rehearsal venv)."""
    major, _ = nvrtc_compile.nvrtc_version()
    cubin = nvrtc_compile.compile_cubin("sm_90", {"NCA_C": 4, "NCA_IN": 1, "NCA_H": 8})
    assert nvrtc_compile.cubin_arch(cubin) == 90
    assert cubin[8] == (8 if major >= 13 else 7), "unexpected CUDA ELF ABI version for this NVRTC"


@pytest.mark.usefixtures("need_nvrtc")
def test_ptx_fallback_compiles_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OCTREENCA_CACHE", str(tmp_path))
    data, path = nvrtc_compile.cached_cubin("compute_80", {"NCA_C": 4, "NCA_IN": 1, "NCA_H": 8})
    assert path.suffix == ".ptx" and data.endswith(b"\x00")
    text = data.decode()
    assert ".target sm_80" in text
    for name in nvrtc_compile.ENTRY_POINTS:
        assert f".entry {name}" in text
    with pytest.raises(ValueError, match="sm_XX"):
        nvrtc_compile.compile_cubin("compute_80", {"NCA_C": 4, "NCA_IN": 1, "NCA_H": 8})


# -- launch checks (run on the CPU: they only look at shapes, dtypes, devices, strides) ---------


def _level(c: int = 16, cin: int = 3, h: int = 64, dims: int = 2):
    from napari_octreenca.nca.weights import BackboneNCA

    return BackboneNCA(c, h, cin, dims)


def test_launch_check_accepts_the_right_buffers() -> None:
    import torch

    from napari_octreenca.backends.cuda.backend import check_launch

    for dims, shape in ((2, (5, 7)), (3, (2, 3, 4))):
        state = torch.zeros((2, 13) + shape, dtype=torch.bfloat16)
        check_launch(
            _level(dims=dims), torch.zeros((2, 3) + shape, dtype=torch.bfloat16), state, torch.empty_like(state)
        )


def test_launch_check_rejects_what_would_read_out_of_bounds() -> None:
    import torch

    from napari_octreenca.backends.cuda.backend import check_launch
    from napari_octreenca.nca.errors import InputError

    nca = _level()
    img, st = torch.zeros(2, 3, 5, 7), torch.zeros(2, 13, 5, 7)
    cases = [
        ("state must be", img, torch.zeros(2, 12, 5, 7), None),  # wrong channel count
        ("state must be", img[:, :, 0], st[:, :, 0], None),  # 1D data for a 2D level
        ("image must have shape", torch.zeros(2, 3, 5, 6), st, None),  # wrong spatial size
        ("image must have shape", torch.zeros(1, 3, 5, 7), st, None),  # wrong batch
        ("image is torch.float64", img.double(), st, None),
        ("output must have", img, st, torch.zeros(2, 13, 5, 6)),
        ("output is torch.bfloat16", img, st, torch.zeros(2, 13, 5, 7, dtype=torch.bfloat16)),
        ("contiguous", img, torch.zeros(2, 13, 7, 5).transpose(2, 3), None),
        ("must not be the state", img, st, st),
    ]
    for match, image, state, out in cases:
        out = torch.zeros(state.shape) if out is None else out
        with pytest.raises(InputError, match=match):
            check_launch(nca, image, state, out)
    # A 3D level refuses 2D buffers.
    with pytest.raises(InputError, match="3 spatial axes"):
        check_launch(_level(dims=3), img, st, torch.empty_like(st))


def test_kernel_option() -> None:
    from napari_octreenca.backends.cuda.backend import CudaBackend
    from napari_octreenca.nca.errors import InputError

    assert CudaBackend().kernel in ("v1", "v2")
    assert CudaBackend(kernel="v2").kernel == "v2"
    with pytest.raises(InputError, match="choose v1 or v2"):
        CudaBackend(kernel="v3")


def test_weights_too_large_for_kernel_arguments_fall_back() -> None:
    from napari_octreenca.backends.cuda.backend import params_fit

    assert params_fit(_level(dims=3)) == (True, "")  # the presets fit (about 13.6 KB in 3D)
    ok, why = params_fit(_level(h=512, dims=3))
    assert not ok and "bytes of kernel arguments" in why
