# Two commands do all the set-up on a fresh machine:
#   make run    set up, then train the default recipe, evaluate it and print the test accuracy
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= fast

.PHONY: run test setup data browser compiler clean

run: setup data compiler
	$(PY) -m fashion_cnn train $(RECIPE)

# Two test processes (pytest-xdist), one torch thread each (tests/conftest.py): on 2 cores the
# suite's many short subprocesses and start-ups overlap instead of queueing.
test: setup data browser compiler
	$(PY) -m pytest -q -n 2

setup: $(VENV)/.installed

# torch is pinned: 2.13.0 is the CPU build (any other version pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,export,tune,keras,tensorboard,notebook,serve]'
	touch $@

# The dataset: Debian's package where the files are not found and apt exists.
data:
	@sh scripts/ensure-package.sh dataset-fashion-mnist \
		"$(PY) -c 'from fashion_cnn.data import find_data_dir; find_data_dir()'"

# A C compiler for the C kernels (src/fashion_cnn/models/kernels: the seed networks' fused first block,
# dropout, Keras' Adam step); without one those run through PyTorch alone, slower.
compiler:
	@sh scripts/ensure-package.sh gcc "command -v cc || command -v gcc"

# Headless Chromium for the browser tests (the HTML report, the serve page): Debian's package,
# driven by Playwright from the test extra, which never downloads a browser of its own.
browser:
	@sh scripts/ensure-package.sh chromium "command -v chromium"

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
