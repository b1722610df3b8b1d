/* mg.h: the worker's internal objects (connections, requests, upstreams).
 *
 * Ownership: a worker owns its connections; a downstream connection owns at
 * most one request at a time (pipelined requests wait unparsed in its
 * buffer, so responses leave in order); a request borrows one upstream
 * connection from its target's pool while it proxies.
 */
#ifndef MG_MG_H
#define MG_MG_H

#include <stdint.h>
#include <uv.h>

#include "llhttp.h"
#include "log.h"
#include "moongate.h"
#include "node.h"
#include "worker.h"

struct lua_State;

#define MG_MAX_HEADERS 128   /* more fields than this: 431 */
#define MG_BODY_SPACE 32768  /* buffer room for body bytes after the head */
#define MG_OUT_IOV 64        /* gather entries per write */
#define MG_HIGH_WATER 262144 /* Lua writes above this queue wait for drain */

typedef struct mg_worker_s mg_worker_t;
typedef struct mg_conn_s mg_conn_t;
typedef struct mg_upconn_s mg_upconn_t;
typedef struct mg_target_s mg_target_t;

/* A doubly linked list node (intrusive, circular, with a head sentinel). */
typedef struct mg_link_s {
    struct mg_link_s *next, *prev;
} mg_link_t;

static inline void mg_list_init(mg_link_t *h)
{
    h->next = h->prev = h;
}
static inline int mg_list_empty(const mg_link_t *h)
{
    return h->next == h;
}
static inline void mg_list_insert_head(mg_link_t *h, mg_link_t *n)
{
    n->next = h->next;
    n->prev = h;
    h->next->prev = n;
    h->next = n;
}
static inline void mg_list_remove(mg_link_t *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = n->prev = n;
}
#define mg_container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* A timeout that costs a store to set or clear (deadline.c): the uv timer
 * is moved only when the deadline comes earlier than it is armed for. The
 * timer must stay first (the callback casts); timer.data is the owner. */
typedef struct mg_deadline_s {
    uv_timer_t timer;
    uint64_t due;   /* loop time (ms) it expires at; 0: none */
    uint64_t armed; /* loop time the uv timer fires at; 0: not running */
    void (*expired)(struct mg_deadline_s *d);
} mg_deadline_t;
void mg__deadline_init(mg_deadline_t *d, uv_loop_t *loop, void *owner,
                       void (*expired)(mg_deadline_t *));
void mg__deadline_set(mg_deadline_t *d, uint64_t ms); /* ms 0: no deadline */

/* Gathered output for one write: views of data that stays put until the
 * write completes, plus the chunk framing bytes it needs. */
typedef struct mg_out_s {
    uv_buf_t iov[MG_OUT_IOV];
    char frames[MG_OUT_IOV / 2][12];
    int n;
    int nframes;
    size_t bytes;
    uv_write_t wreq;
    int pending; /* a uv_write is in flight */
} mg_out_t;

/* A header edit requested by Lua (copied into the request's arena). */
typedef struct mg_hedit_s {
    struct mg_hedit_s *next;
    const char *name;
    const char *value;
    uint32_t name_len;
    uint32_t value_len;
    int mode; /* MG_HDR_* */
} mg_hedit_t;

typedef struct mg_arena_block_s {
    struct mg_arena_block_s *next;
    size_t used, cap;
    char data[];
} mg_arena_block_t;

/* Per-request bump allocator for strings Lua hands us; the first block is
 * embedded in the pooled request so most requests never call malloc. */
typedef struct mg_arena_s {
    mg_arena_block_t *extra;
    size_t used;
    _Alignas(16) char first[2048];
} mg_arena_t;

