"""Qt-free recording of what an OctreeNCA does while it segments.

An :class:`NCARecorder` is passed as ``callback=`` to :func:`napari_octreenca.segment`.
For every step it receives a :class:`~napari_octreenca.StepInfo` whose ``state`` is a live
view of the engine's buffer, and it keeps bounded copies of:

- the final hidden channels of every octree level (strided on large inputs),
- the step-by-step evolution over all levels' steps on a common display grid (the visible region
  and/or a reduced resolution): the logits and an RGB view of the hidden state (first three
  principal components),
- the convergence of every level: mean absolute update of the state per step, and the share of
  cells whose label changed in that step (what a user sees change).

:func:`plan_recording` decides the strides from a memory budget *before* the run, so a user sees
what the recording will cost. :func:`recording_layers` turns a finished recording into napari
layer-data tuples placed at the input's geometry (plain tuples: no napari or Qt import here).
Only ensemble run 0 is recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..nca.config import ModelConfig
from .inference import StepInfo

#: Default memory budget of a recording (hidden channels + evolution), in bytes.
DEFAULT_BUDGET = 256 * 1024**2
#: Cells per level sampled for the convergence curve (bounded cost on huge levels).
CONVERGENCE_CELLS = 1 << 16


def _stride_for(shape: Sequence[int], bytes_per_cell: float, budget: float) -> int:
    """Smallest uniform stride so that ``prod(ceil(shape / s)) * bytes_per_cell <= budget``."""
    s = 1
    while True:
        cells = math.prod(math.ceil(n / s) for n in shape)
        if cells * bytes_per_cell <= budget or all(math.ceil(n / s) == 1 for n in shape):
            return s
        s += 1 if s < 4 else max(1, s // 4)


def _strided(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(n / s) for n, s in zip(shape, stride))


@dataclass(frozen=True)
class RecordPlan:
    """What a recording keeps, on which grids, and how much memory it takes.

    All shapes and regions are in the network's spatial axis order (``config.axes``) at the
    finest level; ``order`` permutes them back to the input's spatial order.
    """

    config: ModelConfig
    spatial_shape: tuple[int, ...]
    steps: tuple[int, ...]
    order: tuple[int, ...]
    hidden_strides: tuple[int, ...]  # per level, on that level's own grid
    region: tuple[tuple[int, int], ...]  # evolution window (start, stop) per axis, finest level
    evolution_stride: int  # on the finest grid
    convergence_strides: tuple[int, ...]
    record_hidden: bool = True
    record_evolution: bool = True

    @property
    def level_shapes(self) -> list[tuple[int, ...]]:
        return self.config.level_shapes(self.spatial_shape)

    @property
    def cumulative_factors(self) -> list[tuple[int, ...]]:
        """Finest cells per level cell, per axis (level 0: all ones)."""
        out = [(1,) * self.config.spatial_dims]
        for f in self.config.factors:
            out.append(tuple(a * b for a, b in zip(out[-1], f)))
        return out

    @property
    def total_steps(self) -> int:
        return int(sum(self.steps))

    @property
    def evolution_shape(self) -> tuple[int, ...]:
        return tuple(math.ceil((b - a) / self.evolution_stride) for a, b in self.region)

    def hidden_shape(self, level: int) -> tuple[int, ...]:
        s = self.hidden_strides[level]
        return _strided(self.level_shapes[level], (s,) * len(self.spatial_shape))

    def memory(self) -> dict[str, int]:
        """Bytes each part of the recording will hold (the numbers a user sees before the run)."""
        cfg = self.config
        hidden = 0
        if self.record_hidden:
            hidden = sum(cfg.hidden_channels * math.prod(self.hidden_shape(lv)) * 4 for lv in range(cfg.levels))
        evo = 0
        if self.record_evolution:
            evo = self.total_steps * math.prod(self.evolution_shape) * (cfg.output_channels * 4 + 3)
        conv = (
            max(
                cfg.update_channels * 4 * math.prod(_strided(shp, (s,) * len(shp)))
                for shp, s in zip(self.level_shapes, self.convergence_strides)
            )
            * 2
        )
        return {"hidden": hidden, "evolution": evo, "convergence": conv, "total": hidden + evo + conv}

    def describe(self) -> str:
        """One line for the GUI: what is recorded at which resolution and how much memory it takes."""
        m = self.memory()
        parts = [f"recording {_fmt_bytes(m['total'])}"]
        if self.record_evolution:
            res = "full resolution" if self.evolution_stride == 1 else f"1/{self.evolution_stride} resolution"
            parts.append(f"evolution {self.total_steps} steps x {'x'.join(map(str, self.evolution_shape))} ({res})")
        if self.record_hidden:
            coarse = [s for s in self.hidden_strides if s > 1]
            parts.append(
                "hidden channels at full level resolution"
                if not coarse
                else f"hidden channels strided up to 1/{max(coarse)}"
            )
        return "; ".join(parts)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def plan_recording(
    config: ModelConfig,
    spatial_shape: Sequence[int],
    *,
    steps: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
    budget: int = DEFAULT_BUDGET,
    region: Sequence[tuple[int, int]] | None = None,
    record_hidden: bool = True,
    record_evolution: bool = True,
) -> RecordPlan:
    """Plan a recording of a run on an input of ``spatial_shape`` (network axis order).

    ``region`` restricts the evolution to a window of the finest level (e.g. the visible part
    of a slide). Half the budget goes to the per-level hidden channels, half to the evolution;
    each is strided as much as needed to fit.
    """
    shape = tuple(int(n) for n in spatial_shape)
    nd = len(shape)
    steps_t = tuple(int(s) for s in (steps if steps is not None else config.steps_for(shape)))
    shapes = config.level_shapes(shape)
    if region is None:
        reg = tuple((0, n) for n in shape)
    else:
        if len(region) != nd:
            raise ValueError(f"region {region} must have one (start, stop) per spatial axis ({nd})")
        reg = tuple((max(0, int(a)), min(n, int(b))) for (a, b), n in zip(region, shape))
        if any(b <= a for a, b in reg):
            raise ValueError(f"region {region} is empty inside the input of shape {shape}")
    conv_strides = tuple(_stride_for(s, 1, CONVERGENCE_CELLS) for s in shapes)
    conv_bytes = (
        2 * config.update_channels * 4 * max(math.prod(_strided(s, (c,) * nd)) for s, c in zip(shapes, conv_strides))
    )
    budget = max(budget - conv_bytes, budget // 4)  # what is left for hidden channels and evolution
    halves = (record_hidden and record_evolution) + 1
    hidden_budget = budget / halves / max(1, config.levels)
    hidden_strides = tuple(_stride_for(s, max(1, config.hidden_channels) * 4, hidden_budget) for s in shapes)
    total = max(1, sum(steps_t))
    evo_stride = _stride_for([b - a for a, b in reg], total * (config.output_channels * 4 + 3), budget / halves)
    return RecordPlan(
        config=config,
        spatial_shape=shape,
        steps=steps_t,
        order=tuple(order) if order is not None else tuple(range(nd)),
        hidden_strides=hidden_strides,
        region=reg,
        evolution_stride=evo_stride,
        convergence_strides=conv_strides,
        record_hidden=record_hidden,
        record_evolution=record_evolution,
    )


@dataclass
class Frame:
    """One recorded step, handed to a live-view callback (arrays in network axis order)."""

    level: int
    step: int
    done: int
    total: int
    logits: np.ndarray  # (classes, *evolution_shape) float32
    rgb: np.ndarray  # (*evolution_shape, 3) uint8
    convergence: dict[int, list[float]]  # the newest values only since the previous frame
    label_changes: dict[int, list[float]] = field(default_factory=dict)  # likewise


@dataclass
class Recording:
    """The finished recording, arrays in the network's axis order (see :meth:`in_input_order`)."""

    plan: RecordPlan
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # level -> (hidden, *shape)
    logits: np.ndarray | None = None  # (total_steps, classes, *evolution_shape)
    rgb: np.ndarray | None = None  # (total_steps, *evolution_shape, 3) uint8
    convergence: dict[int, list[float]] = field(default_factory=dict)  # level -> per step
    step_levels: list[int] = field(default_factory=list)  # level of every recorded step
    steps_recorded: int = 0
    #: level -> per step: share of the sampled cells whose label changed in that step.
    label_changes: dict[int, list[float]] = field(default_factory=dict)

    def level_step_index(self) -> np.ndarray:
        """(levels, most steps of a level) -> index of the recorded frame; a level's last frame
        repeats past its own steps, and a level without steps shows the level before it."""
        levels = self.plan.config.levels
        steps = [[t for t, lv in enumerate(self.step_levels) if lv == level] for level in range(levels)]
        width = max(1, max(len(s) for s in steps))
        out = np.zeros((levels, width), np.int64)
        prev = 0
        for level in range(levels - 1, -1, -1):  # the order the NCA runs them: coarsest first
            own = steps[level] or [prev]
            out[level] = own + [own[-1]] * (width - len(own))
            prev = own[-1]
        return out

    def in_input_order(self) -> Recording:
        """A copy with every spatial axis in the input's order."""
        o = self.plan.order
        if o == tuple(range(len(o))):
            return self
        k = len(o)
        hidden = {lv: h.transpose(0, *(1 + i for i in o)) for lv, h in self.hidden.items()}
        logits = None if self.logits is None else self.logits.transpose(0, 1, *(2 + i for i in o))
        rgb = None if self.rgb is None else self.rgb.transpose(0, *(1 + i for i in o), k + 1)
        return Recording(
            self.plan, hidden, logits, rgb, self.convergence, self.step_levels, self.steps_recorded, self.label_changes
        )


