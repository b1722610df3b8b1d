-- rate-limit: requests per key (consumer, tenant, client address, route,
-- a header, or several of these combined), with one limit or a hierarchy of
-- limits (tenant, consumer, route...) taken all together or not at all.
--
--   {"name": "rate-limit", "conf": {"rate": 100, "burst": 20, "key": "consumer"}}
--   {"name": "rate-limit", "conf": {"algorithm": "fixed_window", "limits": [
--      {"key": "tenant", "limit": 1000, "window_ms": 1000},
--      {"key": "consumer", "limit": 100, "window_ms": 1000},
--      {"key": "route", "limit": 10, "window_ms": 1000}]}}
--
-- policy "local" (default): the node's shared-memory limiter (mg.limit),
-- exact across the node's workers. policy "redis": one server-side script
-- per decision (mg.redis; EVALSHA, EVAL on NOSCRIPT) holding every level,
-- timed by Redis' own clock, so that every gateway sharing the Redis shares
-- the limit; while Redis is down or slower than redis.timeout_ms, the
-- `fallback` decides ("local": the shared-memory limiter, "allow", "deny").
--
-- Refused: 429 {"error": "API rate limit exceeded"} with Retry-After
-- (integer seconds, rounded up). RateLimit-Limit, -Remaining and -Reset go
-- on every answer of the route (headers = false: none), from the level
-- closest to refusal (the refusing one on a 429).
--
-- Keys: see key_part below for what each source reads and what a missing
-- one falls back to. A key is "<scope>|<window>|<parts>", each part tagged
-- with its source and length-prefixed, so no header value can forge
-- another part or another source's key.
local mg = require("moongate")

local ceil = math.ceil
local floor = math.floor
local concat = table.concat
local lower = string.lower
local sub = string.sub
local type = type
local ipairs = ipairs

local mg_limit = mg.limit
local results = mg_limit.results -- take_all's per-level cells
local take_all = mg_limit.take_all
local redis = mg.redis
local log = mg.log

local REFUSED = { error = "API rate limit exceeded" }
local UNAVAILABLE = { error = "rate limiting unavailable" }
local MAX_LEVELS = 8

local ALGORITHM_CODE = { token_bucket = 1, fixed_window = 2, sliding_window = 3 }

---------------------------------------------------------------------------
-- Schema
---------------------------------------------------------------------------

local KEY_NAME = "^header:[%w!#%$%%&'%*%+%-%.%^_`|~]+$"
local SOURCES = { consumer = true, tenant = true, ip = true, route = true }

local key_item = {
  type = "string",
  check = function(v)
    if SOURCES[v] or v:find(KEY_NAME) then
      return true
    end
    return false, "must be consumer, tenant, ip, route or header:<name>, got " .. v
  end,
}

local key_schema = {
  oneOf = {
    key_item,
    { type = "array", items = key_item, minItems = 1, maxItems = 8, uniqueItems = true },
  },
}

local ALGORITHMS = { "token_bucket", "fixed_window", "sliding_window" }

-- the fields one limit has, at the top level or as an entry of `limits`
local function limit_properties(top)
  return {
    algorithm = { type = "string", enum = ALGORITHMS, default = top and "token_bucket" or nil },
    rate = { type = "number", exclusiveMinimum = 0, maximum = 1e9 },
    burst = { type = "number", minimum = 1, maximum = 1e9 },
    limit = { type = "integer", minimum = 1, maximum = 1e12 },
    window_ms = { type = "integer", minimum = 1, maximum = 366 * 86400 * 1000 },
    key = key_schema,
  }
end

-- token_bucket takes rate (+ burst); the windows take limit + window_ms
local function check_limit(l, algorithm)
  if algorithm == "token_bucket" then
    if l.rate == nil then
      return false, "token_bucket needs rate (requests per second)"
    elseif l.limit ~= nil or l.window_ms ~= nil then
      return false, "token_bucket takes rate and burst, not limit and window_ms"
    end
  else
    if l.limit == nil or l.window_ms == nil then
      return false, algorithm .. " needs limit and window_ms"
    elseif l.rate ~= nil or l.burst ~= nil then
      return false, algorithm .. " takes limit and window_ms, not rate and burst"
    end
  end
  return true
