"""Fused CUDA backend: the bundled kernels (kernels/nca_step.cu), compiled by NVRTC at run time.

One launch per NCA step computes perception, fc0, ReLU, fc1, the fire mask (the engine's hash,
no random tensor) and the residual per cell, with the intermediates in registers: a level needs
the state, one output buffer and the compact image. Launches go on PyTorch's current stream, so
they order with every other torch operation; the level's weights are copied into the module's
constant memory on that stream before its steps.

If the kernels cannot be built or loaded (no cuda-bindings, no NVRTC library, a driver older
than NVRTC, an unsupported GPU) the reason is logged once and the level runs on the torch path.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass

import torch

from ...nca.errors import BackendUnavailable, InputError
from ...nca.weights import BackboneNCA
from ..base import Backend, LevelRun, StepCallback
from ...nca.packing import check_fusable, pack_weights
from ..base import fire_params
from ..torch_backend import TorchBackend

log = logging.getLogger(__name__)

#: Threads per block and candidate cells per lane: must match NCA_BLOCK / NCA_CANDIDATES.
BLOCK = 128
CANDIDATES = 4
CELLS_PER_BLOCK = BLOCK * CANDIDATES
MAX_GRID = 2**31 - 1

_warned: set[str] = set()
_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise BackendUnavailable(f"cuda-bindings is not installed ({exc}); pip install 'napari-octreenca[cuda]'") from None
    return driver


def _ok(result, what: str):
    """Unpack a cuda.bindings driver result tuple, raising on an error code."""
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise BackendUnavailable(f"CUDA driver call {what} failed: {name.decode() if name else err}")
    return rest[0] if len(rest) == 1 else rest


def pick_arch(capability: tuple[int, int], supported: list[int]) -> str:
    """The cubin architecture for a GPU: its own, else the newest of the same major below it.

    A cubin for sm_XY runs on GPUs of major X and minor >= Y, never across majors.
    """
    major, minor = capability
    own = major * 10 + minor
    same = [a for a in supported if a // 10 == major and a <= own]
    if not same:
        raise BackendUnavailable(
            f"this NVRTC cannot build for compute capability {major}.{minor} (it supports {supported}); "
            "update nvidia-cuda-nvrtc"
        )
    return f"sm_{max(same)}"


@dataclass
class _Module:
    """A loaded cubin for one (device, arch, model shape)."""

    module: object
    functions: dict[str, object]
    weights_ptr: int
    weights_bytes: int


_modules: dict[tuple, _Module] = {}


def _load_module(device: torch.device, channels: int, inputs: int, hidden: int) -> _Module:
    from . import nvrtc as nvrtc_compile

    index = device.index if device.index is not None else torch.cuda.current_device()
    defines = {"NCA_C": channels, "NCA_IN": inputs, "NCA_H": hidden}
    arch = pick_arch(torch.cuda.get_device_capability(index), nvrtc_compile.supported_archs())
    key = (index, arch, channels, inputs, hidden)
    with _lock:
        if key in _modules:
            return _modules[key]
        driver = _driver()
        cubin, path = nvrtc_compile.cached_cubin(arch, defines)
        _ok(driver.cuInit(0), "cuInit")
        with torch.cuda.device(index):
            torch.cuda.current_stream().synchronize()  # makes torch's primary context current here
            module = _ok(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({path.name})")
            functions = {
                name: _ok(driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
                for name in nvrtc_compile.ENTRY_POINTS
            }
            ptr, size = _ok(driver.cuModuleGetGlobal(module, b"nca_weights"), "cuModuleGetGlobal(nca_weights)")
        mod = _Module(module, functions, int(ptr), int(size))
        _modules[key] = mod
        log.info("loaded fused CUDA kernels %s for %s (%s)", path.name, arch, defines)
        return mod


def grid_size(cells: int) -> int:
    """Blocks for ``cells`` cells (the kernel loops when the grid is capped)."""
    return max(1, min(MAX_GRID, -(-cells // CELLS_PER_BLOCK)))


class CudaBackend(Backend):
    """Fused NCA steps on an NVIDIA GPU (float32 or bfloat16 state, float32 accumulation)."""

    name = "cuda"

    def __init__(self, poison: bool = False):
        #: Fill the output buffer with NaN before every step (tests: unwritten cells show).
        self.poison = poison

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to PyTorch"
        try:
            from . import nvrtc as nvrtc_compile

            major, _ = nvrtc_compile.nvrtc_version()
            driver = _driver()
            _ok(driver.cuInit(0), "cuInit")
            version = _ok(driver.cuDriverGetVersion(), "cuDriverGetVersion")
        except BackendUnavailable as exc:
            return False, str(exc)
        except Exception as exc:  # e.g. cuda.pathfinder cannot find libcuda (no driver installed)
            return False, f"the CUDA driver could not be used ({type(exc).__name__}: {exc})"
        if int(version) // 1000 < major:
            return False, (
                f"the NVIDIA driver supports CUDA {int(version) // 1000}.{int(version) % 1000 // 10} but NVRTC is "
                f"{major}.x; install nvidia-cuda-nvrtc-cu{int(version) // 1000} or update the driver"
            )
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cuda" and dtype in (torch.float32, torch.bfloat16)

    @torch.no_grad()
    def run_level(
        self,
        nca: BackboneNCA,
        image: torch.Tensor,
        state: torch.Tensor,
        run: LevelRun,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        if not self.supports(state.device, state.dtype):
            raise InputError(f"the cuda backend runs float32/bfloat16 CUDA tensors, got {state.dtype} on {state.device}")
        ok, why = check_fusable(nca)
        if not ok:
            _warn_once(f"fuse:{why}", f"fused CUDA kernels cannot run this model ({why}); using the torch path")
            return TorchBackend().run_level(nca, image, state, run, callback)
        try:
            mod = _load_module(state.device, nca.channels, nca.input_channels, nca.fc0.out_channels)
        except Exception as exc:  # any failure to build/load the kernels: say why once, stay correct
            _warn_once(f"load:{exc}", f"fused CUDA kernels unavailable ({exc}); using the torch path")
            return TorchBackend().run_level(nca, image, state, run, callback)
        return self._run(mod, nca, image, state, run, callback)

    def _run(self, mod: _Module, nca, image, state, run: LevelRun, callback) -> torch.Tensor:
        driver = _driver()
        dims = nca.spatial_dims
        dtype = state.dtype
        kind = "f32" if dtype == torch.float32 else "bf16"
        func = mod.functions[f"nca_step_{dims}d_{kind}"]
        image = image.to(dtype).contiguous()  # same numerics as the torch path
        state = state.contiguous()
        out = torch.empty_like(state)
        weights = pack_weights(nca, state.device)
        if weights.numel() * 4 > mod.weights_bytes:
            raise InputError("packed weights exceed the kernel's constant array; the model shape does not match")
        stream = torch.cuda.current_stream(state.device)
        cu_stream = driver.CUstream(stream.cuda_stream)
        _ok(
            driver.cuMemcpyDtoDAsync(
                driver.CUdeviceptr(mod.weights_ptr), driver.CUdeviceptr(weights.data_ptr()), weights.numel() * 4, cu_stream
            ),
            "cuMemcpyDtoDAsync(weights)",
        )
        spatial = tuple(state.shape[2:])
        nz, ny, nx = ((1,) + spatial) if dims == 2 else spatial
        origin = tuple(run.origin) or (0,) * dims
        oz, oy, ox = ((0,) + origin) if dims == 2 else origin
        batch = state.shape[0]
        grid = grid_size(batch * nz * ny * nx)
        types = (ctypes.c_void_p,) * 3 + (ctypes.c_longlong,) * 7 + (ctypes.c_uint32,) * 2
        for step in range(run.steps):
            key, thresh = fire_params(run, step)
            if self.poison:
                out.fill_(float("nan"))
            values = (image.data_ptr(), state.data_ptr(), out.data_ptr(), batch, nz, ny, nx, oz, oy, ox, key, thresh)
            _ok(
                driver.cuLaunchKernel(func, grid, 1, 1, BLOCK, 1, 1, 0, cu_stream, (values, types), 0),
                "cuLaunchKernel",
            )
            state, out = out, state
            if callback is not None:
                callback(step, state)
        return state


#: Registered by ``backends/__init__.py`` (the package imports this module, never the reverse).
BACKEND = CudaBackend