enum mg_body_mode { MG_BODY_NONE = 0, MG_BODY_LENGTH, MG_BODY_CHUNKED };
enum mg_sink { MG_SINK_NONE = 0, MG_SINK_PROXY, MG_SINK_LUA, MG_SINK_DISCARD };
enum mg_wait {
    MG_WAIT_NONE = 0,
    MG_WAIT_SLEEP,
    MG_WAIT_BODY,
    MG_WAIT_DRAIN,
    MG_WAIT_HTTP,  /* mg_http_request: the client's on_done resumes */
    MG_WAIT_REDIS, /* a Redis command's reply or failure (redis.c) */
};

enum mg_req_state {
    MG_REQ_HEAD = 0, /* reading the request head */
    MG_REQ_ACCESS,   /* Lua access phase running */
    MG_REQ_PROXY,    /* talking to the upstream */
    MG_REQ_LOCAL,    /* Lua (a policy, the mock) is answering */
    MG_REQ_DONE,     /* response complete */
};

typedef struct mg_req_s {
    mg_req_view_t v; /* must stay first: Lua casts mg_req_t* to it */
    mg_conn_t *conn;
    mg_header_t hdrs[MG_MAX_HEADERS];
    mg_hedit_t *req_edits, *req_edits_tail;
    mg_hedit_t *resp_edits, *resp_edits_tail;
    mg_arena_t arena;
    const char *uri; /* request-target as received */
    uint32_t uri_len;
    const char *abs_host; /* authority of an absolute-form target */
    uint32_t abs_host_len;
    int has_query;
    const char *up_path; /* rewritten path for the upstream, or NULL */
    const char *up_query;
    uint32_t up_path_len, up_query_len;
    int up_query_set;
    const char *route_id;
    uint32_t route_id_len;
    mg_upstream_t *upstream;
    mg_upconn_t *up;
    mg_target_t *target;
    unsigned phases;
    int state;
    int tries;
    /* request body */
    int body_mode;
    int sink;
    int body_done;          /* the parser saw the end of the body */
    int body_error;         /* status the body failed with (413, 400) */
    uint64_t body_received; /* decoded body bytes */
    uint64_t body_limit;    /* 413 past this: the node limit, or a route's lower one */
    mg_out_t body_spans;    /* body views for Lua, taken one at a time */
    int span_idx;
    int expect_continue;
    int continue_sent;
    int up_chunked;       /* the body goes upstream chunked */
    const char *lua_body; /* mg_req_set_body's copy (arena), sent instead */
    size_t lua_body_len;
    int lua_body_set;
    int last_chunk_queued; /* ...and its last chunk was queued */
    /* response */
    int resp_started;  /* head queued to the client */
    int resp_finished; /* last byte queued */
    int resp_chunked;  /* we frame the body as chunked */
    int resp_close;    /* close after the body (close-delimited or error) */
    int resp_no_body;  /* HEAD, 1xx, 204, 304 */
    int64_t resp_length;
    uint64_t resp_sent;
    char *head_buf; /* response or upstream request head being written */
    size_t head_len, head_cap;
    int lua_status;       /* status set by a policy, or 0 */
    int hf_ran;           /* header_filter started for this request (never twice) */
    int fail_status;      /* a gateway error answer waiting for header_filter, or 0 */
    const char *fail_msg; /* its message (a string literal) */
    char *fblock;         /* body_filter output being written (one per flush) */
    /* Lua */
    struct co_slot_s *co_slot; /* the coroutine running this request's phase */
    int wait;                  /* MG_WAIT_*: what a yielded phase waits for */
    int lua_phase;             /* the phase the coroutine runs, or 0 */
    int lua_busy;              /* a phase started and has not returned */
    int log_ran;
    int done;
    uv_timer_t sleep_timer;
    int sleep_timer_init;
    struct mg_redis_cmd_s *redis_cmd; /* the command it waits on (MG_WAIT_REDIS) */
    uint64_t start_ns;
    uint64_t up_start_ns;
    uint64_t up_ns;
    struct mg_http_op_s *http; /* mg.http.request's call and result, or NULL */
    /* circuit breaker (proxy_breaker.c): brk NULL on routes without one;
     * brk_key set from acquire until the one report of the exchange */
    mg_upstream_breaker_t *brk;
    const char *brk_key; /* the acquired target's key (the upstream's copy) */
    uint32_t brk_key_len;
    int brk_probe;         /* admitted as a half-open probe */
    int brk_head;          /* 0: no response head yet; 1: a success status; 2: a failure one */
    double brk_head_ms;    /* acquire to response head */
    uint64_t brk_start_ns; /* acquire */
    /* concurrency-limit slots held until the request ends (limit.c) */
    struct {
        mg_shm_zone_t *zone;
        uint32_t slot;
    } conc[4];
    int nconc;
    mg_link_t free_link;
} mg_req_t;

