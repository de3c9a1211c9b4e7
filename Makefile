# Every target creates .venv on first use, with exact pins from constraints.txt
# (torch stays on the 2.13.0 CPU build on machines without a GPU).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/laptop.yaml
# The main job's wall-clock budget: the whole job (search, retrain, evaluation, report) planned to end within it
# on this machine. `make search BUDGET=` runs the config's own budget (or none).
BUDGET ?= 10m
# A fresh, timestamped experiment name per `make search`, so nothing is ever overwritten.
NAME   ?= $(basename $(notdir $(CONFIG)))-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup search test test-fast lint format bench train-seed tensorboard dashboard clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

search: setup  ## the main job: search + retrain over seeds + evaluation + report within $(BUDGET) (local Ray by default)
	$(BIN)/python search/run.py --config $(CONFIG) --name $(NAME) $(if $(BUDGET),--budget $(BUDGET)) $(ARGS)

# The whole suite: the quick tier on 2 workers, then the Ray searches one at a time (they size and time their
# trials for the machine's 2 CPUs). Both run whatever the first gave; 5 is pytest's "no test selected" (a
# PYTEST_ARGS that names tests of one tier only).
test: setup  ## the whole suite (reads data from $$BSS_DATA_DIR; never downloads)
	@$(BIN)/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS); fast=$$?; \
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS); slow=$$?; \
	echo "quick tier: exit $$fast; Ray searches: exit $$slow"; \
	case "$$fast$$slow" in 00|05|50) exit 0;; *) exit 1;; esac

test-fast: setup  ## the quick tier: everything but the tests marked slow (the Ray searches), on 2 workers
	$(BIN)/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: setup  ## training throughput: eager fp32 vs the default path, side by side
	$(BIN)/python benchmarks/train_throughput.py $(ARGS)

train-seed: setup  ## the reference run (hours on a GPU)
	$(BIN)/python -m bss_model.train --config configs/seed.yaml $(ARGS)

# One experiment per TensorBoard (make tensorboard NAME=<experiment>): TensorBoard keeps one HPARAMS table per
# logdir, so several experiments' searches in one would show only one of them. Without NAME: all of results/.
TB_LOGDIR = $(if $(filter command line environment,$(origin NAME)),results/$(NAME),results)
tensorboard: setup  ## make tensorboard NAME=<experiment>; bound to localhost; ARGS="--host 0.0.0.0" exposes it
	$(BIN)/tensorboard --logdir $(TB_LOGDIR) --host 127.0.0.1 $(ARGS)

# The search's Optuna study (results/<NAME>/optuna.db), in optuna-dashboard. NAME must name an experiment:
# the default NAME above is a fresh timestamp, which never has a study.
STUDY = results/$(NAME)/optuna.db
dashboard: setup  ## make dashboard NAME=<experiment>; bound to localhost, port 8080 (ARGS="--port 8081")
	$(if $(wildcard $(STUDY)),,$(error $(STUDY) does not exist: pass NAME=<experiment> of a search under results/ (with a study: $(or $(patsubst results/%/optuna.db,%,$(wildcard results/*/optuna.db)),none yet))))
	$(BIN)/optuna-dashboard sqlite:///$(abspath $(STUDY)) --host 127.0.0.1 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
