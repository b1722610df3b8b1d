/* node.c: load the node config through lua/moongate/config.lua.
 *
 * The C side does not parse JSON: config.lua owns the schema, defaults and
 * relative-path rules, so `moongate check`, the admin API and the runtime
 * can never disagree about what a config means. This file only runs it in
 * a throwaway LuaJIT state and copies the result into mg_node_conf_t,
 * refusing values that do not fit rather than truncating them.
 */
#include "node.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <lauxlib.h>
#include <libgen.h>
#include <limits.h>
#include <lua.h>
#include <lualib.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "listen.h"
#include "log.h"
#include "lua_path.h"

#ifndef MG_LUA_DIR
#define MG_LUA_DIR "/usr/local/share/lua/5.1"
#endif

#define NODE_MAX_WORKERS 256

void mg_node_set_lua_path(lua_State *L, const char *lua_root)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", lua_root, lua_root,
                    lua_isstring(L, -1) ? lua_tostring(L, -1) : "");
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
}

void mg_node_defaults(mg_node_conf_t *conf)
{
    memset(conf, 0, sizeof(*conf));
    conf->workers = 1;
    snprintf(conf->status.address, sizeof(conf->status.address), "127.0.0.1:9091");
    snprintf(conf->status.host, sizeof(conf->status.host), "127.0.0.1");
    conf->status.port = 9091;
    snprintf(conf->admin.address, sizeof(conf->admin.address), "127.0.0.1:9180");
    snprintf(conf->admin.host, sizeof(conf->admin.host), "127.0.0.1");
    conf->admin.port = 9180;
    conf->limits.max_header_bytes = 16384;
    conf->limits.max_uri_bytes = 8192;
    conf->limits.max_body_bytes = 10u * 1024 * 1024;
    conf->limits.client_header_timeout_ms = 10000;
    conf->limits.client_body_timeout_ms = 30000;
    conf->limits.keepalive_timeout_ms = 60000;
    conf->limits.send_timeout_ms = 30000;
    conf->limits.max_keepalive_requests = 10000; /* as config.lua */
    conf->log_level = MG_LOG_INFO;
    conf->shutdown_timeout_ms = 10000;
    snprintf(conf->redis.host, sizeof(conf->redis.host), "127.0.0.1");
    snprintf(conf->redis.ip, sizeof(conf->redis.ip), "127.0.0.1");
    conf->redis.port = 6379;
    conf->redis.timeout_ms = 1000;
}

/* --- finding lua/ ------------------------------------------------------- */

static int node_has_config(const char *dir)
{
    char path[MG_PATH_MAX + 32];
    struct stat st;

    snprintf(path, sizeof(path), "%s/moongate/config.lua", dir);
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Copies the absolute form of dir into out; -ENAMETOOLONG or -errno. */
static int node_absolute(const char *dir, char *out, size_t len)
{
    char real[PATH_MAX];

    if (realpath(dir, real) == NULL) return -errno;
    if (strlen(real) >= len) return -ENAMETOOLONG;
    memcpy(out, real, strlen(real) + 1);
    return 0;
}

int mg_node_lua_root(char *out, size_t len)
{
    char exe[PATH_MAX], beside[PATH_MAX + 8], tree[PATH_MAX + 24];
    const char *env = getenv("MOONGATE_LUA_DIR");
    ssize_t n;

    /* An explicit directory is never second-guessed: falling back to
     * another copy would run code the user did not ask for. */
    if (env != NULL && env[0] != '\0') {
        if (node_has_config(env) && node_absolute(env, out, len) == 0) return 0;
        snprintf(out, len, "cannot find moongate/config.lua in MOONGATE_LUA_DIR=%s", env);
        return -ENOENT;
    }

    beside[0] = tree[0] = '\0';
    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        const char *dir = dirname(exe);
        /* a checkout (bin/ beside lua/), then a luarocks tree (bin/ beside
         * share/lua/5.1/) */
        snprintf(beside, sizeof(beside), "%s/../lua", dir);
        if (node_has_config(beside) && node_absolute(beside, out, len) == 0) return 0;
        snprintf(tree, sizeof(tree), "%s/../share/lua/5.1", dir);
        if (node_has_config(tree) && node_absolute(tree, out, len) == 0) return 0;
    }
    if (node_has_config(MG_LUA_DIR) && node_absolute(MG_LUA_DIR, out, len) == 0) return 0;

    snprintf(out, len, "cannot find moongate/config.lua in %s%s%s%s%s (set MOONGATE_LUA_DIR)",
             beside[0] ? beside : "", beside[0] ? " or " : "", tree[0] ? tree : "",
             tree[0] ? " or " : "", MG_LUA_DIR);
    return -ENOENT;
}

