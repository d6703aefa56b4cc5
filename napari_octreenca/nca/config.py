"""Model configuration: architecture, octree geometry, steps, normalisation and presets.

The configuration is plain data (JSON-serialisable) so that it can live inside a model file
next to the weights. Level 0 is always the finest level (the input resolution).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConfigError

FORMAT_VERSION = 1
RESIZE_MODES = ("nearest", "average")
NORM_MODES = ("fixed", "zscore", "percentile", "none")
#: Channels the run layer derives from the image and appends after its own channels
#: (``run.features``): ``motion`` = camera-compensated optical-flow magnitude per frame (videos).
INPUT_FEATURES = ("motion",)

# Bounds a model header must respect, checked before anything is allocated: a hostile or broken
# file must fail here, not by running for days or asking for gigabytes. They are far above any
# real OctreeNCA (16 channels, hidden 64, 5 levels, 10-20 steps, factor 2).
MAX_LEVELS = 16
MAX_CHANNELS = 1024
MAX_HIDDEN = 4096
MAX_STEPS = 10_000
MAX_FACTOR = 64
MAX_TRAIN_SIZE = 1 << 20
#: The fire mask hashes the seed as a 64-bit integer (``firemask.base_key``).
SEED_LIMIT = 1 << 64


def check_fire_rate(fire_rate: float) -> float:
    """``fire_rate`` as a float in (0, 1], or a ConfigError."""
    try:
        value = float(fire_rate)
    except (TypeError, ValueError):
        raise ConfigError(f"fire_rate must be a number in (0, 1], got {fire_rate!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"fire_rate must be in (0, 1], got {fire_rate}")
    return value


def check_steps(steps: Any, levels: int | None = None) -> tuple[int, ...]:
    """Steps per level as integers in 0..MAX_STEPS (one per level when ``levels`` is given)."""
    try:
        values = tuple(steps)
    except TypeError:
        raise ConfigError(f"steps must be a list of integers, got {steps!r}") from None
    for s in values:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise ConfigError(f"steps must be integers, got {s!r}")
        if not 0 <= int(s) <= MAX_STEPS:
            raise ConfigError(f"steps must be in 0..{MAX_STEPS} per level, got {s}")
    if levels is not None and len(values) != levels:
        raise ConfigError(f"steps lists {len(values)} levels but the model has {levels}")
    return tuple(int(s) for s in values)


def check_seed(seed: int, runs: int = 1) -> int:
    """A seed (and the ``runs - 1`` seeds after it) inside the fire-mask hash's range 0..2**64-1."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if seed < 0 or seed + max(1, int(runs)) - 1 >= SEED_LIMIT:
        raise ConfigError(f"seed must be in 0..2**64-{max(1, int(runs))} (with {runs} run(s)), got {seed}")
    return seed


@dataclass(frozen=True)
class Normalization:
    """How raw input intensities become network inputs.

    - ``fixed``: ``(x * scale - mean[c]) / std[c]`` (e.g. uint8 RGB with ``scale=1/255``).
    - ``zscore``: per image and channel, ``(x - mean) / std`` over voxels above ``threshold``
      (MRI: excludes the air background from the statistics).
    - ``percentile``: per image and channel, map the ``low``/``high`` percentiles to 0/1.
    - ``none``: the input is used as it is.
    """

    mode: str = "fixed"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    low: float = 0.5
    high: float = 99.5
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in NORM_MODES:
            raise ConfigError(f"normalization mode {self.mode!r} is not one of {NORM_MODES}")
        if any(s == 0 for s in self.std):
            raise ConfigError("normalization std must not contain zeros")
        values = (self.scale, self.low, self.high, *self.mean, *self.std)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ConfigError("normalization scale, mean, std, low and high must be finite numbers")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Normalization:
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        try:
            return Normalization(**d)
        except TypeError as exc:
            raise ConfigError(f"bad normalization entry: {exc}") from None


