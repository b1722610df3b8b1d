/* moongate.h: the flat C API that Lua reaches through the LuaJIT FFI.
 *
 * lua/moongate/ffi.lua mirrors the declarations between the MG_CDEF markers
 * verbatim (a unit spec checks they stay equal), so everything between them
 * must be something ffi.cdef parses: no preprocessor lines, no macros.
 *
 * Conventions (DESIGN.md "The C/Lua boundary"): mg_<module>_<verb>, opaque
 * handles, strings as pointer + length, results through out-params, int
 * returns (0 ok, negative error). No function here ever calls back into Lua;
 * the ones that start async work return MG_AGAIN and the caller yields its
 * coroutine, which C resumes when the work completes.
 */
#ifndef MOONGATE_H
#define MOONGATE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* MG_CDEF_BEGIN */
enum {
    MG_OK = 0,
    MG_ERROR = -1,    /* failed; the request is being ended by C */
    MG_AGAIN = -2,    /* would block: yield the coroutine, C resumes it */
    MG_DECLINED = -3, /* not found / not applicable */
    MG_EINVAL = -4,   /* bad argument */
    MG_EFULL = -5     /* a shm set holds only entries that must not be evicted */
};

enum {
    MG_HDR_SET = 0,   /* replace every value of the header */
    MG_HDR_ADD = 1,   /* add one more value */
    MG_HDR_REMOVE = 2 /* remove every value */
};

enum {
    MG_LEN_CHUNKED = -1, /* body length unknown: chunked to HTTP/1.1 clients */
    MG_LEN_CLOSE = -2    /* body delimited by closing the connection */
};

/* Phases a request runs in Lua besides access (bit flags). */
enum { MG_PHASE_HEADER_FILTER = 1, MG_PHASE_BODY_FILTER = 2, MG_PHASE_LOG = 4 };

typedef struct mg_req_s mg_req_t;
typedef struct mg_upstream_s mg_upstream_t;
typedef struct mg_sha256_s mg_sha256_t;

/* A header as received: views into the connection's buffer. */
typedef struct mg_header_s {
    const char *name;
    const char *value;
    uint32_t name_len;
    uint32_t value_len;
} mg_header_t;

/* The read-only view of a request that Lua reads fields of directly. It is
 * the first member of every mg_req_t, so a mg_req_t* casts to it. Strings
 * are views (not NUL-terminated) valid until the request ends. */
typedef struct mg_req_view_s {
    const char *method;
    const char *path; /* without the query; as received (not decoded) */
    const char *query;
    const mg_header_t *headers;
    uint32_t method_len;
    uint32_t path_len;
    uint32_t query_len; /* 0 when there was no '?' */
    uint32_t nheaders;
    uint8_t version_major;
    uint8_t version_minor;
    uint16_t remote_port;
    int32_t status; /* response status once known, else 0 */
    uint32_t worker_id;
    int64_t content_length; /* -1 when absent (chunked or no body) */
    double start_time;      /* seconds since the epoch */
    char remote_addr[48];
    char request_id[36];
    uint32_t request_id_len;
} mg_req_view_t;

/* Request */
int mg_req_header(mg_req_t *r, const char *name, size_t name_len, size_t idx, const char **value,
                  size_t *value_len);
int mg_req_set_header(mg_req_t *r, const char *name, size_t name_len, const char *value,
                      size_t value_len, int mode);
/* An integer value (MG_HDR_SET or MG_HDR_ADD), formatted in C: no string
 * made in Lua per request. */
int mg_req_set_header_int(mg_req_t *r, const char *name, size_t name_len, int64_t value, int mode);
int mg_req_set_uri(mg_req_t *r, const char *path, size_t path_len, const char *query,
                   size_t query_len);
int mg_req_set_upstream(mg_req_t *r, mg_upstream_t *u);
int mg_req_set_phases(mg_req_t *r, unsigned phases);
int mg_req_set_route(mg_req_t *r, const char *id, size_t id_len);
int mg_req_sleep(mg_req_t *r, uint32_t ms);
int mg_req_read_body(mg_req_t *r, const char **data, size_t *len);
/* After Lua read the whole body (reading consumes it): the bytes the
 * upstream gets, copied, sent with Content-Length. */
int mg_req_set_body(mg_req_t *r, const char *data, size_t len);
int mg_req_set_body_limit(mg_req_t *r, uint64_t bytes);
/* The index of the listener that accepted the request's connection (the
 * control process: 0 status, 1 admin). */
int mg_req_listener(mg_req_t *r);

