-- The policy kit: `local mg = require("moongate")` (DESIGN.md). One facade
-- for what policies may use, as APISIX's core does.

local ffi = require("ffi")
local cjson = require("cjson.safe")
local binding = require("moongate.ffi")
local context = require("moongate.context")

local C = binding.C
local select = select
local tostring = tostring
local concat = table.concat
local co_yield = coroutine.yield

local MG_AGAIN = C.MG_AGAIN

local _M = { version = "0.1.0-dev" }

local LEVELS = { debug = 0, info = 1, warn = 2, err = 3 }

local function logger(level)
  return function(...)
    local n = select("#", ...)
    local parts = { ... }
    for i = 1, n do
      parts[i] = tostring(parts[i])
    end
    -- concatenated as they are, as ngx.log and kong.log do
    local msg = concat(parts, "", 1, n)
    C.mg_log_write(level, msg, #msg)
  end
end

_M.log = {}
for name, level in pairs(LEVELS) do
  _M.log[name] = logger(level)
end
_M.log.error = _M.log.err

-- Seconds since the epoch, with sub-millisecond precision.
function _M.now()
  return C.mg_time_now()
end

-- Suspends the calling request (not the worker) for ms milliseconds.
function _M.sleep(ms)
  ms = tonumber(ms)
  if not ms or ms < 0 then
    error("mg.sleep: ms must be a non-negative number", 2)
  end
  local r = context.get()
  if C.mg_req_sleep(r, ms) == MG_AGAIN then
    co_yield()
  end
end

local json = cjson.new()
_M.json = {
  encode = json.encode,
  decode = json.decode,
  null = cjson.null,
}

-- mg.http.request{method=, url=, headers=, body=, timeout_ms=, max_body=}
_M.http = require("moongate.http")
-- Node-wide primitives in shared memory (README "policy kit").
_M.limit = require("moongate.limit")
_M.breaker = require("moongate.breaker")

_M.worker_id = function()
  return C.mg_worker_id()
end

-- the node's Redis (lua/moongate/redis.lua)
_M.redis = require("moongate.redis")

_M.ffi = ffi

return _M
