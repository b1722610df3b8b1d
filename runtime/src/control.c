/* control.c: the control process's own duties beside its listeners (which
 * worker.c runs as for any runtime process): the channel to the workers
 * (channel.c), reloads on SIGHUP, reloads on file changes (watch), and the
 * version counter shared with the master.
 *
 * Its handler is lua/moongate/control.lua: it reads and validates the
 * config source, numbers each new version and sends it to the workers.
 *
 * Reloads are folded: a SIGHUP within RELOAD_GAP_MS of the last one waits
 * for that gap to pass (a config pushed 20 times a second needs only its
 * latest version applied); a file change waits for WATCH_QUIET_MS without
 * another change (an editor writes a file in several steps).
 */
#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "mg.h"

#define RELOAD_GAP_MS 100
#define WATCH_QUIET_MS 100
#define WATCH_MAX 2 /* the node config's directory and the routes file's */

/* The last version number handed out, in a page the master maps before
 * forking, so that a respawned control process goes on from it (a worker
 * never sees a number twice for two different configs). Written by the
 * control process only, one at a time. */
static volatile double *shared_version;
static double local_version; /* without the master (specs, tools) */

int mg_control_shared_init(void)
{
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    shared_version = p;
    *shared_version = 0;
    return 0;
}

double mg_ctl_version_get(void)
{
    return shared_version ? *shared_version : local_version;
}

void mg_ctl_version_set(double version)
{
    if (shared_version)
        *shared_version = version;
    else
        local_version = version;
}

static struct {
    uv_timer_t gap_timer;   /* a SIGHUP waiting for the gap */
    uv_timer_t watch_timer; /* file changes waiting for quiet */
    int timers_init;
    uint64_t last_ms; /* when the last reload started */
    int gap_armed;
    uv_fs_event_t watch[WATCH_MAX];
    char watch_name[WATCH_MAX][256]; /* the file watched in each directory */
    char watch_name2[WATCH_MAX][256];
    int nwatch;
} ctl;

static void control_run(mg_worker_t *w, const char *reason)
{
    uv_update_time(w->loop);
    ctl.last_ms = uv_now(w->loop);
    mg__lua_reload(w, reason);
}

static void on_gap(uv_timer_t *t)
{
    ctl.gap_armed = 0;
    control_run(t->data, "signal");
}

static void on_quiet(uv_timer_t *t)
{
    control_run(t->data, "watch");
}

void mg__control_reload(mg_worker_t *w, const char *reason)
{
    uint64_t now;

    if (w->draining) return;
    uv_update_time(w->loop);
    now = uv_now(w->loop);
    if (ctl.last_ms == 0 || now - ctl.last_ms >= RELOAD_GAP_MS) {
        control_run(w, reason);
        return;
    }
    if (!ctl.gap_armed) {
        ctl.gap_armed = 1;
        uv_timer_start(&ctl.gap_timer, on_gap, ctl.last_ms + RELOAD_GAP_MS - now, 0);
    }
}

/* A change in a watched directory: only the files we read count (the
 * directory also sees their temporary copies, editors' swap files...). */
static void on_fs_event(uv_fs_event_t *h, const char *filename, int events, int status)
{
    int i = (int)((const uv_fs_event_t *)h - ctl.watch);
    (void)events;

    if (status < 0) {
        mg_log(MG_LOG_WARN, "watch: %s", uv_strerror(status));
        return;
    }
    if (filename != NULL && strcmp(filename, ctl.watch_name[i]) != 0 &&
        strcmp(filename, ctl.watch_name2[i]) != 0)
        return;
    uv_timer_start(&ctl.watch_timer, on_quiet, WATCH_QUIET_MS, 0);
}

/* Watches the directory of path (so that a file replaced by a rename, as
 * editors and config tools do, is still seen) for changes to its file. */
static void control_watch(mg_worker_t *w, const char *path)
{
    char dir[MG_PATH_MAX], base[MG_PATH_MAX];
    const char *d, *b;
    int i, rc;

    if (path[0] == '\0') return;
    snprintf(dir, sizeof(dir), "%s", path);
    snprintf(base, sizeof(base), "%s", path);
    d = dirname(dir);
    b = basename(base);
    if (strlen(b) >= sizeof(ctl.watch_name[0])) return;
    for (i = 0; i < ctl.nwatch; i++) {
        char path_i[MG_PATH_MAX];
        size_t n = sizeof(path_i);
        if (uv_fs_event_getpath(&ctl.watch[i], path_i, &n) == 0 && strcmp(path_i, d) == 0) {
            snprintf(ctl.watch_name2[i], sizeof(ctl.watch_name2[i]), "%s", b);
            mg_log(MG_LOG_INFO, "watching %s for changes", path);
            return;
        }
    }
    if (ctl.nwatch == WATCH_MAX) return;
    i = ctl.nwatch;
    uv_fs_event_init(w->loop, &ctl.watch[i]);
    rc = uv_fs_event_start(&ctl.watch[i], on_fs_event, d, 0);
    if (rc != 0) {
        mg_log(MG_LOG_WARN, "watch %s: %s; reload by hand", d, uv_strerror(rc));
        uv_close((uv_handle_t *)&ctl.watch[i], NULL);
        return;
    }
    snprintf(ctl.watch_name[i], sizeof(ctl.watch_name[i]), "%s", b);
    snprintf(ctl.watch_name2[i], sizeof(ctl.watch_name2[i]), "%s", b);
    ctl.nwatch++;
    mg_log(MG_LOG_INFO, "watching %s for changes", path);
}

int mg__control_start(mg_worker_t *w)
{
    uv_timer_init(w->loop, &ctl.gap_timer);
    uv_timer_init(w->loop, &ctl.watch_timer);
    ctl.gap_timer.data = w;
    ctl.watch_timer.data = w;
    ctl.timers_init = 1;
    if (mg__chan_listen(w) != 0) return -1;
    if (w->conf->watch) {
        control_watch(w, w->conf->conf_path);
        control_watch(w, w->conf->routes_path);
    }
    return 0;
}

void mg__control_stop(mg_worker_t *w)
{
    (void)w;
    mg__control_etcd_stop();
    if (ctl.timers_init) {
        uv_close((uv_handle_t *)&ctl.gap_timer, NULL);
        uv_close((uv_handle_t *)&ctl.watch_timer, NULL);
        ctl.timers_init = 0;
    }
    for (int i = 0; i < ctl.nwatch; i++)
        uv_close((uv_handle_t *)&ctl.watch[i], NULL);
    ctl.nwatch = 0;
}
