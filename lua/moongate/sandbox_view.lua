-- What a sandboxed policy sees of a request (moongate.sandbox): ctx,
-- ctx.req, ctx.resp, ctx.route, ctx.consumer(s) and ctx.vars as views that
-- forward to the real ones. The real objects hold FFI pointers to C
-- buffers (ctx.req._r, ._v: writable cdata, so an out-of-bounds read or
-- write away) and tables the framework and other policies share (the
-- compiled route, the consumers index with every credential); sandboxed
-- code reaches none of them, only what the kit's methods return. Anything
-- that crosses from sandboxed code into tables trusted code reads (ctx.vars,
-- ctx.consumer) is checked or copied into plain tables, so trusted code
-- never runs a metamethod a sandboxed policy made (it would run outside the
-- instruction budget).
--
-- Views are plain tables with protected metatables (getmetatable gives
-- false, setmetatable fails); pairs() over a view yields nothing. One view
-- of ctx per request and sandboxed policy, made on its first call.

local type = type
local next = next
local error = error
local tostring = tostring
local setmetatable = setmetatable

local _M = {}

-- A view is an empty table whose metatable (protected: getmetatable gives
-- false) holds what it stands for: `obj` (the real object) and `st` (the
-- state of the ctx view it came from: {ctx =, name =, cached views}). No
-- weak map per view: a request's views go with it.
local raw_getmetatable = debug.getmetatable

local route_views = setmetatable({}, { __mode = "k" }) -- compiled route -> its view

-- ---- copies ------------------------------------------------------------------

local MAX_DEPTH = 64
local MAX_ENTRIES = 100000

local function copy_in(v, on_function, seen, st, depth)
  local t = type(v)
  if t == "string" or t == "number" or t == "boolean" then
    return v
  elseif t == "function" then
    return on_function and on_function(v) or nil
  elseif t ~= "table" then
    return nil
  end
  local done = seen[v]
  if done then
    return done
  end
  if depth > MAX_DEPTH then
    error("a table nested deeper than " .. MAX_DEPTH .. " levels", 0)
  end
  local out = {}
  seen[v] = out
  local k, val = next(v)
  while k ~= nil do
    st.n = st.n + 1
    if st.n > MAX_ENTRIES then
      error("a table of more than " .. MAX_ENTRIES .. " entries", 0)
    end
    local tk = type(k)
    if tk == "string" or tk == "number" or tk == "boolean" then
      out[k] = copy_in(val, on_function, seen, st, depth + 1)
    end
    k, val = next(v, k)
  end
  return out
end

-- A copy of v made of plain tables: read with next() (no metamethod of v
-- runs), metatables dropped, cycles kept, keys that are not strings,
-- numbers or booleans dropped, functions through on_function (nil: dropped),
-- other values (userdata, cdata, threads) dropped. Raises past 64 levels or
-- 100,000 entries. O(entries).
function _M.copy(v, on_function)
  return copy_in(v, on_function, {}, { n = 0 }, 1)
end
local copy = _M.copy

local function scalar(v)
  local t = type(v)
  if t == "string" or t == "number" or t == "boolean" then
    return v
  end
  return nil
end

local function protected(index, newindex)
  return { __index = index, __newindex = newindex, __metatable = false }
end

-- a view of obj: its metatable is a copy of proto's with obj and st
local function new_view(proto, obj, st)
  return setmetatable({}, { __index = proto.__index, __newindex = proto.__newindex,
                            __metatable = false, obj = obj, st = st, proto = proto })
end

-- the real object behind self when self is a view made from proto, else nil
local function real_of(self, proto)
  local mt = raw_getmetatable(self)
  if type(mt) == "table" and mt.proto == proto then
    return mt.obj, mt.st
  end
  return nil
end

local function read_only(_, k)
  error("cannot set " .. tostring(k) .. ": read-only for a sandboxed policy", 2)
end

-- ---- ctx.req and ctx.resp --------------------------------------------------

local req_mt, resp_mt, consumers_mt -- the protos, below

-- the real object, or an error naming the misuse (a method called on
-- something else than the view it came from)
local function real(proto, self, what)
  local r, st = real_of(self, proto)
  if r == nil then
    error(what .. " method called without its object (use " .. what .. ":method())", 3)
  end
  return r, st
