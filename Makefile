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

# Every test, then formatting and lints; what CI runs. The test-hooks
# feature adds the accessors tests/forward_secrecy.rs reads live session
# secrets through (an in-process client only; no binary calls them).
test:
	$(CARGO) build --bins
	$(CARGO) test --features test-hooks -- --test-threads=2
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features test-hooks -- -D warnings

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

# The long failure runs: 100 kill -9 cycles of the CRS during registrations.
soak:
	IMS_SOAK_CYCLES=100 $(CARGO) test --test failures acknowledged_registrations_survive_kill_9 -- --nocapture

# The parser fuzz targets, FUZZ_SECONDS each (needs a nightly toolchain and cargo-fuzz; installed if missing).
fuzz:
	./scripts/fuzz $(FUZZ_SECONDS)

BINDIR  = $(PREFIX)/bin
DOCDIR  = $(PREFIX)/share/doc/ims
EXAMPLES = $(PREFIX)/share/ims/examples
UNITDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/systemd/system,$(PREFIX)/lib/systemd/system)

# Binaries, example configurations, documentation and systemd units.
# PROFILE=debug installs the debug build (for tests) instead of building release.
PROFILE ?= release
install: $(if $(filter release,$(PROFILE)),release,)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(EXAMPLES) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(UNITDIR)
	install -m 0755 target/$(PROFILE)/ims-crs target/$(PROFILE)/ims-ms target/$(PROFILE)/ims-client $(DESTDIR)$(BINDIR)/
	install -m 0644 etc/crs.toml etc/ms.toml etc/client.toml $(DESTDIR)$(EXAMPLES)/
	install -m 0644 README.md docs/PROTOCOL.md $(DESTDIR)$(DOCDIR)/
	for u in etc/systemd/*.service; do \
		sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
	done

clean:
	$(CARGO) clean
