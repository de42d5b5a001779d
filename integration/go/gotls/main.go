// Command gotls is the Go crypto/tls peer of the end-to-end tests: an HTTPS server and two HTTPS
// clients, built from the standard library only. HTTP/2 is switched off on both sides, so every
// exchange is HTTP/1.1 over TLS.
//
//	gotls server PORT CERT KEY    serve until killed; prints "listening" once bound
//	gotls get BASE PREFIX N       N GETs of PREFIX/<i> on one keep-alive connection, each answer
//	                              checked against "body <i>\n"; prints "port <local port>"
//	gotls load BASE N WORKERS     N requests spread over WORKERS goroutines (even i: GET
//	                              /load/<i>, odd i: POST of "payload <i>" to /echo/<i>), each
//	                              answer checked; prints "done <N>"
//
// The clients print "ready" and wait for a line on stdin before their first request, so a test
// can first make sure the agent has probed them.
//
// The server answers GET with "path=<path>" (404 under /missing), POST with the request body, and
// grows the handling goroutine's stack first, so the stacks of probed goroutines move.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: gotls server|get|load ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "server":
		need(args, 3)
		serve(args[0], args[1], args[2])
	case "get":
		need(args, 3)
		ready()
		get(args[0], args[1], atoi(args[2]))
	case "load":
		need(args, 3)
		ready()
		load(args[0], atoi(args[1]), atoi(args[2]))
	default:
		fail("unknown mode " + os.Args[1])
	}
}

func need(args []string, n int) {
	if len(args) != n {
		fail(fmt.Sprintf("want %d arguments, got %d", n, len(args)))
	}
}

func ready() {
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fail("no go-ahead on stdin: " + err.Error())
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fail(err.Error())
	}
	return n
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "gotls:", msg)
	os.Exit(1)
}

// deep recurses with a large frame, so the goroutine's stack is copied to a bigger one.
//
//go:noinline
func deep(n int) byte {
	var frame [512]byte
	frame[n%512] = byte(n)
	if n == 0 {
		return frame[0]
	}
	return deep(n-1) + frame[n%512]
}

func serve(port, cert, key string) {
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		deep(64)
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		out := body
		if r.Method != http.MethodPost {
			out = []byte("path=" + r.URL.Path)
		}
		status := http.StatusOK
		if strings.HasPrefix(r.URL.Path, "/missing") {
			status = http.StatusNotFound
		}
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(out)))
		w.WriteHeader(status)
		w.Write(out)
	})
	srv := &http.Server{
		Handler: handler,
		// Quiet about the connections tests open only to see the port listening.
		ErrorLog: log.New(io.Discard, "", 0),
		// A non-nil empty map switches HTTP/2 off.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fail(err.Error())
	}
	fmt.Println("listening")
	fail(srv.ServeTLS(ln, cert, key).Error())
}

// client is an HTTP/1.1-only HTTPS client that accepts any certificate and keeps up to `conns`
// connections alive. Every dialled connection's local port is sent to `ports`, when not nil.
func client(conns int, ports chan<- int) *http.Client {
	dialer := &net.Dialer{}
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err == nil && ports != nil {
				ports <- c.LocalAddr().(*net.TCPAddr).Port
			}
			return c, err
		},
	}
	return &http.Client{Transport: transport}
}

// fetch sends one request and checks the status and body of the answer.
func fetch(c *http.Client, method, url string, body []byte, want []byte) error {
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, reader)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, want) {
		return fmt.Errorf("unexpected answer to %s %s: %d %q", method, url, resp.StatusCode, got)
	}
	return nil
}

func get(base, prefix string, n int) {
	ports := make(chan int, 16)
	c := client(1, ports)
	for i := 0; i < n; i++ {
		url := fmt.Sprintf("%s%s/%d", base, prefix, i)
		if err := fetch(c, http.MethodGet, url, nil, []byte(fmt.Sprintf("body %d\n", i))); err != nil {
			fail(err.Error())
		}
	}
	close(ports)
	dialled := 0
	port := 0
	for p := range ports {
		dialled++
		port = p
	}
	if dialled != 1 {
		fail(fmt.Sprintf("%d connections for one keep-alive client", dialled))
	}
	fmt.Printf("port %d\n", port)
}

func load(base string, n, workers int) {
	c := client(workers, nil)
	next := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				var err error
				if i%2 == 0 {
					path := fmt.Sprintf("/load/%d", i)
					err = fetch(c, http.MethodGet, base+path, nil, []byte("path="+path))
				} else {
					payload := []byte(fmt.Sprintf("payload %d", i))
					err = fetch(c, http.MethodPost, fmt.Sprintf("%s/echo/%d", base, i), payload, payload)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case err := <-errs:
			fail(err.Error())
		}
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		fail(err.Error())
	default:
	}
	fmt.Printf("done %d\n", n)
}
