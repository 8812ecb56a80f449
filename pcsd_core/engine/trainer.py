"""The single-controller on-policy PCSD loop.

    distiller = Distiller(cfg, "data/train.parquet", log_metrics=print_metrics)
    distiller.setup()
    result = distiller.train()      # TrainResult(checkpoint_dir, steps, history)
    distiller.close()

One training step, top to bottom (`_train_step`):
  1. sample `train.prompts_per_step` prompts (a seeded permutation per data epoch: same order on resume);
  2. rollout: the engine samples `rollout.n` responses per student prompt from the current policy;
  3. teacher pass: `compute_distributions` scores the responses after the teacher prompt (no grad);
  4. student pass + update: `update_policy_with_distillation` (ppo_epochs x mini-batches x micro-batches);
  5. weight sync: the actor's full weights (with LoRA, the adapter alone) stream into the rollout engine bucket by
     bucket (step 2 stays on-policy);
  6. metrics through `log_metrics(metrics, step)`, a few per-token samples, a checkpoint every K steps;
  7. every `train.validate_every` steps, a validation (`pcsd_core.eval.validation`): greedy answers to held-out
     questions through the engine, logged under `val/`; it may keep this checkpoint as the best
     (`train.keep_best_by`) or end the branch when its answers degenerate (`train.stop_if_repetition_above`).

The actor sits behind `workers.TrainWorkers`: with `train.use_ray` N Ray workers holding FSDP2 shards
(`RayWorkers`, whose Ray calls are written out there), without it the same `Actor` in this process
(`InProcessWorkers`); the loop below reads the same either way. The rollout engine always lives in this process:
on the actor's device when `rollout.placement` is colocated (it sleeps while the actor trains), on the
GPUs after the actor's when split. On CPU both placements share the machine, so split only moves nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pcsd_core.errors import ConfigError, DataValidationError, InputNotFoundError
from pcsd_core.engine import checkpoint as ckpt
from pcsd_core import metric_names as names
from pcsd_core.engine.batch import RolloutBatch, UpdateStats
from pcsd_core.engine.lora import check_lora_targets, lora_config
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.models import check_context_length, load_tokenizer, peak_memory_mb, resolve_device, resolve_model
from pcsd_core.data.prompts import build_prompt_pair
from pcsd_core.rollout import create_rollout_engine
from pcsd_core.rollout.base import SamplingParams
from pcsd_core.distributed.weight_sync import drain
from pcsd_core.distributed.workers import TrainWorkers, build_train_workers
from pcsd_core.eval.validation import Validation, best_validation, split_validation_records, validate

SAMPLES_PER_STEP = 4  # responses written to samples/step_*.jsonl


def no_op(metrics: dict[str, float], step: int) -> None:
    """Default `log_metrics`: drop the metrics."""


@dataclass
class TrainResult:
    checkpoint_dir: Path  # the kept checkpoint: the last, or the best validation's (`train.keep_best_by`)
    steps: int  # steps trained (fewer than total_training_steps when a collapse stop ended the branch)
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[Validation] = field(default_factory=list)
    stopped_because: str = ""  # why training ended early ("" when it ran every step)


def prompt_indices_for_step(step: int, prompts_per_step: int, num_records: int, seed: int) -> list[int]:
    """Record indices of `step`: a fresh seeded permutation per pass over the data, a pure function of step."""
    positions = range(step * prompts_per_step, (step + 1) * prompts_per_step)
    permutations: dict[int, np.ndarray] = {}
    indices = []
    for position in positions:
        data_epoch = position // num_records
        if data_epoch not in permutations:
            permutations[data_epoch] = np.random.default_rng([seed, data_epoch]).permutation(num_records)
        indices.append(int(permutations[data_epoch][position % num_records]))
    return indices


class Distiller:
    """On-policy self-distillation: the student samples, the context-conditioned teacher scores."""

    def __init__(self, cfg: PCSDConfig, train_parquet: str | Path, log_metrics: Callable[[dict, int], None] = no_op,
                 on_checkpoint: Callable[[Path], None] | None = None):
        """`on_checkpoint(path)` runs after each checkpoint is saved (the flow uploads it to shared storage)."""
        if "://" in cfg.train.output_dir:
            raise ConfigError(f"train.output_dir ({cfg.train.output_dir!r}) is a URI; the engine writes to a local "
                             "folder. A caller with a storage URI stages it through a local folder; here, give a folder.")
        self.cfg = cfg
        self.train_parquet = Path(train_parquet)
        self.log_metrics = log_metrics
        self.on_checkpoint = on_checkpoint
        self.output_dir = Path(cfg.train.output_dir)
        self.workers: TrainWorkers | None = None
        self.engine = None
        self.start_step = 0

    # ---- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check inputs (cheap, first), then data, actor (in-process or Ray workers), rollout engine, resume."""
        from pcsd_core.data.prepare import load_prompt_records

        cfg = self.cfg
        if not self.train_parquet.is_file():
            raise InputNotFoundError(f"train parquet {str(self.train_parquet)!r} does not exist; run the preprocess "
                                    "step (pcsd_core.data.prepare.prepare_dataset) first or fix the path.")
        resume = ckpt.validate_checkpoint_dir(cfg.train.resume_from) if cfg.train.resume_from else None
        self.device = resolve_device(cfg.train.device)
        self.base_model_path = resolve_model(cfg.model.name)
        self.tokenizer = load_tokenizer(self.base_model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.records = load_prompt_records(self.train_parquet)
        if not self.records:
            raise DataValidationError(f"train parquet {str(self.train_parquet)!r} holds no prompts.")
        self.validation_records: list[Any] = []
        self.validations: list[Validation] = []
        if cfg.train.validate_every:
            self.records, self.validation_records = split_validation_records(self.records, cfg.eval.validation_questions)
        self._prompt_pairs: dict[int, Any] = {}
        self._check_lengths_fit_the_model()
        # LoRA: the base is loaded, and a resumed adapter is loaded onto it (`_resume`).
        model_path = str(resume) if resume and not cfg.model.uses_lora else self.base_model_path
        if cfg.model.uses_lora:
            self.base_reference = ckpt.base_model_reference(cfg.model.name, self.base_model_path)
        # Frozen and EMA teachers start from the run's initial weights, not from a resumed checkpoint.
        self.workers = build_train_workers(cfg.model, cfg.train, cfg.loss, model_path, device=self.device,
                                           teacher_path=self.base_model_path)
        self.engine = create_rollout_engine(cfg.rollout, cfg.model, model_path, device=cfg.train.device,
                                            seed=cfg.train.seed, gpus_in_use=self.workers.local_gpu_ids(),
                                            adapter_sync=True)
        if resume:
            self._resume(resume)

    def _check_lengths_fit_the_model(self) -> None:
        """Longest teacher prompt + rollout.max_response_tokens must fit the model's context (before any load)."""
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(self.base_model_path, trust_remote_code=self.cfg.model.trust_remote_code)
        longest = max(len(self._prompt_pair(index).teacher_ids) for index in range(len(self.records)))
        check_context_length(self.cfg, model_config, max_prompt_tokens=longest)
        check_lora_targets(model_config, self.cfg.model)  # LoRA target names against the model's modules

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        saved_records = state.trainer_state.get("num_records")
        if saved_records != len(self.records) or state.trainer_state.get("seed") != self.cfg.train.seed:
            raise ConfigError(
                f"train.resume_from ({str(path)!r}) was written with {saved_records} prompts and seed "
                f"{state.trainer_state.get('seed')}, but this run has {len(self.records)} prompts and seed "
                f"{self.cfg.train.seed}; the data order would differ. Use the same train parquet and train.seed."
            )
        training_state = state.training_state
        if self.cfg.model.uses_lora:
            self._check_same_base(path, state.base_model)
            training_state = {**training_state, "adapter": state.adapter_state}
        self.workers.load_training_state(training_state, state.teacher_state)
        self.start_step = state.step
        self.validations = [Validation(step=row["step"], summary=row["summary"])
                            for row in state.trainer_state.get("validations", [])]
        if self.cfg.model.uses_lora:
            self._sync_weights()  # the engine holds the base and a fresh adapter: give it the resumed one

    def _check_same_base(self, path: Path, saved: dict[str, Any] | None) -> None:
        if saved is None or saved.get("sha256") != self.base_reference["sha256"]:
            raise ConfigError(
                f"train.resume_from ({str(path)!r}) holds a LoRA adapter of base {(saved or {}).get('source')!r}, "
                f"whose files differ from this run's base {self.base_model_path!r} (model.name "
                f"{self.cfg.model.name!r}, model.lora_rank {self.cfg.model.lora_rank}); resume with the same base.")

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self, stop_after_step: int | None = None) -> TrainResult:
        """Train to `total_training_steps` (or stop early after `stop_after_step`, e.g. to test a resume)."""
        total = self.cfg.train.total_training_steps
        end = total if stop_after_step is None else min(total, stop_after_step)
        history: list[dict[str, float]] = []
        last_checkpoint, stopped_because = None, ""
        if self._validation_due(self.start_step) and self.start_step == 0:
            self._validate(0)  # the initial model: where the val/ curves start
        started = time.perf_counter()  # the ETA's clock: the steps, with the validations that recur between them
        for step in range(self.start_step, end):
            metrics = self._train_step(step)
            history.append(metrics)
            self.log_metrics(metrics, step + 1)
            self._print_progress(step, metrics, started)
            validation = self._validate(step + 1) if self._validation_due(step + 1) else None
            stopped_because = self._collapse(validation)
            every = self.cfg.train.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == end or stopped_because or self._is_best(validation):
                last_checkpoint = self.save_checkpoint(step + 1)
            if stopped_because:
                print(f"[pcsd] stopping after step {step + 1}: {stopped_because}", flush=True)
                end = step + 1
                break
        if last_checkpoint is None:  # resumed at the last step: nothing left to train
            last_checkpoint = self.save_checkpoint(end)
        return TrainResult(checkpoint_dir=self._kept_checkpoint(last_checkpoint), steps=end, history=history,
                           validations=list(self.validations), stopped_because=stopped_because)

    # ---- validation, keep-best and the collapse stop -----------------------------------------------

    def _validation_due(self, steps_done: int) -> bool:
        every, total = self.cfg.train.validate_every, self.cfg.train.total_training_steps
        return bool(every) and (steps_done % every == 0 or steps_done == total)

    def _validate(self, steps_done: int) -> Validation:
        # The engine is awake here: validation runs before the first rollout, or after a weight sync.
        validation = validate(self.engine, self.tokenizer, self.validation_records, self.cfg.eval, step=steps_done,
                              seed=self.cfg.train.seed)
        self.validations.append(validation)
        self.log_metrics(validation.metrics(), steps_done)
        summary = validation.summary
        print(f"[pcsd] validation after step {steps_done}: strict {summary['accuracy_strict']:.3f} "
              f"[{summary['accuracy_strict_low']:.3f}, {summary['accuracy_strict_high']:.3f}] flexible "
              f"{summary['accuracy_flexible']:.3f} format {summary[names.ANSWER_FORMAT_RATE]:.3f} repetition "
              f"{summary[names.REPETITION_RATE]:.3f} ({len(self.validation_records)} questions)", flush=True)
        return validation

    def _best_trained_validation(self) -> Validation | None:
        """The best validation so far among trained checkpoints (the initial model is not one); None without
        keep_best_by or before the first trained validation."""
        trained = [v for v in self.validations if v.step > 0]
        if not self.cfg.train.keep_best_by or not trained:
            return None
        return best_validation(trained, self.cfg.train.keep_best_by)

    def _is_best(self, validation: Validation | None) -> bool:
        return validation is not None and self._best_trained_validation() is validation

    def _collapse(self, validation: Validation | None) -> str:
        bound = self.cfg.train.stop_if_repetition_above
        if validation is None or not bound or validation.summary[names.REPETITION_RATE] <= bound:
            return ""
        return (f"validation repetition rate {validation.summary[names.REPETITION_RATE]:.3f} is above "
                f"train.stop_if_repetition_above ({bound})")

    def _kept_checkpoint(self, last_checkpoint: Path) -> Path:
        """The last checkpoint, or with keep_best_by the best validation's (`final` is pointed at it)."""
        best = self._best_trained_validation()
        if best is None:
            return last_checkpoint
        kept = self.output_dir / "checkpoints" / ckpt.checkpoint_name(best.step)
        ckpt.point_final_at(self.output_dir, kept)
        if kept != last_checkpoint:
            print(f"[pcsd] keeping the checkpoint of step {best.step} (best validation "
                  f"{self.cfg.train.keep_best_by} {best.summary[self.cfg.train.keep_best_by]:.3f}), not the last one "
                  f"({last_checkpoint.name})", flush=True)
        return kept

    def _train_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        batch = self._rollout(step)
        timings[names.TIME_ROLLOUT_S] = time.perf_counter() - tick

        tick = time.perf_counter()
        teacher_outputs = self.workers.compute_distributions(batch)
        timings[names.TIME_TEACHER_S] = time.perf_counter() - tick

        tick = time.perf_counter()
        stats = self.workers.update_policy_with_distillation(batch, teacher_outputs)
        timings[names.TIME_UPDATE_S] = time.perf_counter() - tick

        tick = time.perf_counter()
        self._sync_weights()
        timings[names.TIME_WEIGHT_SYNC_S] = time.perf_counter() - tick
        timings[names.TIME_STEP_S] = sum(timings.values())

        metrics = self._step_metrics(step, batch, stats, timings)
        self._write_samples(step + 1, batch, stats)
        return metrics

    def _rollout(self, step: int) -> RolloutBatch:
        cfg = self.cfg
        record_indices = prompt_indices_for_step(step, cfg.train.prompts_per_step, len(self.records), cfg.train.seed)
        pairs = [self._prompt_pair(index) for index in record_indices]
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_response_tokens, seed=cfg.train.seed * 100_003 + step)
        generations = self.engine.generate([pair.student_ids for pair in pairs], cfg.rollout.n, sampling)
        self.engine.sleep()  # the actor needs the accelerator until the weight sync, which wakes the engine
        return RolloutBatch(
            student_prompt_ids=[pairs[g.prompt_index].student_ids for g in generations],
            teacher_prompt_ids=[pairs[g.prompt_index].teacher_ids for g in generations],
            response_ids=[list(g.response_ids) for g in generations],
            finished=[g.finished for g in generations],
            record_indices=[record_indices[g.prompt_index] for g in generations],
        )

    def _prompt_pair(self, record_index: int):
        if record_index not in self._prompt_pairs:
            record = self.records[record_index]
            self._prompt_pairs[record_index] = build_prompt_pair(
                self.tokenizer, record.student_messages, record.privileged_context, self.cfg.data.teacher_template)
        return self._prompt_pairs[record_index]

    def _sync_weights(self) -> None:
        """Stream the actor's weights (LoRA: the adapter) into the engine one bucket at a time (extra memory: about
        one bucket). The engine wakes itself for it."""
        buckets = self.workers.iter_state_dict_buckets(self.cfg.train.weight_sync_bucket_mb * 2**20)
        self.engine.update_weights(drain(buckets))

    # ---- metrics and samples -----------------------------------------------------------------------

    def _step_metrics(self, step: int, batch: RolloutBatch, stats: UpdateStats, timings: dict) -> dict[str, float]:
        from pcsd_core.eval.collapse import rollout_repetition_rate, top_token_loss_share
        from pcsd_core.eval.scoring import is_correct

        cfg = self.cfg
        lengths = batch.response_lengths
        optimizer_steps = cfg.train.optimizer_steps(len(batch))
        tokens = max(stats.num_tokens, 1)
        texts = [self._decode(ids) for ids in batch.response_ids]
        correct = [is_correct(text, self.records[index].ground_truth)
                   for text, index in zip(texts, batch.record_indices)]
        token_losses = [value for row_losses in stats.token_kl.values() for value in row_losses]  # every response token
        return {
            names.TRAIN_LOSS: stats.loss_sum / optimizer_steps,
            names.TRAIN_KL: stats.kl_sum / tokens,
            names.TRAIN_TEACHER_ENTROPY: stats.teacher_entropy_sum / tokens,
            names.TRAIN_STUDENT_ENTROPY: stats.student_entropy_sum / tokens,
            **({names.TRAIN_REF_KL: stats.ref_kl_sum / tokens} if cfg.loss.ref_kl_coef > 0 else {}),
            names.TRAIN_RESPONSE_LEN: float(np.mean(lengths)),
            names.TRAIN_TRUNCATED_FRAC: float(np.mean([not finished for finished in batch.finished])),
            names.TRAIN_GRAD_NORM: float(np.mean(stats.grad_norms)),
            names.TRAIN_LR: stats.lr,
            names.ROLLOUT_ACCURACY: float(np.mean(correct)),
            names.ROLLOUT_REPETITION_RATE: rollout_repetition_rate(texts, batch.response_ids),
            names.TRAIN_LOSS_SHARE_TOP10PCT_TOKENS: top_token_loss_share(token_losses),
            # Response tokens sampled and trained on per second of the whole step.
            names.PERF_TOKENS_PER_S: sum(lengths) / timings[names.TIME_STEP_S],
            names.PERF_PEAK_MEM_MB: self._peak_memory_mb(),
            **timings,
        }

    def _peak_memory_mb(self) -> float:
        return peak_memory_mb(torch.device(self.device)) + self.workers.peak_memory_mb()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _write_samples(self, step: int, batch: RolloutBatch, stats: UpdateStats) -> None:
        from pcsd_core.eval.scoring import is_correct

        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for row in range(min(SAMPLES_PER_STEP, len(batch))):
            record = self.records[batch.record_indices[row]]
            response = self._decode(batch.response_ids[row])
            lines.append(json.dumps({
                "step": step, "question": record.question, "response": response,
                "tokens": [self.tokenizer.decode([token]) for token in batch.response_ids[row]],
                "token_kl": stats.token_kl.get(row, []), "correct": is_correct(response, record.ground_truth),
            }))
        (folder / f"{ckpt.checkpoint_name(step)}.jsonl").write_text("\n".join(lines) + "\n")

    def _print_progress(self, step: int, metrics: dict[str, float], started: float) -> None:
        done = step + 1 - self.start_step
        remaining = self.cfg.train.total_training_steps - step - 1
        eta_s = (time.perf_counter() - started) / done * remaining
        print(f"[pcsd] step {step + 1}/{self.cfg.train.total_training_steps} loss {metrics[names.TRAIN_LOSS]:.4f} "
              f"kl {metrics[names.TRAIN_KL]:.4f} acc {metrics[names.ROLLOUT_ACCURACY]:.2f} "
              f"{metrics[names.PERF_TOKENS_PER_S]:.0f} tok/s {metrics[names.TIME_STEP_S]:.1f} s/step ETA {eta_s:.0f} s",
              flush=True)

    # ---- checkpoints and shutdown ------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """HF model + tokenizer + optimizer/scheduler/RNG/data-order state under checkpoints/step_<step>."""
        training_state = self.workers.training_state()
        teacher_state = self.workers.full_state_dict("teacher") if self.cfg.train.teacher_mode == "ema" else None
        trainer_state = {"seed": self.cfg.train.seed, "num_records": len(self.records),
                         "prompts_per_step": self.cfg.train.prompts_per_step, "base_model": self.base_model_path,
                         "validations": [{"step": v.step, "summary": v.summary} for v in self.validations]}
        lora_files = {}
        if self.cfg.model.uses_lora:  # the adapter alone, in peft's format, and the base it adapts
            lora_files = {"adapter_config": lora_config(self.cfg.model, self.base_model_path),
                          "base_model": self.base_reference}
        path = ckpt.save_checkpoint(self.output_dir, step, model_source=self.base_model_path,
                                    model_state=self.workers.full_state_dict("student"), tokenizer=self.tokenizer,
                                    training_state=training_state, trainer_state=trainer_state,
                                    teacher_state=teacher_state, **lora_files)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path

    def close(self) -> None:
        """Shut down the Ray workers (and Ray, if they started it), then the rollout engine.

        In that order because SGLang's `Engine.shutdown()` SIGKILLs every child process of this process
        (`kill_process_tree(os.getpid(), include_parent=False)`), and a local Ray started here (gcs_server, raylet,
        the train workers) is among them: closed first, the engine would leave the workers' shutdown talking to a
        dead cluster, and the step would fail after its last checkpoint.
        """
        try:
            if self.workers is not None:
                workers, self.workers = self.workers, None
                workers.shutdown()  # Ray workers: also shuts Ray down when they started it
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                engine.close()
