# ksmplus: build, install and package. See docs/INSTALL.md.
#
#   make                      build (release) and generate the man pages, the completions and
#                             the tmpfiles.d file (ksmd on at boot, the example policy's tunables)
#   sudo make install         install under PREFIX (default /usr/local); runs `make` first
#                             where cargo is on PATH, else installs what `make` built before
#                             (sudo's PATH often has no cargo)
#   sudo make uninstall       remove exactly what install put (its manifest says what)
#   make deb                  a Debian package in target/release/, with dpkg-deb
#
# Variables (on the command line, the same for install and uninstall): PREFIX, DESTDIR (staging
# root, prepended to every path), BINDIR, LIBDIR (the shim goes to LIBDIR/ksmplus/), DATADIR,
# MANDIR, SYSTEMD_USER_UNITDIR, TMPFILESDIR, BASHCOMPDIR, ZSHCOMPDIR, FISHCOMPDIR; CARGO,
# PROFILE (release), CARGO_TARGET_DIR.

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
SYSTEMD_USER_UNITDIR ?= $(PREFIX)/lib/systemd/user
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR ?= $(DATADIR)/zsh/site-functions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d
# What `make uninstall` reads.
MANIFEST = $(DATADIR)/ksmplus/install-manifest

CARGO ?= cargo
PROFILE ?= release
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BUILD_DIR := $(TARGET_DIR)/$(PROFILE)
GEN_DIR := $(BUILD_DIR)/ksmplus-generated
BINARIES := $(BUILD_DIR)/ksmplus-agentd $(BUILD_DIR)/ksmplusctl $(BUILD_DIR)/libksmplus.so
CARGO_BUILD := $(CARGO) build --profile $(PROFILE) -p ksmplus-preload -p ksmplus-agentd -p ksmplus-ctl

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DEB_ARCH = $(shell dpkg --print-architecture)
DEB_ROOT := $(BUILD_DIR)/deb-root
DEB = $(BUILD_DIR)/ksmplus_$(VERSION)_$(DEB_ARCH).deb

.PHONY: all build generate install uninstall deb clean

all: generate

# Always asks cargo, which rebuilds what changed.
build:
	$(CARGO_BUILD)

# Without cargo (sudo): what was built, or a hint.
$(BINARIES):
	@command -v $(CARGO) >/dev/null || { echo "$(CARGO) not found: run \`make\` as yourself first, then \`sudo make install\`" >&2; exit 1; }
	$(CARGO_BUILD)

# Man pages and completions come from each program's clap definition itself (hidden:
# `ksmplusctl generate`, `ksmplus-agentd --generate-man`); ksmplus.conf (tmpfiles.d: ksmd on at
# boot) from the example policy's [ksmd] table.
# deb/: the unit for /usr/bin, for `cargo deb` (make install writes its own, for BINDIR).
define GENERATE
	rm -rf $(GEN_DIR)
	$(BUILD_DIR)/ksmplusctl generate --man $(GEN_DIR)/man \
		--completions $(GEN_DIR)/completions >/dev/null
	$(BUILD_DIR)/ksmplus-agentd --generate-man $(GEN_DIR)/man >/dev/null
	$(BUILD_DIR)/ksmplusctl tmpfiles --policy examples/policy.toml >$(GEN_DIR)/ksmplus.conf
	mkdir -p $(GEN_DIR)/deb
	$(BUILD_DIR)/ksmplusctl install-service --print --agentd /usr/bin/ksmplus-agentd \
		>$(GEN_DIR)/deb/ksmplus-agentd.service
endef

generate: build
	$(GENERATE)

$(GEN_DIR)/man/ksmplusctl.1: | $(BINARIES)
	$(GENERATE)

# Up to date where cargo can be run; else what was built and generated before.
INSTALL_FROM := $(if $(shell command -v $(CARGO) 2>/dev/null),all,$(BINARIES) $(GEN_DIR)/man/ksmplusctl.1)

