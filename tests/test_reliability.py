"""Nothing lost, nothing silently wrong (issue 13): each case checks the exit code, that the error is
one line naming the file, and that no data was lost. Real pictures (Kvasir-SEG, the ITK T1 MRI),
tiny models, small crops: the module runs in well under a minute on 2 cores."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import ITK_DATA, need_file, random_model

from napari_octreenca import save_model, segment
from napari_octreenca.cli import main
from napari_octreenca.fileutil import OutputLocked, atomic_write, lock_path, output_lock
from napari_octreenca.io.readers import read_image
from napari_octreenca.nca.errors import BackendUnavailable, ConfigError
from napari_octreenca.run.pipeline import BatchError, find_work_folders, run_segment

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- fixtures: tiny models, real pictures -----------------------------------------------------------
@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    """A 3-level pathology model (random weights), trained-range uint8 0..255 recorded in its config."""
    model = random_model("pathology", seed=3, std=0.2, steps=(2, 2, 3), factors=((2, 2),) * 2)
    model.config = model.config.replace(input_range=(0.0, 255.0), input_dtype="uint8")
    return save_model(model, tmp_path_factory.mktemp("m") / "tiny2d.safetensors")


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory) -> Path:
    model = random_model("radiology", seed=4, std=0.2, steps=(2, 3), factors=((2, 2, 2),))
    return save_model(model, tmp_path_factory.mktemp("m") / "tiny3d.safetensors")


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    """Three real colonoscopy pictures (Kvasir-SEG), cropped to 96 x 128 RGB."""
    from helpers import SHARED_DATA
    from PIL import Image

    folder = SHARED_DATA / "kvasir-seg-mini" / "images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (shared data)")
    files = sorted(folder.glob("*.jpg"))[:3]
    return [np.asarray(Image.open(f).convert("RGB"))[150:246, 200:328].copy() for f in files]


def save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run ``octreenca`` in this process; returns (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(err: str, *words: str) -> str:
    """The single ``octreenca: error:`` line of ``err`` (no traceback), containing every word."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("octreenca: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def seg(model: Path, *argv: str) -> list[str]:
    return ["segment", *argv, "--model", str(model), "--backend", "torch", "--runs", "1", "--quiet"]


# -- finding 2: outputs that would destroy inputs -----------------------------------------------------
def test_output_equal_to_input_is_refused(tmp_path: Path, model_3d: Path, capsys) -> None:
    src = tmp_path / "head.nii.gz"
    shutil.copy(need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "apt-get install insighttoolkit5-examples"), src)
    before = digest(src)
    rc, err = cli(capsys, *seg(model_3d, src, src))
    assert rc == 2
    one_line_error(err, str(src), "is the input", "--overwrite")
    assert digest(src) == before  # the scan is untouched
    rc, err = cli(capsys, *seg(model_3d, src, tmp_path / "." / "head.nii.gz"))  # the same file, spelled otherwise
    assert rc == 2 and digest(src) == before
    rc, err = cli(capsys, *seg(model_3d, src, src, "--overwrite"))  # asked for: replaced by the mask
    assert rc == 0, err
    assert read_image(src).metadata["nifti_header"]["intent_code"] == 1002


