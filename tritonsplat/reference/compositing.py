"""Front-to-back alpha compositing per tile in pure PyTorch, and its back-to-front backward.

Torch twin of `tritonsplat.ops.compositing` with the same contract (`tritonsplat.types`): the same
tile ranges and depth-sorted ids, the same blending rule, the same saved state (final
transmittance and the index of the last blended entry per pixel).

Layout: tiles of P = tile_size^2 pixels. A batch of tiles is walked in chunks of K sorted entries at
once, as [active tiles, K, P] tensors. Within a chunk, with keep_i = 1 - alpha_i where the entry
is used (alpha >= 1/255) and 1 elsewhere,

    T_after_i = T * prod_{j <= i} keep_j,   blended_i = used_i and T_after_i >= 1e-4

which is the sequential rule of Kerbl et al. 2023 (Eq. 3 with the original's stop): T is
non-increasing, so the entries that pass are a prefix of the used ones, and the first that fails
stops the pixel (its T is then carried as 0, so no later entry can blend). Each pixel's T is carried
from chunk to chunk; a tile leaves the active set once all of its pixels have stopped or its list
ends, so the work is proportional to the entries actually walked, as on the GPU. Where few sub-tiles
are left, the forward takes several consecutive chunks of each list per step (`chunks_per_step`).

Backward walks each tile's chunks back to front from the saved state: T_i = T_after_chunk / R_i
with R_i the reverse inclusive product of keep over the chunk, alpha recomputed from the inputs.

Speed: the time is the number of passes over the [A, K, P] temporaries, so each pass counts. The
exponent of every pair is one matrix product of per-entry coefficients with a pixel basis, alpha is
exp2 of it; products with colours and pixel sums are batched matrix products laid out so that the
pairs are the contiguous operand; the last blended index comes from a count, not an argmin; masks are
0/1 factors. Forward 12 passes (33 before), backward 21 (+ 6 for the densify head; ~60 before). On a
2-core CPU (AMD EPYC, torch 2.13, 1 thread, load ~3), forward + backward of the whole torch pipeline
on the basketball early-fit scene (8,441 Gaussians, 160x90, D = 6): 129 ms of CPU before these
changes, 74 ms after. The backward's per-entry sums are stored as the chunk maths gives them (quantity
first, compute dtype, back to front) and finished on contiguous rows: the compositor's backward on that
scene went from 29.3 to 21.2 ms (2-core Intel Xeon, 2 threads, interleaved runs, 2026-12-03).

Memory: tiles are processed in batches (`tile_batch`), so the temporaries are O(tile_batch x K x P)
whatever the image size; the outputs and saved state are O(pixels), nothing is O(pixels x Gaussians).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .. import constants, types
from ..profiling import backward_stage
from ..settings import RenderSettings
from ..types import ALL_OUTPUTS, CompositeState

# Entries per chunk (K, at most; see `chunk_size`), sub-tile side (S), float32 compute for float32 inputs.
# Measured on a 2-core CPU (AMD EPYC, torch 2.13, 1 thread), forward + backward of the basketball early-fit
# scene (8,441 Gaussians, 160x90, D = 6; 30,893 sub-tile entries, 96 % walked), before the pass-count
# rewrite: idle machine, S = 8, K = 32, batch 128: 0.28 s; batch 512: 0.37 s (the [A, K, P] temporaries
# leave the L2 cache); K = 64, batch 512: 0.35 s; K = 16, batch 512: 0.32 s; S = 4, batch 512: 0.35 s.
# After it (load ~3, CPU time, best of 10 interleaved runs): batch 128: 70 ms, 256: 74 ms, 64: 80 ms,
# 32: 84 ms. S = 4 stays slower with the later code too (basketball-early 45 -> 49-62 ms, batch 128-1024,
# 2-core Intel Xeon, 2026-12-03) although it keeps fewer unused pairs (alpha < 1/255 on 62 % of the
# walked pairs at S = 8 there): thinner products cost more per pair. The batch: see `tile_batch_for`.
DEFAULT_CHUNK_ENTRIES = 32
DEFAULT_SUB_TILE = 8
# Bytes of one [A, K, P] temporary per byte of the per-core L2 cache (see `tile_batch_for`).
TEMPORARY_BYTES_PER_L2_BYTE = 2
# Where the cache size cannot be read, and on GPUs (the torch backend there is the stage oracle, not the
# product): the AMD EPYC's 512 KiB, i.e. batch 128 at K = 32 in float32, the batch before the rule.
FALLBACK_L2_BYTES = 512 << 10
# A floor so that huge K x P (sub-tile 16, float64) still batches a few sub-tiles per op.
MIN_TILE_BATCH = 16
# Forward walk steps of several chunks (`chunks_per_step`): at most this many entries per step, and this many
# padding chunks accepted per step saved.
MAX_STEP_ENTRIES = 128
STEP_WASTE_PER_SAVED_STEP = 8

LOG2_E = 1 / math.log(2)


def scatter_add(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
                deterministic: bool, dim: int = 0) -> None:
    """target[index] += values along dim (0, or 1 for [quantities, rows] layouts); with `deterministic` on CUDA,
    a fixed-order reduction."""
    if not (deterministic and target.is_cuda):
        target.index_add_(dim, index, values.to(target.dtype))
        return
    if dim == 1:
        scatter_add(target.T, index, values.T, deterministic)   # in place through the transposed view
        return
    order = torch.argsort(index, stable=True)
    index, values = index[order], values[order].to(torch.float64)
    unique, counts = torch.unique_consecutive(index, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    prefix = torch.cumsum(values, 0)
    sums = prefix[ends]
    sums[1:] -= prefix[ends[:-1]]
    target.index_add_(0, unique, sums.to(target.dtype))  # unique indices: no race


class _TileGrid(NamedTuple):
    """Pixel geometry shared by every sub-tile, relative to the sub-tile's centre (S / 2, S / 2), which
    keeps the monomials below small (|u|, |v| <= S / 2) and so the expanded quadratic well conditioned."""

    local_x: torch.Tensor   # [P] pixel centre x relative to the sub-tile centre (i + 0.5 - S / 2)
    local_y: torch.Tensor   # [P]
    basis_t: torch.Tensor   # [6, P] (1, u, v, u^2, u v, v^2) of the centres, compute dtype, contiguous


def _tile_grid(tile_size: int, device, dtype) -> _TileGrid:
    p = torch.arange(tile_size * tile_size, device=device)
    u = (p % tile_size).to(torch.float64) + 0.5 - tile_size / 2
    v = torch.div(p, tile_size, rounding_mode="floor").to(torch.float64) + 0.5 - tile_size / 2
    basis_t = torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v]).to(dtype)
    return _TileGrid(u.to(dtype), v.to(dtype), basis_t)


class _Entries(NamedTuple):
    """Per-entry data of one chunk, [A, K] (padding entries: opacity 0, index -1)."""

    index: torch.Tensor      # [A, K] int64 position in sorted_ids (-1 padding)
    mean_x: torch.Tensor     # [A, K] relative to the sub-tile centre
    mean_y: torch.Tensor
    half_a: torch.Tensor     # a / 2
    conic_b: torch.Tensor
    half_c: torch.Tensor     # c / 2
    opacity: torch.Tensor    # 0 for padding, so the entry is never used


class _Inputs(NamedTuple):
    """Flat views of the compositor inputs."""

    means: torch.Tensor       # [C * N, 2]
    conics: torch.Tensor      # [C * N, 3]
    opacities: torch.Tensor   # [N] or [C * N]
    colors: torch.Tensor      # [N, D] or [C * N, D]
    depths: torch.Tensor      # [C * N]
    n_gaussians: int
    shared_colors: bool       # colours [N, D] shared by every camera
    shared_opacities: bool    # opacities [N] shared by every camera (else per camera, e.g. antialiased)

    def opacity_index(self, row: torch.Tensor) -> torch.Tensor:
        """Rows of `opacities` of the flat rows c * N + g."""
        return row % self.n_gaussians if self.shared_opacities else row


def _flat_inputs(means2d, conics, opacities, colors, depths) -> _Inputs:
    n = means2d.shape[1]
    shared = colors.dim() == 2
    return _Inputs(means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1),
                   colors if shared else colors.reshape(-1, colors.shape[-1]), depths.reshape(-1), n, shared,
                   opacities.dim() == 1)


class _Records(NamedTuple):
    """Every sub-tile list entry's data in list order, gathered once per render, as a table of chunks:
    each sub-list padded to a whole number of K-entry chunks (padding: opacity 0 and exponent -inf, so
    it never blends and needs no mask). A chunk of A sub-tiles is then one `index_select` of A rows
    (contiguous copies) instead of a gather of A x K entries: on the bench `random` scene (2-core AMD
    EPYC, 1 thread) the gathers took 13 % of forward + backward."""

    table: torch.Tensor        # [chunks + 1, K, 12 + D + 2]: exponent (6), geometry (6), values (D + 2), see below
    index: torch.Tensor        # [chunks + 1, K] int64 position in sorted_ids (-1: padding)
    row: torch.Tensor          # [chunks + 1, K] int64 flat row c * N + g (0: padding)
    first_chunk: torch.Tensor  # [B] int64 the sub-list's first chunk
    n_chunks: torch.Tensor     # [B] int64 its number of chunks
    indefinite: bool           # some conic is not positive semi-definite, so sigma < 0 must be tested per pair

    @property
    def padding_chunk(self) -> int:
        """The table's last chunk, all padding."""
        return self.table.shape[0] - 1


