# trigd: `make run` and `make test` work on a fresh machine with Python 3.11+, pip and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test lint bench binary deb clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per install flavour, redone when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/trigd serve $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

bench: $(VENV)/.installed-test
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# One self-contained executable, dist/trigd (PyInstaller onefile; a build-only tool, never a
# runtime dependency). The CLI imports its subcommands lazily, so they are named here.
PYINSTALLER := pyinstaller>=6,<7
BUNDLE_IMPORTS := daemon.runtime.service daemon.cli.check daemon.cli.emit daemon.cli.status \
	daemon.cli.outbox_cli daemon.cli.explain daemon.cli.backtest daemon.cli.tail \
	apsw apsw.bestpractice trio trio_websocket httpx jinja2 yaml pendulum uuid6 pydantic
# Development tools in the venv that hooks would otherwise drag in (pydantic.mypy, trio.testing).
BUNDLE_EXCLUDES := mypy pydantic.mypy pytest _pytest hypothesis tkinter setuptools pkg_resources
# Stripping the bundled libraries halves the executable (binutils' strip; skipped without it).
STRIP_FLAG := $(if $(shell command -v strip),--strip)

binary: $(VENV)/.installed-run
	$(BIN)/python -m pip install --quiet '$(PYINSTALLER)'
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --onefile --name trigd \
		--distpath dist --workpath build/pyinstaller --specpath build/pyinstaller \
		--paths $(CURDIR) --collect-submodules daemon --collect-submodules store \
		$(addprefix --hidden-import ,$(BUNDLE_IMPORTS)) \
		$(addprefix --exclude-module ,$(BUNDLE_EXCLUDES)) $(STRIP_FLAG) \
		--add-data $(CURDIR)/schema.sql:store \
		packaging/trigd_entry.py
	dist/trigd --version

# dist/trigd_<version>_<arch>.deb: the executable, the systemd unit (not enabled), the config.
deb: binary
	packaging/build-deb.sh dist/trigd dist

clean:
	rm -rf $(VENV) dist build .mypy_cache .ruff_cache .pytest_cache .hypothesis
