-- mg.breaker: circuit breakers, node-wide (state in the "breakers" shm
-- zone; the state machine is runtime/src/breaker.c, which the proxy also
-- calls directly).
--
--   local brk = mg.breaker.new{window_ms = 10000, min_requests = 20,
--                              failure_rate = 0.5, open_ms = 30000}
--   local ok, probe, retry_after = brk:acquire(key)
--   ... brk:report(key, succeeded, duration_ms, probe)

local ffi = require("ffi")
local binding = require("moongate.ffi")
local shm = require("moongate.shm")

local C = binding.C
local ffi_new = ffi.new
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

local function integer(opts, name, min)
  local v = opts[name]
  if v == nil then
    v = DEFAULTS[name]
  end
  if type(v) ~= "number" or v ~= math_floor(v) or v < min or v > 4294967295 then
    error("mg.breaker.new: " .. name .. " must be an integer >= " .. min, 3)
  end
  return v
end

local function rate(opts, name, min_exclusive)
  local v = opts[name]
  if v == nil then
    v = DEFAULTS[name]
  end
  if type(v) ~= "number" or v > 1 or v < 0 or (min_exclusive and v == 0) then
    error("mg.breaker.new: " .. name .. " must be a number in "
          .. (min_exclusive and "(0, 1]" or "[0, 1]"), 3)
  end
  return v
end

-- opts (defaults): window_ms (10000, >= 10), min_requests (20),
-- failure_rate (0.5), slow_ms (0: off), slow_rate (0: off), open_ms
-- (30000), max_open_ms (0: open_ms never grows; above open_ms: each reopen
-- doubles the open time up to it), probes (10), close_after (5), zone
-- ("breakers").
function _M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("mg.breaker.new: expected a table of options", 2)
  end
  local conf = ffi_new("mg_breaker_conf_t")
  conf.window_ms = integer(opts, "window_ms", 10)
  conf.min_requests = integer(opts, "min_requests", 0)
  conf.failure_rate = rate(opts, "failure_rate", true)
  conf.slow_ms = integer(opts, "slow_ms", 0)
  conf.slow_rate = rate(opts, "slow_rate", false)
  conf.open_ms = integer(opts, "open_ms", 1)
  conf.max_open_ms = integer(opts, "max_open_ms", 0)
  conf.probes = integer(opts, "probes", 1)
  conf.close_after = integer(opts, "close_after", 1)
  local zone_name = opts.zone or "breakers"
  local z = shm.zone(zone_name, "mg.breaker.new", 2)
  if C.mg_breaker_state(z, "", 0, 0) == MG_EINVAL then
    error("mg.breaker.new: zone \"" .. zone_name .. "\" holds entries too small for breakers"
          .. " (use \"breakers\" or a zone of your own)", 2)
  end
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

return _M
