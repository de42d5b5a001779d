// Open-loop HTTP/1.1 load generator for 127.0.0.1 with latency percentiles.
//
// Requests are scheduled at a fixed rate whatever the server does (open loop); each goes out on an
// idle keep-alive connection, or waits in a queue when none is idle. Latency is measured from the
// request's scheduled time to the last byte of its response, so a stalled server shows up as
// latency instead of as fewer requests (no coordinated omission). One thread, epoll, timers with
// nanosecond resolution (epoll_pwait2, timer slack 1 ns) so 5k-20k req/s leave the CPU mostly idle.
//
// Usage: loadgen -p PORT -r RATE -d SECONDS [-c CONNECTIONS] [-w WARMUP_SECONDS] [-u PATH]
//                [-t DRAIN_TIMEOUT_SECONDS]
// Sends at most RATE*SECONDS requests (RATE <= 1e6, SECONDS <= 3600), then waits at most
// DRAIN_TIMEOUT for the answers still due. Requests scheduled during the warm-up are sent but not
// measured. Prints one JSON object on stdout.

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 4096
#define MAX_RATE 1000000.0
#define MAX_SECONDS 3600.0
#define HEAD_MAX 8192
#define READ_CHUNK 65536

struct conn {
    int fd;
    int busy;
    uint64_t scheduled_ns;  // of the request in flight
    char head[HEAD_MAX];
    size_t head_len;
    int in_body;
    long long body_left;
};

static int ep;
static uint16_t port;
static char request[600];
static size_t request_len;

static struct conn *conns;
static int n_conns;
static int *idle;
static int n_idle;

static uint64_t *pending;  // scheduled times waiting for an idle connection (FIFO)
static size_t pending_head, pending_tail;

static uint64_t *latencies;
static size_t n_latencies;
static uint64_t measure_from_ns;
static long long completed, errors, reconnects, in_flight;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void open_conn(int idx) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect 127.0.0.1");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    struct conn *c = &conns[idx];
    c->fd = fd;
    c->busy = 0;
    c->head_len = 0;
    c->in_body = 0;
    c->body_left = 0;
    idle[n_idle++] = idx;
}

// Replaces a connection the server closed or broke; its request in flight, if any, failed.
static void reopen_conn(int idx) {
    struct conn *c = &conns[idx];
    if (c->busy) {
        errors++;
        in_flight--;
    } else {
        for (int i = 0; i < n_idle; i++) {
            if (idle[i] == idx) {
                idle[i] = idle[--n_idle];
                break;
            }
        }
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    reconnects++;
    open_conn(idx);
}

static void send_request(int idx, uint64_t scheduled) {
    struct conn *c = &conns[idx];
    ssize_t w = write(c->fd, request, request_len);
    if (w != (ssize_t)request_len) {
        // A small request that does not fit an idle keep-alive socket means the connection is gone.
        errors++;
        reopen_conn(idx);
        return;
    }
    c->busy = 1;
    c->scheduled_ns = scheduled;
    c->head_len = 0;
    c->in_body = 0;
    in_flight++;
}

static void dispatch(void) {
    while (pending_head < pending_tail && n_idle > 0) {
        int idx = idle[--n_idle];
        send_request(idx, pending[pending_head++]);
    }
}

static void finish_response(int idx, uint64_t t) {
    struct conn *c = &conns[idx];
    c->busy = 0;
    in_flight--;
    completed++;
    if (c->scheduled_ns >= measure_from_ns) latencies[n_latencies++] = t - c->scheduled_ns;
    idle[n_idle++] = idx;
}

// Parses the head in c->head; returns the body length, or -1 if the response is unusable.
static long long parse_head(struct conn *c) {
    c->head[c->head_len] = 0;
    if (strncmp(c->head, "HTTP/1.1 200", 12) != 0 && strncmp(c->head, "HTTP/1.0 200", 12) != 0)
        return -1;
    long long len = 0;
    for (char *line = strstr(c->head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "content-length:", 15) == 0) {
            len = strtoll(line + 17, NULL, 10);
            break;
        }
    }
    return len < 0 ? -1 : len;
}

static void on_readable(int idx) {
    static char buf[READ_CHUNK];
    struct conn *c = &conns[idx];
    for (;;) {
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            reopen_conn(idx);
            return;
        }
        if (r == 0 || !c->busy) {
            // Closed by the server, or bytes nobody asked for: the connection is not usable.
            reopen_conn(idx);
            return;
        }
        size_t off = 0;
        while (off < (size_t)r && c->busy) {
            if (c->in_body) {
                size_t take = (size_t)r - off;
                if ((long long)take > c->body_left) take = (size_t)c->body_left;
                c->body_left -= (long long)take;
                off += take;
            } else {
                // Copy until the end of the head, one byte at a time only past what fits.
                while (off < (size_t)r && !c->in_body) {
                    if (c->head_len >= HEAD_MAX - 1) {
                        reopen_conn(idx);
                        return;
                    }
                    c->head[c->head_len++] = buf[off++];
                    if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) {
                        long long body = parse_head(c);
                        if (body < 0) {
                            reopen_conn(idx);
                            return;
                        }
                        c->in_body = 1;
                        c->body_left = body;
                    }
                }
            }
            if (c->in_body && c->body_left == 0) finish_response(idx, now_ns());
        }
        if (off < (size_t)r) {
            reopen_conn(idx);
            return;
        }
        // A short read drained the socket; epoll is level-triggered and reports anything newer,
        // so skip the read that would only return EAGAIN.
        if ((size_t)r < sizeof buf) return;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(double p) {
    if (n_latencies == 0) return 0;
    size_t i = (size_t)(p / 100.0 * (double)(n_latencies - 1) + 0.5);
    return (double)latencies[i] / 1000.0;
}

