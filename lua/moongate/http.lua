-- mg.http.request: an HTTP/1.1 call from a policy, on the runtime's own
-- async client (runtime/src/http_client.c). The call starts in C and the
-- request's coroutine yields; C resumes it when the response is complete.
--
--   local res, err = mg.http.request{ method = "POST", url = "http://127.0.0.1:9001/x",
--                                     headers = { ["Content-Type"] = "application/json" },
--                                     body = "{}", timeout_ms = 2000, max_body = 65536 }
--   res.status, res.headers["content-type"], res.body
--
-- res.headers: lower-case names; a repeated header's values joined with
-- ", " (RFC 9110 5.3, as ctx.req:header does), except Set-Cookie, which
-- cannot be joined and is a list of strings when repeated.
--
-- https:// URLs: TLS 1.2/1.3, the server's certificate checked against the
-- system CA store and its name against the URL's host, unless the call
-- says otherwise with tls = {
--   ca = "/path/ca.pem",          -- trust this CA file instead of the system store
--   cert = "/path/client.pem",    -- a client certificate (mTLS), with
--   key = "/path/client-key.pem", --   its key (both or neither)
--   server_name = "api.internal", -- SNI and the name checked (default: the URL's host)
--   verify = false,               -- no check at all: an explicit, logged opt-out
-- }. One OpenSSL context per distinct (ca, cert, key, verify) is built on
-- first use in each worker and kept (files are read then, not per call).

local ffi = require("ffi")
local binding = require("moongate.ffi")
local context = require("moongate.context")

local C = binding.C
local ffi_new = ffi.new
local ffi_string = ffi.string
local type = type
local tostring = tostring
local pairs = pairs
local lower = string.lower
local error = error
local co_yield = coroutine.yield

local MG_AGAIN, MG_EINVAL = C.MG_AGAIN, C.MG_EINVAL

local MAX_HEADERS = 64
local DEFAULT_TIMEOUT_MS = 10000

-- allocated once (lua-resty-core's rule); filled per call, read by C
-- before mg_http_request returns
local opts = ffi_new("mg_http_opts_t")
local tls_opts = ffi_new("mg_tls_opts_t")
local hdrs = ffi_new("mg_header_t[?]", MAX_HEADERS)
-- the strings hdrs points into (tostring of a number makes a new one the GC
-- could take before C copies it): kept here until mg_http_request returned
local anchor = {} -- luacheck: ignore 241

local _M = {}

local function fill_headers(headers)
  local n = 0
  for name, value in pairs(headers) do
    if type(name) ~= "string" then
      error("mg.http.request: header names must be strings", 3)
    end
    local values = type(value) == "table" and value or { value }
    for i = 1, #values do
      local v = values[i]
      local tv = type(v)
      if tv ~= "string" and tv ~= "number" then
        error("mg.http.request: header " .. name .. " must be a string, a number or a list", 3)
      end
      if n == MAX_HEADERS then
        error("mg.http.request: more than " .. MAX_HEADERS .. " headers", 3)
      end
      v = tostring(v)
      anchor[2 * n + 1] = name
      anchor[2 * n + 2] = v
      local h = hdrs[n]
      h.name = name
      h.name_len = #name
      h.value = v
      h.value_len = #v
      n = n + 1
    end
  end
  return n
end

local TLS_KEYS = { ca = "string", cert = "string", key = "string", server_name = "string",
                   verify = "boolean" }

-- Fills tls_opts from t.tls (the strings stay referenced by t during the call).
local function fill_tls(tls)
  for k, v in pairs(tls) do
    local want = TLS_KEYS[k]
    if not want then
      error("mg.http.request: tls." .. tostring(k) .. " is not a TLS setting (ca, cert, key, "
            .. "server_name, verify)", 3)
    end
    if type(v) ~= want or (want == "string" and v == "") then
      error("mg.http.request: tls." .. k .. " must be a " .. (want == "string" and
            "non-empty string" or want), 3)
    end
  end
  if (tls.cert == nil) ~= (tls.key == nil) then
    error("mg.http.request: tls.cert and tls.key go together", 3)
  end
  local ca, cert, key, sn = tls.ca, tls.cert, tls.key, tls.server_name
  tls_opts.ca, tls_opts.ca_len = ca, ca and #ca or 0
  tls_opts.cert, tls_opts.cert_len = cert, cert and #cert or 0
  tls_opts.key, tls_opts.key_len = key, key and #key or 0
  tls_opts.server_name, tls_opts.server_name_len = sn, sn and #sn or 0
  tls_opts.verify = tls.verify == false and 0 or 1
  return tls_opts
end

local function response(res)
  local headers = {}
  for i = 0, res.nheaders - 1 do
    local h = res.headers[i]
    local name = lower(ffi_string(h.name, h.name_len))
    local value = ffi_string(h.value, h.value_len)
    local old = headers[name]
    if old == nil then
      headers[name] = value
    elseif name == "set-cookie" then
      if type(old) == "table" then
        old[#old + 1] = value
      else
        headers[name] = { old, value }
      end
    else
      headers[name] = old .. ", " .. value
    end
  end
  return {
    status = res.status,
    headers = headers,
    body = ffi_string(res.body, res.body_len),
  }
end

-- Yields; returns res, or nil, err ("timeout", "connection refused",
-- "invalid url ...", "response too large", "bad response: ...").
function _M.request(t)
  if type(t) ~= "table" then
    error("mg.http.request: expects a table {url =, method =, headers =, body =, timeout_ms =}", 2)
  end
  local url, method, body = t.url, t.method or "GET", t.body
  if type(url) ~= "string" then
    error("mg.http.request: url must be a string", 2)
  end
  if type(method) ~= "string" then
    error("mg.http.request: method must be a string", 2)
  end
  if body ~= nil and type(body) ~= "string" then
    error("mg.http.request: body must be a string", 2)
  end
  local timeout = t.timeout_ms
  if timeout == nil then
    timeout = DEFAULT_TIMEOUT_MS
  elseif type(timeout) ~= "number" or timeout < 0 or timeout > 4294967295 then
    error("mg.http.request: timeout_ms must be a non-negative number (0: no limit)", 2)
  end
  local max_body = t.max_body
  if max_body ~= nil and (type(max_body) ~= "number" or max_body < 1) then
    error("mg.http.request: max_body must be a positive number of bytes", 2)
  end
  local tls = t.tls
  if tls ~= nil and type(tls) ~= "table" then
    error("mg.http.request: tls must be a table {ca =, cert =, key =, server_name =, verify =}", 2)
  end
  local headers = t.headers
  local nh = 0
  if headers ~= nil then
    if type(headers) ~= "table" then
      error("mg.http.request: headers must be a table", 2)
    end
    nh = fill_headers(headers)
  end
  local r = context.get()
  opts.method = method
  opts.method_len = #method
  opts.url = url
  opts.url_len = #url
  opts.headers = hdrs
  opts.nheaders = nh
  opts.body = body
  opts.body_len = body and #body or 0
  opts.timeout_ms = timeout
  opts.max_body = max_body or 0
  opts.tls = tls and fill_tls(tls) or nil
  local rc = C.mg_http_request(r, opts)
  for i = 1, 2 * nh do
    anchor[i] = nil
  end
  opts.method, opts.url, opts.body, opts.tls = nil, nil, nil, nil
  if tls then
    tls_opts.ca, tls_opts.cert, tls_opts.key, tls_opts.server_name = nil, nil, nil, nil
  end
  if rc == MG_AGAIN then
    co_yield()
  end
  local res = C.mg_http_result(r)
  if res == nil then
    return nil, "out of memory"
  end
  if res.error ~= nil then
    local err = ffi_string(res.error, res.error_len)
    if rc == MG_EINVAL then
      error("mg.http.request: " .. err, 2)
    end
    return nil, err
  end
  return response(res)
end

return _M
