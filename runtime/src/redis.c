/* redis.c: the worker's one Redis connection (hiredis async on the libuv
 * loop), shared by every request of the worker: commands pipeline on it.
 *
 * States: IDLE (never used: a node whose policies do not use Redis never
 * connects), CONNECTING (the first connection: commands queue on it, under
 * their deadline), UP, DOWN (commands fail at once with "redis
 * unavailable"; a probe reconnects in the background).
 *
 * A connection counts once its handshake answered: AUTH (when a password
 * is set), SELECT (db != 0), then PING. Every command, the handshake's too,
 * has a deadline of timeout_ms. Redis answers in order and every deadline
 * is "sent + timeout_ms", so the oldest pending command has the earliest
 * one and a single timer serves them all. When it passes, on an I/O error,
 * or when the handshake fails, the connection is closed rather than kept:
 * a stuck server must not make later requests wait too. Closing fails
 * every command pending on it ("timeout" after a deadline passed, "redis
 * unavailable" otherwise) and the state goes DOWN. The probe then opens a
 * new connection after min(timeout_ms, 1000) ms, doubling up to 5 s
 * while it keeps failing; when its PING answers the state goes UP. One log
 * line per state change (down with the reason, up), none per request or
 * per failed probe.
 *
 * A reply reaches its request synchronously: hiredis' reply callback
 * resumes the request's coroutine, which reads the reply (mg_redis_reply)
 * and converts it before it next yields or returns, so nothing is copied.
 * A request that ends while it waits detaches its command
 * (mg__redis_detach): the reply or failure that comes later finds no
 * request and is dropped.
 *
 * Costs per command: a pooled slot here; hiredis mallocs the formatted
 * command, its callback entry and the reply objects, and frees them once
 * the reply is handled (its API has no way to pool them). The no-DNS rule:
 * node.c resolves redis.host once, in the master; hiredis gets an address.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

/* hiredis' libuv adapter is a header of static functions */
#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "mg.h"

#define PROBE_MAX_MS 5000
#define CMD_POOL_MAX 4096 /* idle command slots kept */
#define FLAT_KEEP 4096    /* reply values kept between replies */

enum { ST_IDLE = 0, ST_CONNECTING, ST_UP, ST_DOWN };
enum { CMD_REQ = 0, CMD_AUTH, CMD_SELECT, CMD_PING };

typedef struct mg_redis_cmd_s {
    mg_link_t link; /* in R.pending (sent order = answer order), or R.free */
    mg_req_t *req;  /* the waiting request; NULL: detached, or a handshake step */
    uint64_t deadline_ms;
    int kind; /* CMD_* */
} redis_cmd_t;

static struct {
    uv_loop_t *loop; /* NULL until the first use */
    const mg_redis_conf_t *conf;
    redisAsyncContext *ac; /* the current connection, or NULL */
    int state;
    mg_link_t pending;
    mg_link_t free;
    uint32_t nfree;
    uv_timer_t deadline_timer;
    uv_timer_t probe_timer;
    uint32_t probe_ms; /* the next probe's delay */
    char addr[96];     /* "host:port", for the log */
    /* the reply that the request being resumed may read */
    mg_req_t *reply_req;
    redisReply *reply;
    const char *reply_err;
    mg_redis_value_t *flat;
    size_t flat_cap;
} R;

static void open_conn(void);

static uint64_t now_ms(void)
{
    return mg__now_ns() / 1000000u;
}

/* ---- command slots --------------------------------------------------------------- */

static redis_cmd_t *cmd_get(void)
{
    redis_cmd_t *c;
    if (!mg_list_empty(&R.free)) {
        mg_link_t *l = R.free.next;
        mg_list_remove(l);
        R.nfree--;
        c = mg_container_of(l, redis_cmd_t, link);
    } else {
        c = malloc(sizeof(*c));
        if (!c) return NULL;
        mg_list_init(&c->link);
    }
    c->req = NULL;
    return c;
}

static void cmd_put(redis_cmd_t *c)
{
    if (R.nfree < CMD_POOL_MAX) {
        mg_list_insert_head(&R.free, &c->link);
        R.nfree++;
        return;
    }
    free(c);
}

