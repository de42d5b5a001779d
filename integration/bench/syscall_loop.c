// Per-syscall cost probe: one thread runs a tight loop of small write/read pairs and prints the
// time per iteration, so running it with and without the agent gives the agent's added cost per
// hooked syscall.
//
// Usage: syscall_loop MODE ITERATIONS MAX_SECONDS
//   MODE http    loopback TCP pair; each iteration is one small HTTP/1.1 request and response
//                (the agent copies every payload and builds two spans per iteration)
//   MODE opaque  loopback TCP pair carrying bytes no parser recognises (the agent gives up on the
//                connection after detection and the kernel stops copying its payload)
//   MODE pipe    two pipes (not sockets: the kernel programs only check the fd type)
//   MODE untraced  getppid(2), a syscall the agent does not trace: what its raw sys_enter/sys_exit
//                programs cost every other syscall on the host
// Every iteration is 4 syscalls: write(a), read(b), write(b), read(a). Both ends live in this one
// thread: a small write on loopback is already queued at the peer when write() returns, so no
// read blocks and no context switch adds noise. The loop stops after ITERATIONS or MAX_SECONDS,
// whichever comes first.
//
// Output (one line): mode=M iterations=N seconds=S ns_per_iteration=X ns_per_syscall=Y

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SYSCALLS_PER_ITERATION 4
// Iterations between clock reads: keeps the deadline check out of the measured cost.
#define CHECK_EVERY 1024
#define WARMUP_ITERATIONS 2000

static const char HTTP_REQUEST[] = "GET /bench HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
static const char HTTP_RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
// Starts with bytes that are neither HTTP, TLS, HTTP/2 nor a PostgreSQL startup message.
static const char OPAQUE_REQUEST[] = "\x01\x02\x03\x04opaque-request-payload-0123456789abcdef";
static const char OPAQUE_RESPONSE[] = "\x05\x06\x07\x08opaque-response-payload-0123456789abcde";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

// Connected loopback TCP pair: *client from connect(), *server from accept().
static void tcp_pair(int *client, int *server) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 1) < 0) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) < 0) die("getsockname");
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (*client < 0) die("socket");
    if (connect(*client, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    *server = accept(listener, NULL, NULL);
    if (*server < 0) die("accept");
    close(listener);
    int one = 1;
    setsockopt(*client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        buf += w;
        n -= (size_t)w;
    }
}

static void read_exact(int fd, char *buf, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, buf, n);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (r == 0) {
            fprintf(stderr, "unexpected end of stream\n");
            exit(1);
        }
        buf += r;
        n -= (size_t)r;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s http|opaque|pipe|untraced ITERATIONS MAX_SECONDS\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    long long iterations = atoll(argv[2]);
    double max_seconds = atof(argv[3]);
    if (iterations <= 0 || max_seconds <= 0) {
        fprintf(stderr, "ITERATIONS and MAX_SECONDS must be positive\n");
        return 2;
    }

    // a_out/b_in carry requests, b_out/a_in carry responses.
    int a_out = -1, b_in = -1, b_out = -1, a_in = -1;
    const char *req = NULL, *resp = NULL;
    size_t req_len = 0, resp_len = 0;
    int untraced = 0;
    if (strcmp(mode, "http") == 0 || strcmp(mode, "opaque") == 0) {
        int client, server;
        tcp_pair(&client, &server);
        a_out = a_in = client;
        b_in = b_out = server;
        int http = strcmp(mode, "http") == 0;
        req = http ? HTTP_REQUEST : OPAQUE_REQUEST;
        resp = http ? HTTP_RESPONSE : OPAQUE_RESPONSE;
        req_len = http ? sizeof HTTP_REQUEST - 1 : sizeof OPAQUE_REQUEST - 1;
        resp_len = http ? sizeof HTTP_RESPONSE - 1 : sizeof OPAQUE_RESPONSE - 1;
    } else if (strcmp(mode, "pipe") == 0) {
        int p1[2], p2[2];
        if (pipe(p1) < 0 || pipe(p2) < 0) die("pipe");
        a_out = p1[1];
        b_in = p1[0];
        b_out = p2[1];
        a_in = p2[0];
        req = OPAQUE_REQUEST;
        resp = OPAQUE_RESPONSE;
        req_len = sizeof OPAQUE_REQUEST - 1;
        resp_len = sizeof OPAQUE_RESPONSE - 1;
    } else if (strcmp(mode, "untraced") == 0) {
        untraced = 1;
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }

    char buf[256];
    if (untraced) {
        // glibc does not cache getppid; syscall() keeps it a real syscall either way.
        for (int i = 0; i < WARMUP_ITERATIONS; i++) syscall(SYS_getppid);
    }
    for (int i = 0; !untraced && i < WARMUP_ITERATIONS; i++) {
        write_all(a_out, req, req_len);
        read_exact(b_in, buf, req_len);
        write_all(b_out, resp, resp_len);
        read_exact(a_in, buf, resp_len);
    }

    double start = now_s();
    double deadline = start + max_seconds;
    long long done = 0;
    double end = start;
    while (done < iterations) {
        if (untraced) {
            for (int i = 0; i < SYSCALLS_PER_ITERATION; i++) syscall(SYS_getppid);
        } else {
            write_all(a_out, req, req_len);
            read_exact(b_in, buf, req_len);
            write_all(b_out, resp, resp_len);
            read_exact(a_in, buf, resp_len);
        }
        done++;
        if (done % CHECK_EVERY == 0) {
            end = now_s();
            if (end >= deadline) break;
        }
    }
    end = now_s();
    double seconds = end - start;
    double ns_iter = seconds * 1e9 / (double)done;
    printf("mode=%s iterations=%lld seconds=%.3f ns_per_iteration=%.1f ns_per_syscall=%.1f\n", mode,
           done, seconds, ns_iter, ns_iter / SYSCALLS_PER_ITERATION);
    return 0;
}
