"""The SGLang adapter against the source of the pinned `sglang` release, on CPU.

`make setup` installs the pinned wheel (pure Python) with `--no-deps`, so its files are here but its CUDA
dependencies are not; importing `sglang` itself would fail. These tests read the installed files with
`ast` (found through `importlib.util.find_spec`, which does not run `sglang/__init__.py`) and load the
two dependency-free modules (sampling_params.py, constants.py) on their own. What they check is what
the adapter really sends: it runs against a recorder standing in for `sglang.Engine`, and every
recorded call must bind to the pinned `Engine` method's signature. A different SGLang version fails
`test_installed_sglang_is_the_pinned_release` first, so an upgrade is re-checked here, not on a GPU.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from pcsd_core.config.loader import config_from_dict
from pcsd_core.rollout import sglang as adapter
from pcsd_core.rollout import sglang_api
from pcsd_core.rollout.base import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[3]
PIN = re.fullmatch(
    r"sglang==(\S+)", tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ["sglang"][0]
).group(1)


@pytest.fixture(scope="module")
def sglang_dir() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"sglang is not installed; `make setup` installs sglang=={PIN} with --no-deps for these tests.")
    return Path(list(spec.submodule_search_locations)[0])


def _module_from_file(path: Path, name: str) -> types.ModuleType:
    """Execute one source file as a standalone module (only for files whose imports are stdlib)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def _methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def _signature(function: ast.FunctionDef) -> inspect.Signature:
    """An inspect.Signature with the parameter names, kinds and has-a-default of a parsed function."""
    arguments, kind = function.args, inspect.Parameter
    positional = arguments.posonlyargs + arguments.args
    first_default = len(positional) - len(arguments.defaults)
    parameters = [
        kind(arg.arg, kind.POSITIONAL_ONLY if index < len(arguments.posonlyargs) else kind.POSITIONAL_OR_KEYWORD,
             default=None if index >= first_default else kind.empty)
        for index, arg in enumerate(positional)
    ]
    if arguments.vararg:
        parameters.append(kind(arguments.vararg.arg, kind.VAR_POSITIONAL))
    parameters += [kind(arg.arg, kind.KEYWORD_ONLY, default=kind.empty if default is None else None)
                   for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        parameters.append(kind(arguments.kwarg.arg, kind.VAR_KEYWORD))
    return inspect.Signature(parameters)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


class RecordingEngine:
    """Stands in for `sglang.Engine`: records the constructor's and every method's arguments."""

    def __init__(self, **kwargs):
        self.calls = [("__init__", (), kwargs)]

    def __getattr__(self, method):
        def record(*args, **kwargs):
            self.calls.append((method, args, kwargs))
            if method == "generate":
                return [{"output_ids": [1], "meta_info": {"finish_reason": {"type": "length", "length": 1}}}
                        for _ in kwargs["input_ids"]]
            return True, "ok"

        return record


class NullBroadcaster:
    def connect(self, **kwargs): ...

    def broadcast(self, tensor): ...

    def disconnect(self): ...


@pytest.fixture(scope="module")
def recorded_calls(tmp_path_factory) -> list[tuple[str, tuple, dict]]:
    """Every call the adapter makes on `sglang.Engine` over both placements' full life cycle."""
    model_dir = tmp_path_factory.mktemp("model")
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    weights = [("lm_head.weight", torch.zeros(4, 2)), ("model.norm.weight", torch.ones(2))]
    sampling = SamplingParams(temperature=0.7, max_new_tokens=4, seed=3)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter, "import_sglang", lambda: types.SimpleNamespace(Engine=RecordingEngine))
        for placement in adapter.PLACEMENTS:
            engine = adapter.SGLangRolloutEngine(str(model_dir), placement=placement, broadcaster=NullBroadcaster(),
                                                 bucket_bytes=8)
            recorder = engine.engine
            engine.generate([[1, 2]], n=2, sampling=sampling)
            engine.sleep()
            engine.update_weights(weights)
            engine.generate([[1, 2]], n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=4))
            engine.close()
            calls += recorder.calls
        # LoRA (model.lora_rank >= 1): the adapter is loaded by tensors, replaced at the next sync.
        lora = config_from_dict({"model": {"lora_rank": 8}}).model
        adapter_tensors = [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(8, 2))]
        for placement in adapter.PLACEMENTS:
            engine = adapter.SGLangRolloutEngine(str(model_dir), placement=placement, broadcaster=NullBroadcaster(),
                                                 lora=lora)
            recorder = engine.engine
            for _ in range(2):
                engine.generate([[1, 2]], n=2, sampling=sampling)
                engine.sleep()
                engine.update_weights(adapter_tensors)
            engine.generate([[1, 2]], n=1, sampling=sampling)
            engine.close()
            calls += recorder.calls
    return calls


