/* conn.c: downstream HTTP/1.1 connections.
 *
 * One buffer per busy connection, taken from the worker's pool when bytes
 * arrive and given back when the connection goes idle. The request head is
 * parsed in place (header values are views into the buffer) and stays put
 * until the request ends; body bytes are read into the space after the head
 * and that space is reused only once every write that points into it has
 * completed, which is what bounds memory and gives backpressure.
 *
 * The parser pauses at two points: after a request head (the access phase
 * runs, the upstream is chosen) and after a whole request (pipelined
 * requests wait unparsed until the current response is out, so responses
 * leave in order).
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "mg.h"

static void conn_read_start(mg_conn_t *c);
static void conn_read_stop(mg_conn_t *c);
static void conn_process(mg_conn_t *c);
static void conn_reject(mg_conn_t *c, int status, const char *why);

/* RFC 9110 tchar */
const unsigned char mg__tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,  ['~'] = 1, ['0'] = 1,
    ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,  ['7'] = 1, ['8'] = 1,
    ['9'] = 1, ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1,  ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1,  ['N'] = 1, ['O'] = 1,
    ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,  ['V'] = 1, ['W'] = 1,
    ['X'] = 1, ['Y'] = 1, ['Z'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1,  ['d'] = 1, ['e'] = 1,
    ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1,  ['l'] = 1, ['m'] = 1,
    ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1,  ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

/* A header just parsed (request or response): the name is a token that
 * ends right at the colon ("Host : x" is an old smuggling vector: some
 * peers strip the space, some do not), the value loses its trailing
 * whitespace and holds no control character but HTAB. -1: invalid. */
int mg__header_finish(mg_header_t *h)
{
    if (h->name_len == 0 || h->name[h->name_len] != ':') return -1;
    for (uint32_t i = 0; i < h->name_len; i++)
        if (!mg__tchar[(unsigned char)h->name[i]]) return -1;
    while (h->value_len > 0 &&
           (h->value[h->value_len - 1] == ' ' || h->value[h->value_len - 1] == '\t'))
        h->value_len--;
    return mg__value_ok(h->value, h->value_len) ? 0 : -1;
}

static inline mg_conn_t *conn_of(llhttp_t *p)
{
    return (mg_conn_t *)p->data;
}

/* ---- parser callbacks ---------------------------------------------------- */

static int on_message_begin(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    if (!c->req) {
        c->req = mg__req_new(c);
        if (!c->req) {
            c->error_status = 503;
            return -1;
        }
    }
    c->hdr_state = HS_NONE;
    c->head_bytes = 0;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    if (!r->uri) r->uri = at;
    /* The buffer never moves during the head, so pieces are adjacent. */
    r->uri_len += (uint32_t)len;
    if (r->uri_len > c->w->conf->limits.max_uri_bytes) {
        c->error_status = 414;
        return -1;
    }
    return 0;
}

static int head_limit(mg_conn_t *c, size_t len)
{
    c->head_bytes += (uint32_t)len;
    if (c->head_bytes > c->w->conf->limits.max_header_bytes) {
        c->error_status = 431;
        return -1;
    }
    return 0;
}

/* Header spans, shared by the request (here) and response (proxy.c)
 * parsers. The buffer never moves during a head, so the pieces llhttp
 * hands over are adjacent and just extend the current name or value. */
int mg__header_name_span(mg_header_t *hdrs, uint32_t n, int *state, const char *at, size_t len)
{
    if (*state == HS_FIELD) {
        hdrs[n].name_len += (uint32_t)len;
        return 0;
    }
    if (n == MG_MAX_HEADERS) return -1;
    hdrs[n].name = at;
    hdrs[n].name_len = (uint32_t)len;
    hdrs[n].value = at; /* replaced by the value; an empty value stays empty */
    hdrs[n].value_len = 0;
    *state = HS_FIELD;
    return 0;
}

int mg__header_value_span(mg_header_t *h, int *state, const char *at, size_t len)
{
    if (*state == HS_FIELD) {
        h->value = at;
        h->value_len = (uint32_t)len;
        *state = HS_VALUE;
        return 0;
    }
    /* A value that goes on after its line ended, or that is not adjacent to
     * what came before, is obs-fold: RFC 9112 lets us reject it, and a peer
     * could join the lines differently than we would. */
    if (*state != HS_VALUE || h->value + h->value_len != at) return -1;
    h->value_len += (uint32_t)len;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    if (head_limit(c, len)) return -1;
    if (c->head_done) return 0; /* trailer fields: counted, then dropped */
    if (mg__header_name_span(r->hdrs, r->v.nheaders, &c->hdr_state, at, len) != 0) {
        c->error_status = 431; /* more fields than MG_MAX_HEADERS */
        return -1;
    }
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    if (head_limit(c, len)) return -1;
    if (c->head_done) return 0;
    if (mg__header_value_span(&r->hdrs[r->v.nheaders], &c->hdr_state, at, len) != 0) {
        c->error_status = 400;
        return -1;
    }
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    if (c->head_done) return 0;
    if (mg__header_finish(&r->hdrs[r->v.nheaders]) != 0) {
        c->error_status = 400;
        return -1;
    }
    r->v.nheaders++;
    c->hdr_state = HS_VALUE_DONE;
    return 0;
}

static int count_header(mg_req_t *r, const char *name, size_t len, const mg_header_t **first)
{
    int n = 0;
    for (uint32_t i = 0; i < r->v.nheaders; i++)
        if (mg__strieq(r->hdrs[i].name, r->hdrs[i].name_len, name, len)) {
            if (n++ == 0 && first) *first = &r->hdrs[i];
        }
    return n;
}

/* Splits the request-target into path and query; origin-form, or
 * absolute-form (proxies must accept it; its authority wins over Host),
 * or "*" for OPTIONS. */
static int parse_target(mg_conn_t *c, mg_req_t *r)
{
    const char *u = r->uri;
    size_t n = r->uri_len;
    if (n == 0) return 400;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)u[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == '#') return 400;
    }
    if (u[0] != '/') {
        if (n == 1 && u[0] == '*' && llhttp_get_method(&c->parser) == HTTP_OPTIONS) {
            r->v.path = u;
            r->v.path_len = 1;
            return 0;
        }
        size_t skip = 0;
        if (n > 7 && strncasecmp(u, "http://", 7) == 0)
            skip = 7;
        else if (n > 8 && strncasecmp(u, "https://", 8) == 0)
            skip = 8;
        if (!skip) return 400;
        const char *slash = memchr(u + skip, '/', n - skip);
        if (!slash) return 400;
        r->abs_host = u + skip;
        r->abs_host_len = (uint32_t)(slash - (u + skip));
        if (r->abs_host_len == 0) return 400;
        n -= (size_t)(slash - u);
        u = slash;
    }
    const char *q = memchr(u, '?', n);
    r->v.path = u;
    if (q) {
        r->v.path_len = (uint32_t)(q - u);
        r->v.query = q + 1;
        r->v.query_len = (uint32_t)(n - r->v.path_len - 1);
        r->has_query = 1;
    } else {
        r->v.path_len = (uint32_t)n;
        r->v.query = u + n;
        r->v.query_len = 0;
    }
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    const mg_limits_t *lim = &c->w->conf->limits;
    const mg_header_t *h = NULL;

    if (c->hdr_state == HS_FIELD) { /* a field with no colon line end */
        c->error_status = 400;
        return -1;
    }
    r->v.version_major = p->http_major;
    r->v.version_minor = p->http_minor;
    if (p->http_major == 0) { /* HTTP/0.9 has no headers to route on */
        c->error_status = 400;
        return -1;
    }
    if (p->http_major != 1) {
        c->error_status = 505;
        return -1;
    }
    const char *m = llhttp_method_name((llhttp_method_t)p->method);
    r->v.method = m;
    r->v.method_len = (uint32_t)strlen(m);
    if (p->method == HTTP_CONNECT) {
        c->error_status = 405;
        return -1;
    }
    int st = parse_target(c, r);
    if (st) {
        c->error_status = st;
        return -1;
    }
    /* Exactly one Host in HTTP/1.1 (RFC 9112 3.2): two could route two ways. */
    int nhost = count_header(r, "host", 4, &h);
    if (nhost > 1 || (nhost == 0 && p->http_minor >= 1 && !r->abs_host)) {
        c->error_status = 400;
        return -1;
    }
    if (h) {
        for (uint32_t i = 0; i < h->value_len; i++) {
            char ch = h->value[i];
            if (ch == ' ' || ch == '\t' || ch == '/' || ch == '\\' || ch == '@' || ch == ',') {
                c->error_status = 400;
                return -1;
            }
        }
    }
    if (p->flags & F_TRANSFER_ENCODING) {
        /* HTTP/1.0 has no chunked framing (RFC 9112 6.1), and a coding
         * list that does not end in chunked leaves the length to a close
         * that a backend may see elsewhere. */
        if (p->http_minor == 0 || !(p->flags & F_CHUNKED)) {
            c->error_status = 400;
            return -1;
        }
        r->body_mode = MG_BODY_CHUNKED;
        r->v.content_length = -1;
    } else if (p->flags & F_CONTENT_LENGTH) {
        if (p->content_length > lim->max_body_bytes) {
            c->error_status = 413;
            return -1;
        }
        r->v.content_length = (int64_t)p->content_length;
        r->body_mode = p->content_length > 0 ? MG_BODY_LENGTH : MG_BODY_NONE;
    } else {
        r->v.content_length = -1;
        r->body_mode = MG_BODY_NONE;
    }
    const mg_header_t *ex = NULL;
    if (count_header(r, "expect", 6, &ex)) {
        if (!mg__strieq(ex->value, ex->value_len, "100-continue", 12)) {
            c->error_status = 417;
            return -1;
        }
        r->expect_continue = p->http_minor >= 1 && r->body_mode != MG_BODY_NONE;
    }
    c->keepalive = llhttp_should_keep_alive(p);
    c->head_done = 1;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    r->body_received += len;
    if (r->body_received > r->body_limit) {
        c->error_status = 413;
        return -1;
    }
    mg_out_t *o = &r->body_spans;
    if (r->sink == MG_SINK_PROXY) {
        o = &r->up->out;
        if (r->up_chunked) {
            mg__out_add_chunk(o, at, len);
            return 0;
        }
    }
    if (r->sink != MG_SINK_DISCARD) mg__out_add(o, at, len);
    return 0;
}

