/* main.c: the moongate command line.
 *
 *   moongate start  [-c FILE] [-d]     run the node (foreground, or -d daemon)
 *   moongate stop   [-c FILE]          graceful stop of the running node
 *   moongate reload [-c FILE]          check the config, then SIGHUP the master
 *   moongate check  [-c FILE]          validate the node config and routes
 *   moongate version                   moongate and library versions
 *   moongate mock --listen ADDR [--workers N]   the mock backend
 *   moongate config dump [-c FILE]     print the routes in force (Admin API)
 *   moongate config push ROUTES [-c FILE]   validate, then write through the Admin API
 *   moongate help
 *
 * FILE defaults to conf/moongate.json. Every failure exits 1 with a reason
 * on stderr.
 */
#include <errno.h>
#include <limits.h>
#include <luajit.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "cli_config.h"
#include "listen.h"
#include "llhttp.h"
#include "log.h"
#include "master.h"
#include "node.h"
#include "shm.h"
#include "worker.h"

#ifndef MG_VERSION
#define MG_VERSION "0.1.0-dev"
#endif

#define DEFAULT_CONF "conf/moongate.json"
#define STOP_EXTRA_MS 2000 /* stop waits shutdown_timeout_ms + this */

typedef struct {
    const char *conf;
    int daemonize;
    const char *listen;
    int workers;
} cli_opts_t;

static void cli_usage(FILE *f)
{
    fputs("usage: moongate <command> [options]\n"
          "\n"
          "  start  [-c FILE] [-d]    start the node in the foreground (-d: as a daemon,\n"
          "                           its error log appended to <conf dir>/moongate.log)\n"
          "  stop   [-c FILE]         graceful stop: in-flight requests finish first\n"
          "  reload [-c FILE]         validate the config, then reload routes and policies\n"
          "  check  [-c FILE]         validate the node config and routes; prints ok\n"
          "  version                  print the versions of moongate and its libraries\n"
          "  mock   --listen ADDR [--workers N]\n"
          "                           run the mock backend (foreground)\n"
          "  config dump [-c FILE]    print the routes in force, from the admin API\n"
          "  config push ROUTES [-c FILE]\n"
          "                           validate ROUTES (a routes.json), then write its\n"
          "                           entities through the admin API (etcd mode)\n"
          "  help                     this text\n"
          "\n"
          "FILE defaults to " DEFAULT_CONF ".\n",
          f);
}

static int cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int cli_fail(const char *fmt, ...)
{
    char line[2048];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "moongate: %s\n", line);
    return 1;
}

/* Options after the command. allowed: the letters c, d, l (--listen), w
 * (--workers) that this command takes. */
static int cli_parse(const char *cmd, int argc, char **argv, const char *allowed, cli_opts_t *o)
{
    int i;

    memset(o, 0, sizeof(*o));
    o->conf = DEFAULT_CONF;
    o->workers = 1;
    for (i = 0; i < argc; i++) {
        const char *a = argv[i];
        char opt = 0;

        if (strcmp(a, "-c") == 0 || strcmp(a, "--conf") == 0)
            opt = 'c';
        else if (strcmp(a, "-d") == 0 || strcmp(a, "--daemon") == 0)
            opt = 'd';
        else if (strcmp(a, "--listen") == 0 || strcmp(a, "-l") == 0)
            opt = 'l';
        else if (strcmp(a, "--workers") == 0 || strcmp(a, "-w") == 0)
            opt = 'w';
        if (opt == 0 || strchr(allowed, opt) == NULL)
            return cli_fail("%s: unknown option '%s' (see moongate help)", cmd, a);
        if (opt == 'd') {
            o->daemonize = 1;
            continue;
        }
        if (i + 1 >= argc) return cli_fail("%s: option '%s' needs a value", cmd, a);
        a = argv[++i];
        if (opt == 'c') {
            o->conf = a;
        } else if (opt == 'l') {
            o->listen = a;
        } else {
            char *end;
            long n;
            errno = 0;
            n = strtol(a, &end, 10);
            if (errno != 0 || end == a || *end != '\0' || n < 1 || n > 256)
                return cli_fail("%s: --workers must be a number 1..256, not '%s'", cmd, a);
            o->workers = (int)n;
        }
    }
    return 0;
}

static void cli_print_error(void *ud, const char *msg)
{
    fprintf(stderr, "%s%s\n", (const char *)ud, msg);
}

/* config.check, then the C side's own reading (listeners must be IP
 * literals, values must fit): both must pass before start or reload. */
