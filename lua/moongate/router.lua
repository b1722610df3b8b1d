-- Route matching. This is the simple router of the runtime-core stage:
-- routes are tried in precedence order (priority, then exact host over
-- wildcard over none, then exact path over longer prefix over shorter) and
-- the first that matches wins. O(routes) per request; the radix router of
-- the router issue replaces it behind the same new()/match() interface.

local ffi = require("ffi")
local binding = require("moongate.ffi")

local C = binding.C
local ffi_string = ffi.string
local ipairs = ipairs
local sort = table.sort
local sub = string.sub
local byte = string.byte
local lower = string.lower
local find = string.find

local _M = {}

local SLASH = byte("/")

-- "/a/*" -> prefix "/a" (matches "/a" and "/a/..."); "/a/b" exact;
-- "/users/:id" -> segments with parameters.
local function compile_path(p)
  if sub(p, -2) == "/*" then
    local prefix = sub(p, 1, -3)
    return { kind = "prefix", prefix = prefix, len = #prefix, rank = #prefix }
  end
  if find(p, "/:", 1, true) then
    local segs = {}
    for seg in p:gmatch("[^/]+") do
      if sub(seg, 1, 1) == ":" then
        segs[#segs + 1] = { param = sub(seg, 2) }
      else
        segs[#segs + 1] = { lit = seg }
      end
    end
    return { kind = "param", segs = segs, rank = #p }
  end
  return { kind = "exact", path = p, len = #p, rank = 1e9 }
end

local function host_rank(h)
  if not h then
    return 0
  end
  if sub(h, 1, 2) == "*." or sub(h, -2) == ".*" then
    return 1
  end
  return 2
end

function _M.new(routes)
  local entries = {}
  for _, route in ipairs(routes) do
    local methods
    if route.methods and #route.methods > 0 then
      methods = {}
      for _, m in ipairs(route.methods) do
        methods[m] = true
      end
    end
    local hosts = route.hosts and #route.hosts > 0 and route.hosts or { false }
    for _, h in ipairs(hosts) do
      for _, p in ipairs(route.paths or { "/*" }) do
        local cp = compile_path(p)
        cp.route = route
        cp.methods = methods
        cp.host = h and lower(h) or nil
        cp.hrank = host_rank(cp.host)
        cp.priority = route.priority or 0
        entries[#entries + 1] = cp
      end
    end
  end
  sort(entries, function(a, b)
    if a.priority ~= b.priority then
      return a.priority > b.priority
    end
    if a.hrank ~= b.hrank then
      return a.hrank > b.hrank
    end
    return a.rank > b.rank
  end)
  local any_host = false
  for _, e in ipairs(entries) do
    if e.host then
      any_host = true
    end
  end
  return { entries = entries, any_host = any_host }
end

local function host_matches(pattern, host)
  if pattern == host then
    return true
  end
  if sub(pattern, 1, 2) == "*." then
    local suffix = sub(pattern, 2)
    return #host > #suffix and sub(host, -#suffix) == suffix
  end
  if sub(pattern, -2) == ".*" then
    local prefix = sub(pattern, 1, -2)
    return #host > #prefix and sub(host, 1, #prefix) == prefix
  end
  return false
end

local function match_params(segs, path)
  local params, i = {}, 0
  for seg in path:gmatch("[^/]+") do
    i = i + 1
    local s = segs[i]
    if not s then
      return nil
    end
    if s.lit then
      if s.lit ~= seg then
        return nil
      end
    else
      params[s.param] = seg
    end
  end
  if i ~= #segs then
    return nil
  end
  return params
end

-- v: the mg_req_view_t of the request; host_fn(r) gives its Host
-- (lower-cased, port stripped) or nil, and is called only when a route
-- names hosts. Returns route, entry, params.
function _M.match(rt, v, host_fn, r)
  local path_ptr, path_len = v.path, v.path_len
  local host
  if rt.any_host then
    host = host_fn(r)
  end
  local method, path
  local entries = rt.entries
  for i = 1, #entries do
    local e = entries[i]
    local ok = true
    if e.host and not (host and host_matches(e.host, host)) then
      ok = false
    end
    if ok then
      local kind = e.kind
      local params
      if kind == "prefix" then
        local n = e.len
        -- no Lua string is made for the path: compare the C view in place
        ok = path_len >= n and C.memcmp(path_ptr, e.prefix, n) == 0
             and (path_len == n or path_ptr[n] == SLASH or n == 0)
      elseif kind == "exact" then
        ok = path_len == e.len and C.memcmp(path_ptr, e.path, e.len) == 0
      else
        path = path or ffi_string(path_ptr, path_len)
        params = match_params(e.segs, path)
        ok = params ~= nil
      end
      if ok and e.methods then
        method = method or ffi_string(v.method, v.method_len)
        ok = e.methods[method] == true
      end
      if ok then
        return e.route, e, params
      end
    end
  end
  return nil
end

return _M
