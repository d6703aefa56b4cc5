"""``octreenca bench``: speed and peak memory of the compute backends, as a table.

Three modes:

- ``level``: ``steps`` NCA steps of one level at ``size`` (2D: size x size, 3D: size^3) with the
  preset's finest-level network and fire rate. Reports cell-steps/s of the step itself.
- ``pipeline``: a preset end to end (all levels) on a ``size`` x ``size`` uint8 image: upload,
  normalisation on the device, every level, foreground mask, synchronised. Cell-steps counts the
  steps of every level times its cells.
- ``train``: training iterations of a preset (forward through every step of every level, loss,
  backward, Adam step) on a random batch of ``batch`` samples of ``size`` (3D: ``size``^3 with the
  published patch scheme, patch ``size/2`` on the two finest levels). Backends are the training
  steps: ``autograd`` (autograd through the layer-wise reference step, as the published code
  trains: the yardstick) and ``cpu-fused`` (``backends/cpu_train.py``). ``steps`` is the number
  of timed iterations; ``seconds`` is the median iteration.

Peak memory: on CUDA the allocator's peak above what was allocated before the case; on the CPU
each case runs in a fresh subprocess (``--isolate``, the default there) and the peak resident
set (VmHWM, reset just before the case) above the resident set at that moment. Weights are
random (speed does not depend on their values); the fire rate is the preset's.

``torch-layerwise`` (in ``backends/torch_backend.py``) is the yardstick: the whole level through
the layer-wise reference step at once, as the published OctreeNCA code runs inference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends import Backend, LevelRun, get_backend
from .nca.config import ModelConfig, preset
from .nca.octree import OctreeNCA
from .nca.weights import BackboneNCA

MODES = ("level", "pipeline", "train")
#: Training steps the ``train`` mode compares (see :func:`_train_case`).
TRAIN_STEPS = ("autograd", "cpu-fused")


def make_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """A backend by name, including the benchmark-only ``torch-layerwise``."""
    return get_backend(name, device, dtype)


def random_model(cfg: ModelConfig, seed: int = 0) -> OctreeNCA:
    """A model of ``cfg`` with random weights (fc1 is not zero, so every step changes the state)."""
    gen = torch.Generator().manual_seed(seed)
    model = OctreeNCA(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen) / max(1.0, p[0].numel() ** 0.5))
    return model.eval()


@dataclass(frozen=True)
class Case:
    """One benchmark measurement."""

    backend: str
    size: int
    dtype: str = "float32"
    mode: str = "level"
    dims: int = 2
    preset: str = "pathology"
    steps: int = 10
    device: str = "cpu"
    threads: int = 0  # 0: leave the default
    batch: int = 1  # samples per training iteration (train mode)

    def shape(self) -> tuple[int, ...]:
        return (self.size,) * self.dims


# -- memory probes ---------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def _reset_host_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns that RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status("VmRSS")


class _Probe:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Probe:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _reset_host_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, _proc_status("VmHWM") - self.base)


# -- one case ---------------------------------------------------------------------------------
def _level_case(case: Case, backend: Backend, device: torch.device, dt: torch.dtype) -> dict[str, Any]:
    cfg = preset(case.preset)
    nca: BackboneNCA = random_model(cfg).levels[0].to(device)
    shape = case.shape()
    cells = int(np.prod(shape))
    run = LevelRun(level=0, steps=case.steps, seed=1, fire_rate=cfg.fire_rate)
    # Warm-up on a small block: kernel compilation and loading are not timed.
    small = (8,) * case.dims
    backend.run_level(
        nca,
        torch.zeros((1, cfg.input_channels) + small, device=device, dtype=dt),
        torch.zeros((1, cfg.update_channels) + small, device=device, dtype=dt),
        run,
    )
    with _Probe(device) as probe:
        image = torch.randn((1, cfg.input_channels) + shape, device=device, dtype=dt)
        state = torch.randn((1, cfg.update_channels) + shape, device=device, dtype=dt)
        t0 = time.perf_counter()
        state = backend.run_level(nca, image, state, run)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - t0
        del image, state
    return {"cell_steps": cells * case.steps, "seconds": step_seconds, "peak_bytes": probe.peak, "pixels": cells}


def _pipeline_case(case: Case, backend: Backend, device: torch.device, dt: torch.dtype) -> dict[str, Any]:
    from .run.inference import run_octree
    from .run.inputs import prepare

    cfg = preset(case.preset)
    model = random_model(cfg).to(device)
    shape = case.shape()
    axes = cfg.axes + ("C" if cfg.input_channels > 1 else "")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=shape + ((cfg.input_channels,) if cfg.input_channels > 1 else ()), dtype=np.uint8)
    small = np.ascontiguousarray(raw[(slice(0, 40),) * case.dims])
    run_octree(model, prepare(small, cfg, axes, device)[0], backend=backend, dtype=dt)  # warm-up
    steps = cfg.steps_for(shape)
    cell_steps = sum(int(np.prod(s)) * n for s, n in zip(cfg.level_shapes(shape), steps))
    with _Probe(device) as probe:
        x, _ = prepare(raw, cfg, axes, device)  # uint8 upload, normalised on the device
        x = x.to(dt)
        logits = run_octree(model, x, backend=backend, dtype=dt)
        del x
        fg = (logits > 0).any(dim=1)
        del logits, fg
    return {"cell_steps": cell_steps, "seconds": probe.seconds, "peak_bytes": probe.peak, "pixels": int(np.prod(shape))}


def _train_runner(name: str) -> Any:
    """The level runner of a training step: autograd through the reference, or the fused step."""
    from .nca.octree import reference_level_steps

    if name == "autograd":
        return reference_level_steps
    if name == "cpu-fused":
        from .backends.cpu_train import FusedLevelRunner

        return FusedLevelRunner()
    raise ValueError(f"unknown training step {name!r}; choose one of {TRAIN_STEPS}")


def _train_case(case: Case, device: torch.device) -> dict[str, Any]:
    from .run.training import dice_bce_loss

    cfg = preset(case.preset)
    model = random_model(cfg).to(device).train()
    shape = case.shape()
    patch = (max(1, case.size // 2),) * case.dims if case.dims == 3 else None
    runner = _train_runner(case.backend)
    cells = [0]

    def counting(nca, img, state, level, steps, *rest):  # type: ignore[no-untyped-def]
        cells[0] += steps * state[:, 0].numel()
        return runner(nca, img, state, level, steps, *rest)

    gen = torch.Generator().manual_seed(0)

    def batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.randn((case.batch, cfg.input_channels) + shape, generator=gen)
        return image, (torch.rand((case.batch, cfg.output_channels) + shape, generator=gen) > 0.5).float()

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def iteration(i: int, image: torch.Tensor, target: torch.Tensor, patch: tuple[int, ...] | None) -> None:
        seeds = [1000 * i + b for b in range(case.batch)]
        logits, where = model.forward_train(image, seeds, patch_size=patch, generator=gen, level_steps=counting)
        loss = dice_bce_loss(logits, target[(slice(None), slice(None)) + where.slices()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.enable_grad():
        # Warm-up on a small batch (kernel compilation and loading), then one untimed iteration at
        # the full size: the timed ones are the steady state of a training run of hundreds of
        # iterations (the fused step's reused arrays in place), for both training steps alike.
        # Peak memory counts from before that iteration, so the reused arrays are in it.
        iteration(0, *batch((min(8, case.size),) * case.dims), None)
        image, target = batch(shape)
        iterations = max(1, case.steps)
        with _Probe(device) as probe:
            iteration(0, image, target, patch)
            cells[0] = 0
            times = []
            for i in range(iterations):
                t0 = time.perf_counter()
                iteration(i + 1, image, target, patch)
                times.append(time.perf_counter() - t0)
    # The median iteration: on a shared machine one slowed iteration of a few would move the mean.
    return {
        "cell_steps": cells[0] // iterations,
        "seconds": float(np.median(times)),
        "peak_bytes": probe.peak,
        "pixels": int(np.prod(shape)) * case.batch,
    }


def run_case(case: Case) -> dict[str, Any]:
    """Run one case in this process; returns a result row."""
    device = torch.device(case.device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
    if case.threads:
        torch.set_num_threads(case.threads)
    if case.mode == "train":
        res = _train_case(case, device)
        name = case.backend
    else:
        backend = make_backend(case.backend, device, dt)
        with torch.no_grad():
            res = (_level_case if case.mode == "level" else _pipeline_case)(case, backend, device, dt)
        name = backend.name
    row = dict(case.__dict__)
    row["size"] = "x".join(map(str, case.shape()))
    row["backend"] = name
    row.update(res)
    row["cell_steps_per_s"] = res["cell_steps"] / res["seconds"]
    row["bytes_per_pixel"] = res["peak_bytes"] / res["pixels"]
    row["threads"] = case.threads or (torch.get_num_threads() if case.device == "cpu" else 0)
    return row


def _run_isolated(case: Case) -> dict[str, Any]:
    """Run a case in a fresh Python process (clean peak-memory reading on the CPU)."""
    env = dict(os.environ)
    if case.threads:
        env.update(NUMBA_NUM_THREADS=str(case.threads), OMP_NUM_THREADS=str(case.threads))
    proc = subprocess.run(
        [sys.executable, "-m", "napari_octreenca.bench", "--case", json.dumps(case.__dict__)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_bench(
    backends: list[str],
    sizes: list[int],
    dtypes: list[str] = ("float32",),
    *,
    mode: str = "level",
    dims: int = 2,
    preset_name: str = "pathology",
    steps: int = 10,
    device: str = "cpu",
    threads: int = 0,
    isolate: bool | None = None,
    batch: int = 1,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Measure every (backend, size, dtype); returns one row per case (see :func:`format_table`).

    ``isolate`` (default: on for the CPU) runs each case in its own process for a clean peak.
    ``rounds`` > 1 measures the backends of a (size, dtype) in turn that many times (A, B, A, B,
    ...) and keeps each case's fastest round (and its highest peak): a slow spell of a shared
    machine then hits every backend alike instead of the one that happened to run in it. Every
    round's seconds are kept in ``round_seconds``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    isolate = (device == "cpu") if isolate is None else isolate
    rows = []
    for size in sizes:
        for dtype in dtypes:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
            for _ in range(rounds):
                for name in backends:
                    case = Case(name, size, dtype, mode, dims, preset_name, steps, device, threads, batch)
                    runs[name].append(_run_isolated(case) if isolate else run_case(case))
            rows += [fastest_round(runs[name]) for name in backends]
    return rows


def fastest_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One case measured in several rounds -> the fastest round's row, with the highest peak
    memory of all rounds and every round's seconds (``round_seconds``)."""
    best = dict(min(results, key=lambda r: r["seconds"]))
    best["round_seconds"] = [r["seconds"] for r in results]
    best["peak_bytes"] = max(r["peak_bytes"] for r in results)
    best["bytes_per_pixel"] = best["peak_bytes"] / best["pixels"]
    return best


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text (Markdown) table: backend, mode, size, dtype, cell-steps/s, seconds, peak memory."""
    head = ["backend", "mode", "size", "dtype", "threads", "cell-steps/s", "seconds", "peak MiB", "bytes/pixel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["backend"],
            r["mode"],
            r["size"],
            r["dtype"],
            str(r.get("threads", "")),
            f"{r['cell_steps_per_s']:.3g}",
            f"{r['seconds']:.3f}",
            f"{r['peak_bytes'] / 2**20:.1f}",
            f"{r['bytes_per_pixel']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The yardstick of each mode: the published code's way (layer-wise inference, autograd training).
YARDSTICK = {"level": "torch-layerwise", "pipeline": "torch-layerwise", "train": "autograd"}


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's speed-up and peak-memory fraction against the yardstick row of its mode and size."""
    out = []
    for r in rows:
        ref = next(
            (
                t
                for t in rows
                if t["backend"] == YARDSTICK[r["mode"]]
                and t["mode"] == r["mode"]
                and t["size"] == r["size"]
                and t["preset"] == r["preset"]
                and t["dtype"] == "float32"
            ),
            None,
        )
        if ref is None or ref is r:
            continue
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.3f}" if ref["peak_bytes"] else "n/a"
        out.append(
            f"- {r['mode']} {r['preset']} {r['size']} {r['dtype']} {r['backend']} vs {ref['backend']}: "
            f"{ref['seconds'] / r['seconds']:.1f}x faster ({r['seconds']:.3f} vs {ref['seconds']:.3f} s), "
            f"peak memory {mem} of it ({r['peak_bytes'] / 2**20:.0f} vs {ref['peak_bytes'] / 2**20:.0f} MiB)"
        )
    return out


