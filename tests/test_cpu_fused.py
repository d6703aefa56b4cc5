"""The fused CPU backend (numba) against the torch path: same seed, same answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_octreenca.backends import get_backend
from napari_octreenca.backends.base import LevelRun
from napari_octreenca.backends.torch_backend import TorchBackend
from napari_octreenca.nca.config import preset
from napari_octreenca.nca.errors import Cancelled
from napari_octreenca.nca.octree import OctreeNCA
from napari_octreenca.nca.weights import BackboneNCA
from napari_octreenca.run.inference import run_octree

cpu_fused = pytest.importorskip("napari_octreenca.backends.cpu_fused")
CpuFusedBackend = cpu_fused.CpuFusedBackend


def random_level(c: int, cin: int, h: int, dims: int, seed: int, scale: float = 1.0) -> BackboneNCA:
    torch.manual_seed(seed)
    nca = BackboneNCA(c, h, cin, dims)
    with torch.no_grad():
        for p in nca.parameters():
            p.copy_(scale * torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    return nca


def random_model(cfg, seed: int) -> OctreeNCA:
    torch.manual_seed(seed)
    model = OctreeNCA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
    return model.eval()


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (2, 7), (9, 4), (13, 17), (1, 3, 2), (2, 2, 2), (3, 5, 4), (6, 1, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_fused_level_matches_torch(shape, fire_rate) -> None:
    dims = len(shape)
    nca = random_level(12, 2, 32, dims, seed=sum(shape))
    g = torch.Generator().manual_seed(1 + sum(shape))
    image = torch.randn((2, 2) + shape, generator=g)
    state = torch.randn((2, 10) + shape, generator=g)
    run = LevelRun(level=1, steps=3, seed=2**40 + 17, fire_rate=fire_rate, origin=tuple(range(5, 5 + dims)))
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    seen: list[int] = []
    out = CpuFusedBackend().run_level(nca, image, state.clone(), run, lambda s, st: seen.append(s))
    assert seen == [0, 1, 2]
    assert out.shape == state.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(70, 29), (7, 21, 13)], ids=lambda s: "x".join(map(str, s)))
def test_fused_runs_and_chunks_match_torch_and_any_thread_count(shape) -> None:
    """Shapes with many row chunks and y-runs (incl. short last runs): equal to the torch path,
    and bitwise the same with 1 and 2 threads (fixed chunks, any worker takes any chunk)."""
    dims = len(shape)
    nca = random_level(16, 1, 64, dims, seed=3)
    g = torch.Generator().manual_seed(4)
    image, state = torch.randn((2, 1) + shape, generator=g), torch.randn((2, 15) + shape, generator=g)
    run = LevelRun(level=0, steps=2, seed=11, fire_rate=0.5, origin=(3,) * dims)
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    one = CpuFusedBackend(num_threads=1).run_level(nca, image, state.clone(), run)
    two = CpuFusedBackend(num_threads=2).run_level(nca, image, state.clone(), run)
    assert (one - ref).abs().max().item() < 1e-5
    assert torch.equal(one, two)
    b1 = CpuFusedBackend(num_threads=1).run_level(nca, image.bfloat16(), state.bfloat16(), run)
    b2 = CpuFusedBackend(num_threads=2).run_level(nca, image.bfloat16(), state.bfloat16(), run)
    assert torch.equal(b1, b2)
    ref16 = TorchBackend().run_level(nca, image.bfloat16().float(), state.bfloat16().float(), run)
    assert ((b1.float() - ref16).abs() / ref16.abs().clamp_min(1.0)).max().item() < 2e-2


@pytest.mark.parametrize("dims", [2, 3])
def test_odd_channel_counts(dims) -> None:
    """Channel and hidden counts that are not multiples of the loop blocking (remainder paths)."""
    nca = random_level(9, 2, 15, dims, seed=21)  # 2C = 18, hidden 15, C - in = 7
    shape = (11, 6) if dims == 2 else (5, 3, 6)
    image, state = torch.randn((1, 2) + shape), torch.randn((1, 7) + shape)
    run = LevelRun(level=0, steps=2, seed=8, fire_rate=0.5)
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    out = CpuFusedBackend().run_level(nca, image, state.clone(), run)
    assert (out - ref).abs().max().item() < 1e-5


def test_fused_bf16_matches_torch_bf16() -> None:
    nca = random_level(16, 3, 64, 2, seed=5)
    image = torch.randn(1, 3, 23, 31).bfloat16()
    state = torch.randn(1, 13, 23, 31).bfloat16()
    run = LevelRun(level=0, steps=2, seed=3, fire_rate=0.5)
    out = CpuFusedBackend().run_level(nca, image, state.clone(), run)
    assert out.dtype == torch.bfloat16
    fp32 = TorchBackend().run_level(nca, image.float(), state.float(), run)
    rel = ((out.float() - fp32).abs() / fp32.abs().clamp_min(1.0)).max().item()
    assert rel < 2e-2


def test_callback_sees_live_state_and_can_cancel() -> None:
    nca = random_level(8, 1, 16, 2, seed=2)
    image, state = torch.randn(1, 1, 6, 5), torch.randn(1, 7, 6, 5)
    states: list[torch.Tensor] = []

    def cb(step: int, st: torch.Tensor) -> None:
        states.append(st.clone())
        if step == 1:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        CpuFusedBackend().run_level(nca, image, state.clone(), LevelRun(0, 5, 1, 0.5), cb)
    assert len(states) == 2
    ref = TorchBackend().run_level(nca, image, state.clone(), LevelRun(0, 2, 1, 0.5))
    assert (states[1] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,shape", [("pathology", (37, 45)), ("radiology", (9, 14, 11))])
def test_whole_octree_matches_torch(name, shape) -> None:
    """All levels, same seed: the fused backend gives the torch path's logits."""
    cfg = preset(name, steps=(2, 2, 2, 2, 3))
    model = random_model(cfg, seed=11)
    image = torch.randn((1, cfg.input_channels) + shape)
    ref = run_octree(model, image, seed=7, backend="torch")
    out = run_octree(model, image, seed=7, backend="cpu-fused")
    assert out.shape == (1, 1) + shape
    assert (out - ref).abs().max().item() < 1e-4