/* --- the Lua side ------------------------------------------------------- */

/* A state with module (moongate.config, moongate.config_check) required
 * and left on the stack top; NULL with err filled on failure. */
static lua_State *node_module_state(const char *module, char *lua_root, size_t rootlen, char *err,
                                    size_t errlen)
{
    lua_State *L;

    if (mg_node_lua_root(lua_root, rootlen) < 0) {
        snprintf(err, errlen, "%s", lua_root);
        return NULL;
    }
    L = luaL_newstate();
    if (L == NULL) {
        snprintf(err, errlen, "cannot create a Lua state: out of memory");
        return NULL;
    }
    luaL_openlibs(L);
    mg_node_set_lua_path(L, lua_root);
    lua_getglobal(L, "require");
    lua_pushstring(L, module);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        snprintf(err, errlen, "cannot load %s: %s", module,
                 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(error object is not a string)");
        lua_close(L);
        return NULL;
    }
    if (!lua_istable(L, -1)) {
        snprintf(err, errlen, "%s did not return a table", module);
        lua_close(L);
        return NULL;
    }
    return L;
}

static lua_State *node_config_state(char *lua_root, size_t rootlen, char *err, size_t errlen)
{
    return node_module_state("moongate.config", lua_root, rootlen, err, errlen);
}

/* Calls config[fn](path) with the module on the top; leaves 2 results. */
static int node_call(lua_State *L, const char *fn, const char *path, char *err, size_t errlen)
{
    lua_getfield(L, -1, fn);
    if (!lua_isfunction(L, -1)) {
        snprintf(err, errlen, "moongate.config has no function %s", fn);
        return -EINVAL;
    }
    lua_pushstring(L, path);
    if (lua_pcall(L, 1, 2, 0) != 0) {
        snprintf(err, errlen, "%s: %s", fn,
                 lua_isstring(L, -1) ? lua_tostring(L, -1) : "(error object is not a string)");
        return -EINVAL;
    }
    return 0;
}

/* Appends the error(s) at idx (a string or a list of strings) to buf. */
static void node_join_errors(lua_State *L, int idx, char *buf, size_t len)
{
    size_t used = strlen(buf);
    int i, n;

    if (lua_isstring(L, idx)) {
        snprintf(buf + used, len - used, "%s", lua_tostring(L, idx));
        return;
    }
    if (!lua_istable(L, idx)) {
        snprintf(buf + used, len - used, "invalid (no reason given)");
        return;
    }
    n = (int)lua_objlen(L, idx);
    for (i = 1; i <= n && used < len; i++) {
        lua_rawgeti(L, idx, i);
        snprintf(buf + used, len - used, "%s%s", i > 1 ? "; " : "",
                 lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
        lua_pop(L, 1);
        used = strlen(buf);
    }
}

/* --- copying the normalized table --------------------------------------
 * Each reader takes the table at stack index t, leaves the stack as it was,
 * keeps *dst when the key is absent (the default), and fails when the value
 * has another type or does not fit: a contract break with config.lua, to be
 * reported, not papered over. */

typedef struct {
    char *err;
    size_t errlen;
} node_ctx_t;

static int node_bad(node_ctx_t *c, const char *key, const char *why)
{
    snprintf(c->err, c->errlen, "%s: %s", key, why);
    return -EINVAL;
}

static int node_str(lua_State *L, int t, const char *key, const char *name, char *dst, size_t len,
                    node_ctx_t *c)
{
    int r = 0;

    lua_getfield(L, t, key);
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (n >= len || memchr(s, '\0', n) != NULL) {
            r = node_bad(c, name, "too long");
        } else {
            memcpy(dst, s, n + 1);
        }
    } else if (!lua_isnil(L, -1)) {
        r = node_bad(c, name, "must be a string");
    }
    lua_pop(L, 1);
    return r;
}

