/* master.c: the master process.
 *
 * Phases of mg_master_run:
 *   1. refuse to start when the pid file names a live moongate;
 *   2. open every listener: conf->workers SO_REUSEPORT sockets per address,
 *      and the status and admin listeners (one socket each, for the control
 *      process);
 *   3. daemonize (-d), so port errors above still reached the terminal;
 *   4. write the pid file;
 *   5. fork the control process, then the workers (which get their config
 *      from it), and supervise them in a libuv loop until a stop signal;
 *      then stop the workers, then the control process (bounded), and
 *      remove the pid file.
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
#include "mg.h"
#include "shm.h"
#include "worker.h"

#define MASTER_STORM_RESPAWNS 10     /* respawns of one worker ...          */
#define MASTER_STORM_WINDOW_MS 10000 /* ... within this window, then ...    */
#define MASTER_STORM_DELAY_MS 1000   /* ... wait this long before the next  */
#define MASTER_FAST_STOP_MS 5000     /* SIGTERM: then SIGKILL what is left  */
#define MASTER_GRACE_EXTRA_MS 1000   /* SIGQUIT: shutdown_timeout_ms + this */

enum { STOP_NONE = 0, STOP_GRACEFUL, STOP_FAST };

typedef struct {
    int id;                                    /* a worker's index, or -1: the control process */
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
    master_worker_t *workers;
    master_worker_t ctl; /* the control process */
    int ctl_fds[2];      /* its status and admin listeners, -1 when off */
    int ctl_signalled;   /* stopping: the control process was told to stop */
    int rc;              /* the exit code once stopped */
    int *fds;            /* workers x nlisten; worker i owns fds[i * nlisten ...] */
    int nfds;            /* how many of fds are open */
    int stopping;        /* STOP_* */
    int notify_fd;       /* -d: the pipe to the waiting start command, else -1 */
    pid_t pid;           /* the master's own pid, after daemonizing */
    int pid_written;
    int finished; /* master_finish ran: the handles are closing */
} M;

static int master_spawn(master_worker_t *w);
static void master_close_listeners(void);
static void master_stop(int how);

/* --- pid file ------------------------------------------------------------- */

/* The state letter of /proc/<pid>/stat ("1234 (moongate) S ..."), or '?'. */
static char master_proc_state(pid_t pid)
{
    char buf[512];
    const char *p = mg__proc_stat(pid, buf, sizeof(buf));
    return p != NULL ? p[0] : '?';
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

/* "worker 3" or "control process", for logs. */
static const char *master_name(const master_worker_t *w, char *buf, size_t len)
{
    if (w->id < 0)
        snprintf(buf, len, "control process");
    else
        snprintf(buf, len, "worker %d", w->id);
    return buf;
}

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

    assert(w->id >= -1 && w->id < conf->workers); /* else it would take another's sockets */

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

    if (w->id < 0) {
        snprintf(role, sizeof(role), "ctl");
        mg_proc_title_set("moongate: control process", "moongate-ctl");
    } else {
        snprintf(role, sizeof(role), "w%d", w->id);
    }
    mg_log_set_role(role);
    /* A worker whose master dies stops gracefully instead of serving on,
     * unsupervised. The master may already be gone: check after arming. */
    if (prctl(PR_SET_PDEATHSIG, SIGQUIT) < 0 || getppid() != M.pid) _exit(1);

    for (i = 0; i < conf->workers * per; i++) {
        if (i / per != w->id) close(M.fds[i]);
    }
    sigprocmask(SIG_SETMASK, oldmask, NULL);
    if (w->id < 0) {
        rc = mg_worker_main(conf, MG_ROLE_CONTROL, -1, M.ctl_fds, 2);
    } else {
        for (i = 0; i < 2; i++) {
            if (M.ctl_fds[i] >= 0) close(M.ctl_fds[i]);
        }
        rc = mg_worker_main(conf, MG_ROLE_WORKER, w->id, M.fds + w->id * per, per);
    }
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
        char name[32];
        mg_log(MG_LOG_ERROR, "%s: fork: %s; retrying in 1 s", master_name(w, name, sizeof(name)),
               strerror(e));
        return -e;
    }
    w->pid = pid;
    mg_log_debug("%s started (pid %ld)", w->id < 0 ? "control process" : "worker", (long)pid);
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
        char name[32];
        mg_log(MG_LOG_WARN, "%s: %d respawns within %d s; next one in %d ms",
               master_name(w, name, sizeof(name)), MASTER_STORM_RESPAWNS,
               MASTER_STORM_WINDOW_MS / 1000, MASTER_STORM_DELAY_MS);
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
    uv_close((uv_handle_t *)&M.ctl.respawn_timer, master_close_cb);
    for (i = 0; i < M.conf->workers; i++)
        uv_close((uv_handle_t *)&M.workers[i].respawn_timer, master_close_cb);
}

/* The control process goes last: workers draining still hold their
 * config, and it answers /status while they drain. */
static void master_stop_progress(void)
{
    if (!M.stopping || master_running() > 0) return;
    if (M.ctl.pid > 0) {
        if (!M.ctl_signalled) {
            M.ctl_signalled = 1;
            kill(M.ctl.pid, M.stopping == STOP_GRACEFUL ? SIGQUIT : SIGTERM);
        }
        return;
    }
    master_finish();
}

