/* boringssl_client PORT N: N GETs of /k/<i> on one keep-alive HTTPS connection to 127.0.0.1:PORT
 * through BoringSSL (SSL_connect, SSL_write, SSL_read; no certificate check), each answer checked
 * to be a 200 with body "body <i>\n". Then prints "port <local port>".
 * boringssl_client --hold: maps BoringSSL and waits for end of input, nothing else.
 * Built by e2e_tls.rs. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
  fprintf(stderr, "boringssl_client: %s\n", what);
  exit(1);
}

/* Reads one response (headers and a Content-Length body) into buf; returns its length. */
static size_t read_response(SSL *ssl, char *buf, size_t cap) {
  size_t len = 0;
  for (;;) {
    buf[len] = 0;
    char *end = strstr(buf, "\r\n\r\n");
    if (end) {
      char *cl = strstr(buf, "Content-Length: ");
      if (!cl) die("no Content-Length");
      size_t body = strtoul(cl + 16, NULL, 10);
      size_t want = (size_t)(end + 4 - buf) + body;
      if (len >= want) return len;
    }
    if (len + 1 >= cap) die("response too large");
    int n = SSL_read(ssl, buf + len, (int)(cap - 1 - len));
    if (n <= 0) die("SSL_read failed");
    len += (size_t)n;
  }
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "--hold") == 0) {
    while (getchar() != EOF) {
    }
    return 0;
  }
  if (argc != 3) die("usage: boringssl_client PORT N | --hold");
  int port = atoi(argv[1]), n = atoi(argv[2]);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) die("connect failed");
  SSL_CTX *ctx = SSL_CTX_new(TLS_method());
  if (!ctx) die("SSL_CTX_new failed");
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  SSL *ssl = SSL_new(ctx);
  if (!ssl || !SSL_set_fd(ssl, fd)) die("SSL_new failed");
  if (SSL_connect(ssl) != 1) die("SSL_connect failed");
  char buf[16384];
  for (int i = 0; i < n; i++) {
    char req[256];
    int len = snprintf(req, sizeof req,
                       "GET /k/%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: boringssl_client\r\n\r\n",
                       i, port);
    if (SSL_write(ssl, req, len) != len) die("SSL_write failed");
    read_response(ssl, buf, sizeof buf);
    char body[32];
    snprintf(body, sizeof body, "\r\n\r\nbody %d\n", i);
    if (strncmp(buf, "HTTP/1.1 200 ", 13) != 0 || !strstr(buf, body)) {
      fprintf(stderr, "unexpected answer to /k/%d: %s\n", i, buf);
      return 1;
    }
  }
  struct sockaddr_in local;
  socklen_t local_len = sizeof local;
  getsockname(fd, (struct sockaddr *)&local, &local_len);
  printf("port %d\n", ntohs(local.sin_port));
  fflush(stdout);
  SSL_shutdown(ssl);
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  close(fd);
  return 0;
}
