/* node.h: the node configuration as the C runtime sees it.
 *
 * The master loads conf/moongate.json through lua/moongate/config.lua
 * (config.load_node) in a throwaway Lua state and copies the fields the C
 * side needs into this struct (node.c). The control process and the workers
 * get it by fork. Everything Lua-only (routes, policies) reaches the workers
 * from the control process (channel.c), which reads the config source.
 */
#ifndef MG_NODE_H
#define MG_NODE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define MG_MAX_LISTEN 16
#define MG_PATH_MAX 4096
#define MG_SHM_MAX_ZONES 16 /* built-in ones included */
#define MG_SHM_NAME_MAX 32  /* with the NUL */

typedef struct mg_listen_conf_s {
    char address[128]; /* as written: "127.0.0.1:8080" */
    char host[64];
    int port;
    int tls; /* reserved for the TLS issue; 0 now */
} mg_listen_conf_t;

typedef struct mg_limits_s {
    uint32_t max_header_bytes;         /* 431 past this */
    uint32_t max_uri_bytes;            /* 414 past this */
    uint64_t max_body_bytes;           /* 413 past this */
    uint32_t client_header_timeout_ms; /* 408 + close */
    uint32_t client_body_timeout_ms;   /* 408 + close, per read */
    uint32_t keepalive_timeout_ms;     /* idle close */
    uint32_t send_timeout_ms;          /* close when the client stops reading */
    uint32_t max_keepalive_requests;   /* close after this many */
} mg_limits_t;

/* A shared-memory zone of the `shm` setting (shm.c creates them). */
typedef struct mg_shm_conf_s {
    char name[MG_SHM_NAME_MAX];
    uint64_t size; /* bytes */
} mg_shm_conf_t;

/* The node's Redis (node config `redis`): one connection per worker,
 * opened at the first use (runtime/src/redis.c). */
typedef struct mg_redis_conf_s {
    char host[256];      /* as configured */
    char ip[64];         /* host resolved once at load (numeric): no DNS in a worker */
    int port;            /* 6379 */
    uint32_t timeout_ms; /* per command, and for connect + handshake: 1000 */
    char password[512];  /* AUTH when has_password */
    int has_password;
    uint32_t db; /* SELECT when not 0 */
} mg_redis_conf_t;

typedef struct mg_node_conf_s {
    char conf_path[MG_PATH_MAX]; /* absolute */
    char prefix[MG_PATH_MAX];    /* directory of conf_path */
    char pid_file[MG_PATH_MAX];
    char lua_root[MG_PATH_MAX]; /* the directory holding moongate/config.lua */
    int workers;                /* resolved: >= 1 */
    int nlisten;
    mg_listen_conf_t listen[MG_MAX_LISTEN];
    mg_listen_conf_t status; /* status listener (metrics, live/ready); host "" = none */
    mg_listen_conf_t admin;  /* admin API listener; host "" = none */
    mg_limits_t limits;
    int log_level;                /* MG_LOG_* */
    char access_log[MG_PATH_MAX]; /* "" = off, "stdout", or a path */
    uint32_t shutdown_timeout_ms;
    int nshm;
    mg_shm_conf_t shm[MG_SHM_MAX_ZONES]; /* sorted by name */
    char routes_path[MG_PATH_MAX];       /* config_source.path of a file source, else "" */
    mg_redis_conf_t redis;
    int watch; /* config_source.watch: reload when the files change */
    /* mock mode: no master, one worker running lua/moongate/mock.lua */
    int mock;
} mg_node_conf_t;

/* --- loading (node.c) --------------------------------------------------- */

/* Fills conf with the defaults of DESIGN.md (no listeners, status
 * 127.0.0.1:9091, limits, log level info, access log off, one worker).
 * Used as the base of mg_node_load and by `moongate mock`. */
void mg_node_defaults(mg_node_conf_t *conf);

/* Finds the directory holding moongate/config.lua: $MOONGATE_LUA_DIR when
 * set (used as is, but it must hold moongate/config.lua), else
 * <dir of /proc/self/exe>/../lua, else MG_LUA_DIR (compile time, default
 * /usr/local/share/lua/5.1). The result is an absolute path. On failure out
 * holds the reason, naming every path tried, and -ENOENT is returned. */
int mg_node_lua_root(char *out, size_t len);

/* Loads a node config through lua/moongate/config.lua (config.load_node) in
 * a throwaway LuaJIT state and copies it into out (workers resolved: 0 is
 * the number of online CPUs, clamped to 1..256). On failure err holds one
 * line: the file and every "json.path: message" joined by "; ". */
int mg_node_load(const char *conf_path, mg_node_conf_t *out, char *err, size_t errlen);

/* Validates the node config and the routes it names (config.check); calls
 * on_error once per error ("json.path: message"). Returns the number of
 * errors: 0 when valid. A config.lua that cannot be found or fails counts as
 * one error. */
int mg_node_check_each(const char *conf_path, void (*on_error)(void *ud, const char *msg),
                       void *ud);

/* mg_node_check_each printing each error on stderr, one a line; returns 0
 * when valid, 1 otherwise (an exit code). */
int mg_node_check(const char *conf_path);

#endif