def test_registry_and_supports() -> None:
    assert get_backend("cpu-fused").name == "cpu-fused"
    assert get_backend("auto", "cpu", torch.float32).name == "cpu-fused"
    be = CpuFusedBackend()
    assert be.supports(torch.device("cpu"), torch.bfloat16)
    assert not be.supports(torch.device("cuda"), torch.float32)
    assert not be.supports(torch.device("cpu"), torch.float16)


def test_rejects_unfusable_level() -> None:
    from napari_octreenca.nca.errors import InputError

    nca = BackboneNCA(8, 16, 1, 2, kernel_size=5)
    with pytest.raises(InputError, match="backend='torch'"):
        CpuFusedBackend().run_level(nca, torch.zeros(1, 1, 4, 4), torch.zeros(1, 7, 4, 4), LevelRun(0, 1, 0, 1.0))


def test_real_image_matches_torch(skin_files) -> None:
    """A crop of the real H&E skin section through a random pathology model, both backends."""
    import tifffile

    from napari_octreenca.run.inference import segment

    rgb = tifffile.imread(skin_files[0])
    crop = np.ascontiguousarray(rgb[:96, :128, :3])
    cfg = preset("pathology", steps=(3, 3, 3, 3, 4))
    model = random_model(cfg, seed=4)
    a = segment(model, crop, axes="YXC", backend="torch", seed=2)
    b = segment(model, crop, axes="YXC", backend="cpu-fused", seed=2)
    assert b.record["backend"] == "cpu-fused"
    assert np.abs(a.logits - b.logits).max() < 1e-4


def test_bf16_segmentation_agrees_with_fp32_on_real_input(skin_files) -> None:
    """bfloat16 state does not change the answer: the bundled H&E model on the real skin section."""
    from napari_octreenca.data_sources import skin_sample
    from napari_octreenca.nca.registry import open_model
    from napari_octreenca.resources import bundled_models
    from napari_octreenca.run.resample import segment_at_model_spacing
    from napari_octreenca.run.training import hard_dice

    if "he_epidermis" not in bundled_models():
        pytest.skip("the bundled he_epidermis model is absent")
    model = open_model("he_epidermis")
    image, _ = skin_sample()
    fp32 = segment_at_model_spacing(model, image, axes="YXC", backend="cpu-fused", dtype="float32", seed=0)
    bf16 = segment_at_model_spacing(model, image, axes="YXC", backend="cpu-fused", dtype="bfloat16", seed=0)
    assert fp32.labels.any()
    assert hard_dice(bf16.labels, fp32.labels) >= 0.99


def test_tile_product_every_block_shape() -> None:
    """The fc0/fc1 tile product (8 x 4 blocks, rows left over by 4 and 1, inputs by 1) equals a
    float64 matrix product for every remainder of rows and inputs, and leaves the cells past kn."""
    from napari_octreenca.backends import cpu_fused

    rng = np.random.default_rng(0)
    for rows in range(1, 18):
        for n_in in range(1, 10):
            w = rng.standard_normal((rows, n_in)).astype(np.float32)
            x = rng.standard_normal((n_in, 40)).astype(np.float32)
            out = rng.standard_normal((rows, 40)).astype(np.float32)
            want = out.astype(np.float64) + w.astype(np.float64) @ x.astype(np.float64)
            before = out.copy()
            cpu_fused._accumulate(out, w, x, 33)
            assert np.allclose(out[:, :33], want[:, :33], rtol=1e-5, atol=1e-5), (rows, n_in)
            assert np.array_equal(out[:, 33:], before[:, 33:])


def test_chunks_depend_on_the_shape_alone() -> None:
    """Row chunks: at most the cap, at least _MIN_CHUNK_CELLS cells (short 3D rows made 2-row
    chunks of ~16-cell tiles), a function of (rows, nx) only."""
    from napari_octreenca.backends.cpu_fused import _MIN_CHUNK_CELLS, chunk_rows

    assert chunk_rows(512, 16, 256) * 16 >= _MIN_CHUNK_CELLS
    assert chunk_rows(16384, 128, 256) == 64  # large levels: the cap decides
    assert chunk_rows(7, 8, 256) == 7  # never more than the rows
    for rows, nx in [(2048, 32), (64, 16), (100000, 1)]:
        per = chunk_rows(rows, nx, 256)
        assert -(-rows // per) <= 256 and (per * nx >= _MIN_CHUNK_CELLS or per == rows)
