-- mg.breaker: circuit breakers, node-wide (state in the "breakers" shm
-- zone; the state machine is runtime/src/breaker.c, which the proxy also
-- calls directly).
--
--   local brk = mg.breaker.new{window_ms = 10000, min_requests = 20,
--                              failure_rate = 0.5, open_ms = 30000}
--   local ok, probe, retry_after = brk:acquire(key)
--   ... brk:report(key, succeeded, duration_ms, probe)
--
-- In the proxy path (what the circuit-breaker policy uses): the proxy
-- acquires and reports the breaker of each upstream target itself.
--
--   local ub = mg.breaker.upstream{failure_statuses = {500, 502, 503, 504}, ...}
--   ub:attach()          -- in access: this request's targets are guarded

local ffi = require("ffi")
local binding = require("moongate.ffi")
local shm = require("moongate.shm")
local context = require("moongate.context")

local C = binding.C
local ffi_new = ffi.new
local ffi_gc = ffi.gc
local ipairs = ipairs
local type = type
local error = error
local setmetatable = setmetatable
local math_floor = math.floor

local MG_OK, MG_EINVAL = C.MG_OK, C.MG_EINVAL
local STATES = { [0] = "closed", [1] = "open", [2] = "half_open" }

local res = ffi_new("mg_breaker_result_t") -- out-parameter cell, allocated once

local _M = {}

local breaker = {}
breaker.__index = breaker

local DEFAULTS = {
  window_ms = 10000, min_requests = 20, failure_rate = 0.5, slow_ms = 0, slow_rate = 0,
  open_ms = 30000, max_open_ms = 0, probes = 10, close_after = 5,
}

-- level 4: the caller of new() or upstream() (integer <- conf_of <- new)
local function integer(who, opts, name, min)
  local v = opts[name]
  if v == nil then
    v = DEFAULTS[name]
  end
  if type(v) ~= "number" or v ~= math_floor(v) or v < min or v > 4294967295 then
    error(who .. ": " .. name .. " must be an integer >= " .. min, 4)
  end
  return v
end

local function rate(who, opts, name, min_exclusive)
  local v = opts[name]
  if v == nil then
    v = DEFAULTS[name]
  end
  -- v ~= v: NaN passes every comparison, and a NaN rate never opens
  if type(v) ~= "number" or v ~= v or v > 1 or v < 0 or (min_exclusive and v == 0) then
    error(who .. ": " .. name .. " must be a number in "
          .. (min_exclusive and "(0, 1]" or "[0, 1]"), 4)
  end
  return v
end

