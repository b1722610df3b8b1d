/* proxy.c: upstreams, their connection pools, and forwarding.
 *
 * Targets (host:port) are per worker and outlive config versions, so a
 * reload keeps the warm keep-alive connections. An upstream (a config
 * object) points at targets and is reference counted: Lua holds one
 * reference per config version (released by ffi.gc), each request one.
 *
 * An upstream connection goes back to its target's idle list only when the
 * whole request was sent and the whole response read with known framing;
 * anything else (errors, close-delimited bodies, unread bodies) closes it.
 */
#include <assert.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg.h"

static void up_close(mg_upconn_t *u);
static void up_destroy(mg_upconn_t *u);
static void up_process(mg_upconn_t *u);
static void up_fail(mg_req_t *r, mg_upconn_t *u, int status, const char *why);
static void up_read_start(mg_upconn_t *u);
static void up_read_stop(mg_upconn_t *u);

/* ---- upstream objects (FFI) ------------------------------------------------- */

static mg_target_t *target_get(mg_worker_t *w, const char *host, int port)
{
    for (mg_link_t *l = w->targets.next; l != &w->targets; l = l->next) {
        mg_target_t *t = mg_container_of(l, mg_target_t, link);
        if (t->port == port && strcmp(t->host, host) == 0) return t;
    }
    mg_target_t *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    snprintf(t->host, sizeof(t->host), "%s", host);
    t->port = port;
    /* Resolved once, at config load (blocking, off the request path). DNS
     * re-resolution arrives with the load-balancing work. */
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char ps[8];
    snprintf(ps, sizeof(ps), "%d", port);
    if (getaddrinfo(host, ps, &hints, &res) != 0 || !res) {
        free(t);
        return NULL;
    }
    memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    mg_list_init(&t->idle);
    mg_list_insert_head(&w->targets, &t->link);
    return t;
}

mg_upstream_t *mg_upstream_new(const char *id, size_t id_len, uint32_t connect_ms, uint32_t send_ms,
                               uint32_t read_ms, uint32_t pool_size, uint32_t idle_ms,
                               uint32_t max_requests)
{
    mg_upstream_t *u = calloc(1, sizeof(*u));
    if (!u) return NULL;
    u->refs = 1;
    if (id_len >= sizeof(u->id)) id_len = sizeof(u->id) - 1;
    memcpy(u->id, id, id_len);
    u->connect_ms = connect_ms ? connect_ms : 5000;
    u->send_ms = send_ms ? send_ms : 60000;
    u->read_ms = read_ms ? read_ms : 60000;
    u->pool_size = pool_size;
    u->idle_ms = idle_ms ? idle_ms : 60000;
    u->max_requests = max_requests ? max_requests : 1000;
    return u;
}

int mg_upstream_add_target(mg_upstream_t *u, const char *host, size_t hl, int port, int weight)
{
    char h[64];
    if (!mg__worker) return MG_ERROR;
    if (hl == 0 || hl >= sizeof(h) || port < 1 || port > 65535 || weight < 0) return MG_EINVAL;
    if (u->ntargets == (int)(sizeof(u->targets) / sizeof(u->targets[0]))) return MG_EINVAL;
    memcpy(h, host, hl);
    h[hl] = 0;
    mg_target_t *t = target_get(mg__worker, h, port);
    if (!t) return MG_DECLINED;
    /* The key of the target's circuit breaker, made here once rather than
     * per request: "<upstream id>/<host>:<port>" (README). */
    size_t kl = strlen(u->id) + hl + 8;
    char *key = malloc(kl);
    if (!key) return MG_ERROR;
    int n = snprintf(key, kl, "%s/%s:%d", u->id, h, port);
    /* The pool of a target shared by upstreams takes the largest size. */
    if (u->pool_size > t->pool_size) t->pool_size = u->pool_size;
    t->idle_ms = u->idle_ms;
    t->max_requests = u->max_requests;
    u->targets[u->ntargets].t = t;
    u->targets[u->ntargets].weight = weight;
    u->targets[u->ntargets].current = 0;
    u->targets[u->ntargets].brk_key = key;
    u->targets[u->ntargets].brk_key_len = (uint32_t)n;
    u->ntargets++;
    return MG_OK;
}

