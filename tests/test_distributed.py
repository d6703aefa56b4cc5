"""The tiled pipeline on dask.distributed (LocalCluster, 2 worker processes) == the local run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_octreenca import OctreeNCA, preset, save_model, segment
from napari_octreenca.run.tiling import segment_tiled

distributed = pytest.importorskip("distributed", reason="pip install distributed")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    )
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def random_model(seed: int = 0) -> OctreeNCA:
    torch.manual_seed(seed)
    model = OctreeNCA(preset("pathology", steps=(3, 3, 3, 5), factors=((2, 2),) * 3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def test_distributed_equals_local(client, tmp_path: Path) -> None:
    model = random_model()
    img = np.random.default_rng(0).integers(0, 255, (130, 150, 3), dtype=np.uint8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run single-threaded too: same float ops
    try:
        local = segment_tiled(model, img, tile=48, backend="torch")
        whole = segment(model, img, backend="torch")
    finally:
        torch.set_num_threads(n)
    seen: list[dict] = []
    dist = segment_tiled(
        model, img, tile=48, backend="torch", store=tmp_path / "w", scheduler=client, callback=seen.append
    )
    np.testing.assert_array_equal(dist.logits[...], local.logits)
    np.testing.assert_array_equal(dist.labels[...], whole.labels)
    assert dist.record["tiles_computed"] == len(seen) > 10
    workers = client.run(lambda: __import__("napari_octreenca.run.distributed", fromlist=["_RUNS"])._RUNS.__len__())
    assert len(workers) == 2 and sum(workers.values()) >= 1  # tiles ran in the worker processes


def test_distributed_pipeline_from_file(client, tmp_path: Path) -> None:
    """run_segment with a scheduler: the workers reopen the input file by path."""
    import tifffile

    from napari_octreenca.io.readers import read_image
    from napari_octreenca.run.pipeline import run_segment

    model = random_model(1)
    mpath = save_model(model, tmp_path / "m.safetensors")
    img = np.random.default_rng(1).integers(0, 255, (140, 120, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb")
    address = client.scheduler.address
    [out] = run_segment(
        [str(tmp_path / "a.tif")],
        str(tmp_path / "a_labels.tif"),
        str(mpath),
        backend="torch",
        tile=64,
        scheduler=address,
    )
    torch.set_num_threads(1)
    whole = segment(model, img, backend="torch")
    np.testing.assert_array_equal(np.asarray(read_image(out).data), whole.labels)
