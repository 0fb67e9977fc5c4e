# make demo: a tour on images it builds itself.  make test: every test and check.
# Both do their whole set-up on a fresh machine: a virtualenv, the package with its dev
# extras, qemu-utils when qemu-img is missing, and the Kaitai compiler from npm.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
KSC := .ksc/node_modules/kaitai-struct-compiler/package.json
TYPECHECK := .cache/typecheck

.PHONY: setup demo test lint typecheck generate qemu browser bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

qemu:
	@command -v qemu-img >/dev/null 2>&1 || { \
	  echo "installing qemu-utils"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils; }
	@qemu-img --version | head -n 1

# The headless browser of the `diskspec explain --html` test (tests/test_explain.py).
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

$(KSC): tests/ksc/package.json tests/ksc/package-lock.json
	mkdir -p .ksc
	cp tests/ksc/package.json tests/ksc/package-lock.json .ksc/
	cd .ksc && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(INSTALLED) qemu browser $(KSC)

generate: $(INSTALLED)
	$(VENV)/bin/diskspec generate

lint: $(INSTALLED)
	$(VENV)/bin/ruff check runtime generator generated tests bench

# mypy cannot follow the editable install's folder mapping, so check a tree of links laid
# out as the installed package is.
typecheck: $(INSTALLED)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/diskspec
	for f in runtime/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/diskspec/; done
	for d in generated generator; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/diskspec/$$d; done
	cd $(TYPECHECK) && "$(CURDIR)/$(VENV)/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" \
	  -p diskspec

test: setup
	$(VENV)/bin/diskspec generate --check
	$(MAKE) --no-print-directory lint typecheck
	$(PY) -m pytest -q

demo: setup
	$(PY) -m diskspec.demo

bench: setup
	$(PY) bench/parse_bench.py
	$(PY) bench/qcow2_read_bench.py
	$(PY) bench/fvd_write_bench.py

clean:
	rm -rf $(VENV) .ksc/node_modules .cache .pytest_cache .mypy_cache .ruff_cache