class _PCAColour:
    """RGB of the first three principal components of the hidden channels, with stable signs."""

    def __init__(self) -> None:
        self.basis: torch.Tensor | None = None

    def __call__(self, hidden: torch.Tensor) -> np.ndarray:
        k = hidden.shape[0]
        shape = tuple(hidden.shape[1:])
        if k == 0:
            return np.zeros(shape + (3,), np.uint8)
        h = hidden.reshape(k, -1).float()
        h = h - h.mean(dim=1, keepdim=True)
        cov = h @ h.T / max(1, h.shape[1] - 1)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        basis = vecs[:, -3:].flip(1)  # (k, <=3) strongest first
        if self.basis is not None and self.basis.shape == basis.shape:
            # Eigenvectors have arbitrary signs: keep the previous step's orientation.
            signs = torch.sign((basis * self.basis).sum(0))
            basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
        self.basis = basis
        proj = basis.T @ h  # (<=3, N)
        lo = (
            torch.quantile(proj, 0.01, dim=1, keepdim=True)
            if proj.shape[1] < (1 << 24)
            else proj.min(1, keepdim=True).values
        )
        hi = (
            torch.quantile(proj, 0.99, dim=1, keepdim=True)
            if proj.shape[1] < (1 << 24)
            else proj.max(1, keepdim=True).values
        )
        scaled = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * 255
        rgb = torch.zeros((3, proj.shape[1]))
        rgb[: proj.shape[0]] = scaled
        return rgb.T.reshape(shape + (3,)).round().to(torch.uint8).numpy()