static int on_chunk_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    mg_req_t *r = c->req;
    mg_out_t *o = r->sink == MG_SINK_PROXY ? &r->up->out : &r->body_spans;
    /* A run of tiny chunks could outgrow one gather write: stop and flush. */
    if (mg__out_room(o) < 8) return HPE_PAUSED;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    mg_conn_t *c = conn_of(p);
    c->req->body_done = 1;
    return HPE_PAUSED;
}

void mg__conn_settings(llhttp_settings_t *s)
{
    llhttp_settings_init(s);
    s->on_message_begin = on_message_begin;
    s->on_url = on_url;
    s->on_header_field = on_header_field;
    s->on_header_value = on_header_value;
    s->on_header_value_complete = on_header_value_complete;
    s->on_headers_complete = on_headers_complete;
    s->on_body = on_body;
    s->on_chunk_complete = on_chunk_complete;
    s->on_message_complete = on_message_complete;
}

/* ---- life cycle ------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h)
{
    mg_conn_t *c = h->data;
    if (--c->handles_open > 0) return;
    mg_worker_t *w = c->w;
    if (c->buf) mg__buf_put(w, c->buf);
    free(c);
}

void mg__conn_close(mg_conn_t *c)
{
    if (c->closing) return;
    c->closing = 1;
    mg_worker_t *w = c->w;
    if (c->req) {
        mg__req_abort(c->req);
        c->req = NULL;
    }
    mg_list_remove(&c->link);
    w->nconns--;
    uv_close((uv_handle_t *)&c->timer.timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    if (w->draining && w->nconns == 0) mg__worker_drained(w);
}

static void on_timeout(mg_deadline_t *d)
{
    mg_conn_t *c = d->timer.data;
    mg_req_t *r = c->req;
    if (c->lingering || !r || (!c->head_done && c->len == 0 && c->pos == 0)) {
        /* idle keep-alive, or the lingering close ran out */
        mg__conn_close(c);
        return;
    }
    if (r->resp_started || r->state == MG_REQ_DONE) { /* send_timeout */
        mg__conn_close(c);
        return;
    }
    /* header or body read timeout */
    c->keepalive = 0;
    mg__req_fail(r, 408, "request timeout");
}

