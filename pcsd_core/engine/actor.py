"""The actor: the policy being distilled, and its two operations (named after the reference's verl actor).

- `compute_distributions(batch)`: the teacher pass. Teacher prompt + response ids through the teacher model
  (the live policy, a frozen copy of the initial weights, or an EMA copy) under `no_grad`; returns the final
  hidden states at the response positions, not logits, so (T, V) teacher logits are never stored. With the
  reference anchor (`loss.ref_kl_coef` > 0) also the reference pass: student prompt + response ids through the
  initial model (`Actor.reference`), for the loss's KL(P_student || P_reference) term.
- `update_policy_with_distillation(batch, teacher_outputs)`: the student pass and the update. For each of
  `ppo_epochs` passes, for each mini-batch: micro-batches of student prompt + response ids, the divergence
  from `losses.hidden_state_distillation_loss` (which builds logits chunk by chunk from hidden states and the
  lm_head weight), gradient accumulation with weights normalised over the whole mini-batch, clipping, AdamW.

The same class runs in-process (one device, plain module) and inside a Ray train worker (`ray_workers.py`),
where the model is sharded with FSDP2 `fully_shard`. With FSDP the backbone *and* the loss run inside one
forward of the sharded root module (`distillation_module.py`), so FSDP's hooks unshard the root's parameters
(embeddings and the tied lm_head) for the loss and reduce-scatter their gradients afterwards.

Precision (`precision.py`): the modules the optimizer steps hold the masters in `train.master_dtype`; forward and
backward run in `model.dtype`, through FSDP2's mixed-precision policy on the shards or, in this process, on a
compute-dtype copy (`forward_module`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from pcsd_core.loss import distillation as losses
from pcsd_core.loss.spec import LossSpec
from pcsd_core.engine.batch import (ModelInputs, RolloutBatch, TeacherOutputs, UpdateStats, flat_response_weights,
                             micro_batches, pack_prompt_groups, pad_rows, worker_rows)
from pcsd_core.config.schema import ModelConfig
from pcsd_core.config.train import TrainConfig
from pcsd_core.distributed.weight_sync import unique_state_items
from pcsd_core.engine import lora
from pcsd_core.engine.distillation_module import DistillationModule
from pcsd_core.engine.precision import ComputeCopy, mixed_precision_policy
from pcsd_core.models import DTYPES, load_model


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base lr at training step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers an FSDP2 shard (a DTensor; every rank must call), else returns it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Actor:
    """Policy (+ optional frozen/EMA teacher copy), optimizer and lr schedule of one train worker."""

    def __init__(self, model: ModelConfig, train: TrainConfig, loss: LossSpec, model_path: str, *, device: str = "cpu",
                 rank: int = 0, world_size: int = 1, teacher_path: str | None = None, mesh=None):
        """The run config's three sections the actor reads: what to load (`model`), how to train it (`train`),
        and the loss (`loss`)."""
        self.model_config, self.train_config, self.loss_spec = model, train, loss
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        # Masters (what AdamW steps, EMA moves and checkpoints store) in train.master_dtype; a frozen teacher never
        # moves, so it is held in the compute dtype only.
        master, compute = train.master_dtype, model.dtype
        self.student = self._build_module(model_path, mesh, trainable=True, dtype=master)
        self.teacher = None
        # With LoRA the frozen teacher is the base (adapter off) and the EMA teacher a second adapter: no copy.
        if train.teacher_mode != "live" and not model.uses_lora:
            self.teacher = self._build_module(teacher_path or model_path, mesh, trainable=False,
                                              dtype=master if train.teacher_mode == "ema" else compute)
        # In this process (no FSDP to cast): forward/backward on a compute-dtype copy of the masters (precision.py).
        mixed = mesh is None and master != compute
        self._student_copy = ComputeCopy(self.student, compute) if mixed else None
        self._teacher_copy = ComputeCopy(self.teacher, compute) if mixed and self.teacher is not None \
            and train.teacher_mode == "ema" else None
        self.reference = self._reference_module(teacher_path or model_path, mesh)
        self._reference_weight: torch.Tensor | None = None
        trainable = [parameter for parameter in self.student.parameters() if parameter.requires_grad]  # LoRA: the adapter
        self.optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, warmup_steps=train.warmup_steps, total_steps=train.total_training_steps,
            schedule=train.lr_schedule))
        self.pad_id = self.student.lm.config.pad_token_id or self.student.lm.config.eos_token_id or 0
        self.build_inputs = pack_prompt_groups if train.share_prompt_prefix else pad_rows
        self._teacher_weight: torch.Tensor | None = None

    def _build_module(self, model_path: str, mesh, *, trainable: bool, dtype: str) -> DistillationModule:
        model = self.model_config
        # With FSDP every rank loads the model into host memory and `fully_shard` moves one layer at a time to the
        # GPU and keeps its shard: the whole model never sits on a rank's GPU (at 7B in float32, 28 GB a rank).
        load_device = "cpu" if mesh is not None else self.device
        lm = load_model(model_path, dtype=dtype, device=load_device, attn_implementation=model.attn_implementation,
                        trust_remote_code=model.trust_remote_code)
        if trainable and model.gradient_checkpointing:
            # Non-reentrant checkpointing, said explicitly as verl does: the reentrant form leaks memory under FSDP2,
            # and transformers' default differs across versions. 5.2x renamed the method (the old name goes in v6).
            kwargs = {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        lm.train(trainable)
        if model.uses_lora:  # the base frozen, the adapter trains (and an EMA adapter beside it when asked)
            lm = lora.add_lora(lm, model, ema_adapter=self.train_config.teacher_mode == "ema",
                               base_model_path=model_path, seed=self.train_config.seed)
        else:
            lm.requires_grad_(trainable)
        module = DistillationModule(lm, self.loss_spec, compute_dtype=DTYPES[model.dtype])
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            # Shards hold the masters; each forward gathers them cast to model.dtype, gradients reduce in float32.
            policy = mixed_precision_policy(model.dtype)
            for layer in module.decoder_layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(module, mesh=mesh, mp_policy=policy)  # root: embeddings, final norm, (tied) lm_head
        return module

    def _reference_module(self, initial_path: str, mesh) -> DistillationModule | None:
        """The anchor's initial model (None when loss.ref_kl_coef is 0), whose forward never changes.

        The LoRA base (the student's forward module with its adapters off) or the frozen teacher when there is
        one; else one more frozen module of the initial weights in the compute dtype, sharded as the teacher is.
        """
        if self.loss_spec.ref_kl_coef == 0:
            return None
        if self.model_config.uses_lora:
            return self.forward_module("student")
        if self.train_config.teacher_mode == "frozen":
            return self.teacher
        return self._build_module(initial_path, mesh, trainable=False, dtype=self.model_config.dtype)

    def forward_module(self, which: str = "student") -> DistillationModule | None:
        """The module whose forward runs: the compute-dtype copy in this process, else the (FSDP) module itself."""
        if which == "student":
            return self._student_copy.module if self._student_copy else self.student
        return self._teacher_copy.module if self._teacher_copy else self.teacher

    # ---- the teacher pass ---------------------------------------------------------------------------

    @torch.no_grad()
    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        """Teacher (and, with the anchor, reference) hidden states at response positions for this rank's share of
        `batch` (no gradient)."""
        teacher = self.forward_module("teacher" if self.teacher is not None else "student")
        hidden: list[torch.Tensor] = []
        reference_hidden: list[torch.Tensor] | None = None if self.reference is None else []
        rows_of_this_rank = worker_rows(0, len(batch), self.rank, self.world_size)
        for rows in micro_batches(rows_of_this_rank, self.train_config.micro_batch_size):
            part = batch.select(rows)
            hidden.extend(self._response_states(teacher, self._teacher_view(), part.teacher_prompt_ids, part))
            if reference_hidden is not None:  # the same responses after the student prompt
                reference_hidden.extend(self._response_states(self.reference, self._reference_view(),
                                                              part.student_prompt_ids, part))
        self._teacher_weight = self._snapshot_teacher_weight(len(batch))
        self._reference_weight = self._reference_lm_head()
        return TeacherOutputs(hidden=hidden, reference_hidden=reference_hidden)

    def _response_states(self, module: DistillationModule, view, prompts: list[list[int]],
                         part: RolloutBatch) -> list[torch.Tensor]:
        """One (L_i, H) tensor of final hidden states per response of `part`, each after its row's prompt."""
        inputs = self.build_inputs(prompts, part.response_ids, self.pad_id)
        with view:
            states = module(*self._forward_args(inputs))
        return list(states.detach().cpu().split(part.response_lengths))

    def _teacher_view(self):
        """LoRA: the frozen teacher is the base (adapter off), the EMA teacher its adapter; else nothing to switch."""
        if not self.model_config.uses_lora or self.train_config.teacher_mode == "live":
            return contextlib.nullcontext()
        adapter = lora.EMA if self.train_config.teacher_mode == "ema" else None
        # On the module the forward runs on: in this process with mixed precision that is the compute copy, whose
        # adapter switches are its own (switching the masters' would leave the copy's student adapter on).
        return lora.adapter_view(self.forward_module("student").lm, adapter)

    def _reference_view(self):
        """LoRA: the reference is the base, so the adapters are off (on the module the forward runs on)."""
        return lora.adapter_view(self.reference.lm, None) if self.model_config.uses_lora else contextlib.nullcontext()

    def _reference_lm_head(self) -> torch.Tensor | None:
        """The reference's lm_head (compute dtype) for the anchor's logits; None = the student's, detached: with
        LoRA the lm_head never trains, so it is the initial one."""
        if self.reference is None or self.model_config.uses_lora:
            return None
        if self.reference is self.teacher:  # the frozen teacher's, snapshotted for this step: no second copy
            return self._teacher_weight
        if self._reference_weight is None:  # it never changes: gathered once (collective: every rank is here)
            self._reference_weight = full_tensor(self.reference.lm_head_weight().detach()).to(
                DTYPES[self.model_config.dtype])
        return self._reference_weight

    def _snapshot_teacher_weight(self, responses: int) -> torch.Tensor | None:
        """The teacher lm_head as it was when the hidden states were computed.

        A live teacher with one optimizer step per batch needs no copy: the loss uses the (unchanged) student
        weight, detached. With more steps, or a separate teacher that EMA moves, keep the weights of this pass.
        """
        if self.model_config.uses_lora:  # the lm_head is frozen
            return None
        if self.teacher is None and self.train_config.optimizer_steps(responses) == 1:
            return None
        source = self.forward_module("teacher" if self.teacher is not None else "student")
        # FSDP shards hold masters; the loss computes with the compute-dtype weights, as the teacher pass did.
        return full_tensor(source.lm_head_weight().detach()).to(DTYPES[self.model_config.dtype], copy=True)

    # ---- the student pass and update ----------------------------------------------------------------

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        """ppo_epochs x mini-batches of AdamW steps; this rank handles its share of every mini-batch."""
        train = self.train_config
        stats = UpdateStats()
        for epoch in range(train.ppo_epochs):
            for start in range(0, len(batch), train.mini_batch_size):
                minibatch = range(start, start + train.mini_batch_size)
                weights = self._minibatch_token_weights(batch, minibatch)
                self.optimizer.zero_grad(set_to_none=True)
                parts = list(micro_batches(worker_rows(start, minibatch.stop, self.rank, self.world_size),
                                           train.micro_batch_size))
                for index, rows in enumerate(parts):
                    self._set_gradient_sync(last_micro_batch=index == len(parts) - 1)
                    self._accumulate_micro_batch(batch, teacher_outputs, rows, weights, start, stats, epoch == 0)
                stats.grad_norms.append(self._clip_and_step())
        stats.lr = self.optimizer.param_groups[0]["lr"]  # what this update used; the schedule moves on below
        self.scheduler.step()
        return stats

    def _set_gradient_sync(self, *, last_micro_batch: bool) -> None:
        """FSDP: reduce-scatter gradients after the last micro-batch of an optimizer step only; before it they
        accumulate unsharded (in float32, the policy's reduce_dtype), one collective per step instead of one per
        micro-batch. Every rank runs the same number of micro-batches (`worker_rows`), so the ranks agree."""
        if hasattr(self.student, "set_requires_gradient_sync"):  # an FSDPModule
            self.student.set_requires_gradient_sync(last_micro_batch)

    def _minibatch_token_weights(self, batch: RolloutBatch, minibatch: range) -> torch.Tensor:
        """(M, R) weights over the WHOLE mini-batch, so summed micro-batch (and rank) losses are its loss."""
        lengths = [len(batch.response_ids[i]) for i in minibatch]
        mask = torch.arange(max(max(lengths), 1))[None, :] < torch.tensor(lengths)[:, None]
        return losses.token_weights(mask, aggregation=self.loss_spec.aggregation,
                                    skip_first_tokens=self.loss_spec.skip_first_tokens)

    def _accumulate_micro_batch(self, batch, teacher_outputs, rows, minibatch_weights, minibatch_start, stats,
                                record_tokens) -> None:
        part = batch.select(rows)
        inputs = self.build_inputs(part.student_prompt_ids, part.response_ids, self.pad_id)
        local = minibatch_weights[rows.start - minibatch_start: rows.stop - minibatch_start]
        weights = flat_response_weights(local, part.response_lengths)  # (N,), the order of the response states
        teacher_hidden = torch.cat([teacher_outputs.hidden[i] for i in rows]).to(self.device)
        reference_hidden = None if teacher_outputs.reference_hidden is None else \
            torch.cat([teacher_outputs.reference_hidden[i] for i in rows]).to(self.device)
        # float32 token weights whatever the compute dtype: 1/num_tokens in bf16 is off by up to 0.4%.
        loss, per_token, metrics = self.forward_module()(
            *self._forward_args(inputs), teacher_hidden=teacher_hidden, weights=weights.to(self.device, torch.float32),
            response_tokens=inputs.response_tokens.to(self.device), teacher_weight=self._teacher_weight,
            reference_hidden=reference_hidden, reference_weight=self._reference_weight)
        # FSDP averages gradients over ranks; each rank's loss is already its share of the sum, so undo the mean.
        (loss * self.world_size).backward()
        if self._student_copy is not None:
            self._student_copy.accumulate_grads()  # the masters' float32 gradient, as FSDP's reduce_dtype gives
        # The loss's metrics are means over the counted tokens (weight != 0); keep sums for exact averages.
        count = int(metrics["tokens"])
        stats.loss_sum += float(loss.detach())
        stats.kl_sum += metrics["kl"] * count
        stats.teacher_entropy_sum += metrics["teacher_entropy"] * count
        stats.student_entropy_sum += metrics["student_entropy"] * count
        stats.ref_kl_sum += metrics.get("ref_kl", 0.0) * count  # reported only with the anchor on
        stats.num_tokens += count
        if record_tokens:
            for row, values in zip(rows, per_token.detach().float().cpu().split(part.response_lengths)):
                stats.token_kl[row] = values.tolist()

    def _forward_args(self, inputs: ModelInputs) -> tuple:
        position_ids = None if inputs.position_ids is None else inputs.position_ids.to(self.device)
        return (inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device), position_ids,
                inputs.response_positions.to(self.device))

    def _clip_and_step(self) -> float:
        max_norm = self.train_config.grad_clip if self.train_config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        self.optimizer.step()
        if self.train_config.teacher_mode == "ema" and self.model_config.uses_lora:
            lora.ema_update(self.student.lm, self.train_config.ema_rate)
        elif self.train_config.teacher_mode == "ema":
            self._update_ema_teacher()
        if self._student_copy is not None:  # after the EMA too: the copy holds the EMA adapter beside the student's
            self._student_copy.copy_from_masters()
        return float(full_tensor(grad_norm))

    @torch.no_grad()
    def _update_ema_teacher(self) -> None:
        """teacher <- (1 - rate) * teacher + rate * student, shard by shard (same FSDP layout on both)."""
        for teacher_param, student_param in zip(self.teacher.parameters(), self.student.parameters()):
            teacher_param.lerp_(student_param.detach(), self.train_config.ema_rate)  # masters: the small moves survive
        if self._teacher_copy is not None:
            self._teacher_copy.copy_from_masters()

    # ---- state for weight sync and checkpoints -----------------------------------------------------

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        """Unsharded weights by Hugging Face name on rank 0 (CPU); {} on other ranks. Collective with FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.model_config.uses_lora:  # the adapter alone (peft's file names): the base is the run's base model
            state = {name: full_tensor(tensor).cpu().clone() for name, tensor in self.adapter_items(which)}
            return state if self.rank == 0 else {}
        module = self.student if which == "student" else self.teacher
        if self.world_size == 1:  # in-process, or one FSDP2 worker: its parameters are whole DTensors, made plain
            return {name: full_tensor(tensor.detach()) for name, tensor in module.lm.state_dict().items()}
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name.removeprefix("lm."): tensor for name, tensor in state.items()}

    def training_state(self) -> dict[str, Any]:
        """Optimizer (full, on rank 0) and scheduler state. Collective with FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"optimizer": get_optimizer_state_dict(self.student, self.optimizer, options=options),
                "scheduler": self.scheduler.state_dict()}

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None = None) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # With FSDP only rank 0 is sent the full optimizer state (and EMA teacher); the others get {} and receive
        # their shards from rank 0's broadcast, tensor by tensor.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world_size > 1)
        set_optimizer_state_dict(self.student, self.optimizer, optim_state_dict=state.get("optimizer") or {},
                                 options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.model_config.uses_lora:  # the checkpoint's adapters onto the base this actor loaded
            self._load_adapter(state.get("adapter"), lora.STUDENT)
            self._load_adapter(teacher_state, lora.EMA)
            if self._student_copy is not None:
                self._student_copy.copy_from_masters()
        elif teacher_state is not None and self.teacher is not None:
            prefixed = {f"lm.{name}": tensor for name, tensor in teacher_state.items()}
            set_model_state_dict(self.teacher, prefixed, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                                 broadcast_from_rank0=self.world_size > 1))
            if self._teacher_copy is not None:
                self._teacher_copy.copy_from_masters()

    # ---- LoRA adapters ------------------------------------------------------------------------------

    def policy_sync_items(self) -> list[tuple[str, torch.Tensor]]:
        """What the weight sync sends, the policy's masters: with LoRA the adapter alone (the engine holds the same
        base), else every weight (tied ones once)."""
        if self.model_config.uses_lora:
            return self.adapter_items("student")
        return list(unique_state_items(self.student.lm))

    def adapter_items(self, which: str = "student") -> list[tuple[str, torch.Tensor]]:
        """The student's (or the EMA teacher's) adapter tensors by peft file name; this rank's shards under FSDP2."""
        if not self.model_config.uses_lora:
            raise ValueError("adapter_items needs model.lora_rank >= 1; full fine-tuning has no adapter.")
        if which == "teacher" and self.train_config.teacher_mode != "ema":
            raise ValueError(f"train.teacher_mode {self.train_config.teacher_mode!r} keeps no teacher adapter.")
        return lora.adapter_items(self.student.lm, lora.STUDENT if which == "student" else lora.EMA)

    def _load_adapter(self, adapter_state: dict[str, torch.Tensor] | None, adapter: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if adapter_state is None:
            return
        names = lora.adapter_param_names(self.student.lm, adapter)
        unknown = sorted(set(adapter_state) - set(names))
        missing = sorted(set(names) - set(adapter_state))
        if unknown or missing:
            raise ValueError(f"the checkpoint's {adapter!r} adapter does not fit this model's (model.lora_rank, "
                             f"model.lora_target_modules): unknown {unknown[:3]}, missing {missing[:3]}.")
        prefixed = {f"lm.{names[name]}": tensor for name, tensor in adapter_state.items()}
        set_model_state_dict(self.student, prefixed, options=StateDictOptions(
            full_state_dict=True, strict=False, broadcast_from_rank0=self.world_size > 1))
