rockspec_format = "3.0"
package = "moongate"
version = "scm-1"
source = {
   url = "git+file:///work/main",
   branch = "main",
}
description = {
   summary = "An API gateway runtime in C with LuaJIT policies",
   detailed = [[
      Moongate is an API gateway: a C runtime (libuv, llhttp, OpenSSL) owns
      sockets, parsing and upstream pools; routes and policies are LuaJIT
      modules reloaded without restarts.
   ]],
   homepage = "https://example.invalid/moongate",
   license = "Apache-2.0",
}
dependencies = {
   "lua == 5.1",
}
build = {
   type = "make",
   build_target = "build",
   build_variables = {
      CFLAGS = "$(CFLAGS)",
      BUILD = "build-rock",
      BIN = "build-rock/moongate",
      INSTALL_LIBDIR = "$(LIBDIR)",
      MG_LUA_DIR_FLAG = "$(LUADIR)",
   },
   install_target = "install",
   install_variables = {
      BUILD = "build-rock",
      BIN = "build-rock/moongate",
      INSTALL_LUADIR = "$(LUADIR)",
      INSTALL_LIBDIR = "$(LIBDIR)",
      INSTALL_BINDIR = "$(BINDIR)",
   },
}
