# fer-service: `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FER2013_DIR ?= ../shared/datasets/fer2013
KDEF_DIR ?= ../shared/datasets/kdef-dev
export FER2013_DIR KDEF_DIR

.PHONY: install serve test lint format train evaluate plots bench soak docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The stamp re-runs the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[train,export,scale,haar,teacher,dev]"
	$(BIN)/pip install --quiet --no-deps facex==1.1.0
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/python -m app

# Two workers: a third of the suite's wall time is child processes starting (torchrun, SIGTERM, the CLI),
# which leave a core idle; more workers than cores only add start-ups (each loads torch and a server).
# Bytecode caching on even where the environment turns it off: the suite starts some twenty Python
# processes (workers, servers, torchrun ranks, Ray actors) that would each compile the project again.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

lint: $(VENV)/.installed
	$(BIN)/ruff check models training app cli tests benchmarks
	$(BIN)/ruff format --check models training app cli tests benchmarks
	$(BIN)/mypy

format: $(VENV)/.installed
	$(BIN)/ruff format models training app cli tests benchmarks
	$(BIN)/ruff check --fix models training app cli tests benchmarks

# The shipped model's chain (README: The shipped model): the default recipe's weights from git, facex's
# probabilities (about half an hour here), then the distil fine-tune; each step skipped when its file is there.
train: $(VENV)/.installed
	mkdir -p runs
	test -f runs/default-recipe.pth || git show 3fd1dd3:models/checkpoint.pth > runs/default-recipe.pth
	test -f runs/teacher-facex-turned.npz || $(BIN)/python -m training.teacher_facex --turned-views --out runs/teacher-facex-turned.npz
	$(BIN)/python -m training.train --recipe distil --run-dir runs/distil --output models/checkpoint.pth

evaluate: $(VENV)/.installed
	$(BIN)/python -m training.evaluate --checkpoint models/checkpoint.pth --json docs/val-metrics.json

plots: $(VENV)/.installed
	$(BIN)/python -m training.plots --checkpoint models/checkpoint.pth --metrics docs/val-metrics.json --out-dir docs/images

bench: $(VENV)/.installed
	mkdir -p benchmarks/results
	$(BIN)/python -m benchmarks.infer --json benchmarks/results/infer.json
	$(BIN)/python -m benchmarks.preprocess --json benchmarks/results/preprocess.json
	$(BIN)/python -m benchmarks.precision | tee benchmarks/results/precision.txt
	$(BIN)/python -m benchmarks.int8 --json benchmarks/results/int8.json | tee benchmarks/results/int8.txt
	$(BIN)/python -m benchmarks.tta | tee benchmarks/results/tta.txt
	$(BIN)/python -m benchmarks.chunk | tee benchmarks/results/chunk.txt
	$(BIN)/python -m benchmarks.http --json benchmarks/results/http.json
	$(BIN)/python -m benchmarks.photos --json benchmarks/results/photos.json
	$(BIN)/python -m benchmarks.framing --out docs/framing.md
	$(BIN)/python -m benchmarks.threads --json benchmarks/results/threads.json
	$(BIN)/python -m benchmarks.memory | tee benchmarks/results/memory.txt
	$(BIN)/python -m benchmarks.attacks --json benchmarks/results/attacks.json | tee benchmarks/results/attacks.txt
	$(BIN)/python -m benchmarks.tune --json benchmarks/results/tune.json
	$(BIN)/python -m benchmarks.profile --json benchmarks/results/profile.json
	$(BIN)/python -m benchmarks.video --json benchmarks/results/video.json | tee benchmarks/results/video.txt
	$(BIN)/python -m benchmarks.scale --json benchmarks/results/scale.json | tee benchmarks/results/scale.txt
	$(BIN)/python -m benchmarks.report --results benchmarks/results --out benchmarks/RESULTS.md

soak: $(VENV)/.installed
	mkdir -p benchmarks/results
	$(BIN)/python -m benchmarks.soak --minutes 10 --json benchmarks/results/soak.json

docker:
	docker build -t fer-service .

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
