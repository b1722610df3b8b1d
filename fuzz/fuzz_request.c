/* fuzz_request.c: libFuzzer target for one downstream connection's request
 * path of the real runtime (conn.c, req.c, lua.c, and proxy.c in proxy
 * mode), with the LuaJIT state and its handler loaded as in a worker.
 *
 * Modes (chosen at build time, one worker per process):
 *   mock  (default)    the worker runs lua/moongate/mock.lua, which echoes
 *                      the request as JSON and reads its body.
 *   proxy (-DFUZZ_PROXY) the worker runs lua/moongate/worker.lua over routes
 *                      pointing at a tiny libuv backend on the same loop,
 *                      whose answer is part of the input.
 *
 * Input format:
 *   client bytes [ UPSTREAM_MARK answer [ NEXT_MARK answer ]... ]  (proxy mode)
 *   client bytes                                                    (mock mode)
 * Each part is cut into pieces at SPLIT_MARK; pieces are written one at a
 * time with the loop run in between, so reads arrive in several pieces.
 * A part that ends with SPLIT_MARK means "stay open": the client keeps its
 * write side open while the timers fire (header/body/keep-alive timeouts);
 * otherwise it half-closes after its last piece. In proxy mode the backend
 * gives the n-th request head it sees the n-th answer (the last one for
 * all after it; without UPSTREAM_MARK, a 200 "ok"), one piece a loop turn,
 * and closes its connection after an answer that ends with SPLIT_MARK
 * (an empty one: closes without a word).
 *
 * Time: nothing sleeps. When the connection has gone quiet the harness
 * fires the earliest armed timer of the loop by hand (as if time had jumped
 * to it), which makes timeouts and Lua sleeps deterministic and fast.
 *
 * Oracle: besides ASan/UBSan/asserts, whatever the gateway writes to the
 * client must parse as a stream of HTTP/1.x responses (a cut is allowed:
 * the gateway may close mid-response); anything llhttp rejects aborts.
 *
 * Environment: MOONGATE_LUA_DIR (default: <exe>/../../lua), FUZZ_LOG=debug|
 * info|warn|error (default: silent), FUZZ_ORACLE=0 to turn the oracle off,
 * FUZZ_DUMP=1 to copy what the gateway wrote to the client onto stderr,
 * FUZZ_NO_BUDGET=1 to let Lua run without an instruction budget (and JIT).
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>

#include "llhttp.h"
#include "mg.h"

#define SPLIT_MARK "\xfe\xff"
#define SPLIT_LEN 2
#define UPSTREAM_MARK "\xfe\xfdUPSTREAM\xfe\xfd"
#define UPSTREAM_LEN 12
#define NEXT_MARK "\xfe\xfdNEXT\xfe\xfd"
#define NEXT_LEN 8
#define MAX_ANSWERS 8
#define MAX_PIECES 64
#define PUMP_ITERS 64  /* loop turns per phase; the loop never blocks */
#define MAX_WARPS 24   /* timers fired by hand per input */
#define MAX_STEPS 4000 /* loop turns per input, all phases together */

static mg_node_conf_t conf;
static uv_loop_t *loop;
static int client_fd = -1;
static int oracle_on = 1;
static int dump_on; /* FUZZ_DUMP=1: copy what the gateway wrote to stderr */
static int steps;

typedef struct piece_s {
    const uint8_t *p;
    size_t n;
} piece_t;

/* Cuts data at SPLIT_MARK; *hold: the part ended with the mark. */
static int split_pieces(const uint8_t *d, size_t n, piece_t *out, int *hold)
{
    int np = 0;
    *hold = 0;
    while (np < MAX_PIECES) {
        const uint8_t *m = n >= SPLIT_LEN ? memmem(d, n, SPLIT_MARK, SPLIT_LEN) : NULL;
        if (!m || np == MAX_PIECES - 1) {
            out[np].p = d;
            out[np].n = n;
            np++;
            break;
        }
        out[np].p = d;
        out[np].n = (size_t)(m - d);
        np++;
        n -= (size_t)(m - d) + SPLIT_LEN;
        d = m + SPLIT_LEN;
        if (n == 0) {
            *hold = 1;
            break;
        }
    }
    return np;
}

/* ---- the response oracle --------------------------------------------------- */

static llhttp_t resp_parser;
static llhttp_settings_t resp_settings;
static int resp_broken; /* stop checking after the first complaint */

