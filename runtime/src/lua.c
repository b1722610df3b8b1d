/* lua.c: the worker's LuaJIT state and its pooled request coroutines.
 *
 * C enters Lua only here, through the Lua C API: each phase of a request
 * resumes a coroutine on the handler module's function for that phase.
 * When the phase yields (sleep, body read, backpressure), the FFI call that
 * started the wait has armed a C callback that resumes it later.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lua_path.h"
#include "mg.h"

typedef struct co_slot_s {
    lua_State *co;
    int ref;
    struct co_slot_s *next;
} co_slot_t;

static co_slot_t *free_cos;
static unsigned nfree_cos;

static int get_ref(lua_State *L, int mod, const char *name)
{
    lua_getfield(L, mod, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return -1;
    }
    return luaL_ref(L, LUA_REGISTRYINDEX);
}

/* 0, -1 (the module failed to load or raised), or -2: its init returned
 * false (the control process: no configuration to hand out). */
int mg__lua_init(mg_worker_t *w)
{
    lua_State *L = luaL_newstate();
    if (!L) return -1;
    luaL_openlibs(L);
    mg_node_set_lua_path(L, w->conf->lua_root);
    const char *mod = w->role == MG_ROLE_MOCK      ? "moongate.mock"
                      : w->role == MG_ROLE_CONTROL ? "moongate.control"
                                                   : "moongate.worker";
    lua_getglobal(L, "require");
    lua_pushstring(L, mod);
    if (lua_pcall(L, 1, 1, 0) != 0) {
        mg_log(MG_LOG_ERROR, "loading %s: %s", mod, lua_tostring(L, -1));
        lua_close(L);
        return -1;
    }
    int m = lua_gettop(L);
    lua_getfield(L, m, "init");
    lua_pushstring(L, w->conf->conf_path);
    lua_pushinteger(L, w->id);
    lua_pushinteger(L, w->conf->workers);
    lua_pushboolean(L, w->role == MG_ROLE_WORKER_FILES);
    if (lua_pcall(L, 4, 2, 0) != 0 || !lua_toboolean(L, -2)) {
        int raised = lua_gettop(L) == m + 1;
        mg_log(MG_LOG_ERROR, "starting %s: %s", mod,
               lua_isstring(L, -1) ? lua_tostring(L, -1) : "init failed");
        lua_close(L);
        return raised ? -1 : -2;
    }
    lua_pop(L, 2);
    w->ref_access = get_ref(L, m, "access");
    w->ref_header_filter = get_ref(L, m, "header_filter");
    w->ref_log = get_ref(L, m, "log");
    w->ref_body_filter = get_ref(L, m, "body_filter");
    w->ref_reload = get_ref(L, m, "reload");
    w->ref_peer = get_ref(L, m, "peer");
    w->ref_access_error = get_ref(L, m, "access_error");
    lua_settop(L, 0);
    if (w->ref_access < 0) {
        mg_log(MG_LOG_ERROR, "%s has no access function", mod);
        lua_close(L);
        return -1;
    }
    w->L = L;
    return 0;
}

void mg__lua_close(mg_worker_t *w)
{
    if (w->L) lua_close(w->L);
    w->L = NULL;
    while (free_cos) {
        co_slot_t *s = free_cos;
        free_cos = s->next;
        free(s);
    }
}

static co_slot_t *co_get(mg_worker_t *w)
{
    if (free_cos) {
        co_slot_t *s = free_cos;
        free_cos = s->next;
        nfree_cos--;
        return s;
    }
    co_slot_t *s = malloc(sizeof(*s));
    if (!s) return NULL;
    s->co = lua_newthread(w->L);
    s->ref = luaL_ref(w->L, LUA_REGISTRYINDEX); /* anchors the thread */
    return s;
}

static void co_put(mg_worker_t *w, co_slot_t *s, int reusable)
{
    if (reusable && nfree_cos < 1024) {
        s->next = free_cos;
        free_cos = s;
        nfree_cos++;
        return;
    }
    luaL_unref(w->L, LUA_REGISTRYINDEX, s->ref);
    free(s);
}

/* r->lua_phase while the handler's access_error runs: an access phase
 * that raised, answered by Lua (lua.c only; it ends as MG_LUA_ACCESS). */
#define LUA_ACCESS_ERROR 100

static void start_access_error(mg_req_t *r, co_slot_t *dead);