static int node_num(lua_State *L, int t, const char *key, const char *name, double min, double max,
                    double *dst, node_ctx_t *c)
{
    int r = 0;

    lua_getfield(L, t, key);
    if (lua_type(L, -1) == LUA_TNUMBER) {
        double v = lua_tonumber(L, -1);
        /* Range first: converting NaN or a huge double to an integer is UB. */
        if (v != v || v < min || v > max || v != (double)(long long)v) {
            char why[96];
            snprintf(why, sizeof(why), "must be an integer %.0f..%.0f", min, max);
            r = node_bad(c, name, why);
        } else {
            *dst = v;
        }
    } else if (!lua_isnil(L, -1)) {
        r = node_bad(c, name, "must be a number");
    }
    lua_pop(L, 1);
    return r;
}

static int node_u32(lua_State *L, int t, const char *key, const char *name, uint32_t *dst,
                    node_ctx_t *c)
{
    double v = *dst;
    int r = node_num(L, t, key, name, 0, 4294967295.0, &v, c);
    *dst = (uint32_t)v;
    return r;
}

/* Pushes t[key] when it is a table and returns 1; 0 (nothing pushed) when
 * absent; -EINVAL for any other type. */
static int node_sub(lua_State *L, int t, const char *key, node_ctx_t *c)
{
    lua_getfield(L, t, key);
    if (lua_istable(L, -1)) return 1;
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    lua_pop(L, 1);
    return node_bad(c, key, "must be an object");
}

/* One {address, host, port, tls} entry at the stack top. host and port win
 * when present (config.lua has split the address); else the address is
 * parsed here. Either way the host must be usable without DNS. */
static int node_listener(lua_State *L, const char *name, mg_listen_conf_t *l, node_ctx_t *c)
{
    int t = lua_gettop(L);
    double port = -1;
    struct sockaddr_storage ss;
    socklen_t sslen;
    char field[64];
    int r;

    memset(l, 0, sizeof(*l));
    snprintf(field, sizeof(field), "%s.address", name);
    if ((r = node_str(L, t, "address", field, l->address, sizeof(l->address), c)) < 0) return r;
    snprintf(field, sizeof(field), "%s.host", name);
    if ((r = node_str(L, t, "host", field, l->host, sizeof(l->host), c)) < 0) return r;
    snprintf(field, sizeof(field), "%s.port", name);
    if ((r = node_num(L, t, "port", field, 0, 65535, &port, c)) < 0) return r;
    lua_getfield(L, t, "tls");
    l->tls = lua_toboolean(L, -1) && !(lua_isnumber(L, -1) && lua_tonumber(L, -1) == 0);
    lua_pop(L, 1);

    if (l->host[0] != '\0' && port >= 0) {
        l->port = (int)port;
        if (l->address[0] == '\0') mg_listen_format(l, l->address, sizeof(l->address));
        r = mg_listen_sockaddr(l, &ss, &sslen, c->err, c->errlen);
    } else if (l->address[0] != '\0') {
        int tls = l->tls;
        r = mg_listen_parse(l->address, l, c->err, c->errlen);
        l->tls = tls;
    } else {
        r = node_bad(c, name, "needs an address");
    }
    return r;
}

static int node_shm_cmp(const void *a, const void *b)
{
    return strcmp(((const mg_shm_conf_t *)a)->name, ((const mg_shm_conf_t *)b)->name);
}

/* shm = {name = bytes} at t (popped here), sorted by name so that two loads
 * of one config compare equal. */
