-- mg.redis: the node's Redis (moongate.json `redis`) from a policy. Each
-- worker has one connection (runtime/src/redis.c), opened at the first use
-- and shared by its requests; a command yields the calling request, never
-- the worker, until the reply, the deadline (redis.timeout_ms) or a failure.
--
--   local n, err = mg.redis.command("INCR", "hits")        -- 1, 2, ...
--   local s = mg.redis.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
--   local v, err = s:eval({ "hits" }, { 5 })               -- EVALSHA, EVAL on NOSCRIPT
--   if not mg.redis.available() then --[[ local fallback, no waiting ]] end
--
-- Replies: integer -> number, bulk and status -> string, nil ->
-- mg.redis.null (= mg.json.null), array -> table (a nested error as
-- {false, "ERR ..."}). An error reply gives nil, "ERR ...", a failure
-- nil, "timeout" or nil, "redis unavailable". Commands need a request (any
-- phase that may yield): they raise outside one.

local ffi = require("ffi")
local cjson = require("cjson.safe")
local binding = require("moongate.ffi")
local context = require("moongate.context")

local C = binding.C
local co_yield = coroutine.yield
local error = error
local ffi_new = ffi.new
local ffi_string = ffi.string
local floor = math.floor
local format = string.format
local getmetatable = getmetatable
local select = select
local setmetatable = setmetatable
local sub = string.sub
local tonumber = tonumber
local tostring = tostring
local type = type

local ok_new, table_new = pcall(require, "table.new")
if not ok_new then
  table_new = function()
    return {}
  end
end

local MG_OK = C.MG_OK
local MG_AGAIN = C.MG_AGAIN
local MG_DECLINED = C.MG_DECLINED
local MG_EINVAL = C.MG_EINVAL
local MG_REDIS_DOWN = C.MG_REDIS_DOWN
local MG_REDIS_UP = C.MG_REDIS_UP
local R_INTEGER = C.MG_REDIS_INTEGER
local R_STRING = C.MG_REDIS_STRING
local R_STATUS = C.MG_REDIS_STATUS
local R_ERROR = C.MG_REDIS_ERROR
local R_ARRAY = C.MG_REDIS_ARRAY

local UNAVAILABLE = "redis unavailable"
local MAX_EXACT = 2 ^ 53

local null = cjson.null

local _M = { null = null }

-- The argument cells, allocated once and grown (never shrunk) when a
-- command has more arguments; `anchors` keeps the argument strings alive
-- until C has copied them into the connection's buffer.
local cap = 0
local argv, argvlen
local anchors = {}

local function reserve(n)
  if n <= cap then
    return
  end
  local c = cap == 0 and 16 or cap
  while c < n do
    c = c * 2
  end
  argv = ffi_new("const char *[?]", c)
  argvlen = ffi_new("size_t[?]", c)
  cap = c
end
reserve(16)

local values_out = ffi_new("const mg_redis_value_t *[1]")
local n_out = ffi_new("size_t[1]")
local err_out = ffi_new("const char *[1]")
local sha_buf = ffi_new("char[40]")

-- A number as Redis reads it: integers without an exponent (tostring
-- gives "1e+15"), others with every digit.
local function arg_string(v, fn, i, level)
  local t = type(v)
  if t == "string" then
    return v
  end
  if t == "number" then
    if v == floor(v) and v >= -MAX_EXACT and v <= MAX_EXACT then
      return format("%d", v)
    end
    return format("%.17g", v)
  end
  error(fn .. ": argument " .. i .. " must be a string or a number, got " .. t, level + 1)
end

local function set(i, s)
  anchors[i] = s
  argv[i - 1] = s
  argvlen[i - 1] = #s
end

-- The reply's values from index i (pre-order); returns the value and the
-- index after it.
local function convert(vals, i)
  local v = vals[i]
  local t = v.type
  if t == R_INTEGER then
    return tonumber(v.integer), i + 1
  elseif t == R_STRING or t == R_STATUS then
    return ffi_string(v.str, v.len), i + 1
  elseif t == R_ARRAY then
    local n = tonumber(v.n)
    local tbl = table_new(n, 0)
    i = i + 1
    for k = 1, n do
      tbl[k], i = convert(vals, i)
    end
    return tbl, i
  elseif t == R_ERROR then
    return { false, ffi_string(v.str, v.len) }, i + 1
  end
  return null, i + 1
