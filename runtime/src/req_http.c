/* req_http.c: mg.http.request, the HTTP client bound to a request.
 *
 * mg_http_request starts a call on the worker's client (http_client.c),
 * marks the request MG_WAIT_HTTP and returns MG_AGAIN; Lua yields. The
 * callbacks copy the response into the request's op (headers, then the
 * body, capped at max_body) and on_done resumes the coroutine, which reads
 * the op's mg_http_res_t view. A request that ends while the call is
 * pending (the client went away: req.c's abort path) cancels the call in
 * mg__req_http_release, so no callback ever sees a freed request.
 *
 * Ops and their buffers are pooled per worker: a warm worker allocates
 * nothing for a response that fits 64 KiB.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_client.h"
#include "mg.h"

#define DEFAULT_MAX_BODY (10u << 20)
#define BUF_KEEP 65536 /* a pooled op keeps a buffer up to this size */
#define FREE_OPS 256

typedef struct mg_http_op_s {
    mg_http_res_t res; /* what Lua reads */
    mg_req_t *r;
    mg_http_call_t *call; /* in flight, or NULL */
    uint64_t max_body;
    char *buf; /* header names and values, then the body */
    size_t len, cap;
    size_t body_off;
    uint32_t nhdrs;
    mg_header_t hdrs[MG_MAX_HEADERS]; /* offsets into buf until on_done */
    char err[256];
    struct mg_http_op_s *next_free;
} mg_http_op_t;

static mg_http_op_t *free_ops;
static unsigned nfree_ops;

static mg_http_client_t *worker_client(void)
{
    mg_worker_t *w = mg__worker;
    if (!w->http) w->http = mg__http_client_new(w->loop, NULL);
    return w->http;
}

static mg_http_op_t *op_get(void)
{
    mg_http_op_t *op = free_ops;
    if (op) {
        free_ops = op->next_free;
        nfree_ops--;
        return op;
    }
    return calloc(1, sizeof(*op));
}

static void op_put(mg_http_op_t *op)
{
    if (op->cap > BUF_KEEP || nfree_ops >= FREE_OPS) {
        free(op->buf);
        op->buf = NULL;
        op->cap = 0;
    }
    if (nfree_ops >= FREE_OPS) {
        free(op);
        return;
    }
    op->next_free = free_ops;
    free_ops = op;
    nfree_ops++;
}

static int op_reserve(mg_http_op_t *op, size_t more)
{
    /* the body part is bounded by max_body before this is asked */
    return mg__grow(&op->buf, &op->cap, op->len, more, 4096, SIZE_MAX) == 0 ? 0 : -1;
}

static void op_append(mg_http_op_t *op, const char *p, size_t n)
{
    memcpy(op->buf + op->len, p, n);
    op->len += n;
}

static void set_error(mg_http_op_t *op, const char *msg)
{
    snprintf(op->err, sizeof(op->err), "%s", msg);
    op->res.status = 0;
    op->res.nheaders = 0;
    op->res.headers = NULL;
    op->res.body = NULL;
    op->res.body_len = 0;
    op->res.error = op->err;
    op->res.error_len = strlen(op->err);
}

/* ---- client callbacks -------------------------------------------------------- */

static int on_head(void *ud, int status, const mg_header_t *h, uint32_t nh, int64_t clen)
{
    mg_http_op_t *op = ud;
    if (clen >= 0 && (uint64_t)clen > op->max_body) return MG_HTTP_ETOOLARGE;
    size_t need = 0;
    for (uint32_t i = 0; i < nh; i++)
        need += h[i].name_len + h[i].value_len;
    if (clen > 0) need += (size_t)clen; /* the body in the same allocation */
    if (op_reserve(op, need)) return MG_HTTP_ENOMEM;
    op->res.status = status;
    for (uint32_t i = 0; i < nh; i++) {
        /* offsets now, pointers in on_done: the buffer may still move */
        op->hdrs[i].name = (const char *)(uintptr_t)op->len;
        op->hdrs[i].name_len = h[i].name_len;
        op_append(op, h[i].name, h[i].name_len);
        op->hdrs[i].value = (const char *)(uintptr_t)op->len;
        op->hdrs[i].value_len = h[i].value_len;
        op_append(op, h[i].value, h[i].value_len);
    }
    op->nhdrs = nh;
    op->body_off = op->len;
    return 0;
}

static int on_body(void *ud, const char *p, size_t n)
{
    mg_http_op_t *op = ud;
    if ((op->len - op->body_off) + n > op->max_body) return MG_HTTP_ETOOLARGE;
    if (op_reserve(op, n)) return MG_HTTP_ENOMEM;
    op_append(op, p, n);
    return 0;
}

