"""Fused CUDA kernels against the torch path on a real NVIDIA GPU (skipped without one).

Run by ``benchmarks/gpu_check.py``. The output buffer is poisoned with NaN before every step so
a cell the kernel does not write shows. ``OCTREENCA_REQUIRE_GPU=1`` turns a skip into a failure.

The torch references run with TF32 off: PyTorch lets cuDNN convolutions use TF32 (10-bit
mantissa) by default, which alone would break the float32 comparisons at 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

from napari_octreenca.backends.base import LevelRun
from napari_octreenca.backends.torch_backend import TorchBackend
from napari_octreenca.nca.config import preset
from napari_octreenca.nca.octree import OctreeNCA
from napari_octreenca.nca.weights import BackboneNCA
from napari_octreenca.run.inference import run_octree

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 references: no TF32 in cuDNN convolutions or matmuls during a test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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


SHAPES = [
    (1, 1),
    (2, 2),
    (1, 9),
    (7, 3),
    (33, 65),
    (130, 257),
    (1, 1, 1),
    (2, 2, 2),
    (1, 5, 3),
    (3, 1, 7),
    (9, 17, 33),
    (31, 12, 5),
]


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
    ref = TorchBackend().run_level(nca, img_w, st_w, LevelRun(0, 1, 1, 0.5, origin=(ny - 40, nx - 50)))
    got = out[(...,) + window].float()
    # The window's low borders are not the image's: compare from one cell inside them.
    diff = (got - ref)[..., 1:, 1:].abs() / ref[..., 1:, 1:].abs().clamp_min(1.0)
    assert diff.max().item() < 1e-2


def CudaBackendNoPoison():
    from napari_octreenca.backends.cuda.backend import CudaBackend

    return CudaBackend(poison=False)


def test_wrong_shapes_raise_before_launch(cuda_backend) -> None:
    """A state that does not match the level is refused with a clear error; the context stays usable."""
    from napari_octreenca.nca.errors import InputError

    nca = random_level(16, 3, 64, 2, seed=2)
    image = torch.randn((1, 3, 9, 9), device="cuda")
    run = LevelRun(level=0, steps=1, seed=0, fire_rate=0.5)
    with pytest.raises(InputError, match="state must be"):
        cuda_backend.run_level(nca, image, torch.randn((1, 12, 9, 9), device="cuda"), run)
    with pytest.raises(InputError, match="image must have shape"):
        cuda_backend.run_level(nca, image[..., :8], torch.randn((1, 13, 9, 9), device="cuda"), run)
    torch.cuda.synchronize()  # an out-of-bounds access would surface here as a sticky error
    state = torch.randn((1, 13, 9, 9), device="cuda")
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    assert (cuda_backend.run_level(nca, image, state.clone(), run) - ref).abs().max().item() < 1e-5


def test_concurrent_runs_keep_their_own_weights(cuda_backend) -> None:
    """Two threads on two streams with two models, launches interleaved: each result is its own model's."""
    import threading

    shape = (257, 263)
    models = [random_level(16, 3, 64, 2, seed=s) for s in (11, 12)]
    g = torch.Generator(device="cuda").manual_seed(0)
    image = torch.randn((1, 3) + shape, generator=g, device="cuda")
    state = torch.randn((1, 13) + shape, generator=g, device="cuda")
    run = LevelRun(level=0, steps=8, seed=3, fire_rate=0.5)
    refs = [TorchBackend().run_level(m, image, state.clone(), run) for m in models]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                barrier.wait()
                out = state.clone()
                for _ in range(5):
                    out = CudaBackendNoPoison().run_level(models[i], image, state.clone(), run)
                stream.synchronize()
                results[i] = out
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    torch.cuda.synchronize()  # inputs and references are ready before the side streams read them
    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert (results[i] - refs[i]).abs().max().item() < 1e-4, f"run {i} used the other model's weights"


