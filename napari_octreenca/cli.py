"""The ``octreenca`` command line: segment, train, info, import, bench, demo.

Errors are printed as one line (``octreenca: error: ...``) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
EXIT_INTERRUPT = 130
#: Keys of ``nca.config.ORIGINAL_NORMALIZATIONS``, spelled out so that ``--help`` does not import torch.
ORIGINAL_NORMALIZATION_NAMES = ("imagenet", "percentile", "unit", "none")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,64,32, got {text!r}") from None


def _input_text(cfg: Any) -> str:
    """``3 image`` or ``3 image + 1 derived (motion)``."""
    text = f"{cfg.image_channels} image"
    if cfg.input_features:
        text += f" + {len(cfg.input_features)} derived ({', '.join(cfg.input_features)})"
    return text


def _describe(cfg: Any, source: str) -> str:
    lines = [
        f"model:        {cfg.name}  ({source})",
        f"description:  {cfg.description or '-'}",
        f"dimensions:   {cfg.spatial_dims}D, axes {cfg.axes}",
        f"channels:     {cfg.channels} = {_input_text(cfg)} + {cfg.output_channels} logits + {cfg.hidden_channels} hidden",
        f"hidden size:  {cfg.hidden}, kernel {cfg.kernel_size}, fire rate {cfg.fire_rate}",
        f"levels:       {cfg.levels} (finest first), steps {list(cfg.steps)}, factors {[list(f) for f in cfg.factors]}",
        f"resize:       {cfg.resize}; normalisation {cfg.normalization.mode}",
        f"classes:      {', '.join(cfg.class_names)}",
    ]
    if cfg.train_size:
        lines.append(
            f"train size:   {list(cfg.train_size)} (coarsest steps scale above it: {cfg.scale_coarsest_steps})"
        )
    if cfg.spacing:
        lines.append(f"spacing:      {list(cfg.spacing)} (inputs are resampled to it)")
    lines.append(f"parameters:   {cfg.parameter_count():,}")
    quality = (cfg.provenance or {}).get("quality")
    if quality:
        lines.append(
            f"quality:      flagged above {quality['threshold']} (spread between {quality['runs']} runs; "
            "calibrated on held-out inputs, see the model card)"
        )
        agree = quality.get("agreement")
        if isinstance(agree, dict):
            lines.append(
                f"              and below Dice {agree['threshold']} with the {agree['baseline']} baseline "
                f"({agree['label']}; catches confident misses the spread cannot see)"
            )
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from .nca.config import PRESETS
    from .nca.modelfile import read_config, read_extra
    from .nca.registry import resolve_model_path

    if args.model in PRESETS and not Path(args.model).exists():
        cfg, source, extra = PRESETS[args.model], "preset, untrained", {}
    else:
        path = resolve_model_path(args.model)
        cfg, source, extra = read_config(path), str(path), read_extra(path)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "extra": extra}, indent=2))
    else:
        print(_describe(cfg, source))
        metrics = extra.get("metrics")
        if metrics:
            print(f"metrics:      {json.dumps(metrics)}")
        from .run.baselines import baseline_advice

        advice = baseline_advice(extra)
        if advice is not None:
            print(f"hint:         {advice.cli_hint()}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .run.pipeline import BatchError, run_segment

    paths = args.paths
    if len(paths) < 2:
        raise SystemExit("octreenca: error: segment needs INPUT... OUTPUT")
    inputs, output = paths[:-1], paths[-1]
    t0 = time.perf_counter()
    last = [0.0]

    def progress(info: dict[str, Any]) -> None:
        if info.get("stage") == "failed" and not args.quiet:  # the batch goes on; the list comes at the end
            print(f"  failed: {info['error']}", file=sys.stderr, flush=True)
        if info.get("stage") == "quality":
            _print_quality(info)
            return
        final = "frames" in info and info["frame"] == info["frames"]
        if args.quiet or (time.perf_counter() - last[0] < 1.0 and not final):
            return
        last[0] = time.perf_counter()
        if "frames" in info:  # a derived input channel (motion), before the first step
            print(f"  computing {info['stage']}: frame {info['frame']}/{info['frames']}", file=sys.stderr, flush=True)
            return
        parts = [f"{k}={v}" for k, v in info.items() if v is not None]
        print("  " + " ".join(parts), file=sys.stderr, flush=True)

    _check_seed_arg(args.seed, args.runs or 3)
    _print_baseline_hint(args.model)
    try:
        written = run_segment(
            inputs,
            output,
            args.model,
            device=args.device,
            dtype=args.dtype,
            backend=args.backend,
            seed=args.seed,
            runs=args.runs,
            tile=args.tile,
            scheduler=args.scheduler,
            progress=progress,
            use_pyramid=args.use_pyramid,
            overwrite=args.overwrite,
            wait=args.wait,
            keep_going=args.keep_going,
            normalization=args.normalization,
            fire_rate=args.fire_rate,
        )
    except BatchError as exc:
        for p in exc.written:
            print(p)
        for src, err in exc.failures:
            msg = error_message(err)
            print(f"octreenca: failed: {msg if src.name in msg else f'{src}: {msg}'}", file=sys.stderr)
        raise
    for p in written:
        print(p)
    if not args.quiet:
        print(f"done: {len(written)} output(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _print_baseline_hint(model: str) -> None:
    """One line on stderr when the model's own held-out comparison says a baseline did better."""
    from .run.baselines import model_baseline_advice

    advice = model_baseline_advice(model)
    if advice is not None:
        print(f"octreenca: hint: {advice.cli_hint()}", file=sys.stderr, flush=True)