/* The child pid exited with status: the control process or a worker. */
static void master_exited(master_worker_t *w, pid_t pid, int status)
{
    char name[32];

    master_name(w, name, sizeof(name));
    w->pid = 0;
    if (M.stopping) {
        if (WIFSIGNALED(status)) {
            mg_log(MG_LOG_INFO, "%s (pid %ld) exited on signal %d", name, (long)pid,
                   WTERMSIG(status));
        } else {
            mg_log_debug("%s (pid %ld) exited with code %d", name, (long)pid, WEXITSTATUS(status));
        }
        return;
    }
    if (w->id < 0 && WIFEXITED(status) && WEXITSTATUS(status) == MG_EXIT_NO_CONFIG) {
        mg_log(MG_LOG_ERROR, "the control process has no configuration to serve (see its "
                             "message above); stopping");
        M.rc = 1;
        master_stop(STOP_FAST);
        return;
    }
    if (WIFSIGNALED(status)) {
        mg_log(MG_LOG_ERROR, "%s (pid %ld) exited on signal %d%s; respawning", name, (long)pid,
               WTERMSIG(status), WCOREDUMP(status) ? " (core dumped)" : "");
    } else {
        mg_log(MG_LOG_ERROR, "%s (pid %ld) exited with code %d; respawning", name, (long)pid,
               WEXITSTATUS(status));
    }
    master_respawn(w);
}

static void master_reap(void)
{
    int status, i;
    pid_t pid;

    for (;;) {
        pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR) continue;
        if (pid <= 0) break;
        if (M.ctl.pid == pid) {
            master_exited(&M.ctl, pid, status);
            continue;
        }
        for (i = 0; i < M.conf->workers; i++) {
            if (M.workers[i].pid == pid) {
                master_exited(&M.workers[i], pid, status);
                break;
            }
        }
    }
    master_stop_progress();
}

/* --- stopping ------------------------------------------------------------- */

static void master_stop_timeout_cb(uv_timer_t *t)
{
    (void)t;
    mg_log(MG_LOG_WARN, "%d worker(s)%s still running after the stop timeout; killing them",
           master_running(), M.ctl.pid > 0 ? " and the control process" : "");
    master_signal_workers(SIGKILL);
    if (M.ctl.pid > 0) kill(M.ctl.pid, SIGKILL);
}

static void master_stop(int how)
{
    uint64_t bound;
    int i;

    if (how <= M.stopping) return; /* a fast stop may cut a graceful one short */
    M.stopping = how;
    for (i = 0; i < M.conf->workers; i++)
        uv_timer_stop(&M.workers[i].respawn_timer);
    uv_timer_stop(&M.ctl.respawn_timer);
    /* A fast stop cuts a graceful one short: the control process, asked
     * to drain, is told to hurry too. */
    if (M.ctl_signalled && M.ctl.pid > 0) kill(M.ctl.pid, SIGTERM);
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
    master_stop_progress();
}

/* --- reload --------------------------------------------------------------- */

/* The control process reads and checks the config source, and hands the
 * new version to the workers: the master only passes the word on. */
static void master_sighup(void)
{
    if (M.ctl.pid > 0) {
        kill(M.ctl.pid, SIGHUP);
        mg_log(MG_LOG_INFO, "reload: signalled the control process");
    } else {
        mg_log(MG_LOG_WARN, "reload: the control process is not running; its replacement "
                            "reads the config source when it starts");
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
    /* The control process's listeners: one socket each, kept here so
     * that they outlive a control process respawn. */
    for (j = 0; j < 2; j++) {
        mg_listen_conf_t *l = j == 0 ? &conf->status : &conf->admin;
        if (l->host[0] == '\0') continue;
        M.ctl_fds[j] = mg_listen_open(l, 0, err, sizeof(err));
        if (M.ctl_fds[j] < 0) {
            int r = M.ctl_fds[j];
            M.ctl_fds[j] = -1;
            mg_log(MG_LOG_ERROR, "%s", err);
            return r;
        }
        if (l->port == 0) l->port = mg_listen_port(M.ctl_fds[j]);
        mg_listen_format(l, err, sizeof(err));
        mg_log(MG_LOG_INFO, "%s listener on %s", j == 0 ? "status" : "admin", err);
    }
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
    for (j = 0; j < 2; j++) {
        if (M.ctl_fds[j] >= 0) close(M.ctl_fds[j]);
        M.ctl_fds[j] = -1;
    }
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
    M.ctl_fds[0] = M.ctl_fds[1] = -1;
    M.ctl.id = -1;
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

    M.workers = calloc((size_t)conf->workers, sizeof(*M.workers));
    if (M.workers == NULL || uv_loop_init(&M.loop) != 0 || mg_control_shared_init() != 0) {
        master_fail("cannot set up the master loop");
        goto out;
    }
    uv_timer_init(&M.loop, &M.stop_timer);
    uv_timer_init(&M.loop, &M.ctl.respawn_timer);
    M.ctl.respawn_timer.data = &M.ctl;
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

    /* The control process first: the workers connect to it for their
     * config (retrying until it listens). */
    if (master_spawn(&M.ctl) < 0) uv_timer_start(&M.ctl.respawn_timer, master_respawn_cb, 1000, 0);
    for (i = 0; i < conf->workers; i++) {
        if (master_spawn(&M.workers[i]) < 0)
            uv_timer_start(&M.workers[i].respawn_timer, master_respawn_cb, 1000, 0);
    }

    uv_run(&M.loop, UV_RUN_DEFAULT);
    uv_loop_close(&M.loop);
    mg_log(MG_LOG_INFO, "moongate stopped");
    rc = M.rc;

out:
    master_pid_remove();
    if (M.fds != NULL) master_close_listeners();
    free(M.workers);
    M.workers = NULL;
    return rc;
}
