"""Register step: log the best distilled checkpoint as an MLflow model and register a version.

The checkpoint folder is logged with the transformers flavour *from its path* (the flavour copies the files
and never loads the weights), with explicit pip requirements so MLflow does not import the model to infer
them. The version goes under a name derived from the model and dataset (`pcsd-smollm2-135m-gsm8k`). Every run
registers its best branch, for lineage; the alias `champion` moves to it only by `register.promote_if`
(`promotion_decision`): by default only a significant paired gain over the base model and over the current
champion. The version's tag `pcsd.promotion` says why it was or was not promoted.

A LoRA checkpoint (an adapter folder, `model.lora_rank >= 1`) is logged as a PEFT model, which MLflow's
transformers flavour saves as the adapter plus a reference to its base (`base_model_path` for a local base, the
hub id otherwise) and loads back as base + adapter. With `register.merge_adapter` the adapter is merged
into the base first and the merged model is logged like a full checkpoint (servable without peft).

A retried step must not register twice: every version is tagged with the flow run id, and a version that
already carries this flow run's tag is returned instead of registering again.

    from steps.register import register
    result = register("s3://bucket/pcsd/17/checkpoints/step_000100", model="smollm2-135m", dataset="openai/gsm8k",
                      metric_value=0.25, flow_run_id="17", source_run_id=child_run_id)
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcsd_core.errors import InputNotFoundError
from pcsd_core.eval.metrics import ResponseScore, compare_paired
from steps.contract import (HEADLINE_METRIC, PAIRED_PREFIX, TAG_BRANCH, TAG_EVAL_METRIC, TAG_EVAL_VALUE,
                            TAG_FLOW_RUN_ID, TAG_PROMOTION, examples_table)
from steps import storage, tracking
from steps.join import BranchOutcome
from steps.plan import slug

CHAMPION_ALIAS = "champion"
TAG_LORA = "pcsd.lora"  # on a LoRA run's version: "adapter" (PEFT model) or "merged" (adapter merged into the base)


@dataclass
class RegisterResult:
    name: str
    version: str
    is_champion: bool  # True when this version holds the alias after the call
    already_registered: bool  # True when a retried step found this flow run's version
    model_uri: str
    alias: str = CHAMPION_ALIAS
    reason: str = ""  # why the alias moved to this version, or why not


@dataclass(frozen=True)
class Promotion:
    promote: bool
    reason: str


@dataclass(frozen=True)
class HeldOutScores:
    """A version's per-question results on the held-out set: question index -> its score."""

    by_question: dict[int, ResponseScore]


def significant_gain(paired: Mapping[str, float], alpha: float) -> tuple[bool, str]:
    """(gain, text) from `compare_paired` statistics (A against B): strict difference > 0 and McNemar p < alpha."""
    difference, p_value = paired["strict/difference"], paired["strict/mcnemar_p"]
    interval = f"[{paired.get('strict/difference_low', float('nan')):+.3f}, {paired.get('strict/difference_high', float('nan')):+.3f}]"
    text = (f"strict accuracy {difference:+.3f} {interval}, McNemar p = {p_value:.3g} "
            f"({int(paired['strict/only_a'])} turned right, {int(paired['strict/only_b'])} turned wrong)")
    return difference > 0 and p_value < alpha, text


