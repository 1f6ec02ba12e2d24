# SPDX-License-Identifier: Apache-2.0
# xdplb: `make demo` runs the lab demo, `make test` runs every test tier.
# Run as root on Debian 12; missing packages are installed on the way.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
XDPLB := $(BIN)/xdplb
BUILD := build
OBJECT := $(BUILD)/xdplb.bpf.o
DECAP_OBJECT := $(BUILD)/decap.bpf.o
BPF_SOURCES := $(wildcard bpf/*.c bpf/*.h)
NATIVE := $(BUILD)/libxdplb_maglev.so
NATIVE_SOURCES := $(wildcard src/xdplb/native/*.c)

# Debian packages: what the build and the lab need (libatomic1 gives the control plane the
# atomic operations it writes into the flow table with), and what the benchmarks compare
# against and load with (the test suite runs a small benchmark, so `make test` needs them
# too; `make demo` does not).
CORE_PACKAGES := clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config make libatomic1 \
	iproute2 iputils-ping ethtool curl python3-venv openssl
BENCH_PACKAGES := wrk nftables conntrack haproxy iperf3 nginx-light
# Daemons among them (package:service) that Debian would start at installation, and at
# every boot: a machine that ran the tests should not find nginx on port 80 afterwards.
BENCH_DAEMONS := nginx-light:nginx haproxy:haproxy

# Installs the missing ones among $(1). A policy-rc.d that forbids every start (unless the
# machine has its own) keeps Debian from starting their daemons; they are also disabled
# for the next boot. Every daemon the benchmarks need is run by them, in a namespace.
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=/usr/sbin/policy-rc.d; \
			printf '#!/bin/sh\nexit 101\n' > $$guard; chmod +x $$guard; fi; \
		rc=0; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing || rc=$$?; \
		if [ -n "$$guard" ]; then rm -f $$guard; fi; \
		if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
			for pd in $(BENCH_DAEMONS); do case " $$missing " in *" $${pd%%:*} "*) \
				systemctl disable -q $${pd#*:} 2>/dev/null || true;; esac; done; fi; \
		exit $$rc; \
	fi
endef

# libbpf: built from the libbpf/ submodule when it is checked out (the libbpf-bootstrap
# pattern: objects and an install tree under build/libbpf), else the system's libbpf-dev.
LIBBPF_SRC := libbpf/src
LIBBPF_OUT := $(abspath $(BUILD)/libbpf)
ifneq ($(wildcard $(LIBBPF_SRC)/Makefile),)
LIBBPF_TARGET := $(LIBBPF_OUT)/libbpf.so.1
LIBBPF_USED := submodule libbpf ($(LIBBPF_SRC))
else
LIBBPF_TARGET :=
LIBBPF_USED := system libbpf-dev (libbpf/ submodule not checked out)
endif

.PHONY: all deps deps-bench venv build demo test test-unit bench bench-smoke clean

all: build

deps:
	$(call apt_install,$(CORE_PACKAGES))

deps-bench: deps
	$(call apt_install,$(BENCH_PACKAGES))

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

venv: $(BIN)/activate

$(LIBBPF_OUT)/libbpf.so.1: $(wildcard $(LIBBPF_SRC)/*.[ch] $(LIBBPF_SRC)/Makefile)
	$(MAKE) -C $(LIBBPF_SRC) BUILD_STATIC_ONLY= OBJDIR=$(LIBBPF_OUT)/obj DESTDIR=$(LIBBPF_OUT) \
		INCLUDEDIR=/include LIBDIR=/ UAPIDIR= install

# One `xdplb build` makes both objects and the native Maglev fill (&: a grouped target,
# GNU make 4.3).
$(OBJECT) $(DECAP_OBJECT) $(NATIVE) &: $(BPF_SOURCES) $(NATIVE_SOURCES) $(LIBBPF_TARGET) | venv
	@echo "libbpf: $(LIBBPF_USED)"
	$(XDPLB) build

build: deps $(OBJECT) $(DECAP_OBJECT) $(NATIVE)

demo: build
	$(XDPLB) demo

test: build deps-bench
	CI=$${CI:-true} $(BIN)/pytest -v -p no:cacheprovider tests

test-unit: venv
	$(BIN)/pytest -q tests/unit

bench: build deps-bench
	$(BIN)/python -m bench

bench-smoke: build deps-bench
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(BUILD) $(VENV)
