"""Input channels derived from the image before the NCA sees it (``ModelConfig.input_features``).

``motion``: where things move against the camera, per frame of a video. A 16k-parameter NCA
trained on a dozen clips learns their colours, not "the moving object"; the motion of the
object relative to the background is the cue that carries over to unseen videos (classical
unsupervised video segmentation rests on it). Per frame pair: TV-L1 optical flow (scikit-image)
on the grey frames, minus the frame's median flow (the camera's pan), as a magnitude; averaged
over five frames, blurred by 2 cells and scaled by the frame's own median + standard deviation,
so that the channel is about 0.25 where a frame's motion is typical and 1 where it is four times
that. Computed on the model's grid (after resampling), the whole clip at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..nca.config import ModelConfig
from ..nca.errors import Cancelled, InputError

#: Frames averaged around each frame (the saliency of one frame pair is noisy).
MOTION_WINDOW = 2
#: Spatial blur of the saliency, in model-grid cells.
MOTION_BLUR = 2.0
#: Saliency (in units of the frame's median + std) that maps to the channel's top value 1.
MOTION_CLIP = 4.0


def _grey(frames: np.ndarray) -> np.ndarray:
    """``(T, Y, X, C)`` -> ``(T, Y, X)`` in [0, 1] (the clip's 0.5/99.5 percentiles to 0/1)."""
    f = frames.astype(np.float32)
    g = f @ np.array([0.299, 0.587, 0.114], np.float32) if f.shape[-1] == 3 else f.mean(axis=-1)
    lo, hi = np.percentile(g, [0.5, 99.5])
    return np.clip((g - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def motion_saliency(
    frames: np.ndarray,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> np.ndarray:
    """Camera-compensated motion magnitude of a ``(T, Y, X, C)`` clip: ``(T, Y, X)`` float32 in [0, 1].

    ``cancel`` is asked between frame pairs; when it returns True the computation stops with
    ``Cancelled``. ``progress(done, frames)`` is told after each frame. A single frame has no
    motion (all zeros).
    """
    from scipy import ndimage as ndi
    from skimage.registration import optical_flow_tvl1

    if frames.ndim != 4:
        raise InputError(f"motion needs a (T, Y, X, C) clip, got shape {frames.shape}")
    t_len = frames.shape[0]
    if t_len < 2:
        return np.zeros(frames.shape[:3], np.float32)
    g = _grey(frames)
    resid = np.empty(g.shape, np.float32)
    for t in range(t_len):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled while computing motion (frame {t + 1} of {t_len})")
        # The last frame looks back (flow to the previous frame, reversed).
        other, sign = (t + 1, 1.0) if t + 1 < t_len else (t - 1, -1.0)
        flow = sign * optical_flow_tvl1(g[t], g[other])  # (2, Y, X): row and column displacement
        camera = np.median(flow.reshape(2, -1), axis=1)
        resid[t] = np.linalg.norm(flow - camera[:, None, None], axis=0)
        if progress is not None:
            progress(t + 1, t_len)
    w = MOTION_WINDOW
    smooth = np.stack([resid[max(0, t - w) : t + w + 1].mean(axis=0) for t in range(t_len)])
    smooth = ndi.gaussian_filter(smooth, (0, MOTION_BLUR, MOTION_BLUR))
    ref = np.median(smooth, axis=(1, 2), keepdims=True) + smooth.std(axis=(1, 2), keepdims=True)
    return (np.clip(smooth / np.maximum(ref, 1e-6), 0.0, MOTION_CLIP) / MOTION_CLIP).astype(np.float32)


def refuse_tiles(config: ModelConfig, why: str) -> None:
    """The one error for a tiled run of a model with derived channels: they are computed over the
    whole clip, so each tile would see another camera motion."""
    raise InputError(
        f"model {config.name!r} derives {', '.join(config.input_features)} from the whole clip and runs only "
        f"whole, not in tiles ({why}); segment a shorter or smaller clip"
    )


def derived_channels(
    x: torch.Tensor,
    config: ModelConfig,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> torch.Tensor | None:
    """The ``config.input_features`` channels for a raw ``(C, *model spatial)`` image, as
    network input ``(F, *model spatial)`` float32 (each feature's [0, 1] mapped like RGB / 255
    with mean 0.5 and std 0.25); None when the model has no features. ``progress`` gets
    ``{"stage": "motion", "frame": k, "frames": n}`` after each frame."""
    if not config.input_features:
        return None
    out = []
    for feat in config.input_features:
        if feat != "motion":  # ModelConfig.validate admits only known names
            raise InputError(f"unknown input feature {feat!r}")
        t_ax = config.axes.index("T")
        rest = [i for i in range(config.spatial_dims) if i != t_ax]
        # (C, *spatial) -> (T, Y, X, C), and the saliency back into the model's axis order.
        clip = x.permute(1 + t_ax, *(1 + i for i in rest), 0).cpu().numpy()
        tell = None if progress is None else (lambda k, n: progress({"stage": "motion", "frame": k, "frames": n}))
        sal = torch.from_numpy(motion_saliency(clip, cancel, tell))
        dims = [t_ax] + rest
        sal = sal.permute(*[dims.index(d) for d in range(config.spatial_dims)])
        out.append((sal - 0.5) / 0.25)
    return torch.stack(out).to(x.device)


__all__ = ["motion_saliency", "derived_channels", "refuse_tiles", "MOTION_WINDOW", "MOTION_BLUR", "MOTION_CLIP"]
