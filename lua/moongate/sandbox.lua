-- Policies given as source text (etcd's <prefix>/policies/<name>, the
-- node's sandbox.policies_dir): compiled and run in a sandbox.
--
--   local mod, err = sandbox.load(name, source)  -- a policy module, or nil
--                                                -- and "policies/<name>:<line>: ..."
--   sandbox.configure{ max_instructions = N }    -- the node's budget
--
-- What the sandbox guarantees (README "Sandboxed policies" says the same
-- to users, with the limits):
--   - The chunk is text only (no bytecode) and runs in a fresh environment
--     per policy: copies of string (no dump), table, math (no randomseed),
--     bit, os.time/clock/date/difftime, the basic functions that touch
--     nothing outside the policy's own values, and require() of an
--     allow-list (moongate -- the kit, without its ffi -- string, table,
--     math, bit). No io, os.execute/exit/getenv, debug, ffi, jit, load,
--     loadstring, dofile, loadfile, string.dump, getfenv/setfenv, rawget/
--     rawset/rawequal, collectgarbage, newproxy, coroutine, module, package;
--     _G is the policy's own environment. string.dump is also removed from
--     the worker's string library, which is what ("").dump reaches (nothing
--     in the gateway dumps bytecode).
--   - Every call into sandboxed code (the chunk's top level, init, a
--     schema check, each phase) runs with an instruction budget: LuaJIT's
--     count hook, in a coroutine of its own, with the JIT off for every
--     function of the chunk (count hooks do not fire inside compiled
--     traces). Past the budget the call raises, and keeps raising at every
--     instruction, so pcall inside the policy cannot swallow it.
--   - The module returned is a new plain table (no metatable), its schema a
--     plain copy; the framework calls wrappers, never the policy's own
--     functions, and trusted code never sees a value the policy made with a
--     metamethod (sandbox_view.lua; errors become strings; return values
--     are checked).
--
-- Costs: a sandboxed call takes a pooled coroutine and two debug.sethook
-- calls (LuaJIT's hooks are global, so it is set for the call and cleared
-- at its end and around every yield); its code runs interpreted. Trusted
-- policies never pay any of it.

local config = require("moongate.config")
local context = require("moongate.context")
local view = require("moongate.sandbox_view")
local mg = require("moongate")
local jit = require("jit")

local type = type
local error = error
local tostring = tostring
local pairs = pairs
local load = load
local byte = string.byte
local sethook = debug.sethook
local co_create = coroutine.create
local co_resume = coroutine.resume
local co_yield = coroutine.yield
local co_running = coroutine.running
local jit_off = jit.off
local copy = view.copy

-- ("").dump would reach the worker's string table: remove it there
string.dump = nil -- luacheck: ignore 122

local _M = {}

local DEFAULT_BUDGET = 10000000
local budget = DEFAULT_BUDGET
local INTERVAL = 10000 -- instructions between two hook calls

-- Sets the instruction budget of one sandboxed call (the node's
-- sandbox.max_instructions). opts nil or without it: the default.
function _M.configure(opts)
  local n = opts and opts.max_instructions
  budget = type(n) == "number" and n >= 1 and n or DEFAULT_BUDGET
end

function _M.budget()
  return budget
end

-- ---- the instruction budget -----------------------------------------------------

local running      -- the coroutine whose instructions are being counted
local used = 0     -- in the current call, in steps of `step`
local step = INTERVAL

-- the error the hook raises; the wrapper turns it into a message naming
-- the policy and the call
local EXCEEDED = "instruction budget exceeded"

local function on_count()
  -- hooks are per VM in LuaJIT: count only the sandboxed call's coroutine
  if co_running() ~= running then
    return
  end
  used = used + step
  if used >= budget then
    if step ~= 1 then
      -- from now on every instruction raises: a pcall in the policy can
      -- catch one, not the next
      step = 1
      sethook(on_count, "", 1)
    end
    error(EXCEEDED, 0)
  end
end

local function hook_on()
  step = used >= budget and 1 or (budget < INTERVAL and budget or INTERVAL)
  sethook(on_count, "", step)
end

local function hook_off()
  sethook()
  running = nil
end

-- Runners: coroutines that call fn(a, b, c, d) and yield DONE with its
-- first two results, then wait for the next call; pooled (a runner whose
-- call raised is dead and dropped).
local DONE = {}
local free, nfree = {}, 0
local MAX_FREE = 64