/* The methods of the requests in the input, in order, as llhttp reads
 * them: a response to HEAD has no body whatever its framing says, and
 * responses come back in request order. */
#define MAX_METHODS 512
static uint8_t methods[MAX_METHODS];
static int nmethods, nfinal;

static int on_request_head(llhttp_t *p)
{
    if (nmethods < MAX_METHODS) methods[nmethods++] = (uint8_t)p->method;
    return 0;
}

/* RFC 9110: 1xx, 204 and 304 responses and responses to HEAD have no
 * content, whatever their Content-Length says; llhttp leaves that to its
 * user. */
static int oracle_headers_complete(llhttp_t *p)
{
    int st = p->status_code;
    if (st < 200) return 1;
    int i = nfinal++;
    if (st == 204 || st == 304) return 1;
    return i < nmethods && methods[i] == HTTP_HEAD ? 1 : 0;
}

static void oracle_reset(const piece_t *pieces, int np)
{
    llhttp_t req;
    llhttp_settings_t rs;
    llhttp_settings_init(&rs);
    rs.on_headers_complete = on_request_head;
    llhttp_init(&req, HTTP_REQUEST, &rs);
    nmethods = nfinal = 0;
    for (int i = 0; i < np; i++)
        if (llhttp_execute(&req, (const char *)pieces[i].p, pieces[i].n) != HPE_OK) break;
    llhttp_settings_init(&resp_settings);
    resp_settings.on_headers_complete = oracle_headers_complete;
    llhttp_init(&resp_parser, HTTP_RESPONSE, &resp_settings);
    resp_broken = 0;
}

static void oracle_feed(const char *p, size_t n)
{
    if (!oracle_on || resp_broken || n == 0) return;
    llhttp_errno_t e = llhttp_execute(&resp_parser, p, n);
    if (e == HPE_OK) return;
    if (e == HPE_PAUSED_UPGRADE) { /* we never upgrade; nothing after it is HTTP */
        resp_broken = 1;
        return;
    }
    fprintf(stderr, "fuzz oracle: the gateway wrote an invalid HTTP response stream: %s (%s)\n",
            llhttp_errno_name(e), llhttp_get_error_reason(&resp_parser));
    abort();
}

/* Reads and checks what the gateway wrote, at most DRAIN_BYTES a loop
 * turn: with the gateway's small send buffer (SO_SNDBUF) its writes go
 * pending and complete later, as with a slow client, so the write
 * callbacks and the backpressure paths run too. */
