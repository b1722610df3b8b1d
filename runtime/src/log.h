/* log.h: the error log (stderr, or the daemon's log file). */
#ifndef MG_LOG_H
#define MG_LOG_H

enum { MG_LOG_DEBUG = 0, MG_LOG_INFO, MG_LOG_WARN, MG_LOG_ERROR };

extern int mg_log_level;

/* One line: "2026/11/28 12:00:00 [error] 1234#w0: message". Never allocates. */
void mg_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Tag for this process in log lines: "master", "w0", "w1", "mock". */
void mg_log_set_role(const char *role);
int mg_log_level_parse(const char *name); /* -1 when unknown */

#define mg_log_debug(...)                                                                          \
    do {                                                                                           \
        if (mg_log_level <= MG_LOG_DEBUG) mg_log(MG_LOG_DEBUG, __VA_ARGS__);                       \
    } while (0)

#endif
