/* sysutil.h: what the C tests that run real servers (etcd, openssl
 * s_server) share: a shell command and a free loopback port. */
#ifndef MG_TEST_SYSUTIL_H
#define MG_TEST_SYSUTIL_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

/* system() of a printf-formatted command (up to 4 KiB) */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2), unused));
static int sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd);
}

/* A loopback port nothing listens on now (the kernel's pick; a race with
 * other processes is possible, as for every such helper). */
static int free_port(void) __attribute__((unused));
static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t n = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, (struct sockaddr *)&a, sizeof(a));
    getsockname(fd, (struct sockaddr *)&a, &n);
    port = ntohs(a.sin_port);
    close(fd);
    return port;
}

#endif
