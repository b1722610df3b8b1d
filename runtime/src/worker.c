/* worker.c: one worker process: its loop, listeners, signals and pools.
 *
 * Phases of the loop: accept -> read/parse a request head -> Lua access
 * phase -> proxy (or a local answer) -> header_filter -> stream the body ->
 * log phase -> next request. Everything runs on this one libuv loop; the
 * only blocking work is at start and reload (config load in Lua).
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "http_client.h"
#include "mg.h"
#include "worker.h"

mg_worker_t *mg__worker;
static mg_worker_t worker;

uint64_t mg__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

double mg_time_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int mg_worker_id(void)
{
    return mg__worker ? mg__worker->id : -1;
}

/* ---- buffers ------------------------------------------------------------------ */

char *mg__buf_get(mg_worker_t *w)
{
    if (w->nfree_bufs) return w->free_bufs[--w->nfree_bufs];
    char *b = malloc(w->buf_size);
    if (!b) abort(); /* out of memory on the request path: nothing sane to do */
    return b;
}

void mg__buf_put(mg_worker_t *w, char *b)
{
    if (w->nfree_bufs < w->free_bufs_cap) {
        w->free_bufs[w->nfree_bufs++] = b;
        return;
    }
    free(b);
}

/* ---- stopping -------------------------------------------------------------------- */

static void stop_now(mg_worker_t *w)
{
    w->stopping = 1;
    uv_stop(w->loop);
}

void mg__worker_drained(mg_worker_t *w)
{
    if (w->draining && w->nconns == 0) stop_now(w);
}

static void on_drain_timeout(uv_timer_t *t)
{
    mg_worker_t *w = t->data;
    if (w->nconns) mg_log(MG_LOG_WARN, "shutdown timeout: closing %u connections", w->nconns);
    stop_now(w);
}

static int exit_code;

void mg__worker_fatal(mg_worker_t *w, int code)
{
    exit_code = code;
    stop_now(w);
}

static void start_drain(mg_worker_t *w)
{
    if (w->draining) return;
    w->draining = 1;
    for (int i = 0; i < w->nlisten; i++)
        uv_close((uv_handle_t *)&w->listeners[i], NULL);
    if (w->role == MG_ROLE_CONTROL) mg__control_stop(w);
    if (w->role != MG_ROLE_MOCK) mg__chan_close(w);
    mg__targets_close(w);
    if (w->http) mg__http_client_close_idle(w->http);
    mg__conn_drain_idle(w);
    uv_timer_start(&w->drain_timer, on_drain_timeout, w->conf->shutdown_timeout_ms, 0);
    mg__worker_drained(w);
}

static void on_signal(uv_signal_t *s, int signum)
{
    mg_worker_t *w = s->data;
    switch (signum) {
    case SIGHUP:
        /* A worker's config comes from the control process only. */
        if (w->role == MG_ROLE_CONTROL) mg__control_reload(w, "signal");
        break;
    case SIGQUIT: start_drain(w); break;
    default: stop_now(w); break;
    }
}

/* The master died (PDEATHSIG may be lost across its exec-less forks on some
 * kernels): drain rather than serve unsupervised. */
static void on_ppid_check(uv_timer_t *t)
{
    mg_worker_t *w = t->data;
    if (getppid() == 1 && !w->conf->mock) start_drain(w);
}

/* Sets up the worker (pools, parser settings, the Lua state) without any
 * listener: mg_worker_main adds those; the fuzzer feeds connections itself. */
int mg__worker_init(const mg_node_conf_t *conf, int role, int worker_id)
{
    mg_worker_t *w = &worker;
    memset(w, 0, sizeof(*w));
    mg__worker = w;
    w->conf = conf;
    w->id = worker_id;
    w->role = role;
    w->mock = role == MG_ROLE_MOCK;
    w->loop = uv_default_loop();
    mg_log_level = conf->log_level;
    mg_list_init(&w->conns);
    mg_list_init(&w->targets);
    mg_list_init(&w->free_reqs);
    mg__conn_settings(&w->req_settings);
    mg__proxy_resp_settings(&w->resp_settings);
    size_t head = (size_t)conf->limits.max_uri_bytes + conf->limits.max_header_bytes + 1024;
    w->buf_size = (uint32_t)((head + MG_BODY_SPACE + 4095) & ~(size_t)4095);
    w->free_bufs_cap = 1024;
    w->free_bufs = calloc(w->free_bufs_cap, sizeof(char *));
    if (!w->free_bufs) return -1;
    if (getrandom(&w->rid_seed, sizeof(w->rid_seed), 0) != sizeof(w->rid_seed))
        w->rid_seed = mg__now_ns() ^ ((uint64_t)getpid() << 32);
    signal(SIGPIPE, SIG_IGN);
    return mg__lua_init(w);
}

