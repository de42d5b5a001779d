#!/usr/bin/env bash
# Boots one Debian kernel under qemu (software emulation, no KVM needed) with a busybox initramfs
# holding the agent, runs `tracer check` and `tracer run` against busybox httpd/wget and a static
# test program (late_reads.c) inside the guest, and prints the guest's console. The end-to-end
# test (tests/kernel_matrix.rs) asserts on it.
#
#   boot-test.sh META_PACKAGE TRACER_BIN
#   META_PACKAGE: a Debian kernel meta package, e.g. linux-image-cloud-amd64 (6.1) or
#                 linux-image-6.12-cloud-amd64; resolved to the concrete image package it depends on.
# Kernels are cached under ${TRACER_KERNEL_CACHE:-/var/cache/tracer-kernels}.
set -euo pipefail

meta=$1
tracer=$2
cache=${TRACER_KERNEL_CACHE:-/var/cache/tracer-kernels}

need=()
for p in qemu-system-x86 busybox-static cpio gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "boot-test: cannot resolve $meta to a kernel package" >&2; exit 2; }

mkdir -p "$cache"
kdir="$cache/$pkg"
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1)
  rm -rf "$kdir" && mkdir -p "$kdir"
  dpkg-deb -x "$tmp"/*.deb "$kdir"
  rm -rf "$tmp"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,www,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
# A client and server whose reads come long after their bytes arrived (see the source).
gcc -O2 -static -o "$root/bin/late_reads" "$(dirname "$0")/late_reads.c"
# The agent as built, stripped to keep the initramfs small, with the shared libraries it needs.
objcopy --strip-debug "$tracer" "$root/tracer"
for lib in $(ldd "$tracer" | awk '/=> \// {print $3} /^\t\/lib64/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
echo "== kernel $(uname -r)"
echo "== check"
/tracer check
echo "== check rc=$?"
echo "hello from the guest" > /www/index.html
httpd -p 127.0.0.1:8080 -h /www
# Waits for the agent $1 to log that it is ready in $2.
wait_ready() {
  i=0
  while ! grep -q "tracer ready" "$2" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 "$1" 2>/dev/null; then echo "== agent not ready"; break; fi
    sleep 0.5
  done
}
TRACER_LOG=info,tracer::trace_context=debug OTEL_BSP_SCHEDULE_DELAY=200 \
  /tracer run --port 8080 --port 8081 > /tmp/spans.txt 2> /tmp/agent.log &
agent=$!
wait_ready $agent /tmp/agent.log
wget -q -O /dev/null http://127.0.0.1:8080/index.html
wget -q -O /dev/null http://127.0.0.1:8080/missing
late_reads 8081
sleep 3
kill -INT $agent
wait $agent
echo "== agent rc=$?"
# Connections within the host hand trace ids over in memory; this agent puts them in the TCP
# option, as connections between hosts carry them.
TRACER_TCP_OPTION_LOCAL=1 /tracer run --port 8080 > /dev/null 2> /tmp/agent-wire.log &
agent=$!
wait_ready $agent /tmp/agent-wire.log
wget -q -O /dev/null http://127.0.0.1:8080/index.html
sleep 1
kill -INT $agent
wait $agent
echo "== wire agent rc=$?"
echo "== spans"
cat /tmp/spans.txt
echo "== agent log"
cat /tmp/agent.log
echo "== wire agent log"
cat /tmp/agent-wire.log
echo "== end"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initrd.gz"

timeout "${TRACER_BOOT_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 1G \
  -kernel "$vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" -nographic -no-reboot </dev/null