/* Response */
int mg_resp_header(mg_req_t *r, const char *name, size_t name_len, size_t idx, const char **value,
                   size_t *value_len);
int mg_resp_set_header(mg_req_t *r, const char *name, size_t name_len, const char *value,
                       size_t value_len, int mode);
int mg_resp_set_header_int(mg_req_t *r, const char *name, size_t name_len, int64_t value, int mode);
int mg_resp_set_status(mg_req_t *r, int status);
int mg_resp_start(mg_req_t *r, int status, int64_t content_length);
int mg_resp_write(mg_req_t *r, const char *data, size_t len);
int mg_resp_finish(mg_req_t *r);
int mg_resp_send(mg_req_t *r, int status, const char *body, size_t len);
int mg_resp_interim(mg_req_t *r, int status, const char *headers, size_t len);

/* Upstreams: created by Lua per config version, freed through ffi.gc. */
mg_upstream_t *mg_upstream_new(const char *id, size_t id_len, uint32_t connect_ms, uint32_t send_ms,
                               uint32_t read_ms, uint32_t pool_size, uint32_t idle_ms,
                               uint32_t max_requests);
int mg_upstream_add_target(mg_upstream_t *u, const char *host, size_t host_len, int port,
                           int weight);
void mg_upstream_release(mg_upstream_t *u);

/* TLS settings of https:// calls (mg.http.request's tls = {...}, etcd's
 * config_source.tls). ca, cert, key: PEM file paths (length 0: the system
 * CA store; no client certificate); server_name: the name sent as SNI and
 * checked against the certificate (length 0: the URL's host); verify: 1
 * checks the chain and the name, 0 does not (an explicit opt-out). One
 * OpenSSL context is built per distinct (ca, cert, key, verify) and kept
 * for the process's life (at most 32 per client). */
typedef struct mg_tls_opts_s {
    const char *ca;
    const char *cert;
    const char *key;
    const char *server_name;
    size_t ca_len;
    size_t cert_len;
    size_t key_len;
    size_t server_name_len;
    int32_t verify;
} mg_tls_opts_t;

/* HTTP client (mg.http.request). The strings are copied before the call
 * returns. max_body caps the response body (0: 10 MiB); timeout_ms bounds
 * the whole exchange (0: none); tls: for an https:// url (NULL: the system
 * CA store, verify on). */
typedef struct mg_http_opts_s {
    const char *method;
    const char *url;
    const mg_header_t *headers;
    const char *body;
    size_t method_len;
    size_t url_len;
    size_t body_len;
    uint64_t max_body;
    uint32_t nheaders;
    uint32_t timeout_ms;
    const mg_tls_opts_t *tls;
} mg_http_opts_t;

/* The outcome of the request's last mg_http_request, valid until its next
 * one or the end of the request. error is NULL on success (then status,
 * headers and body are set), else a message ("timeout", "connection
 * refused", "bad response: ...") and status is 0. */
typedef struct mg_http_res_s {
    int32_t status;
    uint32_t nheaders;
    const mg_header_t *headers;
    const char *body;
    size_t body_len;
    const char *error;
    size_t error_len;
} mg_http_res_t;

/* MG_AGAIN: yield; once resumed, mg_http_result has the outcome.
 * MG_ERROR: failed at once (bad url...), mg_http_result says why.
 * MG_EINVAL: the caller's mistake (bad method or header, a wait pending),
 * mg_http_result says which. */
int mg_http_request(mg_req_t *r, const mg_http_opts_t *o);
const mg_http_res_t *mg_http_result(mg_req_t *r);

/* Redis (runtime/src/redis.c): the worker's one connection to the node's
 * `redis`, opened at the first use. */
enum { MG_REDIS_DOWN = 0, MG_REDIS_CONNECTING = 1, MG_REDIS_UP = 2 };
enum {
    MG_REDIS_NIL = 0,
    MG_REDIS_INTEGER = 1,
    MG_REDIS_STRING = 2,
    MG_REDIS_STATUS = 3,
    MG_REDIS_ERROR = 4,
    MG_REDIS_ARRAY = 5
};
/* One value of a reply. A reply is an array of these in pre-order: an
 * ARRAY's n elements follow it (each with its own elements). */
typedef struct mg_redis_value_s {
    int32_t type; /* MG_REDIS_* */
    uint32_t n;   /* ARRAY: number of elements */
    int64_t integer;
    const char *str; /* STRING, STATUS, ERROR (not NUL-terminated) */
    size_t len;
} mg_redis_value_t;
/* MG_REDIS_DOWN (commands fail at once), _CONNECTING (the first connection:
 * commands wait for it, within the timeout) or _UP. Starts connecting at the
 * first call in a worker; DOWN outside a worker. */
