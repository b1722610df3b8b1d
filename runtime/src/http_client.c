/* http_client.c: the asynchronous HTTP/1.1 client (see http_client.h).
 *
 * Objects: a client owns its hosts (host:port, each with a list of idle
 * keep-alive connections), its connections and its calls. A call borrows
 * one connection for one exchange; when the response ends with reusable
 * framing the connection goes back to its host's idle list, otherwise it
 * is closed. Calls are pooled (their timer handle stays initialised), so a
 * call costs no allocation once the pool is warm; each new connection
 * allocates itself and a 64 KiB read buffer (kept while pooled).
 *
 * Reentrancy: user callbacks run inside llhttp's callbacks. They may cancel
 * the call (call->busy defers the teardown until llhttp returns) or, from
 * on_done, start new calls (the connection was released before on_done).
 *
 * TLS (https://): a connection carries an mg_tls_t (tls_client.h) between
 * the socket and the parser. After the TCP connect the handshake runs
 * under the same connect timer; ciphertext is read into a second buffer
 * behind the plaintext one, fed to OpenSSL, and the plaintext goes through
 * the same parse path as http://. Output (handshake records, the request)
 * is flushed from the write BIO through one uv_write at a time into a
 * per-connection buffer, kept while the connection lives.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http_client.h"
#include "mg.h"

#define CONN_BUF 65536  /* a response head must fit; body bytes stream through */
#define OUT_KEEP 65536  /* a pooled call keeps an output buffer up to this size */
#define FREE_CALLS 64   /* calls kept for reuse */
#define HOST_MAX 255    /* DNS name length limit */
#define CONNECT_MS 5000 /* default connect timeout */
#define TLS_IN 17408    /* one TLS record (16 KiB + overhead) per read */
#define MAX_TLS_CTX 32  /* TLS configurations per client */
#define TLS_SESSIONS 16 /* resumable TLS sessions kept per client (~9 KiB of slots) */

#ifndef MG_VERSION
#define MG_VERSION "dev"
#endif

typedef struct hhost_s {
    mg_link_t link; /* in cl->hosts */
    mg_link_t idle; /* idle connections, most recent first */
    uint32_t nidle;
    uint32_t refs; /* connections pointing here; freed at 0 */
    int port;
    SSL_CTX *tls; /* NULL: http:// */
    size_t name_len;
    char name[HOST_MAX + 1];
    size_t sni_len;
    char sni[HOST_MAX + 1]; /* https://: the server name (SNI, verified) */
} hhost_t;

typedef struct hconn_s {
    uv_tcp_t tcp;
    uv_timer_t timer; /* connect, then read-idle, then pool idle */
    uv_connect_t creq;
    uv_write_t wreq;
    llhttp_t parser;
    mg_http_client_t *cl;
    hhost_t *host;
    mg_http_call_t *call;
    mg_link_t link; /* in host->idle while idle */
    char *buf;
    uint32_t len;
    mg_header_t hdrs[MG_MAX_HEADERS];
    uint32_t nhdrs;
    int hdr_state;
    int stop; /* the code a parser callback stopped with */
    const char *stop_msg;
    int reused;    /* served an exchange before this one */
    int got_bytes; /* some response byte arrived in this exchange */
    int head_done;
    int msg_done;
    int interim; /* parsing a 1xx */
    int keepalive;
    int idle; /* on host->idle */
    int closing;
    int handles_open;
    uint32_t nrequests;
    int is_tls;
    int writing; /* TLS: a uv_write of wbuf in flight */
    mg_tls_t tls;
    char *wbuf; /* TLS: ciphertext being written */
    size_t wcap;
} hconn_t;

struct mg_http_call_s {
    mg_http_client_t *cl;
    hconn_t *conn;
    mg_http_cbs_t cb;
    void *ud;
    mg_link_t link; /* cl->active, or cl->free_calls */
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    struct sockaddr_storage addr;
    int have_addr;
    char host[HOST_MAX + 1];
    size_t host_len;
    int port;
    int https;
    SSL_CTX *tls;
    char sni[HOST_MAX + 1];
    size_t sni_len;
    char *out; /* the request bytes: head then body */
    size_t out_len, out_cap;
    uint32_t connect_ms, idle_ms;
    int is_head;
    int retry_ok;
    int tries;
    int busy; /* inside llhttp or on_done: teardown waits */
    int gai_pending;
    int cancelled;
    int done;
    int orphan; /* the client is gone: release frees, touching nothing else */
    char msg[320];
};

/* A session to resume on the next connection to the same host, port and
 * TLS settings (the key of a host, which outlives the host itself: the
 * etcd driver's reconnection or an HTTP/1.0 server that closes each time
 * then costs an abbreviated handshake). A resumed session was verified
 * under the same context and name when it was made. */
typedef struct tls_sess_s {
    SSL_SESSION *sess; /* NULL: a free slot */
    SSL_CTX *ctx;
    int port;
    uint64_t used;
    size_t name_len, sni_len;
    char name[HOST_MAX + 1];
    char sni[HOST_MAX + 1];
} tls_sess_t;

/* A TLS configuration and its context (the strings are the lookup key). */
typedef struct tls_entry_s {
    char *ca, *cert, *key;
    size_t ca_len, cert_len, key_len;
    int verify;
    SSL_CTX *ctx;
} tls_entry_t;

struct mg_http_client_s {
    uv_loop_t *loop;
    mg_http_client_opts_t o;
    mg_link_t hosts;
    mg_link_t active;
    mg_link_t free_calls;
    uint32_t nfree_calls;
    uint64_t connects, reused;
    uint32_t nidle, nactive;
    llhttp_settings_t settings;
    SSL_CTX *tls_default; /* system store, verify on: made on the first https:// call */
    tls_entry_t tls[MAX_TLS_CTX];
    int ntls;
    tls_sess_t sess[TLS_SESSIONS];
    uint64_t sess_clock;
    uint64_t handshakes, resumed;
};

static void conn_close(hconn_t *c);
static void conn_send(hconn_t *c, mg_http_call_t *call);
static int attach(mg_http_call_t *call);
static void call_finish(mg_http_call_t *call, int err, const char *msg);