void mg_upstream_release(mg_upstream_t *u)
{
    if (!u || --u->refs > 0) return;
    for (int i = 0; i < u->ntargets; i++)
        free(u->targets[i].brk_key);
    free(u);
}

/* Smooth weighted round robin (nginx's): even spread, no bursts. O(targets).
 * The index of the target, or -1 when every weight is 0. */
static int pick_target(mg_upstream_t *u)
{
    int total = 0, best = -1;
    for (int i = 0; i < u->ntargets; i++) {
        if (u->targets[i].weight == 0) continue;
        u->targets[i].current += u->targets[i].weight;
        total += u->targets[i].weight;
        if (best < 0 || u->targets[i].current > u->targets[best].current) best = i;
    }
    if (best < 0) return -1;
    u->targets[best].current -= total;
    return best;
}

/* ---- upstream connections ---------------------------------------------------- */

static void on_up_handle_closed(uv_handle_t *h)
{
    mg_upconn_t *u = h->data;
    if (--u->handles_open > 0) return;
    if (u->buf) mg__buf_put(mg__worker, u->buf);
    free(u);
}

/* Closes a connection that is not on the idle list. */
static void up_destroy(mg_upconn_t *u)
{
    if (u->closing) return;
    u->closing = 1;
    u->req = NULL;
    uv_close((uv_handle_t *)&u->timer.timer, on_up_handle_closed);
    uv_close((uv_handle_t *)&u->tcp, on_up_handle_closed);
}

/* Closes an idle pooled connection. */
static void up_close(mg_upconn_t *u)
{
    if (u->closing) return;
    mg_list_remove(&u->link);
    u->target->nidle--;
    up_destroy(u);
}

static void on_up_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)hint;
    mg_upconn_t *u = h->data;
    if (!u->buf) {
        u->buf = mg__buf_get(mg__worker);
        u->cap = mg__worker->buf_size;
        u->len = u->pos = 0;
    }
    b->base = u->buf + u->len;
    b->len = u->cap - u->len;
}

/* Back to the pool, or closed. Called when the request is complete. */
void mg__proxy_release(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    r->up = NULL;
    if (!u) return;
    u->req = NULL;
    mg_target_t *t = u->target;
    mg__deadline_set(&u->timer, 0);
    int keep = u->keepalive && u->msg_done && r->body_done && !r->body_error && u->pos == u->len &&
               !mg__worker->draining && u->nrequests < t->max_requests && t->nidle < t->pool_size;
    if (!keep) {
        up_destroy(u);
        return;
    }
    if (u->buf) {
        mg__buf_put(mg__worker, u->buf);
        u->buf = NULL;
    }
    u->len = u->pos = u->body_base = 0;
    mg_list_insert_head(&t->idle, &u->link);
    t->nidle++;
    mg__deadline_set(&u->timer, t->idle_ms);
    up_read_start(u); /* a close from the backend is noticed while idle */
}

/* The client is gone or the request failed: the connection is not reusable. */
void mg__proxy_abort(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    r->up = NULL;
    if (!u) return;
    u->req = NULL;
    up_destroy(u);
}

void mg__targets_close(mg_worker_t *w)
{
    for (mg_link_t *l = w->targets.next; l != &w->targets; l = l->next) {
        mg_target_t *t = mg_container_of(l, mg_target_t, link);
        while (!mg_list_empty(&t->idle))
            up_close(mg_container_of(t->idle.next, mg_upconn_t, link));
    }
}

/* ---- request head -------------------------------------------------------------- */

static int append_forwarded(mg_req_t *r, const char *name, size_t nl, const char *add, size_t al)
{
    /* Existing values (possibly several fields) joined, then ours. */
    char tmp[1024];
    size_t n = 0;
    for (uint32_t i = 0; i < r->v.nheaders; i++) {
        const mg_header_t *h = &r->hdrs[i];
        if (!mg__strieq(h->name, h->name_len, name, nl)) continue;
        if (n + h->value_len + 2 >= sizeof(tmp)) return -1;
        memcpy(tmp + n, h->value, h->value_len);
        n += h->value_len;
        tmp[n++] = ',';
        tmp[n++] = ' ';
    }
    if (mg__edited(r->req_edits, name, nl)) n = 0; /* a policy set it: start over */
    if (n + al >= sizeof(tmp)) return -1;
    memcpy(tmp + n, add, al);
    n += al;
    return mg__head_header(r, name, nl, tmp, n);
}