int mg_redis_state(void);
/* Sends a command for the request: MG_AGAIN (yield; C resumes the coroutine
 * with the outcome, within timeout_ms), MG_DECLINED (down: "redis
 * unavailable"), MG_EINVAL (no command, a command refused on the shared
 * connection, or the request already waits), MG_ERROR (out of memory). */
int mg_redis_command(mg_req_t *r, int argc, const char **argv, const size_t *argvlen);
/* The outcome, once resumed: MG_OK with the reply's values (valid until the
 * coroutine yields again or returns), or MG_ERROR with *err "timeout" or
 * "redis unavailable". MG_DECLINED: no outcome for this request now. */
int mg_redis_reply(mg_req_t *r, const mg_redis_value_t **values, size_t *n, const char **err);

/* Utilities */
double mg_time_now(void);
void mg_log_write(int level, const char *msg, size_t len);
int mg_worker_id(void);
mg_sha256_t *mg_sha256_new(void);
int mg_sha256_update(mg_sha256_t *s, const char *data, size_t len);
int mg_sha256_final(mg_sha256_t *s, unsigned char *out32);
void mg_sha256_free(mg_sha256_t *s);

/* Shared-memory zones (shm.c): created by the master before it forks the
 * workers (node config `shm`), so every worker of a node sees the same
 * memory; without a master (plain luajit, C tests) the built-in zones are
 * created in-process on first use. A zone is a hash table of fixed-size
 * entries with a lock per set of 8 entries, never a global lock. */
typedef struct mg_shm_zone_s mg_shm_zone_t;
/* The zone of that name, or NULL when the node declares none. */
mg_shm_zone_t *mg_shm_zone(const char *name, size_t name_len);
/* used: live entries; capacity: entries the zone holds; evictions: live
 * entries dropped to make room (expired ones are reused, not counted). */
int mg_shm_stats(mg_shm_zone_t *z, uint64_t *used, uint64_t *capacity, uint64_t *evictions);
/* Outside a worker (specs, tools, benchmarks): from now on the primitives'
 * time is now_us (CLOCK_MONOTONIC microseconds), until called with 0 (the
 * clock again). In a worker the time is its loop's and this returns
 * MG_EINVAL. */
int mg_shm_set_clock(int64_t now_us);

/* Rate limits (limit.c). Times are microseconds of CLOCK_MONOTONIC; now_us
 * 0 reads the clock. n: units to take (0 peeks). A refused take consumes
 * nothing. Keys longer than 64 bytes are identified by their SHA-256. */
enum { MG_LIMIT_TOKEN_BUCKET = 1, MG_LIMIT_FIXED_WINDOW = 2, MG_LIMIT_SLIDING_WINDOW = 3 };

typedef struct mg_limit_spec_s {
    int algorithm;     /* MG_LIMIT_* */
    double limit;      /* windows: units per window; token bucket: burst (bucket size) */
    double rate;       /* token bucket: units refilled per second */
    int64_t window_us; /* windows: window length */
} mg_limit_spec_t;

typedef struct mg_limit_result_s {
    int allowed;
    double limit;
    double remaining;   /* units left after this take (floored) */
    double reset;       /* seconds until the full limit is available again */
    double retry_after; /* refused: seconds until this take could pass; -1 never (n > limit) */
} mg_limit_result_t;

int mg_limit_take(mg_shm_zone_t *z, const char *key, size_t key_len, const mg_limit_spec_t *spec,
                  double n, int64_t now_us, mg_limit_result_t *out);
/* All levels or none: takes n from every (zones[i], keys[i], specs[i]) when
 * each admits it, else from none. Returns 0 when admitted, i + 1 for the
 * first level i that refused, or a negative error. out[i] is filled for
 * every level (what it would have left, had the take been admitted).
 * count <= 8. */
int mg_limit_take_all(mg_shm_zone_t *const *zones, const char *const *keys, const size_t *key_lens,
                      const mg_limit_spec_t *const *specs, uint32_t count, double n, int64_t now_us,
                      mg_limit_result_t *out);
/* One slot of a concurrency limit, held by the request until it ends (its
 * log phase ran, or it was aborted). 0 admitted, MG_DECLINED at max (then
 * nothing is held); *current: holders after the call. At most 4 per request. */