static int node_shm(lua_State *L, int t, mg_node_conf_t *out, node_ctx_t *c)
{
    int n = 0, custom = 0;

    lua_pushnil(L);
    while (lua_next(L, t) != 0) {
        size_t len;
        const char *name;
        double v;
        mg_shm_conf_t *z;
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 3);
            return node_bad(c, "shm", "zone names must be strings");
        }
        name = lua_tolstring(L, -2, &len);
        /* the built-in zones always exist: room for 14 more */
        custom += strcmp(name, "limits") != 0 && strcmp(name, "breakers") != 0;
        if (n >= MG_SHM_MAX_ZONES || custom > MG_SHM_MAX_ZONES - 2) {
            lua_pop(L, 3);
            return node_bad(c, "shm", "at most 14 zones besides limits and breakers");
        }
        if (len == 0 || len >= MG_SHM_NAME_MAX) {
            lua_pop(L, 3);
            return node_bad(c, "shm", "zone names are 1 to 31 characters");
        }
        if (lua_type(L, -1) != LUA_TNUMBER) {
            lua_pop(L, 3);
            return node_bad(c, "shm", "zone sizes must be numbers (bytes)");
        }
        v = lua_tonumber(L, -1);
        if (!(v >= 4096 && v <= 68719476736.0)) { /* 64 GiB */
            lua_pop(L, 3);
            return node_bad(c, "shm", "zone sizes are 4096 bytes to 64 GiB");
        }
        z = &out->shm[n++];
        memcpy(z->name, name, len + 1);
        z->size = (uint64_t)v;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    out->nshm = n;
    qsort(out->shm, (size_t)n, sizeof(out->shm[0]), node_shm_cmp);
    return 0;
}

/* redis.host as a numeric address for hiredis, resolved here once (in the
 * master, at start and reload): hiredis' connect would otherwise call
 * getaddrinfo, which blocks, on a worker's loop. */
static int node_redis_resolve(mg_redis_conf_t *rc, node_ctx_t *c)
{
    unsigned char buf[sizeof(struct in6_addr)];
    struct addrinfo hints, *res = NULL;
    int rv;

    if (inet_pton(AF_INET, rc->host, buf) == 1 || inet_pton(AF_INET6, rc->host, buf) == 1) {
        if (strlen(rc->host) >= sizeof(rc->ip)) return node_bad(c, "redis.host", "too long");
        memcpy(rc->ip, rc->host, strlen(rc->host) + 1);
        return 0;
    }
    /* IPv4 first, as hiredis does: "localhost" is then 127.0.0.1, where a
     * default Redis listens, even when ::1 sorts first */
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    rv = getaddrinfo(rc->host, NULL, &hints, &res);
    if (rv != 0 || res == NULL) {
        hints.ai_family = AF_INET6;
        rv = getaddrinfo(rc->host, NULL, &hints, &res);
    }
    if (rv != 0 || res == NULL) {
        char why[320];
        snprintf(why, sizeof(why), "cannot resolve %s: %s", rc->host,
                 rv != 0 ? gai_strerror(rv) : "no address");
        return node_bad(c, "redis.host", why);
    }
    if (res->ai_family == AF_INET)
        inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, rc->ip, sizeof(rc->ip));
    else
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)res->ai_addr)->sin6_addr, rc->ip,
                  sizeof(rc->ip));
    freeaddrinfo(res);
    return 0;
}

static int node_redis(lua_State *L, mg_redis_conf_t *rc, node_ctx_t *c)
{
    int t = lua_gettop(L), r;
    double port = rc->port;

    if ((r = node_str(L, t, "host", "redis.host", rc->host, sizeof(rc->host), c)) < 0) return r;
    if ((r = node_num(L, t, "port", "redis.port", 1, 65535, &port, c)) < 0) return r;
    rc->port = (int)port;
    if ((r = node_u32(L, t, "timeout_ms", "redis.timeout_ms", &rc->timeout_ms, c)) < 0) return r;
    if (rc->timeout_ms == 0) return node_bad(c, "redis.timeout_ms", "must be at least 1");
    if ((r = node_u32(L, t, "db", "redis.db", &rc->db, c)) < 0) return r;
    lua_getfield(L, t, "password");
    rc->has_password = lua_type(L, -1) == LUA_TSTRING;
    lua_pop(L, 1);
    if ((r = node_str(L, t, "password", "redis.password", rc->password, sizeof(rc->password), c)) <
        0)
        return r;
    return node_redis_resolve(rc, c);
}