/* ---- state changes ----------------------------------------------------------------- */

static void on_probe(uv_timer_t *t)
{
    (void)t;
    if (R.state == ST_DOWN && !R.ac) open_conn();
}

/* The connection is gone (or never came): DOWN, logged when it was not
 * already, and the next probe scheduled. */
static void went_down(const char *reason)
{
    uint32_t first = R.conf->timeout_ms < 1000 ? R.conf->timeout_ms : 1000;
    if (R.state != ST_DOWN) {
        mg_log(MG_LOG_ERROR, "redis %s down: %s", R.addr, reason);
        R.state = ST_DOWN;
        R.probe_ms = first;
    }
    uv_timer_start(&R.probe_timer, on_probe, R.probe_ms, 0);
    R.probe_ms = R.probe_ms * 2 > PROBE_MAX_MS ? (first > PROBE_MAX_MS ? first : PROBE_MAX_MS)
                                               : R.probe_ms * 2;
}

static void went_up(void)
{
    if (R.state == ST_UP) return;
    /* warn when it ends an outage, so a level that shows the down line shows
     * its end too */
    mg_log(R.state == ST_DOWN ? MG_LOG_WARN : MG_LOG_INFO, "redis %s up", R.addr);
    R.state = ST_UP;
    uv_timer_stop(&R.probe_timer);
}

/* We close the current connection. Its pending commands fail with `fail`
 * (NULL: "redis unavailable"), now or, inside a hiredis callback, as soon
 * as that returns (redisAsyncFree defers itself there). */
static void drop(const char *reason, const char *fail)
{
    redisAsyncContext *ac = R.ac;
    if (!ac) return;
    R.ac = NULL;
    ac->data = (void *)(uintptr_t)fail;
    went_down(reason);
    redisAsyncFree(ac);
}

/* hiredis closes ac itself (I/O error, EOF, refused connect): forget it. */
static void lost(const redisAsyncContext *ac, const char *reason)
{
    if (ac != R.ac) return; /* already dropped, or an older connection */
    R.ac = NULL;
    went_down(reason);
}

/* ---- deadlines ---------------------------------------------------------------------- */

static void on_deadline(uv_timer_t *t);

static void arm_deadline(void)
{
    /* An armed timer is never later than the oldest pending deadline (it was
     * set for an older command's), so an active one is left alone: when it
     * fires early, on_deadline re-arms it. */
    if (mg_list_empty(&R.pending) || uv_is_active((uv_handle_t *)&R.deadline_timer)) return;
    redis_cmd_t *c = mg_container_of(R.pending.next, redis_cmd_t, link);
    uint64_t now = now_ms();
    uv_timer_start(&R.deadline_timer, on_deadline, c->deadline_ms > now ? c->deadline_ms - now : 0,
                   0);
}

static void on_deadline(uv_timer_t *t)
{
    (void)t;
    if (mg_list_empty(&R.pending)) return;
    redis_cmd_t *c = mg_container_of(R.pending.next, redis_cmd_t, link);
    if (c->deadline_ms > now_ms()) {
        arm_deadline();
        return;
    }
    assert(R.ac); /* pending commands all belong to the current connection */
    char why[64];
    snprintf(why, sizeof(why), "no answer within %u ms", R.conf->timeout_ms);
    drop(why, "timeout");
}

/* ---- replies -------------------------------------------------------------------------- */

/* Hands the outcome to the waiting request, if it still waits, and runs it
 * until it yields again or ends. */
static void complete(redis_cmd_t *c, redisReply *reply, const char *err)
{
    mg_req_t *r = c->req;
    cmd_put(c);
    if (!r) return; /* the request ended meanwhile */
    assert(r->redis_cmd == c && r->wait == MG_WAIT_REDIS);
    r->redis_cmd = NULL;
    r->wait = MG_WAIT_NONE;
    mg_req_t *saved_req = R.reply_req;
    redisReply *saved = R.reply;
    const char *saved_err = R.reply_err;
    R.reply_req = r;
    R.reply = reply;
    R.reply_err = err;
    mg__lua_resume(r); /* r may be freed when this returns */
    R.reply_req = saved_req;
    R.reply = saved;
    R.reply_err = saved_err;
}