static void conn_timer(mg_conn_t *c, uint32_t ms)
{
    mg__deadline_set(&c->timer, ms);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)hint;
    mg_conn_t *c = (mg_conn_t *)h;
    if (!c->buf) {
        c->buf = mg__buf_get(c->w);
        c->cap = c->w->buf_size;
        c->len = c->pos = 0;
    }
    if (c->lingering) { /* bytes read during a lingering close are dropped */
        c->len = c->pos = 0;
    }
    b->base = c->buf + c->len;
    b->len = c->cap - c->len;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    mg_conn_t *c = (mg_conn_t *)s;
    if (n == 0) return;
    mg_req_t *r = c->req;
    if (n < 0) {
        if (n == UV_ENOBUFS) { /* buffer full: reading resumes once it drains */
            conn_read_stop(c);
            return;
        }
        /* A client may half-close after its whole request and still wait
         * for the answer, body included: the body bytes may still sit in
         * the buffer, unparsed until the handler reads them, so the request
         * goes on and only a body that needs bytes past the buffer fails
         * (body_need_more). Anything else in flight dies with the
         * connection. */
        if (n == UV_EOF && r && c->head_done && !c->lingering) {
            conn_read_stop(c);
            c->eof = 1;
            c->keepalive = 0;
            return;
        }
        mg__conn_close(c);
        return;
    }
    if (c->lingering) return;
    c->len += (uint32_t)n;
    /* Reading stays on while a request is served (no epoll_ctl churn per
     * request); bytes that arrive meanwhile wait in the buffer. */
    if (r && c->head_done) {
        mg__conn_pump(c);
        return;
    }
    conn_process(c);
}

