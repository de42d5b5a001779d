// One HTTP/1.1 exchange over loopback whose bytes wait in the receiving socket before they are
// read: the server reads the request SERVER_WAIT_MS after the client sent it, and the client reads
// the response CLIENT_WAIT_MS after it sent the request (the response has long arrived then). A
// span's times are its reads' and writes', not the arrivals of their bytes: the server span lasts
// from the late read of the request to the response, far shorter than SERVER_WAIT_MS; the client
// span from the request to the late read of the response, at least CLIENT_WAIT_MS.
//
// Usage: late_reads PORT   (prints `late_reads done` when both ends are through)
// Built statically for the kernel matrix's busybox guest (boot-test.sh).

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SERVER_WAIT_MS 1000
#define CLIENT_WAIT_MS 2000

static const char REQUEST[] = "GET /late HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate";

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

// Reads until `n` bytes arrived (both messages are small and known).
static void read_n(int fd, size_t n) {
    char buf[256];
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r <= 0) die("read");
        got += (size_t)r;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: late_reads PORT\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (listener < 0) die("socket");
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 1) < 0) die("listen");
    pid_t server = fork();
    if (server < 0) die("fork");
    if (server == 0) {
        int conn = accept(listener, NULL, NULL);
        if (conn < 0) die("accept");
        sleep_ms(SERVER_WAIT_MS);
        read_n(conn, sizeof REQUEST - 1);
        if (write(conn, RESPONSE, sizeof RESPONSE - 1) != sizeof RESPONSE - 1) die("write");
        // Stays open until the client closes, so the exchange ends before any close.
        char c;
        while (read(conn, &c, 1) > 0) {
        }
        return 0;
    }
    close(listener);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    if (write(fd, REQUEST, sizeof REQUEST - 1) != sizeof REQUEST - 1) die("write");
    sleep_ms(CLIENT_WAIT_MS);
    read_n(fd, sizeof RESPONSE - 1);
    close(fd);
    int status;
    waitpid(server, &status, 0);
    puts("late_reads done");
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
