/* master.c: the master process.
 *
 * Phases of mg_master_run:
 *   1. refuse to start when the pid file names a live moongate;
 *   2. open every listener: conf->workers SO_REUSEPORT sockets per address;
 *   3. daemonize (-d), so port errors above still reached the terminal;
 *   4. write the pid file;
 *   5. fork the workers and supervise them in a libuv loop until a stop
 *      signal, then wait for them (bounded) and remove the pid file.
 *
 * Each worker has its own socket per address, hence its own accept queue.
 * The master keeps every socket open, so a worker that dies leaves its
 * queued connections in a socket that its replacement takes over.
 *
 * The master is one per process: its state is file-static, like nginx's.
 */
#include "master.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "listen.h"
#include "log.h"
#include "shm.h"
#include "worker.h"

#define MASTER_STORM_RESPAWNS 10     /* respawns of one worker ...          */
#define MASTER_STORM_WINDOW_MS 10000 /* ... within this window, then ...    */
#define MASTER_STORM_DELAY_MS 1000   /* ... wait this long before the next  */
#define MASTER_FAST_STOP_MS 5000     /* SIGTERM: then SIGKILL what is left  */
#define MASTER_GRACE_EXTRA_MS 1000   /* SIGQUIT: shutdown_timeout_ms + this */

enum { STOP_NONE = 0, STOP_GRACEFUL, STOP_FAST };

typedef struct {
    int id;
    pid_t pid;                                 /* 0 while not running */
    uint64_t respawned[MASTER_STORM_RESPAWNS]; /* ring of respawn times, ms */
    int nrespawned;                            /* total, for the ring index */
    uv_timer_t respawn_timer;                  /* a delayed respawn */
} master_worker_t;

static const int master_signums[] = {SIGCHLD, SIGHUP, SIGQUIT, SIGTERM, SIGINT};
#define MASTER_NSIG ((int)(sizeof(master_signums) / sizeof(master_signums[0])))

static struct {
    mg_node_conf_t *conf;
    uv_loop_t loop;
    uv_signal_t signals[MASTER_NSIG];
    uv_timer_t stop_timer;
    uv_timer_t reload_timer; /* a SIGHUP too soon after the last check waits for it */
    uint64_t reload_done_ms;
    int reload_armed;
    master_worker_t *workers;
    int *fds;      /* workers x nlisten; worker i owns fds[i * nlisten ...] */
    int nfds;      /* how many of fds are open */
    int stopping;  /* STOP_* */
    int notify_fd; /* -d: the pipe to the waiting start command, else -1 */
    pid_t pid;     /* the master's own pid, after daemonizing */
    int pid_written;
    int finished; /* master_finish ran: the handles are closing */
} M;

static int master_spawn(master_worker_t *w);
static void master_close_listeners(void);

/* --- pid file ------------------------------------------------------------- */

/* The state letter of /proc/<pid>/stat ("1234 (moongate) S ..."): the
 * comm may hold spaces and parentheses, so it is found after the last ')'. */
