/* listen.c: parse listen addresses and open listening sockets. */
#include "listen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* "Address already in use" reads as a sentence start; our messages put it
 * after a colon, so lower the first letter to match the rest of the log. */
static void listen_error(char *err, size_t errlen, const char *address, const char *reason)
{
    if (err == NULL || errlen == 0) return;
    snprintf(err, errlen, "listen %s: %s", address, reason);
    {
        size_t at = strlen("listen ") + strlen(address) + 2;
        if (at < errlen && err[at] >= 'A' && err[at] <= 'Z' && err[at + 1] >= 'a' &&
            err[at + 1] <= 'z')
            err[at] = (char)(err[at] - 'A' + 'a');
    }
}

void mg_listen_format(const mg_listen_conf_t *l, char *buf, size_t len)
{
    if (strchr(l->host, ':') != NULL && l->host[0] != '[') {
        snprintf(buf, len, "[%s]:%d", l->host, l->port);
    } else {
        snprintf(buf, len, "%s:%d", l->host, l->port);
    }
}

/* The address as the user wrote it, or rebuilt from host and port. */
static void listen_show(const mg_listen_conf_t *l, char *buf, size_t len)
{
    if (l->address[0] != '\0') {
        snprintf(buf, len, "%s", l->address);
    } else {
        mg_listen_format(l, buf, len);
    }
}

static void listen_errno(char *err, size_t errlen, const mg_listen_conf_t *l, int e)
{
    char shown[160];

    listen_show(l, shown, sizeof(shown));
    listen_error(err, errlen, shown, strerror(e));
}

/* Digits only, 0..65535; no sign, no spaces, at most 5 digits. */
static int listen_parse_port(const char *s, size_t n)
{
    long v = 0;

    if (n == 0 || n > 5) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v > 65535 ? -1 : (int)v;
}

int mg_listen_sockaddr(const mg_listen_conf_t *l, struct sockaddr_storage *ss, socklen_t *sslen,
                       char *err, size_t errlen)
{
    char host[sizeof(l->host)], shown[160];
    size_t n = strnlen(l->host, sizeof(l->host) - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

    memset(ss, 0, sizeof(*ss));
    if (l->port < 0 || l->port > 65535) {
        listen_show(l, shown, sizeof(shown));
        listen_error(err, errlen, shown, "port must be 0..65535");
        return -EINVAL;
    }
    /* The normalized config may keep IPv6 brackets in host: accept both. */
    if (n >= 2 && l->host[0] == '[' && l->host[n - 1] == ']') {
        memcpy(host, l->host + 1, n - 2);
        host[n - 2] = '\0';
    } else {
        memcpy(host, l->host, n);
        host[n] = '\0';
    }

    if (host[0] == '\0' || strcmp(host, "*") == 0 || strcmp(host, "localhost") == 0) {
        /* localhost is 127.0.0.1, not every address the resolver knows for
         * it: binding ::1 as well would make a port check pass on one
         * family and fail on the other. */
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)l->port);
        sin->sin_addr.s_addr = htonl(host[0] == 'l' ? INADDR_LOOPBACK : INADDR_ANY);
        *sslen = sizeof(*sin);
        return 0;
    }
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)l->port);
        *sslen = sizeof(*sin);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)l->port);
        *sslen = sizeof(*sin6);
        return 0;
    }
    listen_show(l, shown, sizeof(shown));
    listen_error(err, errlen, shown,
                 "host must be an IPv4 address, a bracketed IPv6 address, * or localhost");
    return -EINVAL;
}

