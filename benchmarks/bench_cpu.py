"""CPU benchmark: the pathology preset end to end, fused CPU backend against the torch paths.

Every case runs in a fresh process (peak resident memory read from VmHWM, reset before the
case), side by side in one run, with the same number of threads:

    python benchmarks/bench_cpu.py --sizes 1024,2048 --threads 2 [--append benchmarks/RESULTS.md]

``torch`` is the engine's torch backend (slab-wise, bounded scratch); ``torch-layerwise`` runs
each level through the layer-wise step at once, as the published code does. Ratios are printed
against both.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from napari_octreenca.bench import format_table, machine_description, run_bench


def ratios(rows: list[dict], fused: str = "cpu-fused") -> list[str]:
    """Speed-up and memory fraction of each fused row against each torch row of the same size/dtype."""
    out = []
    for f in (r for r in rows if r["backend"] == fused):
        for t in rows:
            if t["backend"].startswith("torch") and t["size"] == f["size"] and t["dtype"] == "float32":
                out.append(
                    f"- {f['size']} {f['dtype']} cpu-fused vs {t['backend']} (float32): "
                    f"{f['cell_steps_per_s'] / t['cell_steps_per_s']:.1f}x faster, "
                    f"peak memory {f['peak_bytes'] / t['peak_bytes']:.3f} of it "
                    f"({f['bytes_per_pixel']:.0f} vs {t['bytes_per_pixel']:.0f} bytes/pixel)"
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="torch,torch-layerwise,cpu-fused")
    p.add_argument("--fused-dtypes", default="float32,bfloat16")
    p.add_argument("--append", type=Path, help="append the Markdown section to this file")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        for backend in args.backends.split(","):
            dtypes = args.fused_dtypes.split(",") if backend == "cpu-fused" else ["float32"]
            rows += run_bench([backend], [size], dtypes, mode="pipeline", preset_name="pathology",
                              device="cpu", threads=args.threads, isolate=True)
            print(format_table(rows[-len(dtypes):]), file=sys.stderr, flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = "python benchmarks/bench_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"### CPU, pathology preset end to end ({stamp})",
        "",
        f"Machine: {machine_description('cpu')} ({platform.node()}); {args.threads} threads.",
        f"Command: `{cmd.strip()}`",
        "",
        format_table(rows),
        "",
        *ratios(rows),
        "",
    ])
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
