# The two README commands. Each sets up its own virtual environment in .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-flower-oldest lint typecheck bench clean

# constraints.txt pins the exact versions of the development environment (pyproject keeps ranges)
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The oldest Flower pyproject.toml allows, in its own pinned environment (constraints-flwr-oldest.txt).
OLD_VENV := .venv-flwr-oldest
OLD_BIN := $(OLD_VENV)/bin
OLD_STAMP := $(OLD_VENV)/.installed
# Every test that imports or starts Flower (the rest of the suite does not depend on Flower's version).
FLOWER_TESTS := tests/fl/test_flower.py tests/fl/test_flower_link.py tests/fl/flower \
	$(wildcard tests/adversary/*flower* tests/adversary/*supernode* tests/adversary/*serverapp*) \
	tests/fl/test_halves.py::test_flower_client_builds_its_side_once_per_run \
	tests/fl/test_halves.py::test_flower_client_rebuilds_for_another_job_or_run

$(OLD_STAMP): pyproject.toml constraints-flwr-oldest.txt
	$(PY) -m venv $(OLD_VENV)
	$(OLD_BIN)/pip install --quiet --upgrade pip
	$(OLD_BIN)/pip install --quiet torch==2.13.0
	$(OLD_BIN)/pip install --quiet -c constraints-flwr-oldest.txt -e '.[all,dev]'
	touch $(OLD_STAMP)

## make demo: 5 hospitals on breast cancer, non-IID, with privacy layers on
demo: $(STAMP)
	$(BIN)/privagg demo --out out

## make test: the whole suite (pytest, ruff, mypy)
test: $(STAMP)
	$(BIN)/ruff check secagg dp fl tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

## make test-flower-oldest: the Flower tests (real processes) on the oldest Flower pyproject allows
# Every Flower test that runs in one process (all adversaries, every record, policy and state check), plus
# the real-process runs on the newest Flower's critical paths: bit-for-bit training with TLS, a node killed
# mid-round. (`make test` runs every process test on the newest.)
OLD_PROCESS_TESTS := tests/fl/test_flower.py::test_secagg_plus_with_dp_over_flower_equals_in_memory \
	tests/fl/test_flower.py::test_round_completes_when_a_supernode_dies_mid_round

test-flower-oldest: $(OLD_STAMP)
	$(OLD_BIN)/pytest -q -p no:cacheprovider --durations=10 -m "not slow" $(FLOWER_TESTS)
	$(OLD_BIN)/pytest -q -p no:cacheprovider $(OLD_PROCESS_TESTS)

## make bench: every benchmark, ours against its peer, JSON under out/bench
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev,bench]'
	mkdir -p out/bench
	$(BIN)/python benchmarks/loop_overhead.py --json out/bench/loop.json
	$(BIN)/python benchmarks/dpsgd_overhead.py --json out/bench/dpsgd.json
	$(BIN)/python benchmarks/paillier_vs_phe.py --json out/bench/paillier.json
	$(BIN)/python benchmarks/secagg_vs_flower.py --json out/bench/secagg.json
	$(BIN)/python benchmarks/flower_round_latency.py --json out/bench/flower.json

clean:
	rm -rf $(VENV) $(OLD_VENV) out .mypy_cache .ruff_cache .pytest_cache
