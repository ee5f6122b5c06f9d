# fcnbd — see README.md. Every target that needs system packages installs them first.
GO       ?= go
BIN      := $(CURDIR)/bin/fcnbd
GOBIN    := $(shell $(GO) env GOPATH)/bin
export FCNBD_BIN := $(BIN)

# Fuzz targets run briefly by `make test` (package:FuzzName), each for FUZZTIME: a count of
# inputs, not a duration, since a duration can end the run with a spurious "context deadline
# exceeded" and no crasher (golang/go#75804) and leaves the workers stalled here.
FUZZ_TARGETS ?= $(shell grep -rl --include='*_test.go' '^func Fuzz' . | xargs -r grep -H -o '^func Fuzz[A-Za-z0-9_]*' | sed -E 's|^\./(.*)/[^/]*_test.go:func (Fuzz.*)|\1:\2|' | sort -u)
FUZZTIME ?= 50000x

.PHONY: all deps build run test unit integration fuzz lint bench soak clean

all: build

deps:
	@scripts/install-deps.sh

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/fcnbd

# `make run`: install what is missing, build, serve in the foreground with the defaults.
run: deps build
	$(BIN) serve

# `make test`: everything CI checks.
test: deps build lint unit fuzz integration

unit:
	$(GO) test -race -timeout 14m $$($(GO) list ./... | grep -v /test/integration)

integration: build
	$(GO) test -race -count=1 -timeout 14m ./test/integration/...

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t#*:}; \
		echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
		$(GO) test -run='^$$' -fuzz="^$$name$$" -fuzztime=$(FUZZTIME) ./$$pkg; \
	done

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go') $$(git ls-files -o --exclude-standard '*.go'))" || { gofmt -l . ; echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GOBIN)/staticcheck ./...

bench: deps build
	scripts/bench.sh
	scripts/bench-fence.sh
	scripts/bench-firstsplit.sh
	scripts/bench-cluster.sh
	scripts/bench-copy.sh

# TOPO_SOAK_SEEDS seeds of the randomized topology race hunter (mappings/driver
# TestTopologyRace) with twice the steps of `make test`'s run; a hang aborts with every
# goroutine's stack on stderr.
TOPO_SOAK_SEEDS ?= 1000

soak: deps build
	FCNBD_SOAK=1 $(GO) test -count=1 -timeout 60m -run Soak ./test/integration/...
	FCNBD_TOPO_SEEDS=$(TOPO_SOAK_SEEDS) FCNBD_TOPO_STEPS=20 $(GO) test -race -count=1 -timeout 240m -run '^TestTopologyRace$$' ./mappings/driver
	FCNBD_DAEMON_TOPO_SEEDS=100 $(GO) test -count=1 -timeout 90m -run TestDaemonTopology ./test/integration/...
	FCNBD_CLUSTER_KILLS=200 $(GO) test -count=1 -timeout 60m -run '^TestClusterFailover$$' ./test/integration/...
	FCNBD_CLUSTER_KILLS=200 $(GO) test -count=1 -timeout 90m -run '^TestClusterKernelDevice$$' ./test/integration/...
	FCNBD_VM_CLUSTER_ROUNDS=50 $(GO) test -count=1 -timeout 60m -run '^TestVMClusterFailover$$' ./test/integration/...

clean:
	rm -rf bin
