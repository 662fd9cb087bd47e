# Set-up and day-to-day commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision from PyPI (needed by the reference, pytorch-ood) only imports beside this torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test lint format archive eval serve bench load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check handler tests samples bench
	$(BIN)/python -m pytest -q

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
DEMO_DETECTOR := class_mahalanobis
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

# TorchServe in the foreground with the demo model; Ctrl-C stops it.
serve: model_store/digits.mar
	@PATH="$(CURDIR)/$(BIN):$$PATH" sh samples/serve.sh

# Monitoring: Prometheus for the scrape test (tests/test_prometheus.py) and promtool for the
# alert-rule unit tests (monitoring/*test*.yml). `make test` installs the Debian package
# `prometheus` when promtool is missing (as root, or with password-less sudo); where that is
# impossible it says so, promtool's tests are skipped and the Prometheus test skips itself.
.PHONY: prometheus monitoring-test
prometheus:
	@command -v promtool >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool not found and no apt-get: the Prometheus tests will be skipped"; \
	  else \
	    SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	      || echo "could not install the prometheus package: the Prometheus tests will be skipped"; \
	  fi; }

monitoring-test: prometheus
	@if command -v promtool >/dev/null 2>&1; then \
	  promtool check rules monitoring/alerts.yml && promtool test rules monitoring/*test*.yml; \
	else echo "promtool not found: skipping promtool test rules monitoring/*test*.yml"; fi

test: monitoring-test

# KServe storage layout (deploy/kserve/config.properties): upload build/kserve/ to the
# InferenceService's storageUri (deploy/kserve/inferenceservice.yaml).
.PHONY: kserve-store
kserve-store: model_store/digits.mar
	mkdir -p build/kserve/config build/kserve/model-store
	cp deploy/kserve/config.properties metrics.yaml build/kserve/config/
	cp model_store/digits.mar build/kserve/model-store/

# Load test over loopback: 2,000 requests per model at concurrency 16 against the demo
# model served plain (forward only), with the head-only filter and with every parameter;
# checks every answer by content, prints throughput and p50/p99, fails on any error.
# Per-sample norm timings and memory against pytorch-ood, BackPACK and plain passes (CPU).
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/gradnorm-bench --threads 2 --retry-contended 2 --out bench/results/cpu-2threads.json

load: $(STAMP)
	$(BIN)/python bench/load.py --requests 2000 --concurrency 16 --timeout-s 300