end

-- tail calls: an error the kit raises at level 2 or 3 then names the
-- policy's line, not this file's
local req_methods = {
  header = function(self, name) return real(req_mt, self, "ctx.req"):header(name) end,
  headers = function(self) return real(req_mt, self, "ctx.req"):headers() end,
  arg = function(self, name)
    local v = real(req_mt, self, "ctx.req"):arg(name)
    if type(v) == "table" then
      return copy(v) -- the request's parsed query is shared with trusted policies
    end
    return v
  end,
  args = function(self) return copy(real(req_mt, self, "ctx.req"):args()) end,
  set_header = function(self, name, value)
    return real(req_mt, self, "ctx.req"):set_header(name, value)
  end,
  add_header = function(self, name, value)
    return real(req_mt, self, "ctx.req"):add_header(name, value)
  end,
  set_uri = function(self, path, query) return real(req_mt, self, "ctx.req"):set_uri(path, query) end,
  set_query = function(self, query) return real(req_mt, self, "ctx.req"):set_query(query) end,
  set_body_limit = function(self, bytes)
    return real(req_mt, self, "ctx.req"):set_body_limit(bytes)
  end,
  read_body = function(self) return real(req_mt, self, "ctx.req"):read_body() end,
  body = function(self) return real(req_mt, self, "ctx.req"):body() end,
}

local REQ_FIELDS = {
  method = true, path = true, query = true, remote_addr = true, remote_port = true,
  request_id = true, http_version = true, start_time = true,
}

req_mt = protected(function(self, k)
  local m = req_methods[k]
  if m then
    return m
  end
  if REQ_FIELDS[k] then
    return raw_getmetatable(self).obj[k]
  end
  return nil
end, read_only)

local resp_methods = {
  header = function(self, name) return real(resp_mt, self, "ctx.resp"):header(name) end,
  set_header = function(self, name, value)
    return real(resp_mt, self, "ctx.resp"):set_header(name, value)
  end,
  add_header = function(self, name, value)
    return real(resp_mt, self, "ctx.resp"):add_header(name, value)
  end,
  set_status = function(self, status) return real(resp_mt, self, "ctx.resp"):set_status(status) end,
}

resp_mt = protected(function(self, k)
  if k == "status" then
    return raw_getmetatable(self).obj.status
  end
  return resp_methods[k]
end, read_only)

-- ---- ctx.vars ----------------------------------------------------------------

-- Shared with the request's other policies: strings, numbers and booleans
-- as they are, tables as copies both ways (a trusted policy's table is not
-- changed, and a table put here has no metatable and no function).
local vars_mt = protected(function(self, k)
  local v = raw_getmetatable(self).obj[k]
  if type(v) == "table" then
    return copy(v)
  end
  return scalar(v)
end, function(self, k, v)
  local tk = type(k)
  if tk ~= "string" and tk ~= "number" then
    error("ctx.vars keys are strings or numbers", 2)
  end
  local t = type(v)
  if t == "table" then
    v = copy(v)
  elseif v ~= nil and t ~= "string" and t ~= "number" and t ~= "boolean" then
    error("ctx.vars." .. tostring(k) .. ": a " .. t
          .. " cannot be shared (strings, numbers, booleans, tables)", 2)
  end
  raw_getmetatable(self).obj[k] = v
end)

-- ---- consumers ----------------------------------------------------------------

-- A sandboxed policy named name sees of a consumer its id, tenant and its
-- own credentials (credentials[name]), as a plain table of its own.
local function consumer_view(st, c)
  local seen = st.consumers
  if not seen then
    seen = {}
    st.consumers = seen
    st.consumer_of = {}
  end
  local v = seen[c]
  if v == nil then
    local creds = type(c.credentials) == "table" and c.credentials[st.name]
    v = { id = c.id, tenant = c.tenant, credentials = { [st.name] = copy(creds) } }
    st.consumer_of[v] = c
    seen[c] = v
  end
  return v
end

