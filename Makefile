# Convenience targets; the README's commands are the reference.
.PHONY: test test-slow lint demo
test:
	python -m pytest -q
test-slow:
	python -m pytest -q -m slow
lint:
	ruff check . && ruff format --check .
demo:
	modes demo