# Columns of _Records.table. Exponent: coefficients of z = log2(o) - sigma log2(e) on the basis
# (1, u, v, u^2, u v, v^2), so that o exp(-sigma) = exp2(z). Geometry: mean_x, mean_y (relative to the
# sub-tile centre), a/2, b, c/2, opacity. Values: colour [D], depth, 1.
EXPONENT, GEOMETRY, VALUES = slice(0, 6), slice(6, 12), 12


@torch.no_grad()
def _records(flat: _Inputs, sorted_ids, layout, sub_tile: int, k_entries: int) -> _Records:
    device, dtype = flat.means.device, flat.means.dtype
    sizes = layout.end - layout.start
    bin_of_entry = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)
    # index_select rather than x[index]: 3-6x faster for row gathers on the CPU (AMD EPYC, torch 2.13).
    row = sorted_ids.index_select(0, layout.entry_index).to(torch.int64)
    means, conics = flat.means.index_select(0, row), flat.conics.index_select(0, row)
    opacity = flat.opacities.index_select(0, flat.opacity_index(row))
    mean_x = means[:, 0] - (layout.origin_x + sub_tile / 2).index_select(0, bin_of_entry)
    mean_y = means[:, 1] - (layout.origin_y + sub_tile / 2).index_select(0, bin_of_entry)
    # sigma = a/2 (mx - u)^2 + b (mx - u)(my - v) + c/2 (my - v)^2, expanded in (u, v) so that the exponent
    # of every (entry, pixel) pair of a chunk is one matrix product; coefficients formed in float64.
    mx, my = mean_x.double(), mean_y.double()
    conics64 = conics.double()
    a, b, c = conics64.unbind(1)
    log_opacity = torch.log(opacity.double().clamp_min(0))                 # -inf: never blends
    linear_x = torch.addcmul(a * mx, b, my)                                # a mx + b my
    linear_y = torch.addcmul(c * my, b, mx)                                # b mx + c my
    # a/2 mx^2 + b mx my + c/2 my^2 = (mx linear_x + my linear_y) / 2: 15 float64 ops for the six, not 25
    # (the records op time 4.77 -> 4.26 ms on the quick check's t = 0 result, 2-core Intel Xeon).
    constant = torch.addcmul(mx * linear_x, my, linear_y).mul_(-0.5).add_(log_opacity)
    quadratic = conics64 * conics64.new_tensor([-0.5, -1.0, -0.5])         # -a/2, -b, -c/2
    # exp2 costs a third of exp on the CPU (0.30 vs 0.85 ns per element, AMD EPYC, torch 2.13, 1 thread).
    exponent = torch.cat([torch.stack([constant, linear_x, linear_y], dim=1), quadratic], dim=1).mul_(LOG2_E)
    columns = torch.cat([exponent.to(dtype),
                         torch.stack([mean_x, mean_y, 0.5 * conics[:, 0], conics[:, 1], 0.5 * conics[:, 2], opacity],
                                     dim=1),
                         _entry_colors(flat, row), flat.depths.index_select(0, row)[:, None],
                         torch.ones_like(row, dtype=dtype)[:, None]], dim=1)
    n_chunks = torch.div(sizes + k_entries - 1, k_entries, rounding_mode="floor")
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    # One all-padding chunk after the lists (its index: `_Records.padding_chunk`), read where a step of
    # several chunks runs past the end of a list.
    total = (int(n_chunks.sum()) if n_chunks.numel() else 0) + 1
    slot = (first_chunk * k_entries - layout.start).index_select(0, bin_of_entry) + torch.arange(
        row.numel(), device=device)
    # Only the padding slots (at most K - 1 per list) are filled; the entries are copied in.
    pad_counts = n_chunks * k_entries - sizes
    pad_first = first_chunk * k_entries + sizes - (pad_counts.cumsum(0) - pad_counts)
    pad = torch.cat([torch.repeat_interleave(pad_first, pad_counts) + torch.arange(
        int(pad_counts.sum()) if pad_counts.numel() else 0, device=device),
        torch.arange((total - 1) * k_entries, total * k_entries, device=device)])
    padding = torch.zeros(1, columns.shape[1], device=device, dtype=dtype)
    padding[0, 0] = -math.inf
    table = torch.empty(total * k_entries, columns.shape[1], device=device, dtype=dtype)
    table.index_copy_(0, slot, columns).index_copy_(0, pad, padding.expand(pad.numel(), -1))
    index = torch.empty(total * k_entries, device=device, dtype=torch.int64)
    index.index_copy_(0, slot, layout.entry_index).index_fill_(0, pad, -1)
    rows = torch.empty(total * k_entries, device=device, dtype=torch.int64)
    rows.index_copy_(0, slot, row).index_fill_(0, pad, 0)
    indefinite = bool(((conics[:, 0] < 0) | (conics[:, 2] < 0) | (conics[:, 0] * conics[:, 2] < conics[:, 1] ** 2)
                       ).any()) if row.numel() else False
    return _Records(table.reshape(total, k_entries, columns.shape[1]), index.reshape(total, k_entries),
                    rows.reshape(total, k_entries), first_chunk, n_chunks, indefinite)


def _entries(block, index) -> _Entries:
    """The chunk's entries from its table rows [A, K, W] and positions [A, K]."""
    return _Entries(index, *block[..., GEOMETRY].unbind(-1))


# The largest float below 1/255 in each dtype: threshold(x, t, 0) keeps x > t, i.e. x >= 1/255.
_BELOW_MIN_ALPHA = {dtype: float(torch.nextafter(torch.tensor(constants.MIN_ALPHA, dtype=dtype),
                                                 torch.tensor(0.0, dtype=dtype)))
                    for dtype in (torch.float32, torch.float64)}


def _chunk_alpha(exponent,        # [A, K, 6] coefficients of z = log2(o) - sigma log2(e)
                 entries: _Entries, grid: _TileGrid, alpha_cap: float, indefinite: bool) -> torch.Tensor:
    """alpha = min(cap, o exp(-sigma)) of every (entry, pixel) pair of a chunk, [A, K, P], 0 where the entry
    is not used (alpha < 1/255, or sigma < 0).

    Four passes over the pairs, against sixteen when dx, dy and sigma are formed per pair: on a 2-core CPU
    (AMD EPYC, torch 2.13) the compositor's time is the number of passes over its [A, K, P] temporaries.
    """
    z = torch.matmul(exponent, grid.basis_t)                                  # [A, K, P]
    negative_sigma = None
    if indefinite:
        log2_opacity = torch.log2(entries.opacity.clamp_min(0))
        negative_sigma = z > log2_opacity[..., None]
    alpha = z.exp2_().clamp_max_(alpha_cap)
    torch.nn.functional.threshold_(alpha, _BELOW_MIN_ALPHA[alpha.dtype], 0.0)
    if negative_sigma is not None:
        alpha.masked_fill_(negative_sigma, 0)
    return alpha


class _ForwardChunk(NamedTuple):
    sums: torch.Tensor          # [A, D + 2, P] sum over the chunk of w_i (colour, depth, 1)
    t_out: torch.Tensor         # [A, P] T after the chunk's last blended entry
    stopped: torch.Tensor       # [A, P] bool, a used entry failed the transmittance stop
    last_index: torch.Tensor    # [A, P] int64 sorted position of the last blended entry, -1 none
    crossed: torch.Tensor | None       # [A, P] bool, T crossed 1/2 within the chunk
    median_depth: torch.Tensor | None  # [A, P] depth of the crossing entry


