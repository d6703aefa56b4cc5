"""CPU benchmark: inference and training side by side, the published code's way as the yardstick.

Every case runs in a fresh process (peak resident memory read from VmHWM, reset before the
case), one after the other in one run, with the same number of threads:

    python benchmarks/bench_cpu.py --threads 2 [--append benchmarks/RESULTS.md]

Inference (whole pipeline, random weights, fire rate 0.5): the pathology preset on 1024^2 and
2048^2 and the radiology preset on 128^3, backends ``torch-layerwise`` (the whole level through
the layer-wise reference step, as the published code runs inference: the yardstick), ``torch``
(the engine's slab-wise torch backend) and ``cpu-fused`` (numba; float32 and bfloat16).
Training (one iteration = forward through every step of every level, loss, backward, Adam):
pathology 256^2 batch 2 and radiology 64^3 batch 2 with 32^3 patches on the two finest levels,
``autograd`` (autograd through the layer-wise step, the published training step: the yardstick)
against ``cpu-fused`` (``backends/cpu_train.py``), each the median of ``--train-iterations``
iterations in one process, the two in turn for ``--train-rounds`` rounds; the fastest round of
each counts and every round is printed. The machine's load is printed before and after: other
jobs on a shared machine slow every case, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from napari_octreenca.bench import (
    efficiency_lines,
    format_table,
    machine_description,
    machine_load,
    ratio_lines,
    round_lines,
    run_bench,
    sgemm_fma_rate,
)

#: (preset, dims, sizes) of the inference cases.
INFERENCE = [("pathology", 2, "1024,2048"), ("radiology", 3, "128")]
#: (preset, dims, size) of the training cases (3D: the published patch scheme, patch size / 2).
TRAINING = [("pathology", 2, 256), ("radiology", 3, 64)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pathology-sizes", default=INFERENCE[0][2], help="comma list; empty to skip")
    p.add_argument("--radiology-sizes", default=INFERENCE[1][2], help="comma list; empty to skip")
    p.add_argument("--backends", default="torch-layerwise,torch,cpu-fused")
    p.add_argument("--fused-dtypes", default="float32,bfloat16")
    p.add_argument(
        "--train-iterations",
        type=int,
        default=7,
        help="timed iterations per training case (the median counts); 0 skips",
    )
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument(
        "--train-rounds",
        type=int,
        default=3,
        help="training: the yardstick and the fused step in turn, this many rounds (the fastest counts)",
    )
    p.add_argument("--append", type=Path, help="append the Markdown section to this file")
    args = p.parse_args(argv)
    load_before = machine_load()
    rows = []
    sizes = {"pathology": args.pathology_sizes, "radiology": args.radiology_sizes}
    for preset, dims, _ in INFERENCE:
        for size in [int(s) for s in sizes[preset].split(",") if s.strip()]:
            for backend in args.backends.split(","):
                dtypes = args.fused_dtypes.split(",") if backend == "cpu-fused" else ["float32"]
                new = run_bench(
                    [backend],
                    [size],
                    dtypes,
                    mode="pipeline",
                    dims=dims,
                    preset_name=preset,
                    device="cpu",
                    threads=args.threads,
                    isolate=True,
                )
                rows += new
                print(format_table(new), file=sys.stderr, flush=True)
    if args.train_iterations:
        for preset, dims, size in TRAINING:
            new = run_bench(
                ["autograd", "cpu-fused"],
                [size],
                mode="train",
                dims=dims,
                preset_name=preset,
                steps=args.train_iterations,
                device="cpu",
                threads=args.threads,
                isolate=True,
                batch=args.train_batch,
                rounds=args.train_rounds,
            )
            rows += new
            print(format_table(new), file=sys.stderr, flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = "python benchmarks/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            f"### CPU: inference and training against the published code's way ({stamp})",
            "",
            f"Machine: {machine_description('cpu')} ({platform.node()}); {args.threads} threads.",
            f"Load: {load_before} before, {machine_load()} after.",
            f"Command: `{cmd.strip()}`",
            "",
            format_table(rows),
            "",
            *ratio_lines(rows),
            *round_lines(rows),
            "",
            *efficiency_lines(rows, sgemm_fma_rate()),
            "",
        ]
    )
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