/* The status or admin listener: t[key] = {listen = "host:port"} (or
 * host/port, as config.lua normalizes it). A table without an address
 * keeps the default listener. */
static int node_side_listener(lua_State *L, int t, const char *key, mg_listen_conf_t *out,
                              node_ctx_t *c)
{
    mg_listen_conf_t l;
    int r = node_sub(L, t, key, c);

    if (r <= 0) return r;
    lua_getfield(L, -1, "listen");
    lua_getfield(L, -2, "host");
    r = !lua_isnil(L, -1) || !lua_isnil(L, -2);
    lua_pop(L, 2);
    if (r) {
        lua_getfield(L, -1, "listen");
        if (lua_isstring(L, -1))
            lua_setfield(L, -2, "address");
        else
            lua_pop(L, 1);
        r = node_listener(L, key, &l, c);
        if (r < 0) {
            lua_pop(L, 1);
            return r;
        }
        *out = l;
    }
    lua_pop(L, 1);
    return 0;
}

static int node_copy(lua_State *L, int t, mg_node_conf_t *out, node_ctx_t *c)
{
    double workers = 0, v;
    char level[16] = "", access[MG_PATH_MAX] = "";
    int r, i, n, top = lua_gettop(L);

#define TRY(x)                                                                                     \
    do {                                                                                           \
        if ((r = (x)) < 0) goto done;                                                              \
    } while (0)

    TRY(node_str(L, t, "conf_path", "conf_path", out->conf_path, sizeof(out->conf_path), c));
    TRY(node_str(L, t, "prefix", "prefix", out->prefix, sizeof(out->prefix), c));
    TRY(node_str(L, t, "pid_file", "pid_file", out->pid_file, sizeof(out->pid_file), c));
    lua_getfield(L, t, "config_source");
    if (lua_istable(L, -1)) {
        TRY(node_str(L, lua_gettop(L), "path", "config_source.path", out->routes_path,
                     sizeof(out->routes_path), c));
        lua_getfield(L, -1, "watch");
        out->watch = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    /* "auto" is what the JSON says; config.lua normalizes it to 0, but
     * accepting both keeps this loader working either way. */
    lua_getfield(L, t, "workers");
    if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "auto") == 0) {
        lua_pop(L, 1);
    } else {
        lua_pop(L, 1);
        TRY(node_num(L, t, "workers", "workers", 0, NODE_MAX_WORKERS, &workers, c));
    }
    if (workers == 0) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        workers = cpus < 1 ? 1 : cpus > NODE_MAX_WORKERS ? NODE_MAX_WORKERS : (double)cpus;
    }
    out->workers = (int)workers;

    TRY(node_sub(L, t, "listen", c));
    if (r == 1) {
        n = (int)lua_objlen(L, -1);
        if (n > MG_MAX_LISTEN) {
            r = node_bad(c, "listen", "at most 16 listeners");
            goto done;
        }
        for (i = 1; i <= n; i++) {
            char name[32];
            snprintf(name, sizeof(name), "listen[%d]", i - 1);
            lua_rawgeti(L, -1, i);
            if (!lua_istable(L, -1)) {
                r = node_bad(c, name, "must be an object");
                goto done;
            }
            TRY(node_listener(L, name, &out->listen[i - 1], c));
            lua_pop(L, 1);
        }
        out->nlisten = n;
        lua_pop(L, 1);
    }
    if (out->nlisten == 0) {
        r = node_bad(c, "listen", "no listener configured");
        goto done;
    }

    TRY(node_side_listener(L, t, "status", &out->status, c));
    TRY(node_side_listener(L, t, "admin", &out->admin, c));

    TRY(node_sub(L, t, "limits", c));
    if (r == 1) {
        int lt = lua_gettop(L);
        mg_limits_t *lim = &out->limits;
        TRY(node_u32(L, lt, "max_header_bytes", "limits.max_header_bytes", &lim->max_header_bytes,
                     c));
        TRY(node_u32(L, lt, "max_uri_bytes", "limits.max_uri_bytes", &lim->max_uri_bytes, c));
        v = (double)lim->max_body_bytes;
        /* 2^53: the largest integer a Lua number holds exactly. */
        TRY(node_num(L, lt, "max_body_bytes", "limits.max_body_bytes", 0, 9007199254740992.0, &v,
                     c));
        lim->max_body_bytes = (uint64_t)v;
        TRY(node_u32(L, lt, "client_header_timeout_ms", "limits.client_header_timeout_ms",
                     &lim->client_header_timeout_ms, c));
        TRY(node_u32(L, lt, "client_body_timeout_ms", "limits.client_body_timeout_ms",
                     &lim->client_body_timeout_ms, c));
        TRY(node_u32(L, lt, "keepalive_timeout_ms", "limits.keepalive_timeout_ms",
                     &lim->keepalive_timeout_ms, c));
        TRY(node_u32(L, lt, "send_timeout_ms", "limits.send_timeout_ms", &lim->send_timeout_ms, c));
        TRY(node_u32(L, lt, "max_keepalive_requests", "limits.max_keepalive_requests",
                     &lim->max_keepalive_requests, c));
        lua_pop(L, 1);
    }

    TRY(node_sub(L, t, "shm", c));
    if (r == 1) TRY(node_shm(L, lua_gettop(L), out, c));
    TRY(node_sub(L, t, "redis", c));
    if (r == 1) {
        TRY(node_redis(L, &out->redis, c));
        lua_pop(L, 1);
    }

    TRY(node_sub(L, t, "log", c));
    if (r == 1) {
        int lt = lua_gettop(L);
        TRY(node_str(L, lt, "level", "log.level", level, sizeof(level), c));
        TRY(node_str(L, lt, "access", "log.access", access, sizeof(access), c));
        lua_pop(L, 1);
    }
    if (level[0] != '\0') {
        out->log_level = mg_log_level_parse(level);
        if (out->log_level < 0) {
            r = node_bad(c, "log.level", "must be debug, info, warn or error");
            goto done;
        }
    }
    if (strcmp(access, "off") != 0) memcpy(out->access_log, access, strlen(access) + 1);

    TRY(node_u32(L, t, "shutdown_timeout_ms", "shutdown_timeout_ms", &out->shutdown_timeout_ms, c));
    r = 0;

