#!/usr/bin/env bash
# Installs what building the eBPF object needs: nightly rust-src, LLVM 22 and bpf-linker.
# Installs only what is missing; safe to re-run.
set -euo pipefail

log() { printf '[setup-toolchain] %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

export PATH="$HOME/.cargo/bin:$PATH"

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# gcc and libc6-dev: the linker Rust uses, and the C compiler of mimalloc (the agent's allocator).
apt_install llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev protobuf-compiler pkg-config gcc libc6-dev

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0\.13'; then
  log "building bpf-linker 0.13 against LLVM 22"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version '^0.13' \
    --no-default-features --features llvm-22
fi
log "toolchain ready: $(bpf-linker --version)"
