-- ip-restriction: allow and deny lists of client addresses (CIDR), IPv4
-- and IPv6.
--
--   {"name": "ip-restriction", "conf": {"allow": ["10.0.0.0/8", "2001:db8::/32"],
--                                       "deny": ["10.0.0.66"]}}
--
-- An address in deny is refused; with an allow list, so is an address not
-- in it (deny wins over allow, as in Kong). Refused: 403 (`status`) with
-- {"error": message}. A bare address is a /32 (IPv4) or /128 (IPv6). An
-- IPv4-mapped client address (::ffff:10.0.0.1, from a dual-stack listener)
-- is matched as the IPv4 address too. The client address is the TCP peer
-- (ctx.req.remote_addr), never a header.
--
-- CIDRs are parsed once per config version into 32-bit words and masks; a
-- request's address is parsed once and compared word by word with bit ops,
-- O(entries) (fine for the hundreds a conf holds). Verdicts are cached per
-- address for the config version (the cache is dropped past 4096 entries).
local bit = require("bit")

local band = bit.band
local lshift = bit.lshift
local rshift = bit.rshift
local tobit = bit.tobit
local tonumber = tonumber
local ipairs = ipairs
local find = string.find
local match = string.match
local gmatch = string.gmatch

local CACHE_MAX = 4096

