#!/usr/bin/env python3
"""Record real TCP traffic for parser golden tests.

Runs a recording proxy on 127.0.0.1 between a client and a server, runs the client command, and
writes what went through each connection, chunk by chunk, under protocols/testdata/<name>/:

    conn<N>.c2s.bin   bytes the client sent on connection N (client to server), concatenated
    conn<N>.s2c.bin   bytes the server sent on connection N
    chunks.txt        one line per chunk, in the order the proxy received them:
                      "<conn> <c2s|s2c> <offset> <length> <t_ns>"
                      offset/length index the direction's .bin file; t_ns is nanoseconds since
                      the proxy started (monotonic clock). Lines starting with '#' are comments.

A chunk is what one recv() returned, so chunk boundaries look like the syscall boundaries the
tracer sees. Chunks are listed in the order the proxy received them, which keeps causality (a
response comes after the request that caused it).

Usage:
    capture.py NAME --target HOST:PORT [--out DIR] -- CLIENT_COMMAND...

Every "{port}" in the client command is replaced by the proxy's port. Standard library only.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

RECV_SIZE = 65536


class Recorder:
    """Chunks of all connections, in arrival order."""

    def __init__(self):
        self.lock = threading.Lock()
        self.start = time.monotonic_ns()
        self.data = {}  # (conn, dir) -> bytearray
        self.chunks = []  # (conn, dir, offset, length, t_ns)
        self.open = 0

    def record(self, conn, direction, payload):
        with self.lock:
            buf = self.data.setdefault((conn, direction), bytearray())
            self.chunks.append(
                (conn, direction, len(buf), len(payload), time.monotonic_ns() - self.start)
            )
            buf.extend(payload)

    def write(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if name.startswith("conn") and name.endswith(".bin") or name == "chunks.txt":
                os.remove(os.path.join(out_dir, name))
        with self.lock:
            conns = sorted({c for c, _ in self.data} | {c for c, *_ in self.chunks})
            for conn in conns:
                for direction in ("c2s", "s2c"):
                    path = os.path.join(out_dir, f"conn{conn}.{direction}.bin")
                    with open(path, "wb") as f:
                        f.write(self.data.get((conn, direction), b""))
            with open(os.path.join(out_dir, "chunks.txt"), "w") as f:
                f.write("# conn dir offset length t_ns\n")
                for chunk in self.chunks:
                    f.write("%d %s %d %d %d\n" % chunk)


def pump(recorder, conn, direction, src, dst):
    """Copies src to dst, recording each chunk, until src closes."""
    try:
        while True:
            payload = src.recv(RECV_SIZE)
            if not payload:
                break
            recorder.record(conn, direction, payload)
            dst.sendall(payload)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(listener, target, recorder):
    conn = 0
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        server = socket.create_connection(target)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads = [
            threading.Thread(target=pump, args=(recorder, conn, "c2s", client, server)),
            threading.Thread(target=pump, args=(recorder, conn, "s2c", server, client)),
        ]

        def run(threads=threads, client=client, server=server):
            with recorder.lock:
                recorder.open += 1
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client.close()
            server.close()
            with recorder.lock:
                recorder.open -= 1

        threading.Thread(target=run, daemon=True).start()
        conn += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="capture name: the directory under --out")
    parser.add_argument("--target", required=True, help="server HOST:PORT")
    parser.add_argument(
        "--out",
        default=os.path.dirname(os.path.abspath(__file__)),
        help="parent directory of the capture (default: this script's directory)",
    )
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for close")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("a client command is required after --")
    host, port = args.target.rsplit(":", 1)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    proxy_port = listener.getsockname()[1]
    recorder = Recorder()
    threading.Thread(
        target=serve, args=(listener, (host, int(port)), recorder), daemon=True
    ).start()

    command = [part.replace("{port}", str(proxy_port)) for part in command]
    status = subprocess.call(command)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        with recorder.lock:
            if recorder.open == 0:
                break
        time.sleep(0.05)
    listener.close()
    out_dir = os.path.join(args.out, args.name)
    recorder.write(out_dir)
    print(
        "%s: %d chunks, client exited %d" % (out_dir, len(recorder.chunks), status),
        file=sys.stderr,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
