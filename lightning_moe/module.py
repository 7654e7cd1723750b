"""LightningModules that train zoo models: causal LM (decoder-only families) and seq2seq (Switch).

Both share :class:`MoELanguageModule`: the model is built from a preset name plus overrides; the loss is
cross-entropy plus each MoE layer's auxiliary losses times their coefficients (defaults from the preset);
AdamW without weight decay on norms, biases and embeddings; linear warmup then cosine decay.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import BatchSampler, DistributedSampler
from torchmetrics import MeanMetric

from lightning_moe import zoo
from lightning_moe.data.span_corruption import check_span_settings, span_corruption, span_counts
from lightning_moe.data.tokenizer import PAD_TOKEN
from lightning_moe.nn.compile import check_compile_backend, compile_blocks, uncompiled
from lightning_moe.nn.config import check_token_mask, is_number
from lightning_moe.nn.encoder_decoder import EncoderDecoderLM
from lightning_moe.nn.experts import FRESH_PAGES_MIN_BYTES
from lightning_moe.nn.experts import reuse_expert_grad_memory as _reuse_expert_grad_memory
from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.nn.transformer import check_token_ids

AUX_TERMS = {"load_balance": "load_balance_coef", "z_loss": "z_loss_coef", "seq_balance": "seq_balance_coef"}
NAN_POLICIES = ("raise", "skip")
# Config fields a resume may change: they steer training (loss coefficients, router noise, token dropping by capacity)
# or how the same weights compute (kernels, gate precision, the initialisation the checkpoint overwrites), not what
# the weights are or what they mean.
RESUMABLE_FIELDS = frozenset(
    {
        "init_std",
        "load_balance_coef",
        "z_loss_coef",
        "seq_balance_coef",
        "mtp_loss_coef",
        "bias_update_speed",
        "router_jitter",
        "random_routing",
        "capacity_factor",
        "eval_capacity_factor",
        "expert_capacity",
        "capacity_scope",
        "expert_kernel",
        "router_gate_precision",
    }
)
# Arguments of zoo.upcycle that only shape the first weights, which a checkpoint overwrites.
UPCYCLE_INIT = ("noise_std", "zero_router")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss, a router's logits or a gradient stop being finite."""