const char *mg__http_strerror(int err)
{
    switch (err) {
    case 0: return "ok";
    case MG_HTTP_EURL: return "invalid url";
    case MG_HTTP_ESCHEME: return "unsupported scheme";
    case MG_HTTP_EARG: return "invalid method or header";
    case MG_HTTP_ETIMEDOUT: return "timeout";
    case MG_HTTP_ECONNREFUSED: return "connection refused";
    case MG_HTTP_ECONNECT: return "connect failed";
    case MG_HTTP_EDNS: return "name resolution failed";
    case MG_HTTP_EBADRESP: return "bad response";
    case MG_HTTP_ECLOSED: return "connection closed";
    case MG_HTTP_EIO: return "read or write failed";
    case MG_HTTP_ENOMEM: return "out of memory";
    case MG_HTTP_ETOOLARGE: return "response too large";
    case MG_HTTP_ECLIENT: return "client closed";
    case MG_HTTP_ETLS: return "TLS failed";
    default: return "aborted";
    }
}

/* ---- hosts ------------------------------------------------------------------ */

/* O(hosts): a client talks to a handful (etcd endpoints, a few APIs). The
 * key is what the connection was made with: host, port, and for https://
 * the TLS context and server name. */
static hhost_t *host_find(mg_http_client_t *cl, const mg_http_call_t *call, int create)
{
    const char *name = call->host;
    size_t nl = call->host_len;
    for (mg_link_t *l = cl->hosts.next; l != &cl->hosts; l = l->next) {
        hhost_t *h = mg_container_of(l, hhost_t, link);
        if (h->port == call->port && h->name_len == nl && memcmp(h->name, name, nl) == 0 &&
            h->tls == call->tls &&
            (!h->tls ||
             (h->sni_len == call->sni_len && memcmp(h->sni, call->sni, h->sni_len) == 0)))
            return h;
    }
    if (!create) return NULL;
    hhost_t *h = calloc(1, sizeof(*h));
    if (!h) return NULL;
    memcpy(h->name, name, nl);
    h->name_len = nl;
    h->port = call->port;
    h->tls = call->tls;
    memcpy(h->sni, call->sni, call->sni_len);
    h->sni_len = call->sni_len;
    mg_list_init(&h->idle);
    mg_list_insert_head(&cl->hosts, &h->link);
    return h;
}

static void host_put(hhost_t *h)
{
    if (--h->refs > 0) return;
    assert(h->nidle == 0); /* idle connections hold references */
    mg_list_remove(&h->link);
    free(h);
}

/* ---- calls ---------------------------------------------------------------------- */

static void on_call_timer_closed(uv_handle_t *t)
{
    mg_http_call_t *call = t->data;
    free(call->out);
    free(call);
}

/* Returns a finished or cancelled call to the pool once nothing refers to
 * it any more (no llhttp frame above us, no getaddrinfo in flight). */
static void call_maybe_release(mg_http_call_t *call)
{
    if (call->busy || call->gai_pending || !(call->done || call->cancelled)) return;
    assert(!call->conn);
    if (call->orphan) {
        uv_close((uv_handle_t *)&call->timer, on_call_timer_closed);
        return;
    }
    mg_http_client_t *cl = call->cl;
    uv_timer_stop(&call->timer);
    mg_list_remove(&call->link);
    cl->nactive--;
    if (call->out_cap > OUT_KEEP) {
        free(call->out);
        call->out = NULL;
        call->out_cap = 0;
    }
    if (cl->nfree_calls >= FREE_CALLS) {
        uv_close((uv_handle_t *)&call->timer, on_call_timer_closed);
        return;
    }
    mg_list_insert_head(&cl->free_calls, &call->link);
    cl->nfree_calls++;
}

static mg_http_call_t *call_get(mg_http_client_t *cl)
{
    mg_http_call_t *call;
    if (!mg_list_empty(&cl->free_calls)) {
        mg_link_t *l = cl->free_calls.next;
        mg_list_remove(l);
        cl->nfree_calls--;
        call = mg_container_of(l, mg_http_call_t, link);
        char *out = call->out;
        size_t cap = call->out_cap;
        memset(call, 0, offsetof(mg_http_call_t, timer));
        memset(&call->gai, 0, sizeof(*call) - offsetof(mg_http_call_t, gai));
        call->out = out;
        call->out_cap = cap;
    } else {
        call = calloc(1, sizeof(*call));
        if (!call) return NULL;
        uv_timer_init(cl->loop, &call->timer);
        call->timer.data = call;
    }
    call->cl = cl;
    mg_list_init(&call->link);
    return call;
}

/* Unties a call and its connection. */
static hconn_t *detach(mg_http_call_t *call)
{
    hconn_t *c = call->conn;
    if (!c) return NULL;
    call->conn = NULL;
    c->call = NULL;
    uv_timer_stop(&c->timer);
    return c;
}

/* Ends a call: on_done once (unless cancelled), then back to the pool. A
 * connection still attached is closed: its exchange did not complete. */
static void call_finish(mg_http_call_t *call, int err, const char *msg)
{
    if (call->done || call->cancelled) return;
    call->done = 1;
    uv_timer_stop(&call->timer);
    hconn_t *c = detach(call);
    if (c) conn_close(c);
    if (!msg) msg = mg__http_strerror(err);
    call->busy++;
    call->cb.on_done(call->ud, err, msg);
    call->busy--;
    call_maybe_release(call);
}

void mg__http_cancel(mg_http_call_t *call)
{
    if (!call || call->done || call->cancelled) return;
    call->cancelled = 1;
    uv_timer_stop(&call->timer);
    if (call->gai_pending) uv_cancel((uv_req_t *)&call->gai);
    if (call->busy) return; /* the parse step that called us tears down */
    hconn_t *c = detach(call);
    if (c) conn_close(c);
    call_maybe_release(call);
}

static void on_call_timeout(uv_timer_t *t)
{
    call_finish(t->data, MG_HTTP_ETIMEDOUT, "timeout");
}

/* ---- connections ---------------------------------------------------------------- */

static void on_conn_closed(uv_handle_t *h)
{
    hconn_t *c = h->data;
    if (--c->handles_open > 0) return;
    if (c->tls.ssl) mg__tls_free(&c->tls);
    free(c->wbuf);
    free(c->buf);
    free(c);
}