static int cli_validate(const char *path, mg_node_conf_t *conf, const char *prefix)
{
    char err[4096];

    if (mg_node_check_each(path, cli_print_error, (void *)prefix) > 0) return 1;
    if (mg_node_load(path, conf, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s%s\n", prefix, err);
        return 1;
    }
    return 0;
}

/* --- commands ------------------------------------------------------------- */

static int cmd_start(const cli_opts_t *o)
{
    static mg_node_conf_t conf; /* ~60 KiB; workers read it after fork */

    if (cli_validate(o->conf, &conf, "moongate: ") != 0) return 1;
    mg_log_level = conf.log_level;
    return mg_master_run(&conf, o->daemonize);
}

static pid_t cli_running(const mg_node_conf_t *conf)
{
    pid_t pid = mg_master_pid(conf->pid_file);

    if (pid < 0) {
        cli_fail("pid file %s: %s", conf->pid_file, strerror((int)-pid));
        return -1;
    }
    if (pid == 0) {
        cli_fail("not running (no live process in %s)", conf->pid_file);
        return -1;
    }
    return pid;
}

static int cmd_stop(const cli_opts_t *o)
{
    static mg_node_conf_t conf;
    char err[4096];
    uint64_t waited = 0, bound;
    struct timespec tick = {0, 50 * 1000 * 1000};
    pid_t pid;

    if (mg_node_load(o->conf, &conf, err, sizeof(err)) < 0) return cli_fail("%s", err);
    pid = cli_running(&conf);
    if (pid < 0) return 1;
    if (kill(pid, SIGQUIT) < 0) return cli_fail("stop pid %ld: %s", (long)pid, strerror(errno));

    bound = (uint64_t)conf.shutdown_timeout_ms + STOP_EXTRA_MS;
    while (mg_master_alive(pid)) {
        if (waited >= bound)
            return cli_fail("pid %ld still running after %llu ms", (long)pid,
                            (unsigned long long)bound);
        nanosleep(&tick, NULL);
        waited += 50;
    }
    return 0;
}

static int cmd_reload(const cli_opts_t *o)
{
    static mg_node_conf_t conf;
    pid_t pid;

    if (cli_validate(o->conf, &conf, "") != 0) return 1;
    pid = cli_running(&conf);
    if (pid < 0) return 1;
    if (kill(pid, SIGHUP) < 0) return cli_fail("reload pid %ld: %s", (long)pid, strerror(errno));
    return 0;
}

static int cmd_check(const cli_opts_t *o)
{
    static mg_node_conf_t conf;

    if (cli_validate(o->conf, &conf, "") != 0) return 1;
    puts("ok");
    return 0;
}

static int cmd_version(void)
{
    printf("moongate %s\n", MG_VERSION);
    printf("%s\n", LUAJIT_VERSION);
    printf("libuv %s\n", uv_version_string());
    printf("llhttp %d.%d.%d\n", LLHTTP_VERSION_MAJOR, LLHTTP_VERSION_MINOR, LLHTTP_VERSION_PATCH);
    printf("%s\n", OpenSSL_version(OPENSSL_VERSION));
    return 0;
}

/* --- mock ------------------------------------------------------------------- */

/* Several mock workers: a plain parent that forwards stop signals and
 * waits. No respawn and no pid file: a test tool that dies should be seen. */
static int mock_supervise(mg_node_conf_t *conf, int *fds)
{
    sigset_t set, old;
    pid_t pids[256];
    int i, j, alive = 0, rc = 0, status;

    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGQUIT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, &old);
    fflush(NULL);

    for (i = 0; i < conf->workers; i++) {
        pids[i] = fork();
        if (pids[i] < 0) {
            rc = cli_fail("mock: fork: %s", strerror(errno));
            break;
        }
        if (pids[i] == 0) {
            char role[16];
            snprintf(role, sizeof(role), "mock%d", i);
            mg_log_set_role(role);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            for (j = 0; j < conf->workers; j++) {
                if (j != i) close(fds[j]);
            }
            sigprocmask(SIG_SETMASK, &old, NULL);
            rc = mg_worker_main(conf, MG_ROLE_MOCK, i, &fds[i], 1);
            fflush(NULL);
            _exit(rc);
        }
        alive++;
    }
    for (j = 0; j < conf->workers; j++)
        close(fds[j]); /* the workers own them */
    if (rc != 0) {
        for (j = 0; j < alive; j++)
            kill(pids[j], SIGTERM);
    }

    while (alive > 0) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig < 0) continue; /* EINTR */
        if (sig != SIGCHLD) {
            /* SIGINT from a terminal reaches the whole group anyway; the
             * forward covers `kill <parent>`. */
            for (j = 0; j < i; j++) {
                if (pids[j] > 0) kill(pids[j], sig == SIGINT ? SIGTERM : sig);
            }
            continue;
        }
        for (;;) {
            pid_t p = waitpid(-1, &status, WNOHANG);
            if (p < 0 && errno == EINTR) continue;
            if (p <= 0) break;
            for (j = 0; j < i; j++) {
                if (pids[j] == p) pids[j] = 0;
            }
            alive--;
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
        }
    }
    return rc;
}

