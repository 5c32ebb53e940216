# Two commands for a fresh machine: `make demo` (main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.r2r-installed
DEMO_DATA ?= build/demo-data
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-slow lint clean

# torch is pinned and installed first: a bare `torch` requirement would pull the CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SD 1.x checkpoints: r2r reads CLIP's vocabulary file from this package (its own dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps 'open-clip-torch>=2.20'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO_DATA)/dataset.json || $(BIN)/r2r-train data --out $(DEMO_DATA) --count 200 --size 256x256 --seed 0 --overwrite
	$(BIN)/r2r-run --input $(DEMO_DATA)/test/rendered --output $(DEMO_OUT) --batch-size 4

# pytest exits 5 when it collects nothing: that is a failure here, said in words. Tests marked `slow` (minutes each)
# are left to `make test-slow`, so that the suite stays inside CI's budget.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow" --durations=25; rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no test" >&2; exit $$rc

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build $(DEMO_OUT)