static void conn_read_start(mg_conn_t *c)
{
    if (c->reading || c->closing) return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

static void conn_read_stop(mg_conn_t *c)
{
    if (!c->reading) return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
}

static mg_conn_t *conn_new(mg_worker_t *w)
{
    mg_conn_t *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->w = w;
    uv_tcp_init(w->loop, &c->tcp);
    mg__deadline_init(&c->timer, w->loop, c, on_timeout);
    c->tcp.data = c;
    c->handles_open = 2;
    mg_list_insert_head(&w->conns, &c->link);
    w->nconns++;
    return c;
}

static void conn_start(mg_conn_t *c)
{
    mg_worker_t *w = c->w;
    uv_tcp_nodelay(&c->tcp, 1);
    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            uv_ip6_name(a, c->remote_addr, sizeof(c->remote_addr));
            c->remote_port = ntohs(a->sin6_port);
        } else if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            uv_ip4_name(a, c->remote_addr, sizeof(c->remote_addr));
            c->remote_port = ntohs(a->sin_port);
        }
    }
    c->head_timer_on = 1;
    llhttp_init(&c->parser, HTTP_REQUEST, &w->req_settings);
    c->parser.data = c;
    conn_timer(c, w->conf->limits.client_header_timeout_ms);
    conn_read_start(c);
}

void mg__conn_accept(uv_stream_t *server, int status)
{
    mg_worker_t *w = mg__worker;
    if (status < 0) {
        mg_log(MG_LOG_ERROR, "accept: %s", uv_strerror(status));
        return;
    }
    mg_conn_t *c = conn_new(w);
    if (!c) return;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        mg__conn_close(c);
        return;
    }
    /* Which listener: O(listeners), at most MG_MAX_LISTEN. */
    for (int i = 0; i < w->nlisten; i++) {
        if ((uv_stream_t *)&w->listeners[i] == server) c->listener = w->listener_tag[i];
    }
    conn_start(c);
}