typedef struct mg_conn_s {
    uv_tcp_t tcp;        /* must be first: handle->data is not used for the cast */
    mg_deadline_t timer; /* header, body, send, keep-alive and linger timeouts */
    llhttp_t parser;
    mg_worker_t *w;
    mg_req_t *req;
    char *buf;
    uint32_t cap, len, pos; /* buf[pos..len) is unparsed */
    uint32_t body_base;     /* where body bytes may start (after the head) */
    uint32_t head_bytes;    /* header bytes seen in this request's head */
    int reading;
    int closing;
    int lingering;     /* closing: reading and dropping for a moment */
    int eof;           /* the client half-closed: no more bytes will come */
    int head_timer_on; /* the header timeout runs for this request */
    int inflight;      /* uv_writes not completed */
    int head_done;     /* the current request's head is complete */
    int keepalive;     /* after the current response */
    int hdr_state;     /* 0 none, 1 in field, 2 in value */
    int error_status;  /* set by a parser callback that rejects the request */
    uint32_t nrequests;
    mg_out_t out;
    mg_link_t link;
    uv_shutdown_t shut;
    int handles_open;
    uint16_t remote_port;
    int listener; /* index of the listener that accepted it (mg_req_listener) */
    char remote_addr[48];
} mg_conn_t;

typedef struct mg_target_s {
    mg_link_t link; /* in the worker's target list */
    char host[64];
    int port;
    struct sockaddr_storage addr;
    mg_link_t idle; /* idle upstream connections, most recent first */
    uint32_t nidle;
    uint32_t pool_size;
    uint32_t idle_ms;
    uint32_t max_requests;
} mg_target_t;

typedef struct mg_upstream_s {
    int refs;
    char id[128];
    uint32_t connect_ms, send_ms, read_ms;
    uint32_t pool_size, idle_ms, max_requests;
    int ntargets;
    struct {
        mg_target_t *t;
        int weight;
        int current;   /* smooth weighted round robin (as nginx does) */
        char *brk_key; /* "<upstream id>/<host>:<port>": its breaker's key */
        uint32_t brk_key_len;
    } targets[64];
} mg_upstream_t;

/* A circuit-breaker policy's conf for the proxy (mg_upstream_breaker_new):
 * owned by Lua's handle and by each request it is attached to. */
struct mg_upstream_breaker_s {
    int refs;
    mg_shm_zone_t *zone;
    mg_breaker_conf_t conf;
    uint8_t failure[125]; /* bit s: status s (0..999) is a failure */
};

typedef struct mg_upconn_s {
    uv_tcp_t tcp;
    mg_deadline_t timer; /* connect, send, read and idle timeouts */
    uv_connect_t connect_req;
    llhttp_t parser;
    mg_target_t *target;
    mg_req_t *req;
    mg_link_t link; /* in target->idle while idle */
    char *buf;
    uint32_t cap, len, pos, body_base;
    mg_header_t hdrs[MG_MAX_HEADERS];
    uint32_t nhdrs;
    const char *reason;
    uint32_t reason_len;
    int hdr_state;
    int connected;
    int reused;    /* served a request before this one */
    int got_bytes; /* some response bytes arrived for this request */
    int head_done; /* final response head parsed */
    int msg_done;  /* response complete */
    int keepalive; /* may go back to the pool */
    int close_delimited;
    int interim;      /* parsing a 1xx */
    int exec_pending; /* paused: the parser may go on without more bytes */
    int head_sent;    /* the final head went to the client */
    int closing;
    int reading;
    int handles_open;
    uint32_t nrequests;
    uint32_t head_bytes;
    mg_out_t out; /* request head + body towards the upstream */
} mg_upconn_t;

