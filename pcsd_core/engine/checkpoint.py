"""Training checkpoints: a Hugging Face model folder plus what it takes to continue the run exactly.

    <output_dir>/checkpoints/step_000004/
        config.json, model.safetensors, tokenizer files   <- `from_pretrained` loads this folder
        training_state.pt    optimizer (full, unsharded) and lr-scheduler state
        trainer_state.json   step, seed and data-order facts (the data order is a function of seed and step)
        rng_state.pt         controller RNG states (torch, numpy, python)
        teacher.safetensors  EMA teacher weights (teacher_mode "ema" only)
        manifest.json        every other file's size (and sha256 up to HASH_MAX_BYTES), written last
    <output_dir>/final -> checkpoints/step_000004   (symlink to the newest checkpoint)

A LoRA run (`model.lora_rank >= 1`) writes the adapter instead of config.json and the model's weights:
        adapter_config.json, adapter_model.safetensors   <- peft's format: `PeftModel.from_pretrained(base, folder)`
        base_model.json      the base it adapts: alias, path or hub id, and the sha256 of its files (checked at resume)
The optimizer state then covers the adapter alone.

Every checkpoint is written into a staging folder `checkpoints/.step_000004-<pid>-<random>` and renamed into
place with `os.replace`, so a crash never leaves a half-written `step_*` folder that `resume_from` could pick
up; a staging folder whose process is gone (a SIGKILL mid-save) is removed at the next save or resume.
`validate_checkpoint_dir` checks the manifest before any model loads, so a folder damaged later (a file
deleted or truncated, a state file edited) is refused with what is wrong. Given a run's output_dir instead of
a checkpoint, it picks the newest checkpoint that passes the check.

Why sizes for big files and hashes only for small ones: sha256 runs at ~1.7 GB/s here (0.31 s for SmolLM2's
538 MB model.safetensors), which is fine for a 135M model (~1.6 GB with optimizer state) but is a minute per
save and per resume for a 7B run (~100 GB). Sizes catch the damage that happens in practice (a truncated copy,
a killed write, a missing file); hashes on the small files catch hand edits of the state files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcsd_core.errors import ConfigError

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
RNG_STATE = "rng_state.pt"
TEACHER_WEIGHTS = "teacher.safetensors"
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_MODEL = "base_model.json"
REQUIRED_FILES = ("config.json", TRAINER_STATE, TRAINING_STATE, RNG_STATE)
LORA_REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL, TRAINER_STATE, TRAINING_STATE, RNG_STATE)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of shards
HASH_MAX_BYTES = 64 * 2**20  # files up to this size get a sha256 in the manifest; bigger ones a size only
STEP_FOLDER = re.compile(r"step_(\d+)")
STAGING_FOLDER = re.compile(r"\.step_\d+-(?:(\d+)-)?")  # .step_000004-<pid>-<random> (no pid: older format)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class CheckpointState:
    path: Path
    step: int
    trainer_state: dict[str, Any]
    training_state: dict[str, Any]
    teacher_state: dict[str, torch.Tensor] | None
    adapter_state: dict[str, torch.Tensor] | None = None  # LoRA: the student adapter (peft file names)
    base_model: dict[str, Any] | None = None  # LoRA: the base reference (base_model.json)


def save_checkpoint(output_dir: str | Path, step: int, *, model_source: str, model_state: dict[str, torch.Tensor],
                    tokenizer: Any, training_state: dict[str, Any], trainer_state: dict[str, Any],
                    teacher_state: dict[str, torch.Tensor] | None = None, adapter_config: Any = None,
                    base_model: dict[str, Any] | None = None) -> Path:
    """Write `checkpoints/step_<step>` atomically and point `final` at it; returns its path.

    With `adapter_config` (a peft `LoraConfig`) `model_state` is the adapter, written in peft's format, and
    `base_model` (`base_model_reference`) names the base it adapts."""
    checkpoints = Path(output_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    remove_orphan_staging(checkpoints)
    target = checkpoints / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=checkpoints))
    try:
        if adapter_config is not None:
            from safetensors.torch import save_file

            adapter_config.save_pretrained(staging)
            save_file({k: v.contiguous() for k, v in model_state.items()}, staging / ADAPTER_WEIGHTS)
            (staging / BASE_MODEL).write_text(json.dumps(base_model, indent=2))
        else:
            _save_hf_model(staging, model_source, model_state)
        tokenizer.save_pretrained(staging)
        torch.save(training_state, staging / TRAINING_STATE)
        torch.save(_rng_states(), staging / RNG_STATE)
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        if teacher_state is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in teacher_state.items()}, staging / TEACHER_WEIGHTS)
        _write_manifest(staging)  # last: a folder with a manifest was written completely
        if target.exists():  # a re-run of the same step replaces the old copy
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    point_final_at(Path(output_dir), target)
    return target


def _save_hf_model(folder: Path, model_source: str, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained from a weightless (meta) skeleton of the architecture plus the gathered state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.save_pretrained(folder, state_dict=state)


def base_model_reference(name: str, source: str) -> dict[str, Any]:
    """What a LoRA checkpoint records of its base: the alias/id the user gave, the folder or hub id it resolved
    to, and for a local folder the sha256 of config.json and each weight file (hashed once per run: 0.3 s for
    SmolLM2, ~8 s for a 14 GB 7B model at the measured 1.7 GB/s)."""
    folder = Path(source)
    files = {}
    if folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.name == "config.json" or file.suffix in (".safetensors", ".bin"):
                files[file.name] = _sha256(file)
    return {"name": name, "source": source, "sha256": files}


def point_final_at(output_dir: Path, target: Path) -> None:
    """Swap `output_dir/final` to link to the checkpoint `target` (the last saved, or the one a run keeps)."""
    final = output_dir / "final"
    temporary = output_dir / f".final-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(target.relative_to(output_dir))
    os.replace(temporary, final)  # atomic swap of the link


def _rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


# ---- integrity: manifest, verification, orphan staging folders -------------------------------------


def _write_manifest(folder: Path) -> None:
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        files[str(file.relative_to(folder))] = {"bytes": size, "sha256": _sha256(file) if size <= HASH_MAX_BYTES else None}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder `path` (empty when it is complete and matches its manifest)."""
    lora = (path / ADAPTER_CONFIG).is_file()
    problems = [f"{name} is missing" for name in (LORA_REQUIRED_FILES if lora else REQUIRED_FILES)
                if not (path / name).is_file()]
    if not lora and not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"the weights ({' or '.join(WEIGHT_FILES)}) are missing")
    if not (path / MANIFEST).is_file():
        return problems + [f"{MANIFEST} is missing (it is written last, so the save did not finish, or the "
                           "checkpoint was written before checkpoints had manifests)"]
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return problems + [f"{MANIFEST} is not valid JSON with a 'files' table"]
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            if f"{name} is missing" not in problems:
                problems.append(f"{name} is missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)")
        elif expected.get("sha256") and _sha256(file) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 in the manifest (modified or corrupt)")
    return problems


