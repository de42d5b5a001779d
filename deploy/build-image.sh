#!/usr/bin/env bash
# Builds the statically linked agent (x86_64-unknown-linux-musl) and the FROM-scratch image
# deploy/Containerfile describes. Installs only what is missing, so it is safe to re-run.
#
#   deploy/build-image.sh [--binary-only] [--image NAME:TAG] [--save FILE.tar]
#
#   --binary-only   stop after building and checking the static binary
#   --image         image name (default tracer:<crate version>)
#   --save          also write the image as an OCI archive (for `ctr images import`, `kind load
#                   image-archive`, or copying to a registry with skopeo)
#
# Environment: CARGO_TARGET_DIR (default target/) picks the cargo target directory. Prints the
# binary's path and the image name on stdout; progress goes to stderr. Needs root for apt-get and
# podman.
set -euo pipefail

readonly TARGET=x86_64-unknown-linux-musl
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

binary_only=0
image=""
save=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary-only) binary_only=1 ;;
    --image) image=${2:?--image needs a value}; shift ;;
    --save) save=${2:?--save needs a value}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done

apt_updated=0
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

export PATH="$HOME/.cargo/bin:$PATH"

# --- the static binary ------------------------------------------------------------------------
bash scripts/setup-toolchain.sh
if ! rustup target list --installed | grep -qx "$TARGET"; then
  log "adding the $TARGET target"
  rustup target add "$TARGET"
fi
# binutils' readelf tells below whether the result really is static.
# musl-gcc: mimalloc (the agent's allocator) is C, compiled for the musl target.
apt_install binutils musl-tools
export CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-musl-gcc}

target_dir=${CARGO_TARGET_DIR:-$repo/target}
log "cargo build --release --target $TARGET -p tracer (target dir $target_dir)"
CARGO_TARGET_DIR=$target_dir cargo build --release --locked --target "$TARGET" -p tracer >&2
binary=$target_dir/$TARGET/release/tracer
[ -x "$binary" ] || die "cargo did not produce $binary"

# A dynamic loader or shared-library dependency would make the binary unusable in a scratch image.
if readelf -lW "$binary" | grep -q 'INTERP' || readelf -dW "$binary" | grep -q '(NEEDED)'; then
  readelf -dW "$binary" | grep '(NEEDED)' >&2 || true
  die "$binary is not statically linked"
fi
version_line=$("$binary" --version) || die "$binary --version failed"
version=${version_line##* }
log "static binary ok: $version_line ($(du -h "$binary" | cut -f1))"

if [ "$binary_only" = 1 ]; then
  echo "$binary"
  exit 0
fi

# --- the image --------------------------------------------------------------------------------
image=${image:-tracer:$version}
if ! command -v podman >/dev/null; then
  apt_install podman runc
fi
# Debian's podman defaults to ulimits and a runtime that fail on some hosts (this one included);
# an empty default_ulimits list is harmless elsewhere. An existing file is left alone.
if [ ! -e /etc/containers/containers.conf ]; then
  log "writing /etc/containers/containers.conf (default_ulimits = [])"
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n' >/etc/containers/containers.conf
elif ! grep -q '^[[:space:]]*default_ulimits' /etc/containers/containers.conf; then
  log "note: /etc/containers/containers.conf has no default_ulimits; if 'podman run' fails on ulimits, set default_ulimits = [] under [containers]"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# The image gets a copy without debug info (a third of the size); the build's own binary keeps it.
objcopy --strip-debug "$binary" "$context/tracer"
previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
log "podman build -t $image"
podman build --quiet --layers=false -f deploy/Containerfile --build-arg "VERSION=$version" -t "$image" "$context" >&2
# A rebuild moves the tag; drop the image it left untagged unless a container still uses it.
current=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
podman run --rm --runtime "$(command -v runc || echo /usr/sbin/runc)" --network=none "$image" --version >&2 \
  || die "the image does not run: $image --version"

if [ -n "$save" ]; then
  rm -f "$save"
  podman save --quiet --format oci-archive -o "$save" "$image" >&2
  log "saved $image to $save"
fi
echo "$image"
