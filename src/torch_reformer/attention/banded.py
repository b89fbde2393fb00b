"""Local attention in the natural order through PyTorch's fused CPU attention kernel.

Legend: B batch, H heads, N chunks, C chunk length, J = before + 1 + after neighbour chunks,
S chunks and B' batch rows per part, D head dim.

In the natural order a chunk's neighbours are whole blocks of the (B, H, N, C, D) queries, keys
and values: chunk t attends to chunks t - before … t + after (mod N, wrapping like the sliced
core in ``sliced``; an offset of N or more in magnitude gives chunk t itself, see
``chunking.neighbour_offsets``), so no per-row gathers are needed. The work is cut into parts:
S query chunks of one batch row, or whole short sequences of several rows, so that each kernel
call gets a similar amount of work. For each part we copy the neighbour blocks of keys and values into
(B' * H, S, J*C, D) windows, run by run, and hand them with the part's queries to the kernel
behind ``F.scaled_dot_product_attention`` on CPU
(``aten::_scaled_dot_product_flash_attention_for_cpu``): scores, masked softmax and weighted
values in one pass, and a backward from the saved log-sum-exp. Backward rebuilds each part's
windows and adds the window gradients back into the chunks they came from.

Layouts. Inputs are usually views of (B, L, H*D) projections; the kernel reads them strided, so
nothing is copied to make them contiguous, and the output and gradients are written in the
(B, L, H, D) layout that ``merge_heads`` and the projections' backward read without a copy.
Between forward and backward this keeps the inputs, one log-sum-exp per query and the output
until backward has taken its dot products with the output gradient: O(L * H * D), as the sliced
core does; windows exist for one part at a time.

Masks are additive (0 or -inf). Away from the ends of the sequence every chunk sees its window
the same way: earlier chunks whole, its own chunk up to the diagonal and no later chunk (causal),
so one (C, J*C) mask serves all of them. Chunks whose window wraps around (the first ``before``
and the last ``after``, counting offsets below N) get their mask from positions, the rule the
sliced core applies to every chunk. No row is ever fully masked: a causal query sees itself, and
without causality nothing is masked; that is why this path takes no padding mask.

``banded_attention_applies`` says when this path is used: on CPU, with no padding mask and no
attention dropout, in a torch build that has the kernel. Everything else goes through the sliced
core. The two agree to rounding (the
tests compare them); -inf here against the core's finite mask constants changes weights of order
1e-38.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autograd_checks import ATTENTION_ONCE_ONLY, refuse_create_graph
from .chunking import neighbour_offsets
from .sliced import saved_and_output, save_with_output

# Window elements per part (B' * H * S * J * C * D, for keys and again for values). At 16K tokens on
# two CPU threads 2^18 to 2^22 ran within the noise of each other; 2^20 keeps a part's windows at
# 4 MiB each in float32, small next to the sequence-long tensors around them.
SLICE_WINDOW_ELEMENTS = 1 << 20


def _flash_kernels():
    """The fused CPU kernel's forward and backward ops, or None in a torch build without them."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None


_FLASH_KERNELS = _flash_kernels()


def banded_attention_applies(queries: Tensor, key_mask: Tensor | None, dropout: float, training: bool) -> bool:
    """True when ``banded_attention`` computes this local attention call."""
    return (_FLASH_KERNELS is not None and queries.device.type == "cpu" and key_mask is None
            and not (training and dropout > 0))


def _window_mask(chunks: Tensor, num_chunks: int, offsets: list[int], chunk_length: int, dtype) -> Tensor:
    """Causal additive mask (S, C, J*C) of query ``chunks`` (S,) from positions (``offsets``: ``neighbour_offsets``)."""
    neighbours = (chunks[:, None] + torch.tensor(offsets, device=chunks.device)) % num_chunks  # (S, J)
    within = torch.arange(chunk_length, device=chunks.device)
    query_positions = chunks[:, None] * chunk_length + within  # (S, C)
    key_positions = (neighbours[..., None] * chunk_length + within).flatten(1)  # (S, J*C)
    later = key_positions[:, None, :] > query_positions[:, :, None]
    return torch.zeros(later.shape, dtype=dtype, device=chunks.device).masked_fill_(later, float("-inf"))