static int is_forwarding_header(const char *n, size_t nl)
{
    return mg__strieq(n, nl, "x-forwarded-for", 15) || mg__strieq(n, nl, "x-forwarded-proto", 17) ||
           mg__strieq(n, nl, "x-forwarded-host", 16);
}

static int build_request_head(mg_req_t *r)
{
    const char *path = r->up_path ? r->up_path : r->v.path;
    size_t pl = r->up_path ? r->up_path_len : r->v.path_len;
    const char *q = r->up_query_set ? r->up_query : r->v.query;
    size_t ql = r->up_query_set ? r->up_query_len : r->v.query_len;
    int hasq = r->up_query_set ? ql > 0 : r->has_query;
    r->head_len = 0;
    if (mg__head_add(r, r->v.method, r->v.method_len) || mg__head_add(r, " ", 1) ||
        mg__head_add(r, path, pl) ||
        (hasq && (mg__head_add(r, "?", 1) || mg__head_add(r, q, ql))) ||
        mg__head_add(r, " HTTP/1.1\r\n", 11))
        return -1;
    const char *host = r->abs_host;
    size_t hostl = r->abs_host_len;
    mg_conn_tokens_t ct;
    mg__conn_tokens(&ct, r->hdrs, r->v.nheaders);
    for (uint32_t i = 0; i < r->v.nheaders; i++) {
        const mg_header_t *h = &r->hdrs[i];
        const char *n = h->name;
        size_t nl = h->name_len;
        if (mg__strieq(n, nl, "host", 4)) {
            if (!host) {
                host = h->value;
                hostl = h->value_len;
            }
            continue;
        }
        if (mg__hop_by_hop(n, nl) || mg__strieq(n, nl, "content-length", 14) ||
            mg__strieq(n, nl, "expect", 6) || mg__strieq(n, nl, "x-request-id", 12) ||
            is_forwarding_header(n, nl) || mg__conn_token_has(&ct, r->hdrs, r->v.nheaders, n, nl) ||
            mg__edited(r->req_edits, n, nl))
            continue;
        if (mg__head_header(r, n, nl, h->value, h->value_len)) return -1;
    }
    char thost[80];
    const char *chost = host; /* the client's, for X-Forwarded-Host */
    if (!host) {              /* an HTTP/1.0 client sent none; HTTP/1.1 upstreams need one */
        int n = snprintf(thost, sizeof(thost), "%s:%d", r->target->host, r->target->port);
        host = thost;
        hostl = (size_t)n;
    }
    if (!mg__edited(r->req_edits, "host", 4) && mg__head_header(r, "Host", 4, host, hostl))
        return -1;
    for (const mg_hedit_t *e = r->req_edits; e; e = e->next) {
        if (e->mode == MG_HDR_REMOVE || mg__edited(e->next, e->name, e->name_len)) continue;
        if (is_forwarding_header(e->name, e->name_len) || mg__hop_by_hop(e->name, e->name_len) ||
            mg__strieq(e->name, e->name_len, "content-length", 14))
            continue;
        if (mg__head_header(r, e->name, e->name_len, e->value, e->value_len)) return -1;
    }
    if (append_forwarded(r, "X-Forwarded-For", 15, r->v.remote_addr, strlen(r->v.remote_addr)) ||
        append_forwarded(r, "X-Forwarded-Proto", 17, "http", 4) ||
        (chost && append_forwarded(r, "X-Forwarded-Host", 16, chost, hostl)) ||
        mg__head_header(r, "X-Request-Id", 12, r->v.request_id, r->v.request_id_len))
        return -1;
    if (r->lua_body_set) { /* a policy read the body: what it read goes, with its length */
        char cl[32];
        int n = snprintf(cl, sizeof(cl), "%zu", r->lua_body_len);
        if (mg__head_header(r, "Content-Length", 14, cl, (size_t)n)) return -1;
    } else if (r->body_mode == MG_BODY_CHUNKED) {
        r->up_chunked = 1;
        if (mg__head_add(r, "Transfer-Encoding: chunked\r\n", 28)) return -1;
    } else if (r->v.content_length >= 0 && (r->body_mode == MG_BODY_LENGTH ||
                                            !mg__strieq(r->v.method, r->v.method_len, "GET", 3))) {
        char cl[32];
        size_t n = mg__u64_dec(cl, (uint64_t)r->v.content_length);
        if (mg__head_header(r, "Content-Length", 14, cl, n)) return -1;
    }
    return mg__head_add(r, "\r\n", 2);
}

