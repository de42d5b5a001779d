#!/usr/bin/env bash
# Records the TLS handshakes behind protocols/src/tls.rs's tests: curl to nginx over TLS 1.3
# (the default) and over TLS 1.2 (`--tls-max 1.2`), through capture.py's recording proxy.
# Needs nginx, curl and openssl. Writes tls13_curl/ and tls12_curl/ next to this script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill "$(cat "$work/nginx.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$work"' EXIT
port=18443
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
echo "<p>hello</p>" > "$work/index.html"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
error_log $work/error.log info;
pid $work/nginx.pid;
events { worker_connections 64; }
http {
    access_log $work/access.log;
    client_body_temp_path $work/cb; proxy_temp_path $work/p; fastcgi_temp_path $work/f;
    uwsgi_temp_path $work/u; scgi_temp_path $work/s;
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        root $work;
    }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" -e "$work/error.log"
sleep 0.5
python3 "$here/capture.py" tls13_curl --target 127.0.0.1:$port --out "$here" -- \
  curl -sk -o /dev/null "https://127.0.0.1:{port}/index.html"
python3 "$here/capture.py" tls12_curl --target 127.0.0.1:$port --out "$here" -- \
  curl -sk --tls-max 1.2 -o /dev/null "https://127.0.0.1:{port}/index.html"