end

-- Sends argv[0..n-1] for request r and waits for the outcome.
local function send(r, n, fn, level)
  local rc = C.mg_redis_command(r, n, argv, argvlen)
  local name = anchors[1]
  for i = 1, n do
    anchors[i] = nil
  end
  if rc == MG_AGAIN then
    co_yield()
    rc = C.mg_redis_reply(r, values_out, n_out, err_out)
    if rc == MG_OK then
      local vals = values_out[0]
      if vals[0].type == R_ERROR then
        return nil, ffi_string(vals[0].str, vals[0].len)
      end
      return (convert(vals, 0))
    elseif rc == MG_DECLINED then
      return nil, UNAVAILABLE
    end
    return nil, ffi_string(err_out[0])
  elseif rc == MG_DECLINED then
    return nil, UNAVAILABLE
  elseif rc == MG_EINVAL then
    error(fn .. ": " .. tostring(name) .. " is not allowed (it would change or hold the"
          .. " connection every request of the worker shares; use a script for atomic work)",
          level + 1)
  end
  return nil, "redis: cannot send the command (out of memory)"
end

-- mg.redis.command(name, arg...) -> reply, or nil, err
function _M.command(...)
  local n = select("#", ...)
  if n == 0 then
    error("mg.redis.command: no command given", 2)
  end
  local r = context.get()
  reserve(n)
  for i = 1, n do
    set(i, arg_string((select(i, ...)), "mg.redis.command", i, 2))
  end
  return send(r, n, "mg.redis.command", 2)
end

-- Scripts: compiled once per source (sha1 computed here), run with EVALSHA;
-- a server that does not know the script yet (NOSCRIPT: new, restarted or
-- flushed) gets it with EVAL, which also caches it there.
local script = {}
local script_mt = { __index = script }
local scripts = setmetatable({}, { __mode = "v" })
local EMPTY = {}

function _M.script(source)
  if type(source) ~= "string" or source == "" then
    error("mg.redis.script: the source must be a non-empty string", 2)
  end
  local s = scripts[source]
  if s then
    return s
  end
  if C.mg_sha1_hex(source, #source, sha_buf) ~= MG_OK then
    error("mg.redis.script: cannot hash the source", 2)
  end
  s = setmetatable({ source = source, sha1 = ffi_string(sha_buf, 40) }, script_mt)
  scripts[source] = s
  return s
end

local function fill_eval(verb, body, keys, args)
  local nk, na = #keys, #args
  local n = 3 + nk + na
  reserve(n)
  set(1, verb)
  set(2, body)
  set(3, format("%d", nk))
  for i = 1, nk do
    set(3 + i, arg_string(keys[i], "script:eval: keys", i, 3))
  end
  for i = 1, na do
    set(3 + nk + i, arg_string(args[i], "script:eval: args", i, 3))
  end
  return n
end

-- s:eval(keys, args) -> reply, or nil, err (both lists optional)
function script:eval(keys, args)
  if getmetatable(self) ~= script_mt then
    error("script:eval: call it as s:eval(keys, args)", 2)
  end
  keys = keys or EMPTY
  args = args or EMPTY
  if type(keys) ~= "table" or type(args) ~= "table" then
    error("script:eval: keys and args must be lists", 2)
  end
  local r = context.get()
  local res, err = send(r, fill_eval("EVALSHA", self.sha1, keys, args), "script:eval", 2)
  if res == nil and err and sub(err, 1, 8) == "NOSCRIPT" then
    res, err = send(r, fill_eval("EVAL", self.source, keys, args), "script:eval", 2)
  end
  return res, err
end

-- False only while the connection is down (a command would fail at once):
-- true when up, and while the worker's first connection is being made
-- (commands then wait for it, within the timeout). The first call in a
-- worker starts connecting.
function _M.available()
  return C.mg_redis_state() ~= MG_REDIS_DOWN
end

-- "up", "connecting" or "down".
function _M.state()
  local s = C.mg_redis_state()
  if s == MG_REDIS_UP then
    return "up"
  elseif s == MG_REDIS_DOWN then
    return "down"
  end
  return "connecting"
end

return _M