static void on_done(void *ud, int err, const char *msg)
{
    mg_http_op_t *op = ud;
    mg_req_t *r = op->r;
    op->call = NULL;
    if (err) {
        set_error(op, msg);
    } else {
        for (uint32_t i = 0; i < op->nhdrs; i++) {
            op->hdrs[i].name = op->buf + (uintptr_t)op->hdrs[i].name;
            op->hdrs[i].value = op->buf + (uintptr_t)op->hdrs[i].value;
        }
        op->res.nheaders = op->nhdrs;
        op->res.headers = op->hdrs;
        op->res.body = op->buf ? op->buf + op->body_off : "";
        op->res.body_len = op->len - op->body_off;
        op->res.error = NULL;
        op->res.error_len = 0;
    }
    if (r->wait == MG_WAIT_HTTP) {
        r->wait = MG_WAIT_NONE;
        mg__lua_resume(r);
    }
}

/* ---- FFI ------------------------------------------------------------------------- */

int mg_http_request(mg_req_t *r, const mg_http_opts_t *o)
{
    mg_http_op_t *op = r->http;
    if (!op) {
        op = op_get();
        if (!op) return MG_ERROR;
        r->http = op;
        op->r = r;
    }
    if (r->wait != MG_WAIT_NONE || op->call) {
        set_error(op, "another wait is pending in this request");
        return MG_EINVAL;
    }
    op->len = op->body_off = 0;
    op->nhdrs = 0;
    op->res.status = 0;
    op->max_body = o->max_body ? o->max_body : DEFAULT_MAX_BODY;
    mg_http_client_t *cl = worker_client();
    if (!cl) {
        set_error(op, "out of memory");
        return MG_ERROR;
    }
    mg_http_spec_t s;
    memset(&s, 0, sizeof(s));
    s.method = o->method;
    s.method_len = o->method_len;
    s.url = o->url;
    s.url_len = o->url_len;
    s.headers = o->headers;
    s.nheaders = o->nheaders;
    s.body = o->body;
    s.body_len = o->body_len;
    s.timeout_ms = o->timeout_ms;
    if (o->tls) {
        /* the context is built on the first call with these settings and
         * cached in the worker's client (a lookup: a few string compares) */
        int trc = mg__http_tls_ctx(cl, o->tls, &s.tls, op->err, sizeof(op->err));
        if (trc < 0) {
            char msg[sizeof(op->err)];
            memcpy(msg, op->err, sizeof(msg));
            set_error(op, msg);
            return MG_ERROR;
        }
        s.server_name = o->tls->server_name;
        s.server_name_len = o->tls->server_name_len;
    }
    static const mg_http_cbs_t cbs = {on_head, on_body, on_done};
    int rc = mg__http_start(cl, &s, &cbs, op, &op->call);
    if (rc == 0) {
        r->wait = MG_WAIT_HTTP;
        return MG_AGAIN;
    }
    int ul = o->url_len > 200 ? 200 : (int)o->url_len;
    switch (rc) {
    case MG_HTTP_EARG:
        set_error(op, "invalid method, header or tls.server_name (a token name, no CR/LF/NUL in "
                      "values; Content-Length, Transfer-Encoding and hop-by-hop headers are set "
                      "by the client; a server name is a DNS name or an IP address)");
        return MG_EINVAL;
    case MG_HTTP_EURL: snprintf(op->err, sizeof(op->err), "invalid url %.*s", ul, o->url); break;
    case MG_HTTP_ESCHEME:
        snprintf(op->err, sizeof(op->err), "invalid url %.*s (http:// or https:// only)", ul,
                 o->url);
        break;
    default: snprintf(op->err, sizeof(op->err), "%s", mg__http_strerror(rc)); break;
    }
    char msg[sizeof(op->err)];
    memcpy(msg, op->err, sizeof(msg));
    set_error(op, msg);
    return MG_ERROR;
}

const mg_http_res_t *mg_http_result(mg_req_t *r)
{
    return r->http ? &r->http->res : NULL;
}

void mg__req_http_release(mg_req_t *r)
{
    mg_http_op_t *op = r->http;
    if (!op) return;
    r->http = NULL;
    if (op->call) {
        mg_log_debug("request %s: pending mg.http.request cancelled", r->v.request_id);
        mg__http_cancel(op->call); /* no callback will see this request again */
        op->call = NULL;
    }
    if (r->wait == MG_WAIT_HTTP) r->wait = MG_WAIT_NONE;
    op->r = NULL;
    op_put(op);
}
