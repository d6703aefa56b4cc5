"""The bundled CUDA kernels compile with NVRTC for every architecture CI names (no GPU needed).

Needs ``cuda-bindings`` and the NVRTC library (``nvidia-cuda-nvrtc-cu12``). Without them the
tests skip, unless ``OCTREENCA_REQUIRE_NVRTC=1`` (set in CI), where a missing compiler fails.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from napari_octreenca.engine.errors import BackendUnavailable

nvrtc_compile = pytest.importorskip("napari_octreenca.backends.nvrtc_compile")

PATHOLOGY = {"NCA_C": 16, "NCA_IN": 3, "NCA_H": 64}


@pytest.fixture(scope="module", autouse=True)
def need_nvrtc() -> None:
    try:
        nvrtc_compile.nvrtc_version()
    except BackendUnavailable as exc:
        if os.environ.get("OCTREENCA_REQUIRE_NVRTC") == "1":
            pytest.fail(f"NVRTC is required here but unavailable: {exc}")
        pytest.skip(f"NVRTC unavailable: {exc}")


def test_compiles_for_ci_archs() -> None:
    jobs = [(arch, PATHOLOGY) for arch in nvrtc_compile.CI_ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        cubins = list(pool.map(lambda job: nvrtc_compile.compile_cubin(*job), jobs))
    for (arch, _), cubin in zip(jobs, cubins):
        assert cubin[:4] == b"\x7fELF", arch
        assert nvrtc_compile.cubin_arch(cubin) == int(arch[3:])
        for name in nvrtc_compile.ENTRY_POINTS:
            assert name.encode() in cubin, f"{name} missing from the {arch} cubin"


def test_compile_error_carries_the_log() -> None:
    with pytest.raises(nvrtc_compile.KernelCompileError, match="nca_step.cu"):
        # A hidden size of 0 makes a zero-length array: the compiler must reject it.
        nvrtc_compile.compile_cubin("sm_80", {"NCA_C": 0, "NCA_IN": 3, "NCA_H": 64})


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


def test_supported_archs_cover_ci() -> None:
    archs = nvrtc_compile.supported_archs()
    assert all(int(a[3:]) in archs for a in nvrtc_compile.CI_ARCHS)