def promotion_decision(rule: str, alpha: float, *, metric_value: float, vs_base: Mapping[str, float] | None,
                       champion_value: float | None, vs_champion: Mapping[str, float] | None) -> Promotion:
    """Whether the alias moves to a new version, and why (`register.promote_if`, documented in the config).

    `champion_value` is None when no version holds the alias; `vs_champion` is the paired comparison with the
    champion on the same questions (None when it was scored on other questions); `vs_base` the paired comparison
    with the base model (None when unknown)."""
    if rule == "never":
        return Promotion(False, "register.promote_if is 'never': registered for lineage only")
    if rule == "better":
        if champion_value is None:
            return Promotion(True, "the first version of this model")
        if metric_value > champion_value:
            return Promotion(True, f"strict accuracy {metric_value:.3f} > the champion's {champion_value:.3f}")
        return Promotion(False, f"strict accuracy {metric_value:.3f} is not above the champion's {champion_value:.3f}")
    if vs_base is None:
        return Promotion(False, "no paired test against the base model was recorded")
    gain, text = significant_gain(vs_base, alpha)
    if not gain:
        return Promotion(False, f"no significant gain over the base model at alpha {alpha:g}: {text}")
    if champion_value is None:
        return Promotion(True, f"significant gain over the base model: {text}")
    if vs_champion is None:
        return Promotion(False, "the champion was scored on other questions, so no paired test is possible; it stays")
    gain, champion_text = significant_gain(vs_champion, alpha)
    if not gain:
        return Promotion(False, f"no significant gain over the champion at alpha {alpha:g}: {champion_text}")
    return Promotion(True, f"significant gain over the base model ({text}) and the champion ({champion_text})")


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
    promote_if: str = "better",
    alpha: float = 0.05,
    vs_base: Mapping[str, float] | None = None,
    scores: HeldOutScores | None = None,
    dtype: str = "float32",
    merge_adapter: bool = False,
) -> RegisterResult:
    """Register the checkpoint at `checkpoint_dir` (a local folder or a storage URI, `steps.storage`) once per flow
    run; move `alias` to it by `promote_if` (`promotion_decision`; `vs_base` and the per-question `scores` feed the
    paired tests). A retried step finds its version without downloading the checkpoint again. The registry gets
    the model and tokenizer in `dtype` (the run's model.dtype, what it was evaluated in), not the float32 masters
    and training state the checkpoint keeps."""
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
            local = storage.local_copy(checkpoint_dir, scratch)
            if _is_adapter(local):
                tags[TAG_LORA] = "merged" if merge_adapter else "adapter"
                version = _log_and_register_adapter(local, name, source_run_id, tags, merge=merge_adapter,
                                                    scratch=scratch)
            else:
                served = _served_model(local, scratch / "served", dtype)
                version = _log_and_register(served, name, source_run_id, tags)
    else:
        version = existing
    is_champion, reason = _maybe_promote(client, name, version, float(metric_value), alias, promote_if, alpha, vs_base,
                                         scores)
    client.set_model_version_tag(name, str(version.version), TAG_PROMOTION, reason)
    return RegisterResult(
        name=name,
        version=str(version.version),
        is_champion=is_champion,
        already_registered=existing is not None,
        model_uri=f"models:/{name}/{version.version}",
        alias=alias,
        reason=reason,
    )


def _check_checkpoint(checkpoint_dir: str | Path) -> None:
    """Refuse, before any download or registry call, a location that holds no saved checkpoint."""
    if storage.is_remote(checkpoint_dir):
        if not storage.is_published(str(checkpoint_dir)):
            raise InputNotFoundError(f"register: {checkpoint_dir} holds no published checkpoint (no "
                                    f"{storage.MARKER}); the distill step that wrote it did not finish.")
    elif not Path(checkpoint_dir, "config.json").is_file() and not _is_adapter(Path(checkpoint_dir)):
        raise InputNotFoundError(f"register: {checkpoint_dir} is not a saved checkpoint (no config.json, nor a "
                                 "LoRA checkpoint's adapter_config.json).")


def _is_adapter(checkpoint_dir: Path) -> bool:
    return Path(checkpoint_dir, "adapter_config.json").is_file() and not Path(checkpoint_dir, "config.json").is_file()


