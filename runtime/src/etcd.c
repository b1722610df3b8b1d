/* etcd.c: the control process's etcd driver (etcd.h has the state machine
 * and the sink contract). One HTTP client with one pooled connection: the
 * range's connection is reused by the watch, so a node holds one TCP
 * connection to etcd while it watches (with TLS: one session, whose
 * handshake is paid once per connection, not per call).
 *
 * Costs: a range body is kept whole until the sink took it (bounded by
 * MAX_BODY: ~3 MB at 10,000 routes); watch pieces are handed on as they
 * come, nothing is buffered here.
 */
#include "etcd.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http_client.h"
#include "mg.h"

#define MAX_BODY (256u << 20) /* a range (or error) body larger than this is refused */
#define MAX_ERROR_BODY 4096   /* kept of a non-200 answer, for the message */
#define TOKEN_MAX 4096        /* a JWT token with its claims fits */

enum { ST_IDLE, ST_AUTH, ST_RANGE, ST_WATCH, ST_BACKOFF, ST_STOPPED };

struct mg_etcd_s {
    uv_loop_t *loop;
    mg_http_client_t *cl;
    mg_etcd_sink_t sink;
    char **endpoints;
    int nendpoints;
    int ep;    /* the endpoint in use */
    int tried; /* endpoints tried (and failed) in this round */
    int round; /* rounds failed in a row: the backoff's exponent */
    char *key_b64, *end_b64, *auth_body;
    SSL_CTX *tls;      /* for https:// endpoints: owned by cl (its context cache) */
    char *server_name; /* NULL: each endpoint's host */
    uint32_t timeout_ms, backoff_min_ms, backoff_max_ms;

    int state;
    mg_http_call_t *call;
    int status; /* HTTP status of the call in flight (0: no head yet) */
    char *buf;  /* body of an auth/range call, or of an error answer */
    size_t len, cap;
    int need_range; /* the next connection starts with a range */
    int64_t watch_from;
    char token[TOKEN_MAX];
    size_t token_len;
    int up;        /* the last call succeeded / a watch is open */
    int started;   /* a range succeeded once */
    int lost_told; /* the sink heard LOST for the current loss */
    char last_error[256];

    uv_timer_t timer;       /* backoff, and "on the next loop turn" */
    uv_timer_t start_timer; /* the start deadline */
    int closing;            /* handles still to close before free */
    uint64_t rng;
    mg_etcd_stats_t stats;
};

static void next_call(mg_etcd_t *e);

/* xorshift64*: the jitter needs no quality, only spread between nodes */
static uint32_t rnd(mg_etcd_t *e)
{
    e->rng ^= e->rng >> 12;
    e->rng ^= e->rng << 25;
    e->rng ^= e->rng >> 27;
    return (uint32_t)((e->rng * 2685821657736338717ull) >> 32);
}

static char *dup_str(const char *s)
{
    return s ? strdup(s) : NULL;
}

static int buf_add(mg_etcd_t *e, const char *p, size_t n, size_t limit)
{
    if (mg__grow(&e->buf, &e->cap, e->len, n, 16384, limit) != 0) return -1;
    memcpy(e->buf + e->len, p, n);
    e->len += n;
    return 0;
}

static void buf_reset(mg_etcd_t *e)
{
    /* a big range body's memory is given back; small buffers are kept */
    if (e->cap > (1u << 20)) {
        free(e->buf);
        e->buf = NULL;
        e->cap = 0;
    }
    e->len = 0;
}

static int64_t tell(mg_etcd_t *e, int ev, const char *data, size_t len)
{
    size_t tok_len = 0;
    int64_t rc = e->sink.event(e->sink.ud, ev, data, len, e->token, sizeof(e->token), &tok_len);
    if (ev == MG_ETCD_EV_AUTH)
        e->token_len = rc == MG_ETCD_OK && tok_len <= sizeof(e->token) ? tok_len : 0;
    return rc;
}

static void on_timer(uv_timer_t *t)
{
    mg_etcd_t *e = t->data;
    if (e->state == ST_BACKOFF || e->state == ST_IDLE) next_call(e);
}

/* A call failed (or the watch ended): next endpoint now, or after the
 * backoff once every endpoint failed in this round. */
