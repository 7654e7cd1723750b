"""Plain-dataclass configs for the MoE blocks, validated at construction.

Only strings, ints, floats, bools, ``None`` and nested dataclasses appear here, so LightningCLI and
``save_hyperparameters`` can serialise them. Every invalid value raises a ``ValueError`` that names the
field, the value and what is allowed. :func:`check_token_mask` checks, the same way, the token masks the
blocks take at run time.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
SCORE_FUNCS = ("softmax", "sigmoid")
ROUTER_KINDS = ("token_choice", "expert_choice")
GROUP_SCORES = ("max", "top2_sum")
DROP_PRIORITIES = ("position", "weight")
DISPATCHERS = ("grouped", "loop")
EXPERT_KERNELS = ("auto", "fused", "grouped_mm")
CAPACITY_SCOPES = ("batch", "sequence")
GATE_PRECISIONS = ("float32", "compute")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


_SCALAR_KINDS = {"int": "an int", "float": "a finite number", "bool": "a bool", "str": "a string"}


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite real number (int, float, a NumPy scalar), not a bool (``True`` would pass 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_field_types(config: object) -> None:
    """Raise unless every ``int``/``float``/``bool``/``str`` field of a dataclass (``| None`` too) holds that type.

    Configs built from YAML, a CLI or an overrides dict can carry ``2.0`` for an int, ``"false"`` for a bool or
    ``inf`` for a float, which the range checks would pass or which would fail deep inside the model. An int is
    a valid float; a bool is not a number; a float must be finite. Other annotations are not checked here.

    Raises:
        ValueError: Naming the first field of the wrong type, its value and the type allowed.
    """
    for spec in dataclasses.fields(config):
        parts = [part.strip() for part in str(spec.type).split("|")]
        kinds = [part for part in parts if part != "None"]
        if len(kinds) != 1 or kinds[0] not in _SCALAR_KINDS:
            continue
        kind, optional, value = kinds[0], "None" in parts, getattr(config, spec.name)
        if value is None and optional:
            continue
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) if kind == "int" else is_number(value)
        _check(ok, spec.name, value, f"must be {_SCALAR_KINDS[kind]}{' or None' if optional else ''}")


def config_from_dict(name: str, value: object, kind: type) -> object:
    """``kind(**value)`` for a dict ``value`` (a nested config written out in YAML or Python), else ``value``.

    Raises:
        ValueError: If the dict has keys that are not fields of ``kind``, naming them and the allowed ones.
    """
    if not isinstance(value, dict):
        return value
    allowed = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(value) - set(allowed))
    _check(not unknown, name, value, f"has unknown keys {unknown}; {kind.__name__} takes {allowed}")
    return kind(**value)


def check_token_mask(name: str, mask: Tensor | None) -> None:
    """Raise unless ``mask`` is ``None`` or a bool/integer token mask (True or nonzero: a real token, else padding).

    A floating mask is refused: an additive attention mask (0 for real tokens, -inf for padding) read as a
    token mask would turn every real token into padding and the padding into real tokens.

    Raises:
        ValueError: If ``mask`` is not a tensor (a list of flags, say), or is floating point or complex.
    """
    import torch  # here, not at the top: the configs themselves need no torch

    if mask is not None and not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"{name} of type {type(mask).__name__} is invalid: expected a bool or integer tensor, True/1 for real "
            "tokens and False/0 for padding"
        )
    if mask is not None and (mask.is_floating_point() or mask.is_complex()):
        raise ValueError(
            f"{name}.dtype={mask.dtype} is invalid: expected a bool or integer mask, True/1 for real tokens and "
            "False/0 for padding (an additive 0/-inf attention mask is not a token mask)"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, f"must be one of {', '.join(map(repr, choices))}")


@dataclass
class RouterConfig:
    """How tokens pick experts.

    Args:
        num_experts: Number of routed experts ``E``.
        top_k: Experts per token ``K`` (token choice), or the average experts per token used to size
            the per-expert capacity (expert choice).
        kind: ``"token_choice"`` (each token picks its top-k experts) or ``"expert_choice"`` (each expert
            picks its top-C tokens, Zhou et al. 2022).
        score_func: ``"softmax"`` or ``"sigmoid"`` scores over the router logits.
        softmax_after_topk: Softmax only over the chosen top-k logits (Mixtral) instead of softmax over
            all experts and then top-k (Switch, Qwen, DeepSeek). Softmax scores and token choice only.
        normalize_topk: Renormalise the chosen weights to sum to one per token (token choice only).
        routed_scaling_factor: Multiplies the routed weights (DeepSeek-V2/V3).
        n_group: Number of expert groups for group-limited routing (1 = off).
        topk_group: Groups a token may route into; its top-k experts are chosen inside them.
        group_score: How a group is scored: ``"max"`` expert score (DeepSeek-V2) or the sum of its top-2
            scores (``"top2_sum"``, DeepSeek-V3).
        score_bias: Keep a score-correction bias buffer added to the scores for expert *selection* only,
            never for the weights (DeepSeek-V3 auxiliary-loss-free balancing).
        jitter_eps: Training-only multiplicative noise ``x * U(1 - eps, 1 + eps)`` on the router input
            (Switch). 0 disables it.
        random_routing: Training-only GShard random routing: the choice of largest weight is kept, every other
            with probability ``min(1, top_k * w_k / sum_j w_j)`` (``2 * g_2`` for top-2, as in GShard).
        init_std: Standard deviation of the router weight initialisation.
        gate_precision: Precision of the gate matmul (the router logits). ``"float32"`` (default): in float32
            whatever the input and under mixed precision: the Switch Transformer paper's selective precision
            (the router in float32 for stable bf16 training).
            ``"compute"``: in the compute dtype (autocast's under mixed precision, else the input's), as
            torchtitan and Megatron-Core (without ``moe_router_dtype``) do, and as every Hugging Face router
            does under autocast (``F.linear`` runs in bf16 there whatever its inputs' dtype, so DeepSeek's
            ``.type(torch.float32)`` takes effect only for bf16 weights without autocast). The logits are
            then cast to float32 and everything after them (scores, top-k, weights, losses) runs in float32
            either way. Cheaper in bf16 with many experts (the 256-expert gate is a ``D x 256`` matmul per
            token), at the cost of bf16-rounded logits.
    """

    num_experts: int = 8
    top_k: int = 2
    kind: str = "token_choice"
    score_func: str = "softmax"
    softmax_after_topk: bool = False
    normalize_topk: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    score_bias: bool = False
    jitter_eps: float = 0.0
    random_routing: bool = False
    init_std: float = 0.02
    gate_precision: str = "float32"

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.num_experts >= 1, "num_experts", self.num_experts, "must be >= 1")
        _check_choice("gate_precision", self.gate_precision, GATE_PRECISIONS)
        _check(self.top_k >= 1, "top_k", self.top_k, "must be >= 1")
        _check(
            self.top_k <= self.num_experts,
            "top_k",
            self.top_k,
            f"must be <= num_experts ({self.num_experts})",
        )
        _check_choice("kind", self.kind, ROUTER_KINDS)
        _check_choice("score_func", self.score_func, SCORE_FUNCS)
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        _check(self.n_group >= 1, "n_group", self.n_group, "must be >= 1")
        _check(
            self.num_experts % self.n_group == 0,
            "n_group",
            self.n_group,
            f"must divide num_experts ({self.num_experts})",
        )
        _check(
            1 <= self.topk_group <= self.n_group,
            "topk_group",
            self.topk_group,
            f"must be in [1, n_group] = [1, {self.n_group}]",
        )
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            _check(
                self.topk_group * per_group >= self.top_k,
                "topk_group",
                self.topk_group,
                f"the chosen groups hold {self.topk_group * per_group} experts, fewer than top_k ({self.top_k})",
            )
            if self.group_score == "top2_sum":
                _check(per_group >= 2, "group_score", self.group_score, "'top2_sum' needs >= 2 experts per group")
        _check(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            self.routed_scaling_factor,
            "must be > 0",
        )
        _check(0.0 <= self.jitter_eps < 1.0, "jitter_eps", self.jitter_eps, "must be in [0, 1)")
        _check(self.init_std >= 0, "init_std", self.init_std, "must be >= 0")
        if self.kind == "token_choice" and self.top_k == 1 and (self.softmax_after_topk or self.normalize_topk):
            warnings.warn(
                "RouterConfig(top_k=1) with softmax_after_topk or normalize_topk gives every token the weight 1: the "
                "router then gets no gradient from the model's loss, only from the auxiliary losses (Switch's top-1 "
                "weights by the softmax over all experts: leave both off)",
                UserWarning,
                stacklevel=3,
            )
        if self.kind == "token_choice" and self.top_k == 1 and self.random_routing:
            warnings.warn(
                "RouterConfig(random_routing=True) has no effect with top_k=1: it only drops choices after the first",
                UserWarning,
                stacklevel=3,
            )
        _check(
            not self.softmax_after_topk or self.score_func == "softmax",
            "softmax_after_topk",
            self.softmax_after_topk,
            f"only with score_func='softmax' (score_func={self.score_func!r} selects and weights by its scores)",
        )
        if self.kind == "expert_choice":
            _check(
                self.n_group == 1 and not self.random_routing and not self.score_bias,
                "kind",
                self.kind,
                "'expert_choice' does not combine with n_group > 1, random_routing or score_bias",
            )
            for name in ("softmax_after_topk", "normalize_topk"):
                _check(
                    not getattr(self, name),
                    name,
                    getattr(self, name),
                    "token choice only: each expert-choice weight is the expert's score for its token",
                )


@dataclass
class ExpertsConfig:
    """The routed experts' feed-forward networks (stacked weights, one slice per expert).

    Args:
        hidden_dim: Hidden (intermediate) size ``F`` of each expert.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        gated: Gated linear unit: ``act(x W1) * (x W3)`` (SwiGLU with silu, GEGLU with gelu), else a
            plain two-layer MLP ``act(x W1)``.
        init_std: Standard deviation of the input projections' initialisation.
        out_init_std: Standard deviation of the output projection's initialisation (``None``: same as
            ``init_std``).
        kernel: How the grouped path multiplies: ``"fused"`` (one autograd function walking the experts block
            by block, nothing ``(N, D)``-sized materialised; the CPU choice), ``"grouped_mm"`` (three
            ``torch._grouped_mm`` calls over all experts, no host sync; the CUDA choice, needs torch >= 2.8,
            bfloat16 on an SM80+ GPU and ``D``, ``F`` multiples of 8 on CUDA) or ``"auto"`` (``grouped_mm``
            where it applies, else ``fused``).
        batch_experts: Let the fused kernel run neighbouring experts with equal row counts as one batched
            matmul (on the CPU also padding pairs of small neighbouring blocks to one count, or, under bf16
            autocast with kept memory, runs of experts of nearly equal load); ``False`` runs one expert at a
            time (the same results up to float rounding).
    """

    hidden_dim: int = 1024
    activation: str = "silu"
    gated: bool = True
    init_std: float = 0.02
    out_init_std: float | None = None
    kernel: str = "auto"
    batch_experts: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        _check(self.hidden_dim >= 1, "hidden_dim", self.hidden_dim, "must be >= 1")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check(self.init_std >= 0, "init_std", self.init_std, "must be >= 0")
        if self.out_init_std is not None:
            _check(self.out_init_std >= 0, "out_init_std", self.out_init_std, "must be >= 0 or None")
        _check_choice("kernel", self.kernel, EXPERT_KERNELS)


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward layer: router + dispatch + experts (+ shared experts).

    Args:
        dim: Model width ``D``.
        router: The router's config.
        experts: The routed experts' config.
        capacity_factor: Training capacity factor; ``None`` is dropless (the default). With a factor,
            each expert keeps at most ``ceil(capacity_factor * tokens * top_k / num_experts)`` token
            copies (never more than the token count) and drops the lowest-priority ones.
        eval_capacity_factor: Capacity factor in eval mode (``None``: same as ``capacity_factor``).
        expert_capacity: Absolute per-expert capacity in token copies; overrides the factors.
        drop_priority: Which copies an over-full expert keeps: ``"position"`` (all first choices before
            second choices, earlier tokens first; GShard/Switch) or ``"weight"`` (each copy ranked by its own
            router weight, highest first, so a strong second choice can beat a weak first choice; V-MoE's
            batch-prioritised routing instead ranks tokens by their top-1 weight and fills every first choice
            before any second one).
        capacity_scope: Over which tokens capacity is counted: ``"batch"`` (all tokens of the forward) or
            ``"sequence"`` (each sequence of a ``(B, S, D)`` input separately, with the capacity computed from
            that sequence's real tokens; Hugging Face's Switch Transformers).
        shared_hidden_dim: Hidden size of the shared expert every token goes through (0 = none). Several
            DeepSeek shared experts of hidden ``F`` are one shared expert of hidden ``n * F``.
        shared_gate: Scale the shared expert's output by ``sigmoid(x w_gate)`` (Qwen-MoE).
        dispatch: ``"grouped"`` (sort by expert, one gather, contiguous per-expert matmuls, scatter-add;
            the production path) or ``"loop"`` (a per-expert Python loop kept as the test oracle).
    """

    dim: int = 512
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    expert_capacity: int | None = None
    drop_priority: str = "position"
    capacity_scope: str = "batch"
    shared_hidden_dim: int = 0
    shared_gate: bool = False
    dispatch: str = "grouped"

    def __post_init__(self) -> None:
        self.router = config_from_dict("router", self.router, RouterConfig)
        self.experts = config_from_dict("experts", self.experts, ExpertsConfig)
        for name, kind in (("router", RouterConfig), ("experts", ExpertsConfig)):
            value = getattr(self, name)
            _check(isinstance(value, kind), name, value, f"must be {kind.__name__}(...) or a dict of its fields")
        check_field_types(self)
        _check(self.dim >= 1, "dim", self.dim, "must be >= 1")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, value, "must be > 0, or None for dropless")
        _check(
            self.expert_capacity is None or self.expert_capacity >= 1,
            "expert_capacity",
            self.expert_capacity,
            "must be >= 1, or None",
        )
        _check_choice("drop_priority", self.drop_priority, DROP_PRIORITIES)
        _check_choice("capacity_scope", self.capacity_scope, CAPACITY_SCOPES)
        _check(self.shared_hidden_dim >= 0, "shared_hidden_dim", self.shared_hidden_dim, "must be >= 0")
        _check(
            not self.shared_gate or self.shared_hidden_dim > 0,
            "shared_gate",
            self.shared_gate,
            "needs a shared expert (shared_hidden_dim > 0)",
        )
        _check_choice("dispatch", self.dispatch, DISPATCHERS)
        if self.router.kind == "expert_choice":
            _check(
                self.capacity_factor is not None or self.expert_capacity is not None,
                "capacity_factor",
                self.capacity_factor,
                "expert-choice routing needs a capacity_factor or expert_capacity",
            )
            _check(
                self.capacity_scope == "batch",
                "capacity_scope",
                self.capacity_scope,
                "expert-choice routing picks tokens over the whole batch: only 'batch'",
            )
            _check(
                self.drop_priority == "position",
                "drop_priority",
                self.drop_priority,
                "token choice only: an expert-choice expert keeps its top tokens by score, nothing is dropped after",
            )

    @property
    def num_experts(self) -> int:
        """Number of routed experts."""
        return self.router.num_experts

    @property
    def dropless(self) -> bool:
        """Whether no token copy is ever dropped, in training or in eval (no capacity set)."""
        return self.capacity_factor is None and self.eval_capacity_factor is None and self.expert_capacity is None