def _check_seed_arg(seed: int, runs: int = 1) -> None:
    from .nca.config import check_seed

    check_seed(seed, runs)


def _refuse_same_file(src: str, out: str, what: str) -> None:
    """``out`` must not be ``src``: writing it would destroy the input before it is fully read."""
    import os

    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ValueError(f"the output {out} is the {what} {src}: writing would destroy it; choose another output")


def _print_quality(info: dict[str, Any]) -> None:
    """One line per output: the quality estimate and its verdict (stderr, like the progress)."""
    q = info.get("quality")
    if not q:
        print(f"quality: {info['path']}: {info['verdict']}", file=sys.stderr, flush=True)
        return
    labels = ", ".join(f"{k} {v:.4f}" for k, v in q["per_label"].items())
    agree = q.get("agreement")
    if agree:  # the second signal: Dice with the model's baseline, per checked label
        labels += "; agreement with " + str(q["baseline"]) + ": " + ", ".join(f"{k} {v:.3f}" for k, v in agree.items())
    flag = "FLAGGED" if q["flagged"] else "ok"
    print(f"quality: {info['path']}: {flag}; per label: {labels}; {q['verdict']}", file=sys.stderr, flush=True)


def _read(path: str) -> tuple[Any, str]:
    from .io.readers import read_image

    img = read_image(path)
    data = img.data
    if hasattr(data, "compute"):
        data = data.compute()
    return data, img.axes