static void resume(mg_req_t *r, int nargs)
{
    mg_worker_t *w = r->conn->w;
    co_slot_t *s = r->co_slot;
    lua_State *co = s->co;
    int phase = r->lua_phase;
    int rc = lua_resume(co, nargs);
    if (rc == LUA_YIELD) {
        if (r->wait != MG_WAIT_NONE) return; /* C resumes it when the wait ends */
        if (phase == LUA_ACCESS_ERROR) phase = MG_LUA_ACCESS;
        /* A bare coroutine.yield() from a policy: nothing would wake it. */
        lua_settop(co, 0);
        r->lua_busy = 0;
        r->co_slot = NULL;
        co_put(w, s, 0);
        mg_log(MG_LOG_ERROR, "request %s: a policy yielded outside the policy kit",
               r->v.request_id);
        mg__req_phase_done(r, phase, -1);
        return;
    }
    r->lua_busy = 0;
    r->co_slot = NULL;
    if (phase == LUA_ACCESS_ERROR && rc == 0) phase = MG_LUA_ACCESS;
    if (rc == 0) {
        lua_settop(co, 0);
        co_put(w, s, 1);
        mg__req_phase_done(r, phase, 0);
        return;
    }
    if (phase == MG_LUA_ACCESS && w->ref_access_error >= 0) {
        /* The handler runs its access policies without a pcall each (a
         * pcall frame stops LuaJIT from compiling the traces that start
         * in a policy: "NYI: return to lower frame"), so their errors end
         * here: its access_error answers them (the 500 with the request
         * id, the route's filters) in a fresh coroutine. */
        start_access_error(r, s);
        return;
    }
    if (phase == LUA_ACCESS_ERROR) phase = MG_LUA_ACCESS;
    const char *msg = lua_tostring(co, -1);
    luaL_traceback(w->L, co, msg ? msg : "(error object is not a string)", 0);
    mg_log(MG_LOG_ERROR, "request %s: %s", r->v.request_id, lua_tostring(w->L, -1));
    lua_pop(w->L, 1);
    co_put(w, s, 0); /* a dead coroutine cannot run again */
    mg__req_phase_done(r, phase, -1);
}

void mg__lua_start(mg_req_t *r, int phase)
{
    mg_worker_t *w = r->conn->w;
    int ref = phase == MG_LUA_ACCESS          ? w->ref_access
              : phase == MG_LUA_HEADER_FILTER ? w->ref_header_filter
                                              : w->ref_log;
    if (ref < 0) {
        mg__req_phase_done(r, phase, 0);
        return;
    }
    co_slot_t *s = co_get(w);
    if (!s) {
        mg__req_phase_done(r, phase, -1);
        return;
    }
    r->co_slot = s;
    r->lua_phase = phase;
    r->lua_busy = 1;
    lua_rawgeti(s->co, LUA_REGISTRYINDEX, ref);
    /* The handle goes in as a number: LuaJIT compiles ffi.cast from a
     * number to a pointer but not from a lightuserdata (NYI), and the
     * request path must stay compiled. x86-64 addresses fit a double. */
    lua_pushnumber(s->co, (lua_Number)(uintptr_t)r);
    /* and the coroutine itself: moongate.context maps it to r without
     * coroutine.running, which LuaJIT does not compile (a trace stitch
     * per phase) */
    lua_pushthread(s->co);
    resume(r, 2);
}

/* The access coroutine of r died of an error (on its stack top): a new
 * one runs access_error(rp, err, dead, co); the dead one is dropped. */
static void start_access_error(mg_req_t *r, co_slot_t *dead)
{
    mg_worker_t *w = r->conn->w;
    co_slot_t *s = co_get(w);
    if (!s) {
        co_put(w, dead, 0);
        mg__req_phase_done(r, MG_LUA_ACCESS, -1);
        return;
    }
    r->co_slot = s;
    r->lua_phase = LUA_ACCESS_ERROR;
    r->lua_busy = 1;
    lua_rawgeti(s->co, LUA_REGISTRYINDEX, w->ref_access_error);
    lua_pushnumber(s->co, (lua_Number)(uintptr_t)r);
    lua_xmove(dead->co, s->co, 1); /* the error value */
    lua_pushthread(dead->co);
    lua_xmove(dead->co, s->co, 1); /* the coroutine that raised */
    lua_pushthread(s->co);
    co_put(w, dead, 0); /* a dead coroutine cannot run again */
    resume(r, 4);
}

void mg__lua_resume(mg_req_t *r)
{
    if (!r->co_slot) return;
    resume(r, 0);
}

/* Drops the request's coroutine; a suspended one is abandoned to the GC. */
void mg__lua_release(mg_req_t *r)
{
    co_slot_t *s = r->co_slot;
    if (!s) return;
    r->co_slot = NULL;
    r->lua_busy = 0;
    lua_settop(s->co, 0);
    co_put(r->conn->w, s, 0);
}

/* A reload runs in its own coroutine, resumed once per loop turn (an idle
 * handle keeps the loop polling without blocking), so requests are served
 * between its slices on the version in force; the Lua side yields when a
 * slice has used its budget (lua/moongate/slice.lua). A reload asked for
 * during one is remembered and runs when it ends ("signal" wins over the
 * other reasons: it means re-read everything).
 *
 * The handler's reload(reason) returns true (a new version is in force),
 * true and a word (nothing to apply: no log), or nil and why it refused. A
 * worker's reasons are "frame" (the control process sent a version: it
 * starts accepting once the first is in force); the control process's are
 * "signal" and "watch", and it logs what it did itself. */