done:
#undef TRY
    lua_settop(L, top);
    return r;
}

/* out = a "/" b, refusing to truncate. */
static int node_join_path(char *out, size_t len, const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);

    if (na + 1 + nb + 1 > len) return -ENAMETOOLONG;
    memmove(out + na + 1, b, nb + 1); /* b may live in out */
    memcpy(out, a, na);
    out[na] = '/';
    return 0;
}

/* Fills in what config.lua may leave out: absolute conf_path, its
 * directory as prefix, and <prefix>/moongate.pid. */
static int node_paths(const char *conf_path, mg_node_conf_t *out, node_ctx_t *c)
{
    char dir[MG_PATH_MAX];
    int r;

    if (out->conf_path[0] == '\0') {
        r = node_absolute(conf_path, out->conf_path, sizeof(out->conf_path));
        if (r < 0) {
            snprintf(c->err, c->errlen, "%s", strerror(-r));
            return r;
        }
    }
    if (out->prefix[0] == '\0') {
        const char *d;
        memcpy(dir, out->conf_path, sizeof(dir));
        d = dirname(dir); /* a pointer into dir, or to "." */
        memcpy(out->prefix, d, strlen(d) + 1);
    }
    if (out->pid_file[0] == '\0') {
        r = node_join_path(out->pid_file, sizeof(out->pid_file), out->prefix, "moongate.pid");
    } else if (out->pid_file[0] != '/') {
        /* Relative paths resolve against the file that names them. */
        memcpy(dir, out->pid_file, sizeof(dir));
        r = node_join_path(out->pid_file, sizeof(out->pid_file), out->prefix, dir);
    } else {
        r = 0;
    }
    if (r < 0) return node_bad(c, "pid_file", "too long");
    return 0;
}

