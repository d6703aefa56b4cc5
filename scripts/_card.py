"""Model-card facts the training scripts share."""

from __future__ import annotations

from typing import Any


def held_out_facts(metrics: dict[str, float], baseline_method: str) -> dict[str, Any]:
    """The card's held-out score and its Otsu baseline, from ``evaluate_held_out``'s metrics
    (``dice`` and ``baseline_otsu_dice``)."""
    return {
        "held_out_metrics": {"dice": metrics["dice"]},
        "metrics": {"held_out_dice": metrics["dice"], "baseline_otsu_dice": metrics["baseline_otsu_dice"]},
        "baseline": {"method": baseline_method, "dice": metrics["baseline_otsu_dice"]},
    }