def cmd_train(args: argparse.Namespace) -> int:
    import numpy as np

    from .nca.config import preset
    from .nca.device import check_device
    from .nca.modelfile import save_model
    from .nca.registry import open_model
    from .run.inputs import input_range_of
    from .run.training import TrainConfig, TrainPair, evaluate, train

    if not args.pair:
        raise SystemExit("octreenca: error: give at least one --pair IMAGE LABELS")
    _check_seed_arg(args.seed)
    check_device(args.device)
    for image_path, label_path in args.pair:
        _refuse_same_file(image_path, args.out, "training image")
        _refuse_same_file(label_path, args.out, "training labels")
    pairs = []
    for image_path, label_path in args.pair:
        image, axes = _read(image_path)
        labels, _ = _read(label_path)
        labels = np.asarray(labels)
        if labels.ndim == image.ndim and "C" in axes:  # e.g. an RGB mask: use its first channel
            labels = np.take(labels, 0, axis=axes.index("C"))
        if args.binarize:
            labels = (labels > 0).astype(np.uint8)
        pairs.append(TrainPair(image, labels, axes))
    if args.model:
        model: Any = open_model(args.model)
    else:
        changes: dict[str, Any] = {}
        if args.classes is not None:
            changes["output_channels"] = args.classes
        if args.steps:
            changes["steps"] = args.steps
            if len(args.steps) != 5:
                base = preset(args.preset)
                changes["factors"] = (base.factors[0],) * (len(args.steps) - 1)
        if args.name:
            changes["name"] = args.name
        model = preset(args.preset, **changes)
    cfg = TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        crop=args.crop,
        level_patch=args.level_patch,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        fused_cpu=not args.autograd,
    )
    t0 = time.perf_counter()

    def progress(p: Any) -> None:
        if p.iteration % max(1, args.log_every) == 0 or p.iteration == p.iterations:
            print(
                f"iter {p.iteration}/{p.iterations}  loss {p.loss:.4f}  dice {p.dice:.3f}  lr {p.lr:.2e}  {p.seconds:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    result = train(
        model, pairs, cfg, callback=progress, checkpoint=args.checkpoint, resume=args.resume, device=args.device
    )
    scores = evaluate(result.model, pairs)
    final = result.model
    lo, hi, dtype_name = input_range_of([p.image for p in pairs])
    # The training images' raw range: inputs far outside it get a warning when segmenting.
    final.config = final.config.replace(
        provenance={**final.config.provenance, "train_dice": scores}, input_range=(lo, hi), input_dtype=dtype_name
    )
    save_model(final, args.out)
    print(f"saved {args.out}  (train Dice {scores['mean']:.3f}, {time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .nca.modelfile import import_original, save_model

    _refuse_same_file(args.checkpoint, args.out, "checkpoint")
    changes: dict[str, Any] = {}
    if args.classes is not None:
        if args.classes < 1:
            raise ValueError(f"--classes must be >= 1, got {args.classes}")
        changes["output_channels"] = args.classes
    if args.steps:
        changes["steps"] = args.steps
    if args.normalization:
        changes["normalization"] = args.normalization
    if args.fire_rate is not None:
        changes["fire_rate"] = args.fire_rate
    model = import_original(args.checkpoint, args.preset, **changes)
    save_model(model, args.out)
    cfg = model.config
    print(
        f"imported {args.checkpoint} -> {args.out} ({model.parameter_count():,} parameters, "
        f"normalisation {cfg.normalization.mode}, fire rate {cfg.fire_rate})"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return int(bench.main(args.rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .nca.device import check_device

    check_device(args.device)
    return int(run_demo(args.out, device=args.device, quick=args.quick) or 0)


def _run_setting_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--normalization`` and ``--fire-rate``: the published code's input normalisation and fire rate."""
    parser.add_argument(
        "--normalization",
        default=None,
        choices=ORIGINAL_NORMALIZATION_NAMES,
        help="input normalisation of the published code: imagenet (its 2D RGB data: /255, "
        f"ImageNet mean/std), percentile (its 3D MRI: 0.5-99.5 %% -> 0-1), unit, none ({what})",
    )
    parser.add_argument(
        "--fire-rate",
        type=float,
        default=None,
        help=f"probability that a cell updates per step; 1 = deterministic ({what})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="octreenca", description="OctreeNCA segmentation of large medical images")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # ... also after the sub-command (SUPPRESS: absent there, the top-level value stays)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", parents=[common], help="segment images (files, folders or globs) with a model")
    s.add_argument(
        "paths",
        nargs="+",
        metavar="INPUT... OUTPUT",
        help="image files, folders (of files or of video frames) or globs, then the output file or folder",
    )
    s.add_argument(
        "--model",
        required=True,
        help="bundled model name, model file, or a classical baseline (otsu-brain, otsu-epidermis)",
    )
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="precision of the state (default: %(default)s)",
    )
    s.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu-fused", "cuda"],
        help="the step's implementation (default: the fastest that runs here)",
    )
    s.add_argument("--seed", type=int, default=0, help="fire-mask seed of the first run (default: %(default)s)")
    s.add_argument(
        "--runs",
        type=int,
        default=None,
        help="ensemble size: median logits + quality estimate (2 or more runs); default 3 for "
        "inputs run whole, 1 for inputs run tile by tile (no estimate there yet)",
    )
    s.add_argument("--tile", type=int, default=None, help="force tiled inference with this tile size")
    s.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    s.add_argument(
        "--use-pyramid",
        action="store_true",
        help="read octree levels from the file's pyramid where shapes fit (faster, not bitwise equal)",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="allow an output that is an input (the input is replaced) or earlier results among the inputs",
    )
    s.add_argument(
        "--wait", action="store_true", help="wait for another run writing the same output instead of failing"
    )
    s.add_argument(
        "--keep-going",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="go on after a failed input, list the failures at the end, exit non-zero "
        "(default: on for folders and globs)",
    )
    _run_setting_args(s, "instead of the model's own")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_segment)

    t = sub.add_parser("train", parents=[common], help="train a model from image/label pairs")
    t.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("IMAGE", "LABELS"),
        default=[],
        help="an image file and its label file (0 = background, k = class k); repeat for more pairs",
    )
    t.add_argument(
        "--preset",
        default="pathology",
        choices=["pathology", "radiology", "surgery"],
        help="architecture to start from: 2D slides, 3D volumes or videos (default: %(default)s)",
    )
    t.add_argument("--model", default=None, help="start from this model (fine-tune) instead of a preset")
    t.add_argument("--classes", type=int, default=None, help="number of classes (default: the preset's or model's)")
    t.add_argument("--steps", type=_ints, default=None, help="steps per level, finest first, e.g. 10,10,10,10,20")
    t.add_argument("--name", default=None, help="the model's name, stored in its file")
    t.add_argument("--iterations", type=int, default=1000, help="training iterations (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=4, help="crops per iteration (default: %(default)s)")
    t.add_argument(
        "--crop", type=_ints, default=None, help="random crop size per sample, e.g. 256,256 (default: whole)"
    )
    t.add_argument(
        "--level-patch",
        type=_ints,
        default=None,
        help="3D: the two finest levels run only on a random patch of this size, e.g. 32,32,32",
    )
    t.add_argument("--lr", type=float, default=1.6e-3, help="learning rate (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, crops and fire masks (default: %(default)s)")
    t.add_argument("--binarize", action="store_true", help="treat every label > 0 as class 1")
    t.add_argument("--checkpoint", default=None, help="write a resumable checkpoint to this file")
    t.add_argument(
        "--checkpoint-every", type=int, default=100, help="iterations between checkpoints (default: %(default)s)"
    )
    t.add_argument("--resume", default=None, help="continue from this checkpoint (same data and settings)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    t.add_argument(
        "--autograd",
        action="store_true",
        help="train with autograd through the reference step instead of the fused CPU step",
    )
    t.add_argument("--log-every", type=int, default=50, help="iterations between progress lines (default: %(default)s)")
    t.add_argument("--out", required=True, help="the trained model file to write (.safetensors)")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", parents=[common], help="print a model's architecture and parameter count")
    i.add_argument("model", help="preset name, bundled model name or model file")
    i.add_argument("--json", action="store_true", help="the config and metadata as JSON")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("import", parents=[common], help="convert a checkpoint of the published OctreeNCA code")
    m.add_argument("checkpoint", help="the published code's checkpoint (.pth)")
    m.add_argument("out", help="the model file to write (.safetensors)")
    m.add_argument(
        "--preset",
        default="pathology",
        choices=["pathology", "radiology", "surgery"],
        help="the architecture the checkpoint was trained with (default: %(default)s)",
    )
    m.add_argument("--classes", type=int, default=None, help="number of classes (default: the preset's)")
    m.add_argument("--steps", type=_ints, default=None, help="steps per level, finest first (default: the preset's)")
    _run_setting_args(m, "stored in the converted model; default: the preset's")
    m.set_defaults(func=cmd_import)

    b = sub.add_parser("bench", help="benchmark the backends (cell-steps/s, seconds, peak memory)")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (octreenca bench -h)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", parents=[common], help="segment the bundled samples with the bundled models")
    d.add_argument("--out", default="octreenca-demo", help="folder for the outputs (default: %(default)s)")
    d.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="smaller inputs, for a fast check")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``octreenca``."""
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # argparse.REMAINDER drops leading --options in sub-commands
        from . import bench

        return int(bench.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    debug = bool(args.debug)
    with warnings.catch_warnings():
        # Our own warnings (value range, dropped alpha) always show, as one line unless --debug.
        from .nca.errors import OctreeNCAWarning

        warnings.filterwarnings("always", category=OctreeNCAWarning)
        if not debug:
            warnings.showwarning = _one_line_warning
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("octreenca: interrupted", file=sys.stderr)
            return EXIT_INTERRUPT
        except Exception as exc:
            if debug:
                raise
            print(f"octreenca: error: {error_message(exc)}", file=sys.stderr)
            return EXIT_ERROR


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = str(message).strip().splitlines()
    print(f"octreenca: warning: {text[0] if text else category.__name__}", file=sys.stderr, flush=True)


def error_message(exc: BaseException) -> str:
    """One line for any error: what was wrong (with the file) and what to do; never a traceback."""
    import errno as errnos

    from .nca.errors import OctreeNCAError

    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OctreeNCAError):
        return first
    if isinstance(exc, MemoryError):
        return "out of memory: retry with --tile 1024 (tile by tile, out of core) or --dtype bfloat16"
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or first
        if exc.errno == errnos.ENOSPC:
            return f"{where}no space left on the disk: free some space or write the output elsewhere"
        if exc.errno in (errnos.EACCES, errnos.EPERM, errnos.EROFS):
            return f"{where}{what}: check the file's permissions or choose another path"
        return f"{where}{what}"
    if isinstance(exc, RuntimeError) and "out of memory" in text.lower():
        return "the device ran out of memory: retry with --tile 1024 or --dtype bfloat16"
    if isinstance(exc, (ValueError, OSError, RuntimeError)):
        return first
    return f"{type(exc).__name__}: {first} (unexpected; rerun with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
