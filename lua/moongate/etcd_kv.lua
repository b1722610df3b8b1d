-- Writes to etcd (v3.4) through its JSON gateway (/v3/kv/*), for the Admin
-- API (admin.lua): one put, one delete, or a transaction with compares.
--
--   local kv = etcd_kv.new{ endpoints = {"http://127.0.0.1:2379"}, timeout_ms = 5000,
--                           user = "u", password = "p",  -- optional: etcd auth
--                           tls = {ca =, cert =, key =, server_name =, verify =}, -- optional:
--                                                        -- https:// endpoints (mg.http.request's tls)
--                           request = mg.http.request }
--   local rev, err, status = kv:put(key, value)
--   local rev, err, status = kv:delete(key)           -- rev, deleted count
--   local rev, err, status = kv:txn(compares, ops)    -- rev, or nil, "compare failed", 409
--
-- request: a function with mg.http.request's contract ({method, url,
-- headers, body, timeout_ms} -> res {status, body} | nil, err); inside the
-- runtime it yields the request's coroutine (the control process serves
-- other requests meanwhile). Endpoints are tried in order while one cannot
-- be reached (refused, timeout): a write is only retried on the next
-- endpoint when it never reached the first, so it is never applied twice
-- (a put twice would be harmless; a txn's compare could fail the second
-- time). Errors: nil, "etcd: <why>", and the status the Admin API answers
-- (503 unreachable, 502 a bad answer).
--
-- Auth: with user and password, a token from /v3/auth/authenticate is sent
-- as Authorization and kept; an answer saying it is no longer valid
-- (etcd restarted, token TTL) gets a new one and the call is sent once
-- more (a write refused for its token was not applied).

local cjson = require("cjson.safe")

local type = type
local tonumber = tonumber
local tostring = tostring
local byte = string.byte
local char = string.char
local sub = string.sub
local find = string.find
local concat = table.concat
local bit = require("bit")
local band = bit.band
local rshift = bit.rshift
local lshift = bit.lshift
local bor = bit.bor

local _M = {}

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_CHARS = {}
for i = 1, 64 do
  B64_CHARS[i - 1] = sub(B64, i, i)
end

-- Standard base64 with padding (etcd's gateway takes bytes fields so).
-- O(n); admin writes are small and rare.
local function b64(s)
  local out, n = {}, 0
  local len = #s
  for i = 1, len, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = bor(lshift(a, 16), lshift(b or 0, 8), c or 0)
    out[n + 1] = B64_CHARS[rshift(v, 18)]
    out[n + 2] = B64_CHARS[band(rshift(v, 12), 63)]
    out[n + 3] = b and B64_CHARS[band(rshift(v, 6), 63)] or "="
    out[n + 4] = c and B64_CHARS[band(v, 63)] or "="
    n = n + 4
  end
  return concat(out, "", 1, n)
end
_M.b64 = b64

-- The key after every key that starts with prefix (etcd's range_end for
-- a prefix): prefix with its last byte below 0xff incremented.
local function prefix_end(prefix)
  for i = #prefix, 1, -1 do
    local c = byte(prefix, i)
    if c < 255 then
      return sub(prefix, 1, i - 1) .. char(c + 1)
    end
  end
  return "\0"
end
_M.prefix_end = prefix_end

local KV = {}
KV.__index = KV

function _M.new(opts)
  if type(opts) ~= "table" or type(opts.endpoints) ~= "table" or #opts.endpoints == 0 then
    error("etcd_kv.new: expects {endpoints = {urls}, request = function}", 2)
  end
  if type(opts.request) ~= "function" then
    error("etcd_kv.new: request must be a function (mg.http.request)", 2)
  end
  local endpoints = {}
  for i, e in ipairs(opts.endpoints) do
    e = tostring(e):gsub("/+$", "")
    if not e:find("^%a[%w+.-]*://") then
      e = "http://" .. e
    end
    endpoints[i] = e
  end
  return setmetatable({ endpoints = endpoints, request = opts.request,
                        timeout_ms = opts.timeout_ms or 5000,
                        user = opts.user, password = opts.password, tls = opts.tls }, KV)
end

local UNREACHED = { ["connection refused"] = true, ["connect failed"] = true,
                    ["name resolution failed"] = true }

-- POSTs text to path on the first endpoint that answers. Returns the
-- answer's status and decoded body, or nil, err, status.
local function post(self, path, text, token)
  local last
  local headers = { ["Content-Type"] = "application/json", Authorization = token }
  for _, base in ipairs(self.endpoints) do
    local res, err = self.request({ method = "POST", url = base .. path, body = text,
                                    headers = headers, timeout_ms = self.timeout_ms,
                                    tls = sub(base, 1, 8) == "https://" and self.tls or nil })
    if res then
      return res.status, cjson.decode(res.body), base, res.body
    end
    last = "etcd: " .. base .. ": " .. tostring(err)
    -- a failed TLS handshake sent nothing either
    if not UNREACHED[err] and not find(tostring(err), "^TLS handshake") then
      -- a timeout or a broken answer: the write may have been applied;
      -- another endpoint must not apply it again
      return nil, last, 503
    end
  end
  return nil, last, 503
end

local function bad_answer(base, path, status, v, raw)
  local msg = type(v) == "table" and (v.message or v.error) or raw
  return nil, "etcd: " .. base .. path .. " answered " .. status .. ": " .. tostring(msg), 502
end

local function authenticate(self)
  local status, v, base, raw = post(self, "/v3/auth/authenticate",
                                    cjson.encode({ name = self.user, password = self.password }))
  if not status then
    return nil, v, base
  end
  if status ~= 200 or type(v) ~= "table" or type(v.token) ~= "string" then
    return bad_answer(base, "/v3/auth/authenticate", status, v, raw)
  end
  self.token = v.token
  return true
end

local function token_refused(status, v)
  local msg = type(v) == "table" and tostring(v.message or v.error or "") or ""
  return status == 401 or msg:find("invalid auth token", 1, true) ~= nil
         or msg:find("user name is empty", 1, true) ~= nil
end

-- POSTs body (a table) to path. Returns the decoded answer, or nil, err,
-- status.
function KV:call(path, body)
  local text = cjson.encode(body)
  for attempt = 1, 2 do
    if self.user and not self.token then
      local ok, err, status = authenticate(self)
      if not ok then
        return nil, err, status
      end
    end
    local status, v, base, raw = post(self, path, text, self.token)
    if not status then
      return nil, v, base
    end
    if status == 200 and type(v) == "table" then
      return v
    end
    if self.user and attempt == 1 and token_refused(status, v) then
      self.token = nil
    elseif status == 200 then
      return nil, "etcd: " .. base .. path .. ": an answer that is not JSON", 502
    else
      return bad_answer(base, path, status, v, raw)
    end
  end
end

local function revision(v)
  return tonumber(type(v.header) == "table" and v.header.revision) or 0
end

-- Returns the revision of the write.
function KV:put(key, value)
  local v, err, status = self:call("/v3/kv/put", { key = b64(key), value = b64(value) })
  if not v then
    return nil, err, status
  end
  return revision(v)
end

-- Returns the revision and the number of keys deleted.
function KV:delete(key)
  local v, err, status = self:call("/v3/kv/deleterange", { key = b64(key) })
  if not v then
    return nil, err, status
  end
  return revision(v), tonumber(v.deleted) or 0
end

-- compares: list of {key =, prefix = true?, target = "VERSION"|"MOD",
-- result = "EQUAL"|"GREATER"|"LESS"|"NOT_EQUAL", value = number};
-- ops: list of {put = {key, value}} | {delete = key}. Applied only when
-- every compare holds: returns the revision, or nil, "compare failed", 409.
function KV:txn(compares, ops)
  local cmp = {}
  for i, c in ipairs(compares) do
    local t = { key = b64(c.key), target = c.target, result = c.result }
    if c.prefix then
      t.range_end = b64(prefix_end(c.key))
    end
    if c.target == "VERSION" then
      t.version = tostring(c.value)
    else
      t.mod_revision = tostring(c.value)
    end
    cmp[i] = t
  end
  local success = {}
  for i, op in ipairs(ops) do
    if op.put then
      success[i] = { request_put = { key = b64(op.put[1]), value = b64(op.put[2]) } }
    else
      success[i] = { request_delete_range = { key = b64(op.delete) } }
    end
  end
  local v, err, status = self:call("/v3/kv/txn", { compare = cmp, success = success })
  if not v then
    return nil, err, status
  end
  if not v.succeeded then
    return nil, "compare failed", 409
  end
  return revision(v)
end

return _M
