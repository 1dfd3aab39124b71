# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SKYFILL := $(VENV)/bin/skyfill
STAMP  := $(VENV)/.installed
DB     ?= data/skyfill.duckdb
RELAY  ?= wss://bsky.network
KAFKA  ?=

.PHONY: run test bench bench-scale bench-network bench-peer-install chaos fuzz status gaps backfill demo kafka-up kafka-down network clean install postgres-install lake-up lake-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	mkdir -p $(dir $(DB))
	$(SKYFILL) consume --db $(DB) --relay $(RELAY) $(if $(KAFKA),--kafka-bootstrap $(KAFKA),)

# The local reference PDS + PLC (npm packages, Node 22) used by the end-to-end tests and the demo.
network: $(STAMP)
	$(PY) -m tests.support.network install

# @atproto/sync (npm, the reference TypeScript firehose consumer), the benchmark's peer, run by the
# network's Node 22; installed into .cache/sync-peer (the bench smoke test runs it too).
bench-peer-install: network
	$(PY) -m bench.peer install

# Prometheus and promtool (Debian package) for tests/test_prometheus.py: only the binaries are used;
# the package's own service is not needed (the test runs its own Prometheus on a free port).
.PHONY: prometheus
prometheus:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

# Every test, on TEST_WORKERS pytest-xdist workers: most tests wait on subprocesses and sockets,
# so more workers than cores pays. Each worker starts its own local PDS network and hands out
# ports from its own block (tests/support/wait.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 4
test: $(STAMP) network bench-peer-install prometheus chromium postgres-install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load

# The headless browser tests/test_status_page.py renders the status page in (Debian package), when absent.
.PHONY: chromium
chromium:
	command -v chromium >/dev/null || apt-get install -y --no-install-recommends chromium || \
		(apt-get update && apt-get install -y --no-install-recommends chromium)

bench: $(STAMP) bench-peer-install
	$(PY) -m bench

# The mirror at network scale (not part of `make test`): ingest, backfill, bytes/record and gap
# detection into stores already holding 0, 10M and 100M records, side by side. Builds the stores
# once into .cache/scale/ (<= 45 min the first time, <= 15 min after). SCALE_ARGS="--sizes 0,10m".
# Then the lake rows: 1 and 2 `skyfill sink` processes into one DuckLake vs 1 into a file, 1M records
# (--lake-records N; --lake-only for those rows alone; needs PostgreSQL, see postgres-install).
bench-scale: $(STAMP)
	$(PY) -m bench.scale $(SCALE_ARGS)

# The whole network by simulation (not part of `make test`, <= 20 min): H simulated PDS hosts with
# Bluesky's published limits, a relay and a PLC export on 127.0.0.1; the real discover -> identities
# sync -> gaps -> backfill pipeline; rows in bench/results/network.json and the projected full-network
# time. NETWORK_ARGS="--small 8:400 --large 16:800" or "--smoke".
bench-network: $(STAMP)
	$(PY) -m bench.network $(NETWORK_ARGS)

# Fault trials against the local PDS (kill -9, relay and broker freezes, disk full, concurrent
# backfills): <= 15 min, not part of `make test`. CHAOS_ARGS="--quick" or "--only kill9".
chaos: $(STAMP) network
	$(PY) -m tests.chaos $(CHAOS_ARGS)

# Thousands of mutated frames and CARs: every input ends in a counted error or a correct effect.
# FUZZ_ARGS="--frames 50000 --cars 10000 --seed 7".
fuzz: $(STAMP)
	$(PY) -m tests.fuzz $(FUZZ_ARGS)

status: $(STAMP)
	$(SKYFILL) status --db $(DB)

gaps: $(STAMP)
	$(SKYFILL) gaps --db $(DB) --start $(START) --end $(END) $(if $(ENQUEUE),--enqueue,)

backfill: $(STAMP)
	$(SKYFILL) backfill --db $(DB) $(if $(filter queue,$(DIDS)),--from-queue,--dids $(DIDS))

demo: $(STAMP) network
	$(PY) -m tests.support.network.demo

kafka-up: $(STAMP)
	$(PY) -m tests.support.kafka up

kafka-down: $(STAMP)
	$(PY) -m tests.support.kafka down

# PostgreSQL, the catalog of a DuckLake store (--db ducklake:postgres:...): the lake tests start a
# throwaway cluster (tests/support/postgres.py); installed from the Debian packages when absent.
postgres-install:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

# A local PostgreSQL for a lake under .cache/lake (prints the --db and --data-path to use); lake-down
# stops it and keeps its data.
lake-up: $(STAMP) postgres-install
	$(PY) -m tests.support.postgres up

lake-down: $(STAMP)
	$(PY) -m tests.support.postgres down

clean:
	rm -rf $(VENV) .cache
