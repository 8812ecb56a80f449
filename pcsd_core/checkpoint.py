"""Training checkpoints: a Hugging Face model folder plus what it takes to continue the run exactly.

    <output_dir>/checkpoints/step_000004/
        config.json, model.safetensors, tokenizer files   <- `from_pretrained` loads this folder
        training_state.pt    optimizer (full, unsharded) and lr-scheduler state
        trainer_state.json   step, seed and data-order facts (the data order is a function of seed and step)
        rng_state.pt         controller RNG states (torch, numpy, python)
        teacher.safetensors  EMA teacher weights (teacher_mode "ema" only)
    <output_dir>/final -> checkpoints/step_000004   (symlink to the newest checkpoint)

Every checkpoint is written into a temporary folder beside its final name and renamed into place with
`os.replace`, so a crash never leaves a half-written `step_*` folder that `resume_from` could pick up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
RNG_STATE = "rng_state.pt"
TEACHER_WEIGHTS = "teacher.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class CheckpointState:
    path: Path
    step: int
    trainer_state: dict[str, Any]
    training_state: dict[str, Any]
    teacher_state: dict[str, torch.Tensor] | None


def save_checkpoint(output_dir: str | Path, step: int, *, model_source: str, model_state: dict[str, torch.Tensor],
                    tokenizer: Any, training_state: dict[str, Any], trainer_state: dict[str, Any],
                    teacher_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `checkpoints/step_<step>` atomically and point `final` at it; returns its path."""
    checkpoints = Path(output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    target = checkpoints / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=checkpoints))
    try:
        _save_hf_model(staging, model_source, model_state)
        tokenizer.save_pretrained(staging)
        torch.save(training_state, staging / TRAINING_STATE)
        torch.save(_rng_states(), staging / RNG_STATE)
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        if teacher_state is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in teacher_state.items()}, staging / TEACHER_WEIGHTS)
        if target.exists():  # a re-run of the same step replaces the old copy
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_final_at(Path(output_dir), target)
    return target


def _save_hf_model(folder: Path, model_source: str, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained from a weightless (meta) skeleton of the architecture plus the gathered state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.save_pretrained(folder, state_dict=state)


def _point_final_at(output_dir: Path, target: Path) -> None:
    final = output_dir / "final"
    temporary = output_dir / f".final-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target.relative_to(output_dir))
    os.replace(temporary, final)  # atomic swap of the link


def _rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def validate_checkpoint_dir(path: str | Path) -> Path:
    """Raise a clear error unless `path` is a checkpoint this module wrote (cheap; before any model loads)."""
    path = Path(path).expanduser()
    missing = [name for name in ("config.json", TRAINER_STATE, TRAINING_STATE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"train.resume_from ({str(path)!r}) is not a PCSD checkpoint: missing {missing}. Point it at a folder "
            "like <output_dir>/checkpoints/step_000004 (or <output_dir>/final)."
        )
    return path.resolve()


def load_checkpoint(path: str | Path) -> CheckpointState:
    path = validate_checkpoint_dir(path)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    training_state = torch.load(path / TRAINING_STATE, weights_only=False)
    rng = torch.load(path / RNG_STATE, weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    teacher_state = None
    if (path / TEACHER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        teacher_state = load_file(path / TEACHER_WEIGHTS)
    return CheckpointState(path=path, step=int(trainer_state["step"]), trainer_state=trainer_state,
                           training_state=training_state, teacher_state=teacher_state)