#: The input normalisations of the published OctreeNCA code, by name (``octreenca import
#: --normalization``). ``imagenet``: its 2D RGB datasets (e.g. PESO) divide by 255 and standardise
#: with the ImageNet channel statistics. ``percentile``: its 3D NIfTI datasets map the 0.5/99.5
#: percentiles to 0/1 and clip (its z-score step in between is affine, so it cancels out).
#: ``unit``: divide by 255 only. ``none``: the values as they are.
ORIGINAL_NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization(mode="fixed", scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "percentile": Normalization(mode="percentile", low=0.5, high=99.5),
    "unit": Normalization(mode="fixed", scale=1 / 255, mean=(0.0,), std=(1.0,)),
    "none": Normalization(mode="none"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and inference settings of an OctreeNCA model.

    ``factors[i]`` is the per-axis down-sampling factor from level ``i`` to level ``i + 1``;
    ``steps[i]`` the number of NCA steps at level ``i`` (level 0 = finest).
    ``axes`` names the spatial axes in the order the network sees them ("YX", "ZYX", "YXT").
    """

    spatial_dims: int
    input_channels: int
    output_channels: int
    channels: int = 16
    hidden: int = 64
    kernel_size: int = 3
    fire_rate: float = 0.5
    factors: tuple[tuple[int, ...], ...] = ((2, 2),) * 4
    steps: tuple[int, ...] = (10, 10, 10, 10, 20)
    resize: str = "average"
    train_size: tuple[int, ...] | None = None
    scale_coarsest_steps: bool = True
    normalization: Normalization = field(default_factory=Normalization)
    class_names: tuple[str, ...] = ("foreground",)
    axes: str = "YX"
    spacing: tuple[float, ...] | None = None
    name: str = "octreenca"
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Raw value range ``(low, high)`` and dtype of the training images (None in older model files):
    #: inputs far outside it get a warning (``run.inputs.check_range``).
    input_range: tuple[float, float] | None = None
    input_dtype: str | None = None
    #: Derived input channels (names from ``INPUT_FEATURES``), appended after the image's own
    #: channels: ``input_channels`` counts both, the user supplies ``image_channels``.
    input_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.steps)

    @property
    def image_channels(self) -> int:
        """Channels the user's image must have (the input channels less the derived features)."""
        return self.input_channels - len(self.input_features)

    @property
    def hidden_channels(self) -> int:
        """Channels after image and logits."""
        return self.channels - self.input_channels - self.output_channels

    @property
    def update_channels(self) -> int:
        """Channels the NCA may change (logits + hidden)."""
        return self.channels - self.input_channels

    def parameter_count(self) -> int:
        """Number of trainable parameters over all levels."""
        k = self.kernel_size**self.spatial_dims
        c = self.channels
        per_level = c * k + c + 2 * c * self.hidden + self.hidden + self.hidden * self.update_channels
        return per_level * self.levels

    def level_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Spatial shape of every level for an input of spatial ``shape`` (finest first)."""
        if len(shape) != self.spatial_dims:
            raise ConfigError(f"expected {self.spatial_dims} spatial axes, got shape {tuple(shape)}")
        shapes = [tuple(int(s) for s in shape)]
        for f in self.factors:
            shapes.append(tuple(math.ceil(s / fi) for s, fi in zip(shapes[-1], f)))
        return shapes

    def steps_for(self, shape: tuple[int, ...]) -> list[int]:
        """Steps per level for an input of spatial ``shape``.

        Information crosses about one cell per step, so for inputs larger than the training size
        the coarsest level's steps grow with its size (the finer levels only refine locally).
        """
        steps = list(self.steps)
        if self.scale_coarsest_steps and self.train_size is not None:
            coarse = self.level_shapes(shape)[-1]
            train_coarse = self.level_shapes(tuple(self.train_size))[-1]
            ratio = max(c / t for c, t in zip(coarse, train_coarse))
            if ratio > 1:
                steps[-1] = int(math.ceil(steps[-1] * ratio))
        return steps

    # -- validation and (de)serialisation --------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        need(self.input_channels >= 1, "input_channels must be >= 1")
        for feat in self.input_features:
            need(feat in INPUT_FEATURES, f"input_features entries must be in {INPUT_FEATURES}, got {feat!r}")
        need(len(set(self.input_features)) == len(self.input_features), "input_features must not repeat")
        need(self.image_channels >= 1, "input_channels must exceed the number of input_features")
        if "motion" in self.input_features:
            need("T" in self.axes, f"the motion feature needs a time axis; the model's axes are {self.axes!r}")
        need(self.output_channels >= 1, f"output_channels (classes) must be >= 1, got {self.output_channels}")
        need(self.channels <= MAX_CHANNELS, f"channels must be <= {MAX_CHANNELS}, got {self.channels}")
        need(self.hidden <= MAX_HIDDEN, f"hidden must be <= {MAX_HIDDEN}, got {self.hidden}")
        need(
            1 <= len(self.steps) <= MAX_LEVELS,
            f"levels (entries of steps) must be in 1..{MAX_LEVELS}, got {len(self.steps)}",
        )
        check_steps(self.steps)
        need(
            self.channels >= self.input_channels + self.output_channels,
            f"channels ({self.channels}) must be >= input + output channels "
            f"({self.input_channels + self.output_channels})",
        )
        need(self.hidden >= 1, "hidden must be >= 1")
        need(self.kernel_size in (3,), "kernel_size must be 3 (the fused kernels assume it)")
        check_fire_rate(self.fire_rate)
        need(len(self.steps) >= 1, "steps must list at least one level")
        need(all(int(s) >= 0 for s in self.steps), "steps must be >= 0")
        need(
            len(self.factors) == len(self.steps) - 1,
            f"factors must have one entry per level transition ({len(self.steps) - 1}), got {len(self.factors)}",
        )
        for f in self.factors:
            need(len(f) == self.spatial_dims, f"factor {f} must have {self.spatial_dims} entries")
            need(all(1 <= int(x) <= MAX_FACTOR for x in f), f"factor {f} must be in 1..{MAX_FACTOR}")
        need(self.resize in RESIZE_MODES, f"resize must be one of {RESIZE_MODES}")
        need(len(self.axes) == self.spatial_dims, f"axes {self.axes!r} must name {self.spatial_dims} axes")
        need(
            len(self.class_names) == self.output_channels,
            f"class_names has {len(self.class_names)} names for {self.output_channels} classes",
        )
        norm = self.normalization
        if norm.mode == "fixed":
            for key in ("mean", "std"):
                n = len(getattr(norm, key))
                need(n in (1, self.image_channels), f"normalization {key} needs 1 or {self.image_channels} values")
        if self.train_size is not None:
            need(len(self.train_size) == self.spatial_dims, "train_size must have one entry per spatial axis")
            need(
                all(0 < int(s) <= MAX_TRAIN_SIZE for s in self.train_size),
                f"train_size entries must be in 1..{MAX_TRAIN_SIZE}, got {list(self.train_size)}",
            )
        if self.spacing is not None:
            need(len(self.spacing) == self.spatial_dims, "spacing must have one entry per spatial axis")
            need(
                all(math.isfinite(s) and s > 0 for s in self.spacing), f"spacing must be > 0, got {list(self.spacing)}"
            )
        if self.input_range is not None:
            lo_hi = self.input_range
            need(
                len(lo_hi) == 2 and all(math.isfinite(v) for v in lo_hi) and lo_hi[0] <= lo_hi[1],
                f"input_range must be [low, high] with low <= high, got {list(lo_hi)}",
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["normalization"] = self.normalization.to_dict()
        d["factors"] = [list(f) for f in self.factors]
        d["steps"] = list(self.steps)
        d["class_names"] = list(self.class_names)
        d["train_size"] = list(self.train_size) if self.train_size is not None else None
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        d["parameters"] = self.parameter_count()
        # Written only when known, so files without them stay byte-identical to older versions.
        for key in ("input_range", "input_dtype"):
            if d[key] is None:
                del d[key]
        if self.input_features:
            d["input_features"] = list(self.input_features)
        else:
            del d["input_features"]
        if self.input_range is not None:
            d["input_range"] = list(self.input_range)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("model config must be a JSON object")
        d = dict(d)
        d.pop("parameters", None)
        known = set(ModelConfig.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        try:
            if "factors" in d:
                d["factors"] = tuple(tuple(int(x) for x in f) for f in d["factors"])
            if "steps" in d:
                d["steps"] = tuple(int(s) for s in d["steps"])
            if "class_names" in d:
                d["class_names"] = tuple(str(c) for c in d["class_names"])
            for key in ("train_size",):
                if d.get(key) is not None:
                    d[key] = tuple(int(s) for s in d[key])
            if d.get("spacing") is not None:
                d["spacing"] = tuple(float(s) for s in d["spacing"])
            if d.get("input_range") is not None:
                d["input_range"] = tuple(float(s) for s in d["input_range"])
            if "input_features" in d:
                d["input_features"] = tuple(str(f) for f in d["input_features"])
            if "normalization" in d:
                d["normalization"] = Normalization.from_dict(d["normalization"])
            return ModelConfig(**d)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad model config: {exc}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def _uniform(factor: int, dims: int, levels: int) -> tuple[tuple[int, ...], ...]:
    return tuple((factor,) * dims for _ in range(levels - 1))


PRESETS: dict[str, ModelConfig] = {
    # 2D H&E whole-slide pathology (the paper's PESO setting).
    "pathology": ModelConfig(
        spatial_dims=2,
        input_channels=3,
        output_channels=1,
        factors=_uniform(2, 2, 5),
        steps=(10, 10, 10, 10, 20),
        normalization=Normalization(mode="fixed", scale=1 / 255, mean=(0.5,), std=(0.25,)),
        axes="YX",
        name="pathology",
        description="2D H&E pathology preset (3 input channels, 1 class)",
    ),
    # 3D MRI (prostate/hippocampus setting). The network sees (Y, X, Z) like the original code's
    # (H, W, D), so the last two transitions keep the short slice axis Z.
    "radiology": ModelConfig(
        spatial_dims=3,
        input_channels=1,
        output_channels=1,
        factors=((2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1)),
        steps=(10, 10, 10, 10, 20),
        normalization=Normalization(mode="zscore", threshold=None),
        axes="YXZ",
        name="radiology",
        description="3D MRI preset (1 input channel, 1 class)",
    ),
    # Surgical video as a 3D (H, W, T) volume with 5 classes.
    "surgery": ModelConfig(
        spatial_dims=3,
        input_channels=3,
        output_channels=5,
        factors=_uniform(2, 3, 5),
        steps=(10, 10, 10, 10, 20),
        normalization=Normalization(mode="fixed", scale=1 / 255, mean=(0.5,), std=(0.25,)),
        class_names=tuple(f"class{i}" for i in range(1, 6)),
        axes="YXT",
        name="surgery",
        description="Surgical video preset, video as an (H, W, T) volume (3 input channels, 5 classes)",
    ),
}


def preset(name: str, /, **changes: Any) -> ModelConfig:
    """Return the preset ``name`` (pathology, radiology, surgery), optionally with changes."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    if "output_channels" in changes and "class_names" not in changes:
        n = changes["output_channels"]
        changes["class_names"] = ("foreground",) if n == 1 else tuple(f"class{i}" for i in range(1, n + 1))
    return replace(cfg, **changes) if changes else cfg
