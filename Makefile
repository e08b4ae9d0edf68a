# The two commands of the README's Quickstart. Both set up everything first (scripts/setup.sh).
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fedgen train --preset fmnist-quick --out runs/demo

test: setup
	.venv/bin/python -m pytest -q --durations=8

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/lint-imports

bench: setup
	.venv/bin/python bench/train_throughput.py