/* Closes a connection (idle or not): its exchange, if any, is over. */
static void conn_close(hconn_t *c)
{
    if (c->closing) return;
    c->closing = 1;
    if (c->call) detach(c->call);
    if (c->idle) {
        mg_list_remove(&c->link);
        c->host->nidle--;
        c->cl->nidle--;
        c->idle = 0;
    }
    host_put(c->host);
    c->host = NULL;
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

/* A TLS connection that ends cleanly (its last response complete, idle
 * too long, or the server's close_notify) keeps its session resumable:
 * OpenSSL marks a session bad when its connection is freed without a
 * shutdown, and we close the socket rather than wait for one. */
static void conn_close_clean(hconn_t *c)
{
    if (c->is_tls && c->tls.up && !c->closing)
        SSL_set_shutdown(c->tls.ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    conn_close(c);
}

static void on_conn_timer(uv_timer_t *t)
{
    hconn_t *c = t->data;
    if (c->call) {
        /* a TLS connection's connect timer covers its handshake too */
        int hs = c->is_tls && !c->tls.up && c->tls.ssl;
        call_finish(c->call, MG_HTTP_ETIMEDOUT,
                    hs ? "TLS handshake timeout (the server accepted the connection but did not "
                         "complete a handshake: is it speaking TLS?)"
                       : "timeout");
        return;
    }
    conn_close_clean(c); /* idle in the pool for too long */
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)hint;
    hconn_t *c = h->data;
    if (c->is_tls) { /* ciphertext: behind the plaintext buffer */
        b->base = c->buf + CONN_BUF;
        b->len = TLS_IN;
        return;
    }
    b->base = c->buf + c->len;
    b->len = CONN_BUF - c->len;
}

/* A failure before the exchange completed. A reused connection that died
 * before any response byte was most likely closed by the server while idle
 * (a race the idle watcher cannot close): the call goes once more on a new
 * connection when it may be sent twice. */
static void exchange_failed(hconn_t *c, int err, const char *msg)
{
    mg_http_call_t *call = c->call;
    if (c->reused && !c->got_bytes && call->retry_ok && call->tries < 2) {
        detach(call);
        conn_close(c);
        int rc = attach(call);
        if (rc < 0) call_finish(call, rc, NULL);
        return;
    }
    call_finish(call, err, msg);
}

/* The response is complete: the connection goes back to the pool when its
 * framing allows, then on_done runs (and may start a call that reuses it). */
static void exchange_done(hconn_t *c, int extra_bytes)
{
    mg_http_call_t *call = c->call;
    mg_http_client_t *cl = c->cl;
    detach(call);
    hhost_t *h = c->host;
    if (c->is_tls && mg__tls_has_input(&c->tls)) extra_bytes = 1;
    if (c->keepalive && !extra_bytes && c->nrequests < cl->o.max_requests &&
        h->nidle < cl->o.max_idle_per_host) {
        c->len = 0;
        c->idle = 1;
        mg_list_insert_head(&h->idle, &c->link);
        h->nidle++;
        cl->nidle++;
        uv_timer_start(&c->timer, on_conn_timer, cl->o.idle_ms, 0);
        /* still reading: a close (or stray bytes) while idle closes it */
    } else if (!extra_bytes) {
        conn_close_clean(c);
    } else {
        conn_close(c);
    }
    call_finish(call, 0, NULL);
}

/* After the parser ran a callback into Lua: a call cancelled meanwhile
 * (its caller gone) gives its connection up, unfit for reuse mid-message.
 * Returns 1 then (the caller stops), else 0. */
static int call_cancelled(hconn_t *c, mg_http_call_t *call)
{
    if (!call->cancelled) return 0;
    detach(call);
    conn_close(c);
    call_maybe_release(call);
    return 1;
}

/* Feeds n new bytes at c->buf + c->len - n to the parser. */
static void conn_parse(hconn_t *c, size_t n)
{
    mg_http_call_t *call = c->call;
    const char *p = c->buf + c->len - n;
    c->stop = 0;
    call->busy++;
    llhttp_errno_t e = llhttp_execute(&c->parser, p, n);
    call->busy--;
    if (call_cancelled(c, call)) return;
    if (e == HPE_PAUSED) { /* the final response ended */
        const char *at = llhttp_get_error_pos(&c->parser);
        exchange_done(c, at != c->buf + c->len);
        return;
    }
    if (e != HPE_OK) {
        if (c->stop) {
            call_finish(call, c->stop, c->stop_msg);
            return;
        }
        snprintf(call->msg, sizeof(call->msg), "bad response: %s",
                 llhttp_get_error_reason(&c->parser));
        call_finish(call, MG_HTTP_EBADRESP, call->msg);
        return;
    }
    if (c->head_done) {
        c->len = 0; /* body bytes went to on_body; the head views are no longer read */
    } else if (c->len == CONN_BUF) {
        call_finish(call, MG_HTTP_EBADRESP, "bad response: head too large");
    }
}

/* The stream ended (UV_EOF, or a TLS close_notify) or failed while call
 * waits for its response. */
static void conn_read_end(hconn_t *c, mg_http_call_t *call, ssize_t n)
{
    if (n == UV_EOF && c->head_done && !c->msg_done) {
        /* a close-delimited body ends here; any other framing is cut */
        call->busy++;
        llhttp_finish(&c->parser);
        call->busy--;
        if (call_cancelled(c, call)) return;
        if (c->msg_done) {
            c->keepalive = 0;
            exchange_done(c, 0);
            return;
        }
        call_finish(call, MG_HTTP_ECLOSED, "bad response: connection closed mid-body");
        return;
    }
    if (n == UV_EOF) {
        exchange_failed(c, MG_HTTP_ECLOSED, "connection closed before the response");
        return;
    }
    snprintf(call->msg, sizeof(call->msg), "read failed: %s", uv_strerror((int)n));
    exchange_failed(c, MG_HTTP_EIO, call->msg);
}

/* n response bytes (plaintext) arrived at c->buf + c->len. */
static void conn_input(hconn_t *c, mg_http_call_t *call, size_t n)
{
    c->got_bytes = 1;
    c->len += (uint32_t)n;
    if (call->idle_ms) uv_timer_start(&c->timer, on_conn_timer, call->idle_ms, 0);
    conn_parse(c, n);
}

/* ---- TLS --------------------------------------------------------------------------- */

static void on_tls_written(uv_write_t *w, int status);

/* The session slot of host h; create: else the free or least recently
 * used one, emptied and keyed for h. O(TLS_SESSIONS). */
static tls_sess_t *sess_slot(mg_http_client_t *cl, const hhost_t *h, int create)
{
    tls_sess_t *pick = NULL;
    for (int i = 0; i < TLS_SESSIONS; i++) {
        tls_sess_t *s = &cl->sess[i];
        if (s->sess && s->ctx == h->tls && s->port == h->port && s->name_len == h->name_len &&
            s->sni_len == h->sni_len && memcmp(s->name, h->name, h->name_len) == 0 &&
            memcmp(s->sni, h->sni, h->sni_len) == 0)
            return s;
        if (!pick || (pick->sess && (!s->sess || s->used < pick->used))) pick = s;
    }
    if (!create) return NULL;
    if (pick->sess) SSL_SESSION_free(pick->sess);
    pick->sess = NULL;
    pick->ctx = h->tls;
    pick->port = h->port;
    memcpy(pick->name, h->name, h->name_len);
    pick->name_len = h->name_len;
    memcpy(pick->sni, h->sni, h->sni_len);
    pick->sni_len = h->sni_len;
    return pick;
}

static void sess_drop(mg_http_client_t *cl, const hhost_t *h)
{
    tls_sess_t *s = h ? sess_slot(cl, h, 0) : NULL;
    if (!s) return;
    SSL_SESSION_free(s->sess);
    s->sess = NULL;
}

/* OpenSSL's new-session callback (a TLS 1.3 ticket arrives after the
 * handshake, read with the response): 1 keeps sess (our reference). */
static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    hconn_t *c = SSL_get_app_data(ssl);
    if (!c || c->closing || !c->host || !SSL_SESSION_is_resumable(sess)) return 0;
    tls_sess_t *s = sess_slot(c->cl, c->host, 1);
    if (s->sess) SSL_SESSION_free(s->sess); /* the newest ticket replaces the older */
    s->sess = sess;
    s->used = ++c->cl->sess_clock;
    return 1;
}