static void handshake_reply(const redisAsyncContext *ac, int kind, const redisReply *reply)
{
    if (ac != R.ac) return; /* a connection we dropped */
    if (reply->type == REDIS_REPLY_ERROR) {
        char why[256];
        const char *what = kind == CMD_AUTH ? "AUTH" : kind == CMD_SELECT ? "SELECT" : "PING";
        snprintf(why, sizeof(why), "%s failed: %.*s", what,
                 (int)(reply->len > 200 ? 200 : reply->len), reply->str);
        drop(why, NULL);
        return;
    }
    if (kind == CMD_PING) went_up();
}

static void on_reply(redisAsyncContext *ac, void *reply_, void *privdata)
{
    redisReply *reply = reply_;
    redis_cmd_t *c = privdata;
    mg_list_remove(&c->link);
    if (!reply) {
        /* ac is being freed: by drop() (ac->data says why), or by hiredis
         * after an I/O error, which this is the first sign of */
        lost(ac, ac->c.errstr[0] ? ac->c.errstr : "connection closed");
        complete(c, NULL, ac->data ? (const char *)ac->data : "redis unavailable");
        return;
    }
    if (c->kind != CMD_REQ) {
        int kind = c->kind;
        cmd_put(c);
        handshake_reply(ac, kind, reply);
        return;
    }
    complete(c, reply, NULL);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    if (status == REDIS_OK) return; /* up once the handshake's PING answers */
    char why[160];
    snprintf(why, sizeof(why), "connect: %s", ac->c.errstr[0] ? ac->c.errstr : "failed");
    lost(ac, why);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    lost(ac, ac->c.errstr[0] ? ac->c.errstr : "connection closed");
}

/* ---- sending ------------------------------------------------------------------------- */

/* Queues c on the current connection; on failure c is back in the pool. */
static int send_cmd(redis_cmd_t *c, int argc, const char **argv, const size_t *argvlen)
{
    c->deadline_ms = now_ms() + R.conf->timeout_ms;
    if (redisAsyncCommandArgv(R.ac, on_reply, c, argc, argv, argvlen) != REDIS_OK) {
        cmd_put(c);
        return -1;
    }
    mg_list_insert_head(R.pending.prev, &c->link); /* at the tail */
    arm_deadline();
    return 0;
}

static int send_step(int kind, int argc, const char **argv, const size_t *argvlen)
{
    redis_cmd_t *c = cmd_get();
    if (!c) return -1;
    c->kind = kind;
    return send_cmd(c, argc, argv, argvlen);
}

/* The libuv adapter's event hooks, with two changes, both on its
 * uv_poll handle:
 * - its poll callback drops a socket error: a peer's reset makes epoll
 *   report EPOLLERR, libuv stops the handle and calls back with UV_EBADF,
 *   and the adapter returns, so hiredis would never hear of it and waiting
 *   commands would sit there until their deadline. Ours drops the
 *   connection at once.
 * - hiredis re-adds read interest after every read and write, and each
 *   uv_poll_start costs an epoll_ctl DEL + ADD even when the mask does not
 *   change: those calls are skipped (7 epoll_ctl per command before, 4).
 * The adapter still allocates, attaches and cleans up its handle. */