# The unit is written at install time: its ExecStart names BINDIR.
install: $(INSTALL_FROM)
	@echo "==> installing into $(DESTDIR)$(PREFIX)"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BUILD_DIR)/ksmplusctl install-service --print --agentd $(BINDIR)/ksmplus-agentd \
		>"$$tmp/ksmplus-agentd.service"; \
	{ \
		echo "755 $(BUILD_DIR)/ksmplus-agentd $(BINDIR)/ksmplus-agentd"; \
		echo "755 $(BUILD_DIR)/ksmplusctl $(BINDIR)/ksmplusctl"; \
		echo "644 $(BUILD_DIR)/libksmplus.so $(LIBDIR)/ksmplus/libksmplus.so"; \
		echo "644 $$tmp/ksmplus-agentd.service $(SYSTEMD_USER_UNITDIR)/ksmplus-agentd.service"; \
		echo "644 $(GEN_DIR)/ksmplus.conf $(TMPFILESDIR)/ksmplus.conf"; \
		echo "644 examples/policy.toml $(DATADIR)/ksmplus/policy.toml"; \
		for f in $(GEN_DIR)/man/*.1; do echo "644 $$f $(MANDIR)/man1/$${f##*/}"; done; \
		echo "644 $(GEN_DIR)/completions/bash/ksmplusctl $(BASHCOMPDIR)/ksmplusctl"; \
		echo "644 $(GEN_DIR)/completions/zsh/_ksmplusctl $(ZSHCOMPDIR)/_ksmplusctl"; \
		echo "644 $(GEN_DIR)/completions/fish/ksmplusctl.fish $(FISHCOMPDIR)/ksmplusctl.fish"; \
	} | sh dist/install.sh install "$(DESTDIR)" "$(MANIFEST)"
	@echo "==> next: systemctl --user daemon-reload && systemctl --user enable --now ksmplus-agentd"

uninstall:
	@echo "==> removing what was installed into $(DESTDIR)$(PREFIX)"
	@sh dist/install.sh uninstall "$(DESTDIR)" "$(MANIFEST)"

# A Debian package of the same files under /usr (dpkg-deb only: no cargo-deb or debhelper
# needed; `cargo deb -p ksmplus-ctl` builds the same from ksmplus-ctl/Cargo.toml's metadata).
deb: $(INSTALL_FROM)
	rm -rf $(DEB_ROOT)
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DEB_ROOT)) PREFIX=/usr \
		ZSHCOMPDIR=/usr/share/zsh/vendor-completions >/dev/null
	rm -f $(DEB_ROOT)/usr/share/ksmplus/install-manifest
	gzip -9n $(DEB_ROOT)/usr/share/man/man1/*.1
	install -D -m 644 dist/debian/copyright $(DEB_ROOT)/usr/share/doc/ksmplus/copyright
	install -d -m 755 $(DEB_ROOT)/DEBIAN
	install -m 755 dist/debian/postinst $(DEB_ROOT)/DEBIAN/postinst
	@set -e; \
	glibc=$$(objdump -T $(BINARIES) | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1); \
	size=$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1); \
	{ \
		echo "Package: ksmplus"; \
		echo "Version: $(VERSION)"; \
		echo "Architecture: $(DEB_ARCH)"; \
		echo "Maintainer: the ksmplus developers <ksmplus@users.noreply.github.com>"; \
		echo "Installed-Size: $$size"; \
		echo "Depends: libc6 (>= $$glibc)"; \
		echo "Recommends: systemd"; \
		echo "Section: admin"; \
		echo "Priority: optional"; \
		echo "Homepage: https://github.com/ksmplus/ksmplus"; \
		echo "Description: memory deduplication (KSM) for unmodified programs"; \
		echo " ksmplus brings the kernel's same-page merging to programs that never asked"; \
		echo " for it: an LD_PRELOAD shim (libksmplus.so), a per-user agent that marks only"; \
		echo " the memory whose duplicates pay for KSM's cost (ksmplus-agentd, a systemd user"; \
		echo " service) and its control CLI (ksmplusctl). A tmpfiles.d file turns ksmd on."; \
	} >$(DEB_ROOT)/DEBIAN/control
	dpkg-deb --root-owner-group -Zxz --build $(DEB_ROOT) $(DEB)

clean:
	$(CARGO) clean
