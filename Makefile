# `make demo`: set up and train the CPU character GPT on Tiny Shakespeare, then generate text from it.
# `make test`: set up and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: demo test setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	rm -rf $(DEMO_DIR)
	$(BIN)/mmgen fit --config recipes/text/shakespeare_char_cpu.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(BIN)/mmgen generate --ckpt $$(ls -t $(DEMO_DIR)/lightning_logs/*/checkpoints/last.ckpt | head -n 1) \
		--prompt "ROMEO:" --max-new-tokens 500 --temperature 0.8 --seed 0

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs lightning_logs
