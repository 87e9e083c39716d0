# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench bench-scale soak i18n

$(BIN)/fluxbot: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch with its matching torchvision (spandrel's upscalers need both); the pair lies on the dev
	# machines' disk. On a GPU host any CUDA build of the same pair does.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[engine,quant,postgres,dev]"
	touch $(BIN)/fluxbot

setup: $(BIN)/fluxbot

run: setup
	# exit 2 = no token yet: fluxbot says how to get one and renders an offline demo instead
	$(BIN)/fluxbot run || [ $$? -eq 2 ]

test: setup
	# Redis and PostgreSQL on 127.0.0.1 for the scale-out and Postgres tests (started if installed)
	tests/services.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: setup
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/bot.py

bench-scale: setup
	tests/services.sh
	$(BIN)/python bench/scale.py

soak: setup
	$(BIN)/python bench/soak.py

i18n: setup
	# the catalog template from the code and the slash commands, merged into every bot/locale/*/LC_MESSAGES/fluxbot.po
	$(BIN)/python -m bot.locale_tools