-- "a.b.c.d" -> the address as one 32-bit word (bit.tobit), or nil
local function parse_v4(s)
  local a, b, c, d = match(s, "^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  if not a then
    return nil
  end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then
    return nil
  end
  return tobit(a * 16777216 + b * 65536 + c * 256 + d)
end

-- a list of 16-bit groups from "x:y:z" ("" -> {}); an IPv4 tail counts as
-- two groups. nil when malformed.
local function groups(s, allow_v4_tail)
  local out = {}
  if s == "" then
    return out
  end
  local parts = {}
  for g in gmatch(s .. ":", "([^:]*):") do
    parts[#parts + 1] = g
  end
  for i, g in ipairs(parts) do
    if i == #parts and allow_v4_tail and find(g, ".", 1, true) then
      local v4 = parse_v4(g)
      if not v4 then
        return nil
      end
      out[#out + 1] = band(rshift(v4, 16), 0xffff)
      out[#out + 1] = band(v4, 0xffff)
    else
      if not find(g, "^%x%x?%x?%x?$") then
        return nil
      end
      out[#out + 1] = tonumber(g, 16)
    end
  end
  return out
end

-- "2001:db8::1" -> four 32-bit words, or nil
local function parse_v6(s)
  s = match(s, "^([^%%]*)") -- a zone (fe80::1%eth0) does not take part
  local head, tail = match(s, "^(.-)::(.*)$")
  local g
  if head then
    if find(tail, "::", 1, true) then
      return nil
    end
    local h = groups(head, false)
    local t = groups(tail, true)
    if not h or not t or #h + #t > 7 then
      return nil
    end
    g = h
    for _ = 1, 8 - #h - #t do
      g[#g + 1] = 0
    end
    for _, x in ipairs(t) do
      g[#g + 1] = x
    end
  else
    g = groups(s, true)
    if not g or #g ~= 8 then
      return nil
    end
  end
  return {
    tobit(g[1] * 65536 + g[2]), tobit(g[3] * 65536 + g[4]),
    tobit(g[5] * 65536 + g[6]), tobit(g[7] * 65536 + g[8]),
  }
end

-- the mask of a word that keeps its first `bits` bits (0..32)
local function mask_of(bits)
  if bits <= 0 then
    return 0
  elseif bits >= 32 then
    return -1
  end
  return tobit(lshift(-1, 32 - bits))
end

-- "10.0.0.0/8" | "2001:db8::/32" | a bare address ->
-- {v4 = true, net, mask} or {v6 = true, n1..n4, m1..m4}; or nil, err
local function parse_cidr(s)
  local addr, plen = match(s, "^([^/]+)/(%d%d?%d?)$")
  if not addr then
    addr = s
  end
  if find(s, "/", 1, true) and not plen then
    return nil, "invalid CIDR \"" .. s .. "\""
  end
  local v4 = parse_v4(addr)
  if v4 then
    local bits = plen and tonumber(plen) or 32
    if bits > 32 then
      return nil, "invalid CIDR \"" .. s .. "\": an IPv4 prefix is at most 32 bits"
    end
    local m = mask_of(bits)
    return { v4 = true, net = band(v4, m), mask = m }
  end
  local w = find(addr, ":", 1, true) and parse_v6(addr)
  if not w then
    return nil, "invalid address or CIDR \"" .. s .. "\""
  end
  local bits = plen and tonumber(plen) or 128
  if bits > 128 then
    return nil, "invalid CIDR \"" .. s .. "\": an IPv6 prefix is at most 128 bits"
  end
  local e = { v6 = true }
  for i = 1, 4 do
    local m = mask_of(bits - 32 * (i - 1))
    e[i] = band(w[i], m)
    e[i + 4] = m
  end
  return e
end

local function check_cidr(s)
  local ok, err = parse_cidr(s)
  if not ok then
    return false, err
  end
  return true
end

-- a client address -> v4 word (or nil), v6 words (or nil)
local function parse_addr(s)
  local v4 = parse_v4(s)
  if v4 then
    return v4, nil
  end
  local w = parse_v6(s)
  if not w then
    return nil, nil
  end
  -- ::ffff:a.b.c.d is an IPv4 client on a dual-stack listener
  if w[1] == 0 and w[2] == 0 and w[3] == 0xffff then
    return w[4], w
  end
  return nil, w
end

local function in_list(list, v4, v6)
  for i = 1, #list do
    local e = list[i]
    if e.v4 then
      if v4 and band(v4, e.mask) == e.net then
        return true
      end
    elseif v6 and band(v6[1], e[5]) == e[1] and band(v6[2], e[6]) == e[2]
           and band(v6[3], e[7]) == e[3] and band(v6[4], e[8]) == e[4] then
      return true
    end
  end
  return false
end

-- true when the address may pass
local function permitted(c, addr)
  local v4, v6 = parse_addr(addr)
  if not v4 and not v6 then
    return false -- not an address we can judge (cannot happen on TCP peers)
  end
  if in_list(c.deny, v4, v6) then
    return false
  end
  if c.allow then
    return in_list(c.allow, v4, v6)
  end
  return true
end

local cidr_list = { type = "array", uniqueItems = true,
                    items = { type = "string", check = check_cidr } }

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    allow = cidr_list,
    deny = cidr_list,
    status = { type = "integer", minimum = 400, maximum = 599, default = 403 },
    message = { type = "string", default = "Your IP address is not allowed" },
  },
  check = function(conf)
    if (conf.allow == nil or #conf.allow == 0) and (conf.deny == nil or #conf.deny == 0) then
      return false, "allow or deny must list at least one address"
    end
    return true
  end,
}

local function compile(list)
  local out = {}
  for i, s in ipairs(list or {}) do
    out[i] = assert(parse_cidr(s))
  end
  return out
end

local function init(conf)
  local allow
  if conf.allow and #conf.allow > 0 then
    allow = compile(conf.allow)
  end
  return {
    allow = allow,
    deny = compile(conf.deny),
    status = conf.status,
    body = { error = conf.message },
    cache = {},
    cached = 0,
  }
end

local function access(c, ctx)
  local addr = ctx.req.remote_addr
  local cache = c.cache
  local ok = cache[addr]
  if ok == nil then
    ok = permitted(c, addr)
    if c.cached >= CACHE_MAX then
      cache = {}
      c.cache, c.cached = cache, 0
    end
    cache[addr] = ok
    c.cached = c.cached + 1
  end
  if not ok then
    return c.status, c.body
  end
end

return {
  name = "ip-restriction",
  priority = 3000,
  version = "1.0.0",
  schema = schema,
  init = init,
  access = access,
  -- for the unit specs of the matcher
  _parse_cidr = parse_cidr,
  _permitted = function(conf, addr) return permitted(init(conf), addr) end,
}
