/* etcd.h: the etcd v3 driver of the control process (one connection per
 * node, whatever the number of workers).
 *
 * It speaks etcd's JSON gateway (POST /v3/kv/range, the endless POST
 * /v3/watch stream, /v3/auth/authenticate) through the runtime's HTTP
 * client (http_client.h) on the control process's loop, and owns the
 * connection's state machine:
 *
 *   [auth] -> range (one revision R) -> watch from R+1 (endless)
 *      ^            |                       |
 *      |            v  failure              v  stream ended, failure
 *      +------ backoff (next endpoint) <----+
 *                   ^                       |  compacted (sink: RERANGE)
 *                   +-- range again <-------+
 *
 * It parses no JSON: bodies and stream pieces go to a sink (the control
 * process's Lua, lua/moongate/etcd_source.lua, through the Lua C API), which
 * answers what to do next (the revision read, RERANGE...). The sink runs
 * from loop callbacks only, never from inside an FFI call.
 *
 * Failures: the next endpoint is tried at once until each was tried in this
 * round; then the driver waits a random delay in [0, min(5 s, 100 ms *
 * 2^round)] ("full jitter": many nodes that lost etcd together do not come
 * back in step) and starts a new round. With a user, the token is dropped
 * on any failure and asked for again (an expired or revoked token then
 * costs one extra request per reconnection, no parsing of error texts).
 */
#ifndef MG_ETCD_H
#define MG_ETCD_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "moongate.h"

typedef struct mg_etcd_s mg_etcd_t;

/* What the sink is told. */
enum {
    MG_ETCD_EV_AUTH = 1,         /* data: the /v3/auth/authenticate body; answer: the token */
    MG_ETCD_EV_RANGE = 2,        /* data: the whole /v3/kv/range body; answer: its revision */
    MG_ETCD_EV_WATCH = 3,        /* data: a piece of the watch stream, cut anywhere */
    MG_ETCD_EV_LOST = 4,         /* data: why (once per loss: the first failure after a success) */
    MG_ETCD_EV_BACK = 5,         /* data: the endpoint (a range succeeded after a loss) */
    MG_ETCD_EV_START_TIMEOUT = 6 /* data: the last error; no range succeeded within
                                    timeout_ms of the start (the driver goes on trying) */
};

/* What the sink answers (its return value). */
enum {
    MG_ETCD_OK = 0,      /* go on */
    MG_ETCD_FAIL = -1,   /* the body makes no sense: count it as a failure, reconnect */
    MG_ETCD_RERANGE = -2 /* WATCH: history compacted (or the watch was cancelled):
                            read everything again */
};

/* The sink. For RANGE it returns the revision read (> 0) or a negative
 * answer; for WATCH, MG_ETCD_OK, or the highest revision applied so far
 * (> 0: a new watch resumes after it), or a negative answer; for AUTH, OK
 * with the token written to tok (at most tok_cap bytes, *tok_len set);
 * the others' answers are ignored. */
typedef struct mg_etcd_sink_s {
    int64_t (*event)(void *ud, int ev, const char *data, size_t len, char *tok, size_t tok_cap,
                     size_t *tok_len);
    void *ud;
} mg_etcd_sink_t;

typedef struct mg_etcd_opts_s {
    const char *const *endpoints; /* "http://host:port" or "https://host:port" each */
    int nendpoints;
    const char *key_b64; /* the range [key, range_end), base64 as the gateway wants */
    const char *end_b64;
    const char *auth_body;    /* {"name":..,"password":..} as JSON text, or NULL: no auth */
    uint32_t timeout_ms;      /* connect and silence limit of one call; the start deadline */
    uint32_t backoff_min_ms;  /* 0: 100 */
    uint32_t backoff_max_ms;  /* 0: 5000 */
    const mg_tls_opts_t *tls; /* for https:// endpoints; NULL: system CA store, verify on.
                                 Its context is built at start, once */
    char *err;                /* out: why mg__etcd_start returned NULL (errlen bytes) */
    size_t errlen;
} mg_etcd_opts_t;

/* Starts the driver on loop: the first call goes out at once. Copies what
 * it keeps of opts. NULL (opts->err says why): no memory, an endpoint
 * that is not http:// or https://, a TLS setting that does not load. */
mg_etcd_t *mg__etcd_start(uv_loop_t *loop, const mg_etcd_opts_t *opts, const mg_etcd_sink_t *sink);
/* Reads everything again (a SIGHUP): the call in flight is dropped and a
 * range starts on the next loop turn. Safe from inside the sink. */
void mg__etcd_rerange(mg_etcd_t *e);
/* Stops: no sink call after this; the handles close on the next loop turn.
 * Not from inside the sink. */
void mg__etcd_stop(mg_etcd_t *e);

typedef struct mg_etcd_stats_s {
    uint64_t ranges;   /* ranges that succeeded */
    uint64_t watches;  /* watch streams that began (200 received) */
    uint64_t failures; /* calls that failed */
    uint64_t connects; /* TCP connections opened */
    int endpoint;      /* index of the endpoint in use */
    int up;            /* 1: the last call succeeded or a watch is open */
} mg_etcd_stats_t;
void mg__etcd_stats(const mg_etcd_t *e, mg_etcd_stats_t *st);

#endif