/* ---- sending -------------------------------------------------------------------- */

/* connect, send or read timeout of a request; the idle timeout of a pooled
 * connection (no request, on its target's idle list) */
static void on_up_timeout(mg_deadline_t *d)
{
    mg_upconn_t *u = d->timer.data;
    mg_req_t *r = u->req;
    if (!r) {
        if (u->link.next != &u->link)
            up_close(u);
        else
            up_destroy(u);
        return;
    }
    up_fail(r, u, 504, u->connected ? "upstream timed out" : "upstream connect timed out");
}

static void on_up_written(uv_write_t *w, int status)
{
    mg_upconn_t *u = mg_container_of(w, mg_upconn_t, out.wreq);
    u->out.pending = 0;
    mg__out_reset(&u->out);
    mg_req_t *r = u->req;
    if (u->closing || !r) return;
    if (status < 0) {
        up_fail(r, u, 502, "upstream write failed");
        return;
    }
    if (!u->got_bytes) mg__deadline_set(&u->timer, r->upstream->read_ms);
    mg__conn_pump(r->conn);
}

/* Writes what the pump gathered into u->out. 0: all written; 1: pending;
 * -1: failed (the request is being failed). */
int mg__proxy_flush_body(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    if (r->body_done && r->up_chunked && !r->last_chunk_queued) {
        r->last_chunk_queued = 1;
        mg__out_add_last_chunk(&u->out);
    }
    int rc = mg__out_flush(&u->out, (uv_stream_t *)&u->tcp, on_up_written);
    if (rc < 0) {
        up_fail(r, u, 502, "upstream write failed");
        return -1;
    }
    if (rc == 1) mg__deadline_set(&u->timer, r->upstream->send_ms);
    return rc;
}

void mg__proxy_body_sent(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    if (!u->got_bytes) mg__deadline_set(&u->timer, r->upstream->read_ms);
}

static void up_send_request(mg_req_t *r, mg_upconn_t *u)
{
    if (build_request_head(r)) {
        up_fail(r, u, 500, "request head too large");
        return;
    }
    mg__out_reset(&u->out);
    mg__out_add(&u->out, r->head_buf, r->head_len);
    if (r->lua_body_set) mg__out_add(&u->out, r->lua_body, r->lua_body_len);
    r->sink = MG_SINK_PROXY;
    r->last_chunk_queued = 0;
    u->nrequests++;
    u->got_bytes = u->head_done = u->msg_done = u->interim = u->head_sent = 0;
    u->exec_pending = 0;
    u->nhdrs = 0;
    u->hdr_state = HS_NONE;
    u->head_bytes = 0;
    u->reason = NULL;
    u->reason_len = 0;
    llhttp_init(&u->parser, HTTP_RESPONSE, &mg__worker->resp_settings);
    u->parser.data = u;
    r->up_start_ns = mg__now_ns();
    up_read_start(u);
    /* The pump adds whatever body bytes are buffered to the same write. */
    mg__conn_pump(r->conn);
}

static void on_connect(uv_connect_t *cr, int status)
{
    mg_upconn_t *u = cr->data;
    mg_req_t *r = u->req;
    if (u->closing || !r) return;
    if (status < 0) {
        up_fail(r, u, 502, "upstream connect failed");
        return;
    }
    u->connected = 1;
    uv_tcp_nodelay(&u->tcp, 1);
    up_send_request(r, u);
}

static mg_upconn_t *up_new(mg_target_t *t)
{
    mg_upconn_t *u = calloc(1, sizeof(*u));
    if (!u) return NULL;
    u->target = t;
    u->tcp.data = u;
    u->connect_req.data = u;
    mg_list_init(&u->link);
    uv_tcp_init(mg__worker->loop, &u->tcp);
    mg__deadline_init(&u->timer, mg__worker->loop, u, on_up_timeout);
    u->handles_open = 2;
    return u;
}

static void up_attach(mg_req_t *r)
{
    mg_target_t *t = r->target;
    r->tries++;
    while (!mg_list_empty(&t->idle)) {
        mg_upconn_t *u = mg_container_of(t->idle.next, mg_upconn_t, link);
        mg_list_remove(&u->link);
        t->nidle--;
        mg__deadline_set(&u->timer, 0);
        u->req = r;
        u->reused = 1;
        u->keepalive = 0;
        r->up = u;
        up_send_request(r, u);
        return;
    }
    mg_upconn_t *u = up_new(t);
    if (!u) {
        mg__req_fail(r, 502, "out of memory");
        return;
    }
    u->req = r;
    r->up = u;
    int rc = uv_tcp_connect(&u->connect_req, &u->tcp, (struct sockaddr *)&t->addr, on_connect);
    if (rc < 0) {
        up_fail(r, u, 502, "upstream connect failed");
        return;
    }
    mg__deadline_set(&u->timer, r->upstream->connect_ms);
}

void mg__proxy_start(mg_req_t *r)
{
    /* Lua read some of the body without handing it back (mg_req_set_body):
     * forwarding the rest would send the upstream a body short of its
     * framing, which it waits for or reads differently. */
    if (r->sink == MG_SINK_LUA && r->body_mode != MG_BODY_NONE && !r->lua_body_set) {
        mg__req_fail(r, 500, "the request body was consumed by a policy");
        return;
    }
    int i = pick_target(r->upstream);
    if (i < 0) {
        mg__req_fail(r, 503, "no upstream target available");
        return;
    }
    if (r->brk) {
        i = mg__breaker_pick(r, i);
        if (i < 0) return; /* every target's breaker refused: answered 503 */
    }
    r->target = r->upstream->targets[i].t;
    up_attach(r);
}

/* A failure on the upstream side. Before any response byte a reused
 * connection that the backend closed in the meantime is retried once on a
 * fresh one, when nothing of the body has been consumed yet. */
static void up_fail(mg_req_t *r, mg_upconn_t *u, int status, const char *why)
{
    int retry = status == 502 && u->reused && !u->got_bytes && r->tries < 3 &&
                r->body_mode == MG_BODY_NONE && !r->resp_started;
    if (r->up == u) mg__proxy_abort(r);
    if (retry) {
        mg_log_debug("retrying on a new connection: %s", why);
        r->sink = MG_SINK_NONE;
        up_attach(r);
        return;
    }
    mg_log(MG_LOG_WARN, "%s: %s:%d (upstream %s, request %s)", why, r->target->host,
           r->target->port, r->upstream->id, r->v.request_id);
    /* 500: our own request head did not fit; anything else is the target's */
    if (r->brk_key) mg__breaker_end(r, status != 500);
    if (r->resp_started) {
        mg__conn_close(r->conn);
        return;
    }
    mg__req_fail(r, status, why);
}

/* ---- response --------------------------------------------------------------- */

static inline mg_upconn_t *up_of(llhttp_t *p)
{
    return (mg_upconn_t *)p->data;
}

static int on_r_status(llhttp_t *p, const char *at, size_t len)
{
    mg_upconn_t *u = up_of(p);
    if (!u->reason) u->reason = at;
    u->reason_len += (uint32_t)len;
    return 0;
}

static int on_r_field(llhttp_t *p, const char *at, size_t len)
{
    mg_upconn_t *u = up_of(p);
    if (u->head_done) return 0; /* trailers are dropped */
    return mg__header_name_span(u->hdrs, u->nhdrs, &u->hdr_state, at, len); /* -1: 502 */
}

static int on_r_value(llhttp_t *p, const char *at, size_t len)
{
    mg_upconn_t *u = up_of(p);
    if (u->head_done) return 0;
    return mg__header_value_span(&u->hdrs[u->nhdrs], &u->hdr_state, at, len); /* -1: 502 */
}

static int on_r_value_complete(llhttp_t *p)
{
    mg_upconn_t *u = up_of(p);
    if (u->head_done) return 0;
    if (mg__header_finish(&u->hdrs[u->nhdrs]) != 0) return -1; /* 502 */
    u->nhdrs++;
    u->hdr_state = HS_VALUE_DONE;
    return 0;
}

static int on_r_headers_complete(llhttp_t *p)
{
    mg_upconn_t *u = up_of(p);
    mg_req_t *r = u->req;
    int status = p->status_code;
    if (status < 100) return -1; /* llhttp takes "HTTP/1.1 0 x": not a status */
    if (status < 200) {
        if (status == 101) return -1; /* we never asked to upgrade */
        /* A 1xx has no content whatever its framing headers say (RFC 9110
         * 15.2); parsed as a body it would reach the client unframed. */
        p->flags |= F_SKIPBODY;
        u->interim = 1;
        return HPE_PAUSED;
    }
    u->head_done = 1;
    u->keepalive = llhttp_should_keep_alive(p);
    int is_head = llhttp_get_method(&r->conn->parser) == HTTP_HEAD;
    if (is_head) r->resp_no_body = 1;
    if (status == 204 || status == 304) r->resp_no_body = 1;
    return HPE_PAUSED; /* the header_filter phase may run before the body */
}

static int on_r_body(llhttp_t *p, const char *at, size_t len)
{
    mg_upconn_t *u = up_of(p);
    mg_req_t *r = u->req;
    mg_conn_t *c = r->conn;
    if (r->resp_no_body) return 0; /* a status a policy made body-less (send_head) */
    r->resp_sent += len;
    if (r->phases & MG_PHASE_BODY_FILTER) { /* filtered after this parse step */
        mg__out_add(&r->body_spans, at, len);
        return 0;
    }
    if (r->resp_chunked)
        mg__out_add_chunk(&c->out, at, len);
    else
        mg__out_add(&c->out, at, len);
    return 0;
}

static int on_r_chunk_complete(llhttp_t *p)
{
    mg_upconn_t *u = up_of(p);
    if (mg__out_room(&u->req->conn->out) < 8 || mg__out_room(&u->req->body_spans) < 8)
        return HPE_PAUSED;
    return 0;
}

static int on_r_message_complete(llhttp_t *p)
{
    mg_upconn_t *u = up_of(p);
    if (u->interim) return HPE_PAUSED;
    u->msg_done = 1;
    return HPE_PAUSED;
}

void mg__proxy_resp_settings(llhttp_settings_t *s)
{
    llhttp_settings_init(s);
    s->on_status = on_r_status;
    s->on_header_field = on_r_field;
    s->on_header_value = on_r_value;
    s->on_header_value_complete = on_r_value_complete;
    s->on_headers_complete = on_r_headers_complete;
    s->on_body = on_r_body;
    s->on_chunk_complete = on_r_chunk_complete;
    s->on_message_complete = on_r_message_complete;
}

static void on_up_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    mg_upconn_t *u = s->data;
    mg_req_t *r = u->req;
    if (n == 0) return;
    if (!r) { /* idle in the pool: a close, or bytes nobody asked for */
        if (!u->closing) up_close(u);
        return;
    }
    if (n == UV_ENOBUFS) { /* buffer full: reading resumes once it drains */
        up_read_stop(u);
        return;
    }
    if (n < 0) {
        up_read_stop(u);
        u->keepalive = 0;
        if (n == UV_EOF && u->head_done && !u->msg_done) {
            /* close-delimited body ends here; any other framing is cut */
            llhttp_errno_t e = llhttp_finish(&u->parser);
            if ((e == HPE_OK || e == HPE_PAUSED) && u->msg_done) {
                u->keepalive = 0;
                up_process(u);
                return;
            }
            if (r->brk_key) mg__breaker_end(r, 1); /* the body was cut */
            mg__conn_close(r->conn);
            return;
        }
        if (u->msg_done) return;
        up_fail(r, u, 502,
                n == UV_EOF ? "upstream closed the connection early" : "upstream read failed");
        return;
    }
    u->got_bytes = 1;
    u->len += (uint32_t)n;
    mg__deadline_set(&u->timer, 0);
    up_process(u);
}

static void up_read_start(mg_upconn_t *u)
{
    if (u->reading) return;
    if (uv_read_start((uv_stream_t *)&u->tcp, on_up_alloc, on_up_read) == 0) u->reading = 1;
}

static void up_read_stop(mg_upconn_t *u)
{
    if (!u->reading) return;
    uv_read_stop((uv_stream_t *)&u->tcp);
    u->reading = 0;
}

