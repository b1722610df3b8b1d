/* lua_path.h: where a LuaJIT state finds the moongate modules.
 * Shared by the config loader (node.c) and the worker's Lua state. */
#ifndef MG_LUA_PATH_H
#define MG_LUA_PATH_H

struct lua_State;

/* Prepends "<lua_root>/?.lua;<lua_root>/?/init.lua;" to package.path, so
 * the moongate modules win over any other copy on the default path.
 * Needs the package library open (luaL_openlibs). */
void mg_node_set_lua_path(struct lua_State *L, const char *lua_root);

#endif