class MoELanguageModule(L.LightningModule):
    """What the causal and seq2seq modules share.

    Attributes:
        seq2seq: Whether the subclass trains encoder-decoder models (the zoo's Switch family) rather than
            decoder-only ones; a preset of the other kind is refused.

    The training and validation losses come from the model given its targets: the LM head and the
    cross-entropy run chunk by chunk (:func:`lightning_moe.nn.cross_entropy.linear_cross_entropy`), so no step
    holds the whole ``(B, T, V)`` logits, their float32 copy or their gradients.

    Args:
        arch: Zoo preset name (``lightning_moe.zoo.names()``).
        overrides: Config fields to override (``{"num_layers": 4}``).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).
        betas: AdamW betas.
        warmup_steps: Linear warmup steps.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` after the cosine decay.
        load_balance_coef: Load-balancing loss coefficient (``None``: the preset's).
        z_loss_coef: Router z-loss coefficient (``None``: the preset's).
        seq_balance_coef: Sequence-wise balance loss coefficient (``None``: the preset's).
        mtp_loss_coef: Weight of DeepSeek-V3's multi-token-prediction loss for models with MTP modules
            (``mtp_depth > 0``; ``None``: the preset's ``mtp_loss_coef``, 0.3).
        nan_policy: On a non-finite loss or gradient: ``"raise"`` (stop with an error naming the layer or
            parameter and the step, before the optimizer step, so the weights and the last checkpoint stay
            finite) or ``"skip"`` (skip the batch, or the optimizer step; one process only).
        init_from: A local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) to start from:
            the model is built by :func:`lightning_moe.interop.from_hf` with its config and weights. The path is
            not kept in the hyperparameters: ``arch`` (a preset of the family) and ``overrides`` (every field
            that differs from it) describe the imported model, so the run's checkpoints load without the folder.
        upcycle_from: A dense checkpoint written by ``lightning-moe fit`` (a ``*-dense`` preset or the ``dense``
            override) to start an MoE run from (sparse upcycling, :func:`lightning_moe.zoo.upcycle`): its ``arch``
            and ``overrides`` replace this run's, its weights are loaded, and the model is upcycled. The path is
            not kept in the hyperparameters (``arch``, ``overrides`` and ``upcycle`` describe the model), so
            ``load_from_checkpoint`` of the upcycled run needs only its own checkpoint.
        upcycle: Arguments of :func:`lightning_moe.zoo.upcycle` (``num_experts``, ``top_k``, ``noise_std``,
            ``split_hidden``, ``zero_router``); ``num_experts`` and ``top_k`` default to the preset's. Set (with
            ``upcycle_from`` unset) it upcycles the freshly built dense model, which is how a checkpointed upcycled
            run is rebuilt.
        reuse_expert_grad_memory: Keep the expert weight-gradient memory between steps on the CPU
            (:func:`lightning_moe.nn.experts.reuse_expert_grad_memory`): writing the gradients into mapped
            memory instead of fresh pages makes steps with many or large experts faster (256 experts: ~15%);
            under Lightning's loop the previous gradients are alive during the forward anyway, so the peak
            grows only where the backward starts (by up to the expert gradients' size). No effect on CUDA.
        reuse_expert_grad_memory_min_mib: With ``reuse_expert_grad_memory``, keep the memory only for expert
            modules whose largest stacked weight has at least this many MiB (default 32: below that glibc reuses
            freed blocks without page faults, and keeping them measured no faster; 0 keeps every module's).
        compile: Compile each block with ``torch.compile`` when training starts
            (:func:`lightning_moe.nn.compile.compile_blocks`): ``True`` for the default backend (inductor), or a
            backend's name. The routed experts' dispatch stays eager; the results are the same as uncompiled.
            ``generate`` runs uncompiled.

    Raises:
        ValueError: For an unknown preset (with close matches), an unknown override or a bad argument.
    """

    seq2seq = False

    def __init__(
        self,
        arch: str = "mixtral-tiny",
        overrides: dict[str, Any] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        load_balance_coef: float | None = None,
        z_loss_coef: float | None = None,
        seq_balance_coef: float | None = None,
        mtp_loss_coef: float | None = None,
        nan_policy: str = "raise",
        init_from: str | None = None,
        upcycle_from: str | None = None,
        upcycle: dict[str, Any] | None = None,
        reuse_expert_grad_memory: bool = True,
        reuse_expert_grad_memory_min_mib: float = FRESH_PAGES_MIN_BYTES / 2**20,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"nan_policy={nan_policy!r} is invalid: must be one of {', '.join(map(repr, NAN_POLICIES))}"
            )
        if not isinstance(arch, str):
            raise ValueError(f"arch={arch!r} is invalid: must be a preset name (lightning_moe.zoo.names())")
        for name, value in (("overrides", overrides), ("upcycle", upcycle)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name}={value!r} is invalid: must be a dict of field names to values, or None")
        if not isinstance(reuse_expert_grad_memory, bool):
            raise ValueError(f"reuse_expert_grad_memory={reuse_expert_grad_memory!r} is invalid: must be a bool")
        if isinstance(compile, str):
            check_compile_backend("compile", compile)
        elif not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} is invalid: must be true, false or a torch.compile backend's name")
        if not is_number(lr) or lr <= 0:
            raise ValueError(f"lr={lr!r} is invalid: must be a finite number > 0")
        if not is_number(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: must be a finite number >= 0")
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2
        if not pair or not all(is_number(beta) and 0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas={betas!r} is invalid: must be two numbers in [0, 1)")
        if not is_number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={min_lr_ratio!r} is invalid: must be in [0, 1]")
        for name, coef in (
            ("load_balance_coef", load_balance_coef),
            ("z_loss_coef", z_loss_coef),
            ("seq_balance_coef", seq_balance_coef),
        ):
            if coef is not None and not (is_number(coef) and coef >= 0):
                raise ValueError(f"{name}={coef!r} is invalid: must be a finite number >= 0, or None for the preset's")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: must be an int >= 0")
        if mtp_loss_coef is not None and not (is_number(mtp_loss_coef) and mtp_loss_coef >= 0):
            raise ValueError(f"mtp_loss_coef={mtp_loss_coef!r} is invalid: must be a finite number >= 0")
        if not (is_number(reuse_expert_grad_memory_min_mib) and reuse_expert_grad_memory_min_mib >= 0):
            raise ValueError(
                f"reuse_expert_grad_memory_min_mib={reuse_expert_grad_memory_min_mib!r} is invalid: must be a finite "
                "number >= 0"
            )
        self.save_hyperparameters(ignore=["upcycle_from"])
        # The tokenizer the starting weights were trained with (upcycle_from, init_from): the data's must match.
        self._start_tokenizer: tuple[str, str | None] | None = None
        if init_from is not None and (upcycle_from is not None or upcycle is not None):
            raise ValueError(f"init_from={init_from!r} is invalid with upcycle_from or upcycle: pick one start")
        dense_state = None
        if upcycle_from is not None:
            if overrides:
                raise ValueError(f"overrides={overrides!r} is invalid with upcycle_from: the checkpoint sets them")
            arch, overrides, dense_state, tokenizer_json = _read_dense_checkpoint(upcycle_from)
            self.hparams.arch, self.hparams.overrides = arch, overrides
            self._start_tokenizer = (f"upcycle_from={upcycle_from!r}", tokenizer_json)
        if init_from is not None:
            if not isinstance(init_from, (str, os.PathLike)) or not (Path(init_from) / "config.json").is_file():
                raise ValueError(
                    f"init_from={init_from!r} is invalid: must be the path of a local Hugging Face checkpoint "
                    "directory (config.json and *.safetensors)"
                )
            if overrides:
                raise ValueError(
                    f"overrides={overrides!r} is invalid with init_from: the checkpoint's config.json sets the model"
                )
            from lightning_moe.interop.hf import from_hf

            self.model = from_hf(init_from)
            self.config = self.model.zoo_config
            self.hparams.arch, self.hparams.overrides = _as_preset(self.config)
            self.hparams.init_from = None
            tokenizer_file = Path(init_from) / "tokenizer.json"
            tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
            self._start_tokenizer = (f"init_from={init_from!r}", tokenizer_json)
        else:
            self.config = zoo.config(arch, **(overrides or {}))
            _check_memory(self.config, arch)
            self.model = zoo.build(self.config)
            if dense_state is not None:
                self.model.load_state_dict(dense_state)
            if upcycle is not None or upcycle_from is not None:
                upcycle = _upcycle_args(self.config, upcycle or {})
                self.hparams.upcycle = upcycle
                self.model = zoo.upcycle(self.model, **upcycle)
        # Loggers write hparams_initial (hparams.yaml): the network as the checkpoints record it, not the start's path.
        self._hparams_initial = copy.deepcopy(self._hparams)
        seq2seq = isinstance(self.model, EncoderDecoderLM)
        if seq2seq != self.seq2seq:
            kind, module, example = (
                ("an encoder-decoder", "Seq2SeqLMModule", "switch-tiny")
                if seq2seq
                else ("a decoder", "CausalLMModule", "mixtral-tiny")
            )
            raise ValueError(
                f"arch={arch!r} is invalid for {type(self).__name__}: it is {kind} model; train it with {module} "
                f"(configs/{example}.yaml shows the {module} setup)"
            )
        self.coefs = {
            term: (getattr(self.config, field) if value is None else value)
            for (term, field), value in zip(
                AUX_TERMS.items(), (load_balance_coef, z_loss_coef, seq_balance_coef), strict=True
            )
        }
        self.mtp_loss_coef = getattr(self.config, "mtp_loss_coef", 0.0) if mtp_loss_coef is None else mtp_loss_coef
        if mtp_loss_coef and not getattr(self.config, "mtp_depth", 0):
            rank_zero_warn(
                f"mtp_loss_coef={mtp_loss_coef!r} has no effect: the model has no multi-token-prediction modules "
                "(DeepSeek presets with the override mtp_depth > 0 have them)"
            )
        if reuse_expert_grad_memory:
            _reuse_expert_grad_memory(self.model, min_bytes=int(reuse_expert_grad_memory_min_mib * 2**20))
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        # The losses of the second and later validation and test dataloaders, by index (see eval_loss).
        self._more_eval_losses: dict[str, dict[int, MeanMetric]] = {"val": {}, "test": {}}
        self.tokenizer_json: str | None = None
        # Training samples seen by all ranks together, saved in checkpoints: where the data resumes, also at
        # another world size.
        self.train_samples_seen: int | None = 0
        # Where the training data stands, (epoch, samples of it consumed by all ranks), kept through the data module
        # (TextDataModule.advance_position) and saved in checkpoints: a resume continues there at any world size.
        self.train_data_position: tuple[int, int] | None = (0, 0)
        self._step_start = 0.0
        self._step_tokens = 0
        self._train_seed: int | None = None  # see on_train_batch_start
        self._load_before_batch: list[Tensor] = []  # see on_train_batch_start
        self._hold_schedule = False  # the optimizer step applied nothing (nan_policy='skip'): see lr_scheduler_step

    # -- shared pieces --------------------------------------------------------------------------------

    def _all_stopped(self, done_B1: Tensor) -> bool:
        """Whether generation with a ``stop_id`` may end: every sequence is done (on every rank, where that matters).

        With sharded parameters (``ExpertParallelStrategy``: FSDP2 all-gathers, the MoE all-to-all) every forward is
        a collective, so a rank whose sequences all stopped must keep running forwards until every rank's have: the
        decision is all-reduced over the ranks.
        """
        done = bool(done_B1.all())
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or not any(isinstance(p, DTensor) for p in self.parameters()):
            return done
        return bool(trainer.strategy.reduce_boolean_decision(done, all=True))

    def _sample_loop(
        self,
        ids: Tensor,
        logits: Tensor,
        next_logits: Callable[[Tensor, Tensor], Tensor],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        stop_id: int | None,
    ) -> Tensor:
        """The decoding loop both ``generate`` methods share, in eval mode with the arguments checked.

        Args:
            ids: ``(B, T)`` ids so far (the prompt, or the decoder start id).
            logits: ``(B, V)`` logits of the token after ``ids``.
            next_logits: ``(new_ids_B1, ids_BT) -> (B, V)``, the logits after one more token: the model's forward
                on the new token (with a key/value cache) or on all ids so far.
            max_new_tokens: Tokens to add.
            temperature: 0 for greedy, else the sampling temperature.
            top_k: Sample among the ``top_k`` most likely tokens only (``None``: all).
            stop_id: A token that ends a sequence, which then repeats it (``None``: never stops early).

        Returns:
            ``(B, T + n)`` ids, ``n <= max_new_tokens``.
        """
        done_B1 = torch.zeros_like(ids[:, :1], dtype=torch.bool)
        for step in range(max_new_tokens):
            next_ids = sample_next(logits.float(), temperature, top_k)
            if stop_id is not None:
                next_ids = next_ids.masked_fill(done_B1, stop_id)
                done_B1 = done_B1 | (next_ids == stop_id)
            ids = torch.cat([ids, next_ids], dim=1)
            if step == max_new_tokens - 1 or (stop_id is not None and self._all_stopped(done_B1)):
                break
            logits = next_logits(next_ids, ids)
        return ids

    @property
    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """The model's MoE layers with their module names, in forward order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MoELayer)]

    def aux_loss(self, router_stats: list[MoEStats]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the auxiliary losses over layers, and each term's mean over layers."""
        total = torch.zeros((), device=self.device)
        terms: dict[str, Tensor] = {}
        for term, coef in self.coefs.items():
            values = [s.losses[term] for s in router_stats if term in s.losses]
            if not values:
                continue
            mean = torch.stack(values).mean()
            terms[term] = mean.detach()
            if coef:
                total = total + coef * torch.stack(values).sum()
        return total, terms

    def check_finite(self, loss: Tensor, router_stats: list[MoEStats]) -> bool:
        """True if training may go on with this loss; raises or returns False (skip) otherwise.

        A skipped batch's routing is taken back out of the MoE layers' ``tokens_per_expert`` counts, so that the
        auxiliary-loss-free bias update of its optimizer step sees only the micro-batches it trains on.
        """
        if torch.isfinite(loss):
            return True
        where = "the loss"
        for (name, _), stats in zip(self.moe_layers, router_stats, strict=False):
            if not torch.isfinite(stats.losses["z_loss"]):
                where = f"the router logits of layer {name}"
                break
        message = f"non-finite value in {where} at step {self.global_step}"
        if self.hparams.nan_policy == "raise":
            single = self._trainer is None or self._trainer.world_size == 1
            hint = " (set nan_policy='skip' to skip such batches)" if single else ""
            raise NonFiniteLossError(message + hint)
        rank_zero_warn(f"skipping batch: {message}")
        if self.training:  # the skipped batch's routing must not reach the bias update (LoadBalancingBias)
            for (_, layer), load_E in zip(self.moe_layers, self._load_before_batch, strict=False):
                layer.tokens_per_expert.copy_(load_E)
        return False

    def configure_model(self) -> None:
        """Compile the blocks if ``compile`` asks; ``ExpertParallelStrategy`` shards ``self.model`` after this hook."""
        if self.hparams.get("compile"):
            backend = self.hparams.compile
            compile_blocks(self.model, **({} if backend is True else {"backend": backend}))

    def setup(self, stage: str) -> None:
        """Check the data against the model before any work: vocabulary and block size.

        Also warns when fitting in ``16-true`` precision (float16 weights, no loss scaling), and refuses
        ``nan_policy='skip'`` with several processes (Lightning cannot skip a step on one rank only).
        """
        if stage == "fit" and self._trainer is not None:
            self.check_world_size(self.trainer.world_size)
        if stage == "fit" and self._trainer is not None and str(self.trainer.precision) == "16-true":
            rank_zero_warn(
                "precision='16-true' trains float16 weights and AdamW states without loss scaling: the squared-"
                "gradient averages underflow to 0 and the updates blow up (mixtral-tiny on the CPU: 7.05 -> 95.9 "
                "in 10 steps); use 'bf16-mixed', "
                "'bf16-true' or '16-mixed'"
            )
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None or getattr(data, "tokenizer", None) is None:
            return
        self.check_data(data.vocab_size, data.block_size, getattr(data, "tokenizer_path", None))
        self.tokenizer_json = data.tokenizer.to_str()
        if stage == "fit" and self._start_tokenizer is not None:
            self._check_start_tokenizer(data.tokenizer)

    def _check_start_tokenizer(self, tokenizer: Any) -> None:
        """Refuse data whose tokenizer differs from the one the starting weights learnt (token ids mean text)."""
        from tokenizers import Tokenizer

        source, saved = self._start_tokenizer
        if saved is None:
            rank_zero_warn(
                f"{source} holds no tokenizer: the data's tokenizer must be the one those weights were trained with "
                "(data.tokenizer_path), or every token id stands for other text"
            )
        elif Tokenizer.from_str(saved).to_str() != tokenizer.to_str():
            raise ValueError(
                f"{source} is invalid with this data: its weights were trained with another tokenizer, so every token "
                "id would stand for other text; use that run's data settings, or its tokenizer as data.tokenizer_path "
                "(to_hf writes it as tokenizer.json)"
            )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike | IO[bytes], *args: Any, **kwargs: Any
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, which also reads a sharded (expert-parallel) checkpoint folder.

        A folder is read whole into memory first (:func:`~lightning_moe.strategies.full_checkpoint`: weights,
        hyperparameters and tokenizer; no optimizer state), as one process holds the model anyway.

        Raises:
            FileNotFoundError: For a folder that is not a complete sharded checkpoint, naming what is missing.
        """
        if isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_dir():
            from lightning_moe.strategies.checkpoint import full_checkpoint

            buffer = io.BytesIO()
            torch.save(full_checkpoint(checkpoint_path), buffer)
            buffer.seek(0)
            checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def check_world_size(self, world_size: int) -> None:
        """Refuse ``nan_policy='skip'`` with several processes (``lightning-moe fit`` checks before it starts them).

        Raises:
            ValueError: If ``nan_policy`` is ``'skip'`` and ``world_size > 1``.
        """
        if self.hparams.nan_policy == "skip" and world_size > 1:
            raise ValueError(
                f"nan_policy='skip' is invalid with {world_size} processes: a rank that skips its batch leaves the "
                "others waiting in the step's collectives (Lightning refuses it at the first non-finite loss); use "
                "'raise'"
            )

    def check_data(self, vocab_size: int, block_size: int, tokenizer_path: str | None = None) -> None:
        """Check the data's vocabulary and block size against the model (``lightning-moe`` checks before tokenizing).

        Args:
            vocab_size: The tokenizer's vocabulary size.
            block_size: Tokens per training block.
            tokenizer_path: The tokenizer file the vocabulary comes from (``None``: ``data.vocab_size``).

        Raises:
            ValueError: If the vocabulary exceeds the model's ``vocab_size`` or the blocks its ``max_seq_len``.
        """
        if vocab_size > self.config.vocab_size:
            model = f"the model's vocab_size={self.config.vocab_size} ({self.hparams.arch})"
            if tokenizer_path is not None:
                raise ValueError(
                    f"data.tokenizer_path={tokenizer_path!r} is invalid: its {vocab_size} tokens exceed {model}; set "
                    f"model.overrides.vocab_size to at least {vocab_size}"
                )
            raise ValueError(
                f"data.vocab_size={vocab_size} is invalid: the tokenizer's vocabulary exceeds {model}; lower "
                "data.vocab_size or set model.overrides.vocab_size"
            )
        max_len = getattr(self.config, "max_seq_len", None)
        if max_len is not None and block_size > max_len:
            raise ValueError(f"data.block_size={block_size} is invalid: longer than the model's max_seq_len={max_len}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the tokenizer with the weights so ``generate`` needs nothing else, and the training samples seen."""
        if self.tokenizer_json is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_json
        checkpoint["train_samples_seen"] = self.train_samples_seen
        checkpoint["train_data_position"] = self.train_data_position
        checkpoint["train_seed"] = self._train_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tokenizer saved with the weights; resume with this run's optimizer settings.

        Refuses a checkpoint of another network (``arch``, ``overrides`` and ``upcycle`` that build another config
        but for training-only fields, see :meth:`_check_same_network`; ``--ckpt_path last`` takes the network from
        the command line) and one whose tokenizer differs from the one this run's data built (changed ``data.*``
        settings): the weights would be trained or evaluated on token ids that mean other text. A checkpoint without
        a tokenizer keeps the data's (with a warning that it must be the one the weights learnt).

        The optimizer and scheduler states restored after this hook carry the saved run's learning rate, weight
        decay and betas; a resume that changes them (``--model.init_args.lr``, ...) would otherwise keep the
        old ones. The saved learning rates (the scheduler's base rates and every group's current and initial
        rate) are scaled by ``lr / saved lr``, which keeps the schedule's position; the decayed group takes this
        run's ``weight_decay``, every group its ``betas``.
        """
        saved = checkpoint.get("hyper_parameters", {})
        self._check_same_network(saved)
        saved_tokenizer = checkpoint.get("tokenizer_json")
        if self.tokenizer_json is not None and saved_tokenizer is not None and saved_tokenizer != self.tokenizer_json:
            saved_data = checkpoint.get("datamodule_hyper_parameters", {})
            data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            now = dict(getattr(data, "hparams", {}) or {})
            changed = {k: (saved_data[k], now[k]) for k in saved_data if k in now and saved_data[k] != now[k]}
            raise ValueError(
                "the data's tokenizer differs from the checkpoint's: the model's token ids would stand for other "
                "text. Use the data settings of the checkpoint's run"
                + (f"; changed (checkpoint, now): {changed}" if changed else "")
                + " (data.sources, max_bytes, vocab_size and tokenizer_path decide the tokenizer)"
            )
        if saved_tokenizer is not None:
            self.tokenizer_json = saved_tokenizer
        elif self.tokenizer_json is not None:  # keep the data's: later checkpoints and generate need it
            rank_zero_warn(
                "the checkpoint holds no tokenizer: the data's tokenizer must be the one its weights were trained "
                "with, or every token id stands for other text"
            )
        self.train_samples_seen = checkpoint.get("train_samples_seen")  # None in older files: the step count then
        position = checkpoint.get("train_data_position")  # None in older files: the data module reads the count
        self.train_data_position = None if position is None else (int(position[0]), int(position[1]))
        self._train_seed = checkpoint.get("train_seed")
        hp = self.hparams
        ratio = hp.lr / saved["lr"] if saved.get("lr") else 1.0
        for state in checkpoint.get("optimizer_states", []):
            for index, group in enumerate(state.get("param_groups", [])):
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = group[key] * ratio
                if "betas" in group:
                    group["betas"] = tuple(hp.betas)
                if index == 0 and "weight_decay" in group:  # configure_optimizers: the decayed parameters first
                    group["weight_decay"] = hp.weight_decay
        for state in checkpoint.get("lr_schedulers", []):
            for key in ("base_lrs", "_last_lr"):
                if key in state:
                    state[key] = [lr * ratio for lr in state[key]]

    def _check_same_network(self, saved: dict[str, Any]) -> None:
        """Refuse a checkpoint whose saved ``arch``, ``overrides`` and ``upcycle`` build another network than this one.

        The configs they build are compared, not the raw values: ``overrides={"num_experts": 8}`` on ``mixtral-tiny``
        (its own value) is the same network as no override. Fields in ``RESUMABLE_FIELDS`` (loss coefficients,
        router noise, token dropping, kernels) may differ: they change how the weights train, not what they are.

        Raises:
            ValueError: Naming the argument, both values and each config field that differs (checkpoint, now).
        """
        if "arch" not in saved:
            return
        key = "overrides" if saved["arch"] == self.hparams.arch else "arch"
        hint = (
            "Pass the same --model settings, or the checkpoint's file path as --ckpt_path (then the network comes "
            "from the checkpoint)"
        )
        try:
            theirs = zoo.config(saved["arch"], **(saved.get("overrides") or {}))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"arch={saved['arch']!r} with overrides={saved.get('overrides')!r} of this checkpoint cannot be "
                f"rebuilt: {error}"
            ) from error
        differ = _config_differences(theirs, self.config)
        if differ:
            raise ValueError(
                f"{key}={self.hparams.get(key)!r} is invalid for this checkpoint, which was trained with "
                f"{key}={saved.get(key)!r}: they build another network ({differ}), which the weights would not fit "
                f"or would compute something else in. {hint}"
            )
        mine_up, their_up = (
            None if up is None else {k: v for k, v in _upcycle_args(self.config, up).items() if k not in UPCYCLE_INIT}
            for up in (self.hparams.get("upcycle"), saved.get("upcycle"))
        )
        if mine_up != their_up:
            raise ValueError(
                f"upcycle={self.hparams.get('upcycle')!r} is invalid for this checkpoint, which was trained with "
                f"upcycle={saved.get('upcycle')!r}: the weights would not fit. {hint}"
            )

    def on_train_start(self) -> None:
        """Set each restored learning rate to this run's schedule at the restored step.

        A resume restores the optimizer's last rates, which the saved run's schedule gave; the schedule itself
        (warmup, cosine to ``max_steps``) is this run's. They differ when a finished run is extended with a
        larger ``max_steps``: the first step after the resume would take the old run's final rate.
        """
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                steps = zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
                for group, base_lr, rate in steps:
                    group["lr"] = base_lr * rate(scheduler.last_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the batch's random draws; count the samples (where the data resumes); start the clock.

        Router jitter, GShard's random routing and span corruption draw from torch's global generator. It is
        seeded here for every batch from the run's seed (saved in checkpoints), the batch's place in the data
        and the rank, so a resumed run draws what the uninterrupted one drew (the generator's state is not in
        the checkpoint; ``seed_everything`` would restart it at the resume).
        """
        if self._train_seed is None:
            self._train_seed = torch.initial_seed()
        place = self.train_samples_seen if self.train_samples_seen is not None else self.global_step
        torch.manual_seed(hash((self._train_seed, place, self.trainer.global_rank)) % 2**63)
        rows = self.batch_rows(batch)  # every rank's (full batches only)
        if self.train_samples_seen is not None:
            self.train_samples_seen += rows * self.trainer.world_size
        advance = getattr(self.trainer.datamodule, "advance_position", None)
        if self.train_data_position is not None and advance is not None:
            self.train_data_position = advance(
                self.train_data_position, rows * self.trainer.world_size, self.trainer.world_size
            )
        # What the MoE layers counted before this batch (check_finite restores it when the batch is skipped).
        self._load_before_batch = [layer.tokens_per_expert.clone() for _, layer in self.moe_layers]
        self._step_start = time.perf_counter()

    def batch_rows(self, batch: Any) -> int:
        """The sequences in a training batch: a tensor's first size, else ``len(batch)`` (subclasses check it here)."""
        return batch.shape[0] if isinstance(batch, Tensor) else len(batch)

    def log_train(
        self,
        loss: Tensor,
        ce: Tensor | None,
        terms: dict[str, Tensor],
        num_tokens: int,
        num_targets: int | None = None,
    ) -> None:
        """Log training loss, perplexity, each auxiliary term and learning rate (throughput: ``on_train_batch_end``).

        With several processes every value is the mean over the ranks (one all-reduce per step), so the logged
        ``train/loss`` is the global batch's, as the gradients are, not rank 0's; ``train/tokens_per_sec`` counts
        every rank's tokens.

        Args:
            loss: The loss the step trains: cross-entropy plus weighted auxiliary losses.
            ce: This rank's mean cross-entropy, or ``None`` for a batch without a trained target (then
                ``train/loss`` and ``train/ppl`` leave it out, and are not logged where no rank has one: a 0 would
                pull their means down).
            terms: Each auxiliary term's mean over layers.
            num_tokens: This rank's input tokens, padding excluded (``train/tokens_per_sec`` counts them).
            num_targets: This rank's trained targets: with it, ``train/loss`` is the mean over every rank's
                targets (what :meth:`global_token_shares` trains), without it the mean of the ranks' means.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        term_values = list(terms.values())
        tokens: Tensor | int = num_tokens
        if world > 1:  # every rank calls this once per step with the same terms (one model): one all-reduce
            zero = torch.zeros((), device=loss.device)
            weight = 1 if num_targets is None else num_targets
            values = torch.stack(
                [
                    zero if ce is None else ce.detach().float() * weight,
                    zero + (0 if ce is None else weight),
                    loss.detach().float(),
                    *(value.detach().float() for value in term_values),
                    zero + num_tokens,
                ]
            )
            ce_sum, ce_count, loss_sum, *term_sums, tokens = self.trainer.strategy.reduce(values, reduce_op="sum")
            ce = ce_sum / ce_count if ce_count > 0 else None
            loss, term_values = loss_sum / world, [value / world for value in term_sums]
        if ce is not None:
            self.log("train/loss", ce, prog_bar=True)
            self.log("train/ppl", torch.exp(ce.detach().clamp(max=30)))
        self.log("train/total_loss", loss)
        for term, value in zip(terms, term_values, strict=True):
            self.log(f"train/aux/{term}", value)
        self._step_tokens = int(tokens)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``train/tokens_per_sec``: the tokens of all ranks over the whole step (forward, backward, optimizer)."""
        if outputs is not None and self._step_tokens:
            elapsed = max(time.perf_counter() - self._step_start, 1e-9)
            self.log("train/tokens_per_sec", self._step_tokens / elapsed)
        self._step_tokens = 0

    def repeated_rows(self, stage: str, batch_idx: int, rows: int, dataloader_idx: int = 0) -> Tensor | None:
        """``(rows,)`` True for the rows of an evaluation batch that the distributed sampler repeated, else ``None``.

        With several processes Lightning shards ``"val"`` and ``"test"`` data with a ``DistributedSampler``, which
        repeats the first samples so that every rank gets as many (under expert parallelism every rank must run
        as many forwards). Rank ``r`` of ``n`` reads positions ``r, r + n, ...`` of the data followed by the
        repeats, so its ``i``-th sample is a repeat where ``r + i * n`` is past the data's end. The losses leave
        those rows out, so the logged loss is the mean over every sample once, as on one device. ``None`` where
        nothing is repeated or the loader is not a plain sequential one (then every row counts).
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2:
            return None
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
        sampler = getattr(loaders, "sampler", None)
        batch_sampler = getattr(loaders, "batch_sampler", None)
        if (
            not isinstance(sampler, DistributedSampler)
            or sampler.shuffle
            or sampler.drop_last
            or not isinstance(batch_sampler, BatchSampler)
            or batch_sampler.sampler is not sampler
            or batch_sampler.drop_last
        ):
            return None
        size = len(sampler.dataset)
        if sampler.total_size <= size:
            return None
        local = torch.arange(batch_idx * batch_sampler.batch_size, batch_idx * batch_sampler.batch_size + rows)
        return (sampler.rank + local * sampler.num_replicas >= size).to(self.device)

    def eval_loss(self, stage: str, dataloader_idx: int = 0) -> MeanMetric:
        """The token-weighted mean loss of a ``"val"`` or ``"test"`` dataloader (the first: ``val_loss``/``test_loss``).

        Those of a second and later dataloader (several validation or test dataloaders) are made on its first batch.
        Its sums are kept in float32: ``precision="bf16-true"`` or ``"16-true"`` casts the module's tensors, the
        metrics' with them, and summed in bfloat16 the loss drifts, in float16 it overflows to ``inf``.
        """
        if dataloader_idx == 0:
            metric = self.val_loss if stage == "val" else self.test_loss
        else:
            more = self._more_eval_losses[stage]
            if dataloader_idx not in more:
                more[dataloader_idx] = MeanMetric().to(self.device)
            metric = more[dataloader_idx]
        if metric.mean_value.dtype != torch.float32 or metric.dtype != torch.float32:
            metric.set_dtype(torch.float32)
        return metric

    def _log_eval_losses(self, stage: str) -> None:
        """Log each dataloader's mean ``stage`` loss over the tokens of all ranks, and its perplexity.

        One dataloader logs ``{stage}/loss`` and ``{stage}/ppl``; several log them for each with the
        ``/dataloader_idx_N`` suffix ``self.log`` in a step of dataloader ``N`` would add (monitor those names).
        A dataloader without a trained target on any rank logs nothing. With several processes the ranks decide
        that together (one all-reduce): a rank whose rows were all repeats or padding still joins the others'
        ``compute`` and ``log``, whose collectives would otherwise wait for it.
        """
        more = self._more_eval_losses[stage]
        metrics = [(0, self.eval_loss(stage)), *sorted(more.items())]
        counts = [metric.update_count for _, metric in metrics]
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(torch.tensor(counts, device=self.device), reduce_op="sum").tolist()
        for (index, metric), count in zip(metrics, counts, strict=True):
            if count == 0:
                continue
            with warnings.catch_warnings():  # this rank's states may be empty; the sum over ranks is not
                warnings.filterwarnings("ignore", message=r".*``compute`` method of metric .* before the ``update``")
                loss = metric.compute()  # already the mean over all ranks: sync_dist only averages equal values
            suffix = f"/dataloader_idx_{index}" if more else ""
            options = dict(sync_dist=True, add_dataloader_idx=False)  # the suffix is in the name already
            self.log(f"{stage}/loss{suffix}", loss, prog_bar=stage == "val", **options)
            self.log(f"{stage}/ppl{suffix}", torch.exp(loss.clamp(max=30)), **options)
            metric.reset()
        more.clear()

    def on_validation_epoch_end(self) -> None:
        """Log the mean validation loss and its perplexity (per dataloader where there are several)."""
        self._log_eval_losses("val")

    def on_test_epoch_end(self) -> None:
        """Log the mean test loss over the tokens of all ranks, and its perplexity (as validation does)."""
        self._log_eval_losses("test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on norms, biases, embeddings) with linear warmup and cosine decay."""
        decay, no_decay = [], []
        embedding_params = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        seen: set[int] = set()
        for param in self.model.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.dim() < 2 or id(param) in embedding_params else decay).append(param)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            # Not with float16 loss scaling: the scaler must unscale before clipping (see clip_gradients below).
            fused=_can_fuse_adamw(decay + no_decay) and "16-mixed" != str(self._trainer and self.trainer.precision),
        )
        total = self._total_steps()
        if self._trainer is not None and hp.warmup_steps >= total:
            rank_zero_warn(
                f"warmup_steps={hp.warmup_steps} is not below the run's {total} optimizer steps: the learning rate "
                f"rises for the whole run and never reaches lr={hp.lr} (lower --model.warmup_steps)"
            )

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / (hp.warmup_steps + 1)
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check the gradients before the step: a non-finite one would be applied, and then checkpointed.

        With ``nan_policy='raise'`` the error names the first such parameter; with ``'skip'`` every gradient
        is dropped, so the optimizer leaves every parameter and its state as they were. Float16 loss scaling
        skips such steps itself and is left to it.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        named = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        if not named and self.hparams.nan_policy == "skip":  # every micro-batch of the step was skipped
            self._hold_schedule = True
            return
        local = [grad.to_local() if isinstance(grad, DTensor) else grad for _, grad in named]
        finite = not local or bool(torch.stack(torch._foreach_norm(local)).isfinite().all())
        if not finite:  # a float16 norm overflows past 65504 with every element finite: look at the elements
            finite = all(bool(grad.isfinite().all()) for grad in local)
        if self.trainer.world_size > 1:  # sharded gradients: every rank must take the same way
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        bad = next((name for (name, _), grad in zip(named, local, strict=True) if not grad.isfinite().all()), None)
        message = f"non-finite gradient of {bad or 'a parameter on another rank'} at step {self.global_step}"
        if self.hparams.nan_policy == "raise":
            raise NonFiniteLossError(message + " (not applied: the weights and the last checkpoint are finite)")
        rank_zero_warn(f"skipping optimizer step: {message}")
        for param in self.parameters():
            param.grad = None
        self._hold_schedule = True

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step the learning-rate schedule, except after an optimizer step ``nan_policy='skip'`` emptied.

        Such a step applies nothing, so the schedule waits: the next applied step gets the rate the skipped one
        would have had, as Megatron-Core and Hugging Face's trainer do. The step still counts in ``global_step``
        (and towards ``max_steps``).
        """
        if self._hold_schedule:
            self._hold_schedule = False
            return
        scheduler.step() if metric is None else scheduler.step(metric)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Clip as Lightning does, also for the fused AdamW under bf16-mixed.

        Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because with float16 loss
        scaling the gradients would still be scaled; bf16-mixed has no scaler, so its gradients are the true
        ones and the plain clipping applies.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _total_steps(self) -> int:
        """The run's optimizer steps, which the cosine schedule spans (1000, with a warning, where they are unknown).

        Lightning's estimate, with two corrections: under a ``GradientAccumulationScheduler`` each epoch steps as
        its own accumulation factor says (the estimate takes the first epoch's for all), and training data without
        a length (an ``IterableDataset``) with ``max_steps=-1`` has no known end (the estimate is then -1).
        """
        if self._trainer is None:
            return 1000
        trainer = self.trainer
        try:
            steps = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001  (no dataloader yet, e.g. in unit tests)
            return 1000
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        accumulation = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
        if accumulation is not None and math.isfinite(batches) and epochs is not None and epochs >= 0:
            steps = sum(
                math.ceil(batches / accumulation.get_accumulate_grad_batches(epoch)) for epoch in range(max(epochs, 1))
            )
            steps = steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)
        if math.isfinite(steps) and steps >= 0:
            return int(steps)
        rank_zero_warn(
            "the run has no step limit (max_steps=-1 with max_epochs=-1, or with training data of no length such as "
            "an IterableDataset): the cosine schedule decays over 1000 optimizer steps and then stays at "
            "min_lr_ratio * lr (set trainer.max_steps, or max_epochs with data of a known length, for a schedule over "
            "the whole run)"
        )
        return 1000


def available_memory() -> int | None:
    """Bytes of memory the machine has available now (Linux ``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(config: zoo.ModelConfig, arch: str) -> None:
    """Refuse to build a model whose weights alone exceed the memory available, before allocating any.

    A published preset (``mixtral-8x7b``: 187 GB in float32) would otherwise run the machine out of memory. Not
    checked inside ``torch.device("meta")`` or where the default device is not the CPU.

    Raises:
        ValueError: Naming the preset, its size and the memory available.
    """
    if torch.empty(0).device.type != "cpu":
        return
    available = available_memory()
    if available is None:
        return
    params = zoo.count_parameters(config).total
    needed = params * torch.empty(0).element_size()
    if needed > available:
        raise ValueError(
            f"arch={arch!r} is invalid on this machine: its {params / 1e9:.1f}B parameters need "
            f"{needed / 2**30:.1f} GiB in {torch.get_default_dtype()} and {available / 2**30:.1f} GiB of memory is "
            "available; pick a smaller preset (a -tiny one) or smaller overrides, or count its parameters on the "
            "meta device (lightning_moe.zoo.count_parameters)"
        )


def _can_fuse_adamw(params: list[Tensor]) -> bool:
    """Whether the fused AdamW kernel takes these parameters: plain float tensors on the CPU or CUDA.

    Fused is one pass over each tensor with no temporaries; the default for-loop AdamW allocates two
    parameter-sized temporaries per tensor, which on the CPU fault in fresh pages for the large stacked
    expert weights (an optimizer step of a 59M-parameter Switch model: 0.217 s for-loop, 0.031 s fused).
    Sharded (DTensor) parameters keep the default implementation.
    """
    return bool(params) and all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def _read_dense_checkpoint(path: str) -> tuple[str, dict[str, Any], dict[str, Tensor], str | None]:
    """The ``arch``, ``overrides``, model weights and tokenizer (JSON, if saved) of a dense run's checkpoint."""
    if not Path(path).is_file():
        raise ValueError(f"upcycle_from={path!r} is invalid: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001  (torch.load raises many kinds for a file that is not its own)
        raise ValueError(
            f"upcycle_from={path!r} is invalid: not a readable checkpoint of lightning-moe fit "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'})"
        ) from error
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"upcycle_from={path!r} is invalid: not a checkpoint written by lightning-moe fit")
    if hparams.get("upcycle") is not None or hparams.get("init_from") is not None:
        raise ValueError(f"upcycle_from={path!r} is invalid: an upcycled or imported run, not a dense zoo baseline")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return hparams["arch"], dict(hparams.get("overrides") or {}), state, checkpoint.get("tokenizer_json")


def _as_preset(config: zoo.ModelConfig) -> tuple[str, dict[str, Any]]:
    """The preset of ``config``'s family nearest to it and the overrides that make ``config`` of it (hparams).

    Nearest: the fewest fields to override (an imported Mixtral-8x7B is ``mixtral-8x7b`` with its loss
    coefficients overridden). The overrides are plain values: nested configs as dicts, tuples as lists.

    Raises:
        ValueError: If the overrides do not rebuild ``config`` exactly (a field no override can express).
    """
    family = zoo.family_of(config)
    candidates = {}
    for name in zoo.names():
        if zoo.family_of(name) == family:
            base = zoo.config(name)
            candidates[name] = {
                f.name: _plain(getattr(config, f.name))
                for f in dataclasses.fields(config)
                if getattr(config, f.name) != getattr(base, f.name)
            }
    arch = min(candidates, key=lambda name: len(candidates[name]))
    overrides = candidates[arch]
    if zoo.config(arch, **overrides) != config:
        raise ValueError(f"config={config!r} is invalid: overrides of {arch!r} cannot express it")
    return arch, overrides


def _config_differences(saved: zoo.ModelConfig, now: zoo.ModelConfig) -> str:
    """The fields outside ``RESUMABLE_FIELDS`` in which two configs differ, as ``field: checkpoint A, now B; ...``."""
    if type(saved) is not type(now):
        return f"family: checkpoint {zoo.family_of(saved)}, now {zoo.family_of(now)}"
    return "; ".join(
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, now {getattr(now, f.name)!r}"
        for f in dataclasses.fields(saved)
        if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(now, f.name)
    )


def _plain(value: Any) -> Any:
    """A config value as YAML-friendly data: nested configs as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _upcycle_args(config: zoo.ModelConfig, given: dict[str, Any]) -> dict[str, Any]:
    """``zoo.upcycle`` arguments: ``given`` over the defaults (the preset's ``num_experts`` and ``top_k``)."""
    args = {
        "num_experts": getattr(config, "num_experts", None),
        "top_k": getattr(config, "top_k", 1),  # Switch's config has no top_k: it routes each token to one expert
        "noise_std": 0.0,
        "split_hidden": False,
        "zero_router": False,
    }
    unknown = set(given) - set(args)
    if unknown:
        raise ValueError(f"upcycle={given!r} is invalid: unknown keys {sorted(unknown)}; valid keys are {list(args)}")
    return args | dict(given)


IGNORE_INDEX = -100  # a label that trains nothing (transformers' and F.cross_entropy's)
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def split_causal_batch(
    batch: Tensor | Mapping[str, Tensor], vocab_size: int, max_seq_len: int | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The model inputs, attention mask and targets of a causal-LM batch, the batch checked before any work.

    Two kinds of batches are taken:

    * packed ``(B, T + 1)`` token ids: inputs ``batch[:, :-1]``, targets ``batch[:, 1:]``, no mask;
    * a Hugging Face-style padded dict: ``input_ids`` ``(B, T)``, optional ``attention_mask`` ``(B, T)`` (1 for real
      tokens, 0 for padding, on either side) and optional ``labels`` ``(B, T)`` (``-100``: not trained; default:
      ``input_ids`` with the padding set to ``-100``). As in ``transformers``' causal LMs the labels are shifted
      inside: position ``i`` predicts ``labels[i + 1]`` and the last position nothing. A padding position predicts
      nothing either (``transformers`` would train the first real token of a left-padded row from the padding's
      state), so a row gives what it gives alone, unpadded.

    Args:
        batch: The batch.
        vocab_size: The model's vocabulary (labels must be ids below it, or ``-100``).
        max_seq_len: The model's longest sequence (``None``: no limit).

    Returns:
        ``(input_ids, attention_mask or None, targets)``: ``(B, T)`` each, targets ``-100`` where nothing is trained.

    Raises:
        ValueError: For a batch that is neither, naming the key: an unknown key, no ``input_ids``, a value that is
            not a tensor, ``input_ids`` not ``(B, T)`` integer ids in the vocabulary or longer than ``max_seq_len``,
            an ``attention_mask`` or ``labels`` of another shape, a floating mask, labels that are not integers or
            (on the CPU) hold an id outside ``[0, vocab_size)`` other than ``-100``.
    """
    if isinstance(batch, Tensor):
        return batch[:, :-1], None, batch[:, 1:]
    expected = "a (B, T + 1) tensor of token ids, or a dict of (B, T) 'input_ids', 'attention_mask', 'labels'"
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch of type {type(batch).__name__} is invalid: expected {expected}")
    for key in batch:
        if key not in BATCH_KEYS:
            raise ValueError(
                f"batch key {key!r} is invalid: expected only {', '.join(map(repr, BATCH_KEYS))} (padding goes in "
                "attention_mask, untrained positions are labels -100)"
            )
    if batch.get("input_ids") is None:
        raise ValueError(f"batch is missing 'input_ids' (keys: {list(batch)}): expected {expected}")
    for key in BATCH_KEYS:
        if batch.get(key) is not None and not isinstance(batch[key], Tensor):
            raise ValueError(f"{key} of type {type(batch[key]).__name__} is invalid: expected a (B, T) tensor")
    input_ids, mask, labels = (batch.get(key) for key in BATCH_KEYS)
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids.shape={tuple(input_ids.shape)} is invalid: expected (B, T), both sizes >= 1")
    check_token_ids(input_ids, vocab_size, "input_ids")
    if max_seq_len is not None and input_ids.shape[1] > max_seq_len:
        raise ValueError(
            f"input_ids of {input_ids.shape[1]} tokens is invalid: longer than the model's max_seq_len={max_seq_len}"
        )
    check_token_mask("attention_mask", mask)
    for key, value in (("attention_mask", mask), ("labels", labels)):
        if value is not None and value.shape != input_ids.shape:
            shape = tuple(input_ids.shape)
            raise ValueError(f"{key}.shape={tuple(value.shape)} is invalid: expected the shape of input_ids, {shape}")
    real = None if mask is None else mask.bool()
    if labels is None:
        labels = input_ids if real is None else input_ids.masked_fill(~real, IGNORE_INDEX)
    elif labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels.dtype={labels.dtype} is invalid: expected integer token ids, -100 where not trained")
    elif labels.device.type == "cpu":  # reading the values back would wait for a GPU: checked on the CPU only
        ids = labels.long()
        outside = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= vocab_size))
        if outside.any():
            raise ValueError(
                f"labels holds {int(ids[outside][0])}, which is invalid: expected token ids in [0, {vocab_size}) or "
                f"{IGNORE_INDEX}"
            )
    targets = torch.cat([labels[:, 1:].long(), torch.full_like(labels[:, :1], IGNORE_INDEX, dtype=torch.long)], 1)
    if real is not None:
        targets = targets.masked_fill(~real, IGNORE_INDEX)
    return input_ids, mask, targets


class CausalLMModule(MoELanguageModule):
    """Next-token prediction for the decoder-only families.

    Batches are packed ``(B, T + 1)`` token ids (what :class:`~lightning_moe.data.TextDataModule` gives), or Hugging
    Face-style padded dicts of ``input_ids``, ``attention_mask`` and ``labels`` for data of different lengths
    (instruction data; see :func:`split_causal_batch`). The padding is masked in attention and left out of the MoE
    layers' routing, capacity, auxiliary losses and statistics. The cross-entropy is the mean over the batch's
    trained targets; validation and test losses are weighted by them (the mean over all trained targets), and
    ``train/tokens_per_sec`` counts the input tokens without padding. A batch without a trained target (every
    label ``-100``) adds nothing to the validation or test loss; in training its cross-entropy is 0 with zero
    gradients (not a non-finite loss for ``nan_policy``), so it trains only the auxiliary losses, and
    ``train/loss`` is not logged for it.
    """

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        """The model's output (logits and router statistics)."""
        return self.model(input_ids, attention_mask)

    def _split(self, batch: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
        return split_causal_batch(batch, self.config.vocab_size, getattr(self.config, "max_seq_len", None))

    def batch_rows(self, batch: Tensor | Mapping[str, Tensor]) -> int:
        """The sequences in a training batch, which is checked first (:func:`split_causal_batch`)."""
        return self._split(batch)[0].shape[0]

    def _loss(
        self, batch: Tensor | Mapping[str, Tensor], drop_rows: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], list[MoEStats], list[int]]:
        """Next-token cross-entropy, each MTP depth's loss (none without MTP), stats, and the trained targets of each.

        The last item counts the cross-entropy's trained targets first, then each MTP depth's. Without a trained
        target a loss is 0 (not 0 / 0) with zero gradients. ``drop_rows`` ``(B,)``: rows handled as padding
        (:meth:`repeated_rows`).
        """
        inputs, mask, targets = self._split(batch)
        packed = isinstance(batch, Tensor)
        if drop_rows is not None and bool(drop_rows.any()):
            keep = ~drop_rows[:, None]
            mask = keep.expand_as(inputs) if mask is None else mask.bool() & keep
            targets = targets.masked_fill(~keep, IGNORE_INDEX)
            packed = False
        out = self.model(inputs, mask, targets=targets)  # the loss chunk by chunk, without the (B, T, V) logits
        num_tokens = targets.numel() if packed else int((targets != IGNORE_INDEX).sum())
        ce = out.loss if num_tokens else out.loss.nan_to_num(0.0)
        mtp_losses = list(getattr(out, "mtp_losses", None) or [])  # DeepSeek-V3's MTP, one loss per depth
        counts = [num_tokens]
        real = None if mask is None else mask.bool()
        for k, depth_loss in enumerate(mtp_losses, start=1):
            # Depth k trains position i on targets[i + k] where tokens i and i + k are real (DeepSeekLM).
            if packed:
                trained = targets[:, k:].numel()
            else:
                hit = targets[:, k:] != IGNORE_INDEX
                trained = int((hit if real is None else hit & real[:, :-k] & real[:, k:]).sum())
            counts.append(trained)
            if not trained:
                mtp_losses[k - 1] = depth_loss.nan_to_num(0.0)
        return ce, mtp_losses, out.router_stats, counts

    def global_token_shares(self, counts: Sequence[int], device: torch.device) -> list[Tensor] | list[float]:
        """The factors that turn this rank's mean losses into their parts of the means over every rank's targets.

        Data-parallel gradients are the mean of the ranks' gradients, so a rank's mean times ``count * world /
        total`` trains the mean over all real targets of the global batch, whatever each rank's padding (as
        Hugging Face's ``average_tokens_across_devices`` and torchtitan's global token normalisation do): a rank
        with few real targets no longer weighs as much as a full one, nor does a rank of padding halve the step.
        One all-reduce per step for all counts; 1 on one process, and exactly 1 where every rank has as many
        targets (packed batches). Micro-batches of gradient accumulation still count alike, as Lightning averages
        them.

        Args:
            counts: This rank's trained targets of each loss (the cross-entropy's, then each MTP depth's).
            device: Where the loss is (the all-reduce's tensor goes there).
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return [1.0] * len(counts)
        # Counted in int64: exact at any scale, so equal counts give a share of exactly 1.
        totals = self.trainer.strategy.reduce(torch.tensor(counts, dtype=torch.int64, device=device), reduce_op="sum")
        return [count * world / total for count, total in zip(counts, totals.clamp_min(1).unbind(), strict=True)]

    def training_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        """Cross-entropy plus weighted auxiliary losses (and the weighted MTP loss).

        Returns:
            ``{"loss": ..., "router_stats": [...]}``: callbacks read the detached per-layer statistics from
            the outputs of ``on_train_batch_end``.
        """
        ce, mtp_losses, router_stats, counts = self._loss(batch)
        shares = self.global_token_shares(counts, ce.device)
        aux, terms = self.aux_loss(router_stats)
        loss = ce * shares[0] + aux
        if mtp_losses:  # the mean over depths, each depth's loss weighted by its own targets' share
            terms["mtp"] = torch.stack(mtp_losses).mean().detach()
            if self.mtp_loss_coef:
                mtp = torch.stack([depth * share for depth, share in zip(mtp_losses, shares[1:], strict=True)])
                loss = loss + self.mtp_loss_coef * mtp.mean()
        if not self.check_finite(loss, router_stats):
            return None
        num_tokens = counts[0]
        if not num_tokens:
            rank_zero_warn(
                "a training batch has no trained target (every label -100, or padding): its cross-entropy counts as 0 "
                "and it trains only the auxiliary losses"
            )
        self.log_train(loss, ce if num_tokens else None, terms, _input_tokens(batch), num_targets=num_tokens)
        return {"loss": loss, "router_stats": [s.detach() for s in router_stats]}

    def validation_step(
        self, batch: Tensor | Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        """Accumulate the validation cross-entropy, weighted by trained targets; return the router statistics.

        Rows the distributed sampler repeated count as padding (:meth:`repeated_rows`).
        """
        drop = self.repeated_rows("val", batch_idx, self.batch_rows(batch), dataloader_idx)
        ce, _, router_stats, (num_tokens, *_) = self._loss(batch, drop)
        metric = self.eval_loss("val", dataloader_idx)
        if num_tokens:
            metric.update(ce, weight=num_tokens)
        return {"router_stats": [s.detach() for s in router_stats]}

    def test_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the test cross-entropy, weighted by trained targets (logged at the end of the test epoch)."""
        drop = self.repeated_rows("test", batch_idx, self.batch_rows(batch), dataloader_idx)
        ce, _, _, (num_tokens, *_) = self._loss(batch, drop)
        metric = self.eval_loss("test", dataloader_idx)
        if num_tokens:
            metric.update(ce, weight=num_tokens)

    def predict_step(self, batch: Tensor | Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """Greedy continuation of 32 tokens for each prompt in the batch (fewer where ``max_seq_len`` ends first).

        The batch is ``(B, T)`` prompt ids, or a dict of ``input_ids`` and an optional ``attention_mask`` for prompts
        padded on the left (``labels`` are ignored); the result is ``(B, T + new)``, padding included.

        Raises:
            ValueError: For a dict without ``input_ids`` or with other keys, naming them.
        """
        mask = None
        if isinstance(batch, Mapping):
            unknown = sorted(set(batch) - set(BATCH_KEYS))
            if unknown or batch.get("input_ids") is None:
                raise ValueError(
                    f"batch keys {sorted(batch)} are invalid for predict: expected 'input_ids' and optionally "
                    "'attention_mask' (prompts padded on the left) and 'labels' (ignored)"
                )
            batch, mask = batch["input_ids"], batch.get("attention_mask")
        new_tokens = _predict_new_tokens(self.config, batch.shape[1])
        return self.generate(batch, max_new_tokens=new_tokens, attention_mask=mask)

    @torch.no_grad()
    @uncompiled
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        stop_id: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Continue ``(B, T)`` prompts: greedy when ``temperature == 0``, else sampling (optionally top-k).

        With ``use_cache`` the prompt is encoded once and each new token attends to cached keys and values
        (a key/value cache), instead of re-running the whole sequence per token.

        Args:
            input_ids: ``(B, T)`` prompts, ``T >= 1``; ``T + max_new_tokens`` must not exceed the model's
                ``max_seq_len``.
            max_new_tokens: Tokens to add.
            temperature: 0 for greedy, else the sampling temperature.
            top_k: Sample among the ``top_k`` most likely tokens only (``None``: all); needs ``temperature > 0``.
            use_cache: Decode with a key/value cache.
            stop_id: A token that ends a sequence (the tokenizer's ``<|endoftext|>``): a sequence that produced
                it continues with it, and generation stops once every sequence has (``None``: never stops early).
            attention_mask: ``(B, T)`` 1/True for prompt tokens, 0/False for padding, for prompts of different
                lengths padded on the left (each row's last position must be a real token); each row then
                continues as it would alone.

        Returns:
            ``(B, T + n)`` token ids, ``n <= max_new_tokens`` (``n < max_new_tokens`` only with ``stop_id``).
        """
        check_generation(max_new_tokens, temperature, top_k)
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache={use_cache!r} is invalid: must be True or False")
        check_prompt(input_ids, max_new_tokens, getattr(self.config, "max_seq_len", None))
        mask = attention_mask
        if mask is not None:
            check_attention_mask(mask, input_ids)
            if not mask[:, -1].bool().all():
                raise ValueError(
                    "attention_mask is invalid: a row ends in padding; pad prompts on the left, so that every row's "
                    "last position is the token generation continues from"
                )
        check_stop_id(stop_id, self.config.vocab_size)
        was_training = self.training
        self.eval()
        try:  # an error inside the model (a token id outside the vocabulary) must not leave the module in eval mode
            cache = self.model.new_cache() if use_cache and hasattr(self.model, "new_cache") else None

            def next_logits(new_ids_B1: Tensor, ids_BT: Tensor) -> Tensor:
                nonlocal mask
                if mask is not None:  # the cache's masks cover every position, past and new
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                if cache is not None:
                    return self.model(new_ids_B1, mask, cache=cache).logits[:, -1]
                return self.model(ids_BT, mask).logits[:, -1]

            logits = self.model(input_ids, mask, cache=cache).logits[:, -1]
            ids = self._sample_loop(input_ids, logits, next_logits, max_new_tokens, temperature, top_k, stop_id)
        finally:
            self.train(was_training)
        return ids


def _input_tokens(batch: Tensor | Mapping[str, Tensor]) -> int:
    """The input tokens of a (checked) causal-LM batch without padding: ``B * T`` of a packed ``(B, T + 1)`` one."""
    if isinstance(batch, Tensor):
        return batch[:, :-1].numel()
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int(mask.bool().sum())


def _predict_new_tokens(config: Any, prompt_len: int, wanted: int = 32) -> int:
    """Tokens ``predict`` adds to a prompt of ``prompt_len``: ``wanted``, or fewer to stay within ``max_seq_len``.

    At least one, so that a prompt that already fills ``max_seq_len`` gets :func:`check_prompt`'s error.
    """
    max_len = getattr(config, "max_seq_len", None)
    return wanted if max_len is None else max(1, min(wanted, max_len - prompt_len))


def check_generation(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Check the generation settings (see :func:`sample_next`) before any work.

    Raises:
        ValueError: Unless ``max_new_tokens`` is an int >= 1, ``temperature`` a finite number >= 0 and ``top_k``
            None or >= 1; also for a ``top_k`` with ``temperature == 0`` (greedy decoding would ignore it).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an int >= 1")
    if not (is_number(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} is invalid: must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an int >= 1, or unset for the whole vocabulary")
    if top_k is not None and temperature == 0:
        raise ValueError(
            f"top_k={top_k} is invalid with temperature=0: greedy decoding takes the top token; pass a temperature "
            "> 0 to sample among the top_k"
        )


def check_attention_mask(attention_mask: Any, input_ids: Tensor) -> None:
    """Check a generation's ``attention_mask`` against its ``(B, T)`` ``input_ids`` before any work.

    Raises:
        ValueError: Unless ``attention_mask`` is a bool or integer tensor shaped like ``input_ids`` (a floating mask
            may be an additive 0/-inf one, whose 0s mark the real tokens).
    """
    if not isinstance(attention_mask, Tensor):
        raise ValueError(
            f"attention_mask of type {type(attention_mask).__name__} is invalid: expected a bool or integer tensor "
            f"shaped like input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.shape != input_ids.shape or attention_mask.is_floating_point():
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype} is invalid: "
            f"expected a bool or integer mask shaped like input_ids {tuple(input_ids.shape)}"
        )


def check_stop_id(stop_id: int | None, vocab_size: int) -> None:
    """Check a generation's ``stop_id`` before any work.

    Raises:
        ValueError: Unless ``stop_id`` is ``None`` or an int token id in ``[0, vocab_size)``.
    """
    if stop_id is not None and (
        isinstance(stop_id, bool) or not isinstance(stop_id, int) or not 0 <= stop_id < vocab_size
    ):
        raise ValueError(
            f"stop_id={stop_id!r} is invalid: must be a token id in [0, {vocab_size}), or None to never stop early"
        )


def check_prompt(input_ids: Tensor, max_new_tokens: int, max_seq_len: int | None) -> None:
    """Check the prompts of a generation before any work.

    Raises:
        ValueError: Unless ``input_ids`` is a ``(B, T)`` integer tensor with ``B, T >= 1`` and ``T + max_new_tokens``
            is at most ``max_seq_len`` (when given): past it a model runs on positions it was not made for.
    """
    is_ids = isinstance(input_ids, Tensor) and input_ids.ndim == 2 and not input_ids.is_floating_point()
    if not is_ids or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids={shape} is invalid: must be a (batch, prompt length) tensor of token ids, both sizes >= 1"
        )
    total = input_ids.shape[1] + max_new_tokens
    if max_seq_len is not None and total > max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is invalid for a prompt of {input_ids.shape[1]} tokens: {total} tokens "
            f"in all, more than the model's max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens"
        )


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """Pick the next token ``(B, 1)``: argmax at temperature 0, else a sample from the (top-k) softmax.

    As ``transformers``' ``TopKLogitsWarper``, ``top_k`` keeps every token whose logit reaches the k-th largest, so
    tokens tied with it are all kept.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    # From the largest logit down, so a tiny temperature scales to 0 and -inf (near-greedy), never to inf - inf.
    logits_BV = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, dim=-1), 1)


class Seq2SeqLMModule(MoELanguageModule):
    """T5 span-corruption training for the encoder-decoder family (Switch).

    Each ``(B, L)`` block is corrupted on the fly (noise density 0.15, mean span length 3): the encoder reads
    the block with sentinels in place of the masked spans, and the decoder predicts the sentinels and the
    masked tokens. Sentinels count down from the top of the model's vocabulary, so the data's tokenizer must
    leave room for them (checked before training). Validation corruption is seeded per batch, so the
    validation loss is repeatable.

    Args:
        noise_density: Share of tokens masked.
        mean_span_length: Mean masked-span length.
        **kwargs: See :class:`MoELanguageModule`.
    """

    seq2seq = True

    def __init__(self, *args: Any, noise_density: float = 0.15, mean_span_length: float = 3.0, **kwargs: Any):
        check_span_settings(noise_density, mean_span_length)
        super().__init__(*args, **kwargs)
        # Only this class's arguments: the base class keeps the model's (``upcycle_from`` left out, the checkpoint's
        # ``arch`` and ``overrides``, the completed ``upcycle``), which saving all of them again would overwrite.
        self.save_hyperparameters("noise_density", "mean_span_length")
        self.decoder_start_id = 0

    def check_data(self, vocab_size: int, block_size: int, tokenizer_path: str | None = None) -> None:
        """Also check that the sentinels fit above the tokenizer's vocabulary."""
        super().check_data(vocab_size, block_size, tokenizer_path)
        _, spans = span_counts(block_size + 1, self.hparams.noise_density, self.hparams.mean_span_length)
        if vocab_size + spans > self.config.vocab_size:
            raise ValueError(
                f"data.vocab_size={vocab_size} is invalid: span corruption needs {spans} sentinel ids above the "
                f"tokenizer's vocabulary, and the model's vocab_size is {self.config.vocab_size}"
            )

    def setup(self, stage: str) -> None:
        """Also take the decoder start id (the padding token) from the data's tokenizer."""
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None or getattr(data, "tokenizer", None) is None:
            return
        pad = data.tokenizer.token_to_id(PAD_TOKEN)
        self.decoder_start_id = pad if pad is not None else 0

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also take the decoder start id (the padding token) from the tokenizer saved with the weights."""
        super().on_load_checkpoint(checkpoint)
        if self.tokenizer_json is not None:
            from tokenizers import Tokenizer

            pad = Tokenizer.from_str(self.tokenizer_json).token_to_id(PAD_TOKEN)
            self.decoder_start_id = pad if pad is not None else 0

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor) -> Any:
        """The model's output (decoder logits and router statistics)."""
        return self.model(input_ids, decoder_input_ids)

    def _loss(
        self, batch: Tensor, generator: torch.Generator | None = None, drop_rows: Tensor | None = None
    ) -> tuple[Tensor, list[MoEStats], int]:
        """Span-corruption cross-entropy, stats and targets; ``drop_rows`` ``(B,)``: rows left out of the loss."""
        if not isinstance(batch, Tensor):
            raise ValueError(
                f"batch of type {type(batch).__name__} is invalid: Seq2SeqLMModule takes (B, L) token id tensors, "
                "which span corruption turns into inputs and targets (padded dict batches are for CausalLMModule)"
            )
        inputs, targets = span_corruption(
            batch,
            self.config.vocab_size - 1,
            self.hparams.noise_density,
            self.hparams.mean_span_length,
            generator,
        )
        start = torch.full_like(targets[:, :1], self.decoder_start_id)
        decoder_inputs = torch.cat([start, targets[:, :-1]], dim=1)
        if drop_rows is not None and bool(drop_rows.any()):
            targets = targets.masked_fill(drop_rows[:, None], IGNORE_INDEX)
            if bool(drop_rows.all()):
                out = self.model(inputs, decoder_inputs, targets=targets)
                return out.loss.nan_to_num(0.0), out.router_stats, 0
        out = self.model(inputs, decoder_inputs, targets=targets)
        return out.loss, out.router_stats, int((targets != IGNORE_INDEX).sum())

    def training_step(self, batch: Tensor, batch_idx: int) -> dict[str, Any] | None:
        """Span-corruption cross-entropy plus weighted auxiliary losses (and the router statistics)."""
        ce, router_stats, num_tokens = self._loss(batch)
        aux, terms = self.aux_loss(router_stats)
        loss = ce + aux
        if not self.check_finite(loss, router_stats):
            return None
        self.log_train(loss, ce, terms, batch.numel())
        return {"loss": loss, "router_stats": [s.detach() for s in router_stats]}

    def validation_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Accumulate the validation cross-entropy (corruption seeded by the batch index)."""
        drop = self.repeated_rows("val", batch_idx, batch.shape[0], dataloader_idx)
        ce, router_stats, num_tokens = self._loss(batch, torch.Generator().manual_seed(batch_idx), drop)
        metric = self.eval_loss("val", dataloader_idx)  # made on every rank, as every rank logs it
        if num_tokens:
            metric.update(ce, weight=num_tokens)
        return {"router_stats": [s.detach() for s in router_stats]}

    def test_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate the test cross-entropy, weighted by tokens (corruption seeded by the batch index)."""
        drop = self.repeated_rows("test", batch_idx, batch.shape[0], dataloader_idx)
        ce, _, num_tokens = self._loss(batch, torch.Generator().manual_seed(batch_idx), drop)
        metric = self.eval_loss("test", dataloader_idx)  # made on every rank, as every rank logs it
        if num_tokens:
            metric.update(ce, weight=num_tokens)

    def predict_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Each encoder input followed by the 32 tokens greedy decoding writes for it (without the start id).

        Fewer tokens where the decoder's ``max_seq_len`` (the start id included) ends first.
        """
        decoded = self.generate(batch, max_new_tokens=_predict_new_tokens(self.config, 1))
        return torch.cat([batch, decoded[:, 1:]], dim=1)

    @torch.no_grad()
    @uncompiled
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        use_cache: bool = True,
        stop_id: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Decode up to ``max_new_tokens`` tokens for each ``(B, S)`` encoder input: greedy at ``temperature == 0``.

        The encoder runs once; with ``use_cache`` each new token's decoder step attends to cached self-attention
        keys and values instead of re-running the decoder over all tokens so far.

        Args:
            input_ids: ``(B, S)`` encoder inputs, ``1 <= S <= max_seq_len``.
            max_new_tokens: Tokens to decode; with the start id they must fit the decoder's ``max_seq_len``.
            temperature: 0 for greedy, else the sampling temperature.
            top_k: Sample among the ``top_k`` most likely tokens only (``None``: all); needs ``temperature > 0``.
            use_cache: Decode with a key/value cache.
            stop_id: A token that ends a sequence: a sequence that produced it continues with it, and decoding
                stops once every sequence has (``None``: never stops early).
            attention_mask: ``(B, S)`` 1/True for real encoder tokens, 0/False for padding (either side), for
                encoder inputs of different lengths: neither the encoder nor the decoder's cross-attention attends
                to padding, so each row decodes as it would alone (where no expert drops a token for capacity).

        Returns:
            ``(B, 1 + n)`` decoder ids starting with the decoder start id, ``n <= max_new_tokens`` (``n <
            max_new_tokens`` only with ``stop_id``).
        """
        check_generation(max_new_tokens, temperature, top_k)
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache={use_cache!r} is invalid: must be True or False")
        max_seq_len = getattr(self.config, "max_seq_len", None)
        check_prompt(input_ids, 0, None)
        if max_seq_len is not None and input_ids.shape[1] > max_seq_len:
            raise ValueError(
                f"input_ids of {input_ids.shape[1]} tokens is invalid: the encoder takes at most the model's "
                f"max_seq_len={max_seq_len}; shorten the input"
            )
        check_prompt(input_ids[:, :1], max_new_tokens, max_seq_len)  # the decoder's: the start id, then new tokens
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        check_stop_id(stop_id, self.config.vocab_size)
        mask = attention_mask
        if mask is not None:
            check_attention_mask(mask, input_ids)
            if not mask.bool().any(dim=1).all():
                raise ValueError(
                    "attention_mask is invalid: a row is all padding; every encoder input needs at least one real token"
                )
        was_training = self.training
        self.eval()
        try:  # an error inside the model must not leave the module in eval mode
            memory_BSD, _ = self.model.encode(input_ids, mask)
            cache = self.model.new_cache() if use_cache else None
            ids = torch.full((input_ids.shape[0], 1), self.decoder_start_id, dtype=torch.long, device=input_ids.device)
            logits = self.model.decode(memory_BSD, ids, mask, cache=cache).logits[:, -1]

            def next_logits(new_ids_B1: Tensor, ids_BT: Tensor) -> Tensor:
                new_ids = new_ids_B1 if cache is not None else ids_BT
                return self.model.decode(memory_BSD, new_ids, mask, cache=cache).logits[:, -1]

            ids = self._sample_loop(ids, logits, next_logits, max_new_tokens, temperature, top_k, stop_id)
        finally:
            self.train(was_training)
        return ids