end

local function key_list(key)
  return type(key) == "string" and { key } or key
end

-- What makes two levels the same counter: their key sources and the
-- algorithm with its window (the rate of a bucket may change on a reload
-- and keep the bucket's state).
local function level_signature(algorithm, window_ms, keys)
  local sig
  if algorithm == "token_bucket" then
    sig = "tb"
  else
    sig = (algorithm == "fixed_window" and "fw" or "sw") .. window_ms
  end
  return sig, concat(keys, "+")
end

local level_schema = {
  type = "object",
  additionalProperties = false,
  properties = limit_properties(false),
}

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    algorithm = limit_properties(true).algorithm,
    rate = limit_properties(true).rate,
    burst = limit_properties(true).burst,
    limit = limit_properties(true).limit,
    window_ms = limit_properties(true).window_ms,
    key = { oneOf = key_schema.oneOf, default = "consumer" },
    limits = { type = "array", items = level_schema, minItems = 1, maxItems = MAX_LEVELS },
    policy = { type = "string", enum = { "local", "redis" }, default = "local" },
    fallback = { type = "string", enum = { "local", "allow", "deny" }, default = "local" },
    headers = { type = "boolean", default = true },
    group = { type = "string", minLength = 1, maxLength = 128 },
    redis_prefix = { type = "string", minLength = 1, maxLength = 128, default = "moongate:rl" },
  },
  check = function(conf)
    if conf.limits == nil then
      return check_limit(conf, conf.algorithm)
    end
    if conf.rate ~= nil or conf.burst ~= nil or conf.limit ~= nil or conf.window_ms ~= nil then
      return false, "give either limits or one limit (rate/burst, limit/window_ms), not both"
    end
    local seen = {}
    for i, l in ipairs(conf.limits) do
      local algorithm = l.algorithm or conf.algorithm
      local ok, err = check_limit(l, algorithm)
      if not ok then
        return false, "limits[" .. (i - 1) .. "]: " .. err
      end
      local sig, keys = level_signature(algorithm, l.window_ms, key_list(l.key or conf.key))
      local id = sig .. "|" .. keys
      if seen[id] then
        return false, "limits[" .. (i - 1) .. "] has the key and window of limits[" .. (seen[id] - 1)
            .. "]: they would be one counter"
      end
      seen[id] = i
    end
    return true
  end,
}

---------------------------------------------------------------------------
-- Keys
---------------------------------------------------------------------------

-- One part of a key: "<source>=<length>:<value>". The source is the one
-- actually used: a missing tenant falls back to the consumer (a consumer
-- without a tenant is a tenant of its own), a missing consumer or header
-- to the client's address, so a header can never pose as a consumer.
local function part(tag, v)
  return tag .. "=" .. #v .. ":" .. v
end

local function ip_part(ctx)
  return part("ip", ctx.req.remote_addr)
end

-- the raw value of a source whose values come from the config (nil when
-- missing: the key then takes the fallback part, uncached)
local VALUE_OF = {
  consumer = function(ctx)
    local c = ctx.consumer
    local id = c and c.id
    if type(id) == "string" then
      return id
    end
  end,
  tenant = function(ctx)
    local t = ctx.tenant
    if type(t) == "string" and t ~= "" then
      return t
    end
  end,
  route = function(ctx)
    return ctx.route.id
  end,
}
local consumer_of, tenant_of = VALUE_OF.consumer, VALUE_OF.tenant

local function consumer_part(ctx)
  local id = consumer_of(ctx)
  if id then
    return part("consumer", id)
  end
  return ip_part(ctx)
end

local function tenant_part(ctx)
  local t = tenant_of(ctx)
  if t then
    return part("tenant", t)
  end
  return consumer_part(ctx)
end

local function route_part(ctx)
  return part("route", ctx.route.id)
end

local PART_OF = { consumer = consumer_part, tenant = tenant_part, ip = ip_part, route = route_part }

