"""Token dispatch: send token copies to their experts, run the experts, combine the weighted outputs.

Shape legend: ``T`` tokens, ``D`` model width, ``N`` token copies, ``E`` experts.

One interface, two implementations:

* :class:`GroupedDispatcher`, the production path: sort the live copies by expert, gather their rows once,
  run each expert on its contiguous block (:class:`~lightning_moe.nn.experts.GroupedExperts`), weight,
  scatter-add back. No ``(tokens, experts, capacity)`` one-hot tensors.
* :class:`LoopDispatcher`, the test oracle: a Python loop over experts with plain tensor ops.

The seam for expert parallelism is :meth:`GroupedDispatcher.compute`: it receives this rank's live copies
sorted by expert (source token, weight) and the per-expert counts, and returns the combined ``(T, D)``
output. An all-to-all dispatcher overrides it: gather the rows, exchange counts, send rows to the ranks
that own their experts, run the local experts with ``GroupedExperts.forward(x_ND, counts_E)``, send the
outputs back, weight and scatter-add. Routing, capacity and statistics around it stay the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.nn.experts import GroupedExperts, autocast_dtype


class Dispatcher:
    """Runs routed token copies through the experts and combines their outputs."""

    def __call__(
        self,
        x_TD: Tensor,
        token_ids_N: Tensor,
        expert_ids_N: Tensor,
        weights_N: Tensor,
        keep_N: Tensor,
        experts: GroupedExperts,
    ) -> Tensor:
        """Combine ``sum_n weights_N[n] * expert_{expert_ids_N[n]}(x_TD[token_ids_N[n]])`` per token.

        Args:
            x_TD: Tokens.
            token_ids_N: Source token of each copy.
            expert_ids_N: Target expert of each copy.
            weights_N: Combine weight of each copy.
            keep_N: Only copies marked True are computed; the others contribute zero.
            experts: The routed experts.

        Returns:
            ``(T, D)`` combined expert outputs (zero for tokens with no live copy).
        """
        raise NotImplementedError

    def reads_host_values(self, x_TD: Tensor, experts: GroupedExperts) -> bool:
        """Whether a call on ``x_TD`` reads device values back to the host (counts, split sizes).

        Such a call waits for the device, and under ``torch.compile`` would recompile for every new set of
        values, so :class:`~lightning_moe.nn.moe.MoELayer` runs it outside the compiled graph.
        """
        return True


class LoopDispatcher(Dispatcher):
    """Per-expert Python loop: select each expert's copies, run it, add the weighted result. Test oracle."""

    def __call__(
        self,
        x_TD: Tensor,
        token_ids_N: Tensor,
        expert_ids_N: Tensor,
        weights_N: Tensor,
        keep_N: Tensor,
        experts: GroupedExperts,
    ) -> Tensor:
        """See :meth:`Dispatcher.__call__`."""
        out_TD = None
        expert_weights = experts.unbind_experts()
        for expert in range(experts.num_experts):
            copies = torch.nonzero(keep_N & (expert_ids_N == expert)).squeeze(1)
            if copies.numel() == 0:
                continue
            tokens = token_ids_N[copies]
            y_MD = experts.expert_forward(x_TD[tokens], expert_weights[expert])
            if out_TD is None:  # in the experts' output dtype (the autocast dtype under autocast)
                out_TD = torch.zeros_like(x_TD, dtype=y_MD.dtype)
            out_TD.index_add_(0, tokens, y_MD * weights_N[copies].unsqueeze(-1).to(y_MD.dtype))
        if out_TD is None:  # no live copy: zeros in the dtype the experts would have computed in, as grouped gives
            return torch.zeros_like(x_TD, dtype=autocast_dtype(x_TD, experts.w1) or x_TD.dtype)
        return out_TD