/* config.load_node(conf_path) copied into out, in L (moongate.config on
 * its top, lua_root where it was found); the stack is left as it was. */
static int node_load_in(lua_State *L, const char *lua_root, const char *conf_path,
                        mg_node_conf_t *out, char *err, size_t errlen)
{
    char msg[2048];
    node_ctx_t c = {msg, sizeof(msg)};
    int top = lua_gettop(L), r;

    mg_node_defaults(out);
    msg[0] = '\0';
    snprintf(out->lua_root, sizeof(out->lua_root), "%s", lua_root);
    if (node_call(L, "load_node", conf_path, msg, sizeof(msg)) < 0) {
        snprintf(err, errlen, "%s: %s", conf_path, msg);
        lua_settop(L, top);
        return -EINVAL;
    }
    if (!lua_istable(L, -2)) {
        snprintf(msg, sizeof(msg), "%s: ", conf_path);
        node_join_errors(L, -1, msg, sizeof(msg));
        snprintf(err, errlen, "%s", msg);
        lua_settop(L, top);
        return -EINVAL;
    }
    r = node_copy(L, lua_gettop(L) - 1, out, &c);
    lua_settop(L, top);
    if (r == 0) r = node_paths(conf_path, out, &c);
    if (r < 0) {
        snprintf(err, errlen, "%s: %s", conf_path, msg);
        return r;
    }
    return 0;
}

int mg_node_load(const char *conf_path, mg_node_conf_t *out, char *err, size_t errlen)
{
    char lua_root[MG_PATH_MAX], msg[2048];
    lua_State *L;
    int r;

    mg_node_defaults(out);
    L = node_config_state(lua_root, sizeof(lua_root), msg, sizeof(msg));
    if (L == NULL) {
        snprintf(err, errlen, "%s", msg);
        return -EINVAL;
    }
    r = node_load_in(L, lua_root, conf_path, out, err, errlen);
    lua_close(L);
    return r;
}

/* module.check(conf_path) in L (module on its top): calls on_error per
 * error and returns their count; the stack is left as it was. */
static int node_check_in(lua_State *L, const char *conf_path,
                         void (*on_error)(void *ud, const char *msg), void *ud)
{
    char msg[2048];
    int top = lua_gettop(L), i, n;

    if (node_call(L, "check", conf_path, msg, sizeof(msg)) < 0) {
        on_error(ud, msg);
        lua_settop(L, top);
        return 1;
    }
    /* check returns a list of errors; tolerate nil (valid) and the
     * nil, errs / nil, "message" convention too. */
    if (lua_isnil(L, -2) && !lua_isnil(L, -1))
        lua_remove(L, -2);
    else
        lua_pop(L, 1);

    if (lua_isnil(L, -1)) {
        n = 0;
    } else if (lua_isstring(L, -1)) {
        on_error(ud, lua_tostring(L, -1));
        n = 1;
    } else if (lua_istable(L, -1)) {
        n = (int)lua_objlen(L, -1);
        for (i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            on_error(ud, lua_isstring(L, -1) ? lua_tostring(L, -1) : "(non-string error)");
            lua_pop(L, 1);
        }
    } else {
        on_error(ud, "check returned neither a list nor nil");
        n = 1;
    }
    lua_settop(L, top);
    return n;
}

int mg_node_check_each(const char *conf_path, void (*on_error)(void *ud, const char *msg), void *ud)
{
    char lua_root[MG_PATH_MAX], msg[2048];
    lua_State *L;
    int n;

    L = node_config_state(lua_root, sizeof(lua_root), msg, sizeof(msg));
    if (L == NULL) {
        on_error(ud, msg);
        return 1;
    }
    n = node_check_in(L, conf_path, on_error, ud);
    lua_close(L);
    return n;
}

static void node_print_error(void *ud, const char *msg)
{
    FILE *f = ud;
    fprintf(f, "%s\n", msg);
}

int mg_node_check(const char *conf_path)
{
    return mg_node_check_each(conf_path, node_print_error, stderr) == 0 ? 0 : 1;
}
