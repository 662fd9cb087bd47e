# Set-up and day-to-day commands. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision from PyPI (needed by the reference, pytorch-ood) only imports beside this torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test lint format archive serve bench load clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check handler tests samples
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check handler tests samples
	$(BIN)/ruff format --check handler tests samples

format: $(STAMP)
	$(BIN)/ruff format handler tests samples
	$(BIN)/ruff check --fix handler tests samples

clean:
	rm -rf $(VENV) model_store/*.mar logs

# The demo archive: the digits CNN under samples/digits, packed with the handler.
model_store/digits.mar: $(STAMP) samples/digits/model.py samples/digits/digits_cnn.pt samples/digits/model-config.yaml samples/digits/index_to_name.json $(wildcard handler/*.py handler/torchserve_gradnorm/*.py handler/torchserve_gradnorm/*/*.py)
	$(BIN)/gradnorm-archive --model-name digits --version 1.0 \
	  --model-file samples/digits/model.py --serialized-file samples/digits/digits_cnn.pt \
	  --config-file samples/digits/model-config.yaml --labels samples/digits/index_to_name.json \
	  --export-path model_store --force

archive: model_store/digits.mar

# TorchServe in the foreground with the demo model; Ctrl-C stops it.
serve: model_store/digits.mar
	@PATH="$(CURDIR)/$(BIN):$$PATH" sh samples/serve.sh
