#!/usr/bin/env python
"""Write the Markdown model card next to a bundled model, from the facts stored in the model file.

The card facts live in the model file's ``extra`` JSON (written by the training scripts); the
observations made after training (known failure modes, what was tried) are added here, stored
back into ``extra`` (the weights are not touched), and the card is rendered from that one
source, so the file and the card cannot disagree.

    python scripts/model_card.py brain_mri he_epidermis davis_video
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_octreenca.nca.modelfile import load_model, read_extra, save_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def _load_notes(name: str) -> dict[str, Any]:
    p = Path(__file__).with_name(f"card_notes_{name}.json")
    return json.loads(p.read_text()) if p.exists() else {}


def _load_baseline_spec(name: str) -> dict[str, Any] | None:
    """This model's entry of ``card_baselines.json``: which runnable baseline it was compared with and
    which ``metrics`` keys hold the two scores per held-out input (kept apart from the card notes)."""
    p = Path(__file__).with_name("card_baselines.json")
    return json.loads(p.read_text()).get(name) if p.exists() else None


def baseline_comparison(spec: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``baseline_comparison`` fact of a model file (read by ``run.baselines.baseline_advice``):
    the spec with each input's model and baseline scores looked up in the card's metrics."""
    from napari_octreenca.run.baselines import BASELINE_MODELS

    if spec["baseline"] not in BASELINE_MODELS:
        raise SystemExit(f"card_baselines.json: {spec['baseline']!r} is not a baseline that runs by name")
    inputs = []
    for label, (model_key, baseline_key) in spec["inputs"].items():
        if model_key not in metrics or baseline_key not in metrics:
            raise SystemExit(f"card_baselines.json: {model_key!r} or {baseline_key!r} is not in the card's metrics")
        inputs.append({"input": label, "model": metrics[model_key], "baseline": metrics[baseline_key]})
    keep = ("baseline", "baseline_label", "metric", "data")
    return {**{k: spec[k] for k in keep if k in spec}, "inputs": inputs}


def _summary(extra: dict[str, Any]) -> dict[str, float]:
    """The headline figures (what ``octreenca info`` prints) from the detailed ones."""
    held, base = extra["held_out_metrics"], extra["baseline"]
    if "dice" in held:
        return {"held_out_dice": held["dice"], "baseline_otsu_dice": base["dice"]}
    out = {"held_out_mean_J": held["mean_J"]}
    out.update({f"J_{k}": v["J"] for k, v in held["per_sequence"].items()})
    out["baseline_prior_mean_J"] = base["mean_J"]
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def render(name: str, cfg: Any, extra: dict[str, Any]) -> str:
    """The Markdown card of one model."""
    lines = [f"# `{name}`: {extra['task']}", ""]
    lines += [
        "**Not for clinical use.** A research and demonstration model; it has not been validated "
        "for diagnosis or treatment and must not be used for either.",
        "",
    ]
    lines += ["## What it is", ""]
    lines += [
        f"- Architecture: OctreeNCA, {cfg.spatial_dims}D, axes `{cfg.axes}`, {cfg.levels} levels, "
        f"factors {[list(f) for f in cfg.factors]}, steps {list(cfg.steps)}, {cfg.channels} channels "
        f"({cfg.image_channels} image"
        + (f" + {len(cfg.input_features)} derived: {', '.join(cfg.input_features)}" if cfg.input_features else "")
        + f" + {cfg.output_channels} logits + {cfg.hidden_channels} hidden), "
        f"hidden size {cfg.hidden}, fire rate {cfg.fire_rate}; {cfg.parameter_count():,} parameters.",
        f"- Classes: {', '.join(cfg.class_names)}.",
        f"- Fixed spacing: `{list(cfg.spacing)}` (axes `{cfg.axes}`); inputs are resampled to it and the "
        "logits back to the input grid.",
        f"- Normalisation: `{cfg.normalization.mode}`.",
        f"- Intended use: {extra.get('intended_use', extra['task'])}.",
        "",
    ]
    lines += [
        "## Data and licence",
        "",
        f"- Training: {extra['training_data']}.",
        *(
            [f"- Validation (model selection only): {extra['validation_data']}."]
            if extra.get("validation_data")
            else []
        ),
        f"- Held out (never used for training or model selection): {extra['held_out_data']}.",
        f"- Licence of the data: {extra.get('data_licence', 'see the sources above')}.",
        "- The weights are the project's own work and ship with it; the data do not.",
        "",
    ]
    lines += ["## Preprocessing", "", f"{extra['preprocessing']}.", ""]
    if "input_orientation" in extra:
        lines += [f"Input orientation: {extra['input_orientation']}.", ""]
    lines += ["## Held-out results", ""]
    m = extra["metrics"]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items()]
    lines += [""]
    if "per_sequence" in extra["held_out_metrics"]:
        lines += [
            "| sequence | J (mean IoU) | consecutive-frame IoU, prediction | same, ground truth | "
            "baseline J (spatial prior) | baseline J (motion) |",
            "|---|---|---|---|---|---|",
        ]
        rows = list(extra["held_out_metrics"]["per_sequence"].items())
        rows += [(f"{k} (validation)", v) for k, v in (extra.get("validation_metrics") or {}).items() if "J" in v]
        for seq, v in rows:
            lines += [
                f"| {seq} | {_fmt(v['J'])} | {_fmt(v['consecutive_iou_pred'])} | "
                f"{_fmt(v['consecutive_iou_truth'])} | {_fmt(v.get('baseline_prior_J', '-'))} | "
                f"{_fmt(v.get('baseline_motion_J', '-'))} |"
            ]
        lines += [""]
    if "clip" in extra["held_out_metrics"]:
        c = extra["held_out_metrics"]["clip"]
        lines += [
            f"Short-clip figure (checked by the unit test): the first {c['frames']} frames of {c['sequence']} "
            f"segmented on their own: J {_fmt(c['J'])}, consecutive-frame IoU {_fmt(c['consecutive_iou_pred'])} "
            f"(ground truth {_fmt(c['consecutive_iou_truth'])}).",
            "",
        ]
    b = extra["baseline"]
    lines += [
        f"Baseline on the same held-out data: {b['method']}: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in b.items() if k != "method")
        + ".",
        "",
    ]
    if extra.get("target"):
        lines += [
            f"Target: {extra['target']}"
            + (f" **Status: {extra['target_status']}.**" if extra.get("target_status") else ""),
            "",
        ]
    if extra.get("recommendation"):
        lines += [f"**Recommended:** {extra['recommendation']}", ""]
    lines += _baseline_section(extra)
    lines += _quality_section(cfg, extra.get("quality_inputs"))
    lines += [
        "## Reproduce",
        "",
        "```",
        extra["train_command"],
        "```",
        "",
        f"- Seed: {extra['seed']}; iterations: {extra.get('iterations', '-')}.",
        f"- Wall time: {extra['train_wall_seconds']:.0f} s end to end (training, evaluation) on the "
        f"{extra['train_machine']}.",
        f"- Segment from Python: `{extra['segment_call']}` (`napari_octreenca.run.resample`).",
        "",
    ]
    if extra.get("cli"):
        lines += [f"- From the command line: `{extra['cli']}`", ""]
    lines += [
        "The test `tests/test_models_"
        + {"brain_mri": "brain", "he_epidermis": "epidermis", "davis_video": "davis"}.get(name, name)
        + ".py` reloads this file and checks the held-out figure where the data is installed.",
        "",
    ]
    lines += ["## Known failure modes and limits", ""]
    lines += [f"- {s}" for s in extra.get("known_failure_modes", [])] + [""]
    if extra.get("notes"):
        lines += ["## Notes: what was tried", ""] + [f"- {s}" for s in extra["notes"]] + [""]
    return "\n".join(lines)