static void fail(mg_etcd_t *e, const char *what, const char *msg)
{
    uint32_t delay = 0;

    e->call = NULL;
    e->stats.failures++;
    e->up = 0;
    e->token_len = 0;
    buf_reset(e);
    snprintf(e->last_error, sizeof(e->last_error), "%s %s: %s", e->endpoints[e->ep], what, msg);
    if (!e->lost_told && e->started) {
        e->lost_told = 1;
        tell(e, MG_ETCD_EV_LOST, e->last_error, strlen(e->last_error));
    }
    if (e->state == ST_STOPPED) return;
    e->ep = (e->ep + 1) % e->nendpoints;
    if (++e->tried >= e->nendpoints) {
        uint64_t cap = (uint64_t)e->backoff_min_ms << (e->round < 16 ? e->round : 16);
        if (cap > e->backoff_max_ms) cap = e->backoff_max_ms;
        delay = 1 + rnd(e) % (uint32_t)cap;
        e->round++;
        e->tried = 0;
    }
    e->state = ST_BACKOFF;
    uv_timer_start(&e->timer, on_timer, delay, 0);
}

/* A call answered: the endpoint works; the next failure starts a new round. */
static void success(mg_etcd_t *e)
{
    e->tried = 0;
    e->round = 0;
    if (!e->up && e->lost_told) {
        tell(e, MG_ETCD_EV_BACK, e->endpoints[e->ep], strlen(e->endpoints[e->ep]));
    }
    e->lost_told = 0;
    e->up = 1;
}

static int on_head(void *ud, int status, const mg_header_t *h, uint32_t nh, int64_t clen)
{
    mg_etcd_t *e = ud;
    (void)h;
    (void)nh;
    (void)clen;
    e->status = status;
    e->len = 0;
    if (status == 200 && e->state == ST_WATCH) {
        e->stats.watches++;
        success(e);
    }
    return 0;
}

static int on_body(void *ud, const char *p, size_t n)
{
    mg_etcd_t *e = ud;
    if (e->status != 200) {
        (void)buf_add(e, p, n, MAX_ERROR_BODY); /* the message is cut, the call goes on */
        return 0;
    }
    if (e->state != ST_WATCH) return buf_add(e, p, n, MAX_BODY) == 0 ? 0 : MG_HTTP_ETOOLARGE;
    int64_t rc = tell(e, MG_ETCD_EV_WATCH, p, n);
    if (e->state != ST_WATCH) return 0; /* a rerange asked meanwhile cancelled the call */
    if (rc > 0) {
        e->watch_from = rc + 1;
    } else if (rc == MG_ETCD_RERANGE) {
        e->need_range = 1;
        return MG_ETCD_RERANGE;
    } else if (rc < 0) {
        return MG_HTTP_EBADRESP;
    }
    return 0;
}