int mg_limit_conc_acquire(mg_req_t *r, mg_shm_zone_t *z, const char *key, size_t key_len,
                          uint32_t max, int64_t *current);

/* Circuit breakers (breaker.c): node-wide state per key (an upstream
 * target). Acquire before using the target, report when the exchange ends. */
enum { MG_BREAKER_CLOSED = 0, MG_BREAKER_OPEN = 1, MG_BREAKER_HALF_OPEN = 2 };

typedef struct mg_breaker_conf_s {
    uint32_t window_ms;    /* rolling window of 10 buckets */
    uint32_t min_requests; /* calls in the window before it may open */
    double failure_rate;   /* opens at failures / calls >= this */
    uint32_t slow_ms;      /* a call this long is slow; 0: none is */
    double slow_rate;      /* opens at slow / calls >= this; 0: never */
    uint32_t open_ms;      /* how long it stays open */
    uint32_t max_open_ms;  /* > open_ms: each reopen doubles open_ms up to this */
    uint32_t probes;       /* concurrent calls admitted half-open */
    uint32_t close_after;  /* consecutive probe successes that close it */
} mg_breaker_conf_t;

typedef struct mg_breaker_result_s {
    int allowed;
    int probe;          /* admitted as a half-open probe: report with was_probe */
    int state;          /* MG_BREAKER_* after the call */
    double retry_after; /* refused: seconds until a probe may pass */
} mg_breaker_result_t;

int mg_breaker_acquire(mg_shm_zone_t *z, const char *key, size_t key_len,
                       const mg_breaker_conf_t *conf, int64_t now_us, mg_breaker_result_t *out);
/* failed: the call failed (a slow call is told by duration_ms >= slow_ms). */
int mg_breaker_report(mg_shm_zone_t *z, const char *key, size_t key_len,
                      const mg_breaker_conf_t *conf, int failed, double duration_ms, int was_probe,
                      int64_t now_us);
/* MG_BREAKER_* (an open breaker past its open time reads half-open), or a
 * negative error. Unknown keys are closed. */
int mg_breaker_state(mg_shm_zone_t *z, const char *key, size_t key_len, int64_t now_us);
/* Base64 (standard alphabet, padded: what etcd's JSON gateway sends).
 * out must hold 3 * (len / 4) bytes; *out_len gets the decoded length.
 * MG_EINVAL: not base64 (a length that is not a multiple of 4, a bad
 * character). O(len), through OpenSSL's EVP_DecodeBlock. */
int mg_base64_decode(const char *in, size_t len, unsigned char *out, size_t *out_len);

/* Breakers in the proxy path (the circuit-breaker policy; proxy_breaker.c):
 * a conf, the response statuses that count as failures (100..999) and a
 * zone, made once per config version (freed through ffi.gc) and attached
 * to a request in access. The proxy then acquires, for the target it
 * picks, the breaker of key "<upstream id>/<host>:<port>" in that zone,
 * skips targets it refuses, answers 503 when none admits, and reports the
 * exchange once it ends. NULL: a bad conf, zone or status. A request holds
 * a reference until it ends; set_breaker with NULL detaches. */
typedef struct mg_upstream_breaker_s mg_upstream_breaker_t;
mg_upstream_breaker_t *mg_upstream_breaker_new(mg_shm_zone_t *z, const mg_breaker_conf_t *conf,
                                               const int *failure_statuses, size_t nstatuses);
void mg_upstream_breaker_release(mg_upstream_breaker_t *b);
int mg_req_set_breaker(mg_req_t *r, mg_upstream_breaker_t *b);

/* SHA-1 as 40 lowercase hex digits (Redis script ids). */
int mg_sha1_hex(const char *data, size_t len, char *out40);

/* The config channel between the control process and the workers
 * (channel.c): length-prefixed frames over a unix socket. A worker pulls
 * the frames the control process sent, in order (MG_OK; MG_DECLINED when
 * none is queued; *data stays valid until the next call), and answers
 * (copied; at most 64 KiB, MG_EINVAL beyond; MG_DECLINED while not
 * connected: the answer is sent again on reconnecting). The control
 * process sends to a peer by the id its handler's peer() was given
 * (copied; MG_DECLINED: no such peer). */
int mg_cfg_next(const char **data, size_t *len);
int mg_cfg_send(const char *data, size_t len);
int mg_ctl_send(uint32_t peer, const char *data, size_t len);
/* The last config version number the node handed out, kept by the master
 * across control process respawns (0 at start). */