#define DRAIN_BYTES 16384
static void drain_client(void)
{
    static char buf[DRAIN_BYTES];
    size_t got = 0;
    if (client_fd < 0) return;
    while (got < DRAIN_BYTES) {
        ssize_t n = read(client_fd, buf, sizeof(buf) - got);
        if (n > 0) {
            got += (size_t)n;
            if (dump_on) fwrite(buf, 1, (size_t)n, stderr);
            oracle_feed(buf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        return; /* EAGAIN, EOF or error */
    }
}

/* ---- the backend (proxy mode) ---------------------------------------------- */

#ifdef FUZZ_PROXY
typedef struct answer_s {
    piece_t pieces[MAX_PIECES];
    int np;
    int close_after;
} answer_t;

typedef struct bconn_s {
    uv_tcp_t tcp;
    struct bconn_s *next;
    const answer_t *ans;
    int answering; /* the next piece of ans to write, or -1 */
    int seen;      /* bytes of "\r\n\r\n" matched so far */
    int closing;
} bconn_t;

typedef struct {
    uv_write_t w;
    uv_buf_t b;
} bwrite_t;

static uv_tcp_t bserver;
static int bport;
static bconn_t *bconns;
static answer_t answers[MAX_ANSWERS];
static int nanswers, next_answer;
static const char default_answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/* Cuts the upstream part into answers at NEXT_MARK, each into pieces. */
static void split_answers(const uint8_t *d, size_t n)
{
    nanswers = next_answer = 0;
    while (nanswers < MAX_ANSWERS) {
        const uint8_t *m = n >= NEXT_LEN ? memmem(d, n, NEXT_MARK, NEXT_LEN) : NULL;
        size_t len = m && nanswers < MAX_ANSWERS - 1 ? (size_t)(m - d) : n;
        answer_t *a = &answers[nanswers++];
        a->np = split_pieces(d, len, a->pieces, &a->close_after);
        if (len == n) break;
        d += len + NEXT_LEN;
        n -= len + NEXT_LEN;
    }
}

static void on_bconn_closed(uv_handle_t *h)
{
    bconn_t *b = h->data;
    for (bconn_t **pp = &bconns; *pp; pp = &(*pp)->next)
        if (*pp == b) {
            *pp = b->next;
            break;
        }
    free(b);
}

static void bconn_close(bconn_t *b)
{
    if (b->closing) return;
    b->closing = 1;
    uv_close((uv_handle_t *)&b->tcp, on_bconn_closed);
}

static void on_balloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    static char space[65536];
    (void)h;
    (void)hint;
    buf->base = space;
    buf->len = sizeof(space);
}

/* Answers once per request head seen (a blank line ends it). */
static void on_bread(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    bconn_t *b = s->data;
    if (n < 0) {
        bconn_close(b);
        return;
    }
    static const char end[] = "\r\n\r\n";
    for (ssize_t i = 0; i < n; i++) {
        b->seen = buf->base[i] == end[b->seen] ? b->seen + 1 : (buf->base[i] == '\r');
        if (b->seen == 4) {
            b->seen = 0;
            if (b->answering < 0) {
                b->ans = &answers[next_answer < nanswers - 1 ? next_answer++ : nanswers - 1];
                b->answering = 0;
            }
        }
    }
    /* Like a busy backend, read no more while answering: the rest of a
     * request body then waits in the gateway (pending writes). */
    if (b->answering >= 0) uv_read_stop(s);
}

static void on_bwritten(uv_write_t *w, int status)
{
    (void)status;
    free(w);
}

/* One loop turn of the backend: the next piece of each answer. */
static int backend_tick(void)
{
    int busy = 0;
    for (bconn_t *b = bconns; b; b = b->next) {
        if (b->closing || b->answering < 0) continue;
        busy = 1;
        const piece_t *pc = &b->ans->pieces[b->answering];
        if (pc->n) {
            bwrite_t *w = malloc(sizeof(*w));
            if (!w) abort();
            w->b = uv_buf_init((char *)pc->p, (unsigned)pc->n);
            if (uv_write(&w->w, (uv_stream_t *)&b->tcp, &w->b, 1, on_bwritten) != 0) free(w);
        }
        if (++b->answering == b->ans->np) {
            b->answering = -1;
            if (b->ans->close_after)
                bconn_close(b);
            else
                uv_read_start((uv_stream_t *)&b->tcp, on_balloc, on_bread);
        }
    }
    return busy;
}

static int is_backend(const uv_handle_t *h)
{
    if (h == (const uv_handle_t *)&bserver) return 1;
    for (const bconn_t *b = bconns; b; b = b->next)
        if (h == (const uv_handle_t *)&b->tcp) return 1;
    return 0;
}

/* The gateway's own upstream sockets (found on the loop: they live in this
 * process too) get a small send buffer, so request bodies of a few KiB
 * already make their writes go pending (loopback TCP takes megabytes). */
static void shrink_gateway_sndbuf(uv_handle_t *h, void *arg)
{
    uv_os_fd_t fd;
    int small = 4096;
    (void)arg;
    if (h->type != UV_TCP || uv_is_closing(h) || is_backend(h)) return;
    if (uv_fileno(h, &fd) == 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
}

static void on_bconnection(uv_stream_t *server, int status)
{
    if (status < 0) return;
    bconn_t *b = calloc(1, sizeof(*b));
    if (!b) abort();
    uv_tcp_init(loop, &b->tcp);
    b->tcp.data = b;
    b->answering = -1;
    if (uv_accept(server, (uv_stream_t *)&b->tcp) != 0) {
        b->closing = 1;
        uv_close((uv_handle_t *)&b->tcp, (uv_close_cb)free);
        return;
    }
    b->next = bconns;
    bconns = b;
    uv_walk(loop, shrink_gateway_sndbuf, NULL);
    uv_read_start((uv_stream_t *)&b->tcp, on_balloc, on_bread);
}

static void backend_start(void)
{
    struct sockaddr_in a;
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_os_fd_t fd;
    int small = 4096; /* a small window: the gateway's upstream writes go pending */
    if (uv_tcp_init(loop, &bserver) || uv_tcp_bind(&bserver, (struct sockaddr *)&a, 0) ||
        uv_fileno((uv_handle_t *)&bserver, &fd) ||
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) ||
        uv_listen((uv_stream_t *)&bserver, 128, on_bconnection) ||
        uv_tcp_getsockname(&bserver, (struct sockaddr *)&ss, &len)) {
        fprintf(stderr, "fuzz: cannot start the backend\n");
        exit(1);
    }
    bport = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "fuzz: cannot write %s\n", path);
        exit(1);
    }
}