-- The C conf and the zone of opts (errors at the level of new's caller).
local function conf_of(who, opts)
  if type(opts) ~= "table" then
    error(who .. ": expected a table of options", 3)
  end
  local conf = ffi_new("mg_breaker_conf_t")
  conf.window_ms = integer(who, opts, "window_ms", 10)
  conf.min_requests = integer(who, opts, "min_requests", 0)
  conf.failure_rate = rate(who, opts, "failure_rate", true)
  conf.slow_ms = integer(who, opts, "slow_ms", 0)
  conf.slow_rate = rate(who, opts, "slow_rate", false)
  conf.open_ms = integer(who, opts, "open_ms", 1)
  conf.max_open_ms = integer(who, opts, "max_open_ms", 0)
  conf.probes = integer(who, opts, "probes", 1)
  conf.close_after = integer(who, opts, "close_after", 1)
  local zone_name = opts.zone or "breakers"
  local z = shm.zone(zone_name, who, 3)
  if C.mg_breaker_state(z, "", 0, 0) == MG_EINVAL then
    error(who .. ": zone \"" .. zone_name .. "\" holds entries too small for breakers"
          .. " (use \"breakers\" or a zone of your own)", 3)
  end
  return conf, z, zone_name
end

-- opts (defaults): window_ms (10000, >= 10), min_requests (20),
-- failure_rate (0.5), slow_ms (0: off), slow_rate (0: off), open_ms
-- (30000), max_open_ms (0: open_ms never grows; above open_ms: each reopen
-- doubles the open time up to it), probes (10), close_after (5), zone
-- ("breakers").
function _M.new(opts)
  local conf, z, zone_name = conf_of("mg.breaker.new", opts or {})
  return setmetatable({ conf = conf, zone = z, zone_name = zone_name }, breaker)
end

-- Before calling key's target. Returns allowed, probe (report with it),
-- retry_after (seconds, when refused), state ("closed", "open",
-- "half_open"); nil, err on a runtime failure.
function breaker:acquire(key)
  if type(key) ~= "string" then
    error("breaker:acquire: key must be a string", 2)
  end
  local rc = C.mg_breaker_acquire(self.zone, key, #key, self.conf, 0, res)
  if rc ~= MG_OK then
    return nil, "mg.breaker: " .. shm.reason(rc)
  end
  return res.allowed ~= 0, res.probe ~= 0, res.retry_after, STATES[res.state]
end

-- After the call: succeeded (boolean), duration_ms (slow calls are told by
-- it), probe (what acquire returned). true, or nil, err.
function breaker:report(key, succeeded, duration_ms, probe)
  if type(key) ~= "string" then
    error("breaker:report: key must be a string", 2)
  end
  local rc = C.mg_breaker_report(self.zone, key, #key, self.conf, succeeded and 0 or 1,
                                 duration_ms or 0, probe and 1 or 0, 0)
  if rc ~= MG_OK then
    return nil, "mg.breaker: " .. shm.reason(rc)
  end
  return true
end

-- "closed", "open" or "half_open" (an open breaker past its open time).
function breaker:state(key)
  if type(key) ~= "string" then
    error("breaker:state: key must be a string", 2)
  end
  local s = C.mg_breaker_state(self.zone, key, #key, 0)
  if s < 0 then
    return nil, "mg.breaker: " .. shm.reason(s)
  end
  return STATES[s]
end

-- ---- in the proxy path ------------------------------------------------------

local upstream_breaker = {}
upstream_breaker.__index = upstream_breaker

local DEFAULT_FAILURES = { 500, 502, 503, 504 }

-- A breaker on the targets of whatever upstream a request goes to: the
-- options of new(), plus failure_statuses (the response statuses that are
-- failures; default 500, 502, 503, 504). Build it once (a policy's
-- init(conf)); the C side is freed when it is collected, and requests in
-- flight keep their own reference.
function _M.upstream(opts)
  opts = opts or {}
  local conf, z, zone_name = conf_of("mg.breaker.upstream", opts)
  local list = opts.failure_statuses or DEFAULT_FAILURES
  if type(list) ~= "table" then
    error("mg.breaker.upstream: failure_statuses must be a list of statuses", 2)
  end
  local arr = ffi_new("int[?]", #list + 1)
  for i, st in ipairs(list) do
    if type(st) ~= "number" or st ~= math_floor(st) or st < 100 or st > 999 then
      error("mg.breaker.upstream: failure_statuses[" .. i .. "] must be a status 100..999", 2)
    end
    arr[i - 1] = st
  end
  local h = C.mg_upstream_breaker_new(z, conf, arr, #list)
  if h == nil then
    error("mg.breaker.upstream: out of memory", 2)
  end
  return setmetatable({ handle = ffi_gc(h, C.mg_upstream_breaker_release),
                        probe = setmetatable({ conf = conf, zone = z, zone_name = zone_name },
                                             breaker) }, upstream_breaker)
end

-- In access (or rewrite): the proxy checks the breaker of the target it
-- picks for this request, skips the targets whose breaker refuses, answers
-- 503 with Retry-After when none admits, and reports how the exchange went.
function upstream_breaker:attach()
  local r = context.get()
  if C.mg_req_set_breaker(r, self.handle) ~= MG_OK then
    error("breaker:attach: the request already went to its upstream", 2)
  end
end

-- The state of one target's breaker: "closed", "open" or "half_open".
-- key: "<upstream id>/<host>:<port>", as the proxy names it.
function upstream_breaker:state(key)
  return self.probe:state(key)
end

return _M