local function runner_main(fn, a, b, c, d)
  while true do
    fn, a, b, c, d = co_yield(DONE, fn(a, b, c, d))
  end
end

local function err_text(e)
  local t = type(e)
  if t == "string" then
    return e
  elseif t == "number" then
    return tostring(e)
  end
  -- never tostring() a table of the policy: its __tostring would run here
  return "raised a " .. t .. " value"
end

-- Calls the sandboxed fn(a, b, c, d) within the budget; returns its first
-- two results, or raises "policies/<name>: <what>: ..." (a string). what
-- names the call ("access", "init", "top level"...). A yield of the policy
-- kit (mg.sleep, ctx.req:body()) goes through to the request's coroutine:
-- the hook is off meanwhile and the count goes on after it.
local function call(label, what, fn, a, b, c, d)
  if running ~= nil and co_running() == running then
    return fn(a, b, c, d) -- already counted (a call made by sandboxed code)
  end
  local co
  if nfree > 0 then
    co = free[nfree]
    free[nfree] = nil
    nfree = nfree - 1
  else
    co = co_create(runner_main)
  end
  local outer = co_running()
  context.inherit(co)
  used = 0
  running = co
  hook_on()
  local ok, tag, r1, r2 = co_resume(co, fn, a, b, c, d)
  while true do
    hook_off()
    if not ok then
      if tag == EXCEEDED then
        error(label .. ": " .. what .. " stopped: instruction budget exceeded"
              .. " (sandbox.max_instructions = " .. budget .. ")", 0)
      end
      local msg = err_text(tag)
      if type(tag) ~= "string" then
        msg = label .. ": " .. what .. " " .. msg
      end
      error(msg, 0)
    end
    if tag == DONE then
      if nfree < MAX_FREE then
        nfree = nfree + 1
        free[nfree] = co
      end
      return r1, r2
    end
    -- a yield of the policy kit: C resumes the request's coroutine when
    -- its wait ends (nothing is passed either way)
    if outer == nil then
      error(label .. ": " .. what .. " cannot wait here (only a request's phases can)", 0)
    end
    local spent = used
    co_yield()
    used = spent
    running = co
    context.inherit(co)
    hook_on()
    ok, tag, r1, r2 = co_resume(co)
  end
end

-- ---- the environment ------------------------------------------------------------

local function copy_lib(lib, except)
  local out = {}
  for k, v in pairs(lib) do
    if not (except and except[k]) then
      out[k] = v
    end
  end
  return out
end

local function safe_getmetatable(v)
  -- strings' metatable is the worker's; cdata and userdata are not the
  -- policy's business
  if type(v) ~= "table" then
    return nil
  end
  return getmetatable(v)
end

local BASICS = {
  "assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring",
  "type", "unpack", "xpcall", "setmetatable",
}

local ALLOWED_MODULES = "moongate, string, table, math, bit"

-- the kit a sandboxed policy gets from require("moongate"): its own copy,
-- an allow-list (a function added to the kit later is not exposed until it
-- is reviewed for the sandbox)
local function kit()
  return {
    version = mg.version,
    log = copy_lib(mg.log),
    now = mg.now,
    sleep = mg.sleep,
    json = { encode = mg.json.encode, decode = mg.json.decode, null = mg.json.null },
    worker_id = mg.worker_id,
  }
end

local function new_env()
  local env = {}
  for _, k in ipairs(BASICS) do
    env[k] = _G[k]
  end
  env.getmetatable = safe_getmetatable
  env._VERSION = _VERSION
  env.string = copy_lib(string, { dump = true })
  env.table = copy_lib(table)
  env.math = copy_lib(math, { randomseed = true }) -- the worker's PRNG state is shared
  env.bit = copy_lib(require("bit"))
  env.os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime }
  env._G = env
  local modules = {
    moongate = kit(), string = env.string, table = env.table, math = env.math, bit = env.bit,
  }
  env.require = function(name)
    local m = type(name) == "string" and modules[name] or nil
    if m == nil then
      error("module '" .. tostring(name) .. "' is not available to a sandboxed policy"
            .. " (allowed: " .. ALLOWED_MODULES .. ")", 2)
    end
    return m
  end
  return env
end

-- ---- the module ------------------------------------------------------------------

local PHASES = { "rewrite", "access", "header_filter", "body_filter", "log" }

