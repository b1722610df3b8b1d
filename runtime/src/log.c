/* log.c: the error log.
 *
 * Every line is formatted on the stack and handed to one write(2) on fd 2,
 * so lines from the master and the workers (which share the fd) never
 * interleave as long as a line stays under PIPE_BUF (4096 on Linux); the
 * buffer is sized to that. Nothing here allocates, so logging is safe on an
 * out-of-memory path. A line longer than the buffer is cut and ends in "..."
 * so the cut is visible.
 */
#include "log.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef PIPE_BUF
#define PIPE_BUF 4096
#endif

int mg_log_level = MG_LOG_INFO;

/* "master", "w0".."w255", "mock": short by construction. */
static char log_role[16] = "master";

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void mg_log_set_role(const char *role)
{
    snprintf(log_role, sizeof(log_role), "%s", role);
}

int mg_log_level_parse(const char *name)
{
    int i;

    if (name == NULL) return -1;
    for (i = 0; i < (int)(sizeof(level_names) / sizeof(level_names[0])); i++) {
        if (strcmp(name, level_names[i]) == 0) return i;
    }
    return -1;
}

static void log_write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return; /* nowhere left to report a failing error log */
        }
        p += w;
        n -= (size_t)w;
    }
}

void mg_log(int level, const char *fmt, ...)
{
    char line[PIPE_BUF];
    const size_t cap = sizeof(line) - 1; /* keep room for the '\n' */
    size_t n;
    int r, saved_errno = errno; /* callers log and then read errno */
    struct tm tm;
    time_t now;
    va_list ap;

    if (level < mg_log_level) return;
    if (level < MG_LOG_DEBUG || level > MG_LOG_ERROR) level = MG_LOG_ERROR;

    now = time(NULL);
    localtime_r(&now, &tm);
    r = snprintf(line, cap, "%04d/%02d/%02d %02d:%02d:%02d [%s] %ld#%s: ", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, level_names[level],
                 (long)getpid(), log_role);
    n = r < 0 ? 0 : (size_t)r;
    if (n > cap) n = cap;

    va_start(ap, fmt);
    r = vsnprintf(line + n, cap - n, fmt, ap);
    va_end(ap);
    if (r > 0) {
        if ((size_t)r >= cap - n) {
            n = cap - 1; /* vsnprintf wrote cap - n - 1 chars and a NUL */
            memcpy(line + n - 3, "...", 3);
        } else {
            n += (size_t)r;
        }
    }
    /* Messages built from errors of other programs may carry newlines; one
     * event stays one line so `grep` and log shippers see it whole. */
    for (size_t i = 0; i < n; i++) {
        if (line[i] == '\n' || line[i] == '\r') line[i] = ' ';
    }
    line[n++] = '\n';
    log_write_all(line, n);
    errno = saved_errno;
}
