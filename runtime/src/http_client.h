/* http_client.h: the runtime's asynchronous HTTP/1.1 client on a libuv loop.
 *
 * Used by mg.http.request (req_http.c) and, outside any request, by the
 * control process (etcd range and the endless /v3/watch stream). Nothing
 * here touches Lua or the worker: a client needs only a uv_loop_t.
 *
 *   mg_http_client_t *cl = mg__http_client_new(loop, NULL);
 *   mg_http_spec_t s = {.method = "GET", .url = "http://127.0.0.1:2379/x", ...};
 *   mg_http_cbs_t cb = {.on_head = ..., .on_body = ..., .on_done = ...};
 *   mg_http_call_t *call;
 *   int rc = mg__http_start(cl, &s, &cb, ud, &call); // 0, or a MG_HTTP_E* now
 *   ...  on_head once, on_body per piece, then on_done exactly once;
 *   mg__http_cancel(call) at any time before on_done: no callback after it.
 *
 * Scope: http:// and https:// (TLS 1.2/1.3 through tls_client.h, between
 * the socket and the parser; the handshake is covered by connect_ms, and
 * a connection is pooled per host, port, TLS context and server name, so
 * a call never rides a connection made with other TLS settings). Hosts:
 * IP literals and "localhost" without DNS; any other name is resolved with
 * uv_getaddrinfo (async, on libuv's thread pool) each time a new connection
 * is opened, no cache. Responses are parsed by llhttp (strict: CL+TE,
 * duplicate or bad Content-Length, bad chunks are errors) and every header
 * goes through the same checks as upstream responses (mg__header_finish).
 * Keep-alive connections are pooled per host:port.
 */
#ifndef MG_HTTP_CLIENT_H
#define MG_HTTP_CLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "moongate.h"
#include "tls_client.h"

typedef struct mg_http_client_s mg_http_client_t;
typedef struct mg_http_call_s mg_http_call_t;

/* Errors given to on_done (or returned by mg__http_start). Negative, and
 * apart from MG_* codes. mg__http_strerror names each. */
enum {
    MG_HTTP_EURL = -100,         /* "invalid url" (start only) */
    MG_HTTP_ESCHEME = -101,      /* "unsupported scheme" (start only) */
    MG_HTTP_EARG = -102,         /* bad method or header (start only) */
    MG_HTTP_ETIMEDOUT = -103,    /* "timeout": total, connect or read-idle */
    MG_HTTP_ECONNREFUSED = -104, /* "connection refused" */
    MG_HTTP_ECONNECT = -105,     /* "connect failed" (unreachable, reset...) */
    MG_HTTP_EDNS = -106,         /* "name resolution failed" */
    MG_HTTP_EBADRESP = -107,     /* "bad response" (malformed, smuggling-shaped) */
    MG_HTTP_ECLOSED = -108,      /* "connection closed" before the response ended */
    MG_HTTP_EIO = -109,          /* "read or write failed" */
    MG_HTTP_ENOMEM = -110,       /* "out of memory" */
    MG_HTTP_ETOOLARGE = -111,    /* "response too large": for callbacks to return */
    MG_HTTP_ECLIENT = -112,      /* "client closed": mg__http_client_free ran */
    MG_HTTP_ETLS = -113          /* "TLS failed": handshake, verification, a TLS alert */
};

/* What to send. Strings are pointer + length (no NUL needed) and are copied
 * by mg__http_start: nothing needs to outlive the call to it. */
typedef struct mg_http_spec_s {
    const char *method; /* a token; NULL: "GET" */
    size_t method_len;
    const char *url; /* "http[s]://host[:port][/path][?query]"; a #fragment is dropped */
    size_t url_len;
    const mg_header_t *headers; /* extra headers; Host overrides ours, Content-Length,
                                   Transfer-Encoding and hop-by-hop ones are refused */
    uint32_t nheaders;
    const char *body; /* sent with Content-Length (also 0 for POST/PUT/PATCH) */
    size_t body_len;
    uint32_t timeout_ms;     /* whole call, from start to the last byte; 0: none */
    uint32_t idle_ms;        /* longest silence while waiting for response bytes; 0: none */
    uint32_t connect_ms;     /* TCP connect; 0: 5000 (bounded by timeout_ms too) */
    int retry;               /* 1: may be sent twice (see below); -1: never; 0: by method */
    SSL_CTX *tls;            /* https://: from mg__http_tls_ctx; NULL: the client's default
                                (system CA store, verify on); ignored for http:// */
    const char *server_name; /* https://: SNI and the name checked; NULL: the url's host */
    size_t server_name_len;
} mg_http_spec_t;