int mg__worker_listen(mg_worker_t *w)
{
    if (w->listening || w->draining) return 0;
    for (int i = 0; i < w->nlisten; i++) {
        int rc = uv_listen((uv_stream_t *)&w->listeners[i], 511, mg__conn_accept);
        if (rc != 0) {
            mg_log(MG_LOG_ERROR, "listen: %s", uv_strerror(rc));
            return -1;
        }
    }
    w->listening = 1;
    return 0;
}

/* MOONGATE_LOOP_STALL_MS=N (diagnostic): logs each loop turn that kept the
 * worker busy for N ms or more (time between two prepare callbacks minus
 * what libuv spent blocked in poll), with the CPU the process used in it:
 * a turn far longer than its CPU is the worker waiting for a core, not its
 * own work. Off by default: costs three clock reads per turn. */
static uv_prepare_t stall_prepare;
static uint64_t stall_last_ns, stall_last_idle, stall_min_ns, stall_last_cpu;

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void on_stall_prepare(uv_prepare_t *h)
{
    uint64_t now = mg__now_ns(), idle = uv_metrics_idle_time(h->loop), cpu = cpu_ns();
    if (stall_last_ns != 0) {
        uint64_t busy = (now - stall_last_ns) - (idle - stall_last_idle);
        if (busy >= stall_min_ns)
            mg_log(MG_LOG_WARN, "loop turn busy %.2f ms (cpu %.2f ms)", (double)busy / 1e6,
                   (double)(cpu - stall_last_cpu) / 1e6);
    }
    stall_last_cpu = cpu;
    stall_last_ns = now;
    stall_last_idle = idle;
}

static void stall_meter_start(mg_worker_t *w)
{
    const char *ms = getenv("MOONGATE_LOOP_STALL_MS");
    if (ms == NULL || *ms == '\0') return;
    char *end;
    double v = strtod(ms, &end);
    if (*end != '\0' || !(v > 0 && v < 1e6)) {
        mg_log(MG_LOG_WARN, "MOONGATE_LOOP_STALL_MS=%s ignored: not a number of ms > 0", ms);
        return;
    }
    stall_min_ns = (uint64_t)(v * 1e6);
    uv_loop_configure(w->loop, UV_METRICS_IDLE_TIME);
    uv_prepare_init(w->loop, &stall_prepare);
    uv_prepare_start(&stall_prepare, on_stall_prepare);
    uv_unref((uv_handle_t *)&stall_prepare);
}

int mg_worker_main(const mg_node_conf_t *conf, int role, int worker_id, const int *fds, int nfds)
{
    int rc = mg__worker_init(conf, role, worker_id);
    if (rc != 0) return rc == -2 && role == MG_ROLE_CONTROL ? MG_EXIT_NO_CONFIG : 1;
    mg_worker_t *w = mg__worker;

    for (int i = 0; i < nfds && w->nlisten < MG_MAX_LISTEN; i++) {
        if (fds[i] < 0) continue; /* a listener that is off */
        uv_tcp_init(w->loop, &w->listeners[w->nlisten]);
        rc = uv_tcp_open(&w->listeners[w->nlisten], fds[i]);
        if (rc != 0) {
            mg_log(MG_LOG_ERROR, "listen: %s", uv_strerror(rc));
            return 1;
        }
        w->listener_tag[w->nlisten++] = i;
    }
    /* A worker starts accepting once it applied its first config version
     * (lua.c); meanwhile the kernel queues connections on its sockets. */
    if (role == MG_ROLE_WORKER) {
        if (mg__chan_connect(w) != 0) return 1;
    } else {
        if (mg__worker_listen(w) != 0) return 1;
        if (role == MG_ROLE_CONTROL && mg__control_start(w) != 0) return 1;
    }
    uv_signal_t *sigs[] = {&w->sig_hup, &w->sig_quit, &w->sig_term, &w->sig_int};
    int nums[] = {SIGHUP, SIGQUIT, SIGTERM, SIGINT};
    for (int i = 0; i < 4; i++) {
        uv_signal_init(w->loop, sigs[i]);
        sigs[i]->data = w;
        uv_signal_start(sigs[i], on_signal, nums[i]);
        uv_unref((uv_handle_t *)sigs[i]);
    }
    uv_timer_init(w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    uv_timer_init(w->loop, &w->ppid_timer);
    w->ppid_timer.data = w;
    uv_timer_start(&w->ppid_timer, on_ppid_check, 1000, 1000);
    uv_unref((uv_handle_t *)&w->ppid_timer);
    uv_unref((uv_handle_t *)&w->drain_timer);

    if (role == MG_ROLE_WORKER) stall_meter_start(w);
    if (role == MG_ROLE_CONTROL)
        mg_log(MG_LOG_INFO, "control process started");
    else
        mg_log(MG_LOG_INFO, "worker %d started", worker_id);
    while (!w->stopping && uv_run(w->loop, UV_RUN_DEFAULT)) {
    }
    mg__lua_close(w);
    return exit_code;
}
