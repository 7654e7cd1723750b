"""What each expert specialises in: its most frequent tokens and the share of each token class it receives."""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_moe.callbacks._utils import moe_layers, reduce_sum, router_stats, tensorboard

TOKEN_CLASSES = ("whitespace", "keyword", "digits", "identifier", "punctuation", "mixed", "special")
_KEYWORDS = frozenset(keyword.kwlist) | frozenset(getattr(keyword, "softkwlist", ()))


def token_class(text: str, special: bool = False) -> str:
    """The class of one decoded token.

    ``"whitespace"`` (only spaces, tabs, newlines), ``"keyword"`` (a Python keyword, surrounding whitespace
    ignored), ``"digits"``, ``"identifier"`` (letters, digits and underscores: names and words),
    ``"punctuation"`` (only symbols), ``"mixed"`` (anything else, e.g. ``".append"`` or a partial UTF-8
    character) and ``"special"`` (a special token such as end-of-text).
    """
    if special:
        return "special"
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if stripped in _KEYWORDS:
        return "keyword"
    if stripped.isdigit():
        return "digits"
    if stripped.replace("_", "a").isalnum():
        return "identifier"
    if all(not c.isalnum() and not c.isspace() and c.isprintable() and c != "\ufffd" for c in stripped):
        return "punctuation"
    return "mixed"