static int cmd_mock(const cli_opts_t *o)
{
    static mg_node_conf_t conf;
    char err[512], cwd[MG_PATH_MAX];
    int fds[256];

    if (o->listen == NULL) return cli_fail("mock: --listen ADDR is required");
    mg_node_defaults(&conf);
    conf.mock = 1;
    conf.workers = o->workers;
    /* The mock hashes bodies as they stream and holds none: no size limit,
     * so it can stand behind any upload a gateway under test lets through. */
    conf.limits.max_body_bytes = UINT64_MAX;
    if (mg_node_lua_root(conf.lua_root, sizeof(conf.lua_root)) < 0)
        return cli_fail("mock: %s", conf.lua_root);
    if (getcwd(cwd, sizeof(cwd)) == NULL) return cli_fail("mock: getcwd: %s", strerror(errno));
    memcpy(conf.prefix, cwd, sizeof(cwd));
    if (mg_listen_parse(o->listen, &conf.listen[0], err, sizeof(err)) < 0)
        return cli_fail("mock: %s", err);
    conf.nlisten = 1;
    /* The mock serves no status endpoint nor admin API. */
    memset(&conf.status, 0, sizeof(conf.status));
    memset(&conf.admin, 0, sizeof(conf.admin));

    signal(SIGPIPE, SIG_IGN);
    /* built-in zones, shared by the mock's workers */
    if (mg__shm_create(&conf) < 0) return cli_fail("mock: cannot create the shm zones");
    if (mg_listen_open_set(&conf.listen[0], conf.workers, fds, err, sizeof(err)) < 0)
        return cli_fail("mock: %s", err);
    if (conf.listen[0].port == 0) conf.listen[0].port = mg_listen_port(fds[0]);
    mg_log_set_role("mock");
    mg_listen_format(&conf.listen[0], err, sizeof(err));
    mg_log(MG_LOG_INFO, "mock listening on %s (%d worker(s))", err, conf.workers);

    if (conf.workers == 1) {
        int rc = mg_worker_main(&conf, MG_ROLE_MOCK, 0, fds, 1);
        fflush(NULL);
        return rc;
    }
    return mock_supervise(&conf, fds);
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : NULL;
    cli_opts_t o;

    mg_proc_title_init(argc, argv);
    if (cmd == NULL) {
        cli_usage(stderr);
        return 1;
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        cli_usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "-v") == 0 || strcmp(cmd, "--version") == 0) {
        if (argc > 2) return cli_fail("version: takes no options");
        return cmd_version();
    }
    if (strcmp(cmd, "start") == 0) {
        if (cli_parse(cmd, argc - 2, argv + 2, "cd", &o) != 0) return 1;
        return cmd_start(&o);
    }
    if (strcmp(cmd, "stop") == 0) {
        if (cli_parse(cmd, argc - 2, argv + 2, "c", &o) != 0) return 1;
        return cmd_stop(&o);
    }
    if (strcmp(cmd, "reload") == 0) {
        if (cli_parse(cmd, argc - 2, argv + 2, "c", &o) != 0) return 1;
        return cmd_reload(&o);
    }
    if (strcmp(cmd, "check") == 0) {
        if (cli_parse(cmd, argc - 2, argv + 2, "c", &o) != 0) return 1;
        return cmd_check(&o);
    }
    if (strcmp(cmd, "config") == 0) {
        const char *sub = argc > 2 ? argv[2] : "";
        if (strcmp(sub, "dump") == 0) {
            if (cli_parse("config dump", argc - 3, argv + 3, "c", &o) != 0) return 1;
            return mg_cli_config("dump", NULL, o.conf);
        }
        if (strcmp(sub, "push") == 0) {
            if (argc < 4 || argv[3][0] == '-')
                return cli_fail("config push: expects a routes file (config push ROUTES -c FILE)");
            if (cli_parse("config push", argc - 4, argv + 4, "c", &o) != 0) return 1;
            return mg_cli_config("push", argv[3], o.conf);
        }
        return cli_fail("config: expects dump or push (see moongate help)");
    }
    if (strcmp(cmd, "mock") == 0) {
        if (cli_parse(cmd, argc - 2, argv + 2, "lw", &o) != 0) return 1;
        return cmd_mock(&o);
    }
    return cli_fail("unknown command '%s' (see moongate help)", cmd);
}
