"""Fused CUDA backend: the bundled kernels (kernels/nca_step.cu), compiled by NVRTC at run time.

One launch per NCA step computes perception, fc0, ReLU, fc1, the fire mask (the engine's hash,
no random tensor) and the residual per cell, with the intermediates in registers: a level needs
the state, one output buffer and the compact image. Launches go on PyTorch's current stream of
the tensors' device (inside a ``torch.cuda.device`` guard, so the driver calls use that
device's context), so they order with every other torch operation. The level's weights travel
by value in each launch's arguments: concurrent runs (two napari workers, two streams) never
share a weight buffer. Every launch is preceded by a check of the buffers' shapes, dtypes,
device and layout, since an out-of-bounds read would poison the CUDA context of the process.

If the kernels cannot be built or loaded (no cuda-bindings, no NVRTC library, a driver older
than NVRTC, an unsupported GPU) the reason is logged once and the level runs on the torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ...nca.errors import BackendUnavailable, InputError
from ...nca.packing import check_fusable, layout_size, pack_weights
from ...nca.weights import BackboneNCA
from ..base import Backend, LevelRun, StepCallback, fire_params
from ..torch_backend import TorchBackend

log = logging.getLogger(__name__)

#: Threads per block and candidate cells per lane: must match NCA_BLOCK / NCA_CANDIDATES.
BLOCK = 128
CANDIDATES = 4
CELLS_PER_BLOCK = BLOCK * CANDIDATES
MAX_GRID = 2**31 - 1
#: Kernel v2: threads per block (NCA2_THREADS) and resident blocks per SM the grid aims at
#: (it loops over the tiles, so each block stages the weights once for many tiles).
V2_THREADS = 128
V2_BLOCKS_PER_SM = 6  # NCA2_MIN_BLOCKS
#: Kernel parameter space (CUDA 12.1+, sm_70+): the weights travel as a by-value argument.
MAX_PARAM_BYTES = 32764
#: Bytes of the kernel's arguments before the weights: 3 pointers, 7 int64, 2 uint32.
ARG_BYTES = 3 * 8 + 7 * 8 + 2 * 4

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
        raise BackendUnavailable(
            f"cuda-bindings is not installed ({exc}); pip install 'napari-octreenca[cuda]' (CUDA 12) or '[cuda13]' (CUDA 13)"
        ) from None
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
    """What NVRTC builds for a GPU: see :func:`nvrtc.pick_target` (cubin, PTX only as a fallback)."""
    from .nvrtc import pick_target

    return pick_target(capability, supported)


def params_fit(nca: BackboneNCA) -> tuple[bool, str]:
    """Whether the level's packed weights fit the kernel's by-value argument."""
    size = ARG_BYTES + 4 * layout_size(nca.spatial_dims, nca.channels, nca.input_channels, nca.fc0.out_channels)
    if size > MAX_PARAM_BYTES:
        return False, f"its weights need {size} bytes of kernel arguments (at most {MAX_PARAM_BYTES})"
    return True, ""


def check_launch(nca: BackboneNCA, image: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> None:
    """Raise InputError unless the buffers are exactly what the kernel reads and writes.

    The kernel trusts its arguments: a wrong shape, dtype, device or stride would read or write
    out of bounds and poison the CUDA context of the whole process, so this runs before a launch.
    """
    dims, cu, cin = nca.spatial_dims, nca.channels - nca.input_channels, nca.input_channels
    if state.dim() != dims + 2 or state.shape[1] != cu:
        raise InputError(
            f"state must be (batch, {cu}, {dims} spatial axes) for this level, got shape {tuple(state.shape)}"
        )
    want_image = (state.shape[0], cin) + tuple(state.shape[2:])
    if tuple(image.shape) != want_image:
        raise InputError(f"image must have shape {want_image} to match the state, got {tuple(image.shape)}")
    for name, t in (("image", image), ("output", out)):
        if t.device != state.device or t.dtype != state.dtype:
            raise InputError(
                f"{name} is {t.dtype} on {t.device} but the state is {state.dtype} on {state.device}; "
                "move both to one device and dtype"
            )
    if tuple(out.shape) != tuple(state.shape):
        raise InputError(f"output must have the state's shape {tuple(state.shape)}, got {tuple(out.shape)}")
    for name, t in (("image", image), ("state", state), ("output", out)):
        if not t.is_contiguous():
            raise InputError(f"the {name} tensor must be contiguous for the fused kernel; call .contiguous()")
    if out.data_ptr() == state.data_ptr() and state.numel():
        raise InputError("the output buffer must not be the state buffer (the kernel reads neighbours)")


def launch_args(
    image: torch.Tensor,
    state: torch.Tensor,
    out: torch.Tensor,
    sizes: tuple[int, ...],
    key: int,
    thresh: int,
    weights: ctypes.Array | ctypes.c_void_p,
) -> tuple[int, list]:
    """cuLaunchKernel's ``kernelParams`` for one step: (address of the void* array, objects to keep alive).

    The kernel signature is ``(img, state, out, batch, nz, ny, nx, oz, oy, ox, key, thresh,
    weights)``: for kernel v1 the weights are a by-value float array (kernels/nca_step.cu,
    ``nca_weights``), for kernel v2 a pointer to the run's weight buffer (``wpack``).
    """
    values: list = [ctypes.c_void_p(t.data_ptr()) for t in (image, state, out)]
    values += [ctypes.c_longlong(int(v)) for v in sizes]
    values += [ctypes.c_uint32(key), ctypes.c_uint32(thresh), weights]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    return ctypes.addressof(pointers), [values, pointers]


def host_weights(nca: BackboneNCA) -> ctypes.Array:
    """The level's packed weights as a host float array (copied into every launch's arguments)."""
    flat = pack_weights(nca, "cpu").numpy()
    return (ctypes.c_float * flat.size).from_buffer_copy(flat.tobytes())


@dataclass
class _Module:
    """A loaded cubin for one (device, arch, model shape)."""

    module: object
    functions: dict[str, object]
    #: The device's primary context (the one PyTorch uses), retained for the module's lifetime.
    context: object


@contextlib.contextmanager
def _current(context) -> Iterator[None]:
    """Make ``context`` the calling thread's current driver context for the block."""
    driver = _driver()
    _ok(driver.cuCtxPushCurrent(context), "cuCtxPushCurrent")
    try:
        yield
    finally:
        _ok(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")


_modules: dict[tuple, _Module] = {}


def _load_module(device: torch.device, channels: int, inputs: int, hidden: int, variant: str = "v1") -> _Module:
    from . import nvrtc as nvrtc_compile

    index = device.index if device.index is not None else torch.cuda.current_device()
    defines = {"NCA_C": channels, "NCA_IN": inputs, "NCA_H": hidden}
    arch = nvrtc_compile.pick_target(torch.cuda.get_device_capability(index), nvrtc_compile.supported_archs())
    key = (index, arch, channels, inputs, hidden, variant)
    with _lock:
        if key in _modules:
            return _modules[key]
        driver = _driver()
        cubin, path = nvrtc_compile.cached_cubin(arch, defines, variant)
        _ok(driver.cuInit(0), "cuInit")
        torch.cuda.init()  # torch creates the primary context it runs in; the kernels join it
        context = _ok(
            driver.cuDevicePrimaryCtxRetain(_ok(driver.cuDeviceGet(index), "cuDeviceGet")), "cuDevicePrimaryCtxRetain"
        )
        with torch.cuda.device(index), _current(context):
            module = _ok(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({path.name})")
            functions = {
                name: _ok(driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
                for name in nvrtc_compile.VARIANTS[variant][1]
            }
        mod = _Module(module, functions, context)
        _modules[key] = mod
        log.info("loaded fused CUDA kernels %s (%s) for %s (%s)", path.name, variant, arch, defines)
        return mod


def grid_size(cells: int) -> int:
    """Blocks for ``cells`` cells (the kernel loops when the grid is capped)."""
    return max(1, min(MAX_GRID, -(-cells // CELLS_PER_BLOCK)))


class CudaBackend(Backend):
    """Fused NCA steps on an NVIDIA GPU (float32 or bfloat16 state, float32 accumulation)."""

    name = "cuda"

    def __init__(self, poison: bool = False, kernel: str | None = None):
        #: Fill the output buffer with NaN before every step (tests: unwritten cells show).
        self.poison = poison
        #: Kernel variant: "v1" (CUDA cores, float32 and bfloat16) or "v2" (tensor cores,
        #: bfloat16 states on sm_80+; float32 states still run v1). Default: $OCTREENCA_CUDA_KERNEL or v1.
        self.kernel = kernel or os.environ.get("OCTREENCA_CUDA_KERNEL", "v1")
        if self.kernel not in ("v1", "v2"):
            raise InputError(f"unknown CUDA kernel {self.kernel!r}; choose v1 or v2")

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
            raise InputError(
                f"the cuda backend runs float32/bfloat16 CUDA tensors, got {state.dtype} on {state.device}"
            )
        ok, why = check_fusable(nca)
        if ok:
            ok, why = params_fit(nca)
        if not ok:
            _warn_once(f"fuse:{why}", f"fused CUDA kernels cannot run this model ({why}); using the torch path")
            return TorchBackend().run_level(nca, image, state, run, callback)
        variant = self._variant(state)
        try:
            mod = _load_module(state.device, nca.channels, nca.input_channels, nca.fc0.out_channels, variant)
        except Exception as exc:  # any failure to build/load the kernels: say why once, stay correct
            _warn_once(f"load:{exc}", f"fused CUDA kernels unavailable ({exc}); using the torch path")
            return TorchBackend().run_level(nca, image, state, run, callback)
        if variant == "v2":
            return self._run_v2(mod, nca, image, state, run, callback)
        return self._run(mod, nca, image, state, run, callback)

    def _variant(self, state: torch.Tensor) -> str:
        """The kernel that runs this state: v2 only for bfloat16 on sm_80+, else v1 (said once)."""
        if self.kernel != "v2":
            return "v1"
        if state.dtype != torch.bfloat16:
            _warn_once("v2:f32", "kernel v2 runs bfloat16 states (tensor cores); float32 states run kernel v1")
            return "v1"
        major, minor = torch.cuda.get_device_capability(state.device)
        if major * 10 + minor < 80:
            _warn_once("v2:arch", f"kernel v2 needs compute capability 8.0+, this GPU is {major}.{minor}; using v1")
            return "v1"
        return "v2"

    def _run(self, mod: _Module, nca, image, state, run: LevelRun, callback) -> torch.Tensor:
        driver = _driver()
        dims = nca.spatial_dims
        dtype = state.dtype
        kind = "f32" if dtype == torch.float32 else "bf16"
        func = mod.functions[f"nca_step_{dims}d_{kind}"]
        image = image.to(dtype).contiguous()  # same numerics as the torch path
        state = state.contiguous()
        out = torch.empty_like(state)
        check_launch(nca, image, state, out)
        weights = host_weights(nca)
        spatial = tuple(state.shape[2:])
        nz, ny, nx = ((1,) + spatial) if dims == 2 else spatial
        origin = tuple(run.origin) or (0,) * dims
        oz, oy, ox = ((0,) + origin) if dims == 2 else origin
        batch = state.shape[0]
        grid = grid_size(batch * nz * ny * nx)
        # Driver calls act on the thread's current context: make it the tensors' device's
        # (cuda:1 ...), whatever device or context the calling thread had.
        with torch.cuda.device(state.device), _current(mod.context):
            cu_stream = driver.CUstream(torch.cuda.current_stream(state.device).cuda_stream)
            for step in range(run.steps):
                key, thresh = fire_params(run, step)
                if self.poison:
                    out.fill_(float("nan"))
                check_launch(nca, image, state, out)  # a callback may have swapped a buffer
                params, keep = launch_args(image, state, out, (batch, nz, ny, nx, oz, oy, ox), key, thresh, weights)
                _ok(driver.cuLaunchKernel(func, grid, 1, 1, BLOCK, 1, 1, 0, cu_stream, params, 0), "cuLaunchKernel")
                del keep  # cuLaunchKernel copied the arguments
                state, out = out, state
                if callback is not None:
                    callback(step, state)
        return state

    def _run_v2(self, mod: _Module, nca, image, state, run: LevelRun, callback) -> torch.Tensor:
        """Kernel v2: bfloat16 state, a per-run weight buffer on the device (never shared)."""
        import numpy as np

        from .fragments import layout_of, pack_v2

        driver = _driver()
        dims = nca.spatial_dims
        func = mod.functions[f"nca2_step_{dims}d_bf16"]
        image = image.to(state.dtype).contiguous()
        state = state.contiguous()
        out = torch.empty_like(state)
        check_launch(nca, image, state, out)
        # This run's own weight buffer; the caching allocator keeps it for this stream's order.
        words = torch.from_numpy(pack_v2(nca).view(np.int32)).to(state.device, non_blocking=False)
        spatial = tuple(state.shape[2:])
        nz, ny, nx = ((1,) + spatial) if dims == 2 else spatial
        origin = tuple(run.origin) or (0,) * dims
        oz, oy, ox = ((0,) + origin) if dims == 2 else origin
        batch = state.shape[0]
        tz, ty, tx = layout_of(nca).tile
        tiles = batch * -(-nz // tz) * -(-ny // ty) * -(-nx // tx)
        sms = torch.cuda.get_device_properties(state.device).multi_processor_count
        grid = max(1, min(tiles, sms * V2_BLOCKS_PER_SM))
        with torch.cuda.device(state.device), _current(mod.context):
            cu_stream = driver.CUstream(torch.cuda.current_stream(state.device).cuda_stream)
            for step in range(run.steps):
                key, thresh = fire_params(run, step)
                if self.poison:
                    out.fill_(float("nan"))
                check_launch(nca, image, state, out)
                params, keep = launch_args(
                    image, state, out, (batch, nz, ny, nx, oz, oy, ox), key, thresh, ctypes.c_void_p(words.data_ptr())
                )
                _ok(
                    driver.cuLaunchKernel(func, grid, 1, 1, V2_THREADS, 1, 1, 0, cu_stream, params, 0),
                    "cuLaunchKernel(v2)",
                )
                del keep
                state, out = out, state
                if callback is not None:
                    callback(step, state)
        return state


#: Registered by ``backends/__init__.py`` (the package imports this module, never the reverse).
BACKEND = CudaBackend
