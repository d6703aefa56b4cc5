"""Compile the bundled CUDA kernels with NVRTC at run time, one cubin per model shape and GPU.

No CUDA toolkit is needed on the user's machine: a CUDA build of PyTorch installs the NVRTC
library (``nvidia-cuda-nvrtc-cu12`` for CUDA 12, ``nvidia-cuda-nvrtc`` for CUDA 13), and
``cuda-bindings`` (12.x or 13.x) calls it. The kernel source needs no header outside ``kernels/``
(bfloat16 is handled as raw 16-bit words), so NVRTC needs no include path.

The result is a CUBIN for the GPU's own architecture (``sm_XX``, see :func:`pick_target`): a
cubin needs no driver JIT and no driver newer than the compiler. Only when this NVRTC does not
know the GPU (a GPU newer than the compiler) is PTX built instead, for the newest architecture
NVRTC knows, and the driver compiles it at load time.

Binaries are cached under ``$OCTREENCA_CACHE`` or ``~/.cache/napari-octreenca`` as
``<hash>-<arch>.cubin`` (or ``.ptx``); the hash covers the kernel source, the model-shape
defines, the options and the NVRTC version, so an edited kernel or another NVRTC never reuses a
stale binary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from ...fileutil import atomic_write
from ...nca.errors import BackendUnavailable
from ...resources import resource_path

#: Kernel files: the shared per-cell code (a header) and the entry points.
HEADER = "nca_common.cuh"
SOURCE = "nca_step.cu"
#: Kernel entry points, ``nca_step_{2,3}d_{f32,bf16}``.
ENTRY_POINTS = tuple(f"nca_step_{d}d_{t}" for d in (2, 3) for t in ("f32", "bf16"))
#: Kernel variants: v1 (a thread per firing cell, CUDA cores) and v2 (bf16 only: tensor-core
#: fc0/fc1, shared-memory tile; needs sm_80+). Each is its own NVRTC program and cubin.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "v1": (SOURCE, ENTRY_POINTS),
    "v2": ("nca_step_v2.cu", ("nca2_step_2d_bf16", "nca2_step_3d_bf16")),
}
#: The oldest architecture kernel v2 runs on (mma.sync with bf16 inputs).
V2_MIN_ARCH = 80
#: Architectures CI compiles for (A100, A10/3090, L4/4090, H100).
CI_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
BASE_OPTIONS = ("-std=c++17", "--device-as-default-execution-space")


class KernelCompileError(BackendUnavailable):
    """NVRTC rejected the kernel source (the message holds the compiler log)."""


def kernel_sources(variant: str = "v1") -> dict[str, str]:
    """The bundled kernel files of a variant (the header and its entry-point source) by name."""
    folder = resource_path("kernels")
    return {name: (folder / name).read_text(encoding="utf-8") for name in (HEADER, VARIANTS[variant][0])}


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise BackendUnavailable(
            f"cuda-bindings is not installed ({exc}); pip install 'napari-octreenca[cuda]' (CUDA 12) or '[cuda13]' (CUDA 13)"
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


def cache_key(arch: str, defines: Mapping[str, int], variant: str = "v1") -> str:
    """Hash of everything the cubin depends on."""
    h = hashlib.sha256()
    for name, text in sorted(kernel_sources(variant).items()):
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


def pick_target(capability: tuple[int, int], supported: list[int]) -> str:
    """What to build for a GPU of ``capability`` with an NVRTC that knows ``supported`` archs.

    ``sm_XY`` (a cubin, no driver JIT) for the GPU's own architecture when NVRTC knows it, else
    for the newest one of the same major below it (a cubin for sm_XY runs on major X, minor >= Y,
    never across majors). ``compute_XY`` (PTX, compiled by the driver at load time) only when
    the GPU is newer than every architecture this NVRTC knows.
    """
    major, minor = capability
    own = major * 10 + minor
    if own in supported:
        return f"sm_{own}"
    same = [a for a in supported if a // 10 == major and a <= own]
    if same:
        return f"sm_{max(same)}"
    older = [a for a in supported if a < own]
    if older and own > max(supported):
        return f"compute_{max(older)}"
    raise BackendUnavailable(
        f"this NVRTC cannot build for compute capability {major}.{minor} (it supports {supported}); "
        "install an NVRTC of the GPU's CUDA generation (nvidia-cuda-nvrtc-cu12 or nvidia-cuda-nvrtc)"
    )


def _program_log(prog) -> str:
    nvrtc = _nvrtc()
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    return log.decode(errors="replace").strip(" \n\x00")


def compile_kernels(arch: str, defines: Mapping[str, int], variant: str = "v1") -> bytes:
    """Compile a kernel variant for ``arch``: a cubin for ``sm_XX``, PTX (NUL-terminated) for ``compute_XX``.

    Raises KernelCompileError with the compiler log.
    """
    nvrtc = _nvrtc()
    nvrtc_version()  # a clear error when the library is missing
    ptx = arch.startswith("compute_")
    source = VARIANTS[variant][0]
    if variant == "v2" and int(arch.split("_")[1]) < V2_MIN_ARCH:
        raise KernelCompileError(f"kernel v2 needs sm_{V2_MIN_ARCH} or newer (tensor-core bf16), not {arch}")
    sources = kernel_sources(variant)
    err, prog = nvrtc.nvrtcCreateProgram(
        sources[source].encode(), source.encode(), 1, [sources[HEADER].encode()], [HEADER.encode()]
    )
    _check(err, "program creation")
    try:
        opts = [o.encode() for o in compile_options(arch, defines)]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(
                f"NVRTC could not compile {source} for {arch} with {dict(defines)}:\n{_program_log(prog)}"
            )
        get_size, get = (
            (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if ptx else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        )
        err, size = get_size(prog)
        _check(err, f"{'PTX' if ptx else 'cubin'} size query")
        data = b" " * size
        (err,) = get(prog, data)
        _check(err, f"{'PTX' if ptx else 'cubin'} retrieval")
        return bytes(data)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(arch: str, defines: Mapping[str, int], variant: str = "v1") -> bytes:
    """Compile a kernel variant to a cubin for ``arch`` (``sm_XX``); raises KernelCompileError with the log."""
    if not arch.startswith("sm_"):
        raise ValueError(f"a cubin needs an sm_XX architecture, got {arch!r}")
    return compile_kernels(arch, defines, variant)


def _looks_valid(data: bytes, arch: str) -> bool:
    """A cached binary is whole: an ELF cubin, or PTX text ending in NUL."""
    if arch.startswith("compute_"):
        return data.startswith(b"//") and data.endswith(b"\x00")
    return data[:4] == b"\x7fELF"


def cached_cubin(arch: str, defines: Mapping[str, int], variant: str = "v1") -> tuple[bytes, Path]:
    """The binary for ``arch``/``defines``/``variant`` from the cache, compiling (and caching) it when absent.

    ``arch`` is what :func:`pick_target` chose: ``sm_XX`` gives a cubin, ``compute_XX`` PTX.
    """
    suffix = "ptx" if arch.startswith("compute_") else "cubin"
    path = cache_dir() / f"{cache_key(arch, defines, variant)}-{arch}.{suffix}"
    if path.exists():
        data = path.read_bytes()
        if _looks_valid(data, arch):
            return data, path
    data = compile_kernels(arch, defines, variant)
    try:
        # Atomic: a concurrent process never reads a half-written binary.
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass  # a read-only home still runs, it just compiles again next time
    return data, path


#: ELF e_ident[EI_ABIVERSION] from which the CUDA ELF ABI keeps the SM version in e_flags bits
#: 8-15 (CUDA 13 for every target, CUDA 12.8+ for sm_100 and newer); older cubins keep it in
#: bits 0-7 (e.g. sm_90 from NVRTC 12.9: e_flags 0x5a055a, ABI 7; from NVRTC 13.0: 0x6005a04, ABI 8).
_CUDA_ELF_ABI_V2 = 8


def cubin_arch(cubin: bytes) -> int:
    """The SM version (e.g. 90) a cubin was built for, from its CUDA ELF header."""
    if len(cubin) < 0x34 or cubin[:4] != b"\x7fELF":
        raise ValueError("not an ELF cubin")
    if cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF cubin")
    flags = int.from_bytes(cubin[0x30:0x34], "little")
    abi_version = cubin[8]
    return (flags >> 8) & 0xFF if abi_version >= _CUDA_ELF_ABI_V2 else flags & 0xFF
