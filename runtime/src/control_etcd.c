/* control_etcd.c: the control process's etcd source, between the driver
 * (etcd.c: the connection's state machine) and the handler's Lua
 * (lua/moongate/control.lua: source_event, which hands bodies and stream
 * pieces to lua/moongate/etcd_source.lua).
 *
 * Lua starts the driver through the FFI (mg_ctl_etcd_start, from the
 * control's init): the first call goes out at once but nothing answers
 * before a later loop turn, and a call that fails at once calls no sink
 * (the driver tells LOST only after a success), so no FFI call re-enters
 * Lua. The sink then runs from loop callbacks, on the main Lua state,
 * between requests, through the Lua C API:
 *
 *   answer, token_or_nil = control.source_event(ev, data)
 *
 * It may not yield. A START_TIMEOUT answered with a negative number means
 * "no etcd and no last-known-good copy": the process exits
 * MG_EXIT_NO_CONFIG and the master stops the node (the message was logged
 * by Lua).
 *
 * One driver per process (the control process has one config source):
 * one TCP connection to etcd per node, whatever the number of workers.
 */
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "etcd.h"
#include "mg.h"
#include "worker.h"

#define MAX_ENDPOINTS 16

static mg_etcd_t *etcd;
static int ref_event = LUA_NOREF;

/* control.source_event on the stack, looked up on first use (from a loop
 * callback, not inside an FFI call) and kept in the registry. */
static int push_event_fn(lua_State *L)
{
    if (ref_event == LUA_NOREF) {
        lua_getglobal(L, "package");
        lua_getfield(L, -1, "loaded");
        lua_getfield(L, -1, "moongate.control");
        if (!lua_istable(L, -1)) {
            lua_pop(L, 3);
            return -1;
        }
        lua_getfield(L, -1, "source_event");
        if (!lua_isfunction(L, -1)) {
            lua_pop(L, 4);
            return -1;
        }
        ref_event = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_pop(L, 3);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref_event);
    return 0;
}

static int64_t sink(void *ud, int ev, const char *data, size_t len, char *tok, size_t cap,
                    size_t *tok_len)
{
    mg_worker_t *w = ud;
    lua_State *L = w->L;
    int64_t rc = MG_ETCD_FAIL;
    int top;

    if (L == NULL) return MG_ETCD_FAIL; /* init has not returned yet: cannot happen (see top) */
    top = lua_gettop(L);
    if (push_event_fn(L) != 0) {
        mg_log(MG_LOG_ERROR, "etcd: moongate.control has no source_event");
        return MG_ETCD_FAIL;
    }
    lua_pushinteger(L, ev);
    lua_pushlstring(L, data, len);
    if (lua_pcall(L, 2, 2, 0) != 0) {
        mg_log(MG_LOG_ERROR, "etcd: %s", lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
    } else {
        rc = lua_isnumber(L, -2) ? (int64_t)lua_tonumber(L, -2) : MG_ETCD_FAIL;
        if (ev == MG_ETCD_EV_AUTH && rc == MG_ETCD_OK) {
            size_t n = 0;
            const char *t = lua_isstring(L, -1) ? lua_tolstring(L, -1, &n) : NULL;
            if (t != NULL && n > 0 && n <= cap) {
                memcpy(tok, t, n);
                *tok_len = n;
            } else {
                rc = MG_ETCD_FAIL;
            }
        }
    }
    lua_settop(L, top);
    if (ev == MG_ETCD_EV_START_TIMEOUT && rc < 0) mg__worker_fatal(w, MG_EXIT_NO_CONFIG);
    return rc;
}

int mg_ctl_etcd_start(const char *endpoints, size_t endpoints_len, const char *key_b64,
                      size_t key_len, const char *end_b64, size_t end_len, const char *auth_body,
                      size_t auth_len, uint32_t timeout_ms, const mg_tls_opts_t *tls, char *err,
                      size_t errlen)
{
    char *eps = NULL, *key = NULL, *end = NULL, *auth = NULL;
    const char *list[MAX_ENDPOINTS];
    int n = 0, rc = MG_EINVAL;
    mg_etcd_sink_t s = {sink, mg__worker};

    if (errlen) err[0] = 0;
    if (etcd != NULL || mg__worker == NULL || mg__worker->role != MG_ROLE_CONTROL) return MG_EINVAL;
    eps = strndup(endpoints, endpoints_len);
    key = strndup(key_b64, key_len);
    end = strndup(end_b64, end_len);
    auth = auth_len > 0 ? strndup(auth_body, auth_len) : NULL;
    if (!eps || !key || !end || (auth_len > 0 && !auth)) {
        rc = MG_ERROR;
        goto out;
    }
    for (char *p = eps, *save = NULL, *t; (t = strtok_r(p, "\n", &save)) != NULL; p = NULL) {
        if (n == MAX_ENDPOINTS) {
            snprintf(err, errlen, "more than %d endpoints", MAX_ENDPOINTS);
            goto out;
        }
        list[n++] = t;
    }
    if (n == 0) goto out;
    mg_etcd_opts_t o = {.endpoints = list,
                        .nendpoints = n,
                        .key_b64 = key,
                        .end_b64 = end,
                        .auth_body = auth,
                        .timeout_ms = timeout_ms,
                        .tls = tls,
                        .err = err,
                        .errlen = errlen};
    etcd = mg__etcd_start(mg__worker->loop, &o, &s); /* copies what it keeps */
    rc = etcd ? MG_OK : MG_EINVAL;
out:
    free(eps);
    free(key);
    free(end);
    free(auth);
    return rc;
}

int mg_ctl_etcd_rerange(void)
{
    if (etcd == NULL) return MG_DECLINED;
    mg__etcd_rerange(etcd);
    return MG_OK;
}

void mg__control_etcd_stop(void)
{
    if (etcd == NULL) return;
    mg__etcd_stop(etcd);
    etcd = NULL;
    if (ref_event != LUA_NOREF && mg__worker && mg__worker->L)
        luaL_unref(mg__worker->L, LUA_REGISTRYINDEX, ref_event);
    ref_event = LUA_NOREF;
}
