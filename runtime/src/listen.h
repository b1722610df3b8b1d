/* listen.h: listening sockets for the proxy, status and mock listeners.
 *
 * Addresses are "host:port" with host an IPv4 literal, an IPv6 literal in
 * brackets ("[::1]:8080"), "localhost" (127.0.0.1), "*" or empty (0.0.0.0);
 * a bare port ("8080") means 0.0.0.0 like nginx. Host names are refused: a
 * listener must not depend on DNS at start.
 *
 * All functions return 0 (or an fd) on success and a negative errno on
 * failure, with a one-line reason in err: "listen 127.0.0.1:8080: address
 * already in use".
 */
#ifndef MG_LISTEN_H
#define MG_LISTEN_H

#include <stddef.h>
#include <sys/socket.h>

#include "node.h"

#define MG_LISTEN_BACKLOG 511 /* nginx's default; the kernel caps it at somaxconn */

/* Parses "host:port" into out->address, out->host (without brackets) and
 * out->port; out->tls is set to 0. Port 0 is accepted (the kernel picks one). */
int mg_listen_parse(const char *address, mg_listen_conf_t *out, char *err, size_t errlen);

/* Turns l->host/l->port into a socket address (no DNS). */
int mg_listen_sockaddr(const mg_listen_conf_t *l, struct sockaddr_storage *ss, socklen_t *sslen,
                       char *err, size_t errlen);

/* Opens one bound, listening, non-blocking socket; SO_REUSEADDR always,
 * SO_REUSEPORT when reuseport is nonzero. The fd is NOT close-on-exec:
 * workers inherit it through fork. Returns the fd. */
int mg_listen_open(const mg_listen_conf_t *l, int reuseport, char *err, size_t errlen);

/* Opens n SO_REUSEPORT sockets on one address (one per worker, so each
 * worker has its own accept queue), into fds[0..n-1]. First binds a probe
 * socket without SO_REUSEPORT, so an address that another process holds
 * fails with "address already in use" instead of being shared with it.
 * With port 0 every socket gets the port the kernel gave the first one.
 * On failure nothing stays open. */
int mg_listen_open_set(const mg_listen_conf_t *l, int n, int *fds, char *err, size_t errlen);

/* "host:port" from l->host and l->port, IPv6 in brackets ("[::1]:8080"):
 * the address actually bound, for logs (port 0 resolved by the caller). */
void mg_listen_format(const mg_listen_conf_t *l, char *buf, size_t len);

/* The port a socket is bound to (for port 0 listeners); negative errno. */
int mg_listen_port(int fd);

#endif