def remove_orphan_staging(checkpoints_dir: Path) -> list[Path]:
    """Delete staging folders left by a save whose process died (SIGKILL, power loss); return what was removed.

    A staging folder of a process that is still running (another save in progress) is left alone.
    """
    removed = []
    if not checkpoints_dir.is_dir():
        return removed
    for child in checkpoints_dir.iterdir():
        match = STAGING_FOLDER.match(child.name)
        if match and child.is_dir() and not (match.group(1) and _process_alive(int(match.group(1)))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoints/step_*` of a run that passes `checkpoint_problems`; damaged ones are skipped with a warning."""
    checkpoints = Path(output_dir).expanduser() / "checkpoints"
    remove_orphan_staging(checkpoints)
    candidates = [p for p in checkpoints.iterdir() if STEP_FOLDER.fullmatch(p.name)] if checkpoints.is_dir() else []
    for candidate in sorted(candidates, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)), reverse=True):
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate.resolve()
        warnings.warn(f"skipping damaged checkpoint {candidate}: {'; '.join(problems)}.", stacklevel=2)
    return None


def validate_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder to resume from; a clear error unless it is complete (cheap: before any model loads).

    `path` is a checkpoint folder (`<output_dir>/checkpoints/step_000004`, `<output_dir>/final`) or a run's
    output_dir, for which the newest complete checkpoint is chosen.
    """
    path = Path(path).expanduser()
    is_checkpoint = any((path / name).exists() for name in (MANIFEST, TRAINER_STATE, ADAPTER_CONFIG, *WEIGHT_FILES))
    if not is_checkpoint and (path / "checkpoints").is_dir():
        latest = latest_complete_checkpoint(path)
        if latest is None:
            raise ConfigError(
                f"train.resume_from ({str(path)!r}) is a run folder, but none of its checkpoints/step_* folders is "
                "complete (see the warnings above); start without train.resume_from."
            )
        return latest
    problems = checkpoint_problems(path)
    if not is_checkpoint:
        missing = [name for name in (*REQUIRED_FILES, MANIFEST) if not (path / name).is_file()]
        raise ConfigError(
            f"train.resume_from ({str(path)!r}) is not a PCSD checkpoint: missing {missing}. Point it at a folder "
            "like <output_dir>/checkpoints/step_000004, at <output_dir>/final, or at the run's output_dir (the "
            "newest complete checkpoint is used)."
        )
    if problems:
        raise ConfigError(
            f"train.resume_from ({str(path)!r}) is damaged or incomplete: {'; '.join(problems)}. Resume from another "
            f"checkpoint, or pass the run's output_dir ({str(path.resolve().parent.parent)!r}) to use the newest "
            "complete one."
        )
    return path.resolve()


def load_checkpoint(path: str | Path) -> CheckpointState:
    path = validate_checkpoint_dir(path)
    if path.parent.name == "checkpoints":
        remove_orphan_staging(path.parent)  # a save killed after this checkpoint left its staging folder
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
    adapter_state = base_model = None
    if (path / ADAPTER_CONFIG).is_file():
        from safetensors.torch import load_file

        adapter_state = load_file(path / ADAPTER_WEIGHTS)
        base_model = json.loads((path / BASE_MODEL).read_text())
    return CheckpointState(path=path, step=int(trainer_state["step"]), trainer_state=trainer_state,
                           training_state=training_state, teacher_state=teacher_state, adapter_state=adapter_state,
                           base_model=base_model)


def optimizer_state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in a training state's optimizer state (0 when it carries none)."""
    per_param = (state.get("optimizer") or {}).get("state", {}).values()
    return sum(value.numel() * value.element_size() for values in per_param for value in values.values()
               if isinstance(value, torch.Tensor))
