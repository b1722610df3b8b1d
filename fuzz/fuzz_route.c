/* fuzz_route.c: libFuzzer target for the route lookup (runtime/src/route.c)
 * on request bytes as a client sends them: any Host, any path.
 *
 * The routers are built once by lua/moongate/router.lua in an embedded
 * LuaJIT state (route.c walks what Lua builds), from routes that reach
 * every part of a lookup: exact paths, prefixes, one to three parameters,
 * exact and wildcard (suffix, prefix) hosts, methods, header and query
 * predicates, priorities; once with records and once without. Their
 * arrays are then copied into malloc'd blocks of exactly the bytes that
 * are in use (nodes made, children's tables, labels written, records,
 * entries...), and each input is looked up in the copies with walk arrays
 * of exactly the sizes moongate.h gives: ASan then sees any read past what
 * the router holds or the contract sizes, which it could not in LuaJIT's
 * own memory.
 *
 * Input: one flag byte (bit 0: the router without records; the others:
 * which predicate checks pass, in turn), then the Host up to the first
 * "\n" (none when empty), then the path (the rest).
 *
 * Oracle, besides ASan/UBSan: the walk ends (at most one predicate check
 * per entry and path segment), and its answer is an entry of the router
 * whose rank is the one the router gives it, ending within the path.
 *
 * Environment: MOONGATE_LUA_DIR (default: <exe>/../../lua).
 */
#include <libgen.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "moongate.h"

/* Builds the two routers; returns, per router, { c = the mg_router_t's
 * address, n = entries, and the bytes in use of each array }. */
static const char *BUILD =
    "local ffi = require('ffi')\n"
    "local router = require('moongate.router')\n"
    "local routes = {\n"
    "  { id = 'e1', paths = { '/', '/a', '/a/b', '/a/b/', '/api/v1/users' } },\n"
    "  { id = 'p1', paths = { '/a/*', '/static/*', '/*' } },\n"
    "  { id = 'm', paths = { '/api/v1/users' }, methods = { 'POST' } },\n"
    "  { id = 'par1', paths = { '/users/:id', '/users/:id/posts' } },\n"
    "  { id = 'par2', paths = { '/o/:o/lines/:l', '/o/:o/lines/:l/*' } },\n"
    "  { id = 'par3', paths = { '/x/:a/:b/:c' } },\n"
    "  { id = 'h1', hosts = { 'api.example.com' }, paths = { '/a/*', '/v/:v' } },\n"
    "  { id = 'h2', hosts = { '*.example.com' }, paths = { '/a/b', '/*' } },\n"
    "  { id = 'h3', hosts = { 'example.*' }, paths = { '/a' }, priority = 5 },\n"
    "  { id = 'hd', paths = { '/a/*' }, headers = { ['x-t'] = { '1', '2' } }, priority = 2 },\n"
    "  { id = 'q', paths = { '/users/:id' }, query = { v = '2' }, priority = 3 },\n"
    "  { id = 'pr', paths = { '/a/b/c/*' }, priority = 1 },\n"
    "  { id = 'long', paths = { '/' .. string.rep('segment', 6) .. '/' .. string.rep('x', 40) } },\n"
    "}\n"
    "for k = 1, 60 do\n"
    "  routes[#routes + 1] = { id = 'g' .. k, paths = { '/g/' .. k, '/g/' .. k .. '/*',\n"
    "    '/g/' .. k .. '/:p/' .. (k % 7) } }\n"
    "end\n"
    "local out = {}\n"
    "for i, records in ipairs({ true, false }) do\n"
    "  local rt = router.new(routes, { records = records,\n"
    "    header = function() return nil end })\n"
    "  local c = rt.c\n"
    "  local t = { c = tonumber(ffi.cast('uintptr_t', ffi.cast('mg_router_t *', c))),\n"
    "    n = rt.n, rt = rt,\n"
    "    nodes = (rt.node_count + 1) * 16 * 4, karr = rt.kuse * 4, labels = rt.loff,\n"
    "    ranks = (rt.n + 1) * 4, next_entry = (rt.n + 1) * 4,\n"
    "    hosts = c.hosts_mask >= 0 and 4 * (c.hosts_mask + 1) * 4 or 0,\n"
    "    host_bytes = ffi.sizeof(rt.host_bytes),\n"
    "    xrec = records and (c.xmask + 1) * 16 * 4 or 0,\n"
    "    xbits = records and (c.xbmask + 1) / 8 or 0,\n"
    "    xshp = records and 3 * (c.xshp_mask + 1) * 4 or 0 }\n"
    "  out[i] = t\n"
    "end\n"
    "return out\n";

typedef struct {
    mg_router_t c; /* pointing at the copies */
    int32_t n;     /* entries */
} fz_router_t;

static fz_router_t routers[2];
static lua_State *L;