mg_conn_t *mg__conn_open_fd(mg_worker_t *w, int fd)
{
    mg_conn_t *c = conn_new(w);
    if (!c) return NULL;
    if (uv_tcp_open(&c->tcp, fd) != 0) {
        mg__conn_close(c);
        return NULL;
    }
    conn_start(c);
    return c;
}

/* ---- head ---------------------------------------------------------------- */

static int version_too_new(mg_conn_t *c)
{
    /* llhttp calls every unknown version invalid; HTTP/2+ in an HTTP/1
     * request line deserves 505 rather than 400. */
    const char *end = c->buf + c->len;
    for (const char *s = c->buf; s + 7 <= end && *s != '\n'; s++)
        if (memcmp(s, " HTTP/", 6) == 0) return s[6] >= '2' && s[6] <= '9';
    return 0;
}

static void conn_process(mg_conn_t *c)
{
    if (c->closing) return;
    assert(!c->head_done);
    if (c->pos == c->len) {
        conn_read_start(c);
        return;
    }
    llhttp_errno_t e = llhttp_execute(&c->parser, c->buf + c->pos, c->len - c->pos);
    if (e == HPE_OK) {
        c->pos = c->len;
        if (c->len >= c->cap - MG_BODY_SPACE) { /* the head cannot fit */
            conn_reject(c, c->req && c->req->uri && !c->head_bytes ? 414 : 431, NULL);
            return;
        }
        if (c->req && !c->head_timer_on) { /* first bytes of a request head */
            c->head_timer_on = 1;
            conn_timer(c, c->w->conf->limits.client_header_timeout_ms);
        }
        conn_read_start(c);
        return;
    }
    if (e == HPE_PAUSED) {
        c->pos = (uint32_t)(llhttp_get_error_pos(&c->parser) - c->buf);
        llhttp_resume(&c->parser);
        assert(c->head_done); /* the only pause before a body is the head's */
        c->body_base = c->pos;
        conn_timer(c, 0);
        c->head_timer_on = 0;
        c->nrequests++;
        mg__req_run(c->req);
        return;
    }
    int status = c->error_status;
    if (!status) status = (e == HPE_INVALID_VERSION && version_too_new(c)) ? 505 : 400;
    conn_reject(c, status, llhttp_get_error_reason(&c->parser));
}

/* A request we refuse before it reaches Lua or a backend: answer, then close
 * (the rest of the stream cannot be trusted to be framed as we think). */
static void conn_reject(mg_conn_t *c, int status, const char *why)
{
    if (why) mg_log_debug("rejecting request with %d: %s", status, why);
    conn_read_stop(c);
    if (!c->req) c->req = mg__req_new(c);
    if (!c->req) {
        mg__conn_close(c);
        return;
    }
    c->keepalive = 0;
    c->head_done = 1; /* nothing more is parsed on this connection */
    c->req->body_done = 1;
    mg__req_fail(c->req, status, NULL);
}

/* ---- body ------------------------------------------------------------------ */

/* One parser step over the buffered body bytes. 1: progress (spans, or the
 * end); 0: nothing buffered, more must be read; -1: the body is malformed
 * or too large (r->body_error holds the status). */
static int body_parse(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    if (r->body_done) return 1;
    /* A request without a body still runs the parser once (over nothing)
     * so llhttp reports the end of the message. */
    if (c->pos == c->len && r->body_mode != MG_BODY_NONE) return 0;
    llhttp_errno_t e = llhttp_execute(&c->parser, c->buf + c->pos, c->len - c->pos);
    if (e == HPE_PAUSED) {
        c->pos = (uint32_t)(llhttp_get_error_pos(&c->parser) - c->buf);
        llhttp_resume(&c->parser);
        return 1;
    }
    if (e == HPE_OK) {
        c->pos = c->len;
        return 1;
    }
    r->body_error = c->error_status ? c->error_status : 400;
    c->error_status = 0;
    c->keepalive = 0;
    r->body_done = 1;
    return -1;
}