static void error_message(mg_etcd_t *e, char *out, size_t cap)
{
    size_t n = e->len < 200 ? e->len : 200;
    snprintf(out, cap, "HTTP %d %.*s", e->status, (int)n, e->buf ? e->buf : "");
    for (char *c = out; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
}

static void on_done(void *ud, int err, const char *msg)
{
    mg_etcd_t *e = ud;
    int state = e->state;
    const char *what = state == ST_AUTH ? "auth" : state == ST_RANGE ? "range" : "watch";

    e->call = NULL;
    if (err == MG_ETCD_RERANGE) {
        /* compacted: not a failure of the endpoint; read everything now */
        buf_reset(e);
        e->state = ST_IDLE;
        uv_timer_start(&e->timer, on_timer, 0, 0);
        return;
    }
    if (err != 0) {
        fail(e, what, msg);
        return;
    }
    if (e->status != 200) {
        char why[300];
        error_message(e, why, sizeof(why));
        fail(e, what, why);
        return;
    }
    if (state == ST_WATCH) {
        fail(e, what, "the stream ended");
        return;
    }
    int64_t rc = tell(e, state == ST_AUTH ? MG_ETCD_EV_AUTH : MG_ETCD_EV_RANGE,
                      e->buf ? e->buf : "", e->len);
    buf_reset(e);
    if (e->state != state) return; /* stopped, or a rerange asked meanwhile */
    if (state == ST_AUTH) {
        if (rc != MG_ETCD_OK || e->token_len == 0) {
            fail(e, what, "no token in the answer");
            return;
        }
    } else {
        if (rc <= 0) {
            fail(e, what, "a body the sink refused");
            return;
        }
        e->need_range = 0;
        e->watch_from = rc + 1;
        e->stats.ranges++;
        e->started = 1;
        uv_timer_stop(&e->start_timer);
        success(e);
    }
    e->state = ST_IDLE;
    next_call(e);
}

static const mg_http_cbs_t cbs = {on_head, on_body, on_done};

static void start_call(mg_etcd_t *e, int state, const char *path, const char *body, size_t len,
                       uint32_t idle_ms)
{
    char url[1024];
    mg_header_t hdr[2];
    uint32_t nh = 0;
    mg_http_spec_t s;
    int rc;

    snprintf(url, sizeof(url), "%s%s", e->endpoints[e->ep], path);
    hdr[nh++] = (mg_header_t){"Content-Type", "application/json", 12, 16};
    if (e->token_len > 0 && state != ST_AUTH)
        hdr[nh++] = (mg_header_t){"Authorization", e->token, 13, (uint32_t)e->token_len};
    memset(&s, 0, sizeof(s));
    s.method = "POST";
    s.method_len = 4;
    s.url = url;
    s.url_len = strlen(url);
    s.headers = hdr;
    s.nheaders = nh;
    s.body = body;
    s.body_len = len;
    s.connect_ms = e->timeout_ms;
    s.idle_ms = idle_ms;
    s.retry = 1; /* auth, range and watch create are all safe to send twice */
    s.tls = e->tls;
    s.server_name = e->server_name;
    s.server_name_len = e->server_name ? strlen(e->server_name) : 0;
    e->state = state;
    e->status = 0;
    e->len = 0;
    rc = mg__http_start(e->cl, &s, &cbs, e, &e->call);
    if (rc != 0)
        fail(e,
             state == ST_AUTH    ? "auth"
             : state == ST_RANGE ? "range"
                                 : "watch",
             mg__http_strerror(rc));
}

static void next_call(mg_etcd_t *e)
{
    char body[1024];
    int n;

    if (e->auth_body && e->token_len == 0) {
        start_call(e, ST_AUTH, "/v3/auth/authenticate", e->auth_body, strlen(e->auth_body),
                   e->timeout_ms);
    } else if (e->need_range) {
        n = snprintf(body, sizeof(body), "{\"key\":\"%s\",\"range_end\":\"%s\"}", e->key_b64,
                     e->end_b64);
        start_call(e, ST_RANGE, "/v3/kv/range", body, (size_t)n, e->timeout_ms);
    } else {
        /* no idle limit: a quiet stream is the normal case */
        n = snprintf(body, sizeof(body),
                     "{\"create_request\":{\"key\":\"%s\",\"range_end\":\"%s\","
                     "\"start_revision\":\"%" PRId64 "\"}}",
                     e->key_b64, e->end_b64, e->watch_from);
        start_call(e, ST_WATCH, "/v3/watch", body, (size_t)n, 0);
    }
}

static void on_start_timeout(uv_timer_t *t)
{
    mg_etcd_t *e = t->data;
    if (!e->started)
        tell(e, MG_ETCD_EV_START_TIMEOUT, e->last_error[0] ? e->last_error : "no answer yet",
             strlen(e->last_error[0] ? e->last_error : "no answer yet"));
}

/* What the driver owns (not its HTTP client nor its handles): freed
 * after a failed start and once the last handle closed. */
static void etcd_free(mg_etcd_t *e)
{
    for (int i = 0; i < e->nendpoints; i++)
        free(e->endpoints[i]);
    free(e->endpoints);
    free(e->key_b64);
    free(e->end_b64);
    free(e->auth_body);
    free(e->server_name);
    free(e->buf);
    free(e);
}

mg_etcd_t *mg__etcd_start(uv_loop_t *loop, const mg_etcd_opts_t *o, const mg_etcd_sink_t *sink)
{
    mg_http_client_opts_t copts = {.max_idle_per_host = 1};
    mg_etcd_t *e;
    char scratch[8];
    char *err = o->err ? o->err : scratch;
    size_t errlen = o->err ? o->errlen : sizeof(scratch);
    int https = 0;

    if (errlen) err[0] = 0;
    if (o->nendpoints < 1 || !o->key_b64 || !o->end_b64) {
        snprintf(err, errlen, "no endpoint, or no key");
        return NULL;
    }
    /* the key and range end are base64 of the prefix: bounded by the body buffer */
    if (strlen(o->key_b64) + strlen(o->end_b64) > 800) {
        snprintf(err, errlen, "the prefix is too long");
        return NULL;
    }
    for (int i = 0; i < o->nendpoints; i++) {
        int h = strncmp(o->endpoints[i], "https://", 8) == 0;
        if ((!h && strncmp(o->endpoints[i], "http://", 7) != 0) || strlen(o->endpoints[i]) > 900) {
            snprintf(err, errlen, "endpoint %.100s: not an http:// or https:// URL",
                     o->endpoints[i]);
            return NULL;
        }
        https |= h;
    }
    e = calloc(1, sizeof(*e));
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->loop = loop;
    e->sink = *sink;
    e->endpoints = calloc((size_t)o->nendpoints, sizeof(char *));
    e->cl = mg__http_client_new(loop, &copts);
    e->key_b64 = dup_str(o->key_b64);
    e->end_b64 = dup_str(o->end_b64);
    e->auth_body = dup_str(o->auth_body);
    if (!e->endpoints || !e->cl || !e->key_b64 || !e->end_b64 || (o->auth_body && !e->auth_body)) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* one context for every https:// endpoint, built now: a CA file that
     * does not load stops the start with its reason, not each call later */
    if (https) {
        if (mg__http_tls_ctx(e->cl, o->tls, &e->tls, err, errlen) < 0) goto fail;
        if (o->tls && o->tls->server_name_len) {
            e->server_name = strndup(o->tls->server_name, o->tls->server_name_len);
            if (!e->server_name) {
                snprintf(err, errlen, "out of memory");
                goto fail;
            }
        }
    }
    for (int i = 0; i < o->nendpoints; i++) {
        /* a trailing "/" would double in "<endpoint>/v3/..." */
        size_t n = strlen(o->endpoints[i]);
        while (n > 7 && o->endpoints[i][n - 1] == '/')
            n--;
        e->endpoints[i] = strndup(o->endpoints[i], n);
        if (!e->endpoints[i]) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        e->nendpoints++;
    }
    e->timeout_ms = o->timeout_ms ? o->timeout_ms : 5000;
    e->backoff_min_ms = o->backoff_min_ms ? o->backoff_min_ms : 100;
    e->backoff_max_ms = o->backoff_max_ms ? o->backoff_max_ms : 5000;
    e->need_range = 1;
    e->rng = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15ull;
    uv_timer_init(loop, &e->timer);
    uv_timer_init(loop, &e->start_timer);
    e->timer.data = e;
    e->start_timer.data = e;
    e->state = ST_IDLE;
    uv_timer_start(&e->start_timer, on_start_timeout, e->timeout_ms, 0);
    next_call(e);
    return e;

fail:
    if (e->cl) mg__http_client_free(e->cl);
    etcd_free(e);
    return NULL;
}

void mg__etcd_rerange(mg_etcd_t *e)
{
    if (e->state == ST_STOPPED) return;
    if (e->call) {
        mg__http_cancel(e->call);
        e->call = NULL;
    }
    buf_reset(e);
    e->need_range = 1;
    e->state = ST_IDLE;
    uv_timer_start(&e->timer, on_timer, 0, 0);
}

static void on_closed(uv_handle_t *h)
{
    mg_etcd_t *e = h->data;
    if (--e->closing > 0) return;
    etcd_free(e);
}

void mg__etcd_stop(mg_etcd_t *e)
{
    if (e->state == ST_STOPPED) return;
    e->state = ST_STOPPED;
    mg__http_client_free(e->cl); /* cancels the call in flight: no callback */
    e->cl = NULL;
    e->call = NULL;
    e->closing = 2;
    uv_close((uv_handle_t *)&e->timer, on_closed);
    uv_close((uv_handle_t *)&e->start_timer, on_closed);
}

void mg__etcd_stats(const mg_etcd_t *e, mg_etcd_stats_t *st)
{
    mg_http_client_stats_t cs;
    *st = e->stats;
    st->endpoint = e->ep;
    st->up = e->up;
    if (e->cl) {
        mg__http_client_stats(e->cl, &cs);
        st->connects = cs.connects;
    }
}
