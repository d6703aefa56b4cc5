"""Compile the bundled CUDA kernels with NVRTC at run time, one cubin per model shape and GPU.

No CUDA toolkit is needed on the user's machine: a CUDA build of PyTorch installs the NVRTC
library (``nvidia-cuda-nvrtc-cu12`` / ``nvidia-cuda-nvrtc``), and ``cuda-bindings`` calls it.
The kernel source needs no header outside ``kernels/`` (bfloat16 is handled as raw 16-bit words),
so NVRTC needs no include path. The result is a CUBIN for the exact architecture (``sm_XX``),
not PTX: a cubin does not need a driver newer than the compiler, as PTX from a new NVRTC would.

Cubins are cached under ``$OCTREENCA_CACHE`` or ``~/.cache/napari-octreenca`` as
``<hash>-sm_XX.cubin``; the hash covers the kernel source, the model-shape defines, the options
and the NVRTC version, so an edited kernel or another NVRTC never reuses a stale binary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from ...nca.errors import BackendUnavailable
from ...fileutil import atomic_write
from ...resources import resource_path

#: Kernel files: the shared per-cell code (a header) and the entry points.
HEADER = "nca_common.cuh"
SOURCE = "nca_step.cu"
#: Kernel entry points, ``nca_step_{2,3}d_{f32,bf16}``.
ENTRY_POINTS = tuple(f"nca_step_{d}d_{t}" for d in (2, 3) for t in ("f32", "bf16"))
#: Architectures CI compiles for (A100, A10/3090, L4/4090, H100).
CI_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
BASE_OPTIONS = ("-std=c++17", "--device-as-default-execution-space")


class KernelCompileError(BackendUnavailable):
    """NVRTC rejected the kernel source (the message holds the compiler log)."""


def kernel_sources() -> dict[str, str]:
    """The bundled kernel files by name."""
    folder = resource_path("kernels")
    return {name: (folder / name).read_text(encoding="utf-8") for name in (HEADER, SOURCE)}


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise BackendUnavailable(
            f"cuda-bindings is not installed ({exc}); pip install 'napari-octreenca[cuda]'"
        ) from None
    return nvrtc


def _check(result, what: str) -> None:
    nvrtc = _nvrtc()
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(result)
        raise KernelCompileError(f"NVRTC {what} failed: {msg.decode(errors='replace')}")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library that cuda-bindings loads."""
    nvrtc = _nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the library itself is missing: cuda-bindings raises on first call
        raise BackendUnavailable(
            f"the NVRTC library could not be loaded ({exc}); install a CUDA build of PyTorch or "
            "pip install nvidia-cuda-nvrtc-cu12"
        ) from None
    _check(err, "version query")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Compute capabilities (e.g. 90) this NVRTC can compile for."""
    nvrtc = _nvrtc()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(err, "architecture query")
    return [int(a) for a in archs]


def compile_options(arch: str, defines: Mapping[str, int]) -> list[str]:
    """NVRTC options for ``arch`` (``sm_90``) and the model-shape defines (NCA_C, NCA_IN, NCA_H)."""
    return [f"--gpu-architecture={arch}", *BASE_OPTIONS, *(f"-D{k}={int(v)}" for k, v in sorted(defines.items()))]


def cache_key(arch: str, defines: Mapping[str, int]) -> str:
    """Hash of everything the cubin depends on."""
    h = hashlib.sha256()
    for name, text in sorted(kernel_sources().items()):
        h.update(name.encode())
        h.update(text.encode())
    h.update(repr(compile_options(arch, defines)).encode())
    h.update(repr(nvrtc_version()).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$OCTREENCA_CACHE`` or ``~/.cache/napari-octreenca``)."""
    env = os.environ.get("OCTREENCA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "napari-octreenca"


def compile_cubin(arch: str, defines: Mapping[str, int]) -> bytes:
    """Compile the kernels for ``arch`` with NVRTC; raises KernelCompileError with the log."""
    nvrtc = _nvrtc()
    nvrtc_version()  # a clear error when the library is missing
    sources = kernel_sources()
    err, prog = nvrtc.nvrtcCreateProgram(
        sources[SOURCE].encode(), SOURCE.encode(), 1, [sources[HEADER].encode()], [HEADER.encode()]
    )
    _check(err, "program creation")
    try:
        opts = [o.encode() for o in compile_options(arch, defines)]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            err, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(
                f"NVRTC could not compile {SOURCE} for {arch} with {dict(defines)}:\n"
                f"{log.decode(errors='replace').strip()}"
            )
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "cubin size query")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(err, "cubin retrieval")
        return bytes(cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_cubin(arch: str, defines: Mapping[str, int]) -> tuple[bytes, Path]:
    """The cubin for ``arch``/``defines`` from the cache, compiling (and caching) it when absent."""
    path = cache_dir() / f"{cache_key(arch, defines)}-{arch}.cubin"
    if path.exists():
        data = path.read_bytes()
        if data[:4] == b"\x7fELF":
            return data, path
    data = compile_cubin(arch, defines)
    try:
        # Atomic: a concurrent process never reads a half-written cubin.
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass  # a read-only home still runs, it just compiles again next time
    return data, path


def cubin_arch(cubin: bytes) -> int:
    """The SM version a cubin was built for (from the CUDA ELF header's e_flags)."""
    if cubin[:4] != b"\x7fELF":
        raise ValueError("not an ELF cubin")
    # 64-bit little-endian ELF: e_flags at offset 0x30; the low byte holds the SM version
    # (older ABI) or bits 8-15 (ABI version 2+, CUDA 12.8 onwards for some targets).
    flags = int.from_bytes(cubin[0x30:0x34], "little")
    low = flags & 0xFF
    return low if low else (flags >> 8) & 0xFF