/* Every buffered body byte was handed on: reuse the space after the head
 * and read more (after a 100 Continue, if the client waits for one). */
static int body_need_more(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    c->pos = c->len = c->body_base;
    if (c->eof) { /* half-closed before the body ended: it never will */
        r->body_error = 400;
        r->body_done = 1;
        return -1;
    }
    if (r->expect_continue && !r->continue_sent) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        r->continue_sent = 1;
        mg__conn_write_copy(c, cont, sizeof(cont) - 1);
    }
    conn_timer(c, c->w->conf->limits.client_body_timeout_ms);
    conn_read_start(c);
    return 0;
}

/* For Lua's body reads (called from FFI: never resumes Lua). 1: spans or
 * the end are ready; 0: reading, the request waits; -1: body failed. */
int mg__conn_body_step(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    for (;;) {
        int rc = body_parse(c);
        if (rc < 0) return -1;
        if (r->body_spans.n || r->body_done) return 1;
        if (rc == 0) return body_need_more(c);
    }
}

/* Moves request body bytes to the sink: the upstream (views handed to a
 * gather write) or Lua (spans it takes one at a time). Runs whenever the
 * sink can take more: after a read, after a write completes. */
void mg__conn_pump(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    if (!r || c->closing) return;
    if (r->sink == MG_SINK_LUA) {
        if (r->wait != MG_WAIT_BODY) return; /* Lua asks again by itself */
        if (mg__conn_body_step(c) != 0) mg__req_body_event(r);
        return;
    }
    if (r->sink != MG_SINK_PROXY) return;
    /* The upstream connection is gone while the request is not over: it
     * failed (a 502 is being answered, or a retry waits) or was released
     * with the response. The bytes wait in the buffer; a body not read to
     * its end closes the connection after the response (mg__req_fail,
     * mg__conn_req_done). Found by the proxy fuzz target: a client's pipelined
     * bytes arriving while a failed upstream's 502 was written. */
    if (!r->up) return;
    for (;;) {
        if (r->up->out.pending) return; /* the write callback pumps again */
        if (body_parse(c) < 0) {
            mg__req_fail(r, r->body_error, NULL);
            return;
        }
        if (mg__proxy_flush_body(r) != 0) return; /* pending, or failed */
        if (r->body_done) {
            mg__proxy_body_sent(r);
            return;
        }
        if (c->pos < c->len) continue; /* paused mid-buffer to flush */
        if (body_need_more(c) < 0) mg__req_fail(r, r->body_error, NULL);
        return;
    }
}

/* After a response that did not read the request body: drop what is
 * already buffered; keep-alive survives only if that was the whole body. */
static int body_discard(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    r->sink = MG_SINK_DISCARD;
    while (!r->body_done && body_parse(c) > 0 && (c->pos < c->len || r->body_done)) {
    }
    return r->body_done && !r->body_error;
}

/* ---- writes ---------------------------------------------------------------- */

typedef struct {
    uv_write_t w;
    mg_conn_t *c;
    uv_buf_t b;
    char data[];
} copy_write_t;

static void on_copy_written(uv_write_t *w, int status)
{
    copy_write_t *cw = (copy_write_t *)w;
    mg_conn_t *c = cw->c;
    free(cw);
    c->inflight--;
    if (status < 0) {
        mg__conn_close(c);
        return;
    }
    mg__conn_written(c);
}

/* Copies: for bytes from Lua (which may be collected) and small framing. */
int mg__conn_write_copy(mg_conn_t *c, const char *p, size_t len)
{
    if (c->closing) return -1;
    if (len == 0) return 0;
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);
    if (c->inflight == 0 && !c->out.pending) {
        int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (n == (int)len) return 0;
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if (n != UV_EAGAIN) {
            return -1;
        }
    }
    copy_write_t *cw = malloc(sizeof(*cw) + len);
    if (!cw) return -1;
    memcpy(cw->data, p, len);
    cw->c = c;
    cw->b = uv_buf_init(cw->data, (unsigned)len);
    if (uv_write(&cw->w, (uv_stream_t *)&c->tcp, &cw->b, 1, on_copy_written) < 0) {
        free(cw);
        return -1;
    }
    c->inflight++;
    if (c->req && c->req->resp_started) conn_timer(c, c->w->conf->limits.send_timeout_ms);
    return 0;
}