local function header_part_fn(name)
  local tag = "header:" .. name
  return function(ctx)
    local v = ctx.req:header(name)
    if v == nil or v == "" then
      return ip_part(ctx)
    end
    return part(tag, v)
  end
end

---------------------------------------------------------------------------
-- Redis: every level in one script, all or nothing
---------------------------------------------------------------------------

-- KEYS[i]: level i's key. ARGV[1]: units to take; then per level:
-- algorithm (1 token bucket, 2 fixed window, 3 sliding window), limit (the
-- burst of a bucket), rate (per second), window_ms. The same arithmetic as
-- runtime/src/limit.c, on Redis' clock (TIME: the gateways' clocks do not
-- matter). A hash per key: a, b, c = bucket level, last refill (µs) |
-- window index, count | window index, current, previous; written only when
-- every level admits, with a PEXPIRE past the time its state is fresh
-- again. Returns {refused level or 0, then per level remaining, reset_ms,
-- retry_ms (-1: never)}.
local SCRIPT = [[
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local floor, ceil, fmt = math.floor, math.ceil, string.format
local out, st, refused = { 0 }, {}, 0
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 4
  local alg, lim, rate = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local W = tonumber(ARGV[j + 3]) * 1000
  local h = redis.call('HMGET', KEYS[i], 'a', 'b', 'c')
  local a, b, c = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0
  local ok, rem, reset, retry, expires = false, 0, 0, 0, now
  if alg == 1 then
    if now > b then
      a = a - rate * (now - b) / 1e6
      if a < 0 then a = 0 end
      b = now
    end
    if a > lim then a = lim end
    ok = a + n <= lim
    if ok then a = a + n elseif n > lim then retry = -1 else retry = (a + n - lim) / rate end
    rem = lim - a
    reset = a / rate
    expires = b + ceil(reset * 1e6)
  elseif alg == 2 then
    local w = floor(now / W)
    if w > a then a = w; b = 0 end
    local e = (a + 1) * W
    ok = b + n <= lim
    if ok then b = b + n end
    rem = lim - b
    reset = (e - (now < e and now or e)) / 1e6
    if not ok then retry = n > lim and -1 or reset end
    expires = e
  else
    local w = floor(now / W)
    if w == a + 1 then c = b; b = 0 elseif w > a + 1 then c = 0; b = 0 end
    if w > a then a = w end
    local e = now - a * W
    if e < 0 then e = 0 end
    if e > W then e = W end
    local count = c * (W - e) / W + b
    ok = count + n <= lim
    if ok then
      b = b + n
      count = count + n
    elseif n > lim then
      retry = -1
    elseif b + n <= lim then
      local d = (W - e) - (lim - b - n) * W / c
      retry = (d > 0 and d or 0) / 1e6
    else
      local d = W - (lim - n) * W / b
      retry = ((W - e) + (d > 0 and d or 0)) / 1e6
    end
    rem = lim - count
    reset = (W - e) / 1e6
    expires = (a + 2) * W
  end
  if not ok and refused == 0 then refused = i end
  st[i] = { a, b, c, expires }
  out[#out + 1] = rem > 0 and floor(rem) or 0
  out[#out + 1] = ceil(reset * 1000)
  out[#out + 1] = retry < 0 and -1 or ceil(retry * 1000)
end
if refused == 0 then
  for i = 1, #KEYS do
    local s = st[i]
    local ttl = ceil((s[4] - now) / 1000) + 1000
    redis.call('HSET', KEYS[i], 'a', fmt('%.17g', s[1]), 'b', fmt('%.17g', s[2]),
               'c', fmt('%.17g', s[3]))
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
out[1] = refused
return out
]]

local script = redis.script(SCRIPT)

-- Per worker: whether the last Redis decision worked, so that a switch to
-- the fallback and the way back are logged once each (mg.redis logs the
-- connection's own changes).
local on_redis = true

-- Requests refused per route id in this worker (for the metrics to come:
-- gateway_ratelimit_rejected_total{route}).
local rejected = {}

---------------------------------------------------------------------------
-- init: limiters, key builders and the Redis arguments, once per version
---------------------------------------------------------------------------

local function init(conf)
  local list = conf.limits or { conf }
  local c = {
    policy = conf.policy, fallback = conf.fallback, headers = conf.headers,
    group = conf.group, prefix = conf.redis_prefix .. ":",
    count = #list, levels = {}, limiters = {}, keys = {},
    redis_keys = {}, redis_args = { 1 },
    scopes = {}, -- route id -> "<scope>|" (a group shares one)
  }
  if conf.group then
    c.group_scope = part("group", conf.group) .. "|"
  end
  for i, l in ipairs(list) do
    local algorithm = l.algorithm or conf.algorithm
    local keys = key_list(l.key or conf.key)
    local sig = level_signature(algorithm, l.window_ms, keys)
    local fns = {}
    for k, name in ipairs(keys) do
      if sub(name, 1, 7) == "header:" then
        fns[k] = header_part_fn(lower(sub(name, 8)))
      else
        fns[k] = PART_OF[name]
      end
    end
    local lim = mg_limit.new{ algorithm = algorithm, rate = l.rate, burst = l.burst,
                              limit = l.limit, window_ms = l.window_ms }
    c.limiters[i] = lim
    c.levels[i] = {
      sig = sig .. "|", fns = fns, nparts = #fns,
      value_of = #keys == 1 and VALUE_OF[keys[1]] or nil, cache = {},
    }
    local args, j = c.redis_args, 1 + (i - 1) * 4
    args[j + 1] = ALGORITHM_CODE[algorithm]
    args[j + 2] = lim.limit
    args[j + 3] = lim.rate or 0
    args[j + 4] = lim.window_ms or 0
  end
  -- state changes in the first worker that uses Redis are seen from here
  if c.policy == "redis" then
    redis.available()
  end
  return c
end

local function scope_of(c, ctx)
  if c.group_scope then
    return c.group_scope
  end
  local id = ctx.route.id
  local s = c.scopes[id]
  if not s then
    s = part("route", id) .. "|"
    c.scopes[id] = s
  end
  return s
end

local parts_buf = {}

local function level_key(lv, scope, ctx)
  local fns = lv.fns
  if lv.nparts == 1 then
    local value_of = lv.value_of
    local v = value_of and value_of(ctx)
    if v then
      -- a consumer, tenant or route id: from the config, so bounded; the
      -- key is built once per (scope, value) and kept for the version
      local by_scope = lv.cache[scope]
      if not by_scope then
        by_scope = {}
        lv.cache[scope] = by_scope
      end
      local k = by_scope[v]
      if not k then
        k = scope .. lv.sig .. fns[1](ctx)
        by_scope[v] = k
      end
      return k
    end
    return scope .. lv.sig .. fns[1](ctx)
  end
  for i = 1, lv.nparts do
    parts_buf[i] = fns[i](ctx)
  end
  return scope .. lv.sig .. concat(parts_buf, "|", 1, lv.nparts)
end

-- Unrolled for up to three levels: a loop of one to three turns entered
-- per request is one LuaJIT gives up on, and with it the request's trace.
local function fill_keys(c, ctx)
  local scope = scope_of(c, ctx)
  local keys, levels, count = c.keys, c.levels, c.count
  keys[1] = level_key(levels[1], scope, ctx)
  if count == 1 then
    return
  end
  keys[2] = level_key(levels[2], scope, ctx)
  if count == 2 then
    return
  end
  keys[3] = level_key(levels[3], scope, ctx)
  for i = 4, count do
    keys[i] = level_key(levels[i], scope, ctx)
  end
end

---------------------------------------------------------------------------
-- Decisions
---------------------------------------------------------------------------

-- Whole numbers: set_header hands them to C, which formats them (no string
-- per request).
local function set_headers(ctx, limit, remaining, reset)
  local resp = ctx.resp
  resp:set_header("RateLimit-Limit", floor(limit))
  resp:set_header("RateLimit-Remaining", remaining > 0 and floor(remaining) or 0)
  resp:set_header("RateLimit-Reset", ceil(reset))
end

-- retry_after < 0 (the request can never pass this level): the time until
-- the level is whole again, at least a second
local function refuse(ctx, retry_after, reset)
  local id = ctx.route.id
  rejected[id] = (rejected[id] or 0) + 1
  local secs = retry_after >= 0 and ceil(retry_after) or ceil(reset)
  ctx.resp:set_header("Retry-After", secs > 0 and secs or 1)
  return 429, REFUSED
end

local function decide_local(c, ctx)
  local keys, count = c.keys, c.count
  local ok, limit, remaining, reset, retry_after
  if count == 1 then
    local lim = c.limiters[1]
    ok, remaining, reset, retry_after = lim:take(keys[1])
    limit = lim.limit
  else
    local refused_at
    ok, refused_at = take_all(c.limiters, keys)
    if ok ~= nil then
      -- the level to report: the refusing one, else the one with least
      -- left (read from the result cells: no multiple returns per level)
      local pick = refused_at and refused_at - 1 or 0
      if ok then
        local least = results[0].remaining
        for i = 1, count - 1 do
          local rem = results[i].remaining
          if rem < least then
            pick, least = i, rem
          end
        end
      end
      local r = results[pick]
      limit, remaining, reset, retry_after = r.limit, r.remaining, r.reset, r.retry_after
    else
      remaining = refused_at
    end
  end
  if ok == nil then
    -- the zone cannot hold the key (every entry of its set is a held
    -- concurrency slot): admit rather than refuse for the gateway's lack
    log.err("rate-limit: ", remaining)
    return
  end
  if c.headers then
    set_headers(ctx, limit, remaining, reset)
  end
  if not ok then
    return refuse(ctx, retry_after, reset)
  end
end

local function decide_fallback(c, ctx)
  local f = c.fallback
  if f == "local" then
    return decide_local(c, ctx)
  elseif f == "deny" then
    ctx.resp:set_header("Retry-After", "1")
    return 503, UNAVAILABLE
  end
end

local function leave_redis(err, fallback)
  if on_redis then
    on_redis = false
    log.warn("rate-limit: redis failed (", err, "): deciding with fallback ", fallback,
             " until it answers")
  end
end

local function decide_redis(c, ctx)
  if not redis.available() then
    leave_redis("redis unavailable", c.fallback)
    return decide_fallback(c, ctx)
  end
  local rkeys, prefix, keys = c.redis_keys, c.prefix, c.keys
  for i = 1, c.count do
    rkeys[i] = prefix .. keys[i]
  end
  local res, err = script:eval(rkeys, c.redis_args)
  if type(res) ~= "table" then
    leave_redis(err or "unexpected reply", c.fallback)
    -- other requests of the route ran while this one waited: its keys
    -- are made again
    fill_keys(c, ctx)
    return decide_fallback(c, ctx)
  end
  if not on_redis then
    on_redis = true
    log.warn("rate-limit: redis answers again: deciding with redis")
  end
  local refused_at = res[1]
  local pick = refused_at
  if pick == 0 then
    pick = 1
    for i = 2, c.count do
      if res[2 + (i - 1) * 3] < res[2 + (pick - 1) * 3] then
        pick = i
      end
    end
  end
  local j = 2 + (pick - 1) * 3
  local remaining, reset = res[j], res[j + 1] / 1000
  if c.headers then
    set_headers(ctx, c.limiters[pick].limit, remaining, reset)
  end
  if refused_at ~= 0 then
    local retry = res[j + 2]
    return refuse(ctx, retry < 0 and -1 or retry / 1000, reset)
  end
end

local function access(c, ctx)
  fill_keys(c, ctx)
  if c.policy == "redis" then
    return decide_redis(c, ctx)
  end
  return decide_local(c, ctx)
end

return {
  name = "rate-limit",
  priority = 1900,
  version = "1.0.0",
  schema = schema,
  init = init,
  access = access,
  rejected = rejected,
}