class ExpertSpecialization(Callback):
    r"""At the end of each validation, report which tokens every expert of selected MoE layers receives.

    During validation the routed copies of each input token are counted per expert (from the ``expert_ids``
    the layers return, summed over all ranks at the end). For each selected layer and expert the report lists
    the ``top_n`` most frequent tokens (decoded with the data module's tokenizer, or the one the module saved
    with its weights; raw ids without one) and the share of each class in :data:`TOKEN_CLASSES` among the
    copies it received (see :func:`token_class`).

    The report is kept in :attr:`results`::

        {layer_name: {expert: {"copies": int, "top_tokens": [(text, count), ...], "classes": {class: share}}}}

    and, with a TensorBoard logger, written as one markdown table per layer under the text tag
    ``specialization/layer_{i}``. Decoder-only modules route ``batch[:, :-1]``; for the encoder-decoder module
    (:class:`~lightning_moe.module.Seq2SeqLMModule`) the validation span corruption (seeded by the batch index)
    is replayed to recover encoder and decoder inputs. A DeepSeek multi-token-prediction layer of depth ``k``
    counts each position as the token it embeds, ``batch[:, k:-1]``. Layers whose token count matches none of
    these are skipped.

    Args:
        layers: Indices into ``pl_module.moe_layers`` (negative counts from the end); ``None``: the first and last
            MoE layers of the model itself (multi-token-prediction modules left out).
        top_n: Tokens listed per expert.

    Raises:
        ValueError: If ``top_n < 1`` or ``layers`` is empty; and when fitting or validating starts (before the
            first training step), if a layer index is out of range for the model's MoE layers.

    Example::

        from lightning_moe.callbacks import ExpertSpecialization

        spec = ExpertSpecialization(layers=[0, -1], top_n=8)
        trainer = Trainer(callbacks=[spec])
        trainer.validate(model, datamodule=data)
        spec.results["model.layers.0.ffn"][3]["classes"]["digits"]
    """

    def __init__(self, layers: Sequence[int] | None = None, top_n: int = 10) -> None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n={top_n!r} is invalid: must be an int >= 1")
        indices = isinstance(layers, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        )
        if layers is not None and not indices:
            raise ValueError(f"layers={layers!r} is invalid: must be a list of MoE layer indices (ints), or None")
        if layers is not None and len(layers) == 0:
            raise ValueError("layers=[] is invalid: give at least one layer index, or None for the first and last")
        self.layers = None if layers is None else list(layers)
        self.top_n = top_n
        self.results: dict[str, dict[int, dict[str, Any]]] = {}
        self._counts: dict[int, Tensor] = {}
        self._tokenizer: Any = None
        self._classes: Tensor | None = None

    def _selected(self, num_layers: int, names: Sequence[str] = ()) -> list[int]:
        main = [i for i, name in enumerate(names[:num_layers]) if _mtp_depth(name) == 0] or [0, num_layers - 1]
        wanted = [main[0], main[-1]] if self.layers is None else self.layers
        selected = []
        for index in wanted:
            if not -num_layers <= index < num_layers:
                valid = f"from {-num_layers} to {num_layers - 1}" if num_layers else "none: it has no MoE layer"
                raise ValueError(
                    f"layers={self.layers!r} is invalid: index {index} is out of range for the model's {num_layers} "
                    f"MoE layers (valid indices: {valid})"
                )
            selected.append(index % num_layers)
        return sorted(set(selected))

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail before any work if a requested layer index does not exist (``layers=None`` fits any model).

        Runs at fit and validation start, and from the CLI before any data work.
        """
        if self.layers is not None:
            self._selected(len(moe_layers(pl_module)))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_setup(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_setup(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counts = {}

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        stats = router_stats(outputs)
        if stats is None or not (isinstance(batch, Tensor) or isinstance(batch, Mapping) and "input_ids" in batch):
            return
        names = [name for name, _ in moe_layers(pl_module)]
        streams = _token_streams(pl_module, batch, batch_idx)
        vocab = int(getattr(getattr(pl_module, "config", None), "vocab_size", 0) or 0)
        for index in self._selected(len(stats), names):
            ids_TK = stats[index].expert_ids
            if ids_TK is None:
                continue
            name = names[index] if index < len(names) else ""
            tokens = _pick_stream(streams, name, ids_TK.shape[0])
            if tokens is None:
                continue
            num_experts = stats[index].tokens_per_expert.numel()
            size = max(vocab, int(tokens.max()) + 1)
            counts = self._counts.get(index)
            if counts is None or counts.shape[1] < size:
                grown = torch.zeros(num_experts, size, dtype=torch.float64, device=ids_TK.device)
                if counts is not None:
                    grown[:, : counts.shape[1]] = counts
                counts = grown
            tokens_TK = tokens.to(ids_TK.device).reshape(-1, 1).expand_as(ids_TK)
            live = ids_TK >= 0
            flat = ids_TK[live] * counts.shape[1] + tokens_TK[live]
            counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
            self._counts[index] = counts

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._counts:
            return
        names = [name for name, _ in moe_layers(pl_module)]
        tokenizer = self._get_tokenizer(trainer, pl_module)
        results: dict[str, dict[int, dict[str, Any]]] = {}
        writer = tensorboard(trainer)
        for index in sorted(self._counts):
            counts_EV = reduce_sum(trainer, self._counts[index]).cpu()
            classes_V = self._token_classes(tokenizer, counts_EV.shape[1])
            name = names[index] if index < len(names) else f"layer_{index}"
            per_expert: dict[int, dict[str, Any]] = {}
            for expert, counts_V in enumerate(counts_EV):
                total = float(counts_V.sum())
                top = counts_V.topk(min(self.top_n, counts_V.numel()))
                top_tokens = [
                    (_decode(tokenizer, int(t)), int(c))
                    for c, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                    if c > 0
                ]
                by_class = torch.zeros(len(TOKEN_CLASSES), dtype=torch.float64).index_add_(0, classes_V, counts_V)
                shares = (by_class / total).tolist() if total > 0 else [0.0] * len(TOKEN_CLASSES)
                per_expert[expert] = {
                    "copies": int(total),
                    "top_tokens": top_tokens,
                    "classes": dict(zip(TOKEN_CLASSES, shares, strict=True)),
                }
            results[name] = per_expert
            if writer is not None:
                writer.add_text(f"specialization/layer_{index}", _markdown(name, per_expert), trainer.global_step)
        self.results = results
        self._counts = {}

    def _get_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self._tokenizer is None:
            data = getattr(trainer, "datamodule", None)
            self._tokenizer = getattr(data, "tokenizer", None)
            if self._tokenizer is None and getattr(pl_module, "tokenizer_json", None):
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_str(pl_module.tokenizer_json)
        return self._tokenizer

    def _token_classes(self, tokenizer: Any, vocab: int) -> Tensor:
        if self._classes is None or self._classes.numel() < vocab:
            special = _special_ids(tokenizer)
            names = [
                "mixed" if tokenizer is None else token_class(_decode(tokenizer, i), i in special) for i in range(vocab)
            ]
            self._classes = torch.tensor([TOKEN_CLASSES.index(n) for n in names], dtype=torch.long)
        return self._classes[:vocab]


def _decode(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _special_ids(tokenizer: Any) -> set[int]:
    if tokenizer is None or not hasattr(tokenizer, "get_added_tokens_decoder"):
        return set()
    return {i for i, token in tokenizer.get_added_tokens_decoder().items() if getattr(token, "special", True)}


def _token_streams(
    pl_module: pl.LightningModule, batch: Tensor | Mapping[str, Tensor], batch_idx: int
) -> dict[str, Tensor]:
    """The token ids each kind of MoE layer routed, ``(B, T)``: ``"decoder"`` (and ``"encoder"``).

    A padded dict batch (``CausalLMModule``) routes its ``input_ids``; its padding has expert id -1 and is not counted.
    """
    from lightning_moe.module import Seq2SeqLMModule

    if isinstance(batch, Mapping):
        return {"decoder": batch["input_ids"]}

    if isinstance(pl_module, Seq2SeqLMModule):
        from lightning_moe.data.span_corruption import span_corruption

        hp = pl_module.hparams
        inputs, targets = span_corruption(
            batch,
            pl_module.config.vocab_size - 1,
            hp.noise_density,
            hp.mean_span_length,
            torch.Generator().manual_seed(batch_idx),
        )
        start = torch.full_like(targets[:, :1], pl_module.decoder_start_id)
        return {"encoder": inputs, "decoder": torch.cat([start, targets[:, :-1]], dim=1)}
    return {"decoder": batch[:, :-1]}


def _mtp_depth(layer_name: str) -> int:
    """The depth ``k`` of the multi-token-prediction module holding a layer (``model.mtp.{k - 1}....``), else 0."""
    found = re.search(r"(?:^|\.)mtp\.(\d+)\.", layer_name)
    return 0 if found is None else int(found.group(1)) + 1


def _pick_stream(streams: dict[str, Tensor], layer_name: str, num_tokens: int) -> Tensor | None:
    kind = "encoder" if "encoder" in layer_name and "encoder" in streams else "decoder"
    tokens = streams.get(kind)
    if tokens is None:
        return None
    tokens = tokens[:, _mtp_depth(layer_name) :].reshape(-1)  # depth k embeds the tokens k positions on
    return tokens if tokens.numel() == num_tokens else None


def _markdown(name: str, per_expert: dict[int, dict[str, Any]]) -> str:
    header = "| expert | copies | " + " | ".join(TOKEN_CLASSES) + " | top tokens |"
    rule = "|" + "---|" * (len(TOKEN_CLASSES) + 3)
    rows = []
    for expert, info in per_expert.items():
        shares = " | ".join(f"{100 * info['classes'][c]:.0f}%" for c in TOKEN_CLASSES)
        tokens = ", ".join(f"`{text!r}`×{count}".replace("|", "\\|") for text, count in info["top_tokens"])
        rows.append(f"| {expert} | {info['copies']} | {shares} | {tokens} |")
    return f"**{name}**\n\n" + "\n".join([header, rule, *rows])