def _apply_stop(after, weight, t_in):
    """In place: drop each pixel's entries from the first whose T_after fails the stop (weight 0) and freeze its
    T at the last passing value. after, weight: [A, K', P]; t_in: [A, P]."""
    # A 0/1 factor in the compute dtype, used twice: it masks the weights (faster than masked_fill_) and its sum
    # counts the passing entries (exact below 2^24; a bool sum converts to int64 first).
    passing = (after >= constants.TRANSMITTANCE_STOP).to(after.dtype)
    weight.mul_(passing)
    # T is non-increasing along K', so the passing entries are a prefix and the last of them holds the minimum:
    # a count and a gather instead of a masked copy and its minimum (0.49 against 0.74 ms for this function
    # at [240, 56, 64]; AMD EPYC, AVX-512, 2 threads).
    n_passing = passing.sum(dim=1, keepdim=True)                                   # [A, 1, P]
    last_passing = torch.gather(after, 1, n_passing.long().sub_(1).clamp_min_(0)).squeeze(1)
    t_last = torch.where(n_passing.squeeze(1) > 0, torch.minimum(last_passing, t_in), t_in)
    torch.maximum(after, t_last[:, None, :], out=after)


def _forward_chunk(exponent,       # [A, K', 6]
                   entries: _Entries,
                   values,         # [A, K', D + 2] colour, depth, 1
                   t_in,           # [A, P] carried T (0: stopped or outside the image)
                   grid: _TileGrid, alpha_cap: float, indefinite: bool, want_median: bool) -> _ForwardChunk:
    """One step of K' = m K entries (m chunks, `chunks_per_step`) for A sub-tiles: alpha, the within-step
    transmittance prefix, the sums."""
    alpha = _chunk_alpha(exponent, entries, grid, alpha_cap, indefinite)
    one_minus_alpha = 1 - alpha
    after = torch.cumprod(one_minus_alpha, dim=1).mul_(t_in[:, None, :])   # T after entry i, [A, K, P]
    # w_i = alpha_i T_i with T_i the T after entry i - 1 (t_in for the first): one pass, in alpha's buffer.
    alpha[:, 1:].mul_(after[:, :-1])
    alpha[:, 0].mul_(t_in)
    weight = alpha
    # T is non-increasing along the chunk, so a pixel stops in it iff its last T is below the stop; only
    # those pixels' entries from the failing one on are dropped (and their T frozen at the last passing).
    stopped = (after[:, -1] < constants.TRANSMITTANCE_STOP) & (t_in > 0)
    # Where no pixel stops, or one has already (t_in = 0: T is 0 throughout), this changes nothing, so once
    # more than half the sub-tiles have a stopping pixel it runs on the whole step rather than gathering rows
    # (forward on the quick check's t = 0 result 29.8 -> 28.2 ms alone, 28.9 -> 27.5 with the multi-chunk
    # steps; basketball-early 22.4 -> 22.1 alone; 2-core Intel Xeon, medians of 10 interleaved).
    if bool(stopped.any()):
        rows = torch.nonzero(stopped.any(dim=1)).squeeze(1)
        if 2 * rows.numel() > stopped.shape[0]:
            _apply_stop(after, weight, t_in)
        else:
            row_after, row_weight = after[rows], weight[rows]
            _apply_stop(row_after, row_weight, t_in[rows])
            after[rows], weight[rows] = row_after, row_weight
    t_out = after[:, -1]
    # [A, D + 2, K] x [A, K, P]: 0.29 ns per pair, against 1.44 for the [A, P, K] x [A, K, D + 2] product.
    sums = torch.bmm(values.transpose(1, 2).contiguous(), weight)
    # Each blend multiplies T by 1 - alpha <= 1 - 1/255, so T is strictly above its final value before the
    # last blended entry and equal from it on: its position is the count of entries with T_after > T_out
    # (sign and sum: 0.33 ns per pair, argmin along K 5.7).
    last_in_chunk = (after - t_out[:, None, :]).sign_().sum(dim=1).to(torch.int64)
    last_index = torch.where(t_out < t_in, torch.gather(entries.index, 1, last_in_chunk), -1)
    crossed = median_depth = None
    if want_median:
        crossed = (t_in >= constants.MEDIAN_TRANSMITTANCE) & (t_out < constants.MEDIAN_TRANSMITTANCE)
        # T is non-increasing, so the crossing entry is the first whose T_after < 1/2.
        position = (after >= constants.MEDIAN_TRANSMITTANCE).sum(dim=1).clamp_max(entries.index.shape[1] - 1)
        median_depth = torch.gather(values[..., -2], 1, position)
    return _ForwardChunk(sums, t_out, stopped, last_index, crossed, median_depth)


class _Grid(NamedTuple):
    """The compositor's own grid of S x S sub-tiles over the padded image (S divides the tile size)."""

    size: int       # S
    tiles_x: int    # sub-tiles per row, tiles_x * tile_size / S
    tiles_y: int
    per_tile: int   # sub-tiles per side of one binning tile

    @property
    def n_tiles(self) -> int:
        return self.tiles_x * self.tiles_y


def _grid(settings: RenderSettings, sub_tile: int) -> _Grid:
    size = sub_tile if settings.tile_size % sub_tile == 0 else settings.tile_size
    per_tile = settings.tile_size // size
    return _Grid(size, settings.tiles_x * per_tile, settings.tiles_y * per_tile, per_tile)


class _Layout(NamedTuple):
    """Sub-tile lists: each binning tile's sorted list filtered, per S x S sub-tile, by the exact
    ellipse test of binning (the alpha >= 1/255 level set, with binning's margin, against the
    sub-tile's pixel-centre rectangle). An entry dropped for a sub-tile has alpha < 1/255 at all its
    pixels, so the images are unchanged; the walk per pixel shrinks to the entries near it."""

    bins: torch.Tensor         # [B] int64 non-empty sub-bins c * n_sub + sub-tile
    start: torch.Tensor        # [B] int64 into entry_index
    end: torch.Tensor          # [B] int64
    entry_index: torch.Tensor  # [E] int64 position in sorted_ids, increasing within each sub-bin
    origin_x: torch.Tensor     # [B] float sub-tile origin in pixels
    origin_y: torch.Tensor
    inside: torch.Tensor       # [B, P] bool pixel inside the image


# Entries filtered per sub-tile in one piece (bounds the [entries, sub-tiles] temporaries).
FILTER_PIECE = 1 << 18