/* A node config and routes in a temporary directory, for worker.lua. */
static void proxy_conf(const char *fuzz_dir)
{
    static char dir[] = "/tmp/moongate-fuzz-XXXXXX";
    char path[PATH_MAX], text[4096];
    if (!mkdtemp(dir)) {
        perror("fuzz: mkdtemp");
        exit(1);
    }
    snprintf(text, sizeof(text),
             "{\"config_source\": {\"type\": \"file\", \"path\": \"routes.json\"},\n"
             " \"lua_path\": [\"%s/policies\"],\n"
             " \"log\": {\"level\": \"error\", \"access\": \"off\"}}\n",
             fuzz_dir);
    snprintf(path, sizeof(path), "%s/moongate.json", dir);
    write_file(path, text);
    snprintf(conf.conf_path, sizeof(conf.conf_path), "%s", path);
    snprintf(conf.prefix, sizeof(conf.prefix), "%s", dir);
    snprintf(
        text, sizeof(text),
        "{\"upstreams\": [{\"id\": \"b\", \"targets\": [{\"host\": \"127.0.0.1\", \"port\": %d}],\n"
        "   \"timeouts\": {\"connect_ms\": 15000, \"send_ms\": 16000, \"read_ms\": 17000},\n"
        "   \"keepalive\": {\"size\": 4, \"idle_timeout_ms\": 18000, \"requests\": 3}}],\n"
        " \"routes\": [\n"
        "  {\"id\": \"strip\", \"paths\": [\"/strip/*\"], \"upstream\": \"b\", \"strip_prefix\": "
        "true},\n"
        "  {\"id\": \"pol\", \"paths\": [\"/p/*\"], \"upstream\": \"b\",\n"
        "   \"policies\": [{\"name\": \"fuzz-edit\"},\n"
        /* breaker hooks on every end of an exchange (state persists across
         * inputs: it opens, half-opens and closes as the answers go) */
        "    {\"name\": \"circuit-breaker\", \"conf\": {\"min_requests\": 4, \"open_ms\": 20,\n"
        "     \"probes\": 2, \"close_after\": 1, \"slow_ms\": 5, \"slow_rate\": 0.9}}]},\n"
        "  {\"id\": \"pp\", \"paths\": [\"/pp/:a/*\"], \"upstream\": \"b\", "
        "\"strip_prefix\": true,\n"
        "   \"policies\": [{\"name\": \"fuzz-edit\"}]},\n"
        "  {\"id\": \"exact\", \"paths\": [\"/exact\"], \"methods\": [\"GET\", \"POST\"], "
        "\"upstream\": "
        "\"b\"},\n"
        "  {\"id\": \"host\", \"hosts\": [\"*.example.com\"], \"paths\": [\"/h/:id\"], "
        "\"upstream\": "
        "\"b\"},\n"
        "  {\"id\": \"noup\", \"paths\": [\"/noup\"]},\n"
        "  {\"id\": \"all\", \"paths\": [\"/*\"], \"upstream\": \"b\"}]}\n",
        bport);
    snprintf(path, sizeof(path), "%s/routes.json", dir);
    write_file(path, text);
}
#endif

/* ---- driving the loop --------------------------------------------------------- */

static int backend_busy(void)
{
#ifdef FUZZ_PROXY
    return backend_tick();
#else
    return 0;
#endif
}

/* Runs the loop without blocking until the connection is gone and the
 * backend has nothing left to say, or for at most `iters` turns. */
static void pump(int iters)
{
    for (int i = 0; i < iters && steps < MAX_STEPS; i++, steps++) {
        int busy = backend_busy();
        uv_run(loop, UV_RUN_NOWAIT);
        drain_client();
        if (!busy && mg__worker->nconns == 0) return;
    }
}

static void find_earliest(uv_handle_t *h, void *arg)
{
    uv_timer_t **best = arg;
    if (h->type != UV_TIMER || !uv_is_active(h) || uv_is_closing(h)) return;
    uv_timer_t *t = (uv_timer_t *)h;
    if (!*best || uv_timer_get_due_in(t) < uv_timer_get_due_in(*best)) *best = t;
}

/* Fires the earliest armed timer now, as libuv would once its time came.
 * Returns 0 when no timer is armed. */