def test_installed_sglang_is_the_pinned_release(sglang_dir):
    installed = importlib.metadata.version("sglang")
    assert installed == PIN, (
        f"sglang {installed} is installed but pyproject.toml pins {PIN}; rerun `make setup`, or, when upgrading "
        "the pin, re-check these contract tests, the Makefile's SGLANG_TORCH_SPEC and the README's GPU section."
    )
    makefile, readme = (REPO_ROOT / "Makefile").read_text(), (REPO_ROOT / "README.md").read_text()
    assert f"sglang=={PIN}" in makefile and f"sglang=={PIN}" in readme
    # The torch a GPU host gets is the one this release pins; the Makefile and README must name it.
    torch_pin = next(re.fullmatch(r"torch==(\S+)", requirement).group(1) for requirement in
                     importlib.metadata.requires("sglang") if re.fullmatch(r"torch==\S+", requirement))
    assert f"SGLANG_TORCH_SPEC ?= torch=={torch_pin}\n" in makefile and f"torch {torch_pin}" in readme


def test_engine_is_constructed_with_server_args_fields_only(sglang_dir, recorded_calls):
    server_args = _class(_parse(sglang_dir / "srt" / "server_args.py"), "ServerArgs")
    fields = {node.target.id for node in server_args.body if isinstance(node, ast.AnnAssign)}
    constructions = [kwargs for method, _, kwargs in recorded_calls if method == "__init__"]
    assert len(constructions) == 2 * len(adapter.PLACEMENTS)  # full fine-tuning and LoRA
    assert any(kwargs.get("enable_lora") for kwargs in constructions)
    for kwargs in constructions:
        assert set(kwargs) <= fields, f"not ServerArgs fields in sglang {PIN}: {sorted(set(kwargs) - fields)}"
    # `dtype` is checked against the CLI's choices, the only place the release lists them.
    dtype_choices = _dtype_choices(sglang_dir)
    assert {kwargs["dtype"] for kwargs in constructions} <= set(dtype_choices)
    engine_tree = _parse(sglang_dir / "lang" / "api.py")
    assert "from sglang.srt.entrypoints.engine import Engine" in ast.unparse(engine_tree)  # sglang.Engine


def _dtype_choices(sglang_dir: Path) -> list[str]:
    for node in ast.walk(_parse(sglang_dir / "srt" / "server_args.py")):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == "--dtype"):
            return next(ast.literal_eval(keyword.value) for keyword in node.keywords if keyword.arg == "choices")
    raise AssertionError(f"sglang {PIN} server_args.py has no --dtype argument")


def test_every_engine_call_binds_to_the_pinned_engine_method(sglang_dir, recorded_calls):
    methods = _methods(_class(_parse(sglang_dir / "srt" / "entrypoints" / "engine.py"), "Engine"))
    for method, args, kwargs in recorded_calls:
        if method == "__init__":
            continue
        assert method in methods, f"sglang {PIN} Engine has no method {method!r}"
        try:
            _signature(methods[method]).bind("self", *args, **kwargs)
        except TypeError as error:
            raise AssertionError(f"Engine.{method}{sorted(kwargs)} does not bind in sglang {PIN}: {error}") from None