def _baseline_section(extra: dict[str, Any]) -> list[str]:
    """What the Segment dock and ``octreenca segment`` say when this model is chosen."""
    from napari_octreenca.run.baselines import baseline_advice

    advice = baseline_advice(extra)
    if advice is None:
        return []
    where = (
        "every held-out input" if advice.everywhere else f"{len(advice.better)} of {len(advice.inputs)} held-out inputs"
    )
    return [
        f"**Baseline advice:** the baseline `{advice.baseline}` did better on {where} "
        f"({advice.details}). When this model is chosen, the Segment dock offers a one-click switch to "
        f"`{advice.baseline}` and `octreenca segment` prints: `{advice.cli_hint()}` (from the "
        "`baseline_comparison` key of the model file's metadata, written from `scripts/card_baselines.json`).",
        "",
    ]


def _quality_section(cfg: Any, inputs_note: str | None = None) -> list[str]:
    """The calibration of the quality estimate (``run.quality``), from the model's provenance;
    ``inputs_note`` (card notes ``quality_inputs``) says where the calibration inputs come from."""
    q = (cfg.provenance or {}).get("quality")
    if not q:
        from napari_octreenca.run.quality import DEFAULT_MAX_FRACTION, DEFAULT_THRESHOLD

        return [
            "## Quality estimate",
            "",
            f"Not calibrated for this model: the default threshold {DEFAULT_THRESHOLD} applies (set from the "
            f"calibrated models; the verdict says it is not calibrated), and a label covering more than "
            f"{DEFAULT_MAX_FRACTION:.0%} of the image is flagged as implausible.",
            "",
        ]
    if q.get("agreement"):
        return _quality_two_signals(q)
    if q.get("min_fraction") is not None:
        return _quality_floor(q)
    lines = [
        "## Quality estimate",
        "",
        f"Every segmentation with 2 or more runs gets a score: {q['metric']} ({q['runs']} runs, seeds from "
        f"{q['seeds_from']}). Results scoring above **{q['threshold']}** are flagged as unreliable. The "
        f"threshold is the {q['rule']}, measured on these inputs "
        f"({inputs_note or 'none used for training or model selection'}; "
        "`python scripts/calibrate_quality.py` reproduces them):",
        "",
        "| group | input | score |",
        "|---|---|---|",
    ]
    empty = set(q.get("nothing_segmented", []))
    for group, cases in q["calibrated_on"].items():
        lines += [
            f"| {group} | {name} | {v:.4f}" + (" (nothing segmented: flagged as such)" if name in empty else "") + " |"
            for name, v in cases.items()
        ]
    lines += [
        "",
        "Groups: good and failing set the threshold; the others are shown for information.",
        "",
        f"A label covering more than {q.get('max_fraction', 0.9):.0%} of the image is flagged as implausible as "
        "well (the spread cannot see a model that labels everything and is sure of it), and so is a result "
        "with nothing segmented.",
    ]
    return lines + [""]


