#!/usr/bin/env python3
"""A tiny gRPC greeter (grpcio, no generated code) for capturing golden traffic.

    grpc_peer.py serve PORT          serve on 127.0.0.1:PORT until killed
    grpc_peer.py call HOST:PORT      make the calls below on one channel, then exit
    grpc_peer.py call HOST:PORT hold the same, but print "done" and wait for stdin to close before
                                     closing the channel and exiting (so a tracer sees the process
                                     alive until the test has what it needs)

Methods of helloworld.Greeter, with raw bytes as messages:
    SayHello  unary: replies b"hello " + request
    Fail      unary: fails with NOT_FOUND and the message "no such greeter: <request> ✓"
    Count     server streaming: replies three messages b"1", b"2", b"3"

The client calls SayHello(b"bob"), Fail(b"eve"), Count(b"3"), in this order.
"""

import sys
from concurrent import futures

import grpc

SERVICE = "helloworld.Greeter"


def identity(b):
    return b


def say_hello(request, context):
    return b"hello " + request


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such greeter: %s \u2713" % request.decode())


def count(request, context):
    for i in range(int(request.decode())):
        yield str(i + 1).encode()


def serve(port):
    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(
            say_hello, request_deserializer=identity, response_serializer=identity
        ),
        "Fail": grpc.unary_unary_rpc_method_handler(
            fail, request_deserializer=identity, response_serializer=identity
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            count, request_deserializer=identity, response_serializer=identity
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    server.wait_for_termination()


def call(target, hold):
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        def method(name, kind):
            return getattr(channel, kind)(
                "/%s/%s" % (SERVICE, name),
                request_serializer=identity,
                response_deserializer=identity,
            )

        print(method("SayHello", "unary_unary")(b"bob", timeout=5))
        try:
            method("Fail", "unary_unary")(b"eve", timeout=5)
        except grpc.RpcError as e:
            print(e.code(), e.details())
        print(list(method("Count", "unary_stream")(b"3", timeout=5)))
        if hold:
            print("done", flush=True)
            sys.stdin.read()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "call" and sys.argv[3:] in ([], ["hold"]):
        call(sys.argv[2], len(sys.argv) == 4)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