def round_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The seconds of every round of the rows measured in several rounds (see :func:`run_bench`)."""
    return [
        f"- rounds, {r['mode']} {r['preset']} {r['size']} {r['backend']}: "
        + ", ".join(f"{t:.3f}" for t in r["round_seconds"])
        + " s"
        for r in rows
        if len(r.get("round_seconds", ())) > 1
    ]


def fmas_per_cell_step(cfg: ModelConfig, fire_rate: float | None = None) -> float:
    """Multiply-adds the fused CPU step does per cell-step of ``cfg``'s finest level: the
    depthwise perception of every cell (a row is perceived whole when any of its cells fires)
    plus fc0 and fc1 for the firing share of the cells."""
    rate = cfg.fire_rate if fire_rate is None else fire_rate
    c, h = cfg.channels, cfg.hidden
    taps = 3**cfg.spatial_dims
    return c * taps + rate * (2 * c * h + h * cfg.update_channels)


def sgemm_fma_rate(seconds: float = 0.5) -> float:
    """Multiply-adds per second of one core in torch's float32 matrix product (oneDNN/MKL reach
    most of the FMA units' peak there): the practical per-core peak the fused kernels are
    measured against."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        torch.mm(a, b)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            n += 1
        return n * 512**3 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)


def efficiency_lines(rows: list[dict[str, Any]], peak: float) -> list[str]:
    """Per-core multiply-add rate of each cpu-fused inference row against ``peak`` (FMA/s of one
    core). Pipeline rows include the non-step work (normalisation, resampling), so this is a lower
    bound for the step itself."""
    out = []
    for r in rows:
        if r["backend"] != "cpu-fused" or r["mode"] == "train":
            continue
        cells_per_core = r["cell_steps_per_s"] / max(1, r.get("threads") or 1)
        per_core = cells_per_core * fmas_per_cell_step(preset(r["preset"]))
        out.append(
            f"- {r['mode']} {r['preset']} {r['size']} {r['dtype']} cpu-fused: {cells_per_core:.3g} "
            f"cell-steps/s per core = {per_core / 1e9:.1f} GFMA/s per core, {100 * per_core / peak:.0f}% of this core's "
            f"float32 sgemm rate ({peak / 1e9:.1f} GFMA/s)"
        )
    return out


