"""Fused CPU training (numba forward + backward) against autograd through the reference step."""

from __future__ import annotations

import pytest
import torch

from napari_octreenca.nca.config import preset
from napari_octreenca.nca.octree import OctreeNCA, reference_level_steps
from napari_octreenca.nca.weights import BackboneNCA

cpu_train = pytest.importorskip("napari_octreenca.backends.cpu_train")
if not cpu_train.available():
    pytest.skip("numba is not installed", allow_module_level=True)


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen) / max(1.0, p[0].numel() ** 0.5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _grads(runner, nca, image, state, **kw) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    nca.zero_grad(set_to_none=True)
    state = state.clone().requires_grad_(True)
    out = runner(nca, image, state, **kw)
    # A loss that weighs every output cell and channel differently.
    w = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach(), [p.grad.clone() for p in nca.parameters()], state.grad.clone()


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),
        (2, 5),
        (3, 3),
        (7, 9),
        (13, 6),
        (40, 29),
        (1, 2, 3),
        (2, 2, 2),
        (3, 3, 3),
        (4, 5, 3),
        (6, 1, 5),
        (5, 19, 11),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_level_gradients_equal_autograd(shape, fire_rate) -> None:
    """Output and every gradient (weights and incoming state) within 1e-4 of autograd's."""
    dims = len(shape)
    nca = BackboneNCA(12, 24, 3, dims)
    _randomise(nca, seed=sum(shape))
    g = torch.Generator().manual_seed(7 + sum(shape))
    image = torch.randn((2, 3) + shape, generator=g)
    state = torch.randn((2, 9) + shape, generator=g)
    kw = {"level": 2, "steps": 4, "seeds": [5, 2**40 + 3], "origin": tuple(range(3, 3 + dims)), "fire_rate": fire_rate}
    ref_out, ref_g, ref_s = _grads(reference_level_steps, nca, image, state, **kw)
    out, grads, gs = _grads(cpu_train.run_level_fused, nca, image, state, **kw)
    assert _rel(out, ref_out) < 1e-5
    for name, a, b in zip([n for n, _ in nca.named_parameters()], grads, ref_g):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-4, name
    assert _rel(gs, ref_s) < 1e-4


