-- mg.limit: rate limits and concurrency limits, node-wide (the state lives
-- in a shared-memory zone that every worker of the node sees; C does the
-- arithmetic under a per-set lock: runtime/src/limit.c).
--
--   local lim = mg.limit.new{algorithm = "token_bucket", rate = 100, burst = 20}
--   local ok, remaining, reset, retry_after = lim:take(key, n)
--
-- Build limiters once (a policy's init(conf)); take costs one FFI call and
-- allocates nothing.

local ffi = require("ffi")
local binding = require("moongate.ffi")
local context = require("moongate.context")
local shm = require("moongate.shm")

local C = binding.C
local ffi_new = ffi.new
local type = type
local tonumber = tonumber
local error = error
local setmetatable = setmetatable
local math_max = math.max
local math_floor = math.floor

local MG_OK, MG_DECLINED, MG_EINVAL = C.MG_OK, C.MG_DECLINED, C.MG_EINVAL
local MAX_LEVELS = 8

local ALGORITHMS = {
  token_bucket = C.MG_LIMIT_TOKEN_BUCKET,
  fixed_window = C.MG_LIMIT_FIXED_WINDOW,
  sliding_window = C.MG_LIMIT_SLIDING_WINDOW,
}

-- out-parameter cells and take_all's argument arrays, allocated once
local res = ffi_new("mg_limit_result_t")
local results = ffi_new("mg_limit_result_t[?]", MAX_LEVELS)
local zones_arg = ffi_new("mg_shm_zone_t *[?]", MAX_LEVELS)
local keys_arg = ffi_new("const char *[?]", MAX_LEVELS)
local lens_arg = ffi_new("size_t[?]", MAX_LEVELS)
local specs_arg = ffi_new("const mg_limit_spec_t *[?]", MAX_LEVELS)
local current_out = ffi_new("int64_t[1]")

local _M = { results = results, MAX_LEVELS = MAX_LEVELS }

local limiter = {}
limiter.__index = limiter

local function positive(opts, name, who)
  local v = opts[name]
  if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge then -- v ~= v: NaN
    error(who .. ": " .. name .. " must be a positive number", 3)
  end
  return v
end

-- opts: algorithm ("token_bucket" default, "fixed_window",
-- "sliding_window"); token_bucket: rate (per second), burst (the bucket
-- size; default max(rate, 1)); windows: limit (per window), window_ms;
-- zone ("limits" default).
function _M.new(opts)
  local who = "mg.limit.new"
  if type(opts) ~= "table" then
    error(who .. ": expected a table of options", 2)
  end
  local name = opts.algorithm or "token_bucket"
  local algorithm = ALGORITHMS[name]
  if not algorithm then
    error(who .. ": algorithm must be token_bucket, fixed_window or sliding_window", 2)
  end
  local spec = ffi_new("mg_limit_spec_t")
  spec.algorithm = algorithm
  local self = { spec = spec, algorithm = name }
  if name == "token_bucket" then
    local rate = positive(opts, "rate", who)
    local burst = opts.burst
    if burst == nil then
      burst = math_max(rate, 1)
    elseif type(burst) ~= "number" or burst ~= burst or burst <= 0 or burst == math.huge then
      error(who .. ": burst must be a positive number", 2)
    end
    spec.rate, spec.limit = rate, burst
    self.rate, self.limit = rate, burst
  else
    local limit = opts.limit
    if type(limit) ~= "number" or limit ~= limit or limit < 0 or limit == math.huge then
      error(who .. ": limit must be a number >= 0", 2)
    end
    local window_ms = positive(opts, "window_ms", who)
    if window_ms ~= math_floor(window_ms) then
      error(who .. ": window_ms must be an integer", 2)
    end
    spec.limit, spec.window_us = limit, window_ms * 1000
    self.limit, self.window_ms = limit, window_ms
  end
  self.zone_name = opts.zone or "limits"
  self.zone = shm.zone(self.zone_name, who, 2)
  return setmetatable(self, limiter)
end

-- Takes n (default 1; 0 peeks) from key's budget. Returns allowed (boolean),
-- remaining, reset (seconds until the full limit is back) and retry_after
-- (seconds; 0 when allowed, -1 when n can never pass); nil, err when the
-- zone cannot hold the key. A refused take consumes nothing.
function limiter:take(key, n)
  if type(key) ~= "string" then
    error("limiter:take: key must be a string", 2)
  end
  local rc = C.mg_limit_take(self.zone, key, #key, self.spec, n or 1, 0, res)
  if rc ~= MG_OK then
    if rc == MG_EINVAL then
      error("limiter:take: n must be a number >= 0", 2)
    end
    return nil, "mg.limit: " .. shm.reason(rc)
  end
  return res.allowed ~= 0, res.remaining, res.reset, res.retry_after
end

-- All levels or none: takes n from keys[i] of limiters[i] for every i when
-- each admits it, else from none (a request refused at one level consumes
-- nothing at the others). Returns true, or false and the index of the
-- first refusing level; nil, err on a runtime failure. Per-level results
-- until the next call: mg.limit.level(i), or mg.limit.results[i - 1].
function _M.take_all(limiters, keys, n)
  local count = #limiters
  if count == 0 or count > MAX_LEVELS or #keys ~= count then
    error("mg.limit.take_all: 1 to 8 limiters and as many keys", 2)
  end
  for i = 1, count do
    local lim, key = limiters[i], keys[i]
    if type(key) ~= "string" then
      error("mg.limit.take_all: keys[" .. i .. "] must be a string", 2)
    end
    zones_arg[i - 1] = lim.zone
    specs_arg[i - 1] = lim.spec
    keys_arg[i - 1] = key
    lens_arg[i - 1] = #key
  end
  -- keys stays referenced by the caller's table for the call's duration
  local rc = C.mg_limit_take_all(zones_arg, keys_arg, lens_arg, specs_arg, count, n or 1, 0,
                                 results)
  if rc == MG_OK then
    return true
  elseif rc > 0 then
    return false, rc
  elseif rc == MG_EINVAL then
    error("mg.limit.take_all: n must be a number >= 0", 2)
  end
  return nil, "mg.limit: " .. shm.reason(rc)
end

-- Level i of the last take_all: allowed, limit, remaining, reset, retry_after.
function _M.level(i)
  local r = results[i - 1]
  return r.allowed ~= 0, r.limit, r.remaining, r.reset, r.retry_after
end

-- One of at most max concurrent holders of key, for the request being
-- served: the slot goes back when the request ends (after its log phase,
-- on error and on a client that went away too). true, current; false,
-- current at max; nil, err. At most 4 slots per request.
function _M.concurrency(key, max, zone_name)
  if type(key) ~= "string" then
    error("mg.limit.concurrency: key must be a string", 2)
  end
  if type(max) ~= "number" or max < 0 or max ~= math_floor(max) or max > 4294967295 then
    error("mg.limit.concurrency: max must be an integer >= 0", 2)
  end
  local z = shm.zone(zone_name or "limits", "mg.limit.concurrency", 2)
  local r = context.get()
  local rc = C.mg_limit_conc_acquire(r, z, key, #key, max, current_out)
  if rc == MG_OK then
    return true, tonumber(current_out[0])
  elseif rc == MG_DECLINED then
    return false, tonumber(current_out[0])
  elseif rc == MG_EINVAL then
    error("mg.limit.concurrency: at most 4 slots per request", 2)
  end
  return nil, "mg.limit: " .. shm.reason(rc)
end

-- used, capacity, evictions of a zone ("limits" by default).
function _M.stats(zone_name)
  return shm.stats(zone_name or "limits")
end

return _M