local consumers_methods = {
  get = function(self, id)
    local index, st = real(consumers_mt, self, "ctx.consumers")
    local c = index:get(id)
    return c and consumer_view(st, c) or nil
  end,
  -- its own credentials only: policy must be the sandboxed policy's name
  find = function(self, policy, field, value)
    local index, st = real(consumers_mt, self, "ctx.consumers")
    if policy ~= st.name then
      error("ctx.consumers:find: a sandboxed policy searches its own credentials (\""
            .. st.name .. "\")", 2)
    end
    if type(field) ~= "string" then
      error("ctx.consumers:find: field must be a string", 2)
    end
    local c = index:find(policy, field, value)
    return c and consumer_view(st, c) or nil
  end,
}

consumers_mt = protected(consumers_methods, read_only)

-- ---- ctx.route ---------------------------------------------------------------

local function route_view(route)
  if type(route) ~= "table" then
    return nil
  end
  local v = route_views[route]
  if v == nil then
    v = setmetatable({}, protected({ id = route.id, upstream = route.upstream,
                                     priority = route.priority }, read_only))
    route_views[route] = v
  end
  return v
end

-- ---- ctx -----------------------------------------------------------------------

local function sub_view(st, key, proto, object)
  local v = st[key]
  if v == nil then
    v = new_view(proto, object, st)
    st[key] = v
  end
  return v
end

local ctx_fields = {
  req = function(st) return sub_view(st, "req", req_mt, st.ctx.req) end,
  resp = function(st) return sub_view(st, "resp", resp_mt, st.ctx.resp) end,
  vars = function(st)
    local vars = st.ctx.vars
    if vars == nil then
      vars = {}
      st.ctx.vars = vars
    end
    return sub_view(st, "vars", vars_mt, vars)
  end,
  route = function(st) return route_view(st.ctx.route) end,
  params = function(st)
    local p = st.params
    if p == nil then
      p = copy(st.ctx.params or {})
      st.params = p
    end
    return p
  end,
  consumer = function(st)
    local c = st.ctx.consumer
    return type(c) == "table" and consumer_view(st, c) or nil
  end,
  consumers = function(st)
    local index = st.ctx.consumers
    if index == nil then
      return nil
    end
    return sub_view(st, "index", consumers_mt, index)
  end,
  tenant = function(st) return scalar(st.ctx.tenant) end,
  upstream = function(st) return scalar(st.ctx.upstream) end,
  request_id = function(st) return scalar(st.ctx.request_id) end,
  phase = function(st) return scalar(st.ctx.phase) end,
}

local ctx_set = {
  -- a consumer a view gave (ctx.consumers:get/find, ctx.consumer), or nil
  consumer = function(st, v)
    if v == nil then
      st.ctx.consumer = nil
      return
    end
    local c = st.consumer_of and st.consumer_of[v]
    if c == nil then
      error("ctx.consumer: set a consumer that ctx.consumers gave, or nil", 3)
    end
    st.ctx.consumer = c
  end,
  tenant = function(st, v)
    if v ~= nil and type(v) ~= "string" then
      error("ctx.tenant must be a string or nil", 3)
    end
    st.ctx.tenant = v
  end,
  upstream = function(st, v)
    if v ~= nil and type(v) ~= "string" then
      error("ctx.upstream must be an upstream id (a string) or nil", 3)
    end
    st.ctx.upstream = v
  end,
}

local ctx_mt = protected(function(self, k)
  local f = ctx_fields[k]
  if f then
    return f(raw_getmetatable(self).st)
  end
  return nil
end, function(self, k, v)
  local f = ctx_set[k]
  if not f then
    error("ctx." .. tostring(k) .. " cannot be set by a sandboxed policy (ctx.vars can)", 2)
  end
  f(raw_getmetatable(self).st, v)
end)

local VIEWS = {} -- ctx[VIEWS]: name -> that policy's view of this request

-- The view of the request ctx for the sandboxed policy named name (made
-- on first use, then kept in ctx for the request's other phases): two
-- tables, then one more per part of ctx the policy reads (req, resp...).
function _M.ctx(ctx, name)
  local views = ctx[VIEWS]
  if views == nil then
    views = {}
    ctx[VIEWS] = views
  end
  local v = views[name]
  if v == nil then
    v = new_view(ctx_mt, ctx, { ctx = ctx, name = name })
    views[name] = v
  end
  return v
end

return _M