static int warp(void)
{
    uv_timer_t *t = NULL;
    uv_walk(loop, find_earliest, &t);
    if (!t) return 0;
    uv_timer_cb cb = t->timer_cb; /* libuv's own field: the callback to run */
    uint64_t repeat = uv_timer_get_repeat(t);
    uv_timer_stop(t);
    if (repeat) uv_timer_start(t, cb, repeat, repeat);
    cb(t);
    return 1;
}

/* Writes one piece to the gateway, running the loop while the socket is full. */
static void send_piece(const piece_t *pc)
{
    size_t off = 0;
    int stuck = 0;
    while (off < pc->n && stuck < PUMP_ITERS) {
        ssize_t n = write(client_fd, pc->p + off, pc->n - off);
        if (n > 0) {
            off += (size_t)n;
            stuck = 0;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN) return; /* the gateway closed */
        stuck++;
        pump(1);
    }
}

static void close_all_conns(void)
{
    mg_worker_t *w = mg__worker;
    while (!mg_list_empty(&w->conns))
        mg__conn_close(mg_container_of(w->conns.next, mg_conn_t, link));
}

/* ---- a Lua budget ------------------------------------------------------------------
 * A handler that loops without yielding (the mock asked for bytes=1e30
 * with status=304: every write is refused, none yields) would hang the
 * worker and the fuzzer with it. Count hooks (which also keep LuaJIT in
 * its interpreter, where they run) raise an error once an input has run
 * too many instructions; the request then fails as a policy error would.
 * The JIT is off for it (count hooks do not run in compiled traces).
 * Normal inputs run a few thousand instructions. */
#define LUA_HOOK_EVERY 10000
#define LUA_BUDGET_HOOKS 1000 /* 10M instructions per input */
static int lua_hooks;

static void lua_budget_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    if (++lua_hooks > LUA_BUDGET_HOOKS) luaL_error(L, "fuzz: Lua instruction budget exhausted");
}

/* ---- libFuzzer entry points ------------------------------------------------------ */

/* LuaJIT allocates its heap with mmap, which LeakSanitizer does not scan:
 * C memory that only Lua points at (cjson's encode buffer, config-held
 * upstreams and circuit breakers) looks leaked at exit. Each input ends with a full GC, so
 * request-scoped objects (sha256 states) are really freed and checked. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
    return "leak:cjson.so\n"
           "leak:mg_upstream_new\n"
           "leak:mg_upstream_breaker_new\n";
}

const char *__lsan_default_options(void);
const char *__lsan_default_options(void)
{
    return "print_suppressions=0";
}

static void find_dirs(char *lua_root, size_t len, char *fuzz_dir, size_t flen)
{
    char exe[PATH_MAX], guess[PATH_MAX + 16], real[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) {
        perror("fuzz: readlink /proc/self/exe");
        exit(1);
    }
    exe[n] = '\0';
    const char *bin_dir = dirname(exe); /* fuzz/build */
    snprintf(guess, sizeof(guess), "%s/..", bin_dir);
    if (!realpath(guess, real)) {
        perror("fuzz: realpath");
        exit(1);
    }
    snprintf(fuzz_dir, flen, "%s", real);
    const char *env = getenv("MOONGATE_LUA_DIR");
    if (env && *env)
        snprintf(guess, sizeof(guess), "%s", env);
    else
        snprintf(guess, sizeof(guess), "%s/../lua", fuzz_dir);
    struct stat st;
    char probe[PATH_MAX + 32];
    snprintf(probe, sizeof(probe), "%s/moongate/mock.lua", guess);
    if (!realpath(guess, real) || stat(probe, &st) != 0) {
        fprintf(stderr, "fuzz: no moongate/mock.lua in %s (set MOONGATE_LUA_DIR)\n", guess);
        exit(1);
    }
    snprintf(lua_root, len, "%s", real);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char fuzz_dir[PATH_MAX];
    (void)argc;
    (void)argv;
    mg_node_defaults(&conf);
    find_dirs(conf.lua_root, sizeof(conf.lua_root), fuzz_dir, sizeof(fuzz_dir));
    /* Small limits, so that 64 KiB inputs reach every one of them. The
     * timeouts are long on purpose: they never expire on their own while
     * an input runs (however loaded the machine), only when warp() fires
     * them, which keeps runs reproducible; they are distinct so that their
     * order is fixed. */
    conf.limits.max_header_bytes = 4096;
    conf.limits.max_uri_bytes = 2048;
