-- The FFI binding of runtime/include/moongate.h: one cdef, one library
-- handle. Every module that calls C goes through here.
--
-- Inside the gateway the mg_* symbols are already in the process (the
-- executable links libmoongate), so ffi.C has them. Plain luajit (busted
-- specs, tools) loads the library: $MOONGATE_LIB, then build/ next to this
-- tree, then the system paths; the error names every path it tried.

local ffi = require("ffi")

local pcall = pcall
local concat = table.concat
local os_getenv = os.getenv

local _M = {}

-- Mirrors runtime/include/moongate.h between MG_CDEF_BEGIN and MG_CDEF_END
-- (spec/01-unit/ffi_spec.lua checks that they stay equal).
_M.cdef = [[
enum {
    MG_OK = 0,
    MG_ERROR = -1,
    MG_AGAIN = -2,
    MG_DECLINED = -3,
    MG_EINVAL = -4,
    MG_EFULL = -5
};
enum {
    MG_HDR_SET = 0,
    MG_HDR_ADD = 1,
    MG_HDR_REMOVE = 2
};
enum {
    MG_LEN_CHUNKED = -1,
    MG_LEN_CLOSE = -2
};
enum { MG_PHASE_HEADER_FILTER = 1, MG_PHASE_BODY_FILTER = 2, MG_PHASE_LOG = 4 };
typedef struct mg_req_s mg_req_t;
typedef struct mg_upstream_s mg_upstream_t;
typedef struct mg_sha256_s mg_sha256_t;
typedef struct mg_header_s {
    const char *name;
    const char *value;
    uint32_t name_len;
    uint32_t value_len;
} mg_header_t;
typedef struct mg_req_view_s {
    const char *method;
    const char *path;
    const char *query;
    const mg_header_t *headers;
    uint32_t method_len;
    uint32_t path_len;
    uint32_t query_len;
    uint32_t nheaders;
    uint8_t version_major;
    uint8_t version_minor;
    uint16_t remote_port;
    int32_t status;
    uint32_t worker_id;
    int64_t content_length;
    double start_time;
    char remote_addr[48];
    char request_id[36];
    uint32_t request_id_len;
} mg_req_view_t;
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
int mg_req_set_body(mg_req_t *r, const char *data, size_t len);
int mg_req_set_body_limit(mg_req_t *r, uint64_t bytes);
int mg_req_listener(mg_req_t *r);
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
mg_upstream_t *mg_upstream_new(const char *id, size_t id_len, uint32_t connect_ms, uint32_t send_ms,
                               uint32_t read_ms, uint32_t pool_size, uint32_t idle_ms,
                               uint32_t max_requests);
int mg_upstream_add_target(mg_upstream_t *u, const char *host, size_t host_len, int port,
                           int weight);
void mg_upstream_release(mg_upstream_t *u);
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
typedef struct mg_http_res_s {
    int32_t status;
    uint32_t nheaders;
    const mg_header_t *headers;
    const char *body;
    size_t body_len;
    const char *error;
    size_t error_len;
} mg_http_res_t;
int mg_http_request(mg_req_t *r, const mg_http_opts_t *o);
const mg_http_res_t *mg_http_result(mg_req_t *r);
enum { MG_REDIS_DOWN = 0, MG_REDIS_CONNECTING = 1, MG_REDIS_UP = 2 };
enum {
    MG_REDIS_NIL = 0,
    MG_REDIS_INTEGER = 1,
    MG_REDIS_STRING = 2,
    MG_REDIS_STATUS = 3,
    MG_REDIS_ERROR = 4,
    MG_REDIS_ARRAY = 5
};
typedef struct mg_redis_value_s {
    int32_t type;
    uint32_t n;
    int64_t integer;
    const char *str;
    size_t len;
} mg_redis_value_t;
int mg_redis_state(void);
int mg_redis_command(mg_req_t *r, int argc, const char **argv, const size_t *argvlen);
int mg_redis_reply(mg_req_t *r, const mg_redis_value_t **values, size_t *n, const char **err);
double mg_time_now(void);
void mg_log_write(int level, const char *msg, size_t len);
int mg_worker_id(void);
mg_sha256_t *mg_sha256_new(void);
int mg_sha256_update(mg_sha256_t *s, const char *data, size_t len);
int mg_sha256_final(mg_sha256_t *s, unsigned char *out32);
void mg_sha256_free(mg_sha256_t *s);
typedef struct mg_shm_zone_s mg_shm_zone_t;
mg_shm_zone_t *mg_shm_zone(const char *name, size_t name_len);
int mg_shm_stats(mg_shm_zone_t *z, uint64_t *used, uint64_t *capacity, uint64_t *evictions);
int mg_shm_set_clock(int64_t now_us);
enum { MG_LIMIT_TOKEN_BUCKET = 1, MG_LIMIT_FIXED_WINDOW = 2, MG_LIMIT_SLIDING_WINDOW = 3 };
typedef struct mg_limit_spec_s {
    int algorithm;
    double limit;
    double rate;
    int64_t window_us;
} mg_limit_spec_t;
typedef struct mg_limit_result_s {
    int allowed;
    double limit;
    double remaining;
    double reset;
    double retry_after;
} mg_limit_result_t;
int mg_limit_take(mg_shm_zone_t *z, const char *key, size_t key_len, const mg_limit_spec_t *spec,
                  double n, int64_t now_us, mg_limit_result_t *out);
int mg_limit_take_all(mg_shm_zone_t *const *zones, const char *const *keys, const size_t *key_lens,
                      const mg_limit_spec_t *const *specs, uint32_t count, double n,
                      int64_t now_us, mg_limit_result_t *out);
int mg_limit_conc_acquire(mg_req_t *r, mg_shm_zone_t *z, const char *key, size_t key_len,
                          uint32_t max, int64_t *current);
enum { MG_BREAKER_CLOSED = 0, MG_BREAKER_OPEN = 1, MG_BREAKER_HALF_OPEN = 2 };
typedef struct mg_breaker_conf_s {
    uint32_t window_ms;
    uint32_t min_requests;
    double failure_rate;
    uint32_t slow_ms;
    double slow_rate;
    uint32_t open_ms;
    uint32_t max_open_ms;
    uint32_t probes;
    uint32_t close_after;
} mg_breaker_conf_t;
typedef struct mg_breaker_result_s {
    int allowed;
    int probe;
    int state;
    double retry_after;
} mg_breaker_result_t;
int mg_breaker_acquire(mg_shm_zone_t *z, const char *key, size_t key_len,
                       const mg_breaker_conf_t *conf, int64_t now_us, mg_breaker_result_t *out);
int mg_breaker_report(mg_shm_zone_t *z, const char *key, size_t key_len,
                      const mg_breaker_conf_t *conf, int failed, double duration_ms,
                      int was_probe, int64_t now_us);
int mg_breaker_state(mg_shm_zone_t *z, const char *key, size_t key_len, int64_t now_us);
int mg_base64_decode(const char *in, size_t len, unsigned char *out, size_t *out_len);
typedef struct mg_upstream_breaker_s mg_upstream_breaker_t;
mg_upstream_breaker_t *mg_upstream_breaker_new(mg_shm_zone_t *z, const mg_breaker_conf_t *conf,
                                               const int *failure_statuses, size_t nstatuses);
void mg_upstream_breaker_release(mg_upstream_breaker_t *b);
int mg_req_set_breaker(mg_req_t *r, mg_upstream_breaker_t *b);
int mg_sha1_hex(const char *data, size_t len, char *out40);
int mg_cfg_next(const char **data, size_t *len);
int mg_cfg_send(const char *data, size_t len);
int mg_ctl_send(uint32_t peer, const char *data, size_t len);
double mg_ctl_version_get(void);
void mg_ctl_version_set(double version);
int mg_ctl_etcd_start(const char *endpoints, size_t endpoints_len, const char *key_b64,
                      size_t key_len, const char *end_b64, size_t end_len, const char *auth_body,
                      size_t auth_len, uint32_t timeout_ms, const mg_tls_opts_t *tls, char *err,
                      size_t errlen);
int mg_ctl_etcd_rerange(void);
enum {
    MG_ROUTE_DONE = 0,
    MG_ROUTE_CHECK = 1,
    MG_RT_NODE = 16,
    MG_RT_XREC = 16,
    MG_RT_N_XDEPTH = 12,
    MG_RT_N_XSHAPED = 13
};
typedef struct mg_router_s {
    const int32_t *nodes;
    const int32_t *karr;
    const uint8_t *labels;
    const int32_t *xrec;
    const int32_t *xbits;
    const int32_t *xshp;
    const int32_t *ranks;
    const int32_t *next_entry;
    int32_t mult;
    int32_t xmask, xbmask, xshp_mask, xp_inline;
    const int32_t *hosts;
    const uint8_t *host_bytes;
    int32_t hosts_mask;
    int32_t wild;
    int32_t none;
    uint32_t sfx_lens[8];
    uint32_t pfx_lens[8];
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
    int32_t at, crank, cend, k, i, d, ri, sp, kb, shapes, xbase, xcons;
} mg_route_walk_t;
int mg_route_find(mg_route_walk_t *w, const char *host, int32_t host_len);
int mg_route_resume(mg_route_walk_t *w, int passed);
]]

ffi.cdef(_M.cdef)
-- libc, not part of moongate.h
pcall(ffi.cdef, "int memcmp(const void *s1, const void *s2, size_t n);")
-- the router's large arrays (huge pages)
pcall(ffi.cdef, [[
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
]])

local function in_process()
  return pcall(function() return ffi.C.mg_time_now end)
end

local function load_library()
  if in_process() then
    return ffi.C
  end
  local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
  local tried = {}
  local candidates = {
    os_getenv("MOONGATE_LIB"),
    here .. "/../../build/libmoongate.so",
    "moongate",
  }
  for i = 1, #candidates do
    local path = candidates[i]
    if path then
      local ok, lib = pcall(ffi.load, path, true)
      if ok then
        return lib
      end
      tried[#tried + 1] = path .. " (" .. tostring(lib) .. ")"
    end
  end
  error("libmoongate not found; tried: " .. concat(tried, ", "), 2)
end

_M.C = load_library()

return _M