class NCARecorder:
    """A ``segment(callback=...)`` hook that records hidden channels, evolution and convergence.

    ``on_frame(frame)`` (optional) is called with the newest recorded step at most every
    ``throttle`` seconds, and always at a level's last step: the live view. It runs in the
    thread that runs the engine.
    """

    def __init__(
        self,
        plan: RecordPlan,
        on_frame: Callable[[Frame], Any] | None = None,
        throttle: float = 0.0,
    ) -> None:
        self.plan = plan
        self.on_frame = on_frame
        self.throttle = throttle
        self._last_emit = -math.inf
        cfg = plan.config
        self.recording = Recording(plan)
        if plan.record_evolution:
            eshape = plan.evolution_shape
            self.recording.logits = np.zeros((plan.total_steps, cfg.output_channels) + eshape, np.float32)
            self.recording.rgb = np.zeros((plan.total_steps,) + eshape + (3,), np.uint8)
        self._colour = _PCAColour()
        self._prev: torch.Tensor | None = None  # convergence sample of the previous step
        self._prev_labels: torch.Tensor | None = None  # labels of that sample
        self._sent: dict[int, int] = {}  # per level: convergence values already in a frame
        self._index_cache: dict[int, list[torch.Tensor]] = {}

    # -- sampling grids ---------------------------------------------------------------------
    def _evolution_index(self, level: int, device: torch.device) -> list[torch.Tensor]:
        """Per axis: which cell of ``level`` sits under each evolution-grid cell."""
        if level not in self._index_cache:
            p = self.plan
            f = p.cumulative_factors[level]
            shp = p.level_shapes[level]
            self._index_cache[level] = [
                (torch.arange(a, b, p.evolution_stride) // fi).clamp_max(n - 1)
                for (a, b), fi, n in zip(p.region, f, shp)
            ]
        return [i.to(device) for i in self._index_cache[level]]

    def _convergence_sample(self, state: torch.Tensor, level: int) -> torch.Tensor:
        s = self.plan.convergence_strides[level]
        idx = (slice(None),) + (slice(None, None, s),) * (state.dim() - 1)
        return state[idx].float().clone()

    def _coarse_to_next(self, state: torch.Tensor, level: int) -> torch.Tensor | None:
        """The previous level's final state seen on the next finer level's convergence grid.

        Up-sampling repeats cells, so the next level's first update is measured against this.
        """
        nxt = level - 1
        if nxt < 0:
            return None
        p = self.plan
        f = p.config.factors[nxt]
        s = p.convergence_strides[nxt]
        out = state
        for ax, (n, fi) in enumerate(zip(p.level_shapes[nxt], f)):
            idx = (torch.arange(0, n, s, device=state.device) // fi).clamp_max(state.shape[1 + ax] - 1)
            out = out.index_select(1 + ax, idx)
        return out.float().clone()

    # -- the hook ------------------------------------------------------------------------------
    def __call__(self, info: StepInfo) -> None:
        if info.run != 0:
            return
        p = self.plan
        cfg = p.config
        rec = self.recording
        state = info.state[0].detach()  # (C - in, *level shape), a live view: copy what we keep
        level, step = info.level, info.step
        if step == 0 and self._prev is None and level == cfg.levels - 1:
            self._prev = torch.zeros_like(self._convergence_sample(state, level))
            self._prev_labels = self._prev[: cfg.output_channels] > 0  # zero logits: no labels yet
        sample = self._convergence_sample(state, level)
        if self._prev is not None and self._prev.shape == sample.shape:
            delta = float((sample - self._prev).abs().mean())
        else:
            delta = float("nan")  # a level with 0 steps sat in between: no reference
        rec.convergence.setdefault(level, []).append(delta)
        labels = sample[: cfg.output_channels] > 0  # the class masks the logits give
        if self._prev_labels is not None and self._prev_labels.shape == labels.shape:
            changed = float((labels != self._prev_labels).any(dim=0).float().mean())
        else:
            changed = float("nan")  # first step of a level: no labels on its grid before
        rec.label_changes.setdefault(level, []).append(changed)
        self._prev = sample
        self._prev_labels = labels
        t = info.done - 1  # global step index within the run
        frame_needed = self.on_frame is not None
        if p.record_evolution and rec.logits is not None and rec.rgb is not None and t < p.total_steps:
            idx = self._evolution_index(level, state.device)
            sub = state
            for ax, ix in enumerate(idx):
                sub = sub.index_select(1 + ax, ix)
            rec.logits[t] = sub[: cfg.output_channels].float().cpu().numpy()
            rec.rgb[t] = self._colour(sub[cfg.output_channels :].cpu())
        rec.step_levels.append(level)
        rec.steps_recorded += 1
        last = step == info.level_steps - 1
        if last:
            if p.record_hidden:
                s = p.hidden_strides[level]
                sl = (slice(cfg.output_channels, None),) + (slice(None, None, s),) * (state.dim() - 1)
                rec.hidden[level] = state[sl].float().cpu().numpy().copy()
            self._prev = self._coarse_to_next(state, level)
            self._prev_labels = None if self._prev is None else self._prev[: cfg.output_channels] > 0
        if frame_needed and rec.logits is not None and rec.rgb is not None:
            now = time.monotonic()
            if last or now - self._last_emit >= self.throttle:
                self._last_emit = now
                assert self.on_frame is not None
                self.on_frame(
                    Frame(level, step, info.done, info.total, rec.logits[t].copy(), rec.rgb[t].copy(), *self._news())
                )

    def _news(self) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """Convergence values recorded since the previous frame (a live plot appends them)."""
        conv, changes = {}, {}
        for level, values in self.recording.convergence.items():
            k = self._sent.get(level, 0)
            if k < len(values):
                conv[level] = list(values[k:])
                changes[level] = list(self.recording.label_changes.get(level, [])[k:])
                self._sent[level] = len(values)
        return conv, changes


#: A level's labels count as settled once at most this share of cells changes per step...
SETTLED_CHANGE = 0.001
#: ...and as nearly settled (a few boundary cells flip back and forth, as random firing makes
#: them) up to this share.
NEARLY_SETTLED_CHANGE = 0.01


@dataclass(frozen=True)
class LevelReading:
    """What a level's convergence curves say, in numbers and in plain words."""

    level: int
    steps: int  # steps run
    trained_steps: int  # steps the model was trained with at this level
    update_ratio: float  # expected update over the last window / over the first window
    change_end: float  # share of cells whose label changed per step, last window
    settled_at: int | None  # first step after which labels stayed (None: never)
    verdict: str  # "settled", "nearly settled", "settling", "changing" or "no steps"

    @property
    def text(self) -> str:
        """One plain sentence, e.g. "L0: labels settled by step 6 of 20 (trained for 20); the
        state still moves (update 80% of its start)"."""
        if self.verdict == "no steps":
            return f"L{self.level}: no steps run"
        run = f"of {self.steps} (trained for {self.trained_steps})"
        if self.verdict == "settled":
            head = f"L{self.level}: labels settled by step {self.settled_at} {run}"
        elif self.verdict == "nearly settled":
            head = (
                f"L{self.level}: labels nearly settled, {self.change_end:.1%} of cells (boundary) still flip "
                f"per step {run}"
            )
        elif self.verdict == "settling":
            head = f"L{self.level}: labels settling, {self.change_end:.1%} of cells change per step at step {self.steps} {run}"
        else:
            head = f"L{self.level}: labels still changing, {self.change_end:.1%} of cells per step at step {self.steps} {run}"
        if not math.isfinite(self.update_ratio):
            return head
        moves = "the hidden state is at rest" if self.update_ratio < 0.05 else "the hidden state keeps moving"
        return f"{head}; {moves} (update {self.update_ratio:.0%} of its start)"


def expected_update(update: Sequence[float], fire_rate: float, window: int) -> np.ndarray:
    """Fire-rate adjusted update (what a cell changes when it fires: the recorded mean update
    counts the cells that did not fire as zero), averaged over a trailing ``window`` of steps."""
    u = np.asarray([v if math.isfinite(v) else np.nan for v in update], dtype=float) / max(fire_rate, 1e-6)
    out = np.full(u.shape, np.nan)
    for i in range(u.size):
        part = u[max(0, i - window + 1) : i + 1]
        if np.isfinite(part).any():
            out[i] = float(np.nanmean(part))
    return out


def reading_window(steps: int) -> int:
    """Steps averaged for a reading: a fifth of the level's steps, 1 to 5."""
    return max(1, min(5, steps // 5))


def level_reading(
    level: int, update: Sequence[float], changes: Sequence[float], trained_steps: int, fire_rate: float
) -> LevelReading:
    """Read a level's curves: did its labels stop changing, and by which step."""
    n = len(update)
    if n == 0:
        return LevelReading(level, 0, trained_steps, float("nan"), float("nan"), None, "no steps")
    w = reading_window(n)
    exp = expected_update(update, fire_rate, 1)
    first, last = exp[np.isfinite(exp)][:w], exp[np.isfinite(exp)][-w:]
    ratio = float(last.mean() / first.mean()) if first.size and first.mean() > 0 else float("nan")
    ch = np.asarray([c if math.isfinite(c) else np.nan for c in changes], dtype=float)
    finite = ch[np.isfinite(ch)]
    end = float(finite[-w:].mean()) if finite.size else 0.0
    start = float(finite[:w].mean()) if finite.size else 0.0
    settled_at = None
    above = np.nonzero(np.nan_to_num(ch, nan=0.0) > SETTLED_CHANGE)[0]
    if end <= SETTLED_CHANGE:
        settled_at = 1 if above.size == 0 else int(above[-1]) + 2  # the step after the last change
        settled_at = min(settled_at, n)
        verdict = "settled"
    elif end <= NEARLY_SETTLED_CHANGE and end <= 1.5 * start:
        verdict = "nearly settled"
    elif end < 0.5 * start:
        verdict = "settling"
    else:
        verdict = "changing"
    return LevelReading(level, n, trained_steps, ratio, end, settled_at, verdict)


def recording_readings(recording: Recording) -> list[LevelReading]:
    """The reading of every level, in the order the NCA runs them (coarsest first)."""
    cfg = recording.plan.config
    trained = list(cfg.steps)
    return [
        level_reading(
            level,
            recording.convergence.get(level, []),
            recording.label_changes.get(level, []),
            trained[level] if level < len(trained) else 0,
            cfg.fire_rate,
        )
        for level in range(cfg.levels - 1, -1, -1)
    ]


def level_geometry(
    plan: RecordPlan, level: int, scale: Sequence[float], translate: Sequence[float], stride: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """World scale and translate (input axis order) of a level's grid sampled every ``stride`` cells.

    A level cell ``i`` covers finest pixels ``[i F, (i + 1) F)``, so its centre lies at
    ``i F + (F - 1) / 2`` in finest pixel coordinates.
    """
    f_net = plan.cumulative_factors[level]
    f_in = [f_net[i] for i in plan.order]
    sc = tuple(float(s) * fi * stride for s, fi in zip(scale, f_in))
    tr = tuple(float(t) + (fi - 1) / 2 * float(s) for t, s, fi in zip(translate, scale, f_in))
    return sc, tr


LayerData = tuple[Any, dict[str, Any], str]


def recording_layers(
    recording: Recording,
    *,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    prefix: str = "NCA",
    channel: int = 0,
) -> list[LayerData]:
    """napari layer-data tuples of a finished recording, at the input's geometry.

    - ``<prefix> L<n> hidden``, one per level (coarsest first): hidden ``channel`` of that level's
      final state, spatial axes only (napari shows it at every level/step position; the
      inspector's channel box swaps the channel: no channel slider);
    - ``<prefix> logits`` and ``<prefix> hidden RGB``: the evolution with a ``level`` axis and
      a ``step`` axis (the step within that level, so the sliders say which level a step
      belongs to); a level's last step repeats past its own steps. Several classes put a
      ``class`` axis first. Views of the recording (:class:`LevelStepFrames`): no copy.
    """
    rec = recording.in_input_order()
    plan = rec.plan
    nd = len(plan.spatial_shape)
    scale = tuple(scale) if scale is not None else (1.0,) * nd
    translate = tuple(translate) if translate is not None else (0.0,) * nd
    layers: list[LayerData] = []
    spatial = _spatial_labels(plan)
    for level in sorted(rec.hidden, reverse=True):
        h = rec.hidden[level]
        sc, tr = level_geometry(plan, level, scale, translate, plan.hidden_strides[level])
        k = min(max(0, channel), max(0, h.shape[0] - 1))
        layers.append(
            (
                h[k] if h.shape[0] else np.zeros(h.shape[1:], np.float32),
                {
                    "name": f"{prefix} L{level} hidden",
                    "scale": sc,
                    "translate": tr,
                    "axis_labels": spatial,
                    "colormap": "twilight_shifted",
                    "contrast_limits": _symmetric_limits(h),
                    "visible": False,  # one click away; shown together they would hide the image
                    "metadata": {
                        "octreenca": {
                            "kind": "hidden",
                            "level": level,
                            "channels": int(h.shape[0]),
                            "channel": k,
                            "stride": plan.hidden_strides[level],
                        }
                    },
                },
                "image",
            )
        )
    if rec.logits is not None and rec.rgb is not None:
        es = plan.evolution_stride
        start_in = [plan.region[i][0] for i in plan.order]
        sc = tuple(float(s) * es for s in scale)
        tr = tuple(float(t) + a * float(s) for t, a, s in zip(translate, start_in, scale))
        index = rec.level_step_index()
        meta = {
            "octreenca": {
                "kind": "evolution",
                "step_levels": list(rec.step_levels),
                "stride": es,
                "steps": list(plan.steps),
                "trained_steps": list(plan.config.steps),
                "convergence": {int(k): v for k, v in rec.convergence.items()},
                "label_changes": {int(k): v for k, v in rec.label_changes.items()},
            }
        }
        logits: Any = _by_level_and_step(rec.logits, index)  # (levels, steps, classes, *grid)
        lead = ("level", "step")
        if rec.logits.shape[1] == 1:
            logits = logits[:, :, 0]
            lsc, ltr, labels = (1.0, 1.0) + sc, (0.0, 0.0) + tr, lead + spatial
        else:  # the class axis first, so the RGB layer's level/step axes line up with these
            logits = np.asarray(logits).transpose(2, 0, 1, *range(3, 3 + nd))
            lsc, ltr, labels = (1.0, 1.0, 1.0) + sc, (0.0, 0.0, 0.0) + tr, ("class",) + lead + spatial
        layers.append(
            (
                logits,
                {
                    "name": f"{prefix} logits",
                    "scale": lsc,
                    "translate": ltr,
                    "axis_labels": labels,
                    "colormap": "magma",
                    "contrast_limits": _symmetric_limits(rec.logits),
                    "visible": False,
                    "metadata": meta,
                },
                "image",
            )
        )
        layers.append(
            (
                _by_level_and_step(rec.rgb, index),
                {
                    "name": f"{prefix} hidden RGB",
                    "scale": (1.0, 1.0) + sc,
                    "translate": (0.0, 0.0) + tr,
                    "axis_labels": lead + spatial,
                    "rgb": True,
                    "opacity": 0.8,
                    "contrast_limits": (0, 255),
                    "metadata": meta,
                },
                "image",
            )
        )
    return layers


class LevelStepFrames:
    """``frames[index]`` without the copy: an array-like of shape ``index.shape + frame shape``
    (level, step in level, ...) that reads recorded frames on indexing, so a level's repeated
    last frame costs nothing and a slider move reads one frame. Enough of the numpy protocol
    for napari (shape, dtype, ndim, indexing, ``__array__``)."""

    def __init__(self, frames: np.ndarray, index: np.ndarray) -> None:
        self.frames, self.index = frames, np.asarray(index, dtype=np.int64)
        self.shape = tuple(self.index.shape) + tuple(frames.shape[1:])
        self.dtype = frames.dtype
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        k = key if isinstance(key, tuple) else (key,)
        if any(x is Ellipsis or x is None for x in k) or len(k) > self.ndim:
            return np.asarray(self)[key]
        k = k + (slice(None),) * (self.ndim - len(k))
        sub = self.index[k[:2]]
        out = self.frames[sub]
        return out[(slice(None),) * np.ndim(sub) + k[2:]]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.frames[self.index]
        return out if dtype is None else out.astype(dtype)

    def transpose(self, *axes: int) -> np.ndarray:
        return np.asarray(self).transpose(*axes)


def _by_level_and_step(frames: np.ndarray, index: np.ndarray) -> LevelStepFrames:
    return LevelStepFrames(frames, index)


def _spatial_labels(plan: RecordPlan) -> tuple[str, ...]:
    net = plan.config.axes
    return tuple(net[i].lower() for i in plan.order)


def _symmetric_limits(a: np.ndarray) -> tuple[float, float]:
    m = float(np.nanmax(np.abs(a))) if a.size else 0.0
    m = m if math.isfinite(m) and m > 0 else 1.0
    return (-m, m)


__all__ = [
    "DEFAULT_BUDGET",
    "RecordPlan",
    "plan_recording",
    "NCARecorder",
    "Recording",
    "Frame",
    "recording_layers",
    "level_geometry",
    "LevelStepFrames",
    "LevelReading",
    "level_reading",
    "recording_readings",
    "expected_update",
    "reading_window",
    "SETTLED_CHANGE",
    "NEARLY_SETTLED_CHANGE",
]