static void on_poll(uv_poll_t *h, int status, int events)
{
    redisLibuvEvents *p = h->data;
    if (!p->context) return; /* freed; the handle is closing */
    if (status < 0) {
        if (p->context == R.ac) {
            /* libuv says EBADF for any EPOLLERR; the socket knows better */
            int err = 0;
            socklen_t len = sizeof(err);
            char why[96];
            getsockopt(p->context->c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
            snprintf(why, sizeof(why), "socket error: %s",
                     err ? strerror(err) : uv_strerror(status));
            drop(why, NULL);
        }
        return;
    }
    if (events & UV_READABLE) redisAsyncHandleRead(p->context);
    if (p->context && (events & UV_WRITABLE)) redisAsyncHandleWrite(p->context);
}

static void ev_set(void *pd, int events)
{
    redisLibuvEvents *p = pd;
    if (events == p->events) return;
    p->events = events;
    if (events)
        uv_poll_start(&p->handle, events, on_poll);
    else
        uv_poll_stop(&p->handle);
}
static void ev_add_read(void *pd)
{
    ev_set(pd, ((redisLibuvEvents *)pd)->events | UV_READABLE);
}
static void ev_del_read(void *pd)
{
    ev_set(pd, ((redisLibuvEvents *)pd)->events & ~UV_READABLE);
}
static void ev_add_write(void *pd)
{
    ev_set(pd, ((redisLibuvEvents *)pd)->events | UV_WRITABLE);
}
static void ev_del_write(void *pd)
{
    ev_set(pd, ((redisLibuvEvents *)pd)->events & ~UV_WRITABLE);
}

/* A new connection and its handshake (hiredis buffers the commands until
 * the connect completes). */
static void open_conn(void)
{
    const mg_redis_conf_t *rc = R.conf;
    redisAsyncContext *ac = redisAsyncConnect(rc->ip, rc->port);
    if (!ac) {
        went_down("connect: out of memory");
        return;
    }
    if (ac->err) {
        char why[160];
        snprintf(why, sizeof(why), "connect: %s", ac->c.errstr);
        redisAsyncFree(ac);
        went_down(why);
        return;
    }
    if (redisLibuvAttach(ac, R.loop) != REDIS_OK) {
        redisAsyncFree(ac);
        went_down("connect: cannot watch the socket");
        return;
    }
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->data = NULL;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    R.ac = ac;

    int rv = 0;
    if (rc->has_password) {
        const char *argv[] = {"AUTH", rc->password};
        size_t lens[] = {4, strlen(rc->password)};
        rv = send_step(CMD_AUTH, 2, argv, lens);
    }
    if (rv == 0 && rc->db) {
        char db[16];
        int n = snprintf(db, sizeof(db), "%u", rc->db);
        const char *argv[] = {"SELECT", db};
        size_t lens[] = {6, (size_t)n};
        rv = send_step(CMD_SELECT, 2, argv, lens);
    }
    if (rv == 0) {
        const char *argv[] = {"PING"};
        size_t lens[] = {4};
        rv = send_step(CMD_PING, 1, argv, lens);
    }
    if (rv != 0) drop("connect: cannot queue the handshake", NULL);
}

/* The first use in a worker: set up and connect. -1 outside a worker (the
 * master's or `moongate check`'s Lua state loading a policy). */
static int start(void)
{
    if (R.loop) return 0;
    mg_worker_t *w = mg__worker;
    if (!w || !w->loop) return -1;
    R.loop = w->loop;
    R.conf = &w->conf->redis;
    mg_list_init(&R.pending);
    mg_list_init(&R.free);
    uv_timer_init(R.loop, &R.deadline_timer);
    uv_timer_init(R.loop, &R.probe_timer);
    /* background work: neither keeps a draining worker's loop alive */
    uv_unref((uv_handle_t *)&R.deadline_timer);
    uv_unref((uv_handle_t *)&R.probe_timer);
    snprintf(R.addr, sizeof(R.addr), strchr(R.conf->ip, ':') ? "[%s]:%d" : "%s:%d", R.conf->ip,
             R.conf->port);
    R.state = ST_CONNECTING;
    open_conn();
    return 0;
}

/* ---- FFI ------------------------------------------------------------------------------- */

/* Commands that would change the shared connection's state for every
 * request of the worker (pub/sub, MULTI, a db or user switch, CLIENT
 * REPLY), or hold it (blocking pops): refused. */
static int refused(const char *name, size_t len)
{
    static const char *const names[] = {
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
        "MONITOR",   "QUIT",       "RESET",      "HELLO",       "AUTH",         "SELECT",
        "CLIENT",    "MULTI",      "EXEC",       "DISCARD",     "WATCH",        "UNWATCH",
        "BLPOP",     "BRPOP",      "BRPOPLPUSH", "BLMOVE",      "BLMPOP",       "BZPOPMIN",
        "BZPOPMAX",  "BZMPOP",     "WAIT",       "WAITAOF",     "SYNC",         "PSYNC",
        "SHUTDOWN",  "DEBUG",
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (mg__strieq(name, len, names[i], strlen(names[i]))) return 1;
    return 0;
}

int mg_redis_state(void)
{
    if (start() < 0) return MG_REDIS_DOWN;
    return R.state == ST_UP     ? MG_REDIS_UP
           : R.state == ST_DOWN ? MG_REDIS_DOWN
                                : MG_REDIS_CONNECTING;
}

int mg_redis_command(mg_req_t *r, int argc, const char **argv, const size_t *argvlen)
{
    if (!r || argc < 1 || !argv || !argvlen || r->wait != MG_WAIT_NONE) return MG_EINVAL;
    if (refused(argv[0], argvlen[0])) return MG_EINVAL;
    if (start() < 0 || R.state == ST_DOWN || !R.ac) return MG_DECLINED;
    redis_cmd_t *c = cmd_get();
    if (!c) return MG_ERROR;
    c->kind = CMD_REQ;
    c->req = r;
    if (send_cmd(c, argc, argv, argvlen) < 0) return MG_DECLINED;
    r->redis_cmd = c;
    r->wait = MG_WAIT_REDIS;
    return MG_AGAIN;
}

static size_t count_values(const redisReply *x)
{
    size_t n = 1;
    if (x->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i < x->elements; i++)
            n += count_values(x->element[i]);
    return n;
}

/* Pre-order: an array's elements follow it. Recursion depth is bounded by
 * hiredis' reader (9 levels of nesting). */
static void flatten(const redisReply *x, size_t *at)
{
    mg_redis_value_t *v = &R.flat[(*at)++];
    v->n = 0;
    v->integer = 0;
    v->str = NULL;
    v->len = 0;
    switch (x->type) {
    case REDIS_REPLY_INTEGER:
        v->type = MG_REDIS_INTEGER;
        v->integer = x->integer;
        return;
    case REDIS_REPLY_STRING: v->type = MG_REDIS_STRING; break;
    case REDIS_REPLY_STATUS: v->type = MG_REDIS_STATUS; break;
    case REDIS_REPLY_ERROR: v->type = MG_REDIS_ERROR; break;
    case REDIS_REPLY_NIL: v->type = MG_REDIS_NIL; return;
    case REDIS_REPLY_ARRAY:
        v->type = MG_REDIS_ARRAY;
        v->n = (uint32_t)x->elements;
        for (size_t i = 0; i < x->elements; i++)
            flatten(x->element[i], at);
        return;
    default: /* none other in RESP2 */
        v->type = MG_REDIS_ERROR;
        v->str = "ERR unknown reply type";
        v->len = strlen(v->str);
        return;
    }
    v->str = x->str;
    v->len = x->len;
}

/* r is only compared: the API takes the handle as every mg_req_* does */
// cppcheck-suppress constParameter
int mg_redis_reply(mg_req_t *r, const mg_redis_value_t **values, size_t *n, const char **err)
{
    *values = NULL;
    *n = 0;
    *err = NULL;
    if (!r || r != R.reply_req) return MG_DECLINED;
    if (!R.reply) {
        *err = R.reply_err;
        return MG_ERROR;
    }
    size_t count = count_values(R.reply);
    /* one buffer for the worker, kept between replies; an outsized one
     * (a huge array) is not kept */
    if (count > R.flat_cap || (R.flat_cap > FLAT_KEEP && count <= FLAT_KEEP)) {
        size_t cap = count > FLAT_KEEP ? count : FLAT_KEEP;
        mg_redis_value_t *f = realloc(R.flat, cap * sizeof(*f));
        if (!f) {
            *err = "out of memory";
            return MG_ERROR;
        }
        R.flat = f;
        R.flat_cap = cap;
    }
    size_t at = 0;
    flatten(R.reply, &at);
    assert(at == count);
    *values = R.flat;
    *n = count;
    return MG_OK;
}

void mg__redis_detach(mg_req_t *r)
{
    if (r->redis_cmd) {
        r->redis_cmd->req = NULL;
        r->redis_cmd = NULL;
    }
    if (R.reply_req == r) R.reply_req = NULL;
}
