// gogrpc: a gRPC server and client over Go's crypto/tls, for the agent's end-to-end tests. Built in
// GOPATH mode against Debian's golang-google-grpc-dev (the tests have no module proxy), with the
// standard health service as its API, so no generated code is needed.
//
//	gogrpc server PORT CERT KEY   serves grpc.health.v1.Health on 127.0.0.1:PORT; prints "listening"
//	gogrpc client PORT N          N Health/Check calls on one connection (no certificate check):
//	                              even calls ask for "" (SERVING), odd ones for "missing"
//	                              (NOT_FOUND); prints "port <local port>"
package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "gogrpc: "+format+"\n", args...)
	os.Exit(1)
}

func server(port, certFile, keyFile string) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		fail("load key pair: %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fail("listen: %v", err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	healthpb.RegisterHealthServer(s, health.NewServer())
	fmt.Println("listening")
	if err := s.Serve(lis); err != nil {
		fail("serve: %v", err)
	}
}

func client(port string, n int) {
	var local string
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err == nil {
			local = c.LocalAddr().String()
		}
		return c, err
	}
	creds := credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})
	conn, err := grpc.Dial("127.0.0.1:"+port, grpc.WithTransportCredentials(creds), grpc.WithContextDialer(dial), grpc.WithBlock())
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		service, want := "", codes.OK
		if i%2 == 1 {
			service, want = "missing", codes.NotFound
		}
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		cancel()
		if got := status.Code(err); got != want {
			fail("call %d: status %v, want %v (%v)", i, got, want, err)
		}
	}
	_, p, _ := net.SplitHostPort(local)
	fmt.Println("port " + p)
}

func main() {
	if len(os.Args) == 5 && os.Args[1] == "server" {
		server(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	if len(os.Args) == 4 && os.Args[1] == "client" {
		n, err := strconv.Atoi(os.Args[3])
		if err != nil {
			fail("bad count %q", os.Args[3])
		}
		client(os.Args[2], n)
		return
	}
	fail("usage: gogrpc server PORT CERT KEY | gogrpc client PORT N")
}