static struct {
    lua_State *co;
    int ref;
    const char *pending; /* a reason, or NULL */
    int idle_init;
    uv_idle_t idle;
} reload;

static void reload_resume(mg_worker_t *w, int nargs);

static void on_reload_idle(uv_idle_t *h)
{
    reload_resume(h->data, 0);
}

static void reload_done(mg_worker_t *w, lua_State *co, int rc)
{
    int first = w->role == MG_ROLE_WORKER && !w->listening;

    if (rc != 0) {
        mg_log(MG_LOG_ERROR, "reload failed, keeping the current config: %s",
               lua_isstring(co, -1) ? lua_tostring(co, -1) : "?");
    } else if (!lua_toboolean(co, 1)) {
        mg_log(MG_LOG_ERROR, "%s: %s",
               first ? "cannot apply the first configuration"
                     : "reload refused, keeping the current config",
               lua_isstring(co, 2) ? lua_tostring(co, 2) : "?");
    } else if (lua_isnoneornil(co, 2) && w->role == MG_ROLE_WORKER) {
        if (first) {
            mg_log(MG_LOG_INFO, "configuration loaded, accepting connections");
            if (mg__worker_listen(w) != 0) mg__worker_fatal(w, 1);
            return;
        }
        mg_log(MG_LOG_INFO, "reloaded configuration");
        return;
    } else {
        return;
    }
    /* A worker without any version cannot serve: it exits, and the master
     * respawns it (throttled) to try again with the control's latest. */
    if (first) mg__worker_fatal(w, 1);
}

static void reload_resume(mg_worker_t *w, int nargs)
{
    lua_State *co = reload.co;
    int rc = lua_resume(co, nargs);
    if (rc == LUA_YIELD) {
        lua_settop(co, 0);
        uv_idle_start(&reload.idle, on_reload_idle);
        return;
    }
    uv_idle_stop(&reload.idle);
    reload_done(w, co, rc);
    luaL_unref(w->L, LUA_REGISTRYINDEX, reload.ref);
    reload.co = NULL;
    if (reload.pending && !w->stopping) {
        const char *reason = reload.pending;
        reload.pending = NULL;
        mg__lua_reload(w, reason);
    }
}

void mg__lua_reload(mg_worker_t *w, const char *reason)
{
    if (w->ref_reload < 0 || w->L == NULL) return;
    if (reload.co) { /* one at a time; the latest files win */
        if (reload.pending == NULL || strcmp(reason, "signal") == 0) reload.pending = reason;
        return;
    }
    if (!reload.idle_init) {
        uv_idle_init(w->loop, &reload.idle);
        reload.idle.data = w;
        reload.idle_init = 1;
    }
    reload.co = lua_newthread(w->L);
    reload.ref = luaL_ref(w->L, LUA_REGISTRYINDEX); /* anchors the thread */
    lua_rawgeti(reload.co, LUA_REGISTRYINDEX, w->ref_reload);
    lua_pushstring(reload.co, reason);
    reload_resume(w, 1);
}

/* On the main state, between requests: a message of the channel (or NULL:
 * the peer is gone). It may not yield; what it sends is queued. */
void mg__lua_peer(mg_worker_t *w, uint32_t id, const char *data, size_t len)
{
    lua_State *L = w->L;
    int top;

    if (w->ref_peer < 0 || L == NULL) return;
    top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->ref_peer);
    lua_pushnumber(L, (lua_Number)id);
    if (data != NULL)
        lua_pushlstring(L, data, len);
    else
        lua_pushnil(L);
    if (lua_pcall(L, 2, 0, 0) != 0)
        mg_log(MG_LOG_ERROR, "control: peer message: %s",
               lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
    lua_settop(L, top);
}

/* body_filter: runs on the worker's main state (it may not yield, as in
 * OpenResty) for each piece of a proxied response body. *out stays valid
 * until mg__lua_body_filter_done; nil from Lua leaves the piece as it was.
 * -1: the filter raised (logged); the response can only be cut. */
int mg__lua_body_filter(mg_req_t *r, const char *p, size_t len, int eof, const char **out,
                        size_t *out_len)
{
    mg_worker_t *w = r->conn->w;
    lua_State *L = w->L;
    *out = p;
    *out_len = len;
    if (w->ref_body_filter < 0) return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->ref_body_filter);
    lua_pushnumber(L, (lua_Number)(uintptr_t)r);
    lua_pushnumber(L, (lua_Number)(uintptr_t)p);
    lua_pushnumber(L, (lua_Number)len);
    lua_pushboolean(L, eof);
    if (lua_pcall(L, 4, 1, 0) != 0) {
        mg_log(MG_LOG_ERROR, "request %s: body_filter: %s", r->v.request_id, lua_tostring(L, -1));
        lua_settop(L, 0);
        return -1;
    }
    if (lua_type(L, -1) == LUA_TSTRING) *out = lua_tolstring(L, -1, out_len);
    return 0;
}

void mg__lua_body_filter_done(mg_req_t *r)
{
    lua_settop(r->conn->w->L, 0);
}