def test_the_recorder_saw_every_engine_method_the_adapter_names():
    """Completeness: each `self.engine.<method>` in the adapter's source ran in `recorded_calls`."""
    tree = _parse(Path(adapter.__file__))
    named = {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
        and node.value.attr == "engine" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
    }
    assert named == {
        "generate", "update_weights_from_tensor", "update_weights_from_distributed", "init_weights_update_group",
        "destroy_weights_update_group", "release_memory_occupation", "resume_memory_occupation", "shutdown",
        "load_lora_adapter_from_tensors", "unload_lora_adapter",
    }


def test_recorded_calls_cover_every_method_named(recorded_calls):
    assert {method for method, _, _ in recorded_calls} - {"__init__"} == {
        "generate", "update_weights_from_tensor", "update_weights_from_distributed", "init_weights_update_group",
        "destroy_weights_update_group", "release_memory_occupation", "resume_memory_occupation", "shutdown",
        "load_lora_adapter_from_tensors", "unload_lora_adapter",
    }


def test_lora_adapter_config_has_every_key_sglang_reads(sglang_dir, recorded_calls):
    """`LoRAConfig(config_dict=...)` reads `hf_config[<key>]`; our dict has each key, and generate names the
    loaded adapter."""
    tree = _parse(sglang_dir / "srt" / "lora" / "lora_config.py")
    read = {node.slice.value for node in ast.walk(tree) if isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "hf_config"
            and isinstance(node.slice, ast.Constant)}
    assert {"r", "lora_alpha", "target_modules"} <= read
    loads = [kwargs for method, _, kwargs in recorded_calls if method == "load_lora_adapter_from_tensors"]
    assert loads and all(read <= set(kwargs["config_dict"]) for kwargs in loads)
    unloads = [kwargs for method, _, kwargs in recorded_calls if method == "unload_lora_adapter"]
    assert len(unloads) == len(loads) - len(adapter.PLACEMENTS)  # each sync after the first replaces the adapter
    named = [kwargs["lora_path"] for method, _, kwargs in recorded_calls if method == "generate" and "lora_path" in kwargs]
    assert named and all(set(paths) == {adapter.ADAPTER_NAME} for paths in named)
    # The LoRA calls answer a LoRAUpdateOutput, whose fields `check_result` reads.
    output = _class(_parse(sglang_dir / "srt" / "managers" / "io_struct.py"), "LoRAUpdateOutput")
    assert {"success", "error_message"} <= {node.target.id for node in output.body if isinstance(node, ast.AnnAssign)}


def test_memory_tags_are_the_pinned_ones(sglang_dir, recorded_calls):
    constants = _module_from_file(sglang_dir / "srt" / "constants.py", "pinned_sglang_constants")
    assert sorted(adapter.WEIGHTS_TAGS + adapter.CACHE_TAGS) == sorted(constants.GPU_MEMORY_ALL_TYPES)
    sent = {tag for method, _, kwargs in recorded_calls if method.endswith("_memory_occupation") for tag in kwargs["tags"]}
    assert sent == set(constants.GPU_MEMORY_ALL_TYPES)


def test_sampling_dicts_construct_and_verify_in_the_pinned_sampling_params(sglang_dir, recorded_calls):
    module = _module_from_file(sglang_dir / "srt" / "sampling" / "sampling_params.py", "pinned_sglang_sampling")
    sent = [kwargs["sampling_params"] for method, _, kwargs in recorded_calls if method == "generate"]
    requests = [params for batch in sent for params in (batch if isinstance(batch, list) else [batch])]
    assert any("sampling_seed" in params for params in requests) and any(params["temperature"] == 0 for params in requests)
    for params in requests:
        sglang_params = module.SamplingParams(**params)  # TypeError on a key this release does not take
        sglang_params.verify(vocab_size=64)
        if params["temperature"] == 0:
            assert sglang_params.top_k == 1  # SGLang's greedy, as to_sglang_sampling_params documents
    # "Neutral" means this release's own defaults: nothing but temperature/top_p/max_new_tokens shapes sampling.
    defaults = {name: p.default for name, p in inspect.signature(module.SamplingParams.__init__).parameters.items()}
    for name, value in sglang_api.NEUTRAL_SAMPLING.items():
        if name != "skip_special_tokens":  # deliberately off: special tokens must round-trip as ids
            assert defaults[name] == value, f"{name}: sglang {PIN} default {defaults[name]!r}, we send {value!r}"