/* A TLS connection's transport failed: the call (if any) fails, or the
 * idle connection closes. */
static void tls_fail(hconn_t *c, int err, const char *msg)
{
    if (c->call) {
        if (msg != c->call->msg) snprintf(c->call->msg, sizeof(c->call->msg), "%s", msg);
        exchange_failed(c, err, c->call->msg);
    } else {
        conn_close(c);
    }
}

/* Sends what OpenSSL queued in the write BIO: one uv_write at a time (its
 * callback flushes again). 0, or -1 after failing the connection. */
static int tls_flush(hconn_t *c)
{
    if (c->writing || c->closing) return 0;
    size_t n = mg__tls_out_pending(&c->tls);
    if (n == 0) return 0;
    if (n > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 16384;
        while (cap < n)
            cap *= 2;
        char *b = realloc(c->wbuf, cap);
        if (!b) {
            tls_fail(c, MG_HTTP_ENOMEM, "out of memory");
            return -1;
        }
        c->wbuf = b;
        c->wcap = cap;
    }
    n = mg__tls_out(&c->tls, c->wbuf, n);
    uv_buf_t b = uv_buf_init(c->wbuf, (unsigned)n);
    int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_tls_written);
    if (rc < 0) {
        char m[128];
        snprintf(m, sizeof(m), "write failed: %s", uv_strerror(rc));
        tls_fail(c, MG_HTTP_EIO, m);
        return -1;
    }
    c->writing = 1;
    return 0;
}

static void on_tls_written(uv_write_t *w, int status)
{
    hconn_t *c = w->data;
    c->writing = 0;
    if (c->closing) return;
    if (status < 0) {
        char m[128];
        snprintf(m, sizeof(m), "write failed: %s", uv_strerror(status));
        tls_fail(c, MG_HTTP_EIO, m);
        return;
    }
    tls_flush(c);
}

/* Takes the plaintext OpenSSL has to the parser, until it wants more
 * ciphertext. A parse may end the exchange (the connection goes idle or
 * closes; on_done may even start a new call on it): re-read c each turn. */
static void tls_pump(hconn_t *c)
{
    char m[256];
    while (!c->closing) {
        mg_http_call_t *call = c->call;
        assert(c->len < CONN_BUF); /* a full head buffer ended the call in conn_parse */
        int r = mg__tls_read(&c->tls, c->buf + c->len, CONN_BUF - c->len, m, sizeof(m));
        if (r > 0) {
            if (!call) { /* idle: bytes nobody asked for */
                conn_close(c);
                return;
            }
            conn_input(c, call, (size_t)r);
            continue;
        }
        if (r == 0) { /* wants more: send what it has (a key update answer...) */
            tls_flush(c);
            return;
        }
        if (!call) {
            conn_close(c);
            return;
        }
        if (r == -1) {
            conn_read_end(c, call, UV_EOF);
            return;
        }
        tls_fail(c, MG_HTTP_ETLS, m);
        return;
    }
}

static void tls_on_read(hconn_t *c, ssize_t n)
{
    mg_http_call_t *call = c->call;
    if (n < 0) {
        if (!call) {
            conn_close(c);
            return;
        }
        if (!c->tls.up) {
            /* nothing from the server before it hung up (a FIN, or a reset:
             * servers do both to a ClientHello they cannot read) */
            const char *hint =
                c->tls.seen ? "" : " (not a TLS server, or it refused our certificate?)";
            if (n == UV_EOF)
                snprintf(call->msg, sizeof(call->msg),
                         "TLS handshake failed: the server closed the connection%s%s",
                         c->tls.seen ? "" : " without answering", hint);
            else
                snprintf(call->msg, sizeof(call->msg), "TLS handshake failed: read failed: %s%s",
                         uv_strerror((int)n), hint);
            call_finish(call, MG_HTTP_ETLS, call->msg);
            return;
        }
        conn_read_end(c, call, n);
        return;
    }
    if (mg__tls_feed(&c->tls, c->buf + CONN_BUF, (size_t)n) < 0) {
        tls_fail(c, MG_HTTP_ENOMEM, "out of memory");
        return;
    }
    if (!c->tls.up) {
        assert(call); /* a handshaking connection is never idle */
        int rc = mg__tls_handshake(&c->tls, call->msg, sizeof(call->msg));
        if (rc < 0) {
            sess_drop(c->cl, c->host); /* the next try starts afresh */
            call_finish(call, MG_HTTP_ETLS, call->msg);
            return;
        }
        if (tls_flush(c) < 0 || rc == 0) return;
        c->cl->handshakes++;
        if (SSL_session_reused(c->tls.ssl)) c->cl->resumed++;
        conn_send(c, call); /* the handshake is done: the connect timer ends here */
        if (c->closing || c->call != call) return;
    }
    tls_pump(c);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    hconn_t *c = s->data;
    mg_http_call_t *call = c->call;
    if (n == 0 || c->closing) return;
    if (c->is_tls) {
        tls_on_read(c, n);
        return;
    }
    if (!call) { /* idle: the server closed it, or sent what nobody asked for */
        conn_close(c);
        return;
    }
    if (n < 0) {
        conn_read_end(c, call, n);
        return;
    }
    conn_input(c, call, (size_t)n);
}

static void on_written(uv_write_t *w, int status)
{
    hconn_t *c = w->data;
    if (c->closing || !c->call || status == 0) return;
    snprintf(c->call->msg, sizeof(c->call->msg), "write failed: %s", uv_strerror(status));
    exchange_failed(c, MG_HTTP_EIO, c->call->msg);
}

