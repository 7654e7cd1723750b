"""All-to-all token dispatch for expert parallelism.

Shape legend: ``T`` this rank's tokens, ``D`` model width, ``N`` this rank's live token copies sorted by
expert, ``E`` experts (global), ``L`` experts this rank owns (``E / ep``), ``R`` ranks of the
expert-parallel group, ``M`` copies received from all ranks.

Rank ``r`` of an expert-parallel group of ``R`` ranks owns experts ``r * L ... (r + 1) * L - 1``. Copies
sorted by global expert are therefore already grouped by destination rank, so one
``all_to_all_single`` with uneven split sizes (zero included) sends every rank its rows. Received rows
arrive grouped by source rank, then by local expert; they are re-sorted by local expert for
:func:`~lightning_moe.nn.experts.grouped_expert_mlp`, un-sorted after, and sent back by the reverse
all-to-all. Both all-to-alls are differentiable, so input, routing-weight and expert-weight gradients
are exact.

Every phase is labelled with :func:`torch.profiler.record_function` (``moe/dispatch``, ``moe/experts``,
``moe/combine``), free without a profiler; ``benchmarks/expert_parallel.py`` reads them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from lightning_moe.nn.dispatch import GroupedDispatcher
from lightning_moe.nn.experts import GroupedExperts, autocast_dtype, grouped_expert_mlp


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (for the expert-parallel gradient correction)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class ExpertParallelExperts(GroupedExperts):
    """:class:`GroupedExperts` holding only this rank's ``L`` experts; ``forward`` runs them on local rows.

    The stacked weights keep their names and global shape: they are ``Shard(0)`` DTensors over the
    expert-parallel mesh (or plain ``(L, ...)`` tensors). The all-to-all dispatcher calls the module (not
    its weights), so FSDP2's hooks on it gather and reduce the expert shards.

    Attributes:
        expert_grad_scale: Factor on the expert weights' gradients (see :class:`AllToAllDispatcher`).
    """

    expert_grad_scale: float = 1.0

    @classmethod
    def convert(cls, experts: GroupedExperts, expert_grad_scale: float = 1.0) -> ExpertParallelExperts:
        """Turn ``experts`` (whose weights already hold the local experts) into this class, in place."""
        experts.__class__ = cls
        experts.expert_grad_scale = expert_grad_scale
        return experts  # type: ignore[return-value]

    def local_weights(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """This rank's ``(w1, w3, w2)`` as plain ``(L, ...)`` tensors (differentiable into the parameters)."""
        local = []
        for weight in (self.w1, self.w3, self.w2):
            if weight is not None:
                weight = weight.to_local() if isinstance(weight, DTensor) else weight
                if self.expert_grad_scale != 1.0:
                    weight = _ScaleGrad.apply(weight, self.expert_grad_scale)
            local.append(weight)
        return local[0], local[1], local[2]

    def forward(self, x_ND: Tensor, counts_L: Tensor | list[int]) -> Tensor:
        """Run the local experts on rows sorted by local expert (``counts_L``: copies per local expert)."""
        w1, w3, w2 = self.local_weights()
        return grouped_expert_mlp(x_ND, counts_L, w1, w3, w2, self.config.activation, kernel=self.config.kernel)


class AllToAllDispatcher(GroupedDispatcher):
    """Sends token copies to the ranks that own their experts and brings the outputs back.

    Routing, capacity and statistics stay in :class:`~lightning_moe.nn.moe.MoELayer`; this class only
    replaces :meth:`GroupedDispatcher.compute`. The layer's experts must be an :class:`ExpertParallelExperts`
    holding this rank's ``L`` experts. Each expert sees the tokens of all ``R`` ranks, so its weight gradient
    is a sum over ranks; with a data-parallel average over the ranks on top it needs a ``1 / R`` correction
    (``ExpertParallelExperts.expert_grad_scale``, set by :func:`apply_expert_parallel`).

    Args:
        group: The expert-parallel process group (``None``: the default group).

    Example::

        layer.dispatcher = AllToAllDispatcher(ep_mesh.get_group())
    """

    # The all-to-all splits are host lists anyway; sending dropped copies would only cost bandwidth.
    exact_counts = True

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD

    def compute(
        self, x_TD: Tensor, token_ids_N: Tensor, weights_N: Tensor, counts_E: Tensor, experts: GroupedExperts
    ) -> Tensor:
        """Dispatch, run the local experts, combine (see :meth:`GroupedDispatcher.compute`).

        Raises:
            TypeError: If ``experts`` is not an :class:`ExpertParallelExperts`.
            ValueError: If the experts do not split evenly over the group.
        """
        if not isinstance(experts, ExpertParallelExperts):
            raise TypeError(
                f"experts of type {type(experts).__name__} is invalid: shard them with apply_expert_parallel first"
            )
        world = dist.get_world_size(self.group)
        num_experts = experts.num_experts
        if num_experts % world:
            raise ValueError(
                f"num_experts={num_experts} is invalid: must be divisible by the expert-parallel size {world}"
            )
        num_local = num_experts // world
        with record_function("moe/dispatch"):
            # Counts first: recv_RL[s, l] copies arrive from rank s for local expert l.
            counts_RL = counts_E.to(torch.int64).view(world, num_local)
            recv_RL = torch.empty_like(counts_RL)
            dist.all_to_all_single(recv_RL, counts_RL, group=self.group)
            send_splits = counts_RL.sum(1).tolist()
            recv_splits = recv_RL.sum(1).tolist()
            x_ND = x_TD.index_select(0, token_ids_N)
            dtype = autocast_dtype(x_ND, experts.w1)
            if dtype is not None:  # the experts compute in it: send half the bytes (float64 stays float64)
                x_ND = x_ND.to(dtype)
            recv_MD = all_to_all_single_autograd(x_ND, recv_splits, send_splits, self.group)
            # Rows arrive by (source rank, local expert): re-sort by local expert.
            local_ids_M = (
                torch.arange(num_local, device=x_TD.device)
                .repeat(world)
                .repeat_interleave(recv_RL.flatten(), output_size=sum(recv_splits))  # known: no device sync
            )
            order_M = torch.argsort(local_ids_M, stable=True)
            sorted_MD = recv_MD.index_select(0, order_M)
        with record_function("moe/experts"):
            y_sorted_MD = experts(sorted_MD, recv_RL.sum(0))
        with record_function("moe/combine"):
            y_MD = torch.empty_like(y_sorted_MD).index_copy(0, order_M, y_sorted_MD)
            y_ND = all_to_all_single_autograd(y_MD, send_splits, recv_splits, self.group)
            y_ND = y_ND * weights_N.unsqueeze(-1).to(y_ND.dtype)
            return torch.zeros_like(x_TD, dtype=y_ND.dtype).index_add(0, token_ids_N, y_ND)
