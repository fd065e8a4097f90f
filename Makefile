# Build, install and test vfiokit. `make install PREFIX=/usr/local` puts the shared library
# (with its soname links), the static archive, the header and vfiokit.pc in place.

PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DESTDIR ?=
CARGO ?= cargo
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
SONAME := libvfiokit.so.0
# Where cargo puts the build: CARGO_TARGET_DIR when set, as for cargo (tests/pkg/run sets it).
RELEASE := $(or $(CARGO_TARGET_DIR),target)/release

.PHONY: all bench check demo install soak test test-c uninstall

all:
	$(CARGO) build --release --lib

install: all
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 755 $(RELEASE)/libvfiokit.so $(DESTDIR)$(LIBDIR)/libvfiokit.so.$(VERSION)
	ln -sfn libvfiokit.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sfn $(SONAME) $(DESTDIR)$(LIBDIR)/libvfiokit.so
	install -m 644 $(RELEASE)/libvfiokit.a $(DESTDIR)$(LIBDIR)/libvfiokit.a
	install -m 644 include/vfiokit.h $(DESTDIR)$(INCLUDEDIR)/vfiokit.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
		-e 's|@VERSION@|$(VERSION)|' vfiokit.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/vfiokit.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libvfiokit.so* $(DESTDIR)$(LIBDIR)/libvfiokit.a \
		$(DESTDIR)$(INCLUDEDIR)/vfiokit.h $(DESTDIR)$(LIBDIR)/pkgconfig/vfiokit.pc

# Every test: Rust unit tests, the header check, the guest suites, then the C tests.
test:
	tests/run-all

# The edit-and-test loop: linters, unit tests, the header check, and the guest suite on the
# iommufd kernel without its leak cycles.
check:
	tests/setup --lint
	tests/lint
	VFIOKIT_VM_KERNELS=iommufd cargo test --all-targets -- --skip cycles

# The long soak, which CI does not run: 10,000 open/map/alloc cycles in each guest run (about
# 100 ms a cycle on the iommufd kernel under TCG), the close-under-running-calls matrix at 50
# rounds a kind and under valgrind, every C example under valgrind (and nvme-io's plain runs at
# 200,000 commands, about 15 s each under TCG), the Python guest tests on
# both kernels, the guest suite on 6.12 with type1 as the default, the test bed's guest checks on
# both kernels.
soak:
	VFIOKIT_CYCLES=10000 VFIOKIT_CASE_TIMEOUT=7200 VFIOKIT_GUEST_TIMEOUT=7800 \
		cargo test --test guest -- cycles_leak_nothing
	VFIOKIT_THREAD_ROUNDS=50 VFIOKIT_VALGRIND_THREAD_ROUNDS=10 tests/c/run
	VFIOKIT_VALGRIND_EXAMPLES="lsvfio edu nvme-identify edu-threads nvme-io" VFIOKIT_NVME_IO_COMMANDS=200000 \
		c-examples/test
	python/run-tests legacy iommufd
	VFIOKIT_VM_KERNELS=iommufd:type1 cargo test --test guest
	tests/vm/selftest

# The C tests alone (built against an install in a temporary prefix, run in the guest).
test-c:
	tests/c/run

# The demo: the guest's emulated devices driven through vfiokit by the C examples.
demo:
	c-examples/demo

# Benchmarks against raw ioctls and peer crates, in the guest (bench/README.md).
bench:
	bench/run
