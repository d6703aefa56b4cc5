"""Weights of one level in kernel v2's layout (kernels/nca_step_v2.cu, ``nca2_layout``).

Kernel v2 runs fc0 and fc1 as ``mma.sync.m16n8k16`` with bf16 inputs. Its weight buffer holds
each lane's B fragments in register order, so a block copies it to shared memory as it is and a
lane reads its two fragment registers with one 64-bit load:

- fc0 B fragments ``[KS0][NT0][32 lanes][2]``: B[k][n] = fc0_w[n][k] (input k of ``[x | p]``,
  hidden unit n), bf16 pairs; lane (g = lane // 4, t = lane % 4), register r holds rows
  k = 16 ks + 2t + 8r + {0, 1} (low half, high half) of column n = 8 nt + g;
- fc1 B fragments ``[KS1][NT1][32][2]``: B[k][n] = fc1_w[n][k] (hidden k, output channel n);
- fc0 bias (float32, padded to HP), conv weights ``[C][3^dims]`` and conv bias (float32).

Sizes are padded with zeros: 2C to a multiple of 16, H to a multiple of 16, C - IN to a multiple
of 8, so any model shape works (a zero hidden unit stays zero through ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...nca.step import pad_reflect
from ...nca.weights import BackboneNCA


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class V2Layout:
    """Word offsets of kernel v2's weight buffer (``nca2_layout`` in nca_step_v2.cu)."""

    dims: int
    channels: int
    inputs: int
    hidden: int

    @property
    def taps(self) -> int:
        return 3**self.dims

    @property
    def ks0(self) -> int:
        return _round_up(2 * self.channels, 16) // 16

    @property
    def nt0(self) -> int:
        return _round_up(self.hidden, 16) // 8

    @property
    def ks1(self) -> int:
        return _round_up(self.hidden, 16) // 16

    @property
    def nt1(self) -> int:
        return _round_up(self.channels - self.inputs, 8) // 8

    @property
    def w0(self) -> int:
        return 0

    @property
    def w1(self) -> int:
        return self.w0 + self.ks0 * self.nt0 * 64

    @property
    def b0(self) -> int:
        return self.w1 + self.ks1 * self.nt1 * 64

    @property
    def cw(self) -> int:
        return self.b0 + _round_up(self.hidden, 16)

    @property
    def cb(self) -> int:
        return self.cw + self.channels * self.taps

    @property
    def words(self) -> int:
        return self.cb + self.channels

    @property
    def tile(self) -> tuple[int, int, int]:
        """Cells per block tile (z, y, x)."""
        return (1, 8, 32) if self.dims == 2 else (4, 4, 8)


def layout_of(nca: BackboneNCA) -> V2Layout:
    """The v2 layout for a level's shape."""
    return V2Layout(nca.spatial_dims, nca.channels, nca.input_channels, nca.fc0.out_channels)


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint32), rounded to nearest even like the kernels."""
    return (
        torch.from_numpy(np.ascontiguousarray(a, np.float32)).bfloat16().view(torch.int16).numpy().astype(np.uint32)
        & 0xFFFF
    )


def b_fragments(matrix: np.ndarray, ks: int, nt: int) -> np.ndarray:
    """B fragments ``[ks][nt][32][2]`` (uint32 bf16 pairs) of ``B[k][n] = matrix[n][k]`` (zero-padded)."""
    n_rows, k_cols = matrix.shape
    padded = np.zeros((nt * 8, ks * 16), np.float32)
    padded[:n_rows, :k_cols] = matrix
    bits = bf16_bits(padded)  # [n][k]
    out = np.zeros((ks, nt, 32, 2), np.uint32)
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for s in range(ks):
        for j in range(nt):
            n = 8 * j + g
            for r in range(2):
                k = 16 * s + 2 * t + 8 * r
                out[s, j, :, r] = bits[n, k] | (bits[n, k + 1] << 16)
    return out


def pack_v2(nca: BackboneNCA) -> np.ndarray:
    """One level's weights as kernel v2's buffer (uint32 words; floats as their bits)."""
    lay = layout_of(nca)
    c, h = lay.channels, lay.hidden

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy()

    words = np.zeros(lay.words, np.uint32)
    words[lay.w0 : lay.w1] = b_fragments(f32(nca.fc0.weight).reshape(h, 2 * c), lay.ks0, lay.nt0).reshape(-1)
    words[lay.w1 : lay.b0] = b_fragments(f32(nca.fc1.weight).reshape(c - lay.inputs, h), lay.ks1, lay.nt1).reshape(-1)
    bias = np.zeros(lay.cw - lay.b0, np.float32)
    bias[:h] = f32(nca.fc0_bias).reshape(h)
    words[lay.b0 : lay.cw] = bias.view(np.uint32)
    words[lay.cw : lay.cb] = np.ascontiguousarray(f32(nca.conv.weight).reshape(c * lay.taps)).view(np.uint32)
    words[lay.cb :] = np.ascontiguousarray(f32(nca.conv_bias).reshape(c)).view(np.uint32)
    return words


@torch.no_grad()
def reference_step_v2(
    nca: BackboneNCA, image: torch.Tensor, state: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """What kernel v2 computes for one step, in torch (the tests' oracle; nca/step.py otherwise).

    The torch step (``nca.step.nca_delta``) with the matmul inputs rounded to bfloat16 (x,
    perception, fc0/fc1 weights, hidden vector); perception, sums and biases in float32; one
    rounding of ``state + dx`` to bfloat16. ``mask`` (broadcastable bool) marks the firing cells.
    """
    import torch.nn.functional as F

    conv = F.conv2d if nca.spatial_dims == 2 else F.conv3d

    def bf(t: torch.Tensor) -> torch.Tensor:
        return t.bfloat16().float()

    full = pad_reflect(torch.cat([image.float(), state.float()], 1), 1)
    p = conv(full, nca.conv.weight.float(), nca.conv_bias.float(), groups=nca.channels)
    centre = full[(slice(None), slice(None)) + (slice(1, -1),) * nca.spatial_dims]
    h = conv(bf(torch.cat([centre, p], 1)), bf(nca.fc0.weight), nca.fc0_bias.float())
    dx = conv(bf(torch.relu(h)), bf(nca.fc1.weight))
    new = (state.float() + dx).bfloat16()
    return new if mask is None else torch.where(mask, new, state.bfloat16())