def machine_load() -> str:
    """The load averages (1, 5, 15 min) and CPU count: the machine is shared, say how busy it was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def machine_description(device: str = "cpu") -> str:
    """One line naming the machine a table was measured on."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({platform.node()}), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``octreenca bench``."""
    p = argparse.ArgumentParser(prog="octreenca bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--backends",
        default="auto",
        help="comma list: auto, torch, cpu-fused, cuda, torch-layerwise; train mode: autograd, cpu-fused",
    )
    p.add_argument("--sizes", default="1024", help="comma list of edge lengths")
    p.add_argument("--dtypes", default="float32", help="comma list: float32, bfloat16")
    p.add_argument("--mode", default="level", choices=MODES)
    p.add_argument("--dims", type=int, default=2, choices=(2, 3))
    p.add_argument("--preset", default="pathology")
    p.add_argument("--steps", type=int, default=10, help="steps per level case; timed iterations in train mode")
    p.add_argument("--batch", type=int, default=2, help="samples per iteration (train mode)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: default)")
    p.add_argument("--no-isolate", action="store_true", help="run CPU cases in this process")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one isolated case as JSON
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(Case(**json.loads(args.case)))))
        return 0
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    rows = run_bench(
        split(args.backends),
        [int(s) for s in split(args.sizes)],
        split(args.dtypes),
        mode=args.mode,
        dims=args.dims,
        preset_name=args.preset,
        steps=args.steps,
        device=args.device,
        threads=args.threads,
        isolate=False if args.no_isolate else None,
        batch=args.batch,
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {machine_description(args.device)}, {stamp}, {machine_load()}")
    print(format_table(rows))
    print("\n".join(ratio_lines(rows)))
    if any(r["backend"] == "cpu-fused" and r["mode"] != "train" for r in rows):
        print("\n".join(efficiency_lines(rows, sgemm_fma_rate())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
