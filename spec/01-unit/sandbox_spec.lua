-- moongate.sandbox: policies given as source text (issue 5, item 5). Each
-- escape we could think of is tried here and must fail to load, raise, or
-- see nothing; every loop runs with the JIT on and must be stopped.
local jit = require("jit")
local sandbox = require("moongate.sandbox")
local config = require("moongate.config")
local consumers = require("moongate.consumers")
local policy_modules = require("moongate.policy_modules")
local proc = require("helpers.proc")

local BUDGET = 1000000 -- ~4 ms of interpreted code: the loops below end fast

-- loads src (it must load) and returns the module
local function must_load(src, name)
  local mod, err = sandbox.load(name or "probe", src)
  assert(mod, err)
  return mod
end

-- runs body as the policy's init() and returns what it returned: the
-- policy's view of the world, read outside the sandbox
local function probe(body)
  return must_load("return { init = function(conf) " .. body .. " end }").init({})
end

-- a plain ctx as the worker makes one, without a C request
local function new_ctx(extra)
  local ctx = { vars = {}, params = {}, route = { id = "r1", upstream = "u1", priority = 3 },
                request_id = "rid-1", phase = "access" }
  for k, v in pairs(extra or {}) do
    ctx[k] = v
  end
  return ctx
end

-- the call must raise a message containing each of needles
local function raises(needles, fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error")
  assert.equal("string", type(err))
  for _, n in ipairs(needles) do
    assert.truthy(err:find(n, 1, true), "expected " .. n .. " in: " .. err)
  end
  return err
end

describe("sandbox", function()
  before_each(function()
    sandbox.configure({ max_instructions = BUDGET })
    assert.is_true(jit.status()) -- every loop below runs with the JIT on
  end)

  after_each(function()
    sandbox.configure(nil)
    assert.is_nil(debug.gethook()) -- never left set: hooks are per VM in LuaJIT
  end)

  describe("the environment", function()
    it("has none of the dangerous globals", function()
      local names = { "io", "debug", "ffi", "jit", "load", "loadstring", "dofile", "loadfile",
                      "getfenv", "setfenv", "rawget", "rawset", "rawequal", "rawlen",
                      "collectgarbage", "gcinfo", "newproxy", "coroutine", "module", "package",
                      "print", "_ENV" }
      local body = "return { " .. table.concat((function()
        local t = {}
        for i, n in ipairs(names) do
          t[i] = ("[%q] = type(%s)"):format(n, n)
        end
        return t
      end)(), ", ") .. " }"
      local seen = probe(body)
      for _, n in ipairs(names) do
        assert.equal("nil", seen[n], n .. " is reachable")
      end
    end)

    it("has os.time, os.clock, os.date and os.difftime only", function()
      local seen = probe([[
        local names = {}
        for k in pairs(os) do names[#names + 1] = k end
        table.sort(names)
        return { names = table.concat(names, ","), t = os.time(), c = os.clock() }
      ]])
      assert.equal("clock,date,difftime,time", seen.names)
      assert.is_number(seen.t)
      assert.is_number(seen.c)
    end)

    it("has string without dump, and string methods cannot reach it either", function()
      local seen = probe([[
        return { lib = string.dump, method = ("").dump, meta = getmetatable(""),
                 mt_index = ("").__index, upper = ("abc"):upper() }
      ]])
      assert.same({ upper = "ABC" }, seen)
      -- removed from the worker's own string table: ("").dump is nil anywhere
      assert.is_nil(string.dump)
      assert.is_nil(("").dump)
    end)

    it("has math without randomseed (the worker's PRNG is shared), and bit", function()
      local seen = probe("return { seed = math.randomseed, r = math.random(1, 1), "
                         .. "band = bit.band(6, 3), floor = math.floor(2.5) }")
      assert.same({ r = 1, band = 2, floor = 2 }, seen)
    end)

    it("refuses every module but the allow-list", function()
      for _, m in ipairs({ "ffi", "jit", "io", "os", "debug", "package", "coroutine",
                           "moongate.ffi", "moongate.worker", "moongate.request", "cjson",
                           "cjson.safe", "table.new", "jit.util", "string.buffer" }) do
        local mod, err = sandbox.load("req", ("local m = require(%q) return {}"):format(m))
        assert.is_nil(mod, m .. " was loaded")
        assert.truthy(err:find("module '" .. m .. "' is not available to a sandboxed policy",
                               1, true), err)
      end
      local seen = probe([[
        local mg = require("moongate")
        return { ffi = mg.ffi, json = mg.json.encode({ a = 1 }), now = type(mg.now()),
                 s = require("string") == string, t = require("table") == table }
      ]])
      assert.same({ json = '{"a":1}', now = "number", s = true, t = true }, seen)
    end)

    it("gives a kit of an allow-list: nothing that reaches the ffi, globals or loaders",
       function()
      local seen = probe([[
        local mg = require("moongate")
        local names = {}
        for k in pairs(mg) do names[#names + 1] = k end
        for k in pairs(mg.log) do names[#names + 1] = "log." .. k end
        for k in pairs(mg.json) do names[#names + 1] = "json." .. k end
        table.sort(names)
        return { names = table.concat(names, ",") }
      ]])
      assert.equal("json,json.decode,json.encode,json.null,log,log.debug,log.err,log.error,"
                   .. "log.info,log.warn,now,sleep,version,worker_id", seen.names)
    end)

    it("gives each policy its own copies: changing string, table or math changes nothing else",
       function()
      must_load([[
        string.rep = function() return "hijacked" end
        string.upper = nil
        table.concat = nil
        math.floor = nil
        require("moongate").log = nil
        return {}
      ]], "vandal")
      assert.equal("xx", string.rep("x", 2))
      assert.equal("xx", ("x"):rep(2))
      assert.equal("A", string.upper("a"))
      local seen = probe([[
        return { rep = string.rep("x", 2), upper = string.upper("a"), concat = table.concat({ 1, 2 }),
                 floor = math.floor(1.5), log = type(require("moongate").log.info) }
      ]])
      assert.same({ rep = "xx", upper = "A", concat = "12", floor = 1, log = "function" }, seen)
    end)

    it("makes _G the policy's own environment, and metatables on it stay there", function()
      must_load([[
        _G.leak = "set by a policy"
        setmetatable(_G, { __index = function(_, k) return "hijacked " .. k end })
        return {}
      ]], "globals")
      assert.is_nil(rawget(_G, "leak"))
      assert.is_nil(getmetatable(_G))
      local seen = probe("return { leak = leak, same = _G.string == string }")
      assert.same({ same = true }, seen)
    end)

    it("gives getmetatable for tables only", function()
      local seen = probe([[
        local mt = {}
        return { s = getmetatable(""), n = getmetatable(1), f = getmetatable(print or type),
                 t = getmetatable(setmetatable({}, mt)) == mt,
                 protected = getmetatable(setmetatable({}, { __metatable = "no" })) }
      ]])
      assert.same({ t = true, protected = "no" }, seen)
    end)

    it("refuses bytecode, and load cannot be reached to try it", function()
      local bc = string.char(27) .. "LJ" .. string.char(2, 0)
      local mod, err = sandbox.load("bc", bc)
      assert.is_nil(mod)
      assert.equal("policies/bc: bytecode is refused (Lua source only)", err)
    end)
  end)

  describe("loading", function()
    it("names the policy and the line of a syntax error", function()
      local mod, err = sandbox.load("broken", "return {\n  access = function(conf, ctx)\n"
                                    .. "    local x = = 1\n  end,\n}")
      assert.is_nil(mod)
      assert.equal("policies/broken:3: unexpected symbol near '='", err)
    end)

    it("names the policy and the line of an error at the top level", function()
      local mod, err = sandbox.load("raises", "local t = {}\nreturn t.a.b")
      assert.is_nil(mod)
      assert.equal("policies/raises:2: attempt to index field 'a' (a nil value)", err)
    end)

    it("refuses a module that is not a policy, as a policy file would be", function()
      local cases = {
        { "return 42", "policies/p: did not return a table" },
        { "return { priority = 'high' }", "policies/p: has a priority that is not a number" },
        { "return { access = 'yes' }", "policies/p: has access that is not a function" },
        { "return { init = 1 }", "policies/p: has init that is not a function" },
        { "return { schema = { type = 'objekt' } }", "policies/p: has an invalid schema: " },
      }
      for _, c in ipairs(cases) do
        local mod, err = sandbox.load("p", c[1])
        assert.is_nil(mod)
        assert.equal(c[2], err:sub(1, #c[2]))
      end
    end)

    it("names the kind of a non-string error and never runs its __tostring", function()
      local mod, err = sandbox.load("tbl", [[
        error(setmetatable({}, { __tostring = function() while true do end end }))
      ]])
      assert.is_nil(mod)
      assert.equal("policies/tbl: top level raised a table value", err)
    end)

    it("returns a plain module: metatables and extra fields of the policy's table are dropped",
       function()
      local mod = must_load([[
        local hidden = { access = function() return 403 end }
        return setmetatable({ priority = 7, version = "1.2", extra = "x" },
                            { __index = hidden })
      ]])
      assert.is_nil(getmetatable(mod))
      assert.is_nil(mod.access)
      assert.is_nil(mod.extra)
      assert.equal(7, mod.priority)
      assert.equal("1.2", mod.version)
      assert.is_true(mod.sandboxed)
    end)

    it("keeps a schema that works with the config's validator, its check run in the sandbox",
       function()
      local mod = must_load([[
        return {
          schema = { type = "object", properties = { n = { type = "integer", default = 2 } },
                     check = function(conf)
                       conf.n = 1000 -- a copy: the config keeps its value
                       if conf.n and conf.tag == "bad" then return false, "tag is bad" end
                       return true
                     end },
          access = function() end,
        }
      ]], "sch")
      local loader = function(name) if name == "sch" then return mod end end
      local routes = { routes = { { id = "a", policies = { { name = "sch", conf = {} } } } } }
      local ok = assert(config.validate_routes(routes, { policy_loader = loader }))
      assert.same({ n = 2 }, ok.routes[1].policies[1].conf)
      local bad, errs = config.validate_routes(
        { routes = { { id = "a", policies = { { name = "sch", conf = { tag = "bad" } } } } } },
        { policy_loader = loader })
      assert.is_nil(bad)
      assert.same({ "routes[0].policies[0].conf: tag is bad" }, errs)
    end)

    it("gives init its own copy of the conf", function()
      local mod = must_load([[
        return { init = function(conf) conf.list[1] = "changed"; setmetatable(conf, {}); return conf end }
      ]])
      local conf = { list = { "original" } }
      local got = mod.init(conf)
      assert.equal("original", conf.list[1])
      assert.is_nil(getmetatable(conf))
      assert.equal("changed", got.list[1])
      -- without an init, the phases get a copy too
      local plain = must_load("return { access = function() end }")
      local c2 = plain.init(conf)
      assert.same(conf, c2)
      assert.are_not.equal(conf, c2)
    end)

    it("never hands the phases the framework's conf, whatever init returns", function()
      -- the framework compiles `mod.init(conf) or conf`: an init returning
      -- false must still leave the phases a copy, or a phase could change
      -- (or set a metatable on) the route's conf that trusted code reads
      local mod = must_load([[
        return { init = function() return false end,
                 access = function(conf) conf.list[1] = "changed"; setmetatable(conf, {}) end }
      ]])
      local conf = { list = { "original" } }
      local compiled = mod.init(conf) or conf
      assert.are_not.equal(conf, compiled)
      mod.access(compiled, new_ctx())
      assert.equal("original", conf.list[1])
      assert.is_nil(getmetatable(conf))
    end)
  end)

  describe("the instruction budget (JIT on)", function()
    local loops = {
      ["while true do end"] = "while true do end",
      ["a numeric for to 1e12"] = "local x = 0 for i = 1, 1e12 do x = x + i end",
      ["repeat until false with table writes"] =
        "local t, i = {}, 0 repeat i = i + 1 t[i % 64] = i until false",
      ["a closure made at run time"] =
        "local function mk() return function() local n = 0 while true do n = n + 1 end end end mk()()",
      ["endless tail calls"] = "local function f(n) return f(n + 1) end f(1)",
      ["a loop that pcall swallows errors in"] =
        "while true do pcall(function() while true do end end) end",
      ["an xpcall handler that loops"] =
        "while true do xpcall(error, function() while true do end end) end",
      ["a gsub callback"] = [[("x"):rep(100):gsub(".", function() while true do end end)]],
      ["a table.sort comparator"] =
        "table.sort({ 3, 2, 1 }, function(a, b) while true do end end)",
      ["a metamethod"] =
        "local t = setmetatable({}, { __index = function(t, k) while true do end end }) local _ = t.x",
    }

    for what, loop in pairs(loops) do
      it("stops " .. what .. " at the top level", function()
        local t0 = os.clock()
        local mod, err = sandbox.load("spin", loop .. "\nreturn {}")
        assert.is_nil(mod)
        assert.equal("policies/spin: top level stopped: instruction budget exceeded "
                     .. "(sandbox.max_instructions = " .. BUDGET .. ")", err)
        assert.is_true(os.clock() - t0 < 2)
      end)
    end

    it("stops a loop in a phase, in init and in a schema check", function()
      local mod = must_load([[
        return {
          schema = { type = "object", check = function() while true do end end },
          init = function(conf) local x = 0 for i = 1, 1e12 do x = x + i end end,
          access = function(conf, ctx) while true do end end,
          log = function(conf, ctx) local i = 0 repeat i = i + 1 until false end,
        }
      ]], "spin")
      local stopped = "instruction budget exceeded (sandbox.max_instructions = " .. BUDGET .. ")"
      raises({ "policies/spin: access stopped: ", stopped }, mod.access, {}, new_ctx())
      raises({ "policies/spin: log stopped: ", stopped }, mod.log, {}, new_ctx())
      raises({ "policies/spin: init stopped: ", stopped }, mod.init, {})
      raises({ "policies/spin: schema check stopped: ", stopped }, mod.schema.check, {}, {})
    end)

    it("is per call: each call may use most of it", function()
      local mod = must_load([[
        return { access = function(conf, ctx)
          local x = 0
          for i = 1, conf.n do x = x + i end
          return 200, tostring(x)
        end }
      ]])
      for _ = 1, 5 do
        assert.same({ 200, "500500" }, { mod.access({ n = 1000 }, new_ctx()) })
        assert.same({ 200, "5000050000" }, { mod.access({ n = 100000 }, new_ctx()) })
      end
      raises({ "access stopped" }, mod.access, { n = 1e9 }, new_ctx())
      -- the runner died with the error; the next call gets a fresh one
      assert.same({ 200, "500500" }, { mod.access({ n = 1000 }, new_ctx()) })
    end)

    it("follows sandbox.max_instructions", function()
      local src = "local x = 0 for i = 1, 300000 do x = x + i end return {}"
      sandbox.configure({ max_instructions = 100000 })
      assert.is_nil((sandbox.load("b", src)))
      sandbox.configure({ max_instructions = 10000000 })
      assert.truthy(sandbox.load("b", src))
    end)

    it("turns a stack overflow into an error", function()
      local mod, err = sandbox.load("deep", "local function f() return 1 + f() end f() return {}")
      assert.is_nil(mod)
      assert.truthy(err:find("stack overflow", 1, true), err)
    end)

    it("leaves trusted code alone: no hook outside a sandboxed call", function()
      local mod = must_load("return { access = function() return nil end }")
      mod.access({}, new_ctx())
      assert.is_nil(debug.gethook())
      local x = 0
      for i = 1, 3e7 do -- past the budget, outside the sandbox: never stopped
        x = x + i
      end
      assert.equal(450000015000000, x)
    end)
  end)

  describe("what a phase sees and gives back", function()
    it("sees ctx through a protected view", function()
      local mod = must_load([[
        return { access = function(conf, ctx)
          return 200, {
            meta = getmetatable(ctx), set = pcall(setmetatable, ctx, {}),
            route = ctx.route.id, up = ctx.route.upstream, rid = ctx.request_id,
            phase = ctx.phase, keys = next(ctx),
            route_set = pcall(function() ctx.route.id = "x" end),
            vars_set = pcall(function() ctx.vars = {} end),
            internal = ctx.consumers_index,
          }
        end }
      ]])
      local ctx = new_ctx()
      local _, body = mod.access({}, ctx)
      assert.same({ meta = false, set = false, route = "r1", up = "u1", rid = "rid-1",
                    phase = "access", route_set = false, vars_set = false }, body)
      assert.equal("r1", ctx.route.id)
    end)

    it("refuses a view's method called on anything but its view", function()
      local mod = must_load([[
        return { access = function(conf, ctx)
          local a, ea = pcall(ctx.req.header, { _r = 1 }, "host")
          local b, eb = pcall(ctx.resp.set_header, ctx.req, "x", "y")
          return 200, { a = a, b = b, ea = ea, eb = eb }
        end }
      ]])
      local _, body = mod.access({}, new_ctx({ req = {}, resp = {} }))
      assert.is_false(body.a)
      assert.is_false(body.b)
      assert.truthy(body.ea:find("ctx.req method called without its object", 1, true), body.ea)
      assert.truthy(body.eb:find("ctx.resp method called without its object", 1, true), body.eb)
    end)

    it("shares ctx.vars as plain values: a table put there is a copy without metatable",
       function()
      local mod = must_load([[
        return { access = function(conf, ctx)
          ctx.vars.n = 1
          ctx.vars.t = setmetatable({ a = { b = "c" } },
                                    { __index = function() while true do end end })
          local ok_f = pcall(function() ctx.vars.f = function() end end)
          local mine = ctx.vars.trusted
          mine.x = "changed"
          return 200, { ok_f = ok_f, fn = ctx.vars.fn }
        end }
      ]])
      local ctx = new_ctx()
      ctx.vars.trusted = { x = "kept" }
      ctx.vars.fn = function() end
      local _, body = mod.access({}, ctx)
      assert.same({ ok_f = false }, body)
      assert.equal(1, ctx.vars.n)
      assert.is_nil(getmetatable(ctx.vars.t))
      assert.same({ a = { b = "c" } }, ctx.vars.t)
      assert.is_nil(ctx.vars.t.missing) -- the policy's __index is not there
      assert.equal("kept", ctx.vars.trusted.x)
    end)

    it("sees consumers with its own credentials only, and sets only real ones", function()
      local index = consumers.new({
        { id = "alice", tenant = "acme",
          credentials = { ["key-auth"] = { key = "alice-secret" }, hmac = { secret = "s1" } } },
      })
      local mod = must_load([[
        return { access = function(conf, ctx)
          local c = ctx.consumers:find("hmac", "secret", "s1")
          local by_id = ctx.consumers:get("alice")
          local other = pcall(function() return ctx.consumers:find("key-auth", "key", "alice-secret") end)
          local forged = pcall(function() ctx.consumer = { id = "admin" } end)
          c.id = "mallory" -- its own copy
          ctx.consumer = by_id
          ctx.tenant = "acme"
          return 200, { creds = by_id.credentials, other = other, forged = forged,
                        same = c == by_id }
        end }
      ]], "hmac")
      local ctx = new_ctx({ consumers = index })
      local _, body = mod.access({}, ctx)
      assert.same({ creds = { hmac = { secret = "s1" } }, other = false, forged = false,
                    same = true }, body)
      assert.equal(index:get("alice"), ctx.consumer) -- the real one, unchanged
      assert.equal("alice", ctx.consumer.id)
      assert.equal("acme", ctx.tenant)
    end)

    it("refuses to set other ctx fields, and checks ctx.upstream", function()
      local mod = must_load([[
        return { access = function(conf, ctx)
          local a = pcall(function() ctx.route = {} end)
          local b = pcall(function() ctx.upstream = setmetatable({}, { __tostring = error }) end)
          ctx.upstream = "other"
          return 200, { a = a, b = b }
        end }
      ]])
      local ctx = new_ctx()
      local route = ctx.route
      local _, body = mod.access({}, ctx)
      assert.same({ a = false, b = false }, body)
      assert.equal(route, ctx.route)
      assert.equal("other", ctx.upstream)
    end)

    it("checks what a phase returns", function()
      local mod = must_load([[
        return {
          access = function(conf) return conf.status, conf.body end,
          body_filter = function(conf, ctx, chunk) return conf.piece end,
        }
      ]], "ret")
      assert.same({ 403, "no" }, { mod.access({ status = 403, body = "no" }, new_ctx()) })
      raises({ "policies/ret: access returned a status that is not a number" },
             mod.access, { status = "403" }, new_ctx())
      raises({ "policies/ret: body_filter returned a table (a string or nil)" },
             mod.body_filter, { piece = {} }, new_ctx(), "x", false)
      assert.equal("1", mod.body_filter({ piece = 1 }, new_ctx(), "x", false))
    end)

    it("cannot wait outside a request (the kit's sleep needs one)", function()
      local mod = must_load([[
        return { access = function() require("moongate").sleep(1) end }
      ]], "sleepy")
      raises({ "not in a request" }, mod.access, {}, new_ctx())
    end)
  end)

  describe("policy names", function()
    local dir

    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. dir .. "/sandboxed") == 0)
    end)

    after_each(function()
      os.execute("rm -rf " .. dir)
    end)

    it("a sandboxed policy never shadows a file or built-in one", function()
      proc.write_file(dir .. "/sandboxed/key-auth.lua", "return { access = function() end }")
      proc.write_file(dir .. "/sandboxed/mine.lua", "return { access = function() end }")
      local gen = policy_modules.new():generation({}, { dir = dir .. "/sandboxed",
                                                        sources = { cors = "return {}" } })
      assert.is_nil(gen.get("key-auth").sandboxed)
      assert.is_nil(gen.get("cors").sandboxed)
      assert.is_true(gen.get("mine").sandboxed)
      -- what the Admin API asks before it takes a sandboxed policy's name
      assert.equal(config.policies_dir .. "/key-auth.lua", config.policy_file({}, "key-auth"))
      assert.is_nil(config.policy_file({}, "mine"))
      local loader = config.policy_loader({}, { dir = dir .. "/sandboxed" })
      assert.is_nil(loader("key-auth").sandboxed)
      assert.is_true(loader("mine").sandboxed)
    end)

    it("sources come before the directory, and a changed text loads again", function()
      proc.write_file(dir .. "/sandboxed/p.lua", "return { version = 'dir' }")
      local modules = policy_modules.new()
      local sources = { p = "return { version = 'etcd' }" }
      local g1 = modules:generation({}, { dir = dir .. "/sandboxed", sources = sources })
      assert.equal("etcd", g1.get("p").version)
      local g2 = modules:generation({}, { dir = dir .. "/sandboxed", sources = sources })
      assert.equal(g1.get("p"), g2.get("p")) -- same text: the same module
      sources.p = "return { version = 'etcd2' }"
      local g3 = modules:generation({}, { sources = sources })
      assert.equal("etcd2", g3.get("p").version)
      sources.p = "return {"
      local g4 = modules:generation({}, { sources = sources })
      assert.is_nil(g4.get("p"))
      assert.same({ false, "policies/p:1: unexpected symbol near '<eof>'" },
                  { pcall(g4.loader, "p") })
    end)
  end)
end)