-- what rewrite and access may return: nil, or a status and a body that
-- the framework sends as it is (a string) or as JSON (a table: cjson reads
-- it raw, no metamethod runs)
local function check_answer(label, what, status, body)
  if status and type(status) ~= "number" then
    error(label .. ": " .. what .. " returned a status that is not a number", 0)
  end
  local tb = type(body)
  if body ~= nil and tb ~= "string" and tb ~= "number" and tb ~= "table" then
    error(label .. ": " .. what .. " returned a " .. tb .. " body (a string or a table)", 0)
  end
end

-- The wrapper the framework calls for phase what of the policy's fn.
local function wrap_phase(label, name, what, fn)
  if what == "body_filter" then
    return function(conf, ctx, chunk, eof)
      local res = call(label, what, fn, conf, view.ctx(ctx, name), chunk, eof)
      local t = type(res)
      if res ~= nil and t ~= "string" then
        if t ~= "number" then
          error(label .. ": body_filter returned a " .. t .. " (a string or nil)", 0)
        end
        res = tostring(res)
      end
      return res
    end
  elseif what == "rewrite" or what == "access" then
    return function(conf, ctx)
      local status, body = call(label, what, fn, conf, view.ctx(ctx, name))
      check_answer(label, what, status, body)
      return status, body
    end
  end
  return function(conf, ctx)
    call(label, what, fn, conf, view.ctx(ctx, name))
  end
end

-- init(conf) gets its own copy of the validated conf (the framework keeps
-- the original with the route); without an init, the phases get that copy.
local function wrap_init(label, fn)
  return function(conf)
    local own = copy(conf)
    if fn == nil then
      return own
    end
    local res = call(label, "init", fn, own)
    if not res then
      -- as the framework does (`mod.init(conf) or conf`), but with the
      -- copy: a false from init must not hand the phases the route's own
      -- conf, which trusted code keeps and reads
      return own
    end
    return res
  end
end

-- a function in the schema (check = function(value, root)): on copies,
-- and its verdict as the validator expects it
local function wrap_check(label, fn)
  return function(value, root)
    local ok, msg = call(label, "schema check", fn, copy(value), copy(root))
    if ok then
      return true
    end
    return false, type(msg) == "string" and msg or (type(msg) == "number" and tostring(msg) or nil)
  end
end

-- the module the framework uses, from the table the chunk returned
local function sanitize(label, name, res)
  local mod = {
    name = name,
    sandboxed = true,
    version = type(rawget(res, "version")) == "string" and rawget(res, "version") or nil,
    priority = rawget(res, "priority"),
  }
  local schema = rawget(res, "schema")
  if schema ~= nil then
    if type(schema) == "table" then
      mod.schema = copy(schema, function(fn) return wrap_check(label, fn) end)
    else
      mod.schema = schema -- policy_problem names it
    end
  end
  local init = rawget(res, "init")
  if init ~= nil and type(init) ~= "function" then
    mod.init = init
  else
    mod.init = wrap_init(label, init)
  end
  for _, ph in ipairs(PHASES) do
    local fn = rawget(res, ph)
    if type(fn) == "function" then
      mod[ph] = wrap_phase(label, name, ph, fn)
    else
      mod[ph] = fn
    end
  end
  return mod
end

-- Compiles the policy name from source and runs its top level in the
-- sandbox. Returns the module table (as a policy file's, plus
-- sandboxed = true), or nil and a message naming the policy and, for a
-- syntax or runtime error, the line: "policies/<name>:<line>: ...".
function _M.load(name, source)
  if type(name) ~= "string" then
    error("name must be a string", 2)
  end
  local label = "policies/" .. name
  if type(source) ~= "string" then
    return nil, label .. ": source must be a string"
  end
  if byte(source, 1) == 27 then
    return nil, label .. ": bytecode is refused (Lua source only)"
  end
  local env = new_env()
  local chunk, err = load(source, "=" .. label, "t", env)
  if not chunk then
    return nil, err
  end
  -- every function the chunk creates shares its prototypes: none is ever
  -- compiled to a trace, so the count hook sees all their instructions
  jit_off(chunk, true)
  local ok, res = pcall(config.run_policy, function(...)
    return call(label, "top level", chunk, ...)
  end, name, label)
  if not ok then
    return nil, err_text(res)
  end
  local mok, mod = pcall(sanitize, label, name, res)
  if not mok then
    return nil, label .. ": " .. err_text(mod)
  end
  local problem = config.policy_problem(mod)
  if problem then
    return nil, label .. ": " .. problem
  end
  return mod
end

return _M