#ifdef FUZZ_PROXY
    conf.limits.max_body_bytes = 49152; /* more than the upstream socket takes at once */
#else
    conf.limits.max_body_bytes = 16384;
#endif
    conf.limits.client_header_timeout_ms = 10000;
    conf.limits.client_body_timeout_ms = 11000;
    conf.limits.keepalive_timeout_ms = 12000;
    conf.limits.send_timeout_ms = 13000;
    conf.limits.max_keepalive_requests = 8;
    conf.shutdown_timeout_ms = 14000;
    const char *lv = getenv("FUZZ_LOG");
    conf.log_level = lv ? mg_log_level_parse(lv) : MG_LOG_ERROR + 1;
    if (conf.log_level < 0) conf.log_level = MG_LOG_ERROR + 1;
    const char *oracle = getenv("FUZZ_ORACLE");
    oracle_on = !(oracle && strcmp(oracle, "0") == 0);
    dump_on = getenv("FUZZ_DUMP") != NULL;
    loop = uv_default_loop();
#ifdef FUZZ_PROXY
    conf.mock = 0;
    backend_start();
    proxy_conf(fuzz_dir);
#else
    (void)fuzz_dir;
    conf.mock = 1;
#endif
    if (mg__worker_init(&conf, conf.mock ? MG_ROLE_MOCK : MG_ROLE_WORKER_FILES, 0) != 0) {
        fprintf(stderr, "fuzz: worker init failed (FUZZ_LOG=error says why)\n");
        exit(1);
    }
    mg_log_level = conf.log_level;
    if (!getenv("FUZZ_NO_BUDGET")) { /* hooks do not run in compiled traces */
        luaJIT_setmode(mg__worker->L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
        lua_sethook(mg__worker->L, lua_budget_hook, LUA_MASKCOUNT, LUA_HOOK_EVERY);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    piece_t pieces[MAX_PIECES];
    int hold, np;
    size_t client_len = size;
    int sv[2];

#ifdef FUZZ_PROXY
    const uint8_t *um =
        size >= UPSTREAM_LEN ? memmem(data, size, UPSTREAM_MARK, UPSTREAM_LEN) : NULL;
    if (um) {
        client_len = (size_t)(um - data);
        split_answers(um + UPSTREAM_LEN, size - client_len - UPSTREAM_LEN);
    } else {
        split_answers((const uint8_t *)default_answer, sizeof(default_answer) - 1);
    }
#endif
    np = split_pieces(data, client_len, pieces, &hold);
    oracle_reset(pieces, np);
    steps = 0;
    lua_hooks = 0;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) abort();
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    int small = 4096; /* the kernel's minimum, about: see drain_client */
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    client_fd = sv[1];
    /* The loop's clock is cached: a stale one would arm the new
     * connection's header timer in the past. */
    uv_update_time(loop);
    if (!mg__conn_open_fd(mg__worker, sv[0])) abort();

    for (int i = 0; i < np; i++) {
        send_piece(&pieces[i]);
        pump(PUMP_ITERS);
    }
    if (!hold) shutdown(client_fd, SHUT_WR);
    pump(PUMP_ITERS);
    /* Let time pass: timeouts, Lua sleeps, the backend's silence. */
    for (int i = 0; i < MAX_WARPS && mg__worker->nconns && steps < MAX_STEPS; i++) {
        if (!warp()) break;
        pump(PUMP_ITERS);
    }
    if (hold) {
        shutdown(client_fd, SHUT_WR);
        pump(PUMP_ITERS);
    }
    /* The client goes away; then whatever is left is closed by force. */
    close(client_fd);
    client_fd = -1;
    steps = 0;
    pump(PUMP_ITERS);
    close_all_conns();
#ifdef FUZZ_PROXY
    for (bconn_t *b = bconns; b; b = b->next)
        bconn_close(b);
    mg__targets_close(mg__worker); /* each input starts with an empty pool */
#endif
    /* Close callbacks run at the end of a loop turn; a few turns settle
     * every handle (and free every connection) before the next input. */
    for (int i = 0; i < 4; i++)
        uv_run(loop, UV_RUN_NOWAIT);
    if (mg__worker->nconns) abort(); /* a connection survived close_all_conns */
    /* Finalizers (ffi.gc) run now, not during some later input. */
    lua_gc(mg__worker->L, LUA_GCCOLLECT, 0);
    return 0;
}