class _Plan:
    """How one call is cut into parts (a range of batch rows x a range of query chunks) and the mask of each."""

    def __init__(self, shape: tuple[int, ...], before: int, after: int, causal: bool, dtype, device):
        batch, heads, self.num_chunks, self.chunk_length, width = shape
        self.causal = causal
        self.offsets = neighbour_offsets(before, after, self.num_chunks)
        self.window = len(self.offsets)
        self.reach_before, self.reach_after = -min(self.offsets), max(self.offsets)  # farthest chunks reached
        per_chunk = heads * self.window * self.chunk_length * width  # window elements of one chunk
        chunks_per_part = max(1, SLICE_WINDOW_ELEMENTS // per_chunk)
        # Short sequences: whole sequences of several batch rows per part, so the kernel calls stay few.
        rows_per_part = 1
        if chunks_per_part >= self.num_chunks:
            rows_per_part = max(1, SLICE_WINDOW_ELEMENTS // (per_chunk * self.num_chunks))
        self.parts = [
            (slice(row, min(row + rows_per_part, batch)), slice(start, min(start + chunks_per_part, self.num_chunks)))
            for row in range(0, batch, rows_per_part) for start in range(0, self.num_chunks, chunks_per_part)
        ]
        self.dtype, self.device = dtype, device
        # A chunk whose window does not wrap; its mask serves every such chunk.
        middle = torch.tensor([min(self.reach_before, self.num_chunks - 1)], device=device)
        self.interior_mask = self._positional_mask(middle)[0] if causal else None  # (C, J*C)

    def _positional_mask(self, chunks: Tensor) -> Tensor:
        return _window_mask(chunks, self.num_chunks, self.offsets, self.chunk_length, self.dtype)

    def mask(self, part: slice) -> Tensor | None:
        """The additive mask of the query chunks in ``part``: (C, J*C), (1, S, C, J*C) or None."""
        if not self.causal:
            return None
        if self.reach_before <= part.start and part.stop <= self.num_chunks - self.reach_after:
            return self.interior_mask
        return self._positional_mask(torch.arange(part.start, part.stop, device=self.device))[None]

    def runs(self, part: slice):
        """For each window slot j and offset: (chunks of the part, source chunks) in at most two runs each."""
        count = part.stop - part.start
        for slot, offset in enumerate(self.offsets):
            start = (part.start + offset) % self.num_chunks
            if start + count <= self.num_chunks:
                yield slot, slice(0, count), slice(start, start + count)
            else:
                head = self.num_chunks - start
                yield slot, slice(0, head), slice(start, self.num_chunks)
                yield slot, slice(head, count), slice(0, count - head)

    def window_of(self, blocks: Tensor, rows: slice, part: slice) -> Tensor:
        """Neighbour blocks of the part's chunks end to end: (B, H, N, C, D) -> (B' * H, S, J*C, D)."""
        _, heads, _, chunk, width = blocks.shape
        window = blocks.new_empty(rows.stop - rows.start, heads, part.stop - part.start, self.window, chunk, width)
        for slot, slots, chunks in self.runs(part):
            window[:, :, slots, slot] = blocks[rows, :, chunks]
        return window.view(-1, part.stop - part.start, self.window * chunk, width)

    def add_window_grad(self, grad_blocks: Tensor, grad_window: Tensor, rows: slice, part: slice) -> None:
        """Add a part's window gradient (B' * H, S, J*C, D) into the (B, H, N, C, D) blocks it was copied from."""
        _, heads, _, chunk, width = grad_blocks.shape
        grad_window = grad_window.reshape(rows.stop - rows.start, heads, -1, self.window, chunk, width)
        for slot, slots, chunks in self.runs(part):
            grad_blocks[rows, :, chunks] += grad_window[:, :, slots, slot]


def _blocks_like(blocks: Tensor) -> Tensor:
    """An empty (B, H, N, C, D) tensor laid out as (B, N, C, H, D), i.e. (B, L, H, D) memory."""
    batch, heads, num_chunks, chunk, width = blocks.shape
    return blocks.new_empty(batch, num_chunks, chunk, heads, width).permute(0, 3, 1, 2, 4)


def _kernel_view(blocks: Tensor) -> Tensor:
    """(B', H, S, C, ...) -> (B' * H, S, C, ...): the kernel's (batch, heads, length, ...) (a copy when B' > 1)."""
    return blocks.reshape(-1, *blocks.shape[2:])


def _attend(queries: Tensor, keys: Tensor, values: Tensor, plan: _Plan, scale: float) -> tuple[Tensor, Tensor]:
    """Output (B, H, N, C, D) in (B, L, H, D) memory and log-sum-exp (B, H, N, C) of every query."""
    out = _blocks_like(queries)
    # The log-sum-exp stays in the kernel's accumulation precision (float32 for half types).
    logsumexp = queries.new_empty(queries.shape[:4], dtype=torch.promote_types(queries.dtype, torch.float32))
    for rows, part in plan.parts:
        part_out, part_logsumexp = _FLASH_KERNELS[0](
            _kernel_view(queries[rows, :, part]), plan.window_of(keys, rows, part), plan.window_of(values, rows, part),
            attn_mask=plan.mask(part), scale=scale,
        )
        out[rows, :, part] = part_out.view(out[rows, :, part].shape)
        logsumexp[rows, :, part] = part_logsumexp.view(logsumexp[rows, :, part].shape)
    return out, logsumexp


def _stand_in_output(grad_out: Tensor, grad_dot_out: Tensor) -> Tensor:
    """A tensor O' with dO · O' = ``grad_dot_out`` per query: dO * (dO · O) / |dO|^2 (0 where dO is 0).

    The kernel's backward reads the output only for the per-query dot product dO · O, so backward
    can compute those dot products once, free the sequence-long output and hand the kernel this
    part-sized stand-in.
    """
    squared = torch.einsum("...d,...d->...", grad_out, grad_out)  # (..., C)
    factor = torch.where(squared > 0, grad_dot_out / squared.clamp(min=torch.finfo(squared.dtype).tiny), 0)
    return grad_out * factor[..., None].to(grad_out.dtype)


def _row_dots(first: Tensor, second: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-query dot products of two (B, H, N, C, D) tensors, (B, H, N, C), computed in ``dtype``.

    Taken over (B, L, H, D) rows, the layout outputs and their gradients have here (a copy otherwise).
    """
    batch, heads, num_chunks, chunk, width = first.shape

    def rows(blocks: Tensor) -> Tensor:
        return blocks.permute(0, 2, 3, 1, 4).reshape(-1, width).to(dtype)

    dots = torch.einsum("nd,nd->n", rows(first), rows(second))
    return dots.view(batch, num_chunks, chunk, heads).permute(0, 3, 1, 2)


class _BandedAttention(torch.autograd.Function):
    """Forward and backward of ``banded_attention`` on (B, H, N, C, D) blocks, part by part."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the kernel runs in the inputs' dtype, masks included
    def forward(ctx, queries, keys, values, before, after, causal, scale):
        plan = _Plan(queries.shape, before, after, causal, queries.dtype, queries.device)
        out, logsumexp = _attend(queries, keys, values, plan, scale)
        ctx.plan, ctx.scale = plan, scale
        # The output serves only the dot products dO · O at the start of backward; backward drops it
        # before the loop over parts (as in the sliced core).
        save_with_output(ctx, (queries, keys, values, logsumexp), out)
        return out

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_out):
        refuse_create_graph("local attention", ATTENTION_ONCE_ONLY)
        (queries, keys, values, logsumexp), out = saved_and_output(ctx)
        plan = ctx.plan
        if out is None:  # backward already ran once on this graph (retain_graph=True)
            out = _attend(queries, keys, values, plan, ctx.scale)[0]
        grad_out = grad_out.to(queries.dtype)
        grad_dot_out = _row_dots(grad_out, out, logsumexp.dtype)  # (B, H, N, C)
        del out
        grad_queries = _blocks_like(queries)
        grad_keys, grad_values = _blocks_like(keys).zero_(), _blocks_like(values).zero_()
        for rows, part in plan.parts:
            part_grad = _kernel_view(grad_out[rows, :, part])
            grad_q, grad_k, grad_v = _FLASH_KERNELS[1](
                part_grad, _kernel_view(queries[rows, :, part]),
                plan.window_of(keys, rows, part), plan.window_of(values, rows, part),
                _stand_in_output(part_grad, _kernel_view(grad_dot_out[rows, :, part])),
                _kernel_view(logsumexp[rows, :, part]), 0.0, False, attn_mask=plan.mask(part), scale=ctx.scale,
            )
            grad_queries[rows, :, part] = grad_q.view(grad_queries[rows, :, part].shape)
            plan.add_window_grad(grad_keys, grad_k, rows, part)
            plan.add_window_grad(grad_values, grad_v, rows, part)
        return grad_queries, grad_keys, grad_values, None, None, None, None


def banded_attention(
    queries: Tensor, keys: Tensor, values: Tensor, *, chunk_length: int, num_chunks_before: int,
    num_chunks_after: int, causal: bool, scale: float,
) -> Tensor:
    """Local attention without padding or dropout, (B, H, L, D) -> (B, H, L, D).

    ``chunk_length`` divides L; scores are ``scale * q · k``. The output is a (B, H, L, D) view of
    a (B, L, H, D) tensor. See the module docstring.
    """
    batch, heads, length, width = queries.shape
    blocks = (batch, heads, length // chunk_length, chunk_length, width)
    out = _BandedAttention.apply(
        queries.unflatten(2, blocks[2:4]), keys.unflatten(2, blocks[2:4]), values.unflatten(2, blocks[2:4]),
        num_chunks_before, num_chunks_after, bool(causal), float(scale),
    )
    return out.flatten(2, 3)