/* Sends the call's request on a connected connection. */
static void conn_send(hconn_t *c, mg_http_call_t *call)
{
    c->call = call;
    call->conn = c;
    c->len = 0;
    c->nhdrs = 0;
    c->hdr_state = HS_NONE;
    c->got_bytes = c->head_done = c->msg_done = c->interim = c->keepalive = 0;
    c->nrequests++;
    llhttp_init(&c->parser, HTTP_RESPONSE, &c->cl->settings);
    c->parser.data = c;
    if (c->is_tls) {
        if (mg__tls_write(&c->tls, call->out, call->out_len, call->msg, sizeof(call->msg)) < 0) {
            exchange_failed(c, MG_HTTP_ETLS, call->msg);
            return;
        }
        if (tls_flush(c) < 0) return;
    } else {
        uv_buf_t b = uv_buf_init(call->out, (unsigned)call->out_len);
        int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written);
        if (rc < 0) {
            snprintf(call->msg, sizeof(call->msg), "write failed: %s", uv_strerror(rc));
            exchange_failed(c, MG_HTTP_EIO, call->msg);
            return;
        }
    }
    if (call->idle_ms)
        uv_timer_start(&c->timer, on_conn_timer, call->idle_ms, 0);
    else
        uv_timer_stop(&c->timer);
}

static void on_connect(uv_connect_t *cr, int status)
{
    hconn_t *c = cr->data;
    if (c->closing) return;
    mg_http_call_t *call = c->call;
    assert(call); /* a connecting connection is never idle */
    if (status < 0) {
        if (status == UV_ECONNREFUSED) {
            call_finish(call, MG_HTTP_ECONNREFUSED, "connection refused");
            return;
        }
        snprintf(call->msg, sizeof(call->msg), "connect failed: %s", uv_strerror(status));
        call_finish(call, MG_HTTP_ECONNECT, call->msg);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc < 0) {
        snprintf(call->msg, sizeof(call->msg), "read failed: %s", uv_strerror(rc));
        call_finish(call, MG_HTTP_EIO, call->msg);
        return;
    }
    if (c->is_tls) { /* the ClientHello; the connect timer keeps running */
        if (mg__tls_init(&c->tls, call->tls, call->sni, call->msg, sizeof(call->msg)) < 0) {
            call_finish(call, MG_HTTP_ETLS, call->msg);
            return;
        }
        SSL_set_app_data(c->tls.ssl, c);
        tls_sess_t *ts = sess_slot(c->cl, c->host, 0);
        if (ts) {
            SSL_set_session(c->tls.ssl, ts->sess); /* offered; the server may refuse it */
            ts->used = ++c->cl->sess_clock;
        }
        if (mg__tls_handshake(&c->tls, call->msg, sizeof(call->msg)) < 0) {
            sess_drop(c->cl, c->host);
            call_finish(call, MG_HTTP_ETLS, call->msg);
            return;
        }
        tls_flush(c);
        return;
    }
    conn_send(c, call);
}

/* Opens a new connection for the call (its address is known). */
static int connect_new(mg_http_call_t *call)
{
    mg_http_client_t *cl = call->cl;
    hhost_t *h = host_find(cl, call, 1);
    if (!h) return MG_HTTP_ENOMEM;
    hconn_t *c = calloc(1, sizeof(*c));
    char *buf = c ? malloc(CONN_BUF + (call->tls ? TLS_IN : 0)) : NULL;
    if (!buf) {
        free(c);
        if (h->refs == 0) { /* just created: nothing else holds it */
            h->refs = 1;
            host_put(h);
        }
        return MG_HTTP_ENOMEM;
    }
    c->buf = buf;
    c->is_tls = call->tls != NULL;
    c->cl = cl;
    c->host = h;
    h->refs++;
    mg_list_init(&c->link);
    uv_tcp_init(cl->loop, &c->tcp);
    uv_timer_init(cl->loop, &c->timer);
    c->tcp.data = c->timer.data = c->creq.data = c->wreq.data = c;
    c->handles_open = 2;
    cl->connects++;
    c->call = call;
    call->conn = c;
    int rc = uv_tcp_connect(&c->creq, &c->tcp, (struct sockaddr *)&call->addr, on_connect);
    if (rc < 0) {
        detach(call);
        conn_close(c);
        snprintf(call->msg, sizeof(call->msg), "connect failed: %s", uv_strerror(rc));
        return rc == UV_ECONNREFUSED ? MG_HTTP_ECONNREFUSED : MG_HTTP_ECONNECT;
    }
    uv_timer_start(&c->timer, on_conn_timer, call->connect_ms, 0);
    return 0;
}

static void on_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res)
{
    mg_http_call_t *call = g->data;
    call->gai_pending = 0;
    if (call->cancelled || call->done) {
        if (res) uv_freeaddrinfo(res);
        call_maybe_release(call);
        return;
    }
    if (status < 0 || !res) {
        if (res) uv_freeaddrinfo(res);
        snprintf(call->msg, sizeof(call->msg), "name resolution failed: %.*s: %s",
                 (int)call->host_len, call->host, uv_strerror(status));
        call_finish(call, MG_HTTP_EDNS, call->msg);
        return;
    }
    memcpy(&call->addr, res->ai_addr, res->ai_addrlen);
    uv_freeaddrinfo(res);
    call->have_addr = 1;
    int rc = connect_new(call);
    if (rc < 0) call_finish(call, rc, call->msg[0] ? call->msg : NULL);
}

/* Puts the call on a pooled connection, or opens one (resolving the name
 * first when it is not a literal). 0, or a MG_HTTP_E* code. */