double mg_ctl_version_get(void);
void mg_ctl_version_set(double version);
/* The etcd config source of the control process (control_etcd.c): starts
 * the driver (one per process: MG_EINVAL when started already, outside
 * the control process, or given no endpoint; endpoints "\n"-separated,
 * http:// or https://). key/end: the watched range, base64. auth_body: the
 * /v3/auth/authenticate JSON body, or length 0 (no auth). tls: for the
 * https:// endpoints (NULL: the system CA store, verify on). On failure
 * err (errlen bytes) says why (a TLS file that cannot be read...). Its
 * events go to control.source_event(ev, data) from the loop. rerange:
 * read the prefix again (SIGHUP); MG_DECLINED when no driver runs. */
int mg_ctl_etcd_start(const char *endpoints, size_t endpoints_len, const char *key_b64,
                      size_t key_len, const char *end_b64, size_t end_len, const char *auth_body,
                      size_t auth_len, uint32_t timeout_ms, const mg_tls_opts_t *tls, char *err,
                      size_t errlen);
int mg_ctl_etcd_rerange(void);
/* Route lookup (route.c): the walk of the segment tries that
 * lua/moongate/router.lua compiles (its "Layout" and "records" comments
 * give the arrays' shapes; MG_RT_* are the numbers both sides use). Lua
 * fills a mg_route_walk_t (router, path, room) and calls
 * mg_route_find(w, host, host_len) (host NULL: none): C looks up the
 * Host's buckets (exact, then wildcards), adds the host-less one, and
 * walks them: MG_ROUTE_DONE with w->best the winning entry (0: none), its
 * rank code and where its pattern ended; or MG_ROUTE_CHECK when entry
 * w->check has predicates (methods, headers, query: Lua's), and Lua calls
 * mg_route_resume(w, passed) with 1 or 0 until DONE. The walk's arrays
 * are Lua's: bnd_i, bnd_g, seg_h path_len + 2 int32 each, stk 3 times
 * that, roots 2 * host_len + 2. After DONE, segment d of the path is the
 * bytes (bnd_i[d], bnd_i[d + 1]) exclusive, when nb > 0. Reads the router
 * only: any number of walks may share it. */
enum {
    MG_ROUTE_DONE = 0,
    MG_ROUTE_CHECK = 1,
    MG_RT_NODE = 16,     /* int32 slots of a node */
    MG_RT_XREC = 16,     /* int32 slots of a record */
    MG_RT_N_XDEPTH = 12, /* a root node's deepest prefix record (bnd_i index) */
    MG_RT_N_XSHAPED = 13 /* 1: a root node with parameter records (xshp) */
};
typedef struct mg_router_s {
    const int32_t *nodes;      /* MG_RT_NODE int32 a node */
    const int32_t *karr;       /* children's tables */
    const uint8_t *labels;     /* segments and paths not held inline */
    const int32_t *xrec;       /* records (MG_RT_XREC int32 each), or NULL */
    const int32_t *xbits;      /* their filter */
    const int32_t *xshp;       /* (root, segment count, shapes) triples */
    const int32_t *ranks;      /* entry -> rank code */
    const int32_t *next_entry; /* entry -> the next of its chain, or 0 */
    int32_t mult;              /* segment hash multiplier */
    int32_t xmask, xbmask, xshp_mask, xp_inline;
    const int32_t *hosts;      /* host buckets: (key, length * 4 + kind, root, offset) */
    const uint8_t *host_bytes; /* their names (offset) */
    int32_t hosts_mask;        /* slots - 1, or -1: no host bucket */
    int32_t wild;              /* 1: some wildcard suffixes, 2: prefixes (or both) */
    int32_t none;              /* the bucket of the routes without hosts, or 0 */
    uint32_t sfx_lens[8];      /* the lengths of wildcard suffixes (".example.com") */
    uint32_t pfx_lens[8];      /* and prefixes ("example."), 0-255; longer: any */
} mg_router_t;
typedef struct mg_route_walk_s {
    const mg_router_t *rt;
    const char *path;
    int32_t path_len;
    int32_t nroots;
    int32_t *roots;
    int32_t *bnd_i, *bnd_g, *seg_h, *stk;
    int32_t nb;
    int32_t best, best_rank, best_end;
    int32_t check;
    /* where a walk stopped for a check (route.c's own) */
    int32_t at, crank, cend, k, i, d, ri, sp, kb, shapes, xbase, xcons;
} mg_route_walk_t;
int mg_route_find(mg_route_walk_t *w, const char *host, int32_t host_len);
int mg_route_resume(mg_route_walk_t *w, int passed);
/* MG_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif
