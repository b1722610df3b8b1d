/* req.c: the request object, its FFI accessors, and answers made at the
 * gateway (by a policy, the mock backend, or an error).
 *
 * A request is complete when its response is fully queued, every write of
 * it has finished (views into buffers stay valid until then), and its Lua
 * coroutine has returned; then the log phase runs and the connection moves
 * on (mg__req_maybe_done).
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mg.h"
#include "shm.h"

/* ---- small helpers --------------------------------------------------------- */

const unsigned char mg__lower[256] = {
#define L4(i) (i), (i) + 1, (i) + 2, (i) + 3
#define L16(i) L4(i), L4((i) + 4), L4((i) + 8), L4((i) + 12)
    L16(0x00),
    L16(0x10),
    L16(0x20),
    L16(0x30),
    /* 'A'..'Z' fold to 'a'..'z'; everything else is itself */
    0x40,
    L16(0x61),
    L4(0x71),
    L4(0x75),
    0x79,
    0x7a,
    0x5b,
    0x5c,
    0x5d,
    0x5e,
    0x5f,
    L16(0x60),
    L16(0x70),
    L16(0x80),
    L16(0x90),
    L16(0xa0),
    L16(0xb0),
    L16(0xc0),
    L16(0xd0),
    L16(0xe0),
    L16(0xf0),
#undef L16
#undef L4
};

size_t mg__u64_dec(char *d, uint64_t v)
{
    char t[20];
    size_t n = 0;
    do {
        t[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        d[i] = t[n - 1 - i];
    return n;
}

/* 8 bytes at once: nonzero when one of them is below 0x20 or is 0x7f
 * (exact for "any"; which byte is found out bytewise) */
static inline uint64_t ctl_in(uint64_t x)
{
    uint64_t y = x ^ 0x7f7f7f7f7f7f7f7fULL; /* 0x7f bytes become zero */
    uint64_t lo = (x - 0x2020202020202020ULL) & ~x;
    uint64_t del = (y - 0x0101010101010101ULL) & ~y;
    return (lo | del) & 0x8080808080808080ULL;
}

static inline int ctl_bytes(const char *v, size_t len)
{
    unsigned bad = 0; /* branch-free: short values are the common case */
    for (size_t i = 0; i < len; i++) {
        unsigned ch = (unsigned char)v[i];
        bad |= ((ch < 0x20) & (ch != '\t')) | (ch == 0x7f);
    }
    return (int)bad;
}

int mg__value_ok(const char *v, size_t len)
{
    if (len < 8) return !ctl_bytes(v, len);
    /* whole words, then the last 8 bytes (overlapping what was checked) */
    for (size_t i = 0;; i += 8) {
        if (i + 8 > len) i = len - 8;
        uint64_t x;
        memcpy(&x, v + i, 8);
        if (ctl_in(x) && ctl_bytes(v + i, 8)) return 0; /* HTAB passes here */
        if (i + 8 == len) return 1;
    }
}

/* RFC 9110 7.6.1 plus the proxy headers every proxy drops. */
int mg__hop_by_hop(const char *n, size_t len)
{
    switch (len) {
    case 2: return mg__strieq(n, len, "te", 2);
    case 7: return mg__strieq(n, len, "trailer", 7) || mg__strieq(n, len, "upgrade", 7);
    case 10: return mg__strieq(n, len, "connection", 10) || mg__strieq(n, len, "keep-alive", 10);
    case 16: return mg__strieq(n, len, "proxy-connection", 16);
    case 17: return mg__strieq(n, len, "transfer-encoding", 17);
    case 18: return mg__strieq(n, len, "proxy-authenticate", 18);
    case 19: return mg__strieq(n, len, "proxy-authorization", 19);
    default: return 0;
    }
}

/* The next token of a Connection value from *p (up to end): its start and
 * length in *len (0 at the end of the value); *p moves past it. One scanner
 * for mg__conn_tokens and mg__named_in_connection, so both split alike. */
static const char *conn_token(const char **p, const char *end, size_t *len)
{
    const char *q = *p;
    while (q < end && (*q == ' ' || *q == '\t' || *q == ','))
        q++;
    const char *s = q;
    while (q < end && *q != ',' && *q != ' ' && *q != '\t')
        q++;
    *p = q;
    *len = (size_t)(q - s);
    return s;
}

void mg__conn_tokens(mg_conn_tokens_t *t, const mg_header_t *h, uint32_t nh)
{
    t->n = t->overflow = 0;
    for (uint32_t i = 0; i < nh; i++) {
        if (!mg__strieq(h[i].name, h[i].name_len, "connection", 10)) continue;
        const char *p = h[i].value, *end = p + h[i].value_len;
        while (p < end) {
            size_t n;
            const char *s = conn_token(&p, end, &n);
            if (n == 0 || mg__strieq(s, n, "keep-alive", 10)) continue;
            if (t->n == MG_CONN_TOKENS) {
                t->overflow = 1;
                return;
            }
            t->p[t->n] = s;
            t->len[t->n++] = (uint32_t)n;
        }
    }
}

/* Is `name` listed in any Connection header of h? (those are hop-by-hop too) */
int mg__named_in_connection(const mg_header_t *h, uint32_t nh, const char *name, size_t len)
{
    for (uint32_t i = 0; i < nh; i++) {
        if (!mg__strieq(h[i].name, h[i].name_len, "connection", 10)) continue;
        const char *p = h[i].value, *end = p + h[i].value_len;
        while (p < end) {
            size_t n;
            const char *s = conn_token(&p, end, &n);
            if (n > 0 && mg__strieq(s, n, name, len)) return 1;
        }
    }
    return 0;
}

const char *mg__status_reason(int s)
{
    switch (s) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 103: return "Early Hints";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

/* ---- arena ------------------------------------------------------------- */

void *mg__arena_alloc(mg_arena_t *a, size_t len)
{
    char *d;
    len = (len + 7) & ~(size_t)7; /* keeps every allocation 8-aligned */
    if (a->used + len <= sizeof(a->first)) {
        d = a->first + a->used;
        a->used += len;
    } else {
        mg_arena_block_t *b = a->extra;
        if (!b || b->used + len > b->cap) {
            size_t cap = len > 8192 ? len : 8192;
            b = malloc(sizeof(*b) + cap);
            if (!b) return NULL;
            b->cap = cap;
            b->used = 0;
            b->next = a->extra;
            a->extra = b;
        }
        d = b->data + b->used;
        b->used += len;
    }
    return d;
}

char *mg__arena_dup(mg_arena_t *a, const char *p, size_t len)
{
    char *d = mg__arena_alloc(a, len);
    if (d && len) memcpy(d, p, len);
    return d;
}

static void arena_reset(mg_arena_t *a)
{
    while (a->extra) {
        mg_arena_block_t *n = a->extra->next;
        free(a->extra);
        a->extra = n;
    }
    a->used = 0;
}

/* ---- pool ------------------------------------------------------------------ */

/* The request's suspended phase never resumes: a pending mg.http.request
 * is cancelled, its coroutine released, and what it waited on (mg.sleep, a
 * Redis reply) dropped: on a failure, an abort, and when it is freed. */
static void req_stop_waiting(mg_req_t *r)
{
    mg__req_http_release(r);
    mg__lua_release(r);
    uv_timer_stop(&r->sleep_timer);
    mg__redis_detach(r);
    r->wait = MG_WAIT_NONE;
}

static void make_request_id(mg_worker_t *w, mg_req_t *r)
{
    /* A client's own id is kept when it is a sane token: ids must survive
     * across hops for tracing, but must not smuggle anything into logs. */
    for (uint32_t i = 0; i < r->v.nheaders; i++) {
        const mg_header_t *h = &r->hdrs[i];
        if (!mg__strieq(h->name, h->name_len, "x-request-id", 12)) continue;
        if (h->value_len == 0 || h->value_len > 32) break;
        uint32_t j = 0;
        for (; j < h->value_len; j++) {
            char ch = h->value[j];
            if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') ||
                  (ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '_' || ch == '.'))
                break;
        }
        if (j < h->value_len) break;
        memcpy(r->v.request_id, h->value, h->value_len);
        r->v.request_id_len = h->value_len;
        r->v.request_id[h->value_len] = 0;
        return;
    }
    /* splitmix64 over a per-worker random seed and a counter: unique per
     * worker, unpredictable enough for an id, and no syscall per request. */
    static const char hex[] = "0123456789abcdef";
    char *d = r->v.request_id;
    for (int k = 0; k < 2; k++) {
        uint64_t z =
            (w->rid_seed += 0x9e3779b97f4a7c15ULL) ^ (w->rid_counter++ * 0xbf58476d1ce4e5b9ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        for (int i = 0; i < 16; i++, z >>= 4) /* low nibble first, as before */
            *d++ = hex[z & 15];
    }
    r->v.request_id[32] = 0;
    r->v.request_id_len = 32;
}

mg_req_t *mg__req_new(mg_conn_t *c)
{
    mg_worker_t *w = c->w;
    mg_req_t *r;
    if (!mg_list_empty(&w->free_reqs)) {
        mg_link_t *l = w->free_reqs.next;
        mg_list_remove(l);
        w->nfree_reqs--;
        r = mg_container_of(l, mg_req_t, free_link);
    } else {
        r = calloc(1, sizeof(*r));
        if (!r) return NULL;
        mg_list_init(&r->free_link);
        uv_timer_init(w->loop, &r->sleep_timer);
        r->sleep_timer.data = r;
    }
    /* Reset everything between the view and the pooled parts. */
    char *head_buf = r->head_buf;
    size_t head_cap = r->head_cap;
    memset(&r->v, 0, sizeof(r->v));
    r->v.headers = r->hdrs;
    r->v.content_length = -1;
    r->v.worker_id = (uint32_t)w->id;
    memcpy(r->v.remote_addr, c->remote_addr, sizeof(r->v.remote_addr));
    r->v.remote_port = c->remote_port;
    r->conn = c;
    r->req_edits = r->resp_edits = NULL;
    r->req_edits_tail = r->resp_edits_tail = NULL;
    r->uri = NULL;
    r->uri_len = 0;
    r->abs_host = NULL;
    r->abs_host_len = 0;
    r->has_query = 0;
    r->up_path = r->up_query = NULL;
    r->up_path_len = r->up_query_len = 0;
    r->up_query_set = 0;
    r->route_id = NULL;
    r->route_id_len = 0;
    r->upstream = NULL;
    r->up = NULL;
    r->target = NULL;
    r->phases = 0;
    r->state = MG_REQ_HEAD;
    r->tries = 0;
    r->body_mode = MG_BODY_NONE;
    r->sink = MG_SINK_NONE;
    r->body_done = 0;
    r->body_error = 0;
    r->body_received = 0;
    r->body_limit = w->conf->limits.max_body_bytes;
    mg__out_reset(&r->body_spans);
    r->span_idx = 0;
    r->expect_continue = r->continue_sent = 0;
    r->up_chunked = 0;
    r->lua_body = NULL;
    r->lua_body_len = 0;
    r->lua_body_set = 0;
    r->last_chunk_queued = 0;
    r->resp_started = r->resp_finished = r->resp_chunked = r->resp_close = r->resp_no_body = 0;
    r->resp_length = -1;
    r->resp_sent = 0;
    r->head_buf = head_buf;
    r->head_cap = head_cap;
    r->head_len = 0;
    r->co_slot = NULL;
    r->redis_cmd = NULL;
    r->lua_status = 0;
    r->hf_ran = r->fail_status = 0;
    r->fail_msg = NULL;
    r->wait = MG_WAIT_NONE;
    r->lua_phase = 0;
    r->lua_busy = 0;
    r->log_ran = 0;
    r->done = 0;
    r->start_ns = mg__now_ns();
    r->v.start_time = mg_time_now();
    r->up_ns = 0;
    r->http = NULL;
    r->brk = NULL;
    r->brk_key = NULL;
    r->nconc = 0;
    return r;
}

void mg__req_free(mg_req_t *r)
{
    mg_worker_t *w = r->conn->w;
    assert(!r->up); /* the upstream connection went back to its pool first */
    req_stop_waiting(r);
    /* Every end of a request passes here (finished, failed, aborted), after
     * its log phase: concurrency slots go back exactly once. */
    if (r->nconc) mg__limit_conc_release(r);
    /* ...and an acquired breaker gets its one report (or its probe slot
     * back) when nothing reported it yet: a client gone, a failed body. */
    if (r->brk) mg__breaker_detach(r);
    if (r->upstream) {
        mg_upstream_release(r->upstream);
        r->upstream = NULL;
    }
    arena_reset(&r->arena);
    free(r->fblock);
    r->fblock = NULL;
    r->conn = NULL;
    if (r->head_cap > 16384) { /* do not pool an outsized head buffer */
        free(r->head_buf);
        r->head_buf = NULL;
        r->head_cap = 0;
    }
    if (w->nfree_reqs < 4096) {
        mg_list_insert_head(&w->free_reqs, &r->free_link);
        w->nfree_reqs++;
    } else {
        free(r->head_buf);
        uv_close((uv_handle_t *)&r->sleep_timer, (uv_close_cb)free);
    }
}

/* The connection died under the request: stop whatever it was waiting on. */
void mg__req_abort(mg_req_t *r)
{
    if (r->up) mg__proxy_abort(r);
    /* the log phase below starts with no wait pending (its own mg.sleep or
     * Redis command would be refused otherwise) */
    req_stop_waiting(r);
    /* The log phase still runs (it sees the cut request, and releases what
     * the Lua side keeps for the request); one that yields is abandoned. */
    if ((r->phases & MG_PHASE_LOG) && !r->log_ran && r->conn->w->ref_log >= 0) {
        r->log_ran = 1;
        r->done = 1; /* nothing follows the log phase of an aborted request */
        mg__lua_start(r, MG_LUA_LOG);
        mg__lua_release(r);
    }
    mg__req_free(r);
}

/* ---- head building ---------------------------------------------------------- */

int mg__head_grow(mg_req_t *r, size_t more)
{
    return mg__grow(&r->head_buf, &r->head_cap, r->head_len, more, 1024, SIZE_MAX) == 0 ? 0 : -1;
}

int mg__head_add(mg_req_t *r, const char *p, size_t len)
{
    if (mg__head_reserve(r, len)) return -1;
    memcpy(r->head_buf + r->head_len, p, len);
    r->head_len += len;
    return 0;
}

int mg__head_header(mg_req_t *r, const char *n, size_t nl, const char *v, size_t vl)
{
    if (mg__head_reserve(r, nl + vl + 4)) return -1;
    char *d = r->head_buf + r->head_len;
    memcpy(d, n, nl);
    d += nl;
    *d++ = ':';
    *d++ = ' ';
    memcpy(d, v, vl);
    d += vl;
    *d++ = '\r';
    *d++ = '\n';
    r->head_len += nl + vl + 4;
    return 0;
}

/* Is the header `name` replaced or removed by an edit? */
int mg__edited(const mg_hedit_t *e, const char *name, size_t len)
{
    for (; e; e = e->next)
        if (e->mode != MG_HDR_ADD && mg__strieq(e->name, e->name_len, name, len)) return 1;
    return 0;
}

/* Appends the edits that add values, skipping any superseded by a later
 * set or remove of the same name. O(edits^2): a handful per request. */
int mg__head_edits(mg_req_t *r, const mg_hedit_t *e)
{
    for (; e; e = e->next) {
        if (e->mode == MG_HDR_REMOVE) continue;
        if (mg__edited(e->next, e->name, e->name_len)) continue;
        if (mg__head_header(r, e->name, e->name_len, e->value, e->value_len)) return -1;
    }
    return 0;
}

static int has_header(const mg_header_t *h, uint32_t nh, const mg_hedit_t *edits, const char *name,
                      size_t len)
{
    for (const mg_hedit_t *e = edits; e; e = e->next)
        if (mg__strieq(e->name, e->name_len, name, len)) return e->mode != MG_HDR_REMOVE;
    for (uint32_t i = 0; i < nh; i++)
        if (mg__strieq(h[i].name, h[i].name_len, name, len)) return 1;
    return 0;
}

/* Builds the response head for the client into r->head_buf: the given
 * headers minus hop-by-hop and framing ones, the policy edits, our framing
 * and X-Request-Id. len: body length, MG_LEN_CHUNKED or MG_LEN_CLOSE. */
int mg__req_head_write(mg_req_t *r, int status, const char *reason, size_t reason_len,
                       const mg_header_t *h, uint32_t nh, int64_t len)
{
    mg_conn_t *c = r->conn;
    char line[64];
    if (!reason) {
        reason = mg__status_reason(status);
        reason_len = strlen(reason);
    }
    r->v.status = status;
    r->head_len = 0;
    /* "HTTP/1.x NNN " without printf: this runs for every response */
    memcpy(line, "HTTP/1.1 ", 9);
    if (!r->v.version_minor) line[7] = '0';
    line[9] = (char)('0' + status / 100 % 10);
    line[10] = (char)('0' + status / 10 % 10);
    line[11] = (char)('0' + status % 10);
    line[12] = ' ';
    if (mg__head_add(r, line, 13) || mg__head_add(r, reason, reason_len) ||
        mg__head_add(r, "\r\n", 2))
        return -1;
    mg_conn_tokens_t ct;
    mg__conn_tokens(&ct, h, nh);
    for (uint32_t i = 0; i < nh; i++) {
        const char *name = h[i].name;
        size_t nl = h[i].name_len;
        if (mg__hop_by_hop(name, nl) || mg__strieq(name, nl, "content-length", 14) ||
            mg__conn_token_has(&ct, h, nh, name, nl) || mg__edited(r->resp_edits, name, nl))
            continue;
        if (mg__head_header(r, name, nl, h[i].value, h[i].value_len)) return -1;
    }
    if (mg__head_edits(r, r->resp_edits)) return -1;
    if (!has_header(h, nh, r->resp_edits, "x-request-id", 12) &&
        mg__head_header(r, "X-Request-Id", 12, r->v.request_id, r->v.request_id_len))
        return -1;
    int bodyless = r->resp_no_body || status == 204 || status == 304 || status < 200;
    if (len == MG_LEN_CHUNKED && r->v.version_minor == 0) len = MG_LEN_CLOSE;
    if (len >= 0) {
        if (status != 204 && status >= 200) {
            size_t n = mg__u64_dec(line, (uint64_t)len); /* no printf: every response */
            if (mg__head_header(r, "Content-Length", 14, line, n)) return -1;
        }
    } else if (len == MG_LEN_CHUNKED && !bodyless) {
        if (mg__head_header(r, "Transfer-Encoding", 17, "chunked", 7)) return -1;
        r->resp_chunked = 1;
    } else if (len == MG_LEN_CLOSE && !bodyless) {
        r->resp_close = 1;
    }
    if (status >= 200) {
        r->resp_length = bodyless ? 0 : len;
        if (c->w->draining || c->nrequests >= c->w->conf->limits.max_keepalive_requests)
            c->keepalive = 0;
        if (r->resp_close || !c->keepalive) {
            r->resp_close = 1;
            if (mg__head_add(r, "Connection: close\r\n", 19)) return -1;
        } else if (r->v.version_minor == 0) {
            if (mg__head_add(r, "Connection: keep-alive\r\n", 24)) return -1;
        }
    }
    return mg__head_add(r, "\r\n", 2);
}

/* ---- local answers -------------------------------------------------------- */

static int local_write(mg_req_t *r, const char *p, size_t len)
{
    mg_conn_t *c = r->conn;
    if (len == 0) return 0;
    if (r->resp_chunked) {
        char f[24];
        int n = snprintf(f, sizeof(f), "%zx\r\n", len);
        if (mg__conn_write_copy(c, f, (size_t)n) || mg__conn_write_copy(c, p, len) ||
            mg__conn_write_copy(c, "\r\n", 2))
            return -1;
        return 0;
    }
    return mg__conn_write_copy(c, p, len);
}

static void local_start(mg_req_t *r, int status, int64_t len)
{
    if (r->lua_status) status = r->lua_status;
    /* no content after the head of these, whatever a policy hands over: a
     * body would be the start of the next response to the client. Set, not
     * added to: an upstream's 204/304 (proxy.c) answered with our own 500
     * instead (its header_filter raised) has a body again. */
    r->resp_no_body =
        llhttp_get_method(&r->conn->parser) == HTTP_HEAD || status == 204 || status == 304;
    r->state = MG_REQ_LOCAL;
    r->resp_started = 1;
    if (mg__req_head_write(r, status, NULL, 0, NULL, 0, len) ||
        mg__conn_write_copy(r->conn, r->head_buf, r->head_len))
        r->resp_close = 1;
}

/* Sends the gateway's error answer (mg__req_fail, or after its
 * header_filter ran). */
static void fail_send(mg_req_t *r, int status, const char *msg)
{
    /* Headers a policy set for the response stay (DESIGN.md: "whatever
     * response the client gets"): a CORS header must reach a 502 too. Only
     * safe names get this far (mg_resp_set_header). */
    /* msg is one of our constant texts (no JSON escaping needed); its cut
     * at 160 bytes keeps the whole body inside the buffer, so n is what
     * was written: 31 bytes of frame + 36 of request id + 160 < 256. The
     * request id is a view with its length (not NUL-terminated). */
    char body[256];
    int n = snprintf(body, sizeof(body), "{\"error\":\"%.160s\",\"request_id\":\"%.*s\"}\n", msg,
                     (int)r->v.request_id_len, r->v.request_id);
    assert(n > 0 && (size_t)n < sizeof(body)); /* else the send would read past body */
    mg_resp_set_header(r, "Content-Type", 12, "application/json", 16, MG_HDR_SET);
    local_start(r, status, n); /* with a status header_filter set, if it did */
    if (!r->resp_no_body) local_write(r, body, (size_t)n);
    r->resp_finished = 1;
    mg__req_maybe_done(r);
}

/* An error answer from the gateway: JSON with the request id. A routed
 * request whose route has header_filter policies runs them first, as on a
 * proxied response (README "Phases"): its answer continues in
 * mg__req_phase_done. At most once per request: an error while that
 * header_filter runs (it raised, the client's body timed out) is answered
 * without it. */
void mg__req_fail(mg_req_t *r, int status, const char *msg)
{
    mg_conn_t *c = r->conn;
    if (r->up) mg__proxy_abort(r);
    if (r->resp_started) { /* too late for a status: the client sees a cut */
        mg__conn_close(c);
        return;
    }
    req_stop_waiting(r); /* a coroutine waiting on anything is dropped */
    r->fail_status = 0;
    if (!r->v.request_id_len) make_request_id(c->w, r);
    if (!r->v.version_major) r->v.version_minor = 1; /* refused before the version was read */
    if (!msg) msg = mg__status_reason(status);
    if (status == 400 || status == 408 || status == 413 || status == 414 || status == 431 ||
        status == 505 || status == 417 || status == 405 || !r->body_done)
        c->keepalive = 0;
    r->lua_status = 0;
    if ((r->phases & MG_PHASE_HEADER_FILTER) && !r->hf_ran && c->w->ref_header_filter >= 0) {
        r->hf_ran = 1;
        r->fail_status = status;
        r->fail_msg = msg;
        r->v.status = status; /* ctx.resp.status */
        mg__lua_start(r, MG_LUA_HEADER_FILTER);
        return;
    }
    fail_send(r, status, msg);
}

/* The request body failed while streaming (too large, malformed). */
void mg__req_body_event(mg_req_t *r)
{
    if (r->wait == MG_WAIT_BODY) {
        r->wait = MG_WAIT_NONE;
        mg__lua_resume(r);
    }
}

void mg__req_client_drained(mg_req_t *r)
{
    if (r->wait == MG_WAIT_DRAIN && mg__conn_queued(r->conn) < MG_HIGH_WATER / 2) {
        r->wait = MG_WAIT_NONE;
        mg__lua_resume(r);
        return;
    }
    if (r->state == MG_REQ_PROXY && r->up) {
        mg__proxy_client_drained(r);
        return;
    }
    mg__req_maybe_done(r);
}

/* Finishes the request once its response is out and Lua is done with it. */
void mg__req_maybe_done(mg_req_t *r)
{
    mg_conn_t *c = r->conn;
    if (r->done || !r->resp_finished || r->lua_busy || c->inflight || c->out.pending) return;
    if (r->up) mg__proxy_release(r);
    if ((r->phases & MG_PHASE_LOG) && !r->log_ran && c->w->ref_log >= 0) {
        r->log_ran = 1;
        mg__lua_start(r, MG_LUA_LOG);
        /* The log phase's end (now, or after a yield) calls us again and
         * finishes the request; going on here would finish it twice. */
        return;
    }
    r->done = 1;
    mg__access_log(r);
    mg__conn_req_done(c);
}

/* ---- running the phases ------------------------------------------------------ */

void mg__req_run(mg_req_t *r)
{
    make_request_id(r->conn->w, r);
    r->state = MG_REQ_ACCESS;
    mg__lua_start(r, MG_LUA_ACCESS);
}

/* A Lua phase has returned (rc 0) or raised (rc < 0). */
void mg__req_phase_done(mg_req_t *r, int phase, int rc)
{
    if (phase == MG_LUA_LOG) {
        mg__req_maybe_done(r);
        return;
    }
    if (phase == MG_LUA_HEADER_FILTER && r->fail_status) { /* on a gateway error */
        int status = r->fail_status;
        r->fail_status = 0;
        if (rc < 0) {
            r->lua_status = 0;
            fail_send(r, 500, "policy error"); /* hf_ran: the filter is not run again */
        } else {
            fail_send(r, status, r->fail_msg);
        }
        return;
    }
    if (rc < 0) {
        mg__req_fail(r, 500, "policy error");
        return;
    }
    if (phase == MG_LUA_HEADER_FILTER) {
        mg__proxy_header_filter_done(r);
        return;
    }
    /* access */
    if (r->body_error && !r->resp_started) {
        mg__req_fail(r, r->body_error, NULL);
        return;
    }
    if (r->resp_started) {
        if (!r->resp_finished) mg_resp_finish(r);
        mg__req_maybe_done(r);
        return;
    }
    if (r->upstream) {
        r->state = MG_REQ_PROXY;
        mg__proxy_start(r);
        return;
    }
    if (r->conn->w->mock) {
        mg__req_fail(r, 500, "handler sent no response");
        return;
    }
    mg__req_fail(r, 502, "route has no upstream");
}

/* ---- FFI: request ------------------------------------------------------------- */

static int header_lookup(const mg_header_t *h, uint32_t nh, const mg_hedit_t *edits,
                         const char *name, size_t nl, size_t idx, const char **v, size_t *vl)
{
    /* Effective values: the originals (unless a set/remove came after),
     * then the added values, in order. */
    const mg_hedit_t *reset = NULL;
    for (const mg_hedit_t *e = edits; e; e = e->next)
        if (e->mode != MG_HDR_ADD && mg__strieq(e->name, e->name_len, name, nl)) reset = e;
    size_t k = 0;
    const mg_hedit_t *e = edits;
    if (reset) {
        if (reset->mode == MG_HDR_SET && k++ == idx) {
            *v = reset->value;
            *vl = reset->value_len;
            return MG_OK;
        }
        e = reset->next;
    } else {
        for (uint32_t i = 0; i < nh; i++)
            if (mg__strieq(h[i].name, h[i].name_len, name, nl) && k++ == idx) {
                *v = h[i].value;
                *vl = h[i].value_len;
                return MG_OK;
            }
    }
    for (; e; e = e->next)
        if (e->mode == MG_HDR_ADD && mg__strieq(e->name, e->name_len, name, nl) && k++ == idx) {
            *v = e->value;
            *vl = e->value_len;
            return MG_OK;
        }
    return MG_DECLINED;
}

int mg_req_header(mg_req_t *r, const char *name, size_t nl, size_t idx, const char **v, size_t *vl)
{
    return header_lookup(r->hdrs, r->v.nheaders, r->req_edits, name, nl, idx, v, vl);
}

/* A field name is a token (RFC 9110 5.1): "X-@" or "X(a)" would be a head
 * that clients and backends parse differently, or reject. */
int mg__token_ok(const char *n, size_t nl)
{
    if (nl == 0) return 0;
    for (size_t i = 0; i < nl; i++)
        if (!mg__tchar[(unsigned char)n[i]]) return 0;
    return 1;
}

int mg__header_valid(const char *n, size_t nl, const char *v, size_t vl)
{
    return mg__token_ok(n, nl) && mg__value_ok(v, vl);
}

/* Appends an edit whose name and value are copied into the arena with it:
 * one allocation (the edit, then the name, then the value). The value is
 * checked by the caller; the name here. */
static int push_edit(mg_req_t *r, mg_hedit_t **head, mg_hedit_t **tail, const char *n, size_t nl,
                     const char *v, size_t vl, int mode)
{
    if (nl > UINT32_MAX || vl > UINT32_MAX || !mg__token_ok(n, nl)) return MG_EINVAL;
    mg_hedit_t *e = mg__arena_alloc(&r->arena, sizeof(*e) + nl + vl);
    if (!e) return MG_ERROR;
    char *d = (char *)(e + 1);
    memcpy(d, n, nl);
    if (vl) memcpy(d + nl, v, vl);
    e->name = d;
    e->value = d + nl;
    e->name_len = (uint32_t)nl;
    e->value_len = (uint32_t)vl;
    e->mode = mode;
    e->next = NULL;
    if (*tail)
        (*tail)->next = e;
    else
        *head = e;
    *tail = e;
    return MG_OK;
}

static int add_edit(mg_req_t *r, mg_hedit_t **head, mg_hedit_t **tail, const char *n, size_t nl,
                    const char *v, size_t vl, int mode)
{
    if (mode < MG_HDR_SET || mode > MG_HDR_REMOVE) return MG_EINVAL;
    if (mode == MG_HDR_REMOVE) vl = 0;
    /* No CR/LF/NUL from a policy either: it would split the head we send. */
    if (vl && !mg__value_ok(v, vl)) return MG_EINVAL;
    return push_edit(r, head, tail, n, nl, v, vl, mode);
}

/* An integer value, formatted here: no string for Lua to make (and
 * collect) per request, nothing to check but the name. */
static int add_edit_int(mg_req_t *r, mg_hedit_t **head, mg_hedit_t **tail, const char *n, size_t nl,
                        int64_t value, int mode)
{
    if (mode != MG_HDR_SET && mode != MG_HDR_ADD) return MG_EINVAL;
    char buf[24], *end = buf + sizeof(buf), *d = end;
    uint64_t u = value < 0 ? 0 - (uint64_t)value : (uint64_t)value;
    do {
        *--d = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (value < 0) *--d = '-';
    return push_edit(r, head, tail, n, nl, d, (size_t)(end - d), mode);
}

int mg_req_set_header(mg_req_t *r, const char *n, size_t nl, const char *v, size_t vl, int mode)
{
    return add_edit(r, &r->req_edits, &r->req_edits_tail, n, nl, v, vl, mode);
}

int mg_req_set_header_int(mg_req_t *r, const char *n, size_t nl, int64_t value, int mode)
{
    return add_edit_int(r, &r->req_edits, &r->req_edits_tail, n, nl, value, mode);
}

/* The upstream request-target: path NULL keeps the path (the route's
 * strip_prefix/rewrite or an earlier call), query NULL keeps the query.
 * Both are checked before either is applied. */
int mg_req_set_uri(mg_req_t *r, const char *path, size_t pl, const char *query, size_t ql)
{
    if (!path && !query) return MG_EINVAL;
    if (path) {
        if (pl == 0 || path[0] != '/') return MG_EINVAL;
        for (size_t i = 0; i < pl; i++) {
            unsigned char ch = (unsigned char)path[i];
            if (ch <= 0x20 || ch >= 0x7f || ch == '?' || ch == '#') return MG_EINVAL;
        }
    }
    if (query) {
        for (size_t i = 0; i < ql; i++) {
            unsigned char ch = (unsigned char)query[i];
            if (ch <= 0x20 || ch >= 0x7f || ch == '#') return MG_EINVAL;
        }
    }
    if (path) {
        char *p = mg__arena_dup(&r->arena, path, pl);
        if (!p) return MG_ERROR;
        r->up_path = p;
        r->up_path_len = (uint32_t)pl;
    }
    if (query) {
        char *q = mg__arena_dup(&r->arena, query, ql);
        if (!q && ql) return MG_ERROR;
        r->up_query = q;
        r->up_query_len = (uint32_t)ql;
        r->up_query_set = 1;
    }
    return MG_OK;
}

int mg_req_set_upstream(mg_req_t *r, mg_upstream_t *u)
{
    if (r->upstream) mg_upstream_release(r->upstream);
    r->upstream = u;
    if (u) u->refs++;
    return MG_OK;
}

int mg_req_set_phases(mg_req_t *r, unsigned phases)
{
    r->phases = phases;
    return MG_OK;
}

int mg_req_set_route(mg_req_t *r, const char *id, size_t len)
{
    /* copied: a reload may collect the route table while we still log it */
    r->route_id = mg__arena_dup(&r->arena, id, len);
    r->route_id_len = r->route_id ? (uint32_t)len : 0;
    return MG_OK;
}

static void on_sleep_done(uv_timer_t *t)
{
    mg_req_t *r = t->data;
    if (r->wait != MG_WAIT_SLEEP) return;
    r->wait = MG_WAIT_NONE;
    mg__lua_resume(r);
}

int mg_req_sleep(mg_req_t *r, uint32_t ms)
{
    if (r->wait != MG_WAIT_NONE) return MG_EINVAL;
    r->wait = MG_WAIT_SLEEP;
    uv_timer_start(&r->sleep_timer, on_sleep_done, ms, 0);
    return MG_AGAIN;
}

int mg_req_read_body(mg_req_t *r, const char **data, size_t *len)
{
    *len = 0;
    *data = NULL;
    if (r->body_error) return MG_ERROR;
    if (r->sink == MG_SINK_NONE) r->sink = MG_SINK_LUA;
    if (r->sink != MG_SINK_LUA) return MG_EINVAL;
    mg_out_t *o = &r->body_spans;
    for (;;) {
        if (r->span_idx < o->n) {
            *data = o->iov[r->span_idx].base;
            *len = o->iov[r->span_idx].len;
            r->span_idx++;
            return MG_OK;
        }
        mg__out_reset(o);
        r->span_idx = 0;
        if (r->body_done) return MG_OK;
        int rc = mg__conn_body_step(r->conn);
        if (rc < 0) return MG_ERROR;
        if (rc == 0) { /* reading: C resumes us when bytes arrive */
            r->wait = MG_WAIT_BODY;
            return MG_AGAIN;
        }
    }
}

int mg_req_set_body(mg_req_t *r, const char *data, size_t len)
{
    /* Only once the client's body is all read: bytes of it still to come
     * would otherwise follow ours upstream. */
    if (!r->body_done || r->body_error || r->sink == MG_SINK_PROXY || r->resp_started)
        return MG_DECLINED;
    if (r->body_mode == MG_BODY_NONE && len == 0) return MG_OK; /* nothing to replace */
    r->lua_body = mg__arena_dup(&r->arena, data, len);
    if (!r->lua_body) return MG_ERROR;
    r->lua_body_len = len;
    r->lua_body_set = 1;
    return MG_OK;
}

/* ---- FFI: response ---------------------------------------------------------- */

int mg_resp_header(mg_req_t *r, const char *n, size_t nl, size_t idx, const char **v, size_t *vl)
{
    const mg_header_t *h = NULL;
    uint32_t nh = 0;
    if (r->up && r->up->head_done) {
        h = r->up->hdrs;
        nh = r->up->nhdrs;
    }
    return header_lookup(h, nh, r->resp_edits, n, nl, idx, v, vl);
}

/* May Lua set (or add) the response header n? */
static int resp_settable(mg_req_t *r, const char *n, size_t nl, int mode)
{
    if (r->resp_started) return MG_DECLINED;
    /* The gateway frames the response: a second Content-Length or a
     * Transfer-Encoding the body does not have would make the client read
     * it differently (request smuggling's mirror image). The mock may: it
     * plays misbehaving backends. */
    if (mode != MG_HDR_REMOVE && !r->conn->w->mock &&
        (mg__hop_by_hop(n, nl) || mg__strieq(n, nl, "content-length", 14)))
        return MG_EINVAL;
    return MG_OK;
}

int mg_resp_set_header(mg_req_t *r, const char *n, size_t nl, const char *v, size_t vl, int mode)
{
    int rc = resp_settable(r, n, nl, mode);
    if (rc != MG_OK) return rc;
    return add_edit(r, &r->resp_edits, &r->resp_edits_tail, n, nl, v, vl, mode);
}

int mg_resp_set_header_int(mg_req_t *r, const char *n, size_t nl, int64_t value, int mode)
{
    int rc = resp_settable(r, n, nl, mode);
    if (rc != MG_OK) return rc;
    return add_edit_int(r, &r->resp_edits, &r->resp_edits_tail, n, nl, value, mode);
}

int mg_req_listener(mg_req_t *r)
{
    return r->conn->listener;
}

int mg_resp_set_status(mg_req_t *r, int status)
{
    if (status < 200 || status > 999) return MG_EINVAL;
    if (r->resp_started) return MG_DECLINED;
    r->lua_status = status;
    return MG_OK;
}

int mg_resp_start(mg_req_t *r, int status, int64_t len)
{
    if (r->resp_started) return MG_DECLINED;
    if (status < 200 || status > 999 || len < MG_LEN_CLOSE) return MG_EINVAL;
    if (r->conn->closing) return MG_ERROR;
    local_start(r, status, len);
    return MG_OK;
}

int mg_resp_write(mg_req_t *r, const char *data, size_t len)
{
    if (!r->resp_started) mg_resp_start(r, 200, MG_LEN_CHUNKED);
    if (r->resp_finished) return MG_DECLINED;
    if (r->conn->closing) return MG_ERROR;
    if (r->resp_length >= 0 && r->resp_sent + len > (uint64_t)r->resp_length) return MG_EINVAL;
    r->resp_sent += len;
    if (!r->resp_no_body && local_write(r, data, len)) return MG_ERROR;
    if (mg__conn_queued(r->conn) > MG_HIGH_WATER) {
        r->wait = MG_WAIT_DRAIN;
        return MG_AGAIN;
    }
    return MG_OK;
}

int mg_resp_finish(mg_req_t *r)
{
    if (!r->resp_started) mg_resp_start(r, 200, 0);
    if (r->resp_finished) return MG_OK;
    r->resp_finished = 1;
    if (r->resp_no_body) return MG_OK;
    if (r->resp_chunked)
        mg__conn_write_copy(r->conn, "0\r\n\r\n", 5);
    else if (r->resp_length >= 0 && r->resp_sent < (uint64_t)r->resp_length)
        r->resp_close = 1; /* short body: only a close tells the client */
    return MG_OK;
}

int mg_resp_send(mg_req_t *r, int status, const char *body, size_t len)
{
    if (r->resp_started) return MG_DECLINED;
    if (status < 200 || status > 999) return MG_EINVAL;
    local_start(r, status, (int64_t)len);
    r->resp_sent = len;
    if (!r->resp_no_body && len) local_write(r, body, len);
    r->resp_finished = 1;
    return MG_OK;
}

/* A 1xx before the response (103 Early Hints, 102): `headers` is a block of
 * "Name: value\r\n" lines. Ignored for HTTP/1.0 clients, which know no 1xx. */
int mg_resp_interim(mg_req_t *r, int status, const char *headers, size_t len)
{
    if (r->resp_started) return MG_DECLINED;
    if (status < 102 || status > 199) return MG_EINVAL;
    for (size_t i = 0; i < len; i++) { /* every line ends in CRLF, nothing bare */
        if (headers[i] == '\n' && (i == 0 || headers[i - 1] != '\r')) return MG_EINVAL;
        if (headers[i] == '\r' && (i + 1 == len || headers[i + 1] != '\n')) return MG_EINVAL;
        if (headers[i] == 0) return MG_EINVAL;
    }
    if (len >= 2 && headers[len - 1] != '\n') return MG_EINVAL;
    if (r->v.version_minor == 0) return MG_OK;
    char line[48];
    int n = snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", status, mg__status_reason(status));
    if (mg__conn_write_copy(r->conn, line, (size_t)n) ||
        mg__conn_write_copy(r->conn, headers, len) || mg__conn_write_copy(r->conn, "\r\n", 2))
        return MG_ERROR;
    return MG_OK;
}

/* A route's lower body limit (request-size-limit): a Content-Length above it
 * is the caller's to refuse; a chunked body is cut at it with a 413. Only
 * ever lowers the node's limit. */
int mg_req_set_body_limit(mg_req_t *r, uint64_t bytes)
{
    if (bytes < r->body_limit) r->body_limit = bytes;
    if (r->v.content_length >= 0 && (uint64_t)r->v.content_length > r->body_limit)
        return MG_DECLINED;
    return MG_OK;
}
