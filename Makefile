# The two quick-start commands are `make scan` and `make test`; both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harness-installed

.PHONY: setup scan suites-mxfp4 test lint bench asv

setup: $(STAMP)

$(STAMP): pyproject.toml ci/constraints.txt ci/setup.sh
	HARNESS_VENV=$(VENV) bash ci/setup.sh
	touch $@

# The main job: SRDD scan + report of the embedded SmolLM2-135M under MXFP4 (weights); the 19 control
# draws of the verification are measured on 16 of the 32 held-out items (the same rank statistic, half the cost).
scan: $(STAMP)
	$(PY) -m harness scan --model smollm2-135m --format mxfp4 --point weight --prompts 32 --control-items 16 \
		--output reports/smollm2-135m-mxfp4-weight/results.json --report-dir reports/smollm2-135m-mxfp4-weight

# Every MXFP4 case of every suite, slow ones included (what the nightly job runs with --gpu).
suites-mxfp4: $(STAMP)
	$(PY) -m pytest suites/ -m mxfp4

# What CI runs (.ci/run): lint, then the harness's own tests and every suite's CPU cases; slow cases
# (make suites-mxfp4, nightly) and benchmarks (make bench, make asv) are not part of it.
test: $(STAMP) lint
	$(PY) -m pytest -m "not slow and not bench" -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Speed: pytest-benchmark cases (see docs/speed.md).
bench: $(STAMP)
	$(PY) -m pytest suites/ -m bench --benchmark-only

# asv history pages (.asv/html/index.html) for the checked-out commit; COMMITS="HEAD~1 HEAD" for several.
asv: $(STAMP)
	HARNESS_VENV=$(VENV) bash ci/asv.sh $(COMMITS)
