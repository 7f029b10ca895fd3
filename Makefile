# make setup: the environment (.venv, every extra, the browser test's npm packages);
# make test: the test suite; make check: what CI runs after setup (lint, types, tests).
# The Debian packages the browser and CPU-class tests use (chromium, qemu-user >= 8):
#   sudo bash scripts/system_packages.sh
.PHONY: setup test lint typecheck check system-packages

setup:
	python3 -m venv .venv
	.venv/bin/pip install -c constraints.txt -e ".[test,predict,ray,triton,openvino]"
	npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
	@echo "for the browser and CPU-class tests: sudo bash scripts/system_packages.sh"

test:
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:
	.venv/bin/mypy

check: lint typecheck test

system-packages:
	sudo bash scripts/system_packages.sh