def test_second_device_runs_in_its_own_context(cuda_backend) -> None:
    """Tensors on cuda:1 while cuda:0 is current: the launch goes to cuda:1's context."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    nca = random_level(16, 3, 64, 2, seed=5).to("cuda:1")
    image = torch.randn((1, 3, 33, 47), device="cuda:1")
    state = torch.randn((1, 13, 33, 47), device="cuda:1")
    run = LevelRun(level=0, steps=2, seed=1, fire_rate=0.5)
    with torch.cuda.device(0):
        out = cuda_backend.run_level(nca, image, state.clone(), run)
    ref = TorchBackend().run_level(nca, image, state.clone(), run)
    assert out.device == image.device and (out - ref).abs().max().item() < 1e-5


# -- kernel v2 (tensor cores, bfloat16) -------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_v2(cuda_backend):
    from napari_octreenca.backends.cuda.backend import CudaBackend

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("kernel v2 needs compute capability 8.0+")
    return CudaBackend(poison=True, kernel="v2")


V2_SHAPES = [
    (1, 1),
    (2, 2),
    (7, 3),
    (9, 33),
    (33, 65),
    (130, 257),
    (1, 1, 1),
    (2, 5, 3),
    (5, 5, 9),
    (9, 17, 33),
    (31, 12, 5),
]


@pytest.mark.parametrize("shape", V2_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", [(16, 3, 64), (10, 1, 24)], ids=["C16", "C10"])
def test_v2_bf16_equals_its_reference(cuda_v2, shape, config) -> None:
    """One step of v2 against its torch model (bf16 matmul inputs), every face; and the fp32 torch path."""
    from napari_octreenca.backends.cuda.fragments import reference_step_v2
    from napari_octreenca.nca.firemask import fire_mask_torch

    c, cin, h = config
    dims = len(shape)
    nca = random_level(c, cin, h, dims, seed=sum(shape) + 1)
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    image = torch.randn((2, cin) + shape, generator=g, device="cuda").bfloat16()
    state = torch.randn((2, c - cin) + shape, generator=g, device="cuda").bfloat16()
    run = LevelRun(level=1, steps=1, seed=2**40 + 3, fire_rate=0.5, origin=tuple(range(7, 7 + dims)))
    out = cuda_v2.run_level(nca, image, state.clone(), run)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out.float()).any(), "cells left unwritten"
    mask = fire_mask_torch(shape, run.origin, run.seed, run.level, 0, run.fire_rate, "cuda")[None, None]
    model = reference_step_v2(nca, image, state, mask).float()
    diff = (out.float() - model).abs()
    # Within bf16 rounding: tensor-core summation order may flip a rounding of h or of the output.
    assert (diff <= 2**-6 * model.abs() + 1e-3).all(), diff.max().item()
    assert torch.equal(out[~mask.expand_as(out)], state[~mask.expand_as(state)])
    ref = TorchBackend().run_level(nca, image.float(), state.float(), run)
    assert ((out.float() - ref).abs() / ref.abs().clamp_min(1.0)).max().item() < 5e-2


def test_v2_several_steps_agree_with_v1(cuda_v2) -> None:
    nca = random_level(16, 3, 64, 2, seed=3)
    image = torch.randn((1, 3, 200, 301), device="cuda").bfloat16()
    state = torch.randn((1, 13, 200, 301), device="cuda").bfloat16()
    run = LevelRun(level=0, steps=6, seed=5, fire_rate=0.5)
    v2 = cuda_v2.run_level(nca, image, state.clone(), run)
    v1 = CudaBackendNoPoison().run_level(nca, image, state.clone(), run)
    ref = TorchBackend().run_level(nca, image.float(), state.float(), run)
    for got in (v1, v2):
        assert ((got.float() - ref).abs() / ref.abs().clamp_min(1.0)).max().item() < 5e-2


def test_v2_64bit_indexing(cuda_v2) -> None:
    """More than 2^31 state elements with kernel v2: the far end is still right."""
    free, _ = torch.cuda.mem_get_info()
    ny, nx = 12000, 14000
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    from napari_octreenca.backends.cuda.backend import CudaBackend

    nca = random_level(16, 3, 64, 2, seed=4)
    image = torch.randn((1, 3, ny, nx), device="cuda").bfloat16()
    state = torch.randn((1, 13, ny, nx), device="cuda").bfloat16()
    run = LevelRun(level=0, steps=1, seed=1, fire_rate=0.5)
    window = (slice(ny - 40, ny), slice(nx - 50, nx))
    img_w, st_w = image[(...,) + window].float(), state[(...,) + window].float()
    out = CudaBackend(kernel="v2").run_level(nca, image, state, run)
    ref = TorchBackend().run_level(nca, img_w, st_w, LevelRun(0, 1, 1, 0.5, origin=(ny - 40, nx - 50)))
    got = out[(...,) + window].float()
    diff = (got - ref)[..., 1:, 1:].abs() / ref[..., 1:, 1:].abs().clamp_min(1.0)
    assert diff.max().item() < 5e-2