/* Runs the body_filter phase over the pieces this parse step gathered (and
 * the end, when eof) and queues the result as one chunk. Its bytes live in
 * r->fblock until the write completes. -1: a filter failed. */
static int filter_body(mg_req_t *r, int eof)
{
    mg_out_t *s = &r->body_spans;
    size_t used = 0, cap = 0;
    char *blk = NULL;
    int n = s->n + (eof ? 1 : 0);
    for (int i = 0; i < n; i++) {
        const char *o;
        size_t ol;
        int last = i == s->n;
        if (mg__lua_body_filter(r, last ? "" : s->iov[i].base, last ? 0 : s->iov[i].len, last, &o,
                                &ol) < 0) {
            free(blk);
            return -1;
        }
        if (mg__grow(&blk, &cap, used, ol, 4096, SIZE_MAX) != 0) {
            mg__lua_body_filter_done(r);
            free(blk);
            return -1;
        }
        if (ol) memcpy(blk + used, o, ol); /* blk is NULL while all is empty */
        used += ol;
        mg__lua_body_filter_done(r);
    }
    mg__out_reset(s);
    free(r->fblock);
    r->fblock = blk;
    if (used) {
        if (r->resp_chunked)
            mg__out_add_chunk(&r->conn->out, blk, used);
        else
            mg__out_add(&r->conn->out, blk, used);
    }
    return 0;
}

static void send_head(mg_req_t *r, mg_upconn_t *u)
{
    llhttp_t *p = &u->parser;
    int64_t len;
    int status = r->lua_status ? r->lua_status : p->status_code;
    int bodyless = status == 204 || status == 304;
    if (bodyless && !r->resp_no_body) {
        /* a header_filter policy made it 204 or 304: the upstream's body is
         * read to its end but not sent (the client's parser expects none) */
        r->resp_no_body = 1;
    }
    if (r->resp_no_body && !bodyless && r->lua_status &&
        llhttp_get_method(&r->conn->parser) != HTTP_HEAD)
        /* a 204 or 304 a policy made another status: no content, and the
         * upstream's Content-Length (a 304's describes what was not sent)
         * must not make the client wait for it */
        len = 0;
    else if (r->resp_no_body)
        len = (p->flags & F_CONTENT_LENGTH) ? (int64_t)p->content_length : -3;
    else if (r->phases & MG_PHASE_BODY_FILTER)
        len = MG_LEN_CHUNKED; /* filters change lengths */
    else if (p->flags & F_CHUNKED)
        len = MG_LEN_CHUNKED;
    else if (p->flags & F_CONTENT_LENGTH)
        len = (int64_t)p->content_length;
    else
        len = MG_LEN_CHUNKED; /* close-delimited upstream: chunked keeps the client's connection */
    const char *reason = r->lua_status ? NULL : u->reason;
    if (mg__req_head_write(r, status, reason, u->reason_len, u->hdrs, u->nhdrs, len)) {
        up_fail(r, u, 502, "response head too large");
        return;
    }
    r->resp_started = 1;
    mg__out_add(&r->conn->out, r->head_buf, r->head_len);
}

void mg__proxy_header_filter_done(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    if (!u) return;
    send_head(r, u);
    up_process(u);
}

/* Parses what the upstream sent and moves it to the client. Waits (returns)
 * while a write to the client is pending: the upstream buffer is reused
 * only after the client took every byte, which is the backpressure. */
