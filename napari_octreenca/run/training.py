"""Training: BCE + Dice, Adam with exponential decay, EMA weights, patches, checkpoints, resume.

Follows the published OctreeNCA recipe: Adam (lr 1.6e-3, betas 0.9/0.99), learning rate decayed
exponentially per epoch, an exponential moving average of the weights (0.99) used for evaluation
and saving, and for 3D random patches on the two finest levels (``level_patch``).
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..fileutil import atomic_write
from ..nca.config import ModelConfig
from ..nca.device import check_device
from ..nca.errors import Cancelled, ConfigError, InputError, ModelFileError, OctreeNCAError
from ..nca.octree import LevelSteps, OctreeNCA
from .inference import is_cancelled
from .inputs import prepare


class TrainingError(OctreeNCAError, RuntimeError):
    """Training cannot go on (diverged, or bad data)."""


@dataclass
class TrainPair:
    """One training example: an image and its labels (0 = background, k = class k)."""

    image: Any
    labels: Any
    axes: str | None = None  # axes of ``image``; ``labels`` has the same axes without C


@dataclass
class TrainConfig:
    """Training settings (defaults follow the published recipe)."""

    iterations: int = 2000
    batch_size: int = 4
    crop: tuple[int, ...] | None = None  # random crop of each sample at the finest level
    level_patch: tuple[int, ...] | None = None  # patch for the two finest levels (3D recipe)
    lr: float = 1.6e-3
    betas: tuple[float, float] = (0.9, 0.99)
    lr_gamma: float = 0.9999  # decay per epoch
    iterations_per_epoch: int = 1
    ema_decay: float = 0.99
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    class_weights: tuple[float, ...] | None = None
    augment: bool = True
    flips: bool = True
    foreground_fraction: float = 0.5  # share of crops centred on a labelled voxel
    seed: int = 0
    checkpoint_every: int = 0  # iterations; 0 = only at the end when a path is given
    grad_clip: float = 1.0
    fused_cpu: bool = True  # on the CPU, the fused numba training step; False = autograd (reference)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        for k in ("crop", "level_patch", "betas", "class_weights"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return TrainConfig(**d)


@dataclass
class TrainProgress:
    """What the progress callback receives after every iteration."""

    iteration: int
    iterations: int
    loss: float
    dice: float  # hard Dice of the batch (mean over classes)
    lr: float
    seconds: float
    model: OctreeNCA | None = None  # the EMA model (for previews); do not modify


@dataclass
class TrainResult:
    model: OctreeNCA  # EMA weights
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    iterations: int = 0


# --------------------------------------------------------------------------------------------
# data


@dataclass
class _Sample:
    image: torch.Tensor  # (in, *spatial) normalised, network axis order
    target: torch.Tensor  # (classes, *spatial) float one-hot
    fg: torch.Tensor  # (n, dims) coordinates of foreground voxels (for sampling)


def _prepare_pair(pair: TrainPair, config: ModelConfig) -> _Sample:
    image, plan = prepare(pair.image, config, pair.axes)
    labels = np.asarray(pair.labels)
    spatial_in = plan.spatial_input_axes
    if labels.ndim != len(spatial_in):
        raise InputError(f"labels of shape {labels.shape} do not match the image's spatial axes {spatial_in!r}")
    # Labels follow the image's spatial axes: put them in the network order too.
    perm = [
        spatial_in.index(a) if a in spatial_in else spatial_in.index({"T": "Z", "Z": "T"}[a]) for a in plan.model_axes
    ]
    lab = torch.from_numpy(np.ascontiguousarray(labels.astype(np.int64))).permute(perm)
    if tuple(lab.shape) != tuple(image.shape[2:]):
        raise InputError(f"labels shape {tuple(labels.shape)} does not match the image's spatial shape")
    n = config.output_channels
    if int(lab.max()) > n or int(lab.min()) < 0:
        raise InputError(f"labels must be in 0..{n} for a {n}-class model, got {int(lab.min())}..{int(lab.max())}")
    target = torch.stack([(lab == k + 1) for k in range(n)]).float()
    fg = torch.nonzero(lab > 0)
    if fg.shape[0] > 200_000:
        fg = fg[torch.randperm(fg.shape[0], generator=torch.Generator().manual_seed(0))[:200_000]]
    return _Sample(image[0], target, fg)


def _crop_box(
    shape: Sequence[int], crop: Sequence[int], sample: _Sample, rng: np.random.Generator, fg_frac: float
) -> tuple[slice, ...]:
    size = [min(c, s) for c, s in zip(crop, shape)]
    if sample.fg.shape[0] and rng.random() < fg_frac:
        centre = sample.fg[int(rng.integers(sample.fg.shape[0]))].tolist()
        start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(centre, size, shape)]
    else:
        start = [int(rng.integers(0, s - n + 1)) for s, n in zip(shape, size)]
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def _augment(
    img: torch.Tensor, tgt: torch.Tensor, rng: np.random.Generator, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.augment:
        # Intensity: contrast, brightness and a little noise, per sample (normalised units).
        a = float(rng.uniform(0.85, 1.15))
        b = float(rng.uniform(-0.15, 0.15))
        img = img * a + b
        if rng.random() < 0.3:
            img = img + torch.randn(img.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * 0.03
    if cfg.flips:
        for ax in range(1, img.dim()):
            if rng.random() < 0.5:
                img, tgt = img.flip(ax), tgt.flip(ax)
    return img, tgt


def _batch(
    samples: list[_Sample], cfg: TrainConfig, mcfg: ModelConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = [tuple(s.image.shape[1:]) for s in samples]
    crop = cfg.crop or tuple(min(s[i] for s in shapes) for i in range(mcfg.spatial_dims))
    crop = tuple(min(c, min(s[i] for s in shapes)) for i, c in enumerate(crop))
    imgs, tgts = [], []
    for _ in range(cfg.batch_size):
        s = samples[int(rng.integers(len(samples)))]
        box = _crop_box(s.image.shape[1:], crop, s, rng, cfg.foreground_fraction)
        img, tgt = s.image[(slice(None),) + box], s.target[(slice(None),) + box]
        img, tgt = _augment(img, tgt, rng, cfg)
        imgs.append(img)
        tgts.append(tgt)
    return torch.stack(imgs), torch.stack(tgts)


# --------------------------------------------------------------------------------------------
# loss and metrics


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """BCE-with-logits plus soft Dice loss per class, weighted per class."""
    dims = tuple(range(2, logits.dim()))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(0,) + dims)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(0,) + dims)
    denom = p.sum(dim=(0,) + dims) + target.sum(dim=(0,) + dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    per_class = bce_weight * bce + dice_weight * (1 - dice)
    w = torch.tensor(class_weights if class_weights else [1.0] * per_class.numel(), dtype=per_class.dtype)
    return (per_class * w).sum() / w.sum()


def hard_dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a = torch.as_tensor(np.asarray(pred) > 0) if not isinstance(pred, torch.Tensor) else pred > 0
    b = torch.as_tensor(np.asarray(truth) > 0) if not isinstance(truth, torch.Tensor) else truth > 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


# --------------------------------------------------------------------------------------------
# EMA and checkpoints


@torch.no_grad()
def _ema_update(ema: OctreeNCA, model: OctreeNCA, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a training checkpoint (safetensors: weights, EMA, optimizer moments; JSON metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    model: OctreeNCA = state["model"]
    ema: OctreeNCA = state["ema"]
    opt: torch.optim.Adam = state["optimizer"]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    steps = {}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            steps[str(i)] = float(st["step"])
    meta = {
        "format": "octreenca-checkpoint",
        "format_version": "1",
        "config": json.dumps(model.config.to_dict()),
        "train_config": json.dumps(state["train_config"].to_dict()),
        "iteration": str(state["iteration"]),
        "lr": repr(opt.param_groups[0]["lr"]),
        "adam_steps": json.dumps(steps),
        "rng": json.dumps(state["rng"].bit_generator.state),
        "history": json.dumps(state["history"]),
        "seconds": repr(state["seconds"]),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable checkpoint (corrupt or truncated?): {exc}") from None
    if meta.get("format") != "octreenca-checkpoint":
        raise ModelFileError(f"{path} is not an OctreeNCA training checkpoint")
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    model, ema = OctreeNCA(config), OctreeNCA(config)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return {
        "model": model,
        "ema": ema,
        "tensors": tensors,
        "meta": meta,
        "train_config": TrainConfig.from_dict(json.loads(meta["train_config"])),
        "iteration": int(meta["iteration"]),
    }


# --------------------------------------------------------------------------------------------
# the loop


def level_steps_for(model: OctreeNCA, cfg: TrainConfig, device: torch.device) -> tuple[LevelSteps | None, str]:
    """How training runs each level's steps: (runner, name); runner None = autograd (reference).

    The fused CPU step (``backends/cpu_train.py``) is used on the CPU unless ``cfg.fused_cpu`` is
    off, numba is missing or a level does not fit the fused kernels.
    """
    if not cfg.fused_cpu or device.type != "cpu":
        return None, "autograd"
    from ..backends import cpu_train
    from ..nca.packing import check_fusable
    from ..nca.weights import BackboneNCA

    levels = cast(list[BackboneNCA], list(model.levels))
    if not cpu_train.available() or not all(check_fusable(nca)[0] for nca in levels):
        return None, "autograd"
    return cpu_train.FusedLevelRunner(), "cpu-fused"


def train(
    model: OctreeNCA | ModelConfig,
    pairs: Sequence[TrainPair],
    cfg: TrainConfig | None = None,
    *,
    callback: Callable[[TrainProgress], Any] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    pause: threading.Event | None = None,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train an OctreeNCA on ``pairs``; returns the EMA model and the loss history.

    ``model`` is a model (fine-tuning) or a config (fresh weights from ``cfg.seed``). ``callback``
    gets a :class:`TrainProgress` every iteration. Setting ``cancel`` stops after the current
    iteration (raising ``Cancelled``; the last checkpoint stays valid). While ``pause`` is set the
    loop waits. ``checkpoint`` is written every ``cfg.checkpoint_every`` iterations and at the end;
    ``resume`` continues from such a file (same data and settings give the same result).
    """
    device = check_device(device)  # one line, not torch's AssertionError, when the GPU is missing
    state_from: dict[str, Any] | None = load_checkpoint(resume) if resume else None
    if state_from is not None:
        cfg = state_from["train_config"] if cfg is None else cfg
        model = state_from["model"]
    cfg = cfg or TrainConfig()
    if cfg.iterations < 1 or cfg.batch_size < 1:
        raise ConfigError("iterations and batch_size must be >= 1")
    if not pairs:
        raise InputError("no training pairs given")
    torch.manual_seed(cfg.seed)
    if isinstance(model, ModelConfig):
        model = OctreeNCA(model)
    model = model.to(device).train()
    mcfg = model.config
    samples = [_prepare_pair(p, mcfg) for p in pairs]
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    rng = np.random.default_rng(cfg.seed)
    start, history, seconds0 = 0, [], 0.0
    if state_from is not None:
        ema = state_from["ema"].to(device).eval()
        meta, tensors = state_from["meta"], state_from["tensors"]
        steps = json.loads(meta["adam_steps"])
        for i, p in enumerate(model.parameters()):
            if str(i) in steps:
                opt.state[p] = {
                    "step": torch.tensor(steps[str(i)]),
                    "exp_avg": tensors[f"opt.{i}.exp_avg"].to(device),
                    "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(device),
                }
        for g in opt.param_groups:
            g["lr"] = float(meta["lr"])
        rng.bit_generator.state = json.loads(meta["rng"])
        start = state_from["iteration"]
        history = json.loads(meta["history"])
        seconds0 = float(meta["seconds"])

    level_steps, step_name = level_steps_for(model, cfg, device)
    t0 = time.perf_counter()

    def _state(it: int) -> dict[str, Any]:
        return {
            "model": model,
            "ema": ema,
            "optimizer": opt,
            "train_config": cfg,
            "iteration": it,
            "rng": rng,
            "history": history,
            "seconds": seconds0 + time.perf_counter() - t0,
        }

    for it in range(start, cfg.iterations):
        while pause is not None and pause.is_set():
            if is_cancelled(cancel):
                break
            time.sleep(0.05)
        if is_cancelled(cancel):
            if checkpoint:
                save_checkpoint(checkpoint, _state(it))
            raise Cancelled(f"training cancelled at iteration {it}")
        img, tgt = _batch(samples, cfg, mcfg, rng)
        img, tgt = img.to(device), tgt.to(device)
        seeds = [int(s) for s in rng.integers(0, 2**62, size=img.shape[0])]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        logits, patch = model.forward_train(
            img, seeds, patch_size=cfg.level_patch, generator=gen, level_steps=level_steps
        )
        tgt = tgt[(slice(None), slice(None)) + patch.slices()]
        loss = dice_bce_loss(logits, tgt, cfg.bce_weight, cfg.dice_weight, cfg.class_weights)
        if not math.isfinite(float(loss.detach())):
            raise TrainingError(
                f"the loss became {float(loss.detach())} at iteration {it}: training diverged; "
                "lower the learning rate or check the inputs for extreme values"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, cfg.ema_decay)
        if (it + 1) % cfg.iterations_per_epoch == 0:
            for g in opt.param_groups:
                g["lr"] *= cfg.lr_gamma
        with torch.no_grad():
            dice = float(np.mean([hard_dice(logits[:, k] > 0, tgt[:, k] > 0) for k in range(tgt.shape[1])]))
        lr = opt.param_groups[0]["lr"]
        history.append({"iteration": it + 1, "loss": float(loss.detach()), "dice": dice, "lr": lr})
        if callback is not None:
            callback(
                TrainProgress(
                    it + 1, cfg.iterations, float(loss.detach()), dice, lr, seconds0 + time.perf_counter() - t0, ema
                )
            )
        if checkpoint and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(checkpoint, _state(it + 1))
    if checkpoint:
        save_checkpoint(checkpoint, _state(cfg.iterations))
    total = seconds0 + time.perf_counter() - t0
    ema = ema.cpu().eval()
    prov = dict(mcfg.provenance)
    prov.update(
        {
            "train": cfg.to_dict(),
            "iterations": cfg.iterations,
            "train_seconds": round(total, 1),
            "train_step": step_name,
        }
    )
    final = OctreeNCA(mcfg.replace(provenance=prov))
    final.load_state_dict(ema.state_dict())
    return TrainResult(final.eval(), history, total, cfg.iterations)


def evaluate(model: OctreeNCA, pairs: Sequence[TrainPair], **segment_kwargs: Any) -> dict[str, float]:
    """Hard Dice per class (and mean) of ``model`` on ``pairs``, via :func:`segment`."""
    from .inference import segment

    scores: dict[str, list[float]] = {n: [] for n in model.config.class_names}
    for p in pairs:
        res = segment(model, p.image, axes=p.axes, **segment_kwargs)
        truth = np.asarray(p.labels)
        for k, name in enumerate(model.config.class_names):
            scores[name].append(hard_dice(res.labels == k + 1, truth == k + 1))
    out = {n: float(np.mean(v)) for n, v in scores.items()}
    out["mean"] = float(np.mean(list(out.values())))
    return out
