/* cli_config.c: `moongate config dump|push`, the Admin API's command-line
 * client. The logic is Lua (lua/moongate/admin_cli.lua); this file gives it
 * a blocking HTTP call on the runtime's own client (http_client.c, on a
 * private libuv loop run until the call ends), registered in its state as
 * a C function through the Lua C API. One call at a time: a CLI run makes
 * a few dozen calls to a loopback listener, so the loop per call (and the
 * client kept across calls, for keep-alive) is all it needs.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdlib.h>
#include <string.h>

#include "cli_config.h"
#include "http_client.h"
#include "lua_path.h"
#include "mg.h"
#include "node.h"

#define CLI_MAX_HEADERS 16
#define CLI_MAX_BODY (64u * 1024 * 1024) /* a dump of ~100k routes */

static struct {
    uv_loop_t loop;
    mg_http_client_t *client;
} cli;

typedef struct {
    int status;
    int done;
    int err;
    char msg[256];
    char *body;
    size_t len, cap;
} cli_call_t;

static int on_head(void *ud, int status, const mg_header_t *h, uint32_t nh, int64_t cl)
{
    cli_call_t *c = ud;
    (void)h;
    (void)nh;
    (void)cl;
    c->status = status;
    return 0;
}

static int on_body(void *ud, const char *p, size_t len)
{
    cli_call_t *c = ud;
    int rc = mg__grow(&c->body, &c->cap, c->len, len, 16384, CLI_MAX_BODY);
    if (rc != 0) return rc == UV_E2BIG ? MG_HTTP_ETOOLARGE : MG_HTTP_ENOMEM;
    memcpy(c->body + c->len, p, len);
    c->len += len;
    return 0;
}

static void on_done(void *ud, int err, const char *msg)
{
    cli_call_t *c = ud;
    c->done = 1;
    c->err = err;
    if (err != 0) snprintf(c->msg, sizeof(c->msg), "%s", msg ? msg : "failed");
}

/* http(method, url, headers, body, timeout_ms) -> status, body | nil, err */
static int cli_http(lua_State *L)
{
    mg_header_t hdrs[CLI_MAX_HEADERS];
    mg_http_spec_t s;
    mg_http_cbs_t cbs = {.on_head = on_head, .on_body = on_body, .on_done = on_done};
    cli_call_t c;
    mg_http_call_t *call;
    uint32_t nh = 0;
    int rc;

    memset(&s, 0, sizeof(s));
    memset(&c, 0, sizeof(c));
    s.method = luaL_checklstring(L, 1, &s.method_len);
    s.url = luaL_checklstring(L, 2, &s.url_len);
    if (lua_istable(L, 3)) {
        lua_pushnil(L);
        while (lua_next(L, 3) != 0) {
            size_t nl = 0, vl = 0;
            /* the strings stay referenced by the table while we run; past
             * CLI_MAX_HEADERS (the CLI sends two) the rest are dropped */
            if (nh < CLI_MAX_HEADERS && lua_type(L, -2) == LUA_TSTRING &&
                lua_type(L, -1) == LUA_TSTRING) {
                hdrs[nh].name = lua_tolstring(L, -2, &nl);
                hdrs[nh].value = lua_tolstring(L, -1, &vl);
                hdrs[nh].name_len = (uint32_t)nl;
                hdrs[nh].value_len = (uint32_t)vl;
                nh++;
            }
            lua_pop(L, 1);
        }
    }
    s.headers = hdrs;
    s.nheaders = nh;
    if (lua_isstring(L, 4)) s.body = lua_tolstring(L, 4, &s.body_len);
    s.timeout_ms = (uint32_t)luaL_optinteger(L, 5, 10000);

    if (cli.client == NULL) {
        if (uv_loop_init(&cli.loop) != 0) {
            lua_pushnil(L);
            lua_pushliteral(L, "cannot start an event loop");
            return 2;
        }
        cli.client = mg__http_client_new(&cli.loop, NULL);
        if (cli.client == NULL) {
            lua_pushnil(L);
            lua_pushliteral(L, "out of memory");
            return 2;
        }
    }
    rc = mg__http_start(cli.client, &s, &cbs, &c, &call);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, mg__http_strerror(rc));
        return 2;
    }
    while (!c.done)
        uv_run(&cli.loop, UV_RUN_ONCE);
    if (c.err != 0) {
        free(c.body);
        lua_pushnil(L);
        lua_pushstring(L, c.msg);
        return 2;
    }
    lua_pushinteger(L, c.status);
    lua_pushlstring(L, c.body ? c.body : "", c.len);
    free(c.body);
    return 2;
}

static void cli_close(void)
{
    if (cli.client == NULL) return;
    mg__http_client_free(cli.client);
    cli.client = NULL;
    uv_run(&cli.loop, UV_RUN_DEFAULT); /* the handles' close callbacks */
    uv_loop_close(&cli.loop);
}

int mg_cli_config(const char *sub, const char *file, const char *conf_path)
{
    char root[MG_PATH_MAX];
    lua_State *L;
    int rc = 1;

    if (mg_node_lua_root(root, sizeof(root)) < 0) {
        fprintf(stderr, "moongate: %s\n", root);
        return 1;
    }
    L = luaL_newstate();
    if (L == NULL) {
        fprintf(stderr, "moongate: out of memory\n");
        return 1;
    }
    luaL_openlibs(L);
    mg_node_set_lua_path(L, root);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "moongate.admin_cli");
    if (lua_pcall(L, 1, 1, 0) != 0) {
        fprintf(stderr, "moongate: cannot load moongate.admin_cli: %s\n",
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
        lua_close(L);
        return 1;
    }
    lua_getfield(L, -1, "run");
    lua_pushstring(L, sub);
    if (file != NULL)
        lua_pushstring(L, file);
    else
        lua_pushnil(L);
    lua_pushstring(L, conf_path);
    lua_pushcfunction(L, cli_http);
    if (lua_pcall(L, 4, 1, 0) != 0) {
        fprintf(stderr, "moongate: config %s: %s\n", sub,
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "?");
    } else {
        rc = (int)lua_tointeger(L, -1);
    }
    lua_close(L);
    cli_close();
    return rc;
}
