"""The bundled CUDA kernels compile with NVRTC for every architecture CI names (no GPU needed).

Needs ``cuda-bindings`` and the NVRTC library (``nvidia-cuda-nvrtc-cu12``). Without them the
tests skip, unless ``OCTREENCA_REQUIRE_NVRTC=1`` or ``CI=true`` (set by CI), where a missing compiler fails.
"""

from __future__ import annotations

import os
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
def test_compile_error_carries_the_log() -> None:
    with pytest.raises(nvrtc_compile.KernelCompileError, match="nca_step.cu"):
        # A hidden size of 0 makes a zero-length array: the compiler must reject it.
        nvrtc_compile.compile_cubin("sm_80", {"NCA_C": 0, "NCA_IN": 3, "NCA_H": 64})


@pytest.mark.usefixtures("need_nvrtc")
def test_cache_reuses_the_binary(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OCTREENCA_CACHE", str(tmp_path))
    calls: list[str] = []
    real = nvrtc_compile.compile_cubin

    def counting(arch, defines):
        calls.append(arch)
        return real(arch, defines)

    monkeypatch.setattr(nvrtc_compile, "compile_cubin", counting)
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
    from napari_octreenca.backends.cuda.backend import CELLS_PER_BLOCK, MAX_GRID, grid_size, pick_arch

    assert pick_arch((9, 0), [80, 86, 89, 90]) == "sm_90"
    assert pick_arch((8, 7), [80, 86, 89, 90]) == "sm_86"  # same major, newest below
    with pytest.raises(BackendUnavailable, match="compute capability 12.0"):
        pick_arch((12, 0), [80, 90])  # never across majors
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