def test_ome_zarr_image_may_take_its_own_labels(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    """The one output that may be its input: labels go into the image's labels group, the image stays."""
    from napari_octreenca.io.ome_zarr import write_ome_zarr_image

    store = write_ome_zarr_image(tmp_path / "img.zarr", pictures[0], "YXC")
    rc, err = cli(capsys, *seg(model_2d, store, store))
    assert rc == 0, err
    np.testing.assert_array_equal(np.asarray(read_image(store).data), pictures[0])
    assert listed(store) == ["segmentation"]
    expected = segment(random_model_from(model_2d), pictures[0], backend="torch").labels
    np.testing.assert_array_equal(np.asarray(read_image(store / "labels" / "segmentation").data), expected)


def test_output_folder_equal_to_input_folder(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    for i, rgb in enumerate(pictures[:2]):
        save_png(tmp_path / f"p{i}.png", rgb)
    rc, err = cli(capsys, *seg(model_2d, tmp_path, tmp_path))  # first run: no earlier results, fine
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["p0.png", "p0_labels.png", "p1.png", "p1_labels.png"]
    labels = digest(tmp_path / "p0_labels.png")
    rc, err = cli(capsys, *seg(model_2d, tmp_path, tmp_path))  # rerun: the labels would become inputs
    assert rc == 2
    one_line_error(err, "earlier results", "p0_labels.png", "--overwrite")
    assert not list(tmp_path.glob("*_labels_labels*")) and digest(tmp_path / "p0_labels.png") == labels
    rc, err = cli(capsys, *seg(model_2d, tmp_path, tmp_path, "--overwrite"))
    assert rc == 0, err
    assert not list(tmp_path.glob("*_labels_labels*"))
    assert digest(tmp_path / "p0_labels.png") == labels  # same model, same seed: same labels
    other = tmp_path / "other"
    other.mkdir()
    save_png(other / "q.png", pictures[2])
    for _ in range(2):  # an output folder inside the input folder: on the rerun, sub/ is not an input
        rc, err = cli(capsys, *seg(model_2d, other, other / "sub"))
        assert rc == 0, err
    assert sorted(p.name for p in (other / "sub").iterdir()) == ["q_labels.png"]


def test_unknown_output_suffix_is_an_error_not_a_folder(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    src = save_png(tmp_path / "a.png", pictures[0])
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "x.jpg"))
    assert rc == 2
    one_line_error(err, "x.jpg", "output format")
    assert not (tmp_path / "x.jpg").exists()


def test_import_onto_itself_and_zero_classes_refused(tmp_path: Path, capsys) -> None:
    model = random_model("pathology", seed=5, steps=(2, 3), factors=((2, 2),))
    ckpt = tmp_path / "a.pth"
    torch.save({k.replace("levels.", "backbone_ncas.", 1): v for k, v in model.state_dict().items()}, ckpt)
    before = digest(ckpt)
    rc, err = cli(capsys, "import", ckpt, ckpt)
    assert rc == 2
    one_line_error(err, "a.pth", "checkpoint")
    assert digest(ckpt) == before
    rc, err = cli(capsys, "import", ckpt, tmp_path / "b.safetensors", "--classes", "0")
    assert rc == 2
    one_line_error(err, "--classes")
    assert not (tmp_path / "b.safetensors").exists()
    rc, err = cli(capsys, "import", ckpt, tmp_path / "b.safetensors", "--classes", "2")
    assert rc == 0, err


# -- finding 9: file modes, stale temporary files -----------------------------------------------------
def test_modes_follow_umask_and_existing_file(tmp_path: Path, model_2d: Path, pictures) -> None:
    src = save_png(tmp_path / "a.png", pictures[0])
    old = os.umask(0o027)
    try:
        [out] = run_segment([str(src)], str(tmp_path / "new.tif"), str(model_2d), backend="torch")
        assert out.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, as open() would
        keep = tmp_path / "keep.tif"
        keep.write_bytes(b"old")
        keep.chmod(0o644)
        run_segment([str(src)], str(keep), str(model_2d), backend="torch")
        assert keep.stat().st_mode & 0o777 == 0o644  # a replaced file keeps its mode
        assert tifffile.imread(keep).shape == (96, 128)
    finally:
        os.umask(old)


def test_killed_writers_part_files_are_removed(tmp_path: Path, model_2d: Path, pictures) -> None:
    import socket

    src = save_png(tmp_path / "a.png", pictures[0])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: the writer of the part file below is gone
    host = socket.gethostname()
    stale = tmp_path / f".a_labels.png.{host}-{dead.pid}.x1y2.part.png"
    live = tmp_path / f".a_labels.png.{host}-{os.getpid()}.z3w4.part.png"  # a writer that still runs
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    run_segment([str(src)], str(tmp_path / "a_labels.png"), str(model_2d), backend="torch")
    assert not stale.exists() and live.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part.png") and p != live]


# -- findings 1, 3: locks, concurrent runs, killed rewrites --------------------------------------------
def test_lock_refuses_second_holder_and_wait_blocks(tmp_path: Path) -> None:
    out = tmp_path / "o.tif"
    with output_lock(out):
        with pytest.raises(OutputLocked, match="another octreenca run is writing"), output_lock(out):
            pass
        assert lock_path(out).exists()
    assert not lock_path(out).exists()  # removed on release


RUN = """
import sys, torch
torch.set_num_threads(1)
from napari_octreenca.cli import main
sys.exit(main(sys.argv[1:]))
"""


HOLD = """
import os, sys, time, torch
torch.set_num_threads(1)
from napari_octreenca.io import ome_zarr
finish = ome_zarr.OmeZarrLabelsSink.finish
go = sys.argv[1]
def held(self):  # keep the run (and its lock) alive until the test says go
    while not os.path.exists(go):
        time.sleep(0.05)
    finish(self)
ome_zarr.OmeZarrLabelsSink.finish = held
from napari_octreenca.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_on_one_output(tmp_path: Path, model_2d: Path, pictures) -> None:
    """Two real runs on one .zarr output: the second fails at once (or waits with --wait); the result
    equals a single run's."""
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, np.tile(pictures[0], (2, 2, 1)), photometric="rgb")  # 192 x 256
    out = tmp_path / "big_labels.zarr"
    go = tmp_path / "go"
    argv = ["segment", str(src), str(out), "--model", str(model_2d), "--backend", "torch", "--tile", "48", "--quiet"]
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(go), *argv], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not lock_path(out).exists():  # the first run takes the lock before it writes anything
        assert first.poll() is None and time.time() < deadline, "the first run ended before taking the lock"
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-c", RUN, *argv], env=ENV, capture_output=True, text=True, timeout=120, check=False
    )
    assert second.returncode == 2
    one_line_error(second.stderr, "another octreenca run is writing", str(out), "--wait")
    waiter = subprocess.Popen([sys.executable, "-c", RUN, *argv, "--wait"], env=ENV, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert waiter.poll() is None  # blocked on the lock, not failed
    go.touch()
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    _, werr = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, werr
    expected = segment(random_model_from(model_2d), np.asarray(read_image(src).data), backend="torch").labels
    np.testing.assert_array_equal(np.asarray(read_image(out).data), expected)
    assert listed(out) == ["segmentation"] and not find_work_folders(out) and not lock_path(out).exists()


def random_model_from(path: Path):
    from napari_octreenca import load_model

    return load_model(path)


KILL_AFTER_FIRST_CHUNK = """
import os, signal, sys, torch
torch.set_num_threads(1)
from napari_octreenca.io import ome_zarr
for cls, name in ((ome_zarr.LabelsWriter, "write"), (ome_zarr.OmeZarrLabelsSink, "write")):
    original = getattr(cls, name)
    def dying(self, *a, _original=original, **k):
        _original(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of rewriting the output
    setattr(cls, name, dying)
from napari_octreenca.cli import main
sys.exit(main(sys.argv[1:]))
"""


def listed(root: Path) -> list[str]:
    import zarr

    return list(zarr.open_group(str(root / "labels"), mode="r").attrs["ome"].get("labels", []))


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_killed_rewrite_is_not_listed_as_complete(tmp_path: Path, model_2d: Path, pictures, capsys, tiled) -> None:
    src = save_png(tmp_path / "a.png", pictures[1])
    out = tmp_path / "a_labels.zarr"
    extra = ["--tile", "48"] if tiled else []
    rc, err = cli(capsys, *seg(model_2d, src, out, "--seed", "0", *extra))
    assert rc == 0 and listed(out) == ["segmentation"], err
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_CHUNK, *seg(model_2d, src, out, "--seed", "7", *extra)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert listed(out) == []  # a mix of old and new labels must not look complete
    rc, err = cli(capsys, *seg(model_2d, src, out, "--seed", "7", *extra))  # the rerun completes it
    assert rc == 0, err
    assert listed(out) == ["segmentation"] and not find_work_folders(out)
    expected = segment(random_model_from(model_2d), pictures[1], seed=7, backend="torch").labels
    np.testing.assert_array_equal(np.asarray(read_image(out).data), expected)


def test_stale_work_folder_of_other_settings_is_removed(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    src = save_png(tmp_path / "a.png", pictures[2])
    out = tmp_path / "a_labels.tif"
    # What a run with other settings, killed, leaves: a work folder whose markers vouch for other data.
    stale = out.parent / (out.name + ".octreenca-work-0123456789ab")
    (stale / "progress").mkdir(parents=True)
    (stale / "progress" / "L0-s1-t0").touch()
    rc, err = cli(capsys, *seg(model_2d, src, out, "--seed", "2", "--tile", "48"))
    assert rc == 0, err
    assert not stale.exists() and not find_work_folders(out)
    expected = segment(random_model_from(model_2d), pictures[2], seed=2, backend="torch").labels
    np.testing.assert_array_equal(tifffile.imread(out), expected)


# -- finding 6: hostile headers, API bounds ---------------------------------------------------------------
def hostile(tmp_path: Path, model_2d: Path, **changes) -> Path:
    """``model_2d`` with its header's config changed (weights untouched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model_2d), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    meta["config"] = json.dumps(cfg)
    path = tmp_path / ("bad_" + "_".join(changes) + ".safetensors")
    save_file(load_file(str(model_2d)), str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"steps": [2, 2, 10**9]}, ["steps", "10000"]),
        ({"channels": 10**8}, ["channels", "1024"]),
        ({"hidden": 10**7}, ["hidden"]),
        ({"train_size": [0, 64]}, ["train_size"]),
        ({"fire_rate": 0}, ["fire_rate"]),
        ({"fire_rate": 2}, ["fire_rate"]),
        ({"factors": [[0, 2], [2, 2]]}, ["factor"]),
        ({"factors": [[2, 2]] * 40, "steps": [1] * 41}, ["levels"]),
        ({"output_channels": 0, "class_names": []}, ["output_channels"]),
    ],
)
def test_hostile_header_fails_before_allocation(
    tmp_path: Path, model_2d: Path, pictures, capsys, changes, words
) -> None:
    bad = hostile(tmp_path, model_2d, **changes)
    src = save_png(tmp_path / "a.png", pictures[0])
    t0 = time.perf_counter()
    rc, err = cli(capsys, *seg(bad, src, tmp_path / "o.png"))
    assert rc == 2 and time.perf_counter() - t0 < 10
    one_line_error(err, bad.name, *words)
    assert not (tmp_path / "o.png").exists()
    rc, err = cli(capsys, "info", bad)
    assert rc == 2
    one_line_error(err, *words)


def test_api_checks_match_the_cli(model_2d: Path, pictures, capsys, tmp_path: Path) -> None:
    model = random_model_from(model_2d)
    img = pictures[0][:32, :32]
    from napari_octreenca.run.tiling import segment_tiled

    for kw in (
        {"fire_rate": 0},
        {"fire_rate": 2},
        {"steps": [2, -1, 3]},
        {"steps": [2, 2, 10**9]},
        {"seed": 2**64},
        {"seed": -1},
        {"seed": 2**64 - 1, "runs": 2},
    ):
        with pytest.raises(ConfigError):
            segment(model, img, backend="torch", **kw)
        with pytest.raises(ConfigError):
            segment_tiled(model, img, tile=16, backend="torch", **kw)
    segment(model, img, backend="torch", seed=2**64 - 1)  # the last seed of the hash's range is fine
    src = save_png(tmp_path / "a.png", img)
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "o.png", "--seed", str(2**64)))
    assert rc == 2
    one_line_error(err, "seed", "2**64")
    assert not (tmp_path / "o.png").exists()


# -- finding 5: one-line errors for what users cause ------------------------------------------------------
def test_cuda_without_gpu_is_one_line(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    src = save_png(tmp_path / "a.png", pictures[0])
    rc, err = cli(capsys, "segment", src, tmp_path / "o.png", "--model", model_2d, "--device", "cuda", "--quiet")
    assert rc == 2
    one_line_error(err, "no CUDA GPU", "--device cpu")
    rc, err = cli(capsys, "demo", "--device", "cuda", "--out", tmp_path / "demo", "--quick")
    assert rc == 2
    one_line_error(err, "no CUDA GPU")
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((96, 128), np.uint8))
    rc, err = cli(
        capsys,
        "train",
        "--pair",
        src,
        tmp_path / "lab.tif",
        "--iterations",
        "1",
        "--device",
        "cuda",
        "--out",
        tmp_path / "m.safetensors",
    )
    assert rc == 2
    one_line_error(err, "no CUDA GPU")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        segment(random_model_from(model_2d), pictures[0], device="cuda")
    from napari_octreenca.run.training import TrainConfig, TrainPair, train

    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        train(
            random_model_from(model_2d),
            [TrainPair(pictures[0], np.zeros((96, 128), np.uint8), "YXC")],
            TrainConfig(iterations=1),
            device="cuda",
        )


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, filled up (needs root to mount; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_full_is_one_line_and_keeps_the_old_output(
    tmp_path: Path, full_disk: Path, model_2d: Path, pictures, capsys
) -> None:
    src = save_png(tmp_path / "a.png", pictures[0])
    old = full_disk / "a_labels.tif"
    old.write_bytes(b"the previous result")
    fill(full_disk)
    rc, err = cli(capsys, *seg(model_2d, src, old))
    assert rc == 2
    one_line_error(err, str(old), "no space left")
    assert old.read_bytes() == b"the previous result"
    assert sorted(p.name for p in full_disk.iterdir()) == ["a_labels.tif", "filler"]  # no .part, no lock left
    # a model file (safetensors' own error type) on the full disk
    model = random_model("pathology", seed=5, steps=(2, 3), factors=((2, 2),))
    ckpt = tmp_path / "a.pth"
    torch.save({k.replace("levels.", "backbone_ncas.", 1): v for k, v in model.state_dict().items()}, ckpt)
    rc, err = cli(capsys, "import", ckpt, full_disk / "m.safetensors")
    assert rc == 2
    one_line_error(err, "m.safetensors", "no space left")
    assert sorted(p.name for p in full_disk.iterdir()) == ["a_labels.tif", "filler"]


def test_disk_full_simulated_safetensors_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without root: safetensors' SafetensorError for ENOSPC, raised by a patched writer."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model = random_model("pathology", seed=5, steps=(2, 3), factors=((2, 2),))
    ckpt = tmp_path / "a.pth"
    torch.save({k.replace("levels.", "backbone_ncas.", 1): v for k, v in model.state_dict().items()}, ckpt)
    rc, err = cli(capsys, "import", ckpt, tmp_path / "m.safetensors")
    assert rc == 2
    one_line_error(err, "m.safetensors", "no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_permission_denied_names_the_file(tmp_path: Path, model_2d: Path, pictures, monkeypatch, capsys) -> None:
    import tempfile

    src = save_png(tmp_path / "a.png", pictures[0])
    out = tmp_path / "ro" / "a_labels.png"
    out.parent.mkdir()
    if os.geteuid() != 0:  # a real read-only folder where permissions apply
        out.parent.chmod(0o555)
    else:  # root ignores modes: fail where an unwritable folder fails, creating the temporary file

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied", str(out.parent))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        rc, err = cli(capsys, *seg(model_2d, src, out))
    finally:
        out.parent.chmod(0o755)
    assert rc == 2
    one_line_error(err, "permission denied", "ro")
    assert not out.exists()


def test_lying_nifti_header_is_one_line(tmp_path: Path, model_3d: Path, capsys) -> None:
    import nibabel as nib

    src = need_file(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz", "apt-get install insighttoolkit5-examples")
    img = nib.load(str(src))
    raw = bytearray(gzip.decompress(src.read_bytes()))
    dims = np.frombuffer(bytes(raw[40:56]), "<i2").copy()
    dims[1:4] = 2000  # the header now claims 2000^3 voxels (8 GB); the data is 128 x 128 x 62
    raw[40:56] = dims.tobytes()
    for name, data in (("liar.nii.gz", gzip.compress(bytes(raw))), ("liar.nii", bytes(raw))):
        bad = tmp_path / name
        bad.write_bytes(data)
        rc, err = cli(capsys, *seg(model_3d, bad, tmp_path / "o.nii.gz"))
        assert rc == 2
        one_line_error(err, name, "2000x2000x2000", "truncated or its header is wrong")
    assert img.shape == (128, 128, 62)


def test_memory_error_names_input_and_a_flag(tmp_path: Path, model_2d: Path, pictures, monkeypatch, capsys) -> None:
    from napari_octreenca.run import pipeline

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(pipeline, "execute", oom)
    src = save_png(tmp_path / "a.png", pictures[0])
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "o.png"))
    assert rc == 2
    one_line_error(err, "out of memory", str(src), "--tile")


def test_debug_shows_the_traceback(tmp_path: Path, model_2d: Path, capsys) -> None:
    argv = ["segment", str(tmp_path / "missing.png"), str(tmp_path / "o.png"), "--model", str(model_2d)]
    rc, err = cli(capsys, *argv)
    assert rc == 2
    one_line_error(err, "missing.png", "does not exist")
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the sub-command
        with pytest.raises(ValueError, match="does not exist"):
            main(debug)


# -- finding 7: values far from training, overflow, alpha --------------------------------------------------
def test_uint16_into_8bit_model_warns(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    src = tmp_path / "deep.tif"
    tifffile.imwrite(src, pictures[0].astype(np.uint16) * 257, photometric="rgb")  # 0..65535
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "o.tif"))
    assert rc == 0, err
    warning = [ln for ln in err.splitlines() if ln.startswith("octreenca: warning:")]
    assert len(warning) == 1 and "deep.tif" in warning[0] and "far from the training" in warning[0]
    src8 = tmp_path / "ok.tif"
    tifffile.imwrite(src8, pictures[0], photometric="rgb")
    rc, err = cli(capsys, *seg(model_2d, src8, tmp_path / "o8.tif"))
    assert rc == 0 and "warning" not in err  # the training range: no warning
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "ot.zarr", "--tile", "48"))  # tiled: checked on a sample
    assert rc == 0 and "far from the training" in err


def test_float32_overflow_refused(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    src = tmp_path / "huge.tif"
    tifffile.imwrite(src, pictures[0].astype(np.float64) * 1e300 / 255, photometric="rgb")
    for extra in ([], ["--tile", "48"]):
        rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "o.tif", *extra))
        assert rc == 2
        one_line_error(err, "float32", "huge.tif")
        assert not (tmp_path / "o.tif").exists()


def test_rgba_png_says_alpha_is_dropped(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    from PIL import Image

    rgba = np.dstack([pictures[0], np.full(pictures[0].shape[:2], 200, np.uint8)])
    src = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(src)
    rc, err = cli(capsys, *seg(model_2d, src, tmp_path / "o.png"))
    assert rc == 0, err
    assert "alpha" in err and "rgba.png" in err


# -- finding 8: a bad file in a batch -----------------------------------------------------------------------
def test_batch_keeps_going_and_lists_failures(tmp_path: Path, model_2d: Path, pictures, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    save_png(folder / "a.png", pictures[0])
    (folder / "b.png").write_bytes(save_png(tmp_path / "x.png", pictures[1]).read_bytes()[:200])  # truncated
    save_png(folder / "c.png", pictures[2])
    out = tmp_path / "out"
    rc, err = cli(capsys, *seg(model_2d, folder, out))
    assert rc == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "c_labels.png"]  # every good file
    failed = [ln for ln in err.splitlines() if ln.startswith("octreenca: failed:")]
    assert len(failed) == 1 and "b.png" in failed[0]
    one_line_error(err, "1 of 3 inputs failed", "b.png")
    shutil.rmtree(out)
    rc, err = cli(capsys, *seg(model_2d, folder, out, "--no-keep-going"))
    assert rc == 2 and sorted(p.name for p in out.iterdir()) == ["a_labels.png"]
    with pytest.raises(BatchError) as info:
        run_segment([str(folder)], str(tmp_path / "api"), str(model_2d), backend="torch")
    assert [p.name for p, _ in info.value.failures] == ["b.png"] and len(info.value.written) == 2


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(target, broken)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