static void up_process(mg_upconn_t *u)
{
    mg_req_t *r = u->req;
    mg_conn_t *c = r->conn;
    for (;;) {
        if (c->out.pending || c->inflight) return; /* mg__proxy_client_drained resumes */
        if (r->lua_busy) return;                   /* header_filter running */
        /* After a pause llhttp runs once more even with no bytes left: a
         * response without body bytes (HEAD, 204, 304, Content-Length: 0)
         * completes only then. */
        if (!u->msg_done && (u->pos < u->len || u->exec_pending)) {
            u->exec_pending = 0;
            llhttp_errno_t e = llhttp_execute(&u->parser, u->buf + u->pos, u->len - u->pos);
            if (e == HPE_PAUSED) {
                u->pos = (uint32_t)(llhttp_get_error_pos(&u->parser) - u->buf);
                llhttp_resume(&u->parser);
                u->exec_pending = 1;
                if (u->interim) {
                    /* A 1xx: forwarded as is to HTTP/1.1 clients (100 is
                     * ours to send, and was), then the real answer follows. */
                    int st = u->parser.status_code;
                    if (!u->msg_done && st != 100 && r->v.version_minor >= 1) {
                        char line[48];
                        int n = snprintf(line, sizeof(line), "HTTP/1.1 %d ", st);
                        mg__conn_write_copy(c, line, (size_t)n);
                        mg__conn_write_copy(c, u->reason ? u->reason : "", u->reason_len);
                        mg__conn_write_copy(c, "\r\n", 2);
                        for (uint32_t i = 0; i < u->nhdrs; i++) {
                            const mg_header_t *h = &u->hdrs[i];
                            if (mg__hop_by_hop(h->name, h->name_len) ||
                                mg__strieq(h->name, h->name_len, "content-length", 14))
                                continue; /* a client could wait for that content */
                            mg__conn_write_copy(c, h->name, h->name_len);
                            mg__conn_write_copy(c, ": ", 2);
                            mg__conn_write_copy(c, h->value, h->value_len);
                            mg__conn_write_copy(c, "\r\n", 2);
                        }
                        mg__conn_write_copy(c, "\r\n", 2);
                    }
                    /* the interim's message-complete pause follows at once */
                    llhttp_execute(&u->parser, u->buf + u->pos, 0);
                    llhttp_resume(&u->parser);
                    u->interim = 0;
                    u->nhdrs = 0;
                    u->hdr_state = HS_NONE;
                    u->reason = NULL;
                    u->reason_len = 0;
                    continue;
                }
                if (u->head_done && !r->resp_started && !u->head_sent) {
                    u->head_sent = 1;
                    u->body_base = u->pos;
                    r->up_ns = mg__now_ns() - r->up_start_ns;
                    if (r->brk_key) mg__breaker_head(r, u->parser.status_code);
                    if (r->resp_no_body) {
                        /* no body: tell llhttp, which otherwise waits for one */
                        u->parser.flags |= F_SKIPBODY;
                    }
                    if (r->phases & MG_PHASE_HEADER_FILTER) {
                        r->hf_ran = 1; /* an error after it answers without it */
                        r->v.status = u->parser.status_code; /* ctx.resp.status */
                        mg__lua_start(r, MG_LUA_HEADER_FILTER);
                        return; /* mg__proxy_header_filter_done goes on */
                    }
                    send_head(r, u);
                    if (!r->up) return;
                    continue; /* head and body leave in one write */
                }
            } else if (e == HPE_OK) {
                u->pos = u->len;
            } else {
                if (r->resp_started) {
                    if (r->brk_key) mg__breaker_end(r, 1);
                    mg__conn_close(c);
                    return;
                }
                up_fail(r, u, 502, "invalid response from upstream");
                return;
            }
        }
        if ((r->phases & MG_PHASE_BODY_FILTER) && u->head_sent && !r->resp_no_body &&
            (r->body_spans.n || (u->msg_done && !r->resp_finished))) {
            if (filter_body(r, u->msg_done) < 0) {
                mg__conn_close(c); /* the head is out: cutting is all that is left */
                return;
            }
        }
        if (u->msg_done && !r->resp_finished) {
            r->resp_finished = 1;
            /* the exchange with the backend is over: report it now, before
             * the client has the last bytes (and can ask again) */
            if (r->brk_key) mg__breaker_end(r, 0);
            if (r->resp_chunked) mg__out_add_last_chunk(&c->out);
        }
        int rc = mg__conn_flush(c);
        if (rc < 0) return;
        if (rc == 1) return; /* the write callback resumes */
        if (r->resp_finished) {
            mg__req_maybe_done(r);
            return;
        }
        if (u->pos < u->len) continue;
        if (u->head_sent) u->pos = u->len = u->body_base;
        if (u->len >= u->cap) { /* a head that does not fit */
            up_fail(r, u, 502, "upstream response head too large");
            return;
        }
        mg__deadline_set(&u->timer, r->upstream->read_ms);
        up_read_start(u);
        return;
    }
}

void mg__proxy_client_drained(mg_req_t *r)
{
    mg_upconn_t *u = r->up;
    if (!u || u->closing) return;
    if (!u->head_sent && !u->got_bytes) return; /* still sending the request */
    up_process(u);
}
