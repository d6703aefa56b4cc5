"""Fused CPU training: forward and backward through a level's NCA steps with numba kernels.

:class:`FusedLevelSteps` is a ``torch.autograd.Function`` for one level run (``steps`` NCA steps
of one level on a batch): the forward runs the fused inference step (``cpu_fused._fused_step``)
and keeps every step's state; the backward walks the steps in reverse, recomputes the 64-wide
hidden activations of the cells that fired (never stored) and back-propagates through fc1, the
ReLU, fc0 and the reflect-padded depthwise perception. Cells that did not fire pass the gradient
straight through, so the MLP's backward runs only for firing cells. The loss, optimizer, EMA and
patch logic stay in torch (``run/training.py``); ``step.py`` stays the reference: the gradients
equal autograd's within float rounding (tests/test_cpu_train.py).

Per step the backward is two passes over rows: (1) recompute the firing cells' MLP on tiles
shared by consecutive rows, accumulate the fc0/fc1 gradients, add ``d/d(centre)`` to the state
gradient in place (it holds ``grad_out`` on entry) and write the perception gradient ``G`` (zero where no cell fired); (2) per row, the
perception weight and bias gradients, and add the transposed, reflect-folded depthwise
convolution of ``G`` to ``grad_state``. Weight gradients are summed per fixed chunk of
rows and the chunks are added in order, so results do not depend on the thread count.

The tiles' fc0/fc1 products, forward and backward, go through BLAS (numba's ``np.dot``, the
sgemm of scipy's BLAS), held to one thread a call while the kernels run
(``blas_threads.single_threaded``): 90-106 GFMA/s a core on an AVX-512 Xeon, 2-3x the rate
of the hand-blocked loops inference keeps.
Inference keeps those loops because its results must not depend on the tile layout, and a BLAS
orders a product's sums by its kernel for the product's width.

These kernels call the inference kernels' pieces (``cpu_fused``). numba's on-disk cache
(``cache=True``) tracks only the file a kernel is defined in: after editing ``cpu_fused.py``
alone, delete the ``__pycache__/*.nbi`` and ``*.nbc`` files, or the cached training kernels keep
the old pieces (a fresh install has no cache).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np
import torch

from ..nca.firemask import MASK32, base_key, threshold
from ..nca.weights import BackboneNCA
from . import blas_threads, cpu_fused
from .cpu_fused import _STEP_LOCK, numba

if numba is not None:
    from numba import njit, prange

    from .cpu_fused import (
        _FASTMATH,
        _NO_REASSOC,
        _TILE,
        _YBLOCK,
        _firing,
        _gather_tile,
        _perceive,
        _run_at,
        _tap_rows,
        _tile_view,
    )

    #: Row chunks per backward pass (fixed: weight gradients are summed chunk by chunk in order).
    _CHUNKS = 64

    @njit(fastmath=_FASTMATH, cache=True, nogil=True)
    def _mlp_backward_blas(xv, gdv, w0, b0, w1t, w0t, hv, ghv, gxv, a_w0, a_b0, a_w1, cin, t_w0, t_w1):
        """Backward of fc1(relu(fc0 x + b0)) for a tile of kn cells, contiguous (rows, kn) arrays:
        gxv = d/dx (rows cin: on), the weight gradients added to a_*. The products go through
        BLAS (see ``cpu_fused._mlp_tile_blas``): 1.6x the tile rate of the hand-blocked loops
        they replaced (36 against 58 us a 256-cell tile, 3D preset, AVX-512 Xeon). t_w0 and
        t_w1 (w0's and w1's shapes) take one tile's weight gradients (BLAS overwrites its
        output) before they are added."""
        hidden = b0.shape[0]
        kn = xv.shape[1]
        np.dot(w0, xv, hv)  # recomputed, not stored
        for j in range(hidden):
            hj = hv[j]
            bj = b0[j]
            for k in range(kn):
                v = hj[k] + bj
                hj[k] = v if v > 0 else 0.0
        # fc1: dW1 += gd h^T; gh = W1^T gd, masked by the ReLU.
        np.dot(gdv, hv.T, t_w1)
        for i in range(t_w1.shape[0]):
            for j in range(hidden):
                a_w1[i, j] += t_w1[i, j]
        np.dot(w1t, gdv, ghv)
        for j in range(hidden):
            ghj = ghv[j]
            hj = hv[j]
            s = np.float32(0.0)
            for k in range(kn):
                if hj[k] <= 0:
                    ghj[k] = 0.0
                s += ghj[k]
            a_b0[j] += s
        # fc0: dW0 += gh x^T; gx = W0^T gh, except the image channels' centre rows (x[:cin]):
        # the image is not trained, nothing reads their gradient.
        np.dot(ghv, xv.T, t_w0)
        for i in range(hidden):
            for j in range(t_w0.shape[1]):
                a_w0[i, j] += t_w0[i, j]
        np.dot(w0t[cin:], ghv, gxv[cin:])

    @njit(cache=True, nogil=True, _nrt=False)
    def _scatter_tile(gx, kn, pos_b, pos_s, gin_flat, gp_flat, cu, c_all, plane):
        """gin[cell] += gx[centre state channels], gp[cell] = gx[perception] for the tile's cells
        (flat views: gin (B*CU*plane), gp (B*C*plane))."""
        cin = c_all - cu
        for c in range(cu):
            gxc = gx[cin + c]
            for k in range(kn):
                gin_flat[(pos_b[k] * cu + c) * plane + pos_s[k]] += gxc[k]
        for c in range(c_all):
            gxc = gx[c_all + c]
            for k in range(kn):
                gp_flat[(pos_b[k] * c_all + c) * plane + pos_s[k]] = gxc[k]

    @njit(cache=True, nogil=True, _nrt=False)
    def _gather_grad(g_flat, b, cu, plane, at, idx, j, k0, kn, gd, fill):
        """gd[c, fill + k] = the state gradient of cell idx[j, k0 + k] of the row at flat offset
        ``at`` in sample b, every state channel c (g_flat: (B*CU*plane))."""
        for c in range(cu):
            o = (b * cu + c) * plane + at
            gdc = gd[c]
            for k in range(kn):
                gdc[fill + k] = g_flat[o + idx[j, k0 + k]]

    @njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
    def _backward_mlp(
        img,
        state,
        g,
        gp,
        cw,
        cb,
        w0,
        b0,
        w1,
        w0t,
        w1t,
        dims,
        oz,
        oy,
        ox,
        keys,
        thresh,
        acc_w0,
        acc_b0,
        acc_w1,
        threads,
    ):
        """Pass 1 of one step's backward (see the module docstring).

        img (B, IN, nz, ny, nx) and state (B, CU, ...) are the step's inputs; g (B, CU, ...) holds
        the gradient of its output and gets the centre gradient added in place (a cell's own value
        is read into its tile before the tile adds to it; no other cell reads it): no copy. Writes
        gp (B, C, ...) = the perception gradient; adds the MLP's weight gradients to acc_*[chunk]. Rows go in the
        forward kernel's order and runs; firing cells of consecutive rows share tiles, so short
        rows (coarse levels, 3D patches) fill them too. ``threads``: numba's thread count.
        """
        nb, cin, nz, ny, nx = img.shape
        cu = state.shape[1]
        c_all = cin + cu
        hidden = b0.shape[0]
        rows = nb * nz * ny
        plane = nz * ny * nx
        taps = 9 if dims == 3 else 3
        centre = taps // 2
        nchunks = acc_w0.shape[0]
        per = (rows + nchunks - 1) // nchunks
        img2 = img.reshape((nb * cin * nz * ny, nx))
        st2 = state.reshape((nb * cu * nz * ny, nx))
        g_flat = g.reshape(nb * cu * plane)
        gp_flat = gp.reshape(nb * c_all * plane)
        nw = max(1, min(threads, nchunks))
        for w in prange(nw):
            ridx = np.empty((_YBLOCK, taps, c_all), np.int64)
            idx = np.empty((_YBLOCK, nx), np.int64)
            nfs = np.zeros(_YBLOCK, np.int64)
            prow = np.empty((c_all, _YBLOCK, nx), np.float32)
            xt = np.empty((2 * c_all, _TILE), np.float32)
            ht = np.empty((hidden, _TILE), np.float32)
            gd = np.empty((cu, _TILE), np.float32)
            gh = np.empty((hidden, _TILE), np.float32)
            gx = np.empty((2 * c_all, _TILE), np.float32)
            t_w0 = np.empty(w0.shape, np.float32)
            t_w1 = np.empty(w1.shape, np.float32)
            pos_b = np.empty(_TILE, np.int64)
            pos_s = np.empty(_TILE, np.int64)
            for ch in range(w, nchunks, nw):
                a_w0, a_b0, a_w1 = acc_w0[ch], acc_b0[ch], acc_w1[ch]
                fill = 0
                row = ch * per
                end = min(rows, (ch + 1) * per)
                while row < end:
                    nrun, b, z, y0 = _run_at(row, end, nz, ny)
                    any_fired = 0
                    for j in range(nrun):
                        y = y0 + j
                        for c in range(c_all):
                            # Indices into the flat view: no row view (and its reference counting) per row and channel.
                            o = (((b * c_all + c) * nz + z) * ny + y) * nx
                            for x in range(nx):
                                gp_flat[o + x] = 0.0
                        nfs[j] = _firing(idx[j], keys[b], dims, oz + z, oy + y, ox, thresh)
                        any_fired += nfs[j]
                        _tap_rows(ridx[j], cin, cu, nz, ny, b, z, y, dims)
                    if any_fired:
                        _perceive(img2, st2, cin, ridx, cw, cb, prow, nrun)
                    for j in range(nrun):
                        nf = nfs[j]
                        y = y0 + j
                        zy = z * ny + y
                        k0 = 0
                        while k0 < nf:
                            kn = min(nf - k0, _TILE - fill)
                            _gather_tile(img2, st2, cin, ridx[j, centre], prow, j, idx[j], k0, kn, xt, fill)
                            _gather_grad(g_flat, b, cu, plane, zy * nx, idx, j, k0, kn, gd, fill)
                            for k in range(kn):
                                pos_b[fill + k] = b
                                pos_s[fill + k] = zy * nx + idx[j, k0 + k]
                            fill += kn
                            k0 += kn
                            if fill == _TILE:
                                _mlp_backward_blas(
                                    xt, gd, w0, b0, w1t, w0t, ht, gh, gx, a_w0, a_b0, a_w1, cin, t_w0, t_w1
                                )
                                _scatter_tile(gx, fill, pos_b, pos_s, g_flat, gp_flat, cu, c_all, plane)
                                fill = 0
                    row += nrun
                if fill:
                    gxv = _tile_view(gx, fill, False)
                    _mlp_backward_blas(
                        _tile_view(xt, fill),
                        _tile_view(gd, fill),
                        w0,
                        b0,
                        w1t,
                        w0t,
                        _tile_view(ht, fill, False),
                        _tile_view(gh, fill, False),
                        gxv,
                        a_w0,
                        a_b0,
                        a_w1,
                        cin,
                        t_w0,
                        t_w1,
                    )
                    _scatter_tile(gxv, fill, pos_b, pos_s, g_flat, gp_flat, cu, c_all, plane)

    @njit(fastmath=_FASTMATH, cache=True, nogil=True, _nrt=False)
    def _conv_weight_grads(g, r0, r1, r2, acc, t, nx):
        """acc[3t + 3j + (0, 1, 2)] += sum_x g[x] * (left, centre, right neighbour of x in rj) for
        three tap-rows at once (x ends reflected); nine running sums share each load of g.

        g and r0..r2 hold L consecutive rows of nx (flattened, L >= 1): the sums run over the
        whole stretch (short 3D rows would spend most of their time reducing), then the row ends
        are put right: a row's first cell has its left neighbour at x = 1 and its last its right
        neighbour at x = nx - 2 (reflect), not in the adjacent row.
        """
        n = g.shape[0]
        k = 3 * t
        if nx == 1:  # every tap of a cell reads the cell itself
            s0 = s1 = s2 = np.float32(0.0)
            for i in range(n):
                s0 += g[i] * r0[i]
                s1 += g[i] * r1[i]
                s2 += g[i] * r2[i]
            for d in range(3):
                acc[k + d] += s0
                acc[k + 3 + d] += s1
                acc[k + 6 + d] += s2
            return
        s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = np.float32(0.0)
        for i in range(n - 1):
            g0 = g[i]
            g1 = g[i + 1]
            s00 += g1 * r0[i]
            s01 += g0 * r0[i]
            s02 += g0 * r0[i + 1]
            s10 += g1 * r1[i]
            s11 += g0 * r1[i]
            s12 += g0 * r1[i + 1]
            s20 += g1 * r2[i]
            s21 += g0 * r2[i]
            s22 += g0 * r2[i + 1]
        e = n - 1
        s01 += g[e] * r0[e]
        s11 += g[e] * r1[e]
        s21 += g[e] * r2[e]
        for a in range(0, n, nx):
            e = a + nx - 1
            s00 += g[a] * r0[a + 1]
            s10 += g[a] * r1[a + 1]
            s20 += g[a] * r2[a + 1]
            s02 += g[e] * r0[e - 1]
            s12 += g[e] * r1[e - 1]
            s22 += g[e] * r2[e - 1]
            if a > 0:
                s00 -= g[a] * r0[a - 1]
                s10 -= g[a] * r1[a - 1]
                s20 -= g[a] * r2[a - 1]
            if e < n - 1:
                s02 -= g[e] * r0[e + 1]
                s12 -= g[e] * r1[e + 1]
                s22 -= g[e] * r2[e + 1]
        acc[k] += s00
        acc[k + 1] += s01
        acc[k + 2] += s02
        acc[k + 3] += s10
        acc[k + 4] += s11
        acc[k + 5] += s12
        acc[k + 6] += s20
        acc[k + 7] += s21
        acc[k + 8] += s22

    @njit(fastmath=_NO_REASSOC, cache=True, nogil=True, _nrt=False)
    def _conv_transpose(g, w_a, w_b, w_c, dst, nx):
        """dst += the gradient that perception gradients g send to the rows they read with taps
        (w_a, w_b, w_c) at x - 1, x, x + 1, the reflected ends folded back.

        g and dst hold L consecutive rows of nx (flattened, L >= 1): one pass over the stretch,
        then the row ends put right (no tap reaches into the adjacent row).
        """
        n = g.shape[0]
        if nx == 1:  # every tap of a cell reads the cell itself
            for i in range(n):
                dst[i] += (w_a + w_b + w_c) * g[i]
            return
        for i in range(n - 2):
            dst[i + 1] += w_a * g[i + 2] + w_b * g[i + 1] + w_c * g[i]
        dst[0] += w_a * g[1] + w_b * g[0]
        dst[n - 1] += w_b * g[n - 1] + w_c * g[n - 2]
        for a in range(0, n, nx):
            e = a + nx - 1
            if a > 0:
                dst[a] -= w_c * g[a - 1]
                dst[a - 1] -= w_a * g[a]
            dst[a + 1] += w_a * g[a]  # a row's first cell reads x = 1 as its left neighbour
            dst[e - 1] += w_c * g[e]  # and its last cell x = nx - 2 as its right one

    @njit(fastmath=_NO_REASSOC, cache=True, nogil=True, _nrt=False)
    def _conv_transpose3(g0, g1, g2, w, t, dst, nx):
        """_conv_transpose of three gradient stretches at once (taps 3t..3t+8 of w: rows g0, g1,
        g2 with taps t, t + 1, t + 2): one load and store of dst per 9 FMAs instead of per 3."""
        n = g0.shape[0]
        a0, b0, c0 = w[3 * t], w[3 * t + 1], w[3 * t + 2]
        a1, b1, c1 = w[3 * t + 3], w[3 * t + 4], w[3 * t + 5]
        a2, b2, c2 = w[3 * t + 6], w[3 * t + 7], w[3 * t + 8]
        for i in range(n - 2):
            dst[i + 1] += (a0 * g0[i + 2] + b0 * g0[i + 1] + c0 * g0[i]) + (
                (a1 * g1[i + 2] + b1 * g1[i + 1] + c1 * g1[i]) + (a2 * g2[i + 2] + b2 * g2[i + 1] + c2 * g2[i])
            )
        dst[0] += (a0 * g0[1] + b0 * g0[0]) + ((a1 * g1[1] + b1 * g1[0]) + (a2 * g2[1] + b2 * g2[0]))
        m = n - 1
        dst[m] += (b0 * g0[m] + c0 * g0[m - 1]) + ((b1 * g1[m] + c1 * g1[m - 1]) + (b2 * g2[m] + c2 * g2[m - 1]))
        for a in range(0, n, nx):
            e = a + nx - 1
            if a > 0:
                dst[a] -= (c0 * g0[a - 1] + c1 * g1[a - 1]) + c2 * g2[a - 1]
                dst[a - 1] -= (a0 * g0[a] + a1 * g1[a]) + a2 * g2[a]
            dst[a + 1] += (a0 * g0[a] + a1 * g1[a]) + a2 * g2[a]
            dst[e - 1] += (c0 * g0[e] + c1 * g1[e]) + c2 * g2[e]

    @njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
    def _backward_conv(img, state, gp, gin, cw, dims, inv_z, n_z, inv_y, n_y, acc_cw, acc_cb):
        """Pass 2: the perception's backward from its gradient gp (B, C, nz, ny, nx).

        Adds the conv weight and bias gradients to acc_*[chunk] and the transposed,
        reflect-folded depthwise conv of gp's state channels to gin. inv_y[y, m] = (source row q,
        tap index a) with reflect(q + a - 1) == y, n_y[y] of them (the same for z; 2D passes one
        entry (0, 0)).
        """
        nb, c_all, nz, ny, nx = gp.shape
        cu = gin.shape[1]
        cin = c_all - cu
        rows = nb * nz * ny
        taps = 9 if dims == 3 else 3
        nchunks = acc_cw.shape[0]
        per = (rows + nchunks - 1) // nchunks
        img_flat = img.reshape(nb * cin * nz * ny * nx)
        st_flat = state.reshape(nb * cu * nz * ny * nx)
        gp_flat = gp.reshape(nb * c_all * nz * ny * nx)
        gin_flat = gin.reshape(nb * cu * nz * ny * nx)
        for ch in prange(nchunks):
            ridx = np.empty((taps, c_all), np.int64)
            a_cw, a_cb = acc_cw[ch], acc_cb[ch]
            row = ch * per
            end = min(rows, (ch + 1) * per)
            while row < end:
                b = row // (nz * ny)
                zy = row - b * nz * ny
                z = zy // ny
                y = zy - z * ny
                # Perception weights: dcw[c, tap] += sum_x G[c, x] * (the tap's neighbour of x).
                # Interior rows (1 <= y <= ny - 2) of one plane read consecutive rows: one run.
                n = 1
                if nx > 1 and 1 <= y <= ny - 2:
                    while row + n < end and y + n <= ny - 2:
                        n += 1
                _tap_rows(ridx, cin, cu, nz, ny, b, z, y, dims)
                for c in range(c_all):
                    g0 = ((b * c_all + c) * nz + z) * ny + y
                    g = gp_flat[g0 * nx : (g0 + n) * nx]
                    s = np.float32(0.0)
                    for x in range(n * nx):
                        s += g[x]
                    a_cb[c] += s
                    flat = img_flat if c < cin else st_flat
                    ln = n * nx
                    for t in range(0, taps, 3):
                        r0 = ridx[t, c] * nx
                        r1 = ridx[t + 1, c] * nx
                        r2 = ridx[t + 2, c] * nx
                        _conv_weight_grads(
                            g, flat[r0 : r0 + ln], flat[r1 : r1 + ln], flat[r2 : r2 + ln], a_cw[c], t, nx
                        )
                row += n
            row = ch * per
            while row < end:
                b = row // (nz * ny)
                zy = row - b * nz * ny
                z = zy // ny
                y = zy - z * ny
                # Gradient of the state: every cell that read this row, through the reflect.
                # Rows 2 <= y <= ny - 3 of a plane are read by exactly rows y - 1, y, y + 1 (no
                # reflect): one run, flattened.
                n = 1
                if nx > 1 and 2 <= y <= ny - 3:
                    while row + n < end and y + n <= ny - 3:
                        n += 1
                ln = n * nx
                for c in range(cin, c_all):
                    d0 = (((b * cu + c - cin) * nz + z) * ny + y) * nx
                    dst = gin_flat[d0 : d0 + ln]
                    for mz in range(n_z[z]):
                        qz, az = inv_z[z, mz, 0], inv_z[z, mz, 1]
                        if n == 1:
                            for my in range(n_y[y]):
                                qy, ay = inv_y[y, my, 0], inv_y[y, my, 1]
                                t = az * 3 + ay
                                _conv_transpose(
                                    gp[b, c, qz, qy], cw[c, 3 * t], cw[c, 3 * t + 1], cw[c, 3 * t + 2], dst, nx
                                )
                        else:
                            # Taps ay = 0, 1, 2 read this run from the rows y + 1, y, y - 1.
                            g0 = (((b * c_all + c) * nz + qz) * ny + y + 1) * nx
                            _conv_transpose3(
                                gp_flat[g0 : g0 + ln],
                                gp_flat[g0 - nx : g0 - nx + ln],
                                gp_flat[g0 - 2 * nx : g0 - 2 * nx + ln],
                                cw[c],
                                az * 3,
                                dst,
                                nx,
                            )
                row += n


@functools.lru_cache(maxsize=64)
def _inverse_reflect(n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every row p of an axis of n: the (source row q, tap a) with reflect(q + a - 1) == p."""
    inv = np.zeros((n, 6, 2), np.int64)  # at most 5 (n = 3: the middle row)
    count = np.zeros(n, np.int64)
    for q in range(n):
        for a in range(3):
            i = q + a - 1
            p = 0 if n == 1 else (-i if i < 0 else (2 * n - 2 - i if i >= n else i))
            inv[p, count[p]] = (q, a)
            count[p] += 1
    return inv, count


