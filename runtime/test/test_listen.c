/* test_listen.c: listen address parsing and listener opening (listen.c).
 *
 * Build: gcc -Wall -Wextra -I runtime/src runtime/test/test_listen.c
 *        runtime/src/listen.c -o build/test_listen
 * Prints "N passed, N failed"; exits 1 when anything failed.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "listen.h"

static int passed, failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond) {                                                                                \
            passed++;                                                                              \
        } else {                                                                                   \
            failed++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#define CHECK_STR(got, want)                                                                       \
    do {                                                                                           \
        if (strcmp((got), (want)) == 0) {                                                          \
            passed++;                                                                              \
        } else {                                                                                   \
            failed++;                                                                              \
            fprintf(stderr, "%s:%d: got \"%s\", want \"%s\"\n", __FILE__, __LINE__, (got),         \
                    (want));                                                                       \
        }                                                                                          \
    } while (0)

static void ok_parse(const char *addr, const char *host, int port)
{
    mg_listen_conf_t l;
    char err[256] = "";
    int r = mg_listen_parse(addr, &l, err, sizeof(err));

    if (r != 0) fprintf(stderr, "parse %s: %s\n", addr, err);
    CHECK(r == 0);
    CHECK_STR(l.address, addr);
    CHECK_STR(l.host, host);
    CHECK(l.port == port);
    CHECK(l.tls == 0);
}

/* Fails with -EINVAL and a message that starts with want_prefix. */
static void bad_parse(const char *addr, const char *want_prefix)
{
    mg_listen_conf_t l;
    char err[256] = "";
    int r = mg_listen_parse(addr, &l, err, sizeof(err));

    CHECK(r == -EINVAL);
    if (strncmp(err, want_prefix, strlen(want_prefix)) != 0) {
        failed++;
        fprintf(stderr, "parse %s: error \"%s\" does not start with \"%s\"\n",
                addr ? addr : "(null)", err, want_prefix);
    } else {
        passed++;
    }
}

static void test_parse(void)
{
    char longaddr[300];

    ok_parse("127.0.0.1:8080", "127.0.0.1", 8080);
    ok_parse("0.0.0.0:1", "0.0.0.0", 1);
    ok_parse("10.1.2.3:65535", "10.1.2.3", 65535);
    ok_parse("127.0.0.1:0", "127.0.0.1", 0); /* the kernel picks */
    ok_parse("[::1]:9001", "::1", 9001);
    ok_parse("[::]:8080", "::", 8080);
    ok_parse("[fe80::1:2]:443", "fe80::1:2", 443);
    ok_parse("localhost:9091", "localhost", 9091);
    ok_parse("8080", "0.0.0.0", 8080); /* bare port: every IPv4 address */
    ok_parse("*:8080", "0.0.0.0", 8080);
    ok_parse(":8080", "0.0.0.0", 8080);

    bad_parse(NULL, "listen: empty address");
    bad_parse("", "listen: empty address");
    bad_parse("127.0.0.1", "listen 127.0.0.1: port must be");
    bad_parse("127.0.0.1:", "listen 127.0.0.1:: port must be");
    bad_parse("127.0.0.1:65536", "listen 127.0.0.1:65536: port must be");
    bad_parse("127.0.0.1:123456", "listen 127.0.0.1:123456: port must be");
    bad_parse("127.0.0.1:-1", "listen 127.0.0.1:-1: port must be");
    bad_parse("127.0.0.1:+80", "listen 127.0.0.1:+80: port must be");
    bad_parse("127.0.0.1:80a", "listen 127.0.0.1:80a: port must be");
    bad_parse("127.0.0.1: 80", "listen 127.0.0.1: 80: port must be");
    bad_parse("::1:80", "listen ::1:80: IPv6 addresses need brackets");
    bad_parse("[::1]", "listen [::1]: expected [ipv6]:port");
    bad_parse("[::1]80", "listen [::1]80: expected [ipv6]:port");
    bad_parse("[::1:80", "listen [::1:80: expected [ipv6]:port");
    bad_parse("[127.0.0.1]:80", "listen [127.0.0.1]:80: host must be");
    bad_parse("example.com:80", "listen example.com:80: host must be an IPv4 address");
    bad_parse("256.1.1.1:80", "listen 256.1.1.1:80: host must be");
    bad_parse("1.2.3:80", "listen 1.2.3:80: host must be");
    memset(longaddr, '1', sizeof(longaddr) - 1);
    longaddr[sizeof(longaddr) - 1] = '\0';
    bad_parse(longaddr, "listen address: too long");
}

