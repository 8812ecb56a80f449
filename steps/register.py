"""Register step: log the best distilled checkpoint as an MLflow model and register a version.

The checkpoint folder is logged with the transformers flavour *from its path* (the flavour copies the files
and never loads the weights), with explicit pip requirements so MLflow does not import the model to infer
them. The version goes under a name derived from the model and dataset (`pcsd-smollm2-135m-gsm8k`); the
alias `champion` moves to it only when its evaluation beats the current champion's (stored as version tags).

A retried step must not register twice: every version is tagged with the flow run id, and a version that
already carries this flow run's tag is returned instead of registering again.

    from steps.register import register
    result = register("s3://bucket/pcsd/17/checkpoints/step_000100", model="smollm2-135m", dataset="openai/gsm8k",
                      metric_value=0.25, flow_run_id="17", source_run_id=child_run_id)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pcsd_core.errors import InputNotFoundError
from steps.contract import (HEADLINE_METRIC, TAG_BRANCH, TAG_EVAL_METRIC, TAG_EVAL_VALUE,
                                         TAG_FLOW_RUN_ID)
from steps import storage, tracking
from steps.join import BranchOutcome
from steps.plan import slug

CHAMPION_ALIAS = "champion"


@dataclass
class RegisterResult:
    name: str
    version: str
    is_champion: bool  # True when this version holds the alias after the call
    already_registered: bool  # True when a retried step found this flow run's version
    model_uri: str
    alias: str = CHAMPION_ALIAS


def registered_model_name(model: str, dataset: str) -> str:
    """'pcsd-<model>-<dataset>' in lower-case slug form: ('smollm2-135m', 'openai/gsm8k') -> 'pcsd-smollm2-135m-gsm8k'."""
    model_part = slug(Path(model.rstrip("/")).name or model)
    dataset_part = slug(Path(dataset.rstrip("/")).name or dataset) if dataset else "data"
    return f"pcsd-{model_part}-{dataset_part}"


def register(
    checkpoint_dir: str | Path,
    *,
    model: str,
    dataset: str,
    metric_value: float,
    flow_run_id: str,
    source_run_id: str,
    branch: str = "",
    metric_name: str = HEADLINE_METRIC,
    alias: str = CHAMPION_ALIAS,
    dtype: str = "float32",
) -> RegisterResult:
    """Register the checkpoint at `checkpoint_dir` (a local folder or a storage URI, `steps.storage`) once per flow
    run; move `alias` to it if `metric_value` beats the holder's. A retried step finds its version without
    downloading the checkpoint again. The registry gets the model and tokenizer in `dtype` (the run's
    model.dtype, what it was evaluated in), not the float32 masters and training state the checkpoint keeps."""
    _check_checkpoint(checkpoint_dir)
    name = registered_model_name(model, dataset)
    client = tracking.client()
    existing = _version_of_flow_run(client, name, flow_run_id)
    if existing is None:
        tags = {
            TAG_FLOW_RUN_ID: str(flow_run_id),
            TAG_BRANCH: branch,
            TAG_EVAL_METRIC: metric_name,
            TAG_EVAL_VALUE: repr(float(metric_value)),
        }
        with storage.scratch() as scratch:  # a checkpoint at a storage URI is downloaded; MLflow copies it anyway
            served = _served_model(storage.local_copy(checkpoint_dir, scratch), scratch / "served", dtype)
            version = _log_and_register(served, name, source_run_id, tags)
    else:
        version = existing
    is_champion = _maybe_promote(client, name, version, float(metric_value), alias)
    return RegisterResult(
        name=name,
        version=str(version.version),
        is_champion=is_champion,
        already_registered=existing is not None,
        model_uri=f"models:/{name}/{version.version}",
        alias=alias,
    )


def _check_checkpoint(checkpoint_dir: str | Path) -> None:
    """Refuse, before any download or registry call, a location that holds no saved checkpoint."""
    if storage.is_remote(checkpoint_dir):
        if not storage.is_published(str(checkpoint_dir)):
            raise InputNotFoundError(f"register: {checkpoint_dir} holds no published checkpoint (no "
                                    f"{storage.MARKER}); the distill step that wrote it did not finish.")
    elif not Path(checkpoint_dir, "config.json").is_file():
        raise InputNotFoundError(f"register: {checkpoint_dir} is not a saved checkpoint (no config.json).")


def _served_model(checkpoint_dir: Path, folder: Path, dtype: str) -> Path:
    """The checkpoint's model cast to `dtype` (cast here, on the sending side) and its tokenizer, in `folder`."""
    from pcsd_core.models import load_model, load_tokenizer

    load_model(str(checkpoint_dir), dtype=dtype, device="cpu").save_pretrained(folder)
    load_tokenizer(str(checkpoint_dir)).save_pretrained(folder)
    return folder


def _log_and_register(checkpoint_dir: Path, name: str, source_run_id: str, tags: dict[str, str]):
    import mlflow

    with tracking.open_run(source_run_id, system_metrics=False), _pipeline_impl_as_class():
        info = mlflow.transformers.log_model(
            transformers_model=str(checkpoint_dir),  # a path: copied, not loaded
            name="model",
            task="text-generation",
            pip_requirements=_pip_requirements(),
        )
    return mlflow.register_model(info.model_uri, name, tags=tags)


@contextlib.contextmanager
def _pipeline_impl_as_class() -> Iterator[None]:
    """Bridge MLflow 3.17 and transformers 5 for path-based logging, for the duration of the call only.

    MLflow reads `pipelines.check_task(task)[1]["impl"].__name__`; transformers 5 stores `impl` as a dotted
    string ("transformers.pipelines.text_generation.TextGenerationPipeline"), so the class is imported here.
    """
    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task: str):
        task_name, metadata, options = original(task)
        impl = metadata.get("impl")
        if isinstance(impl, str):
            module_name, _, class_name = impl.rpartition(".")
            metadata = {**metadata, "impl": getattr(importlib.import_module(module_name), class_name)}
        return task_name, metadata, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _version_of_flow_run(client, name: str, flow_run_id: str):
    """The version this flow run already registered (a retried step), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(TAG_FLOW_RUN_ID) == str(flow_run_id):
            return version
    return None


def _maybe_promote(client, name: str, version, metric_value: float, alias: str) -> bool:
    """Point `alias` at `version` when it has no holder or `metric_value` is strictly better."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) == str(version.version):
        return True
    holder_value = float(holder.tags.get(TAG_EVAL_VALUE, "-inf")) if holder is not None else None
    if holder_value is not None and metric_value <= holder_value:
        return False
    client.set_registered_model_alias(name, alias, str(version.version))
    return True


def _pip_requirements() -> list[str]:
    """Pinned to what is running now, so serving reproduces the evaluation environment."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("torch", "transformers", "accelerate")]


def register_best(best: BranchOutcome | None, flow_run_id: str) -> RegisterResult | None:
    """Register the sweep's best branch; None when every branch failed."""
    if best is None:
        return None
    data = best.config.data
    return register(
        best.evaluation.checkpoint_dir,
        model=best.config.model.name,
        dataset=data.path or data.hub_name,
        metric_value=best.evaluation.metrics[HEADLINE_METRIC],
        flow_run_id=flow_run_id,
        source_run_id=best.run_id,
        branch=best.label,
        dtype=best.config.model.dtype,
    )
