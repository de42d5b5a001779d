#!/usr/bin/env bash
# Installs the real servers and clients the end-to-end tests run against. Idempotent.
set -euo pipefail

need=()
for p in nginx-light curl python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup-test-peers] installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts nginx on install; the tests run their own instances on their own ports.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
pkill -f 'nginx: master process /usr/sbin/nginx -g daemon on' 2>/dev/null || true
