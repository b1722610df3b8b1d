-- Shared-memory zones by name, for mg.limit and mg.breaker: looked up once
-- per name (a linear search of at most 16 names in C), then cached.

local ffi = require("ffi")
local binding = require("moongate.ffi")

local C = binding.C
local ffi_new = ffi.new
local tonumber = tonumber
local type = type
local error = error

local _M = {}

local zones = {}
local used_out = ffi_new("uint64_t[1]")
local cap_out = ffi_new("uint64_t[1]")
local ev_out = ffi_new("uint64_t[1]")

-- The zone handle; raises naming the caller (who) when the node has none.
-- level: as error()'s, counted from the caller of zone().
function _M.zone(name, who, level)
  if type(name) ~= "string" then
    error(who .. ": zone must be a string", level + 1)
  end
  local z = zones[name]
  if z == nil then
    z = C.mg_shm_zone(name, #name)
    if z == nil then
      error(who .. ": no shm zone \"" .. name
            .. "\" (declare it in the node config's shm)", level + 1)
    end
    zones[name] = z
  end
  return z
end

-- used, capacity, evictions of a zone (numbers).
function _M.stats(name)
  local z = _M.zone(name, "mg.shm.stats", 2)
  C.mg_shm_stats(z, used_out, cap_out, ev_out)
  return tonumber(used_out[0]), tonumber(cap_out[0]), tonumber(ev_out[0])
end

-- Outside a worker (specs, tools, benchmarks): the primitives' time is
-- now_us (CLOCK_MONOTONIC microseconds) until set_clock(nil) gives the
-- clock back. Raises in a worker, whose time is its loop's.
function _M.set_clock(now_us)
  if C.mg_shm_set_clock(now_us or 0) ~= C.MG_OK then
    error("mg.shm.set_clock: not in a worker, and now_us >= 0", 2)
  end
end

-- A runtime failure's message.
function _M.reason(rc)
  if rc == C.MG_EFULL then
    return "zone full (every entry of the key's set is held)"
  elseif rc == C.MG_EINVAL then
    return "invalid argument"
  end
  return "error " .. tostring(rc)
end

return _M
