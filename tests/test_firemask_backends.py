"""Every backend fires exactly the cells of the engine's counter-based hash.

The fire mask is read back from each backend's output (a cell that fires changes: the weights
are chosen so that every update is non-zero), and compared with ``fire_mask_numpy`` for
several seeds (including 64-bit ones), levels, steps and origins beyond 2^32.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from napari_octreenca.backends.base import LevelRun
from napari_octreenca.backends.torch_backend import TorchBackend
from napari_octreenca.nca.firemask import fire_mask_numpy
from napari_octreenca.nca.weights import BackboneNCA

CASES = [
    # (shape, origin, seed, level, fire_rate)
    ((17, 23), (0, 0), 0, 0, 0.5),
    ((16, 9), (2**32 + 3, 7), 2**40 + 9, 3, 0.25),
    ((5, 6, 7), (0, 1, 2), 123, 1, 0.5),
    ((4, 3, 9), (2**33, 5, 2**31 - 2), 2**63 - 1, 4, 0.75),
]


def changing_level(dims: int, cin: int = 2) -> BackboneNCA:
    """Weights whose update is non-zero in every channel of every cell."""
    nca = BackboneNCA(8, 16, cin, dims)
    with torch.no_grad():
        nca.conv.weight.zero_()
        nca.conv.bias.zero_()
        nca.fc0.weight.zero_()
        nca.fc0.bias.fill_(1.0)  # h = 1 after ReLU
        nca.fc1.weight.fill_(0.25)  # dx = 4 in every channel
    return nca


def fired_cells(out: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return (out != state).all(dim=1)[0]


def backends() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = [("torch", TorchBackend())]
    try:
        from napari_octreenca.backends.cpu_fused import CpuFusedBackend

        found.append(("cpu-fused", CpuFusedBackend()))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("name,backend", backends(), ids=[n for n, _ in backends()])
@pytest.mark.parametrize("shape,origin,seed,level,fire_rate", CASES)
def test_backend_fire_mask_is_the_engine_hash(name, backend, shape, origin, seed, level, fire_rate) -> None:
    dims = len(shape)
    nca = changing_level(dims)
    image = torch.zeros((1, 2) + shape)
    state = torch.zeros((1, 6) + shape)
    for step in (0, 5):
        # One step of a level is step 0; step 5 is reached by running 6 steps and comparing the last.
        steps = step + 1
        seen: list[torch.Tensor] = []
        backend.run_level(
            nca,
            image,
            state.clone(),
            LevelRun(level, steps, seed, fire_rate, origin),
            lambda s, st, seen=seen: seen.append(st.clone()),
        )
        before = seen[-2] if len(seen) > 1 else state
        got = fired_cells(seen[-1], before)
        want = torch.from_numpy(fire_mask_numpy(shape, origin, seed, level, step, fire_rate))
        assert torch.equal(got, want), f"{name}: fire mask differs at step {step}"
        # The rate is roughly what was asked for (the hash is not degenerate).
        if want.numel() > 100:
            assert abs(want.float().mean().item() - fire_rate) < 0.15


def test_kernel_source_fire_mask_is_the_engine_hash(tmp_path) -> None:
    """The CUDA kernels' fire test (nca_common.cuh) compiled as host code, on whole blocks."""
    from test_kernel_host import _compile

    from napari_octreenca.backends.base import fire_params

    dll = _compile(tmp_path, 8, 2, 16)
    for shape, origin, seed, level, fire_rate in CASES:
        dims = len(shape)
        run = LevelRun(level, 1, seed, fire_rate, origin)
        key, thresh = fire_params(run, 3)
        want = fire_mask_numpy(shape, origin, seed, level, 3, fire_rate)
        full = ((0,) * (3 - dims)) + tuple(origin)
        import itertools

        for idx in itertools.product(*(range(n) for n in shape)):
            pos = ((0,) * (3 - dims)) + idx
            got = dll.nca_host_fires(dims, key, thresh, *(o + p for o, p in zip(full, pos)))
            assert bool(got) == bool(want[idx])
    assert isinstance(dll, ctypes.CDLL)