struct mg_worker_s {
    uv_loop_t *loop;
    const mg_node_conf_t *conf;
    int id;
    int nlisten;
    uv_tcp_t listeners[MG_MAX_LISTEN];
    int listener_tag[MG_MAX_LISTEN]; /* listeners[i]'s index in the fds the process got */
    int listening;                   /* uv_listen done: accepting connections */
    uv_signal_t sig_hup, sig_quit, sig_term, sig_int;
    uv_timer_t drain_timer;
    uv_timer_t ppid_timer;
    int draining;
    int stopping;
    mg_link_t conns;
    uint32_t nconns;
    mg_link_t targets;
    mg_link_t free_reqs;
    uint32_t nfree_reqs;
    char **free_bufs;
    uint32_t nfree_bufs, free_bufs_cap;
    uint32_t buf_size;
    uint64_t rid_seed, rid_counter;
    struct lua_State *L;
    int ref_access, ref_header_filter, ref_body_filter, ref_log, ref_reload, ref_peer;
    int ref_access_error; /* the handler's access_error(rp, err), or -1 (lua.c) */
    mg_link_t free_cos;
    llhttp_settings_t req_settings, resp_settings;
    int reload_pending;
    int mock;
    struct mg_http_client_s *http; /* mg.http.request's client, made on first use */
    int role;                      /* MG_ROLE_* (worker.h) */
};

extern mg_worker_t *mg__worker; /* one worker per process */

/* growing buffers, /proc/<pid>/stat (util.c) */
int mg__grow(char **buf, size_t *cap, size_t used, size_t more, size_t first, size_t max);
const char *mg__proc_stat(pid_t pid, char *buf, size_t size); /* /proc/<pid>/stat from state on */

/* buffers (worker.c) */
char *mg__buf_get(mg_worker_t *w);
void mg__buf_put(mg_worker_t *w, char *b);
uint64_t mg__now_ns(void);

/* output gathering (out.c) */
void mg__out_reset(mg_out_t *o);
int mg__out_room(const mg_out_t *o); /* iov entries left */
void mg__out_add(mg_out_t *o, const char *p, size_t len);
void mg__out_add_chunk(mg_out_t *o, const char *p, size_t len); /* chunk framing */
void mg__out_add_last_chunk(mg_out_t *o);
/* 0: all written now; 1: pending, cb runs later; <0: error */
int mg__out_flush(mg_out_t *o, uv_stream_t *s, uv_write_cb cb);

/* worker (worker.c) */
int mg__worker_init(const mg_node_conf_t *conf, int role, int worker_id);
void mg__worker_drained(mg_worker_t *w); /* the last connection closed */
int mg__worker_listen(mg_worker_t *w);   /* start accepting (a worker: once it has a config) */
void mg__worker_fatal(mg_worker_t *w, int code); /* stop at once with this exit code */

/* the config channel (channel.c) */
int mg__chan_listen(mg_worker_t *w);  /* control process: accept workers */
int mg__chan_connect(mg_worker_t *w); /* worker: connect (retrying) to the control process */
void mg__chan_close(mg_worker_t *w);  /* stop: close the channel's handles */

/* the control process (control.c) */
int mg__control_start(mg_worker_t *w);                       /* channel, file watch */
void mg__control_reload(mg_worker_t *w, const char *reason); /* SIGHUP, a file change */
void mg__control_stop(mg_worker_t *w);
void mg__control_etcd_stop(void); /* the etcd driver, if one runs (control_etcd.c) */