def test_output_fields_we_read_are_the_ones_sglang_writes(sglang_dir):
    batch = _parse(sglang_dir / "srt" / "managers" / "schedule_batch.py")
    reasons = {}
    for name in ("FINISH_MATCHED_TOKEN", "FINISH_LENGTH", "FINISH_ABORT"):
        returned = next(node.value for node in ast.walk(_methods(_class(batch, name))["to_json"])
                        if isinstance(node, ast.Return))
        reasons[name] = {key.value: value for key, value in zip(returned.keys, returned.values)}
    assert ast.literal_eval(reasons["FINISH_MATCHED_TOKEN"]["type"]) == "stop" and "matched" in reasons[
        "FINISH_MATCHED_TOKEN"]
    assert ast.literal_eval(reasons["FINISH_LENGTH"]["type"]) == "length"
    assert ast.literal_eval(reasons["FINISH_ABORT"]["type"]) == "abort" and "message" in reasons["FINISH_ABORT"]
    # The length limit is checked before EOS, which is why parse_output looks at the last token itself.
    check = ast.unparse(_methods(_class(batch, "Req"))["check_finished"])
    assert check.index("FINISH_LENGTH(") < check.index("_check_token_based_finish(")
    # The token-id output (skip_tokenizer_init) carries output_ids and meta_info with the finish reason.
    manager = _parse(sglang_dir / "srt" / "managers" / "tokenizer_manager.py")
    dict_keys = [{key.value for key in node.keys if isinstance(key, ast.Constant)}
                 for node in ast.walk(manager) if isinstance(node, ast.Dict)]
    assert any({"output_ids", "meta_info"} <= keys for keys in dict_keys)
    assert any("finish_reason" in keys for keys in dict_keys)


def test_eos_set_is_config_union_generation_config(sglang_dir):
    """merge_eos_token_ids copies SGLang's rule; the rule must still read both files."""
    config = _parse(sglang_dir / "srt" / "configs" / "model_config.py")
    rule = ast.unparse(_methods(_class(config, "ModelConfig"))["_get_hf_eos_token_id"])
    assert "self.hf_config" in rule and "self.hf_generation_config" in rule and "eos_ids | generation_eos_ids" in rule


def test_weight_sync_group_call_binds_to_init_custom_process_group(sglang_dir, monkeypatch):
    utils_init = ast.unparse(_parse(sglang_dir / "srt" / "utils" / "__init__.py"))
    assert "from sglang.srt.utils.common import *" in utils_init
    common = _parse(sglang_dir / "srt" / "utils" / "common.py")
    assert not any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
                   for node in common.body)  # the star import re-exports every public name
    function = next(node for node in common.body
                    if isinstance(node, ast.FunctionDef) and node.name == "init_custom_process_group")
    recorded = {}
    fake_utils = types.ModuleType("sglang.srt.utils")
    fake_utils.init_custom_process_group = lambda *args, **kwargs: recorded.update(args=args, kwargs=kwargs)
    for name in ("sglang", "sglang.srt"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sglang.srt.utils", fake_utils)
    monkeypatch.setattr(sglang_api, "import_sglang", lambda: None)
    sglang_api.NcclWeightBroadcaster(device="cpu").connect(
        master_address="127.0.0.1", master_port=1234, world_size=3, group_name="g", backend="nccl")
    _signature(function).bind(*recorded["args"], **recorded["kwargs"])
    assert recorded["kwargs"]["rank"] == 0 and recorded["kwargs"]["group_name"] == "g"