static void *copy_of(const void *p, size_t bytes)
{
    void *q = malloc(bytes ? bytes : 1);
    if (!q) abort();
    if (bytes) memcpy(q, p, bytes);
    return q;
}

static size_t field(int t, const char *name)
{
    lua_getfield(L, t, name);
    size_t v = (size_t)lua_tonumber(L, -1);
    lua_pop(L, 1);
    return v;
}

static void lua_dir(char *out, size_t len)
{
    const char *env = getenv("MOONGATE_LUA_DIR");
    if (env && *env) {
        snprintf(out, len, "%s", env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) {
        perror("fuzz_route: readlink /proc/self/exe");
        exit(1);
    }
    exe[n] = '\0';
    snprintf(out, len, "%s/../../lua", dirname(exe)); /* fuzz/build/.. /.. */
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char dir[PATH_MAX], code[2 * PATH_MAX + 64];
    (void)argc;
    (void)argv;
    lua_dir(dir, sizeof(dir));
    L = luaL_newstate();
    luaL_openlibs(L);
    snprintf(code, sizeof(code), "package.path = '%s/?.lua;%s/?/init.lua;' .. package.path", dir,
             dir);
    if (luaL_dostring(L, code) != 0 || luaL_loadstring(L, BUILD) != 0 ||
        lua_pcall(L, 0, 1, 0) != 0) {
        fprintf(stderr, "fuzz_route: building the routers failed: %s\n", lua_tostring(L, -1));
        exit(1);
    }
    int out = lua_gettop(L);
    for (int i = 0; i < 2; i++) {
        lua_rawgeti(L, out, i + 1);
        int t = lua_gettop(L);
        const mg_router_t *src = (const mg_router_t *)(uintptr_t)field(t, "c");
        mg_router_t *c = &routers[i].c;
        *c = *src;
        routers[i].n = (int32_t)field(t, "n");
        c->nodes = copy_of(src->nodes, field(t, "nodes"));
        c->karr = copy_of(src->karr, field(t, "karr"));
        c->labels = copy_of(src->labels, field(t, "labels"));
        c->ranks = copy_of(src->ranks, field(t, "ranks"));
        c->next_entry = copy_of(src->next_entry, field(t, "next_entry"));
        c->hosts = src->hosts_mask >= 0 ? copy_of(src->hosts, field(t, "hosts")) : NULL;
        c->host_bytes = copy_of(src->host_bytes, field(t, "host_bytes"));
        if (src->xrec) {
            c->xrec = copy_of(src->xrec, field(t, "xrec"));
            c->xbits = copy_of(src->xbits, field(t, "xbits"));
            c->xshp = copy_of(src->xshp, field(t, "xshp"));
        }
        lua_pop(L, 1); /* the routers stay referenced by the result table */
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const fz_router_t *r = &routers[data[0] & 1];
    uint8_t passes = data[0] >> 1;
    const uint8_t *rest = data + 1, *nl = memchr(rest, '\n', size - 1);
    size_t host_len = nl ? (size_t)(nl - rest) : 0;
    const uint8_t *p = nl ? nl + 1 : rest;
    size_t path_len = size - 1 - (size_t)(p - rest);

    /* exact-size copies: a read past either is a bug */
    char *host = host_len ? copy_of(rest, host_len) : NULL;
    char *path = copy_of(p, path_len);
    int32_t cap = (int32_t)path_len + 2;
    mg_route_walk_t w;
    memset(&w, 0, sizeof(w));
    w.rt = &r->c;
    w.path = path;
    w.path_len = (int32_t)path_len;
    w.bnd_i = malloc(sizeof(int32_t) * (size_t)cap);
    w.bnd_g = malloc(sizeof(int32_t) * (size_t)cap);
    w.seg_h = malloc(sizeof(int32_t) * (size_t)cap);
    w.stk = malloc(sizeof(int32_t) * 3 * (size_t)cap);
    w.roots = malloc(sizeof(int32_t) * (2 * host_len + 2));
    if (!w.bnd_i || !w.bnd_g || !w.seg_h || !w.stk || !w.roots) abort();

    int rc = mg_route_find(&w, host, (int32_t)host_len);
    long checks = 0, bound = (long)r->n * ((long)path_len + 2) + 16;
    while (rc == MG_ROUTE_CHECK) {
        if (w.check < 1 || w.check > r->n) abort(); /* not an entry */
        if (++checks > bound) abort();               /* the walk does not end */
        rc = mg_route_resume(&w, (passes >> (checks % 7)) & 1);
    }
    if (rc != MG_ROUTE_DONE) abort();
    if (w.best != 0) {
        if (w.best < 1 || w.best > r->n) abort();
        if (w.best_rank != r->c.ranks[w.best]) abort();
        if (w.best_end < 0 || w.best_end > w.path_len) abort();
    }
    free(w.bnd_i);
    free(w.bnd_g);
    free(w.seg_h);
    free(w.stk);
    free(w.roots);
    free(path);
    free(host);
    return 0;
}