static int attach(mg_http_call_t *call)
{
    mg_http_client_t *cl = call->cl;
    call->tries++;
    call->msg[0] = 0;
    hhost_t *h = host_find(cl, call, 0);
    if (h && !mg_list_empty(&h->idle)) {
        hconn_t *c = mg_container_of(h->idle.next, hconn_t, link);
        mg_list_remove(&c->link);
        c->idle = 0;
        h->nidle--;
        cl->nidle--;
        c->reused = 1;
        cl->reused++;
        conn_send(c, call);
        return 0;
    }
    if (call->have_addr) return connect_new(call);
    char port[8];
    snprintf(port, sizeof(port), "%d", call->port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    call->gai.data = call;
    int rc = uv_getaddrinfo(cl->loop, &call->gai, on_resolved, call->host, port, &hints);
    if (rc < 0) return MG_HTTP_EDNS;
    call->gai_pending = 1;
    return 0;
}

/* ---- response parsing ------------------------------------------------------------ */

static inline hconn_t *conn_of(llhttp_t *p)
{
    return (hconn_t *)p->data;
}

static int stop(hconn_t *c, int code, const char *msg)
{
    c->stop = code;
    c->stop_msg = msg;
    return -1;
}

static int on_message_begin(llhttp_t *p)
{
    hconn_t *c = conn_of(p);
    c->nhdrs = 0;
    c->hdr_state = HS_NONE;
    return 0;
}

static int on_field(llhttp_t *p, const char *at, size_t len)
{
    hconn_t *c = conn_of(p);
    if (c->head_done) return 0; /* trailers are dropped */
    if (mg__header_name_span(c->hdrs, c->nhdrs, &c->hdr_state, at, len) != 0)
        return stop(c, MG_HTTP_EBADRESP, "bad response: too many headers");
    return 0;
}

static int on_value(llhttp_t *p, const char *at, size_t len)
{
    hconn_t *c = conn_of(p);
    if (c->head_done) return 0;
    if (mg__header_value_span(&c->hdrs[c->nhdrs], &c->hdr_state, at, len) != 0)
        return stop(c, MG_HTTP_EBADRESP, "bad response: folded header line");
    return 0;
}

static int on_value_complete(llhttp_t *p)
{
    hconn_t *c = conn_of(p);
    if (c->head_done) return 0;
    if (mg__header_finish(&c->hdrs[c->nhdrs]) != 0)
        return stop(c, MG_HTTP_EBADRESP, "bad response: invalid header");
    c->nhdrs++;
    c->hdr_state = HS_VALUE_DONE;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    hconn_t *c = conn_of(p);
    mg_http_call_t *call = c->call;
    int status = p->status_code;
    if (status < 100) return stop(c, MG_HTTP_EBADRESP, "bad response: invalid status");
    if (status < 200) {
        if (status == 101) return stop(c, MG_HTTP_EBADRESP, "bad response: unexpected 101");
        /* an interim answer has no content whatever its headers say
         * (RFC 9110 15.2); the final one follows */
        c->interim = 1;
        return 1;
    }
    c->head_done = 1;
    c->keepalive = llhttp_should_keep_alive(p);
    int64_t cl = (p->flags & F_CONTENT_LENGTH) ? (int64_t)p->content_length : -1;
    if (call->cb.on_head) {
        int rc = call->cb.on_head(call->ud, status, c->hdrs, c->nhdrs, cl);
        if (call->cancelled) return -1;
        if (rc < 0) return stop(c, rc, NULL);
    }
    return call->is_head || status == 204 || status == 304 ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    hconn_t *c = conn_of(p);
    mg_http_call_t *call = c->call;
    if (!call->cb.on_body || len == 0) return 0;
    int rc = call->cb.on_body(call->ud, at, len);
    if (call->cancelled) return -1;
    if (rc < 0) return stop(c, rc, NULL);
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    hconn_t *c = conn_of(p);
    if (c->interim) {
        c->interim = 0;
        return 0; /* the parser goes on with the final response */
    }
    c->msg_done = 1;
    return HPE_PAUSED;
}

/* ---- client ------------------------------------------------------------------------ */

mg_http_client_t *mg__http_client_new(uv_loop_t *loop, const mg_http_client_opts_t *opts)
{
    mg_http_client_t *cl = calloc(1, sizeof(*cl));
    if (!cl) return NULL;
    cl->loop = loop;
    if (opts) cl->o = *opts;
    if (!cl->o.max_idle_per_host) cl->o.max_idle_per_host = 64;
    if (!cl->o.idle_ms) cl->o.idle_ms = 60000;
    if (!cl->o.max_requests) cl->o.max_requests = 1000;
    mg_list_init(&cl->hosts);
    mg_list_init(&cl->active);
    mg_list_init(&cl->free_calls);
    llhttp_settings_init(&cl->settings);
    cl->settings.on_message_begin = on_message_begin;
    cl->settings.on_header_field = on_field;
    cl->settings.on_header_value = on_value;
    cl->settings.on_header_value_complete = on_value_complete;
    cl->settings.on_headers_complete = on_headers_complete;
    cl->settings.on_body = on_body;
    cl->settings.on_message_complete = on_message_complete;
    return cl;
}

void mg__http_client_free(mg_http_client_t *cl)
{
    if (!cl) return;
    while (!mg_list_empty(&cl->active)) {
        mg_http_call_t *call = mg_container_of(cl->active.next, mg_http_call_t, link);
        mg_list_remove(&call->link);
        assert(!call->busy); /* not from inside a callback */
        call->orphan = 1;
        call->cancelled = 1;
        uv_timer_stop(&call->timer);
        hconn_t *c = detach(call);
        if (c) conn_close(c);
        if (call->gai_pending)
            uv_cancel((uv_req_t *)&call->gai); /* on_resolved releases it */
        else
            call_maybe_release(call);
    }
    mg__http_client_close_idle(cl); /* only idle connections still hold hosts */
    assert(mg_list_empty(&cl->hosts));
    while (!mg_list_empty(&cl->free_calls)) {
        mg_http_call_t *call = mg_container_of(cl->free_calls.next, mg_http_call_t, link);
        mg_list_remove(&call->link);
        uv_close((uv_handle_t *)&call->timer, on_call_timer_closed);
    }
    /* connections still closing hold their own reference to their context */
    for (int i = 0; i < cl->ntls; i++) {
        SSL_CTX_free(cl->tls[i].ctx);
        free(cl->tls[i].ca);
        free(cl->tls[i].cert);
        free(cl->tls[i].key);
    }
    SSL_CTX_free(cl->tls_default);
    for (int i = 0; i < TLS_SESSIONS; i++)
        if (cl->sess[i].sess) SSL_SESSION_free(cl->sess[i].sess);
    free(cl);
}

void mg__http_client_close_idle(mg_http_client_t *cl)
{
    mg_link_t *l = cl->hosts.next;
    while (l != &cl->hosts) {
        hhost_t *h = mg_container_of(l, hhost_t, link);
        l = l->next;
        /* each close drops one reference; the last one frees h, so count
         * rather than look at h->idle after it */
        for (uint32_t n = h->nidle; n > 0; n--)
            conn_close_clean(mg_container_of(h->idle.next, hconn_t, link));
    }
}

void mg__http_client_stats(const mg_http_client_t *cl, mg_http_client_stats_t *st)
{
    st->connects = cl->connects;
    st->reused = cl->reused;
    st->idle = cl->nidle;
    st->active = cl->nactive;
    st->tls_handshakes = cl->handshakes;
    st->tls_resumed = cl->resumed;
}

/* ---- starting a call --------------------------------------------------------------- */

static int out_add(mg_http_call_t *call, const char *p, size_t len)
{
    /* no bound but size_t's: the caller's body is already in memory */
    if (mg__grow(&call->out, &call->out_cap, call->out_len, len, 1024, SIZE_MAX) != 0) return -1;
    if (len) memcpy(call->out + call->out_len, p, len);
    call->out_len += len;
    return 0;
}

static int out_header(mg_http_call_t *call, const char *n, size_t nl, const char *v, size_t vl)
{
    return out_add(call, n, nl) || out_add(call, ": ", 2) || out_add(call, v, vl) ||
           out_add(call, "\r\n", 2);
}

/* Splits an http:// or https:// URL. host is NUL-terminated (without IPv6
 * brackets); *target is the request-target to send ("/" when the URL has
 * no path). */
static int parse_url(mg_http_call_t *call, const char *u, size_t n, const char **target, size_t *tl,
                     int *bracketed)
{
    size_t i, skip;
    if (n >= 8 && strncasecmp(u, "https://", 8) == 0) {
        call->https = 1;
        skip = 8;
    } else if (n >= 7 && strncasecmp(u, "http://", 7) == 0) {
        call->https = 0;
        skip = 7;
    } else {
        for (i = 0; i + 2 < n; i++)
            if (u[i] == ':' && u[i + 1] == '/' && u[i + 2] == '/') return MG_HTTP_ESCHEME;
        return MG_HTTP_EURL;
    }
    for (i = 0; i < n; i++) { /* no controls, spaces or non-ASCII anywhere */
        unsigned char ch = (unsigned char)u[i];
        if (ch <= 0x20 || ch >= 0x7f) return MG_HTTP_EURL;
    }
    const char *a = u + skip, *end = u + n;
    const char *ae = a;
    while (ae < end && *ae != '/' && *ae != '?' && *ae != '#')
        ae++;
    const char *h = a, *he;
    const char *colon = NULL;
    *bracketed = 0;
    if (a < ae && *a == '[') { /* IPv6 literal */
        const char *rb = memchr(a, ']', (size_t)(ae - a));
        if (!rb) return MG_HTTP_EURL;
        h = a + 1;
        he = rb;
        if (rb + 1 < ae) {
            if (rb[1] != ':') return MG_HTTP_EURL;
            colon = rb + 1;
        }
        *bracketed = 1;
    } else {
        colon = memchr(a, ':', (size_t)(ae - a));
        he = colon ? colon : ae;
        for (const char *q = h; q < he; q++) { /* a reg-name we can resolve (no userinfo) */
            char ch = *q;
            if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_'))
                return MG_HTTP_EURL;
        }
    }
    if (he == h || (size_t)(he - h) > HOST_MAX) return MG_HTTP_EURL;
    int port = call->https ? 443 : 80;
    if (colon) {
        const char *q = colon + 1;
        if (q == ae || ae - q > 5) return MG_HTTP_EURL;
        port = 0;
        for (; q < ae; q++) {
            if (*q < '0' || *q > '9') return MG_HTTP_EURL;
            port = port * 10 + (*q - '0');
        }
        if (port < 1 || port > 65535) return MG_HTTP_EURL;
    }
    memcpy(call->host, h, (size_t)(he - h));
    call->host[he - h] = 0;
    call->host_len = (size_t)(he - h);
    call->port = port;
    const char *frag = memchr(ae, '#', (size_t)(end - ae));
    *target = ae;
    *tl = (size_t)((frag ? frag : end) - ae);
    return 0;
}

static int is_token(const char *s, size_t n)
{
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 0x20 || ch >= 0x7f || strchr("\"(),/:;<=>?@[\\]{}", ch)) return 0;
    }
    return 1;
}

