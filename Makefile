# Set-up and day-to-day commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision from PyPI (needed by the reference, pytorch-ood) only imports beside this torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test lint format archive eval serve bench bench-readme load soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fails with one line per missing prerequisite (tests/prerequisites.py) instead of skipping
# tests; -rs lists what was skipped and why (only hardware CI cannot have: a CUDA device).
test: $(STAMP) test-tools
	$(BIN)/python tests/prerequisites.py
	$(BIN)/ruff check handler tests samples bench
	$(BIN)/python -m pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check handler tests samples bench
	$(BIN)/ruff format --check handler tests samples bench

format: $(STAMP)
	$(BIN)/ruff format handler tests samples bench
	$(BIN)/ruff check --fix handler tests samples bench

clean:
	rm -rf $(VENV) model_store/*.mar logs build

# The demo archive: the digits CNN under samples/digits, packed with the handler and
# calibrated on the validation digits and 8 augmented copies of each (no OOD data).
# DEMO, STORE and EVAL_MD move the outputs (tests/test_demo_eval.py builds them elsewhere).
DEMO ?= build/demo
STORE ?= model_store
EVAL_MD ?= docs/demo-eval.md
DEMO_DETECTOR := predicted_mahalanobis
SHIFTS := bilinear bicubic lanczos jpeg rotate translate thick thin contrast brightness
FAR_OOD := letters noise photos
NEAR_OOD := inverted rotated

$(STORE)/digits.mar: $(STAMP) samples/digits/model.py samples/digits/digits_cnn.pt samples/digits/model-config.yaml samples/digits/index_to_name.json $(DEMO)/.done $(wildcard handler/*.py handler/torchserve_gradnorm/*.py handler/torchserve_gradnorm/*/*.py)
	$(BIN)/gradnorm-archive --model-name digits --version 1.0 \
	  --model-file samples/digits/model.py --serialized-file samples/digits/digits_cnn.pt \
	  --config-file samples/digits/model-config.yaml --labels samples/digits/index_to_name.json \
	  --export-path $(STORE) --force
	$(BIN)/gradnorm-calibrate $(STORE)/digits.mar --id $(DEMO)/id_val --augment 8 \
	  --detector $(DEMO_DETECTOR) --into $(STORE)/digits.mar --out $(DEMO)/calibration.json \
	  --plot $(DEMO)/calibration.png

# Calibration and evaluation data for the demo, generated (scikit-learn's digits, no download).
$(DEMO)/.done: $(STAMP) samples/make_demo_data.py samples/digits/split.json
	$(BIN)/python samples/make_demo_data.py --out $(DEMO)
	touch $@

archive: $(STORE)/digits.mar

# The demo's detector tables (README, docs/demo-eval.md): held-out ID digits, the same digits
# rendered through ten benign paths (answered as ID), far and near OOD sets.
eval: $(STORE)/digits.mar
	$(BIN)/gradnorm-eval $(STORE)/digits.mar --id $(DEMO)/id_test \
	  $(foreach s,$(SHIFTS),--shift $(DEMO)/shift_test/$(s)) \
	  $(foreach s,$(FAR_OOD),--ood $(DEMO)/ood_test/$(s)) \
	  $(foreach s,$(NEAR_OOD),--near-ood $(DEMO)/ood_test/$(s)) \
	  --fit-id $(DEMO)/id_val --fit-augment 8 \
	  $(foreach s,$(FAR_OOD) $(NEAR_OOD),--fit-ood $(DEMO)/ood_fit/$(s)) \
	  --markdown $(EVAL_MD) --json $(DEMO)/eval.json

# TorchServe with the demo model: fails unless a prediction is answered, then stays in the
# foreground; Ctrl-C stops it.
serve: model_store/digits.mar
	@PATH="$(CURDIR)/$(BIN):$$PATH" sh samples/serve.sh

# Programs the tests need that pip cannot install: Java (TorchServe's frontend, for the
# server tests) and the Debian package `prometheus` (promtool for the alert-rule unit tests
# monitoring/*test*.yml, Prometheus for the scrape test). Installed with apt-get when missing,
# as root or with password-less sudo; where that is impossible `make test` stops and says
# what to install.
# $(call apt_install,PROGRAM,PACKAGE): install PACKAGE unless PROGRAM is found.
define apt_install
	@command -v $(1) >/dev/null 2>&1 || [ -x /usr/bin/$(1) ] || { \
	  command -v apt-get >/dev/null 2>&1 \
	    || { echo "make test: $(1) not found and no apt-get to install $(2): install $(2)" >&2; exit 1; }; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing the Debian package $(2) (for $(1))"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      $$SUDO apt-get install -y -qq --no-install-recommends $(2) >/dev/null; } \
	    || { echo "make test: $(1) not found and apt-get could not install $(2) (see above; it needs root or password-less sudo): install $(2)" >&2; exit 1; }; \
	  command -v $(1) >/dev/null 2>&1 || [ -x /usr/bin/$(1) ] \
	    || { echo "make test: $(2) installed but $(1) is still not found" >&2; exit 1; }; }
endef

.PHONY: test-tools java prometheus monitoring-test
test-tools: java prometheus

java:
	$(call apt_install,java,default-jre-headless)

prometheus:
	$(call apt_install,promtool,prometheus)

monitoring-test: prometheus
	cd monitoring && promtool check rules alerts.yml && promtool test rules *test*.yml

test: monitoring-test

# KServe storage layout (deploy/kserve/config.properties): upload build/kserve/ to the
# InferenceService's storageUri (deploy/kserve/inferenceservice.yaml).
.PHONY: kserve-store
kserve-store: model_store/digits.mar
	mkdir -p build/kserve/config build/kserve/model-store
	cp deploy/kserve/config.properties metrics.yaml build/kserve/config/
	cp model_store/digits.mar build/kserve/model-store/

# Per-sample scoring on the model zoo against pytorch-ood, BackPACK and plain passes, CPU,
# 2 threads, every model, both methods (bench/README.md); about 15-16 minutes on a quiet machine
# (no case starts after 19).
# Writes the committed bench/results/cpu-2threads.{json,md}; `make bench-readme` then renders
# the README's performance table from it. Subsets: PYTHONPATH=bench python -m gradnorm_bench
# --models ... --impls ... (writes bench/results/latest-cpu.*, not committed).
BENCH := PYTHONPATH=bench $(BIN)/python -m gradnorm_bench
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BENCH) --threads 2 --time-limit-min 19 --out bench/results/cpu-2threads.json

bench-readme: $(STAMP)
	PYTHONPATH=bench $(BIN)/python -m gradnorm_bench.readme README.md \
	  bench/results/cpu-2threads.json $(wildcard bench/results/gpu-*.json)

# Load test over loopback: 2,000 requests per model at concurrency 16 against the demo
# model served plain (forward only), with the head-only filter and with every parameter;
# checks every answer by content, prints throughput and p50/p99 (and writes the committed
# bench/results/load.md), fails on any error.
load: $(STAMP)
	$(BIN)/python bench/load.py --requests 2000 --concurrency 16 --timeout-s 300 --out bench/results/load.md

# Soak: 50,000 requests at concurrency 16 over every way in (pictures, JSON tensors, v2 JSON,
# v2 binary, native gRPC, OIP gRPC; 10 % malformed) against the every-parameter model; checks
# each answer, the worker's memory and the latency drift; writes bench/results/soak.{json,md}.
soak: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/soak.py --requests 50000 --concurrency 16 --out bench/results/soak.json
