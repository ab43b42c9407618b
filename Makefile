# xdcr — build, test, demo. README and .ci/run call only these targets.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
FUZZTIME  ?= 20s
BENCH_SCALE ?= full
BENCH_REPS  ?= 3
DURATION  ?= 10m
SEED      ?= 1
BIGTXN    ?= 1024
BIN       := bin/xdcr

.PHONY: all build test test-short lint fuzz demo bench chaos chaos-bigtxn clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/xdcr

# Everything, including the multi-site integration tests against real
# PostgreSQL clusters and NATS servers that the tests start themselves.
# internal/e2e and internal/chaos each run three sites and their agents:
# they run one after the other, after the rest, so that the fault schedule
# does not share two cores with another suite.
test:
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v -e /internal/e2e -e /internal/chaos)
	$(GO) test -race -count=1 -timeout 40m ./internal/e2e
	$(GO) test -race -count=1 -timeout 20m ./internal/chaos

# The inner loop: unit tests only.
test-short:
	$(GO) test -short -count=1 ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

demo: build
	$(BIN) demo

# xdcr against native logical replication, same machine, same run
# (docs/performance.md). BENCH_SCALE=tiny|small|full, BENCH_REPS=N;
# BENCH_FLAGS passes more, e.g. --profile DIR or --workload pgbench.
bench: build
	$(BIN) bench --scale $(BENCH_SCALE) --reps $(BENCH_REPS) --log-level warn $(BENCH_FLAGS)

# A long random schedule of faults against three local sites while the
# ledger and log workloads write (docs/faults.md); prints the summary table.
# make test runs the short schedule (every fault once). NEMESES=a,b runs
# only those faults.
chaos:
	$(GO) test -count=1 -timeout 0 -v -run '^TestChaos$$' ./internal/chaos -args -chaos.duration=$(DURATION) -chaos.seed=$(SEED) -chaos.only=$(NEMESES)

# One transaction of BIGTXN MiB (default 1 GiB) on the primary: it must
# reach every replica whole and once, with every agent's memory bounded
# (docs/faults.md). Minutes; not part of make test.
chaos-bigtxn:
	$(GO) test -count=1 -timeout 0 -v -run '^TestBigTransaction$$' ./internal/chaos -args -chaos.bigtxn=$(BIGTXN)

clean:
	rm -rf bin