int main(int argc, char **argv) {
    double rate = 0, seconds = 0, warmup = 1, drain = 5;
    const char *path = "/";
    n_conns = 64;
    int opt;
    while ((opt = getopt(argc, argv, "p:r:d:c:w:u:t:")) != -1) {
        switch (opt) {
            case 'p': port = (uint16_t)atoi(optarg); break;
            case 'r': rate = atof(optarg); break;
            case 'd': seconds = atof(optarg); break;
            case 'c': n_conns = atoi(optarg); break;
            case 'w': warmup = atof(optarg); break;
            case 'u': path = optarg; break;
            case 't': drain = atof(optarg); break;
            default:
                fprintf(stderr, "usage: %s -p PORT -r RATE -d SECONDS [-c CONNS] [-w WARMUP] [-u PATH] [-t DRAIN]\n",
                        argv[0]);
                return 2;
        }
    }
    if (port == 0 || rate <= 0 || rate > MAX_RATE || seconds <= 0 || seconds > MAX_SECONDS ||
        n_conns < 1 || n_conns > MAX_CONNECTIONS || warmup < 0 || warmup >= seconds || drain < 0 ||
        drain > 60 || strlen(path) > 256) {
        fprintf(stderr, "loadgen: bad arguments (need PORT, 0<RATE<=1e6, 0<SECONDS<=3600, WARMUP<SECONDS)\n");
        return 2;
    }
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: tracer-bench-loadgen\r\n\r\n",
                                   path);
    // Wake-ups 50 us apart need a timer slack far below the default 50 us.
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    size_t total = (size_t)(rate * seconds);
    uint64_t interval_ns = (uint64_t)(1e9 / rate);
    conns = calloc((size_t)n_conns, sizeof *conns);
    idle = calloc((size_t)n_conns, sizeof *idle);
    pending = calloc(total + 1, sizeof *pending);
    latencies = calloc(total + 1, sizeof *latencies);
    if (!conns || !idle || !pending || !latencies) die("calloc");
    ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < n_conns; i++) open_conn(i);

    uint64_t start = now_ns() + 1000000;
    measure_from_ns = start + (uint64_t)(warmup * 1e9);
    uint64_t sched_end = start + (uint64_t)(seconds * 1e9);
    uint64_t deadline = sched_end + (uint64_t)(drain * 1e9);
    size_t next = 0;
    struct epoll_event events[64];
    uint64_t t = now_ns();
    while (t < deadline) {
        while (next < total && start + next * interval_ns <= t) pending[pending_tail++] = start + next++ * interval_ns;
        dispatch();
        if (next >= total && pending_head == pending_tail && in_flight == 0) break;
        uint64_t wake = next < total ? start + next * interval_ns : deadline;
        struct timespec ts = {0, 0};
        if (wake > t) {
            ts.tv_sec = (time_t)((wake - t) / 1000000000ull);
            ts.tv_nsec = (long)((wake - t) % 1000000000ull);
        }
        int n = epoll_pwait2(ep, events, 64, &ts, NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2");
        for (int i = 0; i < n; i++) on_readable((int)events[i].data.u32);
        t = now_ns();
    }

    long long unsent = (long long)(total - next) + (long long)(pending_tail - pending_head);
    qsort(latencies, n_latencies, sizeof *latencies, cmp_u64);
    double sum = 0;
    for (size_t i = 0; i < n_latencies; i++) sum += (double)latencies[i];
    double measured_s = seconds - warmup;
    printf("{\"rate\":%.0f,\"seconds\":%.1f,\"connections\":%d,\"scheduled\":%zu,\"completed\":%lld,"
           "\"measured\":%zu,\"errors\":%lld,\"timeouts\":%lld,\"unsent\":%lld,\"reconnects\":%lld,"
           "\"achieved_rps\":%.1f,\"mean_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"p999_us\":%.1f,\"max_us\":%.1f}\n",
           rate, seconds, n_conns, total, completed, n_latencies, errors, in_flight, unsent, reconnects,
           (double)n_latencies / measured_s, n_latencies ? sum / (double)n_latencies / 1000.0 : 0.0,
           pct_us(50), pct_us(90), pct_us(99), pct_us(99.9),
           n_latencies ? (double)latencies[n_latencies - 1] / 1000.0 : 0.0);
    return 0;
}