@torch.no_grad()
def _layout(tile_ranges, sorted_ids, flat: _Inputs, settings: RenderSettings, grid: _Grid) -> _Layout:
    from .binning import component_rows, ellipse_levels, min_quadratic_of_components

    device, dtype = flat.means.device, flat.means.dtype
    ranges = tile_ranges.to(torch.int64)
    counts = (ranges[:, 1] - ranges[:, 0]).clamp_min(0)
    bin_of_entry = torch.repeat_interleave(torch.arange(ranges.shape[0], device=device), counts)
    ends = torch.cumsum(counts, 0)
    offsets = ends - counts
    position = torch.arange(bin_of_entry.numel(), device=device) - offsets[bin_of_entry] + ranges[bin_of_entry, 0]
    ts, s, per = settings.tile_size, grid.size, grid.per_tile
    local = torch.arange(per * per, device=device)
    local_x, local_y = (local % per) * s, torch.div(local, per, rounding_mode="floor") * s   # [S2] offsets
    # Per bin and sub-tile (a few thousand at most), then gathered per entry: the pixel-centre rectangle, whether
    # the sub-tile lies in the image, and its sub-bin; formed per entry they cost ~25 more ops on [entries, S2]
    # (layout 3.41 -> 2.49 ms on basketball-early, 4.66 -> 3.57 on the quick check's t = 0 result, 17.9 -> 14.0
    # on bench `random`; the same lists; 2-core Intel Xeon, medians of 25 interleaved).
    bin_ids = torch.arange(ranges.shape[0], device=device)
    bin_tile = bin_ids % settings.n_tiles
    # Sub-tile-major [S2, ...] temporaries with the per-entry components as contiguous [entries] rows, so every
    # op of the filter runs along the entries rather than over the strided columns of [entries, 3] gathers:
    # the layout took 2.8 against 3.4 ms on the quick check's t = 0 result and 6.3 against 8.7 ms on bench
    # `random` (the same lists; AMD EPYC, AVX-512, 2 threads, medians of 40 interleaved).
    x0 = local_x[:, None] + (bin_tile % settings.tiles_x * ts)[None, :]                 # [S2, bins] int
    y0 = local_y[:, None] + (torch.div(bin_tile, settings.tiles_x, rounding_mode="floor") * ts)[None, :]
    rectangles = torch.stack([x0 + 0.5, torch.clamp_max(x0 + s, settings.width) - 0.5,
                              y0 + 0.5, torch.clamp_max(y0 + s, settings.height) - 0.5]).to(dtype)  # [4, S2, bins]
    in_image = (x0 < settings.width) & (y0 < settings.height)
    sub_bin_of = (torch.div(bin_ids, settings.n_tiles, rounding_mode="floor")[None, :] * grid.n_tiles
                  + torch.div(y0, s, rounding_mode="floor") * grid.tiles_x + torch.div(x0, s, rounding_mode="floor"))
    conic_rows, mean_rows = component_rows(flat.conics), component_rows(flat.means)    # [3, CN], [2, CN]
    levels = ellipse_levels(flat.opacities)
    kept_entry, kept_bin = [], []
    for piece in _tile_aligned_pieces(ends, FILTER_PIECE):
        tile_bin, pos = bin_of_entry[piece], position[piece]
        row = sorted_ids.index_select(0, pos).to(torch.int64)
        # gather along the bins: 0.11 against 1.1 ms for index_select(2) ([4, 4, 2000] -> [4, 4, 40000]).
        x_low, x_high, y_low, y_high = torch.gather(
            rectangles, 2, tile_bin.expand(*rectangles.shape[:2], -1)).unbind(0)              # [S2, e] each
        conic_a, conic_b, conic_c = conic_rows.index_select(1, row).unbind(0)               # [e] each
        mean_x, mean_y = mean_rows.index_select(1, row).unbind(0)
        q_min = min_quadratic_of_components(conic_a, conic_b, conic_c, mean_x, mean_y, (x_low, x_high),
                                            (y_low, y_high))
        hit = q_min <= levels.index_select(0, flat.opacity_index(row))
        hit &= torch.gather(in_image, 1, tile_bin.expand(in_image.shape[0], -1))
        # Sub-tile first, then entry: the entries run tile by tile in list order and no tile straddles two
        # pieces, so each sub-bin's entries come out contiguous and in list order, with no sort (a stable
        # sort of the kept pairs by sub-bin took 0.8 of the layout's 4.9 ms on basketball-early, Intel Xeon).
        sub, entry = torch.nonzero(hit, as_tuple=True)
        kept_bin.append(sub_bin_of[sub, tile_bin[entry]])
        kept_entry.append(pos[entry])
    sub_bin = torch.cat(kept_bin) if kept_bin else torch.zeros(0, dtype=torch.int64, device=device)
    entry_index = torch.cat(kept_entry) if kept_entry else sub_bin
    # Grouped by sub-bin (not sorted by it: the bins come in piece, sub-tile, tile order).
    bins, sizes = torch.unique_consecutive(sub_bin, return_counts=True)
    end = torch.cumsum(sizes, 0)
    start = end - sizes
    sub_tile = bins % grid.n_tiles
    gx, gy = sub_tile % grid.tiles_x, torch.div(sub_tile, grid.tiles_x, rounding_mode="floor")
    p = torch.arange(s * s, device=device)
    px = gx[:, None] * s + (p % s)[None, :]
    py = gy[:, None] * s + torch.div(p, s, rounding_mode="floor")[None, :]
    inside = (px < settings.width) & (py < settings.height)
    return _Layout(bins, start, end, entry_index, (gx * s).to(dtype), (gy * s).to(dtype), inside)


def _tile_aligned_pieces(ends: torch.Tensor, piece: int) -> list[slice]:
    """Slices of the entries of about `piece` each that end at tile-list boundaries (`ends`: [bins] cumulative
    list ends); a list longer than `piece` gets a piece of its own."""
    total = int(ends[-1]) if ends.numel() else 0
    pieces, first = [], 0
    while first < total:
        if total - first <= piece:
            last = total
        else:
            index = int(torch.searchsorted(ends, first + piece, right=True)) - 1
            last = int(ends[index]) if index >= 0 and int(ends[index]) > first else int(
                ends[torch.searchsorted(ends, first, right=True)])
        pieces.append(slice(first, last))
        first = last
    return pieces


def chunk_size(layout: _Layout) -> int:
    """K for these lists: the median list split into equal chunks of at most DEFAULT_CHUNK_ENTRIES (a multiple
    of 4), so that the padding of the last chunk stays small. The bench `random` scene's sub-tile lists
    (median 39 entries) padded to K = 32 held 1.6x their entries; at K = 20, 1.2x."""
    if not layout.bins.numel():
        return DEFAULT_CHUNK_ENTRIES
    median = max(1, int((layout.end - layout.start).median()))
    per_chunk = math.ceil(median / math.ceil(median / DEFAULT_CHUNK_ENTRIES))
    return min(DEFAULT_CHUNK_ENTRIES, 4 * math.ceil(per_chunk / 4))


def read_l2_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of one core's L2 cache from Linux sysfs (`index*/level`, `index*/size` such as "2048K"),
    FALLBACK_L2_BYTES where it cannot be read."""
    try:
        indices = sorted(cache_dir.glob("index*"))
    except OSError:
        return FALLBACK_L2_BYTES
    for index in indices:
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            size = int(text.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue                       # an unreadable entry: an L2 may still be listed later
        if size > 0:
            return size
    return FALLBACK_L2_BYTES


@functools.cache
def l2_cache_bytes() -> int:
    """This machine's `read_l2_cache_bytes`, read once."""
    return read_l2_cache_bytes()