def _quality_table(q: dict[str, Any], column: str, cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """The table of calibration inputs of a section with several checks: spread, ``column`` (each
    case's ``cell``) and which checks flag it."""
    lines = [f"| group | input | spread | {column} | flagged by |", "|---|---|---|---|---|"]
    for group, cases in q["calibrated_on"].items():
        for name, v in cases.items():
            lines.append(f"| {group} | {name} | {v['score']:.4f} | {cell(v)} | {', '.join(v['flagged_by']) or '-'} |")
    return lines


def _quality_tail(q: dict[str, Any], what: str) -> list[str]:
    """The closing lines of a quality section with several checks: what they miss, the coverage rules."""
    missed = q.get("missed") or []
    return [
        "",
        f"Failing calibration inputs that neither {what} flags: " + (", ".join(missed) if missed else "none") + ".",
        "",
        f"A label covering more than {q.get('max_fraction', 0.9):.0%} of the image is flagged as implausible as "
        "well, and so is a result with nothing segmented.",
        "",
    ]


def _quality_floor(q: dict[str, Any]) -> list[str]:
    """The quality section of a model checked by the spread and a coverage floor."""
    lines = [
        "## Quality estimate",
        "",
        f"Every segmentation with 2 or more runs ({q['runs']} by default, seeds from {q['seeds_from']}) is "
        "flagged as unreliable when either check fires:",
        "",
        f"- the spread, {q['metric']}: flagged above **{q['threshold']}**;",
        f"- the coverage: flagged when the object covers less than **{q['min_fraction']:.2%}** of the clip "
        "(every good result measured covers more; a clip where nothing moves gets a confident, almost empty "
        "result that the spread cannot see).",
        "",
        f"Thresholds: {q['rule']}. Measured on these inputs (the test group sets nothing; "
        "`python scripts/calibrate_quality.py davis_video models/davis_video.safetensors` reproduces them):",
        "",
    ]
    return lines + _quality_table(q, "coverage", lambda v: f"{v['coverage']:.2%}") + _quality_tail(q, "check")


def _quality_two_signals(q: dict[str, Any]) -> list[str]:
    """The quality section of a model whose estimate also checks the agreement with a baseline."""
    a = q["agreement"]
    lines = [
        "## Quality estimate",
        "",
        f"Every segmentation with 2 or more runs ({q['runs']} by default, seeds from {q['seeds_from']}) is "
        "checked by two independent signals and flagged as unreliable when either fires:",
        "",
        f"- the spread, {q['metric']}: flagged above **{q['threshold']}**;",
        f"- the agreement with the `{a['baseline']}` baseline, {a['metric']} (label {a['label']}): flagged "
        f"below **{a['threshold']}**. This catches the confident miss the spread cannot see (an already "
        "skull-stripped scan: the model labels only the central core and its runs agree).",
        "",
        f"Thresholds: {q['rule']}. Measured on these inputs (none used for training or model selection; the "
        "test group is the held-out subject that the tests check and that sets nothing; "
        "`python scripts/calibrate_quality.py` reproduces them):",
        "",
    ]
    agree = _quality_table(q, "agreement", lambda v: "-" if v["agreement"] is None else f"{v['agreement']:.3f}")
    return lines + agree + _quality_tail(q, "signal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    for name in args.names:
        path = MODELS / f"{name}.safetensors"
        extra = read_extra(path)
        notes = _load_notes(name)
        if "metrics" not in extra:  # files written before the training scripts stored this summary
            notes.setdefault("metrics", _summary(extra))
        spec = _load_baseline_spec(name)
        if spec:
            notes["baseline_comparison"] = baseline_comparison(
                spec, {**extra.get("metrics", {}), **notes.get("metrics", {})}
            )
        if notes:
            extra.update(notes)
            save_model(load_model(path), path, extra=extra)  # same weights, updated facts
        model = load_model(path)
        (MODELS / f"{name}.md").write_text(render(name, model.config, extra))
        print(f"wrote {MODELS / (name + '.md')}")


if __name__ == "__main__":
    main()
