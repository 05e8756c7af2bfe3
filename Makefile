# ims — build, test, run a local cluster, benchmark, fuzz, install.
# The two commands a fresh machine needs: `make run-cluster` and `make test`.

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
RUN_DIR ?= $(CURDIR)/run
FUZZ_SECONDS ?= 120

.PHONY: all build release test lint fmt run-cluster clean-cluster bench fuzz soak install clean

all: build

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release --bins

# Every test, then formatting and lints; what CI runs.
test:
	$(CARGO) build --bins
	$(CARGO) test --all-targets -- --test-threads=2
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

run-cluster: release
	RUN_DIR=$(RUN_DIR) ./scripts/run-cluster

clean-cluster:
	rm -rf $(RUN_DIR)

# Benches do not build the binaries; the login bench runs the release ones.
bench:
	$(CARGO) build --release --bins
	$(CARGO) bench

# The parser fuzz targets, FUZZ_SECONDS each (needs a nightly toolchain and cargo-fuzz; installed if missing).
fuzz:
	./scripts/fuzz $(FUZZ_SECONDS)

install: release
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/ims/etc
	install -m 0755 target/release/ims-crs target/release/ims-ms target/release/ims-client $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 etc/*.toml $(DESTDIR)$(PREFIX)/share/ims/etc/ 2>/dev/null || true

clean:
	$(CARGO) clean