class GroupedDispatcher(Dispatcher):
    """Sort copies by expert, then gather, compute, weight and scatter-add expert by expert in one fused pass.

    Attributes:
        exact_counts: Whether :meth:`compute` needs exactly the live copies (dropped ones cut off, which reads
            their number on the host). When False and the experts need no host counts either (``torch._grouped_mm``
            on CUDA), dropped copies stay in the last expert's block with weight zero, so dispatch never waits
            for the device; they read a zero row appended to the tokens (``compute`` gets ``T + 1`` rows), so
            their compute is wasted and their contribution and gradients are exactly zero.
    """

    exact_counts = False

    def reads_host_values(self, x_TD: Tensor, experts: GroupedExperts) -> bool:
        """See :meth:`Dispatcher.reads_host_values`: all but ``torch._grouped_mm`` without exact counts do."""
        return self.exact_counts or experts.needs_host_counts(x_TD)

    def __call__(
        self,
        x_TD: Tensor,
        token_ids_N: Tensor,
        expert_ids_N: Tensor,
        weights_N: Tensor,
        keep_N: Tensor,
        experts: GroupedExperts,
    ) -> Tensor:
        """See :meth:`Dispatcher.__call__`."""
        num_experts = experts.num_experts
        # Dead copies sort last under the sentinel expert E.
        slot_expert_N = torch.where(keep_N, expert_ids_N, num_experts)
        # Not bincount: on CUDA it reads the largest id back to size its output.
        counts = slot_expert_N.new_zeros(num_experts + 1).scatter_add_(0, slot_expert_N, torch.ones_like(slot_expert_N))
        if not self.reads_host_values(x_TD, experts):
            order = torch.argsort(slot_expert_N, stable=True)
            counts_E = counts[:num_experts].clone()
            counts_E[-1:] += counts[num_experts:]
            weights_N = torch.where(keep_N, weights_N, torch.zeros_like(weights_N))
            # The dead copies read an appended zero row, on which every expert gives exactly zero (no biases,
            # act(0) = 0): the last expert on a token not routed to it could overflow, and 0 * inf is nan.
            num_tokens = x_TD.shape[0]
            x_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
            token_ids_N = torch.where(keep_N, token_ids_N, num_tokens)
            return self.compute(x_TD, token_ids_N[order], weights_N[order], counts_E, experts)[:num_tokens]
        counts_E = counts[:num_experts]
        counts_list = counts_E.tolist()
        padded, expert_order = counts_list, None
        if not self.exact_counts:
            padded = experts.padded_counts(x_TD, counts_list)
            if padded != counts_list:
                expert_order = experts.block_order(x_TD, padded)
        if expert_order is not None:  # sort the copies by their expert's place in expert_order (dead ones last)
            rank = [0] * (num_experts + 1)
            for place, expert in enumerate(expert_order + [num_experts]):
                rank[expert] = place
            slot_expert_N = torch.tensor(rank, device=counts.device)[slot_expert_N]
        order = torch.argsort(slot_expert_N, stable=True)[: sum(counts_list)]
        token_ids_N, weights_N = token_ids_N[order], weights_N[order]
        if padded != counts_list:
            in_order = expert_order if expert_order is not None else range(num_experts)
            token_ids_N, weights_N = pad_expert_blocks(
                token_ids_N,
                weights_N,
                slot_expert_N[order],
                torch.tensor([counts_list[e] for e in in_order], device=counts.device),
                torch.tensor([padded[e] for e in in_order], device=counts.device),
            )
            counts_E = torch.tensor(padded, device=counts.device, dtype=counts.dtype)
        if expert_order is not None:
            return self.compute(x_TD, token_ids_N, weights_N, counts_E, experts, expert_order=expert_order)
        return self.compute(x_TD, token_ids_N, weights_N, counts_E, experts)

    def compute(
        self,
        x_TD: Tensor,
        token_ids_N: Tensor,
        weights_N: Tensor,
        counts_E: Tensor,
        experts: GroupedExperts,
        expert_order: list[int] | None = None,
    ) -> Tensor:
        """Run the experts on expert-sorted copies and combine (the expert-parallel seam).

        Args:
            x_TD: This rank's tokens.
            token_ids_N: Source token of each live copy, sorted by expert.
            weights_N: Combine weight of each copy.
            counts_E: Copies per expert, over all ``E`` experts.
            experts: The routed experts.
            expert_order: The order of the experts' blocks when it is not the index order: only passed when
                ``exact_counts`` is False, from padding that batches experts of similar load (CPU).

        Returns:
            ``(T, D)`` combined expert outputs.
        """
        return experts.forward_scatter(x_TD, token_ids_N, weights_N, counts_E, expert_order)


def pad_expert_blocks(
    token_ids_N: Tensor, weights_N: Tensor, expert_ids_N: Tensor, counts_E: Tensor, padded_E: Tensor
) -> tuple[Tensor, Tensor]:
    """Pad each expert's block of sorted copies to ``padded_E`` rows with weight-zero copies of its first token.

    A padding copy adds ``0 * expert(x_t)`` to a token ``t`` the expert computes anyway and gets a zero gradient
    into everything, so the result is unchanged; only the per-expert row counts change (see
    ``GroupedExperts.padded_counts`` for why). Padding with a token the expert does not see (say token 0) would
    bring that expert's overflow or nan on it into an unrelated token (``0 * inf`` is nan).

    Args:
        token_ids_N: Source token of each copy, sorted by expert.
        weights_N: Combine weight of each copy.
        expert_ids_N: Expert of each copy (sorted).
        counts_E: Copies per expert.
        padded_E: Rows per expert after padding (``>= counts_E``).

    Returns:
        The padded ``token_ids`` and ``weights`` (differentiable into ``weights_N``).
    """
    pad_E = padded_E - counts_E
    pad_before_E = torch.cumsum(pad_E, 0) - pad_E
    position_N = torch.arange(token_ids_N.shape[0], device=token_ids_N.device) + pad_before_E[expert_ids_N]
    total = int(padded_E.sum())
    token_ids_P = token_ids_N.new_zeros(total).index_copy(0, position_N, token_ids_N)
    real_P = torch.zeros(total, dtype=torch.bool, device=token_ids_N.device).index_fill_(0, position_N, True)
    blocks = torch.arange(padded_E.shape[0], device=padded_E.device)
    block_P = torch.repeat_interleave(blocks, padded_E, output_size=total)
    first_E = torch.cumsum(padded_E, 0) - padded_E  # where each block, and its real copies, start
    token_ids_P = torch.where(real_P, token_ids_P, token_ids_P[first_E[block_P]])
    weights_P = weights_N.new_zeros(total).index_copy(0, position_N, weights_N)
    return token_ids_P, weights_P
