# tidecache: `make demo`, `make test` and `make bench` each set up what they
# need on a fresh machine: a virtual environment in .venv, the pip packages
# of requirements-dev.txt, a release build of tidecached and of the Python
# adapter (maturin).

PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
LOOM_MAX_PREEMPTIONS ?= 2
SOAK_SECONDS ?= 300

.PHONY: all build demo demo-postgresql test test-rust test-loom test-python bench clean model-long soak soak-campaign test-relstorage-servers dist

all: build

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(DEPS)
	cargo build --release -p tidecache-sidecar
	cd adapters/python && VIRTUAL_ENV=$(VENV) $(VENV)/bin/maturin develop --release --quiet

## Wheels, for installing without a compiler (docs/operations.md,
## "Installing"): tidecache (the adapter: one wheel per CPython version, for
## each of DIST_PYTHONS) and tidecached (the daemon alone, maturin's "bin"
## bindings), manylinux2014 (glibc 2.17, linked by zig from the ziglang
## package of requirements-dev.txt), into dist/.
## adapters/python/tests/test_wheels.py installs them into a fresh venv:
## `make test` builds and tests this interpreter's. DIST_PYTHONS: every python3.9 ... python3.13 on PATH
## that runs (the venv's python3 at least).
DIST_PYTHONS ?= $(or $(shell for v in 3.9 3.10 3.11 3.12 3.13; do python$$v -c '' 2>/dev/null && echo python$$v; done),python3)
dist: $(DEPS)
	rm -f dist/tidecache-*.whl dist/tidecached-*.whl
	cd adapters/python && PATH=$(VENV)/bin:$$PATH $(VENV)/bin/maturin build --release --quiet \
		--zig --compatibility manylinux2014 --out $(CURDIR)/dist -i $(DIST_PYTHONS)
	cd sidecar && PATH=$(VENV)/bin:$$PATH $(VENV)/bin/maturin build --release --quiet \
		--zig --compatibility manylinux2014 --out $(CURDIR)/dist
	@ls -1 dist/*.whl

## The main job: ZEO + tidecached + a ZODB application over the stdlib's
## sources, with and without tidecache, and with tidecache's shared state
## (issue 10), side by side; then the same over RelStorage/SQLite (plain
## RelStorage beside RelStorage in <tidecache>, and with shared-state on).
## `make demo-postgresql`: the RelStorage run over a PostgreSQL server
## started for it.
demo: build
	$(PY) demo/run_demo.py
	$(PY) demo/run_demo.py --base relstorage-sqlite

demo-postgresql: build
	$(PY) demo/run_demo.py --base relstorage-postgresql

## Every test: Rust (unit, property, integration), loom models, Python;
## the wheels of `make dist` (this interpreter's only) installed into a
## fresh venv without cargo by test_wheels.py, which fails, not skips,
## when they are missing.
test: DIST_PYTHONS = $(PY)
test: WHEELS_REQUIRED = 1
test: build dist test-rust test-loom test-python

test-rust:
	cargo test --release --workspace --exclude tidecache-python

test-loom:
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=$(LOOM_MAX_PREEMPTIONS) \
		cargo test --release -p tidecache-loom-tests

test-python: build
	TIDECACHED=$(CURDIR)/target/release/tidecached TIDECACHE_WHEELS_REQUIRED=$(WHEELS_REQUIRED) \
		$(PY) -m pytest -q adapters/python/tests

## RelStorage 4.3's own test suites with every storage wrapped in tidecache
## (adapters/python/tests/relstorage_suite.py), over PostgreSQL (psycopg2)
## and MySQL (Debian's MariaDB, PyMySQL) started for the run by
## bench/dbservers.py (temporary directory, Unix socket, unprivileged
## user; installed with apt-get when missing). `make test` runs them over
## SQLite. Not part of `make test`: about 12 minutes on 2 cores.
test-relstorage-servers: build
	@status=0; for backend in postgresql mysql; do \
		TIDECACHED=$(CURDIR)/target/release/tidecached $(PY) adapters/python/tests/relstorage_suite.py \
			--backend $$backend > target/relstorage-$$backend.log 2>&1 || status=1; \
		grep -E '^(RELSTORAGE-SUITE|Total|(Failure|Error) in test)' target/relstorage-$$backend.log \
			|| tail -20 target/relstorage-$$backend.log; \
	done; \
	if [ $$status -ne 0 ]; then echo "test-relstorage-servers FAILED: see target/relstorage-*.log"; fi; exit $$status

## A longer search of the property tests (one million cases).
model-long:
	TIDECACHE_MODEL_CASES=1000000 cargo test --release -p tidecache-core --test model

## Long runs under faults: the fault campaign (SOAK_SECONDS in all, a
## share each, fresh seeds): protocol fuzzing of the decoder and of a live
## tidecached beside a checked client, and damaged arena files re-attached
## (in-process and through the binary), kill -9 at every crash point of
## the arena writer then restart and check; `make test` runs the same tests
## briefly. It prints one SOAK line per campaign and fails on any wrong hit,
## crash or other failure (details, with the seed to replay, in
## target/soak.log). Then faultload for SOAK_SECONDS: 8 processes x 8
## threads of a ZODB application over ZEO while the sidecar is killed and
## stopped and workers fork and are killed (a reference run without faults
## first); prints throughput, p99, faults injected, torn snapshots (0).
SOAK_TESTS := tidecache-client:decode_fuzz tidecache-sidecar:fuzz tidecache-core:corrupt_files tidecache-sidecar:corrupt_arena tidecache-sidecar:crash_points

soak: build soak-campaign
	TIDECACHED=$(CURDIR)/target/release/tidecached $(PY) bench/faultload.py --processes 8 --threads 8 --seconds $(SOAK_SECONDS)

soak-campaign:
	cargo test --release -p tidecache-client --test decode_fuzz --no-run
	cargo test --release -p tidecache-core --test corrupt_files --no-run
	cargo test --release -p tidecache-sidecar --test fuzz --test corrupt_arena --test crash_points --no-run
	@each=$$(( $(SOAK_SECONDS) / $(words $(SOAK_TESTS)) )); [ $$each -gt 0 ] || each=1; status=0; : > target/soak.log; \
	for t in $(SOAK_TESTS); do \
		echo "soak: $${t#*:} for $$each s"; \
		TIDECACHE_SOAK_SECONDS=$$each cargo test --release -q -p $${t%%:*} --test $${t#*:} -- --nocapture \
			>> target/soak.log 2>&1 || status=1; \
	done; \
	grep -o 'SOAK.*' target/soak.log; \
	if [ $$status -ne 0 ]; then echo "soak FAILED: see target/soak.log"; fi; exit $$status

## Benchmarks: programs that print anchor and tidecache side by side and
## write bench-results/*.json, from which docs/benchmarks.md is built.
## zodbshootout.py (zodbshootout 0.8 over ZEO, plain and with tidecache,
## and a truly cold host) takes about 10 minutes on 2 cores and rebuilds
## docs/benchmarks.md last; latestart.py (late start after commits the
## sidecar did not hear of) about 1. On RelStorage (issue 9; PostgreSQL
## servers started for the run by bench/dbservers.py): rs_newworker.py (a
## new worker's first 1,000 requests), rs_memory.py (8 workers' memory)
## and zodbshootout over RelStorage/PostgreSQL and /SQLite, 4 processes,
## add cold warm hot (about 7 minutes each on 2 shared cores; rs_newworker.py
## and rs_memory.py about 2 each); the last rebuilds
## docs/benchmarks.md. Shared state (issue 10): shared_state.py (activation
## per object kind and the memory of 16 connections, beside plain ZODB),
## and zodbshootout.py over ZEO runs a third database, <tidecache> with
## shared-state on, when the tree has it.
bench: build
	cargo bench -p tidecache-core --bench snapshot
	$(PY) bench/eviction.py
	$(PY) bench/memory.py
	$(PY) bench/restart.py
	$(PY) bench/boundaries.py
	$(PY) bench/run_bench.py
	$(PY) bench/latestart.py
	$(PY) bench/shared_state.py --no-report
	$(PY) bench/zodbshootout.py
	$(PY) bench/rs_newworker.py
	$(PY) bench/rs_memory.py
	$(PY) bench/zodbshootout.py --base relstorage-sqlite --no-report
	$(PY) bench/zodbshootout.py --base relstorage-postgresql

clean:
	cargo clean
	rm -rf $(VENV)
