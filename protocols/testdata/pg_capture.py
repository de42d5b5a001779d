#!/usr/bin/env python3
"""Records real PostgreSQL traffic for the parser's golden tests (standard library only).

proxy     A TCP proxy on 127.0.0.1 between a client and a server. Each connection it relays is
          written to OUT/conn-<n>.bin (the chunks, back to back, in the order the proxy received
          them) and OUT/conn-<n>.json (one line per chunk: which side sent it and its length).
          A chunk is what one recv() returned, close to what one syscall of the traced process
          moves.

pipeline  A minimal hand-written frontend: startup without TLS (trust authentication), then a
          pipelined extended-protocol batch (Parse/Bind/Execute x3 + Sync in one write), a batch
          whose second statement fails, a multi-statement simple query, COPY in and out, and
          Terminate.

The captures in this directory were made with PostgreSQL 15 like this (as user postgres):

    initdb -D $D -A trust
    pg_ctl -D $D -o "-p 55432 -k /tmp -c listen_addresses=127.0.0.1" -l $D/log start
    pg_capture.py proxy --listen 55433 --upstream 55432 --out pg_simple &
    psql -h 127.0.0.1 -p 55433 -U postgres -d postgres -c 'select 1' \
         -c 'select * from missing_table'
    ...one proxy per directory: pg_pgbench_init (pgbench -i -I dtGvp), pg_pgbench_prepared
    (pgbench -M prepared -t 20 -c 1), pg_pipeline (pg_capture.py pipeline --port 55433)...
    pg_ctl -D $D stop
"""

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import threading


def relay(client, upstream_port, out_dir, number):
    """Relays one connection until both sides closed, then writes its chunks."""
    server = socket.create_connection(("127.0.0.1", upstream_port))
    peers = {client: (server, "client"), server: (client, "server")}
    chunks = []
    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ)
    sel.register(server, selectors.EVENT_READ)
    open_sides = 2
    while open_sides:
        for key, _ in sel.select():
            sock = key.fileobj
            other, side = peers[sock]
            data = sock.recv(65536)
            if not data:
                sel.unregister(sock)
                open_sides -= 1
                try:
                    other.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            chunks.append((side, data))
            other.sendall(data)
    client.close()
    server.close()
    base = os.path.join(out_dir, f"conn-{number}")
    with open(base + ".bin", "wb") as f:
        for _, data in chunks:
            f.write(data)
    with open(base + ".json", "w") as f:
        f.write("[\n")
        lines = [json.dumps({"dir": side, "len": len(data)}) for side, data in chunks]
        f.write(",\n".join(lines))
        f.write("\n]\n")


def proxy(args):
    os.makedirs(args.out, exist_ok=True)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.listen))
    listener.listen()
    number = 0
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=relay, args=(client, args.upstream, args.out, number), daemon=False
        ).start()
        number += 1


def message(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def parse(name, sql):
    return message(b"P", cstr(name) + cstr(sql) + struct.pack("!H", 0))


def bind(portal, statement, params=()):
    body = cstr(portal) + cstr(statement) + struct.pack("!HH", 0, len(params))
    for p in params:
        body += struct.pack("!I", len(p)) + p
    return message(b"B", body + struct.pack("!H", 0))


def execute(portal):
    return message(b"E", cstr(portal) + struct.pack("!I", 0))


def describe_portal(portal):
    return message(b"D", b"P" + cstr(portal))


SYNC = message(b"S", b"")


class Frontend:
    def __init__(self, port, user, database):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        params = cstr("user") + cstr(user) + cstr("database") + cstr(database)
        params += cstr("application_name") + cstr("pg_capture") + b"\0"
        body = struct.pack("!I", 196608) + params
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self.until_ready()

    def read_message(self):
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!I", self.buf[1:5])[0]:
            data = self.sock.recv(65536)
            if not data:
                sys.exit("server closed the connection")
            self.buf += data
        length = struct.unpack("!I", self.buf[1:5])[0]
        tag, body = self.buf[:1], self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return tag, body

    def until_ready(self):
        """Reads messages up to ReadyForQuery; returns their types."""
        tags = []
        while True:
            tag, _ = self.read_message()
            tags.append(tag)
            if tag == b"Z":
                return tags

    def until(self, wanted):
        while True:
            tag, _ = self.read_message()
            if tag == wanted:
                return


def pipeline(args):
    fe = Frontend(args.port, args.user, args.database)
    # Three statements pipelined in one write, one Sync.
    batch = b""
    for i in range(3):
        batch += parse("", f"SELECT {i} AS n, repeat('x', {i})")
        batch += bind("", "") + describe_portal("") + execute("")
    fe.sock.sendall(batch + SYNC)
    fe.until_ready()
    # The second statement fails: the third is skipped by the server.
    batch = parse("", "SELECT 1") + bind("", "") + execute("")
    batch += parse("", "SELECT 1/0") + bind("", "") + execute("")
    batch += parse("", "SELECT 3") + bind("", "") + execute("")
    fe.sock.sendall(batch + SYNC)
    fe.until_ready()
    # A named statement executed twice in one batch.
    fe.sock.sendall(message(b"Q", cstr("CREATE TEMP TABLE pipeline_t (v text)")))
    fe.until_ready()
    batch = parse("ins", "INSERT INTO pipeline_t VALUES ($1)")
    for value in (b"a", b"b"):
        batch += bind("", "ins", [value]) + execute("")
    fe.sock.sendall(batch + SYNC)

    fe.until_ready()
    # A multi-statement simple query.
    fe.sock.sendall(message(b"Q", cstr("BEGIN; SELECT count(*) FROM pipeline_t; COMMIT")))
    fe.until_ready()
    # COPY in, then out.
    fe.sock.sendall(message(b"Q", cstr("COPY pipeline_t FROM STDIN")))
    fe.until(b"G")
    fe.sock.sendall(message(b"d", b"c\nd\n") + message(b"d", b"e\n") + message(b"c", b""))
    fe.until_ready()
    fe.sock.sendall(message(b"Q", cstr("COPY pipeline_t TO STDOUT")))
    fe.until_ready()
    fe.sock.sendall(message(b"X", b""))
    fe.sock.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=proxy)
    p = sub.add_parser("pipeline")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="postgres")
    p.add_argument("--database", default="postgres")
    p.set_defaults(func=pipeline)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