size_t mg__conn_queued(mg_conn_t *c)
{
    return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

static void on_out_written(uv_write_t *w, int status)
{
    mg_conn_t *c = mg_container_of(w, mg_conn_t, out.wreq);
    c->out.pending = 0;
    mg__out_reset(&c->out);
    c->inflight--;
    if (status < 0) {
        mg__conn_close(c);
        return;
    }
    mg__conn_written(c);
}

/* Flushes c->out (views). 0 written, 1 pending (mg__conn_written follows),
 * <0 failed (the connection is being closed). */
int mg__conn_flush(mg_conn_t *c)
{
    if (c->closing) return -1;
    if (c->inflight) { /* keep order behind queued copies */
        int rc = uv_write(&c->out.wreq, (uv_stream_t *)&c->tcp, c->out.iov, (unsigned)c->out.n,
                          on_out_written);
        if (rc < 0) {
            mg__conn_close(c);
            return -1;
        }
        c->out.pending = 1;
        c->inflight++;
        conn_timer(c, c->w->conf->limits.send_timeout_ms);
        return 1;
    }
    int rc = mg__out_flush(&c->out, (uv_stream_t *)&c->tcp, on_out_written);
    if (rc < 0) {
        mg__conn_close(c);
        return -1;
    }
    if (rc == 1) {
        c->inflight++;
        conn_timer(c, c->w->conf->limits.send_timeout_ms);
    }
    return rc;
}

/* A write completed: whoever waits on the client side may go on. */
void mg__conn_written(mg_conn_t *c)
{
    if (c->closing) return;
    if (c->inflight == 0 && c->req && c->req->resp_started) conn_timer(c, 0);
    mg_req_t *r = c->req;
    if (r) {
        mg__req_client_drained(r);
        return;
    }
}

/* ---- end of a request -------------------------------------------------------- */

static void on_shutdown(uv_shutdown_t *s, int status)
{
    mg_conn_t *c = s->data;
    (void)status;
    if (c->closing) return;
    /* Lingering close: read and drop what the client still sends for a
     * moment, so our last response is not lost to a reset. */
    c->lingering = 1;
    conn_timer(c, 2000);
    conn_read_start(c);
}

/* The response is complete and every byte of it has been written. */
void mg__conn_req_done(mg_conn_t *c)
{
    mg_req_t *r = c->req;
    int keep = c->keepalive && !r->resp_close && !c->w->draining &&
               c->nrequests < c->w->conf->limits.max_keepalive_requests && !r->body_error;
    if (keep && !r->body_done) keep = r->sink != MG_SINK_PROXY && body_discard(c);
    c->req = NULL;
    mg__req_free(r);
    if (!keep) {
        conn_read_stop(c);
        c->shut.data = c;
        if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown) != 0) mg__conn_close(c);
        return;
    }
    /* Next request: move pipelined bytes to the front. */
    c->head_done = 0;
    c->hdr_state = HS_NONE;
    if (c->pos < c->len) {
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
        c->head_timer_on = 1;
        conn_timer(c, c->w->conf->limits.client_header_timeout_ms);
        conn_process(c);
        return;
    }
    c->pos = c->len = 0;
    c->head_timer_on = 0;
    if (c->buf) { /* idle connections hold no buffer */
        mg__buf_put(c->w, c->buf);
        c->buf = NULL;
    }
    conn_timer(c, c->w->conf->limits.keepalive_timeout_ms);
    conn_read_start(c);
}

/* Graceful stop: idle keep-alive connections go now, busy ones when their
 * response is done (draining turns keep-alive off). */
void mg__conn_drain_idle(mg_worker_t *w)
{
    mg_link_t *l = w->conns.next;
    while (l != &w->conns) {
        mg_conn_t *c = mg_container_of(l, mg_conn_t, link);
        l = l->next;
        if (!c->req && c->len == 0) mg__conn_close(c);
    }
}