def tile_batch_for(k_entries: int, pixels: int, l2_bytes: int | None = None, element_size: int = 4) -> int:
    """Sub-tiles per batch: as many as make one [A, K, P] temporary of `element_size`-byte elements twice the
    size of the L2 cache (`l2_bytes`, default this machine's), at least MIN_TILE_BATCH. The best batch follows
    the cache: 128 at K = 32, P = 64 on the 2-core AMD EPYC (512 KiB L2 per core; 256: 74 against 70 ms, see
    above), while on the 2-core Intel Xeon (2 MiB L2, 2 threads, 2026-12-03, compositor forward + backward,
    interleaved) 128 is the slowest of 128-1024: basketball-early 47.6 -> 46.7-47.1 ms median, the quick
    check's t = 0 result (33k Gaussians, K = 28) 64.0 -> 58.7-61.0, bench `random` (K = 20) 205.9 ->
    187.7-190.6. In float32 the rule gives 128 on the EPYC and 512-819 on the Xeon. Fewer batches also mean
    fewer chunk steps, i.e. fewer ops per render."""
    budget = TEMPORARY_BYTES_PER_L2_BYTE * (l2_bytes or l2_cache_bytes()) // element_size
    return max(MIN_TILE_BATCH, budget // max(1, k_entries * pixels))


def _tile_batch(k_entries: int, pixels: int, dtype: torch.dtype, device: torch.device) -> int:
    """`tile_batch_for` this machine's L2 on the CPU, FALLBACK_L2_BYTES elsewhere."""
    l2 = l2_cache_bytes() if device.type == "cpu" else FALLBACK_L2_BYTES
    return tile_batch_for(k_entries, pixels, l2, dtype.itemsize)


def _to_tiles(image: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """[C, H, W, X] -> [C * n_sub, P, X] (zero padding beyond the image)."""
    c, h, w, x = image.shape
    s = grid.size
    padded = torch.nn.functional.pad(image, (0, 0, 0, grid.tiles_x * s - w, 0, grid.tiles_y * s - h))
    return padded.reshape(c, grid.tiles_y, s, grid.tiles_x, s, x).permute(0, 1, 3, 2, 4, 5).reshape(
        c * grid.n_tiles, s * s, x)


def _to_image(tiles: torch.Tensor, n_cameras: int, grid: _Grid, settings: RenderSettings) -> torch.Tensor:
    """[C * n_sub, P, X] -> [C, H, W, X]."""
    s = grid.size
    x = tiles.shape[-1]
    image = tiles.reshape(n_cameras, grid.tiles_y, grid.tiles_x, s, s, x).permute(0, 1, 3, 2, 4, 5).reshape(
        n_cameras, grid.tiles_y * s, grid.tiles_x * s, x)
    return image[:, :settings.height, :settings.width]


def _entry_colors(flat: _Inputs, row: torch.Tensor) -> torch.Tensor:
    return flat.colors.index_select(0, row % flat.n_gaussians if flat.shared_colors else row)


def chunks_per_step(remaining: list[int], budget: int, max_entries: int, k_entries: int) -> int:
    """How many consecutive chunks (m) the forward walk's next step takes at once, as one [A, m K, P] chunk.

    remaining: [A] chunks left in each active sub-list, non-increasing. A step costs a fixed ~70 us in the
    chunk maths (its ~40 ops) and ~100-240 us in the walk's bookkeeping, plus ~6 us per sub-tile chunk
    (basketball-early, 2-core Intel Xeon, 2 threads), and the walk's tail is a few long lists. m is the largest
    value with A m <= budget (sub-tile chunks: the batch's temporaries), m K <= max_entries and at most
    STEP_WASTE_PER_SAVED_STEP padding chunks (lists shorter than m run on into the all-padding chunk) per step
    saved. Forward on that scene 22.4 -> 20.6 ms, the quick check's t = 0 result 29.8 -> 28.9 (medians of 10
    interleaved; with the whole-step stop of `_forward_chunk` too: 20.2 / 27.5; max_entries 256 or a waste
    allowance of 16 gave the same, an allowance of 4 was slower). The backward walk keeps one chunk per step:
    there merged steps were slower (the triangular product grows as (m K)^2, and the spare-row bookkeeping
    they need cost ~1 ms)."""
    a = len(remaining)
    limit = min(budget // max(1, a), max_entries // k_entries, remaining[0]) if a else 1
    for m in range(limit, 1, -1):
        allowed = STEP_WASTE_PER_SAVED_STEP * (m - 1)
        waste = 0
        for left in reversed(remaining):          # shortest first
            if left >= m or waste > allowed:
                break
            waste += m - left
        if waste <= allowed:
            return m
    return 1


class _ForwardResult(NamedTuple):
    sums: torch.Tensor          # [B_all, P, D + 2]: colour sums, depth sum, weight sum (alpha)
    final: torch.Tensor         # [B_all, P] final transmittance (1 outside any bin)
    last: torch.Tensor          # [B_all, P] int32 last blended index, -1 none
    median: torch.Tensor | None  # [B_all, P]


@torch.no_grad()
def _forward_tiles(records: _Records, layout: _Layout, n_bins: int, settings: RenderSettings, grid: _Grid,
                   want_median: bool, chunk_entries: int, tile_batch: int) -> _ForwardResult:
    device, dtype = records.table.device, records.table.dtype
    n_values = records.table.shape[-1] - VALUES
    p = grid.size ** 2
    pixels = _tile_grid(grid.size, device, dtype)
    sums = torch.zeros(n_bins, p, n_values, device=device, dtype=dtype)
    final = torch.ones(n_bins, p, device=device, dtype=dtype)
    last = torch.full((n_bins, p), -1, device=device, dtype=torch.int32)
    median = torch.zeros(n_bins, p, device=device, dtype=dtype) if want_median else None
    # Longest lists first, so that a batch's sub-tiles need similar numbers of chunks.
    order = torch.argsort(layout.end - layout.start, descending=True, stable=True)
    steps = torch.arange(max(1, MAX_STEP_ENTRIES // chunk_entries), device=device)
    for first in range(0, order.numel(), tile_batch):
        batch = order[first:first + tile_batch]
        bins, first_chunk, n_chunks = layout.bins[batch], records.first_chunk[batch], records.n_chunks[batch]
        n = bins.numel()
        # Carried T: 0 once a pixel has stopped (or lies outside the image), so nothing blends there.
        carried = layout.inside.index_select(0, batch).to(dtype)
        stored = torch.zeros_like(carried)                # T of the pixels that stopped, when they did
        batch_sums = torch.zeros(n, n_values, p, device=device, dtype=dtype)
        batch_last = torch.full((n, p), -1, device=device, dtype=torch.int64)
        batch_median = torch.zeros(n, p, device=device, dtype=dtype) if want_median else None
        active = torch.arange(n, device=device)
        chunk = 0
        while active.numel():
            remaining = n_chunks[active] - chunk
            remaining_list = remaining.tolist()
            m = chunks_per_step(remaining_list, tile_batch, MAX_STEP_ENTRIES, chunk_entries)
            chunk_ids = first_chunk[active] + chunk
            if m > 1:                                                         # m consecutive chunks per list
                chunk_ids = chunk_ids[:, None] + steps[:m]
                if remaining_list[-1] < m:
                    chunk_ids = torch.where(steps[:m] < remaining[:, None], chunk_ids, records.padding_chunk)
                chunk_ids = chunk_ids.reshape(-1)
            n_active = remaining.numel()
            block = records.table.index_select(0, chunk_ids).view(n_active, m * chunk_entries, -1)  # [A, m K, W]
            t_in = carried.index_select(0, active)                            # [A, P]
            step = _forward_chunk(block[..., EXPONENT],
                                  _entries(block, records.index.index_select(0, chunk_ids).view(n_active, -1)),
                                  block[..., VALUES:], t_in, pixels, settings.alpha_cap, records.indefinite,
                                  want_median)
            batch_sums.index_add_(0, active, step.sums)
            batch_last.index_copy_(0, active, torch.where(step.last_index >= 0, step.last_index,
                                                          batch_last.index_select(0, active)))
            if want_median:
                batch_median.index_copy_(0, active, torch.where(step.crossed, step.median_depth,
                                                                batch_median.index_select(0, active)))
            t_next = step.t_out
            if bool(step.stopped.any()):
                stored.index_copy_(0, active, torch.where(step.stopped, step.t_out, stored.index_select(0, active)))
                t_next = torch.where(step.stopped, 0, step.t_out)
            carried.index_copy_(0, active, t_next)
            more = (remaining > m) & (t_next > 0).any(dim=1)
            active = active[more]
            chunk += m
        sums.index_copy_(0, bins, batch_sums.transpose(1, 2))
        final.index_copy_(0, bins, torch.where(carried > 0, carried, stored))
        last.index_copy_(0, bins, batch_last.to(torch.int32))
        if want_median:
            median.index_copy_(0, bins, batch_median)
    return _ForwardResult(sums, final, last, median)


class _Options(NamedTuple):
    settings: RenderSettings
    outputs: tuple
    absgrad: bool
    densify_channels: int | None
    color_grad_channels: int | None
    deterministic: bool
    chunk_entries: int | None
    tile_batch: int | None
    sub_tile: int


@dataclass(frozen=True, eq=False)
class _Call:
    """What of one `composite` call receives no gradient: the tile lists, the options and the tensors
    backward adds into. One autograd argument, so backward returns (*grads, None)."""

    tile_ranges: torch.Tensor                  # [C * n_tiles, 2] int32
    sorted_ids: torch.Tensor                   # [M] int32
    options: _Options
    densify_grad: torch.Tensor | None          # [C, N, 2]
    means2d_for_absgrad: torch.Tensor | None   # [C, N, 2]


class _CompositeFunction(torch.autograd.Function):
    """Forward: `_forward_tiles`. Backward: the vector-Jacobian product below, chunk by chunk.

    Per pixel, blended list i = 1..n (front to back), w_i = alpha_i T_i, upstream g_C [D], g_A (alpha
    image), g_S (depth sum S = sum_i w_i z_i); the depth output is Z = S / A (A = 1 - T_final), so
    g_S = g_Z / A and g_A gains -g_Z Z / A. With q_i = g_C . c_i + g_S z_i:
        g_c_i = w_i g_C,  g_z_i = w_i g_S,
        g_alpha_i = T_i q_i - (sum_{j > i} w_j q_j + T_final (g_C . bg - g_A)) / (1 - alpha_i).
    alpha = min(cap, o G), G = exp(-sigma): below the cap g_o = G g_alpha and g_sigma = -o G g_alpha
    (above it min() passes nothing); sigma = (a dx^2 + c dy^2) / 2 + b dx dy, d = mean - pixel centre:
        g_conic = sum_pixels g_sigma (dx^2 / 2, dx dy, dy^2 / 2),
        g_mean = sum_pixels g_sigma (a dx + b dy, b dx + c dy),  g_background = sum_pixels T_final g_C.
    The pixel sums of g_sigma (1, dx, dy, dx^2, dx dy, dy^2) come from one matrix product of g_sigma
    with the sub-tile's pixel basis (1, u, v, u^2, u v, v^2) (summed in float64 afterwards), expanded
    around the mean once every entry has been walked.
    densify_grad repeats g_alpha with q restricted to the first k colour channels (no depth or alpha
    term, background restricted likewise).
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, colors, depths, backgrounds, call: _Call):
        options, tile_ranges, sorted_ids = call.options, call.tile_ranges, call.sorted_ids
        settings = options.settings
        n_cameras = means2d.shape[0]
        flat = _flat_inputs(means2d, conics, opacities, colors, depths)
        grid = _grid(settings, options.sub_tile)
        layout = _layout(tile_ranges, sorted_ids, flat, settings, grid)
        chunk_entries = options.chunk_entries or chunk_size(layout)
        tile_batch = options.tile_batch or _tile_batch(chunk_entries, grid.size ** 2, means2d.dtype, means2d.device)
        records = _records(flat, sorted_ids, layout, grid.size, chunk_entries)
        result = _forward_tiles(records, layout, n_cameras * grid.n_tiles, settings, grid,
                                "median_depths" in options.outputs, chunk_entries, tile_batch)
        n_channels = flat.colors.shape[-1]
        image = _to_image(result.sums, n_cameras, grid, settings)                  # [C, H, W, D + 2]
        final = _to_image(result.final[..., None], n_cameras, grid, settings)      # [C, H, W, 1]
        colors_out = image[..., :n_channels]
        if backgrounds is not None:
            colors_out = colors_out + final * backgrounds[:, None, None, :]
        alphas = image[..., n_channels + 1:].contiguous()
        depth_sums = image[..., n_channels:n_channels + 1]
        covered = alphas > 0
        depths_out = torch.where(covered, depth_sums / torch.where(covered, alphas, 1), 0)
        median = None
        if result.median is not None:
            median = _to_image(result.median[..., None], n_cameras, grid, settings).contiguous()
            ctx.mark_non_differentiable(median)
        ctx.save_for_backward(means2d, conics, opacities, colors, depths, backgrounds, result.final, result.last,
                              alphas, depths_out)
        ctx.options, ctx.densify_grad, ctx.means2d_for_absgrad = options, call.densify_grad, call.means2d_for_absgrad
        ctx.grid, ctx.layout, ctx.records, ctx.tile_batch = grid, layout, records, tile_batch
        ctx.n_sorted = sorted_ids.numel()
        return colors_out.contiguous(), alphas, depths_out.contiguous(), median

    @staticmethod
    def backward(ctx, grad_colors, grad_alphas, grad_depths, _grad_median):
        with backward_stage("compositing_backward"):
            return _backward(ctx, grad_colors, grad_alphas, grad_depths)


def _backward(ctx, grad_colors, grad_alphas, grad_depths):
    means2d, conics, opacities, colors, depths, backgrounds, final_tiles, last_tiles, alphas, depths_out = (
        ctx.saved_tensors)
    options = ctx.options
    settings = options.settings
    n_cameras, n = means2d.shape[:2]
    dtype, device = means2d.dtype, means2d.device
    flat = _flat_inputs(means2d, conics, opacities, colors, depths)
    n_channels = flat.colors.shape[-1]
    image_shape = (n_cameras, settings.height, settings.width)

    def upstream(grad, width):
        return torch.zeros(*image_shape, width, dtype=dtype, device=device) if grad is None else grad

    grad_colors = upstream(grad_colors, n_channels)
    grad_alphas = upstream(grad_alphas, 1)
    grad_depths = upstream(grad_depths, 1)
    # Z = S / A: back to the depth sum and the alpha image (0 where nothing was blended).
    covered = alphas > 0
    safe_alphas = torch.where(covered, alphas, 1)
    grad_depth_sums = torch.where(covered, grad_depths / safe_alphas, 0)
    grad_alphas = grad_alphas - torch.where(covered, grad_depths * depths_out / safe_alphas, 0)
    k = options.densify_channels
    if backgrounds is not None:
        background_dot = (grad_colors * backgrounds[:, None, None, :]).sum(-1, keepdim=True)
        background_dot_k = ((grad_colors[..., :k] * backgrounds[:, None, None, :k]).sum(-1, keepdim=True)
                            if k is not None else None)
    else:
        background_dot = torch.zeros_like(grad_alphas)
        background_dot_k = torch.zeros_like(grad_alphas) if k is not None else None
    # Per-pixel upstream in tile layout: [g_C (D), g_S, T_final (g_C . bg - g_A), (T_final g_C_k . bg_k)].
    grid, layout = ctx.grid, ctx.layout
    final_image = _to_image(final_tiles[..., None], n_cameras, grid, settings)
    pixel_terms = [grad_colors, grad_depth_sums, final_image * (background_dot - grad_alphas)]
    if k is not None:
        pixel_terms.append(final_image * background_dot_k)
    pixel = _to_tiles(torch.cat(pixel_terms, dim=-1), grid)           # [B_all, P, D + 2 (+ 1)]

    # Per-entry sums, written once per entry (each list entry lies in exactly one chunk): the pixel moments
    # of -g_sigma (6), sum_p w (g_C, g_S) (D + 1), (absgrad 2), (densify head moments of -g_sigma 6), in the
    # compute dtype, quantity first ([sums_width, walked chunks, K]) and each chunk's entries back to front,
    # as the chunk maths gives them. After the walk they become the
    # entries' gradients at once (in float64), then are summed into the Gaussians' rows by one reduction:
    # [2 mean + 3 conic + 1 opacity + D colour + 1 depth (+ 2 absgrad) (+ 2 densify)].
    records = ctx.records
    want_abs = options.absgrad
    # The densify head needs only the moments (1, u, v) of its g_sigma: its mean gradient, not its conic's.
    sums_width = 6 + n_channels + 1 + (2 if want_abs else 0) + (3 if k is not None else 0)
    width = 6 + n_channels + 1 + (2 if want_abs else 0) + (2 if k is not None else 0)

    pixels = _tile_grid(grid.size, device, dtype)
    k_entries = records.table.shape[1]
    # Entries of each sub-list up to the sub-tile's last blended one (positions increase along a list).
    n_sub_bins = layout.bins.numel()
    bin_of_entry = torch.repeat_interleave(torch.arange(n_sub_bins, device=device), layout.end - layout.start)
    max_last = last_tiles[layout.bins].amax(dim=1).to(torch.int64) if n_sub_bins else layout.start
    walked_all = torch.bincount(bin_of_entry[layout.entry_index <= max_last[bin_of_entry]], minlength=n_sub_bins)
    chunks_all = torch.div(walked_all + k_entries - 1, k_entries, rounding_mode="floor")
    # One row of entry gradients per walked chunk, each written exactly once (so no zero fill), in walk order:
    # each step's active sub-tiles take the next rows, a slice write (the sub-tiles still walking are a prefix).
    n_walked = int(chunks_all.sum()) if n_sub_bins else 0
    entry_sums = torch.empty(sums_width, n_walked, k_entries, dtype=dtype, device=device)
    slices = [slice(0, 6), slice(6, 7 + n_channels)]
    slices += [slice(7 + n_channels, 9 + n_channels)] if want_abs else []
    slices += [slice(sums_width - 3, sums_width)] if k is not None else []
    parts_out = [entry_sums[part] for part in slices]                     # views, written in place
    walked_chunks = []                                                    # table chunks of the rows, per step
    written = 0
    exclusive_sums = torch.cat([torch.ones(k_entries, k_entries, device=device, dtype=dtype).tril_(-1),
                                torch.ones(1, k_entries, device=device, dtype=dtype)]).expand(
        ctx.tile_batch, k_entries + 1, k_entries)                         # one view for bmm, not a copy
    # Most chunks first: within a batch the sub-tiles still walking at step s are then a prefix.
    order = torch.argsort(chunks_all, descending=True, stable=True)
    n_colors_depth = n_channels + 1
    # Sorted positions compared as floats: integers are exact below 2^24 in float32 (else float64).
    position_dtype = dtype if dtype == torch.float64 or ctx.n_sorted < 2 ** 24 else torch.float64
    for first in range(0, n_sub_bins, ctx.tile_batch):
        batch = order[first:first + ctx.tile_batch]
        bins, first_chunk = layout.bins[batch], records.first_chunk[batch]
        n_chunks = chunks_all[batch]
        counts = torch.bincount(n_chunks, minlength=int(n_chunks[0]) + 1 if n_chunks.numel() else 1).tolist()
        last_next = last_tiles.index_select(0, bins).to(position_dtype) + 1   # [T, P] last blended + 1
        tile_pixel = pixel.index_select(0, bins)
        terms = tile_pixel[..., :n_colors_depth].contiguous()                 # [T, P, D + 1] (g_C, g_S)
        terms_by_channel = terms.transpose(1, 2).contiguous()                 # [T, D + 1, P]
        # T after the chunk; 1 outside the image, where nothing blends (the backward divides by T).
        current = torch.where(layout.inside.index_select(0, batch), final_tiles.index_select(0, bins), 1)
        # sum over the entries behind the chunk of w_j q_j, plus the background term T_final (g_C . bg - g_A)
        # that every entry's g_alpha carries (so it starts there).
        behind = tile_pixel[..., n_colors_depth].clone()
        behind_k = tile_pixel[..., n_colors_depth + 1].clone() if k is not None else None
        n_active = len(batch)
        for step in range(len(counts) - 1):
            n_active -= counts[step]                                          # sub-tiles with > step chunks
            if n_active <= 0:
                break
            active = slice(0, n_active)
            chunk = n_chunks[active] - 1 - step
            # Back to front within the chunk too: every [A, K, P] temporary below runs from the chunk's
            # last entry to its first, so reverse products and sums are plain cumprod / cumsum.
            chunk_ids = first_chunk[active] + chunk
            block = records.table.index_select(0, chunk_ids).flip(1)          # [A, K, W], back to front
            entries = _entries(block, records.index.index_select(0, chunk_ids).flip(1))
            result = _backward_chunk(
                block[..., EXPONENT], entries, entries.index.to(position_dtype),
                block[..., VALUES:-1].contiguous(), last_next[active], current[active], behind[active],
                None if k is None else behind_k[active], terms[active], terms_by_channel[active], pixels,
                settings.alpha_cap, records.indefinite, k, want_abs, exclusive_sums)
            behind[active] += result.behind_add
            current[active] = result.t_first
            if k is not None:
                behind_k[active] += result.behind_k_add
            parts = [result.moments, result.color_depth.transpose(0, 1)]
            parts += [result.grad_abs] if want_abs else []
            parts += [result.moments_k] if k is not None else []
            for target, part in zip(parts_out, parts):
                target[:, written:written + n_active] = part
            walked_chunks.append(chunk_ids)
            written += n_active
    walked_rows = torch.cat(walked_chunks) if walked_chunks else torch.zeros(0, dtype=torch.int64, device=device)
    # The finish runs on one contiguous row per quantity ([quantities, entries]): elementwise float64 maths on
    # the columns of [entries, quantities] took 4.6x as long (36,000 entries, 2-core Intel Xeon, 2 threads).
    # Only the geometry columns are gathered: 0.4-0.5 against 1.1 ms for the whole rows ([1600, 28, 20] table,
    # 2-core Intel Xeon).
    geometry = _Entries(None, *records.table[..., GEOMETRY].index_select(0, walked_rows).permute(
        2, 0, 1).contiguous().flip(2).reshape(6, -1))
    entry_sums = entry_sums.reshape(sums_width, -1).to(torch.float64)   # [sums_width, entries]
    entry_sums[:6].neg_()                                               # moments of g_sigma
    if k is not None:
        entry_sums[-3:].neg_()
    grad_mean, grad_conic = _mean_and_conic_gradients(entry_sums[:6], geometry)
    # g_o = sum G g_alpha = -sum g_sigma / o (o > 0 wherever g_sigma != 0).
    safe_opacity = torch.where(geometry.opacity > 0, geometry.opacity, 1)
    parts = [*grad_mean, *grad_conic, -entry_sums[0] / safe_opacity, *entry_sums[6:6 + n_channels + 1]]
    parts += [*entry_sums[7 + n_channels:9 + n_channels]] if want_abs else []
    parts += [*_mean_and_conic_gradients(entry_sums[-3:], geometry)[0]] if k is not None else []
    rows = n_cameras * n
    # [width, rows], summed along dim 1: 0.5 ms against 1.6 for [entries, width] rows summed along dim 0
    # (36,000 entries, 16 quantities, 2-core Intel Xeon, 2 threads); the callers take transposed views.
    row_grads = torch.zeros(width, rows, dtype=torch.float64, device=device)
    # Padding entries carry zero gradients (alpha = 0): adding them to row 0 changes nothing.
    scatter_add(row_grads, records.row.index_select(0, walked_rows).flip(1).reshape(-1), torch.stack(parts),
                options.deterministic, dim=1)
    row_grads = row_grads.T
    grad_means = row_grads[:, 0:2]
    grad_conics = row_grads[:, 2:5]
    grad_opacity_rows = row_grads[:, 5].to(dtype)
    grad_color_rows = row_grads[:, 6:6 + n_channels]
    if flat.shared_colors:
        grad_color_rows = grad_color_rows.reshape(n_cameras, n, n_channels).sum(0)
    grad_color_rows = grad_color_rows.to(dtype)
    grad_depths_flat = row_grads[:, 6 + n_channels].to(dtype)
    column = 7 + n_channels
    grad_abs = None
    if want_abs:
        grad_abs, column = row_grads[:, column:column + 2].to(dtype), column + 2
    grad_densify = row_grads[:, column:column + 2] if k is not None else None

    kc = options.color_grad_channels
    if kc is not None:
        grad_color_rows[:, kc:] = 0
    grad_backgrounds = None
    if backgrounds is not None and ctx.needs_input_grad[5]:
        grad_backgrounds = (final_image * grad_colors).sum(dim=(1, 2))
    if grad_abs is not None:
        target = ctx.means2d_for_absgrad
        if target is not None:
            absgrad = grad_abs.reshape(n_cameras, n, 2).to(target.dtype)
            previous = getattr(target, "absgrad", None)
            target.absgrad = absgrad if previous is None else previous + absgrad
    if grad_densify is not None and ctx.densify_grad is not None:
        ctx.densify_grad.add_(grad_densify.reshape(n_cameras, n, 2).to(ctx.densify_grad.dtype))
    grad_opacities = grad_opacity_rows.reshape(n_cameras, n)
    if flat.shared_opacities:
        grad_opacities = grad_opacities.sum(0)
    grad_colors_in = grad_color_rows.reshape(colors.shape)
    return (grad_means.to(dtype).reshape(n_cameras, n, 2), grad_conics.to(dtype).reshape(n_cameras, n, 3),
            grad_opacities, grad_colors_in, grad_depths_flat.reshape(n_cameras, n), grad_backgrounds, None)


class _BackwardChunk(NamedTuple):
    """Per-entry sums as the chunk maths gives them: quantity first over the chunk ([X, A, K]), except the
    colour / depth sums, which a per-sub-tile product gives as [A, D + 1, K]."""

    moments: torch.Tensor         # [6, A, K] sum_pixels -g_sigma (1, u, v, u^2, u v, v^2)
    color_depth: torch.Tensor     # [A, D + 1, K] sum_pixels w (g_C, g_S)
    t_first: torch.Tensor         # [A, P] T before the chunk's first entry
    behind_add: torch.Tensor      # [A, P] sum over the chunk of w q
    grad_abs: torch.Tensor | None       # [2, A, K]
    moments_k: torch.Tensor | None      # [3, A, K] (1, u, v) moments for the densify head (first k channels)
    behind_k_add: torch.Tensor | None   # [A, P]


def _backward_chunk(exponent,      # [A, K, 6] (entries back to front along K)
                    entries: _Entries,
                    entry_position,  # [A, K] entries.index as floats (exact: see _backward)
                    values,        # [A, K, D + 1] colour, depth
                    last_next,     # [A, P] last blended sorted position + 1, as floats
                    t_after,       # [A, P] T after the chunk
                    behind,        # [A, P] background term + sum_{j after the chunk} w_j q_j
                    behind_k,      # [A, P] or None, the same over the first k channels
                    terms,         # [A, P, D + 1] per-pixel upstream (g_C, g_S)
                    terms_by_channel,  # [A, D + 1, P] the same, channels first (contiguous)
                    grid: _TileGrid, alpha_cap: float, indefinite: bool, k: int | None,
                    want_abs: bool,
                    exclusive_sums) -> _BackwardChunk:  # [>= A, K + 1, K] strictly lower triangle of ones, then ones
    """The vector-Jacobian product of one chunk, back to front (formulas: `_CompositeFunction`).

    With T_i before and A_i = T_i (1 - alpha_i) after entry i, w_i = alpha_i T_i and X_i = background
    term + sum_{j > i} w_j q_j, below the cap (alpha = o G) the exponent's gradient is
        -g_sigma_i = o G_i g_alpha_i = w_i q_i - X_i alpha_i / (1 - alpha_i) = w_i (q_i - X_i / A_i),
    and 0 at the cap or where nothing blends (w = 0): one expression, no per-pair masks.
    """
    alpha = _chunk_alpha(exponent, entries, grid, alpha_cap, indefinite)
    # Blended entries only (position <= last): a 0/1 factor from float arithmetic, 0.34 ns per pair against
    # 2.9 for an integer comparison and masked_fill_ (AMD EPYC, torch 2.13, 1 thread).
    alpha.mul_((last_next[:, None, :] - entry_position[..., None]).clamp_(0, 1))
    one_minus_alpha = 1 - alpha
    reverse = torch.cumprod(one_minus_alpha, dim=1)                          # prod_{j >= i} (1 - alpha_j)
    before = torch.div(t_after[:, None, :], reverse, out=reverse)            # T_i
    below_cap = None
    if float(alpha.amax()) >= alpha_cap:                                     # min() passes nothing at the cap
        below_cap = (alpha < alpha_cap).to(alpha.dtype)
    weight = alpha.mul_(before)                                              # w_i (alpha is not used below)
    after = one_minus_alpha.mul_(before)                                     # A_i

    def exponent_gradient(values_h, terms_h, behind_h):
        """-g_sigma [A, K, P] and the chunk's sum of w q for one upstream (all channels, or the first k)."""
        projected = torch.bmm(values_h, terms_h.transpose(1, 2))               # q_i: [A, K, P]
        contribution = projected.mul_(weight)                                  # w_i q_i
        # sum_{j < i} (the entries behind i: the chunk runs back to front) and, as row K, the chunk's sum, as
        # one matrix product: 48 against 91 us for cumsum along K and 20 for the subtraction it then needs
        # ([128, 32, 64] float32, 2-core Intel Xeon, 2 threads); bmm of an expanded view rather than a
        # broadcasting matmul (7 aten ops per call).
        sums = torch.bmm(exclusive_sums[:contribution.shape[0]], contribution)  # [A, K + 1, P]
        chunk_sum = sums[:, -1]
        later = sums[:, :-1].add_(behind_h[:, None, :]).div_(after)           # X_i / A_i
        gradient = torch.addcmul(contribution, weight, later, value=-1)       # w (q - X / A)
        if below_cap is not None:
            gradient.mul_(below_cap)
        return gradient, chunk_sum

    def pixel_moments(negative_gradient, n_moments=6):
        """sum over the pixels of -g_sigma (1, u, v, u^2, u v, v^2), or its first `n_moments`: [n, A, K], one
        [n, P] x [P, A K] product (48 against 78 us as a broadcasting matmul to [A, 6, K]; [128, 32, 64], 2-core
        Intel Xeon)."""
        a, k_entries, p = negative_gradient.shape
        return torch.mm(grid.basis_t[:n_moments], negative_gradient.view(a * k_entries, p).T).view(
            n_moments, a, k_entries)

    negative_grad_sigma, behind_add = exponent_gradient(values, terms, behind)
    moments = pixel_moments(negative_grad_sigma)
    color_depth = torch.bmm(terms_by_channel, weight.transpose(1, 2))                  # [A, D + 1, K]
    grad_abs = None
    if want_abs:
        dx = entries.mean_x[..., None] - grid.local_x
        dy = entries.mean_y[..., None] - grid.local_y
        pixel_x = negative_grad_sigma * (entries.half_a[..., None] * 2 * dx + entries.conic_b[..., None] * dy)
        pixel_y = negative_grad_sigma * (entries.conic_b[..., None] * dx + entries.half_c[..., None] * 2 * dy)
        grad_abs = torch.stack([pixel_x.abs().sum(-1), pixel_y.abs().sum(-1)])
    moments_k = behind_k_add = None
    if k is not None:
        negative_grad_sigma_k, behind_k_add = exponent_gradient(values[..., :k], terms[..., :k], behind_k)
        moments_k = pixel_moments(negative_grad_sigma_k, 3)
    return _BackwardChunk(moments, color_depth, before[:, -1], behind_add, grad_abs, moments_k, behind_k_add)


def _mean_and_conic_gradients(moments: torch.Tensor, entries: _Entries):
    """g_mean (x, y) and g_conic (a, b, c) as tuples of float64 [E] tensors from the pixel moments [6, E] and
    the entries' geometry ([E] each), with dx = m_x - u; from the moments (1, u, v) alone ([3, E], the densify
    head's), g_mean and None."""
    s0, su, sv = moments[:3].unbind(0)
    f64 = torch.float64
    mx, my = entries.mean_x.to(f64), entries.mean_y.to(f64)
    half_a, b, half_c = entries.half_a.to(f64), entries.conic_b.to(f64), entries.half_c.to(f64)
    sdx = mx * s0 - su                                       # sum g (m_x - u)
    sdy = my * s0 - sv
    grad_mean = (torch.addcmul(b * sdy, half_a, sdx, value=2), torch.addcmul(b * sdx, half_c, sdy, value=2))
    if moments.shape[0] == 3:
        return grad_mean, None
    suu, suv, svv = moments[3:].unbind(0)
    # sum g dx^2 = m_x (sdx - su) + suu, sum g dx dy = m_x sdy - m_y su + suv: 21 ops in all, not 38 (op time
    # 1.82 -> 1.35 ms per backward on the quick check's t = 0 result, 2-core Intel Xeon).
    half_sdxdx = torch.addcmul(suu, mx, sdx - su).mul_(0.5)
    half_sdydy = torch.addcmul(svv, my, sdy - sv).mul_(0.5)
    sdxdy = torch.addcmul(suv, mx, sdy).addcmul_(my, su, value=-1)
    return grad_mean, (half_sdxdx, sdxdy, half_sdydy)


def composite(means2d: torch.Tensor,                 # [C, N, 2]
              conics: torch.Tensor,                  # [C, N, 3]
              opacities: torch.Tensor,               # [N] or [C, N]
              colors: torch.Tensor,                  # [N, D] or [C, N, D]
              depths: torch.Tensor,                  # [C, N]
              backgrounds: torch.Tensor | None,      # [C, D]
              tile_ranges: torch.Tensor,             # [C * n_tiles, 2] int32
              sorted_ids: torch.Tensor,              # [M] int32
              settings: RenderSettings, *, outputs=ALL_OUTPUTS, absgrad: bool = False,
              densify_channels: int | None = None, densify_grad: torch.Tensor | None = None,
              color_grad_channels: int | None = None, deterministic: bool = False,
              means2d_for_absgrad: torch.Tensor | None = None,
              chunk_entries: int | None = None,
              tile_batch: int | None = None, sub_tile: int = DEFAULT_SUB_TILE) -> types.CompositeOutput:
    """Blend the depth-sorted tile lists front to back into C images (differentiable, hand-written backward).

    Torch twin of `tritonsplat.ops.compositing.composite`; the contract (inputs, blending rule, saved
    state, outputs) is written down in `tritonsplat.types`. Computes in the dtype of means2d.

    Args:
        means2d, conics, opacities, colors, depths, backgrounds: the projected Gaussians (see types).
        tile_ranges: [C * n_tiles, 2] int32 [start, end) of each bin in sorted_ids ((0, 0): empty).
        sorted_ids: [M] int32 flat rows c * N + g, front to back within each bin.
        settings: size, tile size, alpha cap.
        outputs: which of "colors", "alphas", "depths", "median_depths" to return (others None).
        absgrad: after backward, add to `means2d_for_absgrad.absgrad` (default: means2d) [C, N, 2] the
            sum over pixels of |dL_pixel / dmean2d|.
        densify_channels, densify_grad: after backward, add to `densify_grad` [C, N, 2] the gradient of
            the means from the upstream gradient of colors[..., :k] alone.
        color_grad_channels: k, only colors[..., :k] receive gradients (the others get zeros).
        deterministic: fixed-order reductions on CUDA (CPU index_add is always deterministic).
        chunk_entries, tile_batch: K entries per chunk (None: `chunk_size`) and sub-tiles per batch (None:
            `tile_batch_for`); speed and memory only.
    Returns:
        CompositeOutput(colors [C,H,W,D], alphas [C,H,W,1], depths [C,H,W,1] expected (normalised),
        median_depths [C,H,W,1] detached); fields not in `outputs` are None.
    """
    if absgrad and means2d_for_absgrad is None:
        means2d_for_absgrad = means2d
    options = _Options(settings, tuple(outputs), absgrad, densify_channels, color_grad_channels, deterministic,
                       chunk_entries, tile_batch, sub_tile)
    colors_out, alphas, depths_out, median = _CompositeFunction.apply(
        means2d, conics, opacities, colors, depths, backgrounds,
        _Call(tile_ranges, sorted_ids, options, densify_grad, means2d_for_absgrad if absgrad else None))
    images = {"colors": colors_out, "alphas": alphas, "depths": depths_out, "median_depths": median}
    return types.CompositeOutput(*(images[name] if name in options.outputs else None
                                   for name in types.CompositeOutput._fields))


@torch.no_grad()
def composite_state(means2d, conics, opacities, colors, depths, tile_ranges, sorted_ids, settings: RenderSettings,
                    *, chunk_entries: int | None = None,
                    tile_batch: int | None = None, sub_tile: int = DEFAULT_SUB_TILE) -> CompositeState:
    """The state the forward saves for backward, in image layout (final T [C,H,W], last index [C,H,W] int32)."""
    flat = _flat_inputs(means2d, conics, opacities, colors, depths)
    n_cameras = means2d.shape[0]
    grid = _grid(settings, sub_tile)
    layout = _layout(tile_ranges, sorted_ids, flat, settings, grid)
    chunk_entries = chunk_entries or chunk_size(layout)
    tile_batch = tile_batch or _tile_batch(chunk_entries, grid.size ** 2, means2d.dtype, means2d.device)
    result = _forward_tiles(_records(flat, sorted_ids, layout, grid.size, chunk_entries), layout,
                            n_cameras * grid.n_tiles, settings, grid, False, chunk_entries, tile_batch)
    return CompositeState(_to_image(result.final[..., None], n_cameras, grid, settings)[..., 0].contiguous(),
                          _to_image(result.last[..., None], n_cameras, grid, settings)[..., 0].contiguous())