/* Builds the request bytes into call->out. */
static int build_request(mg_http_call_t *call, const mg_http_spec_t *s, const char *target,
                         size_t tl, int bracketed)
{
    const char *m = s->method ? s->method : "GET";
    size_t ml = s->method ? s->method_len : 3;
    if (!is_token(m, ml)) return MG_HTTP_EARG;
    int has_host = 0, has_ua = 0;
    for (uint32_t i = 0; i < s->nheaders; i++) {
        const mg_header_t *h = &s->headers[i];
        if (!mg__header_valid(h->name, h->name_len, h->value, h->value_len)) return MG_HTTP_EARG;
        /* we frame the message and own the connection */
        if (mg__hop_by_hop(h->name, h->name_len) ||
            mg__strieq(h->name, h->name_len, "content-length", 14))
            return MG_HTTP_EARG;
        if (mg__strieq(h->name, h->name_len, "host", 4)) has_host = 1;
        if (mg__strieq(h->name, h->name_len, "user-agent", 10)) has_ua = 1;
    }
    call->out_len = 0;
    if (out_add(call, m, ml) || out_add(call, " ", 1) ||
        (tl == 0 || target[0] != '/' ? out_add(call, "/", 1) : 0) || out_add(call, target, tl) ||
        out_add(call, " HTTP/1.1\r\n", 11))
        return MG_HTTP_ENOMEM;
    if (!has_host) {
        char hv[HOST_MAX + 16];
        int n = snprintf(hv, sizeof(hv), bracketed ? "[%s]" : "%s", call->host);
        if (call->port != (call->https ? 443 : 80))
            n += snprintf(hv + n, sizeof(hv) - (size_t)n, ":%d", call->port);
        if (out_header(call, "Host", 4, hv, (size_t)n)) return MG_HTTP_ENOMEM;
    }
    for (uint32_t i = 0; i < s->nheaders; i++) {
        const mg_header_t *h = &s->headers[i];
        if (out_header(call, h->name, h->name_len, h->value, h->value_len)) return MG_HTTP_ENOMEM;
    }
    if (!has_ua && out_add(call, "User-Agent: moongate/" MG_VERSION "\r\n",
                           sizeof("User-Agent: moongate/" MG_VERSION "\r\n") - 1))
        return MG_HTTP_ENOMEM;
    if (s->body_len || mg__strieq(m, ml, "POST", 4) || mg__strieq(m, ml, "PUT", 3) ||
        mg__strieq(m, ml, "PATCH", 5)) {
        char cl[32];
        int n = snprintf(cl, sizeof(cl), "%zu", s->body_len);
        if (out_header(call, "Content-Length", 14, cl, (size_t)n)) return MG_HTTP_ENOMEM;
    }
    if (out_add(call, "\r\n", 2) || out_add(call, s->body, s->body_len)) return MG_HTTP_ENOMEM;
    call->is_head = mg__strieq(m, ml, "HEAD", 4);
    int idempotent = mg__strieq(m, ml, "GET", 3) || call->is_head ||
                     mg__strieq(m, ml, "OPTIONS", 7) || mg__strieq(m, ml, "TRACE", 5) ||
                     mg__strieq(m, ml, "PUT", 3) || mg__strieq(m, ml, "DELETE", 6);
    call->retry_ok = s->retry > 0 || (s->retry == 0 && idempotent);
    return 0;
}