/* downstream connections (conn.c) */
void mg__conn_accept(uv_stream_t *server, int status);
mg_conn_t *mg__conn_open_fd(mg_worker_t *w, int fd); /* an already connected socket */
void mg__conn_close(mg_conn_t *c);
void mg__conn_pump(mg_conn_t *c);     /* move request body to its sink */
int mg__conn_body_step(mg_conn_t *c); /* Lua's body reads */
void mg__conn_req_done(mg_conn_t *c); /* response complete and written */
void mg__conn_drain_idle(mg_worker_t *w);
void mg__conn_settings(llhttp_settings_t *s);
int mg__header_finish(mg_header_t *h); /* validate and trim a parsed header */
/* header span states; the span functions return -1 for too many fields
 * (name) or obs-fold (value) */
enum { HS_NONE = 0, HS_FIELD, HS_VALUE, HS_VALUE_DONE };
int mg__header_name_span(mg_header_t *hdrs, uint32_t n, int *state, const char *at, size_t len);
int mg__header_value_span(mg_header_t *h, int *state, const char *at, size_t len);
int mg__conn_write_copy(mg_conn_t *c, const char *p, size_t len);
int mg__conn_flush(mg_conn_t *c); /* c->out: 0 done, 1 pending, <0 failed */
void mg__conn_written(mg_conn_t *c);
size_t mg__conn_queued(mg_conn_t *c);

/* requests (req.c) */
mg_req_t *mg__req_new(mg_conn_t *c);
void mg__req_free(mg_req_t *r);
void mg__req_abort(mg_req_t *r);
void mg__req_run(mg_req_t *r);                           /* head parsed: access phase and on */
void mg__req_phase_done(mg_req_t *r, int phase, int rc); /* a Lua phase returned */
void mg__req_fail(mg_req_t *r, int status, const char *msg);
void mg__req_maybe_done(mg_req_t *r);
int mg__req_head_write(mg_req_t *r, int status, const char *reason, size_t reason_len,
                       const mg_header_t *h, uint32_t nh, int64_t len);
void mg__req_body_event(mg_req_t *r); /* body bytes or end for a waiting Lua */
void mg__req_client_drained(mg_req_t *r);
void *mg__arena_alloc(mg_arena_t *a, size_t len);
char *mg__arena_dup(mg_arena_t *a, const char *p, size_t len);
int mg__head_grow(mg_req_t *r, size_t more); /* realloc: the rare path */
/* room for `more` bytes in r->head_buf; 0, or -1 out of memory */
static inline int mg__head_reserve(mg_req_t *r, size_t more)
{
    return r->head_len + more <= r->head_cap ? 0 : mg__head_grow(r, more);
}
int mg__head_add(mg_req_t *r, const char *p, size_t len);
int mg__head_header(mg_req_t *r, const char *n, size_t nl, const char *v, size_t vl);
int mg__edited(const mg_hedit_t *e, const char *name, size_t len);
int mg__hop_by_hop(const char *name, size_t len);
int mg__named_in_connection(const mg_header_t *h, uint32_t nh, const char *name, size_t len);
/* ASCII case folding without the locale: strncasecmp cost a call and a
 * locale lookup for every header name compared (about 16 per proxied
 * request); this is inlined and stops at the first differing byte. */
extern const unsigned char mg__lower[256];
static inline int mg__strieq(const char *a, size_t alen, const char *b, size_t blen)
{
    if (alen != blen) return 0;
    for (size_t i = 0; i < alen; i++)
        if (mg__lower[(unsigned char)a[i]] != mg__lower[(unsigned char)b[i]]) return 0;
    return 1;
}
/* RFC 9110 tchar (a field name's characters): 1, else 0 */
extern const unsigned char mg__tchar[256];
/* A field value holds no control character but HTAB (nor DEL). 1: it does
 * not; 8 bytes a step (values like Date are ~30 bytes, every response). */