def _weights(nca: BackboneNCA) -> tuple[np.ndarray, ...]:
    """(cw, cb, w0, b0, w1, w0^T, w1^T) as contiguous float32 numpy arrays."""
    c, h = nca.channels, nca.fc0.out_channels
    cu = c - nca.input_channels
    cw = nca.conv.weight.detach().float().reshape(c, -1).contiguous().numpy()
    assert nca.conv.bias is not None and nca.fc0.bias is not None  # check_fusable's bias layout
    cb = nca.conv.bias.detach().float().contiguous().numpy()
    w0 = nca.fc0.weight.detach().float().reshape(h, 2 * c).contiguous().numpy()
    b0 = nca.fc0.bias.detach().float().contiguous().numpy()
    w1 = nca.fc1.weight.detach().float().reshape(cu, h).contiguous().numpy()
    return cw, cb, w0, b0, w1, np.ascontiguousarray(w0.T), np.ascontiguousarray(w1.T)


class BufferPool:
    """Arrays of the training steps kept for the next iteration instead of freed.

    A fresh array of tens of MB is mapped anew by the allocator, and the kernel faults in and
    zeroes every page on first touch: a level's 10 forward steps into fresh state arrays took
    2.3x as long as into reused ones (256^2, batch 2). A pool lives as long as its
    :class:`FusedLevelRunner` (one training run) and holds what one iteration holds anyway.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._taken: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` (contents undefined): a returned one if any, else new."""
        with self._lock:
            self._taken.add(tuple(shape))
            free = self._free.get(tuple(shape))
            if free:
                return free.pop()
        return np.empty(shape, np.float32)

    def give(self, *arrays: np.ndarray) -> None:
        """Return arrays that nothing else refers to any more."""
        with self._lock:
            for a in arrays:
                self._free.setdefault(a.shape, []).append(a)

    def new_round(self) -> None:
        """A new iteration starts: drop the arrays of shapes the last one did not use (another
        crop or image size), so old shapes never pile up; at most the last two iterations'
        shapes are held."""
        with self._lock:
            for shape in [s for s in self._free if s not in self._taken]:
                del self._free[shape]
            self._taken = set()

    def pooled_bytes(self) -> int:
        """Bytes held for reuse."""
        with self._lock:
            return sum(a.nbytes for free in self._free.values() for a in free)


def _take(pool: BufferPool | None, shape: tuple[int, ...]) -> np.ndarray:
    return pool.take(shape) if pool is not None else np.empty(shape, np.float32)


def _as5d(a: np.ndarray, dims: int) -> np.ndarray:
    """(B, C, *spatial) -> (B, C, nz, ny, nx) (2D gets nz = 1)."""
    return a.reshape(a.shape[:2] + (1,) + a.shape[2:]) if dims == 2 else a


class FusedLevelSteps(torch.autograd.Function):
    """``steps`` NCA steps of one level (per-sample fire-mask seeds), differentiable, on the CPU."""

    @staticmethod
    def forward(ctx, image, state, conv_w, conv_b, fc0_w, fc0_b, fc1_w, nca, keys, thresh, origin, pool):
        dims = nca.spatial_dims
        weights = _weights(nca)
        cw, cb, w0, b0, w1 = weights[:5]
        img = _as5d(image.detach().float().contiguous().numpy(), dims)
        s0 = _as5d(state.detach().float().contiguous().numpy(), dims)
        steps = keys.shape[0]
        states = _take(pool, (steps + 1,) + s0.shape)
        states[0] = s0
        oz, oy, ox = (0,) + tuple(origin) if dims == 2 else tuple(origin)
        for t in range(steps):
            with _STEP_LOCK, blas_threads.single_threaded():
                cpu_fused._fused_step(
                    img,
                    states[t],
                    states[t + 1],
                    cw,
                    cb,
                    w0,
                    b0,
                    w1,
                    dims,
                    oz,
                    oy,
                    ox,
                    keys[t],
                    np.uint64(thresh),
                    False,
                    numba.get_num_threads(),
                    True,
                )
        ctx.saved = (img, states, weights, dims, (oz, oy, ox), keys, thresh)
        ctx.pool = pool
        ctx.param_shapes = [p.shape for p in (conv_w, conv_b, fc0_w, fc0_b, fc1_w)]
        return torch.from_numpy(states[steps].reshape(state.shape).copy())

    @staticmethod
    def backward(ctx, grad_out):
        img, states, weights, dims, (oz, oy, ox), keys, thresh = ctx.saved
        cw, cb, w0, b0, w1, w0t, w1t = weights
        nb, cu, nz, ny, nx = states.shape[1:]
        cin = img.shape[1]
        c_all = cin + cu
        rows = nb * nz * ny
        nch = -(-rows // cpu_fused.chunk_rows(rows, nx, _CHUNKS))
        acc = [np.zeros((nch,) + a.shape, np.float32) for a in (cw, cb, w0, b0, w1)]
        pool = ctx.pool
        # The state gradient, updated in place step by step back to the level's input.
        g = _as5d(grad_out.detach().float().contiguous().numpy(), dims).copy()
        gp = _take(pool, (nb, c_all, nz, ny, nx))
        inv_y, n_y = _inverse_reflect(ny)
        if dims == 3:
            inv_z, n_z = _inverse_reflect(nz)
        else:
            inv_z, n_z = np.zeros((1, 6, 2), np.int64), np.ones(1, np.int64)
        with _STEP_LOCK, blas_threads.single_threaded():
            for t in range(keys.shape[0] - 1, -1, -1):
                _backward_mlp(
                    img,
                    states[t],
                    g,
                    gp,
                    cw,
                    cb,
                    w0,
                    b0,
                    w1,
                    w0t,
                    w1t,
                    dims,
                    oz,
                    oy,
                    ox,
                    keys[t],
                    np.uint64(thresh),
                    acc[2],
                    acc[3],
                    acc[4],
                    numba.get_num_threads(),
                )
                _backward_conv(img, states[t], gp, g, cw, dims, inv_z, n_z, inv_y, n_y, acc[0], acc[1])
        grads = [torch.from_numpy(a.sum(axis=0)).reshape(shape) for a, shape in zip(acc, ctx.param_shapes)]
        grad_state = torch.from_numpy(g).reshape(grad_out.shape)
        if pool is not None:
            # g goes to autograd; gp and the states are free.
            pool.give(gp, states)
            ctx.saved = None  # a second backward through this graph is an error, not a silent reuse
        return (None, grad_state, *grads, None, None, None, None, None)


def run_level_fused(
    nca: BackboneNCA,
    image: torch.Tensor,
    state: torch.Tensor,
    level: int,
    steps: int,
    seeds: Sequence[int],
    origin: tuple[int, ...],
    fire_rate: float,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """``steps`` differentiable NCA steps of ``nca`` on a batch, sample b with fire-mask seed seeds[b].

    Same signature as :func:`napari_octreenca.nca.octree.reference_level_steps`, which it replaces
    in ``OctreeNCA.forward_train`` on the CPU; ``pool`` (see :class:`FusedLevelRunner`) reuses
    the step arrays between iterations.
    """
    thresh = threshold(fire_rate)  # 1.0 -> 2**24: every cell fires, as with no mask
    keys = np.array([[base_key(s, level, t) & MASK32 for s in seeds] for t in range(steps)], dtype=np.uint64).reshape(
        steps, len(seeds)
    )
    return FusedLevelSteps.apply(
        image,
        state,
        nca.conv.weight,
        nca.conv.bias,
        nca.fc0.weight,
        nca.fc0.bias,
        nca.fc1.weight,
        nca,
        keys,
        thresh,
        tuple(origin),
        pool,
    )


class FusedLevelRunner:
    """The fused level step for one training run: :func:`run_level_fused` with a
    :class:`BufferPool` that lives as long as this object (train() and the benchmark make one)."""

    def __init__(self) -> None:
        self.pool = BufferPool()
        self._last_level: int | None = None

    def __call__(
        self,
        nca: BackboneNCA,
        image: torch.Tensor,
        state: torch.Tensor,
        level: int,
        steps: int,
        seeds: Sequence[int],
        origin: tuple[int, ...],
        fire_rate: float,
    ) -> torch.Tensor:
        # forward_train runs the levels coarse to fine: a level above the last one starts an iteration.
        if self._last_level is not None and level > self._last_level:
            self.pool.new_round()
        self._last_level = level
        return run_level_fused(nca, image, state, level, steps, seeds, origin, fire_rate, pool=self.pool)


def available() -> bool:
    """Whether the fused training kernels can run (numba importable)."""
    return numba is not None
