# Convenience targets; the README's commands are the reference.
.PHONY: test test-slow test-vllm vendor-routing lint demo
test:
	python -m pytest -q
test-slow:
	python -m pytest -q -m slow
lint:
	ruff check . && ruff format --check .
demo:
	modes demo
test-vllm:
	integrations/vllm/run-tests
vendor-routing:
	cp src/modes/routing.py integrations/vllm/src/modes_vllm/routing.py