int mg_listen_parse(const char *address, mg_listen_conf_t *out, char *err, size_t errlen)
{
    const char *host, *port, *colon;
    size_t hostlen, len;
    struct sockaddr_storage ss;
    socklen_t sslen;
    int p;

    memset(out, 0, sizeof(*out));
    if (address == NULL || address[0] == '\0') {
        if (err != NULL && errlen > 0) snprintf(err, errlen, "listen: empty address");
        return -EINVAL;
    }
    len = strlen(address);
    if (len >= sizeof(out->address)) {
        listen_error(err, errlen, "address", "too long");
        return -EINVAL;
    }

    if (address[0] == '[') {
        const char *close = strchr(address, ']');
        if (close == NULL || close[1] != ':') {
            listen_error(err, errlen, address, "expected [ipv6]:port");
            return -EINVAL;
        }
        host = address + 1;
        hostlen = (size_t)(close - host);
        port = close + 2;
        /* Brackets are for IPv6 only: "[127.0.0.1]:80" is a typo. */
        if (memchr(host, ':', hostlen) == NULL) {
            listen_error(err, errlen, address, "host must be an IPv6 address inside brackets");
            return -EINVAL;
        }
    } else {
        colon = strrchr(address, ':');
        if (colon == NULL) {
            /* A bare port listens on every IPv4 address, as in nginx. */
            host = "0.0.0.0";
            hostlen = strlen(host);
            port = address;
        } else {
            if (memchr(address, ':', (size_t)(colon - address)) != NULL) {
                listen_error(err, errlen, address, "IPv6 addresses need brackets: [::1]:8080");
                return -EINVAL;
            }
            host = address;
            hostlen = (size_t)(colon - address);
            port = colon + 1;
        }
    }

    p = listen_parse_port(port, strlen(port));
    if (p < 0) {
        listen_error(err, errlen, address, "port must be a number 0..65535");
        return -EINVAL;
    }
    if (hostlen == 0 || (hostlen == 1 && host[0] == '*')) {
        host = "0.0.0.0";
        hostlen = strlen(host);
    }
    if (hostlen >= sizeof(out->host)) {
        listen_error(err, errlen, address, "host too long");
        return -EINVAL;
    }

    memcpy(out->address, address, len + 1);
    memcpy(out->host, host, hostlen);
    out->host[hostlen] = '\0';
    out->port = p;
    out->tls = 0;
    /* Refuse host names here, not at bind time, so a bad flag fails early. */
    return mg_listen_sockaddr(out, &ss, &sslen, err, errlen);
}

static int listen_socket(const mg_listen_conf_t *l, int reuseport, int do_listen, char *err,
                         size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int fd, on = 1, r;

    r = mg_listen_sockaddr(l, &ss, &sslen, err, errlen);
    if (r < 0) return r;

    /* No SOCK_CLOEXEC: workers get these sockets through fork, and a
     * respawned worker must still find its predecessor's socket open. */
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) goto fail;
    /* Lets a restart bind while old connections sit in TIME_WAIT. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) < 0) goto fail;
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) < 0) goto fail;
    /* "[::]:8080" and "0.0.0.0:8080" are two listeners, as in nginx. */
    if (ss.ss_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on)) < 0)
        goto fail;
    if (bind(fd, (struct sockaddr *)&ss, sslen) < 0) goto fail;
    if (do_listen && listen(fd, MG_LISTEN_BACKLOG) < 0) goto fail;
    return fd;

fail:
    r = errno;
    if (fd >= 0) close(fd);
    listen_errno(err, errlen, l, r);
    return -r;
}

int mg_listen_open(const mg_listen_conf_t *l, int reuseport, char *err, size_t errlen)
{
    return listen_socket(l, reuseport, 1, err, errlen);
}

int mg_listen_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) return -errno;
    if (ss.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -EAFNOSUPPORT;
}

int mg_listen_open_set(const mg_listen_conf_t *l, int n, int *fds, char *err, size_t errlen)
{
    mg_listen_conf_t at = *l;
    int i, r;

    if (n < 1) {
        listen_errno(err, errlen, l, EINVAL);
        return -EINVAL;
    }
    /* The probe: without SO_REUSEPORT this bind fails when anyone holds the
     * address, even another SO_REUSEPORT process of the same user, which
     * would otherwise silently share our port. Port 0 needs no probe. */
    if (l->port != 0) {
        r = listen_socket(l, 0, 0, err, errlen);
        if (r < 0) return r;
        close(r);
    }
    for (i = 0; i < n; i++) {
        r = listen_socket(&at, 1, 1, err, errlen);
        if (r < 0) goto fail;
        fds[i] = r;
        if (i == 0 && at.port == 0) {
            r = mg_listen_port(fds[0]);
            if (r < 0) {
                listen_errno(err, errlen, l, -r);
                i = 1;
                goto fail;
            }
            at.port = r;
        }
    }
    return 0;

fail:
    while (i-- > 0)
        close(fds[i]);
    return r;
}