static char master_proc_state(pid_t pid)
{
    char path[64], buf[512], *p;
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return '?';
    do {
        n = read(fd, buf, sizeof(buf) - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0) return '?';
    buf[n] = '\0';
    p = strrchr(buf, ')');
    return (p != NULL && p[1] == ' ') ? p[2] : '?';
}

/* Is pid a moongate? The same executable as ours, or a process whose name
 * starts with "moongate". Without /proc (or without the right to look) we
 * cannot tell, and answer yes: refusing to start beats two masters. */
static int master_is_moongate(pid_t pid)
{
    char path[64], exe[4096], self[4096], comm[64];
    ssize_t n, m;
    int fd;

    snprintf(path, sizeof(path), "/proc/%ld/exe", (long)pid);
    n = readlink(path, exe, sizeof(exe) - 1);
    m = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0 && m > 0 && n == m && memcmp(exe, self, (size_t)n) == 0) return 1;

    snprintf(path, sizeof(path), "/proc/%ld/comm", (long)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : 1;
    do {
        n = read(fd, comm, sizeof(comm) - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0) return 1;
    comm[n] = '\0';
    return strncmp(comm, "moongate", 8) == 0;
}

int mg_master_alive(pid_t pid)
{
    char state;

    if (pid <= 0) return 0;
    if (kill(pid, 0) < 0 && errno != EPERM) return 0;
    /* A stopped master that its parent has not reaped yet is a zombie:
     * kill(pid, 0) still succeeds, but it is gone. */
    state = master_proc_state(pid);
    if (state == 'Z' || state == 'X') return 0;
    return master_is_moongate(pid);
}

static pid_t master_pid_read(const char *pid_file)
{
    char buf[32], *end;
    ssize_t n;
    long v;
    int fd;

    fd = open(pid_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -errno;
    do {
        n = read(fd, buf, sizeof(buf) - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n < 0) return -errno;
    buf[n] = '\0';
    errno = 0;
    v = strtol(buf, &end, 10);
    if (errno != 0 || end == buf || v <= 0 || v > 0x3fffffff) return 0; /* garbage: stale */
    return (pid_t)v;
}

pid_t mg_master_pid(const char *pid_file)
{
    pid_t pid = master_pid_read(pid_file);

    if (pid <= 0) return pid;
    /* A pid file left by a crash can name our own recycled pid. */
    if (pid == getpid()) return 0;
    return mg_master_alive(pid) ? pid : 0;
}

/* Written to a temporary file and renamed, so a reader never sees half. */
static int master_pid_write(const char *pid_file, pid_t pid)
{
    char tmp[MG_PATH_MAX + 16], buf[32];
    int fd, len, r = 0;
    ssize_t n;

    if (strlen(pid_file) + sizeof(".tmp") > sizeof(tmp)) return -ENAMETOOLONG;
    snprintf(tmp, sizeof(tmp), "%s.tmp", pid_file);
    len = snprintf(buf, sizeof(buf), "%ld\n", (long)pid);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -errno;
    do {
        n = write(fd, buf, (size_t)len);
    } while (n < 0 && errno == EINTR);
    if (n != len) r = n < 0 ? -errno : -EIO;
    if (close(fd) < 0 && r == 0) r = -errno;
    if (r == 0 && rename(tmp, pid_file) < 0) r = -errno;
    if (r < 0) unlink(tmp);
    return r;
}

/* Only our own pid file: a newer master may have replaced it. */
static void master_pid_remove(void)
{
    if (!M.pid_written) return;
    if (master_pid_read(M.conf->pid_file) == M.pid) unlink(M.conf->pid_file);
    M.pid_written = 0;
}

/* --- the config snapshot ------------------------------------------------------ */

mg_node_snapshot_t mg__node_snapshot;

/* The whole file in a new NUL-terminated buffer; 0 or a negative errno. */
static int master_read_file(const char *path, char **out, size_t *outlen)
{
    char *buf = NULL, *grown;
    size_t len = 0, cap = 0;
    ssize_t n;
    int fd, e;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    for (;;) {
        if (len + 1 >= cap) {
            cap = cap ? cap * 2 : 16384;
            grown = realloc(buf, cap);
            if (grown == NULL) {
                e = -ENOMEM;
                goto fail;
            }
            buf = grown;
        }
        n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            e = -errno;
            goto fail;
        }
        if (n == 0) break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
fail:
    close(fd);
    free(buf);
    return e;
}

/* Takes the text of conf's files as the snapshot workers start from (see
 * node.h). Called right after they passed validation; on a read error the
 * previous snapshot stays. */
static void master_snapshot(const mg_node_conf_t *conf)
{
    mg_node_snapshot_t s = {0};
    int r;

    r = master_read_file(conf->conf_path, &s.node, &s.node_len);
    if (r == 0 && conf->routes_path[0] != '\0')
        r = master_read_file(conf->routes_path, &s.routes, &s.routes_len);
    if (r < 0) {
        mg_log(MG_LOG_WARN, "config snapshot: %s; new workers keep the previous one", strerror(-r));
        free(s.node);
        free(s.routes);
        return;
    }
    free(mg__node_snapshot.node);
    free(mg__node_snapshot.routes);
    mg__node_snapshot = s;
}

/* --- start-up errors -------------------------------------------------------- */

/* Logs a start-up failure; with -d also sends it to the waiting command,
 * whose terminal the log no longer reaches. */
static void master_fail(const char *msg)
{
    mg_log(MG_LOG_ERROR, "%s", msg);
    if (M.notify_fd >= 0) {
        ssize_t n;
        do {
            n = write(M.notify_fd, msg, strlen(msg));
        } while (n < 0 && errno == EINTR);
        close(M.notify_fd);
        M.notify_fd = -1;
    }
}

static void master_notify_ok(void)
{
    ssize_t n;

    if (M.notify_fd < 0) return;
    do {
        n = write(M.notify_fd, "ok", 2);
    } while (n < 0 && errno == EINTR);
    close(M.notify_fd);
    M.notify_fd = -1;
}

/* --- daemonizing ---------------------------------------------------------- */

/* The calling process waits for the daemon's word on a pipe: "ok" once the
 * pid file is written (so `moongate stop` right after `start -d` works),
 * else an error to print. It never returns; the daemon does, with 0. */
static int master_daemonize(void)
{
    char logpath[MG_PATH_MAX + 16], buf[MG_PATH_MAX + 256];
    int pfd[2], fd;
    pid_t pid;

    if (strlen(M.conf->prefix) + sizeof("/moongate.log") > sizeof(logpath)) {
        master_fail("daemonize: prefix too long for the log path");
        return -ENAMETOOLONG;
    }
    snprintf(logpath, sizeof(logpath), "%s/moongate.log", M.conf->prefix);
    if (pipe(pfd) < 0) {
        int e = errno;
        mg_log(MG_LOG_ERROR, "daemonize: pipe: %s", strerror(e));
        return -e;
    }
    fflush(NULL); /* else buffered output would be written twice */
    pid = fork();
    if (pid < 0) {
        int e = errno;
        mg_log(MG_LOG_ERROR, "daemonize: fork: %s", strerror(e));
        close(pfd[0]);
        close(pfd[1]);
        return -e;
    }
    if (pid > 0) {
        size_t got = 0;
        close(pfd[1]);
        for (;;) {
            ssize_t n = read(pfd[0], buf + got, sizeof(buf) - 1 - got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += (size_t)n;
            if (got == sizeof(buf) - 1) break;
        }
        buf[got] = '\0';
        waitpid(pid, NULL, 0); /* the intermediate child, gone at once */
        if (got == 2 && memcmp(buf, "ok", 2) == 0) _exit(0);
        if (got == 0) {
            fprintf(stderr, "moongate: the daemon exited during start-up; see %s\n", logpath);
        } else {
            fprintf(stderr, "moongate: %s\n", buf);
        }
        _exit(1);
    }

    close(pfd[0]);
    M.notify_fd = pfd[1];
    /* A new session without a controlling terminal; the second fork makes
     * sure the daemon can never acquire one again. */
    if (setsid() < 0) {
        master_fail("daemonize: setsid failed");
        _exit(1);
    }
    pid = fork();
    if (pid < 0) {
        master_fail("daemonize: fork failed");
        _exit(1);
    }
    if (pid > 0) _exit(0);

    fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0 || dup2(fd, STDIN_FILENO) < 0 || dup2(fd, STDOUT_FILENO) < 0) {
        master_fail("daemonize: cannot open /dev/null");
        _exit(1);
    }
    close(fd);
    fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(buf, sizeof(buf), "cannot open %s: %s", logpath, strerror(errno));
        master_fail(buf);
        _exit(1);
    }
    dup2(fd, STDERR_FILENO);
    close(fd);
    return 0;
}

/* --- workers -------------------------------------------------------------- */

static int master_running(void)
{
    int i, n = 0;

    for (i = 0; i < M.conf->workers; i++)
        n += M.workers[i].pid > 0;
    return n;
}

static void master_signal_workers(int signum)
{
    int i;

    for (i = 0; i < M.conf->workers; i++) {
        if (M.workers[i].pid > 0) kill(M.workers[i].pid, signum);
    }
}

static void master_child_quit(int signum)
{
    (void)signum;
    _exit(0);
}

/* In the child, before it becomes a worker. Signals are blocked on entry
 * (see master_spawn), so nothing lands in the master's handlers here. */
static void master_child(master_worker_t *w, const sigset_t *oldmask)
{
    const mg_node_conf_t *conf = M.conf;
    int i, rc, per = conf->nlisten;
    char role[16];

    assert(w->id >= 0 && w->id < conf->workers); /* else it would take another's sockets */

    /* The master's uv_signal handles live in libuv's process-wide list and
     * would write this process's signals into the master's signal pipe
     * (shared through fork): a SIGQUIT to one worker would stop the whole
     * node. Stopping them restores the default dispositions. */
    for (i = 0; i < MASTER_NSIG; i++)
        uv_signal_stop(&M.signals[i]);
    close(uv_backend_fd(&M.loop)); /* the master's epoll set is not ours */
    /* Until the worker installs its own handlers, a reload must not kill
     * it and a stop must not dump core (SIGQUIT's default): it has nothing
     * in flight yet, so stopping means exiting. */
    signal(SIGHUP, SIG_IGN);
    signal(SIGQUIT, master_child_quit);

    snprintf(role, sizeof(role), "w%d", w->id);
    mg_log_set_role(role);
    /* A worker whose master dies stops gracefully instead of serving on,
     * unsupervised. The master may already be gone: check after arming. */
    if (prctl(PR_SET_PDEATHSIG, SIGQUIT) < 0 || getppid() != M.pid) _exit(1);

    for (i = 0; i < conf->workers * per; i++) {
        if (i / per != w->id) close(M.fds[i]);
    }
    sigprocmask(SIG_SETMASK, oldmask, NULL);
    rc = mg_worker_main(conf, w->id, M.fds + w->id * per, per);
    fflush(NULL);
    _exit(rc);
}

static int master_spawn(master_worker_t *w)
{
    sigset_t all, old;
    pid_t pid;

    /* Blocked across fork so that no signal reaches the child while it
     * still runs the master's handlers (see master_child). */
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    fflush(NULL);
    pid = fork();
    if (pid == 0) master_child(w, &old); /* never returns */
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        int e = errno;
        mg_log(MG_LOG_ERROR, "worker %d: fork: %s; retrying in 1 s", w->id, strerror(e));
        return -e;
    }
    w->pid = pid;
    mg_log_debug("worker %d started (pid %ld)", w->id, (long)pid);
    return 0;
}

static void master_respawn_cb(uv_timer_t *t)
{
    master_worker_t *w = t->data;

    if (M.stopping || w->pid > 0) return;
    if (master_spawn(w) < 0) uv_timer_start(&w->respawn_timer, master_respawn_cb, 1000, 0);
}

/* Respawn at once, unless this worker already died MASTER_STORM_RESPAWNS
 * times within MASTER_STORM_WINDOW_MS: then wait MASTER_STORM_DELAY_MS, so a
 * worker that cannot start costs one fork a second, not a busy loop. */
static void master_respawn(master_worker_t *w)
{
    uint64_t now = uv_hrtime() / 1000000;
    uint64_t oldest = w->respawned[w->nrespawned % MASTER_STORM_RESPAWNS];
    int storm = w->nrespawned >= MASTER_STORM_RESPAWNS && now - oldest < MASTER_STORM_WINDOW_MS;

    w->respawned[w->nrespawned % MASTER_STORM_RESPAWNS] = now;
    w->nrespawned++;
    if (storm) {
        mg_log(MG_LOG_WARN, "worker %d: %d respawns within %d s; next one in %d ms", w->id,
               MASTER_STORM_RESPAWNS, MASTER_STORM_WINDOW_MS / 1000, MASTER_STORM_DELAY_MS);
        uv_timer_start(&w->respawn_timer, master_respawn_cb, MASTER_STORM_DELAY_MS, 0);
        return;
    }
    if (master_spawn(w) < 0) uv_timer_start(&w->respawn_timer, master_respawn_cb, 1000, 0);
}

static void master_close_cb(uv_handle_t *h)
{
    (void)h;
}

/* Everything stopped: let uv_run return. */
static void master_finish(void)
{
    int i;

    if (M.finished) return;
    M.finished = 1;
    for (i = 0; i < MASTER_NSIG; i++)
        uv_close((uv_handle_t *)&M.signals[i], master_close_cb);
    uv_close((uv_handle_t *)&M.stop_timer, master_close_cb);
    uv_close((uv_handle_t *)&M.reload_timer, master_close_cb);
    for (i = 0; i < M.conf->workers; i++)
        uv_close((uv_handle_t *)&M.workers[i].respawn_timer, master_close_cb);
}

static void master_reap(void)
{
    int status, i;
    pid_t pid;

    for (;;) {
        pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR) continue;
        if (pid <= 0) break;
        for (i = 0; i < M.conf->workers; i++) {
            master_worker_t *w = &M.workers[i];
            if (w->pid != pid) continue;
            w->pid = 0;
            if (M.stopping) {
                if (WIFSIGNALED(status)) {
                    mg_log(MG_LOG_INFO, "worker %d (pid %ld) exited on signal %d", w->id, (long)pid,
                           WTERMSIG(status));
                } else {
                    mg_log_debug("worker %d (pid %ld) exited with code %d", w->id, (long)pid,
                                 WEXITSTATUS(status));
                }
                break;
            }
            if (WIFSIGNALED(status)) {
                mg_log(MG_LOG_ERROR, "worker %d (pid %ld) exited on signal %d%s; respawning", w->id,
                       (long)pid, WTERMSIG(status), WCOREDUMP(status) ? " (core dumped)" : "");
            } else {
                mg_log(MG_LOG_ERROR, "worker %d (pid %ld) exited with code %d; respawning", w->id,
                       (long)pid, WEXITSTATUS(status));
            }
            master_respawn(w);
            break;
        }
    }
    if (M.stopping && master_running() == 0) master_finish();
}

/* --- stopping ------------------------------------------------------------- */

static void master_stop_timeout_cb(uv_timer_t *t)
{
    (void)t;
    mg_log(MG_LOG_WARN, "%d worker(s) still running after the stop timeout; killing them",
           master_running());
    master_signal_workers(SIGKILL);
}

static void master_stop(int how)
{
    uint64_t bound;
    int i;

    if (how <= M.stopping) return; /* a fast stop may cut a graceful one short */
    M.stopping = how;
    for (i = 0; i < M.conf->workers; i++)
        uv_timer_stop(&M.workers[i].respawn_timer);
    if (how == STOP_GRACEFUL) {
        bound = (uint64_t)M.conf->shutdown_timeout_ms + MASTER_GRACE_EXTRA_MS;
        mg_log(MG_LOG_INFO, "graceful stop: draining %d worker(s), at most %llu ms",
               master_running(), (unsigned long long)bound);
        master_signal_workers(SIGQUIT);
    } else {
        bound = MASTER_FAST_STOP_MS;
        mg_log(MG_LOG_INFO, "fast stop: %d worker(s)", master_running());
        master_signal_workers(SIGTERM);
    }
    /* Our copies of the listening sockets would keep them open after the
     * workers close theirs: new clients would queue unanswered until the
     * drain ends. Closed, they are refused at once (nginx does the same). */
    master_close_listeners();
    uv_timer_start(&M.stop_timer, master_stop_timeout_cb, bound, 0);
    if (master_running() == 0) master_finish();
}

/* --- reload --------------------------------------------------------------- */

static void master_log_error(void *ud, const char *msg)
{
    (void)ud;
    mg_log(MG_LOG_ERROR, "reload: %s", msg);
}

static int master_same_listener(const mg_listen_conf_t *a, const mg_listen_conf_t *b)
{
    return strcmp(a->host, b->host) == 0 && a->port == b->port && a->tls == b->tls;
}

/* Names the node settings that differ: they belong to the master and the
 * running workers, and change only on restart. */
static void master_changed(const mg_node_conf_t *a, const mg_node_conf_t *b, char *out, size_t len)
{
    int i, same = a->nlisten == b->nlisten;
    size_t n = 0;

    for (i = 0; same && i < a->nlisten; i++)
        same = master_same_listener(&a->listen[i], &b->listen[i]);
    out[0] = '\0';
#define CHANGED(cond, name)                                                                        \
    do {                                                                                           \
        if ((cond) && n < len)                                                                     \
            n += (size_t)snprintf(out + n, len - n, "%s%s", n ? ", " : "", name);                  \
    } while (0)
    CHANGED(!same, "listen");
    CHANGED(a->workers != b->workers, "workers");
    CHANGED(!master_same_listener(&a->status, &b->status), "status.listen");
    CHANGED(memcmp(&a->limits, &b->limits, sizeof(a->limits)) != 0, "limits");
    CHANGED(a->log_level != b->log_level || strcmp(a->access_log, b->access_log) != 0, "log");
    CHANGED(strcmp(a->pid_file, b->pid_file) != 0, "pid_file");
    CHANGED(a->shutdown_timeout_ms != b->shutdown_timeout_ms, "shutdown_timeout_ms");
    /* zones are mapped once, before the workers fork */
    CHANGED(a->nshm != b->nshm || memcmp(a->shm, b->shm, sizeof(a->shm[0]) * (size_t)a->nshm) != 0,
            "shm");
    CHANGED(memcmp(&a->redis, &b->redis, sizeof(a->redis)) != 0, "redis");
#undef CHANGED
}

static void master_reload(void)
{
    mg_node_conf_t *next;
    char changed[256];
    int nerr;

    mg_log(MG_LOG_INFO, "reload: checking %s", M.conf->conf_path);
    next = malloc(sizeof(*next)); /* ~60 KiB: not for the stack */
    if (next == NULL) {
        mg_log(MG_LOG_ERROR, "reload: out of memory");
        return;
    }
    nerr = mg_node_reload_check(M.conf->conf_path, next, master_log_error, NULL);
    if (nerr > 0) {
        mg_log(MG_LOG_ERROR, "reload: %d error(s); the running configuration stays", nerr);
        free(next);
        return;
    }
    master_changed(M.conf, next, changed, sizeof(changed));
    if (changed[0] != '\0')
        mg_log(MG_LOG_WARN, "reload: changes to %s need a restart (moongate stop, then start)",
               changed);
    master_snapshot(next);
    free(next);
    master_signal_workers(SIGHUP);
    mg_log(MG_LOG_INFO, "reload: signalled %d worker(s)", master_running());
}

/* A check costs tens of ms of CPU at thousands of routes, and a config
 * pushed many times a second needs only its latest version applied: after
 * a check, further SIGHUPs within RELOAD_GAP_MS are folded into one, run
 * when the gap has passed. A lone SIGHUP is handled at once. */
#define RELOAD_GAP_MS 100

static void master_reload_now(void)
{
    master_reload();
    uv_update_time(&M.loop);
    M.reload_done_ms = uv_now(&M.loop);
}

static void master_reload_timer_cb(uv_timer_t *t)
{
    (void)t;
    M.reload_armed = 0;
    if (!M.stopping) master_reload_now();
}

static void master_sighup(void)
{
    uv_update_time(&M.loop);
    uint64_t now = uv_now(&M.loop);
    if (M.reload_done_ms == 0 || now - M.reload_done_ms >= RELOAD_GAP_MS) {
        master_reload_now();
        return;
    }
    if (!M.reload_armed) {
        M.reload_armed = 1;
        uv_timer_start(&M.reload_timer, master_reload_timer_cb,
                       M.reload_done_ms + RELOAD_GAP_MS - now, 0);
    }
}

/* --- the loop --------------------------------------------------------------- */

static void master_signal_cb(uv_signal_t *h, int signum)
{
    (void)h;
    switch (signum) {
    case SIGCHLD: master_reap(); break;
    case SIGHUP:
        if (!M.stopping) master_sighup();
        break;
    case SIGQUIT: master_stop(STOP_GRACEFUL); break;
    default: /* SIGTERM, SIGINT */ master_stop(STOP_FAST); break;
    }
}

static int master_open_listeners(void)
{
    mg_node_conf_t *conf = M.conf;
    char err[512];
    int i, j, *set;

    M.fds = calloc((size_t)conf->workers * (size_t)conf->nlisten, sizeof(int));
    set = calloc((size_t)conf->workers, sizeof(int));
    if (M.fds == NULL || set == NULL) {
        free(set);
        mg_log(MG_LOG_ERROR, "out of memory");
        return -ENOMEM;
    }
    for (j = 0; j < conf->nlisten; j++) {
        int r = mg_listen_open_set(&conf->listen[j], conf->workers, set, err, sizeof(err));
        if (r < 0) {
            mg_log(MG_LOG_ERROR, "%s", err);
            free(set);
            return r;
        }
        for (i = 0; i < conf->workers; i++)
            M.fds[i * conf->nlisten + j] = set[i];
        M.nfds += conf->workers;
        /* Port 0 got a real port: the workers and the log must know it. */
        if (conf->listen[j].port == 0) conf->listen[j].port = mg_listen_port(set[0]);
        mg_listen_format(&conf->listen[j], err, sizeof(err));
        mg_log(MG_LOG_INFO, "listening on %s (%d socket(s))", err, conf->workers);
    }
    free(set);
    return 0;
}

static void master_close_listeners(void)
{
    int i, j, per = M.conf->nlisten;

    /* Filled column by column: listener j of every worker, then j + 1. */
    for (j = 0; j < per && j * M.conf->workers < M.nfds; j++) {
        for (i = 0; i < M.conf->workers; i++)
            close(M.fds[i * per + j]);
    }
    free(M.fds);
    M.fds = NULL;
    M.nfds = 0;
}

int mg_master_run(mg_node_conf_t *conf, int daemonize)
{
    char msg[MG_PATH_MAX + 64];
    int i, r, rc = 1;
    pid_t other;

    /* mg_node_load resolves "auto", clamps, and refuses a node without
     * listeners: anything else here is a caller that skipped it. */
    assert(conf->workers >= 1 && conf->workers <= 256);
    assert(conf->nlisten >= 1 && conf->nlisten <= MG_MAX_LISTEN);

    memset(&M, 0, sizeof(M));
    M.conf = conf;
    M.notify_fd = -1;
    mg_log_set_role("master");
    /* Writes to a closed pipe (the waiting start command, a log reader)
     * must fail with EPIPE, not kill the master. Workers inherit this. */
    signal(SIGPIPE, SIG_IGN);

    other = mg_master_pid(conf->pid_file);
    if (other > 0) {
        mg_log(MG_LOG_ERROR, "already running (pid %ld, pid file %s)", (long)other, conf->pid_file);
        return 1;
    }
    if (other < 0) {
        mg_log(MG_LOG_ERROR, "pid file %s: %s", conf->pid_file, strerror(-other));
        return 1;
    }

    /* Shared-memory zones: mapped here, inherited by every worker (and
     * every respawned one) through fork. Before the listeners and the pid
     * file: writing their set headers takes some ms at 16 MiB, and until
     * the loop's signal handlers are installed a stop signal would kill
     * the master, so that window stays as short as it was. */
    if (mg__shm_create(conf) < 0) {
        mg_log(MG_LOG_ERROR, "cannot create the shared-memory zones (shm)");
        goto out;
    }
    if (master_open_listeners() < 0) goto out;
    if (daemonize && master_daemonize() < 0) goto out;
    M.pid = getpid();

    r = master_pid_write(conf->pid_file, M.pid);
    if (r < 0) {
        snprintf(msg, sizeof(msg), "pid file %s: %s", conf->pid_file, strerror(-r));
        master_fail(msg);
        goto out;
    }
    M.pid_written = 1;

    master_snapshot(conf);
    M.workers = calloc((size_t)conf->workers, sizeof(*M.workers));
    if (M.workers == NULL || uv_loop_init(&M.loop) != 0) {
        master_fail("cannot set up the master loop");
        goto out;
    }
    uv_timer_init(&M.loop, &M.stop_timer);
    uv_timer_init(&M.loop, &M.reload_timer);
    for (i = 0; i < conf->workers; i++) {
        M.workers[i].id = i;
        uv_timer_init(&M.loop, &M.workers[i].respawn_timer);
        M.workers[i].respawn_timer.data = &M.workers[i];
    }
    for (i = 0; i < MASTER_NSIG; i++) {
        uv_signal_init(&M.loop, &M.signals[i]);
        uv_signal_start(&M.signals[i], master_signal_cb, master_signums[i]);
    }
    master_notify_ok();
    mg_log(MG_LOG_INFO, "moongate started: %d worker(s), pid file %s", conf->workers,
           conf->pid_file);

    for (i = 0; i < conf->workers; i++) {
        if (master_spawn(&M.workers[i]) < 0)
            uv_timer_start(&M.workers[i].respawn_timer, master_respawn_cb, 1000, 0);
    }

    uv_run(&M.loop, UV_RUN_DEFAULT);
    uv_loop_close(&M.loop);
    mg_log(MG_LOG_INFO, "moongate stopped");
    rc = 0;

out:
    master_pid_remove();
    if (M.fds != NULL) master_close_listeners();
    free(M.workers);
    M.workers = NULL;
    mg_node_reload_close();
    return rc;
}
