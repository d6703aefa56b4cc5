"""``octreenca bench``: rows and table on tiny cases (figures themselves live in benchmarks/)."""

from __future__ import annotations

import pytest

from napari_octreenca.bench import format_table, main, run_bench


def test_level_rows_and_table() -> None:
    rows = run_bench(["torch", "cpu-fused", "torch-layerwise"], [24], ["float32", "bfloat16"], steps=2, isolate=False)
    assert [r["backend"] for r in rows] == ["torch", "cpu-fused", "torch-layerwise"] * 2
    for r in rows:
        assert r["size"] == "24x24" and r["cell_steps"] == 2 * 24 * 24
        assert r["seconds"] > 0 and r["cell_steps_per_s"] > 0 and r["peak_bytes"] >= 0
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| backend | mode | size | dtype")
    assert len(table.splitlines()) == 2 + len(rows)


def test_pipeline_isolated_reports_memory(capsys) -> None:
    """An isolated CPU case (fresh process) reads a positive peak for a 3D pipeline."""
    rows = run_bench(["cpu-fused"], [20], mode="pipeline", dims=3, preset_name="radiology", threads=1)
    (r,) = rows
    assert r["mode"] == "pipeline" and r["size"] == "20x20x20"
    assert r["cell_steps"] > 20**3 * 10 and r["peak_bytes"] > 0


def test_cli_main_prints_table(capsys) -> None:
    assert main(["--backends", "cpu-fused", "--sizes", "16", "--steps", "1", "--no-isolate"]) == 0
    out = capsys.readouterr().out
    assert "| cpu-fused | level | 16x16 | float32 |" in out


def test_unknown_mode() -> None:
    with pytest.raises(ValueError):
        run_bench(["torch"], [8], mode="nope")


def test_train_mode_rows_and_ratios() -> None:
    """Training iterations of both steps side by side, the autograd step as the yardstick."""
    from napari_octreenca.bench import ratio_lines

    rows = run_bench(["autograd", "cpu-fused"], [12], mode="train", steps=1, isolate=False, batch=2)
    assert [r["backend"] for r in rows] == ["autograd", "cpu-fused"]
    for r in rows:
        # pathology preset on 12x12: 5 levels 12, 6, 3, 2, 1 with 10/10/10/10/20 steps, batch 2
        assert r["mode"] == "train" and r["cell_steps"] == 2 * (144 * 10 + 36 * 10 + 9 * 10 + 4 * 10 + 1 * 20)
        assert r["seconds"] > 0
    (line,) = ratio_lines(rows)
    assert "cpu-fused vs autograd" in line and "x faster" in line


def test_rounds_keep_the_fastest_round_and_every_round() -> None:
    """Cases measured in rounds, in turn: the fastest round's seconds, the highest peak, every
    round's seconds listed; one round gives plain rows."""
    from napari_octreenca.bench import fastest_round, round_lines

    rows = run_bench(["autograd", "cpu-fused"], [8], mode="train", steps=1, isolate=False, batch=1, rounds=2)
    assert [r["backend"] for r in rows] == ["autograd", "cpu-fused"]
    for r in rows:
        assert len(r["round_seconds"]) == 2 and r["seconds"] == min(r["round_seconds"])
    lines = round_lines(rows)
    assert len(lines) == 2 and lines[0].startswith("- rounds, train pathology 8x8 autograd: ")
    merged = fastest_round(
        [
            {"seconds": 2.0, "peak_bytes": 10, "pixels": 5},
            {"seconds": 1.0, "peak_bytes": 4, "pixels": 5},
        ]
    )
    assert merged["seconds"] == 1.0 and merged["peak_bytes"] == 10 and merged["bytes_per_pixel"] == 2.0
    assert merged["round_seconds"] == [2.0, 1.0]
    assert round_lines([dict(merged, round_seconds=[1.0])]) == []
    with pytest.raises(ValueError, match="rounds"):
        run_bench(["torch"], [8], rounds=0)


def test_fma_efficiency_lines() -> None:
    """The FMA count per cell-step follows the model (perception of every cell + the MLP of the
    firing share) and each cpu-fused inference row gets a line against the core's sgemm rate."""
    from napari_octreenca.bench import efficiency_lines, fmas_per_cell_step, sgemm_fma_rate
    from napari_octreenca.nca.config import preset

    assert fmas_per_cell_step(preset("radiology"), 0.5) == 16 * 27 + 0.5 * (2 * 16 * 64 + 64 * 15)
    assert fmas_per_cell_step(preset("pathology"), 1.0) == 16 * 9 + 2 * 16 * 64 + 64 * 13
    peak = sgemm_fma_rate(0.05)
    assert peak > 1e8
    rows = run_bench(["cpu-fused", "torch"], [16], mode="pipeline", threads=1, isolate=False)
    lines = efficiency_lines(rows, peak)
    assert len(lines) == 1 and "cpu-fused" in lines[0] and "GFMA/s per core" in lines[0]


def test_cli_main_prints_fma_efficiency(capsys) -> None:
    assert main(["--backends", "cpu-fused", "--sizes", "16", "--steps", "1", "--no-isolate"]) == 0
    assert "GFMA/s per core" in capsys.readouterr().out