@pytest.mark.parametrize(
    "name,shape,patch",
    [
        ("pathology", (40, 36), None),
        ("radiology", (20, 18, 12), (8, 8, 6)),
    ],
)
def test_octree_gradients_equal_autograd(name, shape, patch) -> None:
    """All levels through forward_train (3D with the patch scheme): same logits and gradients."""
    cfg = preset(name, steps=(3, 3, 2, 2, 4))
    model = OctreeNCA(cfg)
    _randomise(model, seed=3)
    image = torch.randn((2, cfg.input_channels) + shape, generator=torch.Generator().manual_seed(1))
    results = []
    for runner in (None, cpu_train.run_level_fused):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(9)
        logits, where = model.forward_train(image, [11, 12], patch_size=patch, generator=gen, level_steps=runner)
        (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
        results.append((logits.detach(), where, [p.grad.clone() for p in model.parameters()]))
    (ref, ref_where, ref_g), (out, where, grads) = results
    assert where == ref_where
    assert _rel(out, ref) < 1e-5
    for a, b in zip(grads, ref_g):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("name,shape,patch", [("pathology", (40, 36), None), ("radiology", (20, 18, 12), (8, 8, 6))])
def test_runner_pool_reuses_buffers_with_the_same_gradients(name, shape, patch) -> None:
    """A FusedLevelRunner reuses its step arrays from the second iteration on (the pool does not
    grow) and the gradients are bitwise those of fresh arrays: every pooled byte is written
    before it is read."""
    cfg = preset(name, steps=(3, 3, 2, 2, 4))
    model = OctreeNCA(cfg)
    _randomise(model, seed=4)
    image = torch.randn((2, cfg.input_channels) + shape, generator=torch.Generator().manual_seed(2))
    runner = cpu_train.FusedLevelRunner()
    pooled = []
    for it in range(3):
        grads = []
        for step in (cpu_train.run_level_fused, runner):
            model.zero_grad(set_to_none=True)
            gen = torch.Generator().manual_seed(20 + it)
            logits, _ = model.forward_train(image, [it, it + 7], patch_size=patch, generator=gen, level_steps=step)
            (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
        pooled.append(sum(len(v) for v in runner.pool._free.values()))
    assert pooled[0] > 0 and pooled[0] == pooled[1] == pooled[2]


def test_runner_pool_drops_old_shapes() -> None:
    """When the batch shape changes, the pool lets go of shapes the last iteration did not use:
    it holds at most the last two iterations' arrays, never a pile of old sizes."""
    cfg = preset("pathology", steps=(2, 2, 3), factors=((2, 2),) * 2)
    model = OctreeNCA(cfg)
    _randomise(model, seed=5)

    def iteration(runner, size: int) -> int:
        image = torch.randn((2, cfg.input_channels, size, size), generator=torch.Generator().manual_seed(size))
        logits, _ = model.forward_train(image, [1, 2], level_steps=runner)
        logits.sum().backward()
        return runner.pool.pooled_bytes()

    sizes = (32, 48, 40, 56, 56)
    alone = {s: iteration(cpu_train.FusedLevelRunner(), s) for s in set(sizes)}
    runner = cpu_train.FusedLevelRunner()
    held = [iteration(runner, s) for s in sizes]
    assert held[0] == alone[32] > 0
    for k in (1, 2, 3):
        assert held[k] == alone[sizes[k]] + alone[sizes[k - 1]]
    assert held[4] == alone[56]  # the same size again: only its arrays, all reused


def _toy_pairs():
    import numpy as np

    from napari_octreenca.run.training import TrainPair

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(2):
        lab = np.zeros((24, 28), np.uint8)
        y, x = rng.integers(3, 14, 2)
        lab[y : y + 8, x : x + 9] = 1
        img = np.stack([lab * 180 + 40, lab * 20 + 90, 200 - lab * 100], -1).astype(np.uint8)
        pairs.append(TrainPair(img, lab, "YXC"))
    return pairs


def test_train_uses_the_fused_step_on_cpu_and_can_fall_back(monkeypatch) -> None:
    """train() runs every level through the fused step on the CPU; fused_cpu=False is autograd."""
    from napari_octreenca.run.training import TrainConfig, train

    calls: list[int] = []
    real = cpu_train.run_level_fused

    def counting(*args, **kwargs):
        calls.append(args[3])  # the level
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_train, "run_level_fused", counting)
    cfg = preset("pathology", steps=(2, 2, 3), factors=((2, 2),) * 2)
    tc = TrainConfig(iterations=2, batch_size=2, crop=(16, 16), seed=1)
    fused = train(cfg, _toy_pairs(), tc)
    assert sorted(set(calls)) == [0, 1, 2] and len(calls) == 2 * 3
    assert fused.model.config.provenance["train_step"] == "cpu-fused"
    calls.clear()
    ref = train(cfg, _toy_pairs(), TrainConfig(**{**tc.__dict__, "fused_cpu": False}))
    assert not calls and ref.model.config.provenance["train_step"] == "autograd"
    # Same data, seeds and masks: the two paths train to the same weights (within rounding).
    for a, b in zip(fused.model.parameters(), ref.model.parameters()):
        assert _rel(a.detach(), b.detach()) < 1e-2
    assert abs(fused.history[-1]["loss"] - ref.history[-1]["loss"]) < 1e-4


def test_training_scripts_use_the_fused_step(monkeypatch, tmp_path) -> None:
    """scripts/train_*.py train through scripts/_budget.py: on the CPU that runs the fused step."""
    import importlib.util
    from pathlib import Path

    from napari_octreenca.run.training import TrainConfig

    root = Path(__file__).resolve().parents[1]
    for script in ("train_brain.py", "train_brain_synth.py", "train_epidermis.py", "train_davis.py"):
        text = (root / "scripts" / script).read_text()
        assert "train_with_budget(" in text and "fused_cpu" not in text and "device=" not in text
    spec = importlib.util.spec_from_file_location("_budget", root / "scripts" / "_budget.py")
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)
    calls: list[int] = []
    real = cpu_train.run_level_fused
    monkeypatch.setattr(cpu_train, "run_level_fused", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = preset("pathology", steps=(2, 2, 3), factors=((2, 2),) * 2)
    model, done, _ = budget.train_with_budget(
        cfg,
        _toy_pairs(),
        TrainConfig(iterations=1, batch_size=1, crop=(16, 16)),
        checkpoint=str(tmp_path / "ck.safetensors"),
        resume=False,
        max_minutes=None,
    )
    assert done == 1 and sorted(calls) == [0, 1, 2]
    assert model.config.provenance["train_step"] == "cpu-fused"


def test_tile_view_moves_a_partial_tile_into_a_contiguous_block() -> None:
    """The BLAS tiles: the first kn cells of every row of a (rows, _TILE) buffer become one
    contiguous (rows, kn) array with the same values, for every kn (a full tile stays put)."""
    import numpy as np

    from napari_octreenca.backends import cpu_fused

    rng = np.random.default_rng(1)
    for kn in (1, 2, 7, 100, cpu_fused._TILE - 1, cpu_fused._TILE):
        buf = rng.standard_normal((33, cpu_fused._TILE)).astype(np.float32)
        want = buf[:, :kn].copy()
        view = cpu_fused._tile_view(buf, kn)
        assert view.shape == (33, kn) and view.flags.c_contiguous
        assert np.shares_memory(view, buf)
        np.testing.assert_array_equal(view, want)


def test_blas_runs_one_thread_inside_the_kernels_and_the_setting_comes_back() -> None:
    """The training kernels call BLAS from numba's workers: one BLAS thread while they run, the
    user's setting afterwards (a multi-threaded OpenBLAS under numba's workers oversubscribes
    the cores, or under OpenMP warns that it may hang)."""
    from threadpoolctl import threadpool_info

    from napari_octreenca.backends import blas_threads

    def blas_threads_now() -> list[int]:
        return [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]

    with blas_threads.single_threaded():
        inside = blas_threads_now()
    if not inside:
        pytest.skip("threadpoolctl finds no BLAS library to limit here (numba's np.dot binds scipy's)")
    assert set(inside) == {1}
    before = blas_threads_now()
    with blas_threads.single_threaded():
        pass
    assert blas_threads_now() == before


def test_gradients_do_not_depend_on_the_thread_count() -> None:
    """Bitwise the same gradients with 1 and 2 numba threads (fixed chunks of rows, BLAS tiles
    made of the same cells), 3D with the training patch scheme."""
    import numba

    cfg = preset("radiology", steps=(3, 3, 2, 2, 4))
    results = []
    previous = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            torch.manual_seed(0)
            model = OctreeNCA(cfg)
            _randomise(model, 3)
            image = torch.randn((2, cfg.input_channels, 20, 18, 12), generator=torch.Generator().manual_seed(4))
            gen = torch.Generator().manual_seed(5)
            logits, _ = model.forward_train(
                image, [7, 8], patch_size=(8, 8, 6), generator=gen, level_steps=cpu_train.run_level_fused
            )
            logits.square().mean().backward()
            results.append([p.grad.clone() for p in model.parameters()])
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)
