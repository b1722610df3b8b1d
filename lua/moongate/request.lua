-- ctx.req and ctx.resp: views of the C request. Fields are read from the
-- C buffers on first use and cached in the object; nothing is copied for a
-- field no policy reads.

local ffi = require("ffi")
local binding = require("moongate.ffi")
local context = require("moongate.context")

local C = binding.C
local ffi_string = ffi.string
local ffi_new = ffi.new
local type = type
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local lower = string.lower
local gsub = string.gsub
local char = string.char
local gmatch = string.gmatch
local concat = table.concat
local floor = math.floor
local co_yield = coroutine.yield

local MG_OK, MG_AGAIN = C.MG_OK, C.MG_AGAIN
local SET, ADD, REMOVE = C.MG_HDR_SET, C.MG_HDR_ADD, C.MG_HDR_REMOVE
local MAX_INT = 2 ^ 53 -- whole numbers a double holds exactly

-- out-parameter cells, allocated once (lua-resty-core's rule)
local val_out = ffi_new("const char *[1]")
local len_out = ffi_new("size_t[1]")

local _M = {}

-- made once: a function literal in unescape would be a new closure per call
local function hex_char(h)
  return char(tonumber(h, 16))
end

-- A query component decoded ("+" is a space, %XX a byte).
local function unescape(s)
  s = gsub(s, "+", " ")
  return (gsub(s, "%%(%x%x)", hex_char))
end
_M.unescape = unescape

-- Query string to table; repeated keys become lists (as ngx.decode_args).
function _M.decode_args(q)
  local args = {}
  for pair in gmatch(q, "[^&]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if not k then
      k, v = pair, true
    else
      v = unescape(v)
    end
    k = unescape(k)
    local old = args[k]
    if old == nil then
      args[k] = v
    elseif type(old) == "table" then
      old[#old + 1] = v
    else
      args[k] = { old, v }
    end
  end
  return args
end

local function header_of(fn, r, name)
  name = tostring(name)
  if fn(r, name, #name, 0, val_out, len_out) ~= MG_OK then
    return nil
  end
  local first = ffi_string(val_out[0], len_out[0])
  if fn(r, name, #name, 1, val_out, len_out) ~= MG_OK then
    return first
  end
  -- repeated: joined as a list, as RFC 9110 5.3 allows (Set-Cookie aside)
  local vals, i = { first }, 1
  while fn(r, name, #name, i, val_out, len_out) == MG_OK do
    i = i + 1
    vals[i] = ffi_string(val_out[0], len_out[0])
  end
  return concat(vals, ", ")
end
_M.header_of = header_of

-- A number that is a whole number goes to fn_int: C formats it, so no
-- string is made (and later collected) per call: RateLimit-* and the like.
local function set_header(fn, fn_int, r, name, value, mode)
  if type(name) ~= "string" then
    error("header name must be a string", 3)
  end
  local rc
  if value == nil then
    rc = fn(r, name, #name, nil, 0, REMOVE)
  elseif type(value) == "number" and value == floor(value) and value >= -MAX_INT
         and value <= MAX_INT then
    rc = fn_int(r, name, #name, value, mode)
  else
    value = tostring(value)
    rc = fn(r, name, #name, value, #value, mode)
  end
  if rc ~= MG_OK then
    error("invalid header " .. name .. " (bad characters, a framing or hop-by-hop header,"
          .. " or the response already started)", 3)
  end
end

-- ---- ctx.req ---------------------------------------------------------------

local req_methods = {}

function req_methods:header(name)
  return header_of(C.mg_req_header, self._r, name)
end

function req_methods:set_header(name, value)
  set_header(C.mg_req_set_header, C.mg_req_set_header_int, self._r, name, value, SET)
end

function req_methods:add_header(name, value)
  set_header(C.mg_req_set_header, C.mg_req_set_header_int, self._r, name, value, ADD)
end

-- Every header as received, names lower-cased; repeated ones as lists.
function req_methods:headers()
  local v = self._v
  local t = {}
  for i = 0, v.nheaders - 1 do
    local h = v.headers[i]
    local name = lower(ffi_string(h.name, h.name_len))
    if t[name] == nil then
      t[name] = self:header(name)
    end
  end
  return t
end

function req_methods:arg(name)
  local args = self._args
  if not args then
    args = _M.decode_args(self.query)
    self._args = args
  end
  return args[name]
end

function req_methods:args()
  self:arg("")
  return self._args
end

-- Rewrites what the upstream sees: path nil keeps the path (the route's
-- strip_prefix/rewrite or an earlier set_uri), query nil keeps the query.
function req_methods:set_uri(path, query)
  if path == nil and query == nil then
    error("set_uri: path or query required", 2)
  end
  local rc = C.mg_req_set_uri(self._r, path, path and #path or 0, query, query and #query or 0)
  if rc ~= MG_OK then
    error("invalid uri " .. tostring(path) .. (query and "?" .. query or ""), 2)
  end
end

-- Replaces the query the upstream gets ("" drops it), keeping the path.
function req_methods:set_query(query)
  if type(query) ~= "string" then
    error("set_query: query must be a string", 2)
  end
  if C.mg_req_set_uri(self._r, nil, 0, query, #query) ~= MG_OK then
    error("invalid query " .. query, 2)
  end
end

-- Lowers this request's body limit (never raises the node's
-- limits.max_body_bytes): a chunked body that grows past it gets a 413
-- from the gateway. Returns false when the request's Content-Length is
-- already above it (the caller answers 413), true otherwise.
function req_methods:set_body_limit(bytes)
  if type(bytes) ~= "number" or bytes < 0 then
    error("set_body_limit: bytes must be a non-negative number", 2)
  end
  return C.mg_req_set_body_limit(self._r, bytes) == MG_OK
end

-- Reads the body in chunks: returns the next chunk, or nil at the end;
-- nil, err when it failed (too large, malformed, client gone).
function req_methods:read_body()
  local r = self._r
  while true do
    local rc = C.mg_req_read_body(r, val_out, len_out)
    if rc == MG_OK then
      if len_out[0] == 0 then
        return nil
      end
      return ffi_string(val_out[0], len_out[0])
    elseif rc == MG_AGAIN then
      co_yield()
    else
      return nil, "request body failed"
    end
  end
end

-- The whole body (bounded by limits.max_body_bytes); yields.
function req_methods:body()
  if self._body then
    return self._body
  end
  local parts, n = {}, 0
  while true do
    local chunk, err = self:read_body()
    if err then
      return nil, err
    end
    if not chunk then
      break
    end
    n = n + 1
    parts[n] = chunk
  end
  local body = concat(parts, "", 1, n)
  -- reading consumed the client's body: the upstream gets these bytes
  if C.mg_req_set_body(self._r, body, #body) ~= MG_OK then
    return nil, "request body cannot be kept for the upstream"
  end
  self._body = body
  return body
end

local req_fields = {
  method = function(v) return ffi_string(v.method, v.method_len) end,
  path = function(v) return ffi_string(v.path, v.path_len) end,
  query = function(v) return ffi_string(v.query, v.query_len) end,
  remote_addr = function(v) return ffi_string(v.remote_addr) end,
  remote_port = function(v) return v.remote_port end,
  request_id = function(v) return ffi_string(v.request_id, v.request_id_len) end,
  http_version = function(v) return v.version_major + v.version_minor / 10 end,
  start_time = function(v) return v.start_time end,
}

local req_mt = {
  __index = function(self, k)
    local m = req_methods[k]
    if m then
      return m
    end
    -- an empty query is not kept in the object: no key added (and the
    -- table not grown) for the usual request without one
    if k == "query" and self._v.query_len == 0 then
      return ""
    end
    local f = req_fields[k]
    if f then
      local val = f(self._v)
      self[k] = val
      return val
    end
    return nil
  end,
}

-- (not `return setmetatable(...)`: a trace that starts here could not
-- return through that tail call: "leaving loop in root trace")
function _M.new_req(r, v)
  local req = setmetatable({ _r = r, _v = v }, req_mt)
  return req
end

-- ---- ctx.resp --------------------------------------------------------------

local resp_methods = {}

function resp_methods:header(name)
  return header_of(C.mg_resp_header, self._r, name)
end

function resp_methods:set_header(name, value)
  set_header(C.mg_resp_set_header, C.mg_resp_set_header_int, self._r, name, value, SET)
end

function resp_methods:add_header(name, value)
  set_header(C.mg_resp_set_header, C.mg_resp_set_header_int, self._r, name, value, ADD)
end

function resp_methods:set_status(status)
  if C.mg_resp_set_status(self._r, status) ~= MG_OK then
    error("cannot set status " .. tostring(status), 2)
  end
end

local resp_mt = {
  __index = function(self, k)
    if k == "status" then
      local s = self._v.status
      return s ~= 0 and s or nil
    end
    return resp_methods[k]
  end,
}

function _M.new_resp(r, v)
  local resp = setmetatable({ _r = r, _v = v }, resp_mt)
  return resp
end

-- The C request of the running coroutine (for yielding helpers).
_M.current = context.get

return _M