def _log_and_register_adapter(checkpoint_dir: Path, name: str, source_run_id: str, tags: dict[str, str], *,
                              merge: bool, scratch: Path):
    """A LoRA checkpoint: merged into its base and logged as a full model, or logged as a PEFT model."""
    import mlflow
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pcsd_core.models import load_model

    if merge:
        merged = scratch / "merged"
        load_model(str(checkpoint_dir)).save_pretrained(merged)  # base + adapter, merged (pcsd_core.models)
        AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(merged)
        return _log_and_register(merged, name, source_run_id, tags)
    base = json.loads(Path(checkpoint_dir, "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_model(base), checkpoint_dir)
    with tracking.open_run(source_run_id, system_metrics=False):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": AutoTokenizer.from_pretrained(checkpoint_dir)},
            name="model",
            task="text-generation",
            # A local base is referenced by its path (it must be readable where the model is loaded); a hub
            # base by its id, which MLflow records with its revision.
            base_model_path=base if Path(base).is_dir() else None,
            pip_requirements=_pip_requirements() + [_pinned("peft")],
        )
    return mlflow.register_model(info.model_uri, name, tags=tags)


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


def _maybe_promote(client, name: str, version, metric_value: float, alias: str, rule: str, alpha: float,
                   vs_base: Mapping[str, float] | None, scores: HeldOutScores | None) -> tuple[bool, str]:
    """Point `alias` at `version` when `promotion_decision` says so; (holds the alias now, why)."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) == str(version.version):  # a retried step
        return True, holder.tags.get(TAG_PROMOTION, "")
    holder_value = float(holder.tags.get(TAG_EVAL_VALUE, "-inf")) if holder is not None else None
    vs_champion = None
    if holder is not None and scores is not None:
        vs_champion = _paired_with(scores, _held_out_scores(holder.run_id))
    decision = promotion_decision(rule, alpha, metric_value=metric_value, vs_base=vs_base, champion_value=holder_value,
                                  vs_champion=vs_champion)
    if decision.promote:
        client.set_registered_model_alias(name, alias, str(version.version))
    return decision.promote, decision.reason


def _held_out_scores(run_id: str) -> HeldOutScores | None:
    """A registered version's per-question scores, from its run's `eval/after_examples.json` (None if absent)."""
    import mlflow

    try:
        table = mlflow.load_table(examples_table("after"), run_ids=[run_id])
    except Exception:  # an older version, or a run from elsewhere: no paired test possible
        return None
    rows = table.to_dict("records")
    if not rows or "index" not in rows[0]:
        return None
    fields = ResponseScore.__dataclass_fields__
    return HeldOutScores({int(row["index"]): ResponseScore(**{key: row[key] for key in fields}) for row in rows})


def _paired_with(new: HeldOutScores, champion: HeldOutScores | None) -> dict[str, float] | None:
    """`compare_paired(new, champion)` on the same questions; None when they were scored on different ones."""
    if champion is None or set(new.by_question) != set(champion.by_question):
        return None
    order = sorted(new.by_question)
    return compare_paired([new.by_question[i] for i in order], [champion.by_question[i] for i in order])


def _pip_requirements() -> list[str]:
    """Pinned to what is running now, so serving reproduces the evaluation environment."""
    from importlib.metadata import version

    return [_pinned(package) for package in ("torch", "transformers", "accelerate")]


def _pinned(package: str) -> str:
    from importlib.metadata import version

    return f"{package}=={version(package)}"


def register_best(best: BranchOutcome | None, flow_run_id: str) -> RegisterResult | None:
    """Register the sweep's best branch; None when every branch failed."""
    if best is None:
        return None
    from steps.evaluate import EvalResult

    data = best.config.data
    after = EvalResult.load(best.evaluation.result_path) if best.evaluation.result_path else None
    scores = HeldOutScores(dict(zip((row["index"] for row in after.examples), after.scores()))) if after else None
    vs_base = {key.removeprefix(PAIRED_PREFIX): value for key, value in best.evaluation.metrics.items()
               if key.startswith(PAIRED_PREFIX)} or None
    return register(
        best.evaluation.checkpoint_dir,
        model=best.config.model.name,
        dataset=data.source,
        metric_value=best.evaluation.metrics[HEADLINE_METRIC],
        flow_run_id=flow_run_id,
        source_run_id=best.run_id,
        branch=best.label,
        promote_if=best.config.register.promote_if,
        alpha=best.config.register.alpha,
        vs_base=vs_base,
        scores=scores,
        dtype=best.config.model.dtype,
        merge_adapter=best.config.register.merge_adapter,
    )