/* Callbacks. Header and body pointers are views into the connection's
 * buffer, valid only during the callback: copy what you keep. on_head and
 * on_body may return a negative code to end the call: on_done then runs
 * with that code. Any callback may call mg__http_cancel (then no other
 * callback runs) and on_done may start new calls. */
typedef struct mg_http_cbs_s {
    /* The final response head (1xx interim responses are skipped).
     * content_length: -1 when not given (chunked, close-delimited). */
    int (*on_head)(void *ud, int status, const mg_header_t *h, uint32_t nh, int64_t content_length);
    /* One piece of the decoded body, as it arrives (never empty). */
    int (*on_body)(void *ud, const char *p, size_t len);
    /* Exactly once unless cancelled: 0 after the whole response, else a
     * MG_HTTP_E* code (or the callback's own) and a message such as
     * "timeout" or "bad response: Invalid character in chunk size". The
     * call handle is invalid once on_done returns. */
    void (*on_done)(void *ud, int err, const char *msg);
} mg_http_cbs_t;

typedef struct mg_http_client_opts_s {
    uint32_t max_idle_per_host; /* pooled keep-alive connections; 0: 64 */
    uint32_t idle_ms;           /* an idle pooled connection closes after; 0: 60000 */
    uint32_t max_requests;      /* per connection; 0: 1000 */
} mg_http_client_opts_t;

/* A client (its pool) on a loop; opts NULL: the defaults. NULL: no memory. */
mg_http_client_t *mg__http_client_new(uv_loop_t *loop, const mg_http_client_opts_t *opts);
/* Cancels every call in flight (no callbacks), closes every connection and
 * frees the client. The handles finish closing on the next loop turn. Not
 * from inside a callback of this client. */
void mg__http_client_free(mg_http_client_t *cl);

/* Closes the pooled idle connections (a worker that drains); calls in
 * flight go on. */
void mg__http_client_close_idle(mg_http_client_t *cl);

/* Starts a call. 0 and *out set: the callbacks will run (never before this
 * returns). Negative (MG_HTTP_EURL/ESCHEME/EARG/ENOMEM/ECONNECT): nothing
 * started and no callback will run.
 *
 * Retries: a request that fails on a reused keep-alive connection before
 * any response byte (the server closed it as we sent) is sent once more on
 * a new connection when spec->retry is 1, or it is 0 and the method is
 * idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE). */
int mg__http_start(mg_http_client_t *cl, const mg_http_spec_t *spec, const mg_http_cbs_t *cbs,
                   void *ud, mg_http_call_t **out);
/* Ends a call silently: no callback runs after this. Its connection is
 * closed (the response state is unknown). Valid until on_done returned. */
void mg__http_cancel(mg_http_call_t *call);

const char *mg__http_strerror(int err);

/* The client's TLS context for o (NULL: the default one), built on first
 * use and kept until mg__http_client_free: a lookup is O(contexts) string
 * compares, no allocation. 0 and *out, or MG_HTTP_ETLS with err saying
 * why (a file that cannot be read, more than 32 configurations). */
int mg__http_tls_ctx(mg_http_client_t *cl, const mg_tls_opts_t *o, SSL_CTX **out, char *err,
                     size_t errlen);

/* Counters, for tests and the status page. */
typedef struct mg_http_client_stats_s {
    uint64_t connects;       /* TCP connections opened */
    uint64_t reused;         /* calls sent on a pooled connection */
    uint32_t idle;           /* connections in the pool now */
    uint32_t active;         /* calls in flight now */
    uint64_t tls_handshakes; /* TLS handshakes completed */
    uint64_t tls_resumed;    /* of which resumed a session (abbreviated) */
} mg_http_client_stats_t;
void mg__http_client_stats(const mg_http_client_t *cl, mg_http_client_stats_t *st);

#endif