int mg__value_ok(const char *v, size_t len);
/* Writes v in decimal at d (room for 20 digits); returns the length. */
size_t mg__u64_dec(char *d, uint64_t v);
/* The field names a head's Connection headers list, gathered once per head
 * so each field is checked against a few tokens instead of re-parsing every
 * Connection value per field. "keep-alive" is left out (that field is
 * hop-by-hop anyway): the usual "Connection: keep-alive" yields none. */
#define MG_CONN_TOKENS 16
typedef struct mg_conn_tokens_s {
    const char *p[MG_CONN_TOKENS];
    uint32_t len[MG_CONN_TOKENS];
    int n;
    int overflow; /* more than MG_CONN_TOKENS: ask mg__named_in_connection */
} mg_conn_tokens_t;
void mg__conn_tokens(mg_conn_tokens_t *t, const mg_header_t *h, uint32_t nh);
static inline int mg__conn_token_has(const mg_conn_tokens_t *t, const mg_header_t *h, uint32_t nh,
                                     const char *name, size_t len)
{
    if (t->overflow) return mg__named_in_connection(h, nh, name, len);
    for (int i = 0; i < t->n; i++)
        if (mg__strieq(t->p[i], t->len[i], name, len)) return 1;
    return 0;
}
/* a token name and a value without CR, LF, NUL or other controls but HTAB */
int mg__token_ok(const char *n, size_t nl);
int mg__header_valid(const char *n, size_t nl, const char *v, size_t vl);
const char *mg__status_reason(int status);
void mg__access_log(mg_req_t *r);

/* proxying (proxy.c) */
void mg__proxy_start(mg_req_t *r);
int mg__proxy_flush_body(mg_req_t *r); /* 0 written, 1 pending, -1 failed */
void mg__proxy_body_sent(mg_req_t *r);
void mg__proxy_header_filter_done(mg_req_t *r);
void mg__proxy_client_drained(mg_req_t *r);
void mg__proxy_release(mg_req_t *r); /* back to the pool, or closed */
void mg__proxy_abort(mg_req_t *r);
void mg__proxy_resp_settings(llhttp_settings_t *s);

/* circuit breakers in the proxy path (proxy_breaker.c) */
int mg__breaker_pick(mg_req_t *r, int first); /* target index, or -1: r was answered 503 */
void mg__breaker_head(mg_req_t *r, int status);
void mg__breaker_end(mg_req_t *r, int failed);
void mg__breaker_detach(mg_req_t *r); /* the request ends */
void mg__targets_close(mg_worker_t *w);

/* mg.http.request (req_http.c) */
void mg__req_http_release(mg_req_t *r); /* cancels a pending call, frees the result */

/* Redis (redis.c) */
void mg__redis_detach(mg_req_t *r); /* the request ends: a later reply must not reach it */

/* Lua (lua.c) */
int mg__lua_init(mg_worker_t *w);
void mg__lua_close(mg_worker_t *w);
void mg__lua_start(mg_req_t *r, int phase);
void mg__lua_resume(mg_req_t *r);
void mg__lua_release(mg_req_t *r);
/* runs the handler's reload(reason) in a sliced coroutine (one at a time:
 * one asked for meanwhile runs after it) */
void mg__lua_reload(mg_worker_t *w, const char *reason);
/* control process: the handler's peer(id, message); message NULL: gone */
void mg__lua_peer(mg_worker_t *w, uint32_t id, const char *data, size_t len);
int mg__lua_body_filter(mg_req_t *r, const char *p, size_t len, int eof, const char **out,
                        size_t *out_len);
void mg__lua_body_filter_done(mg_req_t *r);

#define MG_LUA_ACCESS 1
#define MG_LUA_HEADER_FILTER 2
#define MG_LUA_LOG 3

#endif
