# xdrec: `make demo` and `make test` each set everything up on a fresh machine, then run.
#   make demo                                         synthetic default experiment (an earlier demo run is moved aside)
#   make demo DATA=../shared/data/amazon-food-kitchen real data: configs/experiment/<folder name>.yaml
#   make demo EXP=configs/experiment/x.yaml ARGS="model.n_layers=4"
#   make test                                         the test suite (CPU, gloo)
#   make seeds EXP=configs/experiment/x.yaml [SEEDS="0 1 2"] [ARGS=...]   one run per seed (resumed where one stopped), then xdrec report
#   make bench [BENCH_ARGS="--parts memory,xl"]       every performance goal as a ratio (about an hour, plus about an hour
#                                                     for prepare at 1M/10M/50M events; BENCH_EVENTS=1000000 for less): runs/bench/latest.json
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without CUDA the CPU build goes in first, so nothing pulls a multi-GB CUDA wheel.
# GPU users: install your CUDA torch into $(VENV) first (or set TORCH_SPEC=).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
EXP ?= configs/experiment/demo.yaml
ifneq ($(DATA),)
EXP := configs/experiment/$(notdir $(patsubst %/,%,$(DATA))).yaml
DATA_ARG := data.path=$(DATA)
endif

BENCH_EVENTS ?= 1000000,10000000,50000000
BENCH_DIR ?= data/bench

SEEDS ?= 0 1 2
NAME ?= $(basename $(notdir $(EXP)))

.PHONY: setup demo seeds test bench clean
setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e '.[dev]'
	@echo "warming DeepSpeed's ops (first time only, about a minute on a CPU)"
	$(BIN)/python -m train.engine
	touch $@

demo: setup
	$(BIN)/xdrec train $(EXP) $(DATA_ARG) $(ARGS) --overwrite

seeds: setup
	for s in $(SEEDS); do $(BIN)/xdrec train $(EXP) $(DATA_ARG) seed=$$s name=$(NAME)-seed$$s $(ARGS) --resume auto || exit 1; done
	$(BIN)/xdrec report $(foreach s,$(SEEDS),runs/$(NAME)-seed$(s)) --out runs/$(NAME)-report.json

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m tools.bench all --data $(BENCH_DIR) --events $(BENCH_EVENTS) $(BENCH_ARGS)

clean:
	rm -rf runs data/prepared wandb .pytest_cache