/* The address of a literal host (or localhost) without DNS: 1; else 0. */
static int literal_addr(mg_http_call_t *call)
{
    struct sockaddr_in *a4 = (struct sockaddr_in *)&call->addr;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&call->addr;
    const char *h = call->host;
    if (strcasecmp(h, "localhost") == 0) h = "127.0.0.1";
    if (uv_ip4_addr(h, call->port, a4) == 0) return 1;
    if (uv_ip6_addr(h, call->port, a6) == 0) return 1;
    return 0;
}

/* An https:// call's context and server name (the url's host unless
 * given: what SNI carries and the certificate must name). */
static int tls_setup(mg_http_call_t *call, const mg_http_spec_t *s)
{
    char err[256];
    call->tls = s->tls;
    if (!call->tls && mg__http_tls_ctx(call->cl, NULL, &call->tls, err, sizeof(err)) < 0) {
        mg_log(MG_LOG_ERROR, "http client: %s", err);
        return MG_HTTP_ETLS;
    }
    const char *sn = s->server_name && s->server_name_len ? s->server_name : call->host;
    size_t sl = s->server_name && s->server_name_len ? s->server_name_len : call->host_len;
    if (sl > HOST_MAX) return MG_HTTP_EARG;
    for (size_t i = 0; i < sl; i++) { /* a DNS name or an IP literal */
        char ch = sn[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '-' || ch == '.' || ch == '_' || ch == ':'))
            return MG_HTTP_EARG;
    }
    memcpy(call->sni, sn, sl);
    call->sni[sl] = 0;
    call->sni_len = sl;
    return 0;
}

static int same_str(const char *a, size_t al, const char *b, size_t bl)
{
    return al == bl && (al == 0 || memcmp(a, b, al) == 0);
}

static char *dup_len(const char *p, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        if (n) memcpy(d, p, n);
        d[n] = 0;
    }
    return d;
}

/* Sessions go to our slots (sess_slot), not OpenSSL's internal cache,
 * which a client could not look up by host anyway. */
static void ctx_adopt(SSL_CTX *ctx)
{
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, on_new_session);
}

int mg__http_tls_ctx(mg_http_client_t *cl, const mg_tls_opts_t *o, SSL_CTX **out, char *err,
                     size_t errlen)
{
    *out = NULL;
    if (!o) {
        if (!cl->tls_default) {
            mg_tls_opts_t d = {.verify = 1};
            cl->tls_default = mg__tls_ctx_new(&d, err, errlen);
            if (!cl->tls_default) return MG_HTTP_ETLS;
            ctx_adopt(cl->tls_default);
        }
        *out = cl->tls_default;
        return 0;
    }
    int verify = o->verify != 0;
    for (int i = 0; i < cl->ntls; i++) { /* O(contexts): a handful of configurations */
        tls_entry_t *e = &cl->tls[i];
        if (e->verify == verify && same_str(e->ca, e->ca_len, o->ca, o->ca_len) &&
            same_str(e->cert, e->cert_len, o->cert, o->cert_len) &&
            same_str(e->key, e->key_len, o->key, o->key_len)) {
            *out = e->ctx;
            return 0;
        }
    }
    if (cl->ntls == MAX_TLS_CTX) {
        snprintf(err, errlen,
                 "tls: more than %d TLS configurations (ca, cert, key, verify) in "
                 "one process",
                 MAX_TLS_CTX);
        return MG_HTTP_ETLS;
    }
    SSL_CTX *ctx = mg__tls_ctx_new(o, err, errlen);
    if (!ctx) return MG_HTTP_ETLS;
    ctx_adopt(ctx);
    tls_entry_t *e = &cl->tls[cl->ntls];
    e->ca = dup_len(o->ca, o->ca_len);
    e->cert = dup_len(o->cert, o->cert_len);
    e->key = dup_len(o->key, o->key_len);
    if (!e->ca || !e->cert || !e->key) {
        free(e->ca);
        free(e->cert);
        free(e->key);
        memset(e, 0, sizeof(*e));
        SSL_CTX_free(ctx);
        snprintf(err, errlen, "out of memory");
        return MG_HTTP_ENOMEM;
    }
    e->ca_len = o->ca_len;
    e->cert_len = o->cert_len;
    e->key_len = o->key_len;
    e->verify = verify;
    e->ctx = ctx;
    cl->ntls++;
    *out = ctx;
    return 0;
}

int mg__http_start(mg_http_client_t *cl, const mg_http_spec_t *s, const mg_http_cbs_t *cbs,
                   void *ud, mg_http_call_t **out)
{
    *out = NULL;
    if (!cbs || !cbs->on_done || (!s->body && s->body_len) || !s->url) return MG_HTTP_EARG;
    mg_http_call_t *call = call_get(cl);
    if (!call) return MG_HTTP_ENOMEM;
    mg_list_insert_head(&cl->active, &call->link);
    cl->nactive++;
    call->cb = *cbs;
    call->ud = ud;
    const char *target;
    size_t tl;
    int bracketed;
    int rc = parse_url(call, s->url, s->url_len, &target, &tl, &bracketed);
    if (rc == 0) rc = build_request(call, s, target, tl, bracketed);
    if (rc == 0) {
        call->have_addr = literal_addr(call);
        if (bracketed && !call->have_addr) rc = MG_HTTP_EURL;
    }
    if (rc == 0 && call->https) rc = tls_setup(call, s);
    if (rc == 0) {
        call->idle_ms = s->idle_ms;
        call->connect_ms = s->connect_ms ? s->connect_ms : CONNECT_MS;
        if (s->timeout_ms && s->timeout_ms < call->connect_ms) call->connect_ms = s->timeout_ms;
        rc = attach(call);
    }
    if (rc < 0) {
        call->cancelled = 1;
        hconn_t *c = detach(call);
        if (c) conn_close(c);
        call_maybe_release(call);
        return rc;
    }
    if (s->timeout_ms) uv_timer_start(&call->timer, on_call_timeout, s->timeout_ms, 0);
    *out = call;
    return 0;
}