static void test_sockaddr(void)
{
    mg_listen_conf_t l;
    struct sockaddr_storage ss;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    socklen_t len;
    char err[256], buf[64];

    CHECK(mg_listen_parse("localhost:80", &l, err, sizeof(err)) == 0);
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == 0);
    CHECK(ss.ss_family == AF_INET && len == sizeof(*sin));
    CHECK(sin->sin_addr.s_addr == htonl(INADDR_LOOPBACK) && ntohs(sin->sin_port) == 80);

    CHECK(mg_listen_parse("*:81", &l, err, sizeof(err)) == 0);
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == 0);
    CHECK(sin->sin_addr.s_addr == htonl(INADDR_ANY) && ntohs(sin->sin_port) == 81);

    CHECK(mg_listen_parse("[::1]:82", &l, err, sizeof(err)) == 0);
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == 0);
    CHECK(ss.ss_family == AF_INET6 && len == sizeof(*sin6));
    CHECK(IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr) && ntohs(sin6->sin6_port) == 82);

    /* The normalized config may hand host and port without an address,
     * and may keep the IPv6 brackets in host. */
    memset(&l, 0, sizeof(l));
    snprintf(l.host, sizeof(l.host), "[::1]");
    l.port = 83;
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == 0);
    CHECK(ss.ss_family == AF_INET6 && ntohs(sin6->sin6_port) == 83);
    mg_listen_format(&l, buf, sizeof(buf));
    CHECK_STR(buf, "[::1]:83");

    snprintf(l.host, sizeof(l.host), "::1");
    mg_listen_format(&l, buf, sizeof(buf));
    CHECK_STR(buf, "[::1]:83");
    snprintf(l.host, sizeof(l.host), "127.0.0.1");
    mg_listen_format(&l, buf, sizeof(buf));
    CHECK_STR(buf, "127.0.0.1:83");

    l.port = 70000;
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == -EINVAL);
    CHECK_STR(err, "listen 127.0.0.1:70000: port must be 0..65535");

    snprintf(l.host, sizeof(l.host), "db.internal");
    l.port = 80;
    CHECK(mg_listen_sockaddr(&l, &ss, &len, err, sizeof(err)) == -EINVAL);
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (d == NULL) return -1;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static void test_open(void)
{
    mg_listen_conf_t l;
    char err[256] = "", want[128];
    int fd, fd2, fds[4], more[4], port, i, before;

    /* One socket on a kernel-chosen port: non-blocking, inherited by fork. */
    CHECK(mg_listen_parse("127.0.0.1:0", &l, err, sizeof(err)) == 0);
    fd = mg_listen_open(&l, 0, err, sizeof(err));
    CHECK(fd >= 0);
    if (fd < 0) return;
    port = mg_listen_port(fd);
    CHECK(port > 0);
    CHECK((fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
    CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0);

    /* A port that another socket holds is "address already in use", both
     * for a plain socket and for a SO_REUSEPORT set (the probe). */
    l.port = port;
    snprintf(l.address, sizeof(l.address), "127.0.0.1:%d", port);
    snprintf(want, sizeof(want), "listen 127.0.0.1:%d: address already in use", port);
    fd2 = mg_listen_open(&l, 0, err, sizeof(err));
    CHECK(fd2 == -EADDRINUSE);
    CHECK_STR(err, want);
    before = count_fds();
    err[0] = '\0';
    CHECK(mg_listen_open_set(&l, 3, fds, err, sizeof(err)) == -EADDRINUSE);
    CHECK_STR(err, want);
    CHECK(count_fds() == before); /* nothing left open on failure */
    close(fd);

    /* A SO_REUSEPORT set: every socket on the same port; a second set on
     * that port (another node of the same user) is refused, not shared. */
    CHECK(mg_listen_parse("127.0.0.1:0", &l, err, sizeof(err)) == 0);
    CHECK(mg_listen_open_set(&l, 4, fds, err, sizeof(err)) == 0);
    port = mg_listen_port(fds[0]);
    CHECK(port > 0);
    for (i = 1; i < 4; i++)
        CHECK(mg_listen_port(fds[i]) == port);
    l.port = port;
    l.address[0] = '\0'; /* the message is rebuilt from host and port */
    snprintf(want, sizeof(want), "listen 127.0.0.1:%d: address already in use", port);
    before = count_fds();
    CHECK(mg_listen_open_set(&l, 2, more, err, sizeof(err)) == -EADDRINUSE);
    CHECK_STR(err, want);
    CHECK(count_fds() == before);
    for (i = 0; i < 4; i++)
        close(fds[i]);

    /* Freed: the same port opens again at once (SO_REUSEADDR). */
    CHECK(mg_listen_open_set(&l, 2, fds, err, sizeof(err)) == 0);
    close(fds[0]);
    close(fds[1]);

    CHECK(mg_listen_open_set(&l, 0, fds, err, sizeof(err)) == -EINVAL);

    /* An address this host does not have. */
    CHECK(mg_listen_parse("192.0.2.1:80", &l, err, sizeof(err)) == 0);
    CHECK(mg_listen_open(&l, 0, err, sizeof(err)) == -EADDRNOTAVAIL);
    CHECK_STR(err, "listen 192.0.2.1:80: cannot assign requested address");
}

static void test_open_ipv6(void)
{
    mg_listen_conf_t l6, l4;
    char err[256], addr[64];
    int fd6, fd4, port;

    CHECK(mg_listen_parse("[::]:0", &l6, err, sizeof(err)) == 0);
    fd6 = mg_listen_open(&l6, 0, err, sizeof(err));
    if (fd6 == -EAFNOSUPPORT || fd6 == -EADDRNOTAVAIL) {
        fprintf(stderr, "test_listen: no IPv6 here, skipping the IPv6 open checks\n");
        return;
    }
    CHECK(fd6 >= 0);
    if (fd6 < 0) return;
    port = mg_listen_port(fd6);
    /* IPV6_V6ONLY: [::]:P leaves 0.0.0.0:P free, as nginx does. */
    snprintf(addr, sizeof(addr), "0.0.0.0:%d", port);
    CHECK(mg_listen_parse(addr, &l4, err, sizeof(err)) == 0);
    fd4 = mg_listen_open(&l4, 0, err, sizeof(err));
    CHECK(fd4 >= 0);
    if (fd4 >= 0) close(fd4);
    close(fd6);
}

int main(void)
{
    test_parse();
    test_sockaddr();
    test_open();
    test_open_ipv6();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
