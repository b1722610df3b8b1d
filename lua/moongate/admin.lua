-- The Admin API (issue 5; README "Admin API"), served by the control
-- process on the admin listener (admin.listen, X-API-Key = admin.api_key).
--
--   local api = admin.new{
--     mode = "file" | "etcd",          -- node.config_source.type
--     view = function() return doc end, -- the version in force (see below)
--     api_key = node.admin.api_key,    -- nil: no key asked (loopback only)
--     etcd = {endpoints =, prefix =, timeout_ms =, user =, password =, tls =}, -- etcd mode
--     request = mg.http.request,       -- how etcd is called (yields)
--     lua_path = node.lua_path,        -- policy modules, as the workers
--     sandbox = {policies_dir =, max_instructions =},
--   }
--   api:serve(rp)            -- the runtime: a request of the admin listener
--   api:handle(req)          -- the same, from a plain table (specs, tools):
--       req = {method, path, query, header = function(name), body = function()}
--       -> status, body (string), headers (table)
--
-- The view: the doc the control process hands to the workers
-- (config_doc.lua: elements = {upstreams, routes, consumers = {texts}},
-- skeleton = routes.json less those arrays, holding global_policies), or a
-- doc keyed by id: entities = {kind = {id = text}} with policies =
-- {name = source}. Either may carry `revision`: the etcd revision it
-- reflects (etcd mode). Indexes are built once per doc and kept (weakly)
-- by it.
--
-- Read-your-writes: a write returns once etcd accepted it, before the
-- control process has seen it come back through its watch. Until the view
-- reaches that write's revision, reads (and reference checks) see the
-- write from a table of pending writes ("overlay") kept here; an entry
-- goes once view.revision >= its revision. Writes by another node's Admin
-- API (or etcdctl) are seen when the watch brings them.
--
-- Entities are kept and answered as the texts they were written as (never
-- decoded and encoded again: cjson cannot tell [] from {}); decoding is
-- for validation and ids only.

local cjson = require("cjson.safe")
local config = require("moongate.config")
local config_check = require("moongate.config_check")
local json_split = require("moongate.json_split")
local etcd_kv = require("moongate.etcd_kv")
local bit = require("bit")

local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local setmetatable = setmetatable
local byte = string.byte
local find = string.find
local format = string.format
local concat = table.concat
local sort = table.sort
local bxor = bit.bxor
local bor = bit.bor

local _M = {}

local DEFAULT_LIMIT = 100
local MAX_LIMIT = 1000
local MAX_BODY = 1024 * 1024 -- bytes of a PUT body (an entity or a policy's source)

local json = cjson.new()
json.decode_invalid_numbers(false)
json.encode_invalid_numbers(false)
json.decode_max_depth(64)

-- kind -> how its entities are named and checked. id: the member that
-- names an entity (global policies are keyed by their policy name: a
-- policy may be listed once among them).
local KINDS = {
  routes = { id = "id" },
  upstreams = { id = "id" },
  consumers = { id = "id" },
  global_policies = { id = "name" },
  certificates = { id = "id" },
  policies = { source = true },
}
_M.KINDS = KINDS
-- the order push writes them in (references first) and dump prints them
_M.ORDER = { "upstreams", "routes", "consumers", "global_policies", "certificates", "policies" }

local function quote(s)
  return '"' .. tostring(s) .. '"'
end

-- ---- the view ---------------------------------------------------------------------

-- What a doc holds, by kind: {texts = {id = text}, order = {ids}}; order
-- is the version's own (a file's order: it decides ties between routes),
-- by id for a doc keyed by id (etcd's key order).
local indexes = setmetatable({}, { __mode = "k" })

local function id_of(kind, text)
  local v = json.decode(text)
  if type(v) ~= "table" then
    return nil
  end
  local id = v[KINDS[kind].id]
  return type(id) == "string" and id or nil
end

local function add(ix, kind, id, text)
  local k = ix[kind]
  if id and k.texts[id] == nil then
    k.order[#k.order + 1] = id
  end
  if id then
    k.texts[id] = text
  end
end

local function index_of(doc)
  local ix = indexes[doc]
  if ix then
    return ix
  end
  ix = {}
  for kind in pairs(KINDS) do
    ix[kind] = { texts = {}, order = {} }
  end
  if type(doc.entities) == "table" then
    for kind, set in pairs(doc.entities) do
      if ix[kind] then
        for id, text in pairs(set) do
          add(ix, kind, id, text)
        end
        sort(ix[kind].order)
      end
    end
  else
    local elements = doc.elements or {}
    for _, kind in ipairs({ "upstreams", "routes", "consumers" }) do
      for _, text in ipairs(elements[kind] or {}) do
        add(ix, kind, id_of(kind, text), text)
      end
    end
    if type(doc.skeleton) == "string" then
      local split = json_split.split(doc.skeleton, { global_policies = true })
      local list = split and split.elements.global_policies or {}
      for _, text in ipairs(list) do
        add(ix, "global_policies", id_of("global_policies", text), text)
      end
    end
  end
  if type(doc.policies) == "table" then
    for name, source in pairs(doc.policies) do
      add(ix, "policies", name, source)
    end
    sort(ix.policies.order)
  end
  indexes[doc] = ix
  return ix
end

-- ---- the API object -----------------------------------------------------------------

local API = {}
API.__index = API

function _M.new(opts)
  if type(opts) ~= "table" or type(opts.view) ~= "function" then
    error("admin.new: expects {mode =, view = function}", 2)
  end
  local mode = opts.mode or "file"
  if mode ~= "file" and mode ~= "etcd" then
    error("admin.new: mode must be \"file\" or \"etcd\"", 2)
  end
  local self = setmetatable({
    mode = mode,
    view = opts.view,
    api_key = opts.api_key,
    lua_path = opts.lua_path or {},
    sandbox = opts.sandbox or {},
    routes_path = opts.routes_path,
    pending = {}, -- kind -> id -> {rev =, text = text | false (deleted)}
  }, API)
  if mode == "etcd" then
    local e = opts.etcd or {}
    if type(e.endpoints) ~= "table" or #e.endpoints == 0 then
      error("admin.new: etcd mode needs etcd.endpoints", 2)
    end
    self.prefix = (e.prefix or "/moongate"):gsub("/+$", "")
    self.kv = etcd_kv.new({ endpoints = e.endpoints, timeout_ms = e.timeout_ms,
                            user = e.user, password = e.password, tls = e.tls,
                            request = opts.request or require("moongate.http").request })
  end
  for kind in pairs(KINDS) do
    self.pending[kind] = {}
  end
  return self
end

-- The doc in force and its etcd revision (0 when it has none).
function API:current()
  local doc = self.view() or {}
  return doc, tonumber(doc.revision) or 0
end

-- The text of kind/id as reads see it (the view, then our newer writes),
-- or nil.
function API:get(kind, id)
  local doc, rev = self:current()
  local p = self.pending[kind][id]
  if p then
    if p.rev > rev then
      return p.text or nil
    end
    self.pending[kind][id] = nil
  end
  return index_of(doc)[kind].texts[id]
end

-- The ids of kind in the version's order, then the ids written since
-- (sorted). O(n) (plus O(w log w) for w pending writes).
function API:ids(kind)
  local doc, rev = self:current()
  local k = index_of(doc)[kind]
  local pend = self.pending[kind]
  local ids, n = {}, 0
  for _, id in ipairs(k.order) do
    local p = pend[id]
    if not (p and p.rev > rev and not p.text) then
      n = n + 1
      ids[n] = id
    end
  end
  local new = {}
  for id, p in pairs(pend) do
    if p.rev <= rev then
      pend[id] = nil
    elseif p.text and k.texts[id] == nil then
      new[#new + 1] = id
    end
  end
  sort(new)
  for _, id in ipairs(new) do
    n = n + 1
    ids[n] = id
  end
  return ids
end

-- The entities of kind as decoded tables, {id = table}, for reference
-- checks. O(n) decodes; only for writes that need it.
function API:decoded(kind)
  local out = {}
  for _, id in ipairs(self:ids(kind)) do
    out[id] = json.decode(self:get(kind, id))
  end
  return out
end

function API:remember(kind, id, rev, text)
  self.pending[kind][id] = { rev = rev, text = text }
end

-- ---- answers ------------------------------------------------------------------------

local JSON_TYPE = { ["Content-Type"] = "application/json" }

local function answer(status, body, headers)
  if type(body) == "table" then
    body = json.encode(body)
  end
  return status, body or "", headers or JSON_TYPE
end

local function fail(status, msg, path, extra)
  local body = { error = msg, path = path }
  if extra then
    for k, v in pairs(extra) do
      body[k] = v
    end
  end
  return answer(status, body)
end

-- config_check's errors ({path, error}, paths named "<kind>.<id>...") as a
-- 400: the first as error/path, all of them in errors.
local function invalid(errs)
  local first = errs[1] or { path = "", error = "invalid" }
  return fail(400, first.error, first.path, { errors = errs })
end

-- ---- auth -----------------------------------------------------------------------------

-- Compares in time that depends on the configured key's length only (not
-- on where the first difference is).
local function same_key(given, key)
  local diff = #given == #key and 0 or 1
  for i = 1, #key do
    diff = bor(diff, bxor(byte(given, i) or 0, byte(key, i)))
  end
  return diff == 0
end
_M.same_key = same_key

-- ---- validation -----------------------------------------------------------------------

-- the sandboxed policies' sources as reads see them
local function sources_of(self)
  local out = {}
  for _, name in ipairs(self:ids("policies")) do
    out[name] = self:get("policies", name)
  end
  return out
end

-- Which routes (and global policies) name policy `name`: a list of
-- "routes.<id>" / "global_policies.<name>".
local function users_of_policy(self, name)
  local users = {}
  for id, r in pairs(self:decoded("routes")) do
    for _, p in ipairs(type(r) == "table" and type(r.policies) == "table" and r.policies or {}) do
      if type(p) == "table" and p.name == name then
        users[#users + 1] = "routes." .. id
        break
      end
    end
  end
  if self:get("global_policies", name) then
    users[#users + 1] = "global_policies." .. name
  end
  sort(users)
  return users
end

-- What config_check needs to check an entity or a policy source against
-- the rest of the config as reads see it (our pending writes included).
local function check_ctx(self)
  local sb = self.sandbox
  local sources = sources_of(self)
  return {
    upstream = function(id) return self:get("upstreams", id) end,
    policy_loader = config.policy_loader(self.lua_path, {
      sources = sources, dir = sb.policies_dir, max_instructions = sb.max_instructions,
    }),
    lua_path = self.lua_path,
    policies_dir = sb.policies_dir,
    max_instructions = sb.max_instructions,
    sources = sources,
    users = function(name)
      local out = {}
      for i, u in ipairs(users_of_policy(self, name)) do
        local kind, id = u:match("^([%w_]+)%.(.*)$")
        out[i] = { kind = kind, id = id, text = self:get(kind, id) }
      end
      return out
    end,
  }
end

-- ---- requests ---------------------------------------------------------------------------

local function parse_query(q)
  local out = {}
  for pair in (q or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    out[k] = v
  end
  return out
end

local function count_arg(args, name, default, max)
  local s = args[name]
  if s == nil or s == "" then
    return default
  end
  local n = tonumber(s)
  if not n or n ~= n or n % 1 ~= 0 or n < 0 or not find(s, "^%d+$") then
    return nil, "query." .. name .. ": expected a non-negative integer, got " .. quote(s)
  end
  if max and n > max then
    return nil, "query." .. name .. ": at most " .. max
  end
  return n
end

function API:list(kind, query)
  local args = parse_query(query)
  local limit, err = count_arg(args, "limit", DEFAULT_LIMIT, MAX_LIMIT)
  local offset
  if limit then
    offset, err = count_arg(args, "offset", 0)
  end
  if err then
    local path, msg = err:match("^(.-): (.*)$")
    return fail(400, msg, path)
  end
  local ids = self:ids(kind)
  local items = {}
  for i = offset + 1, offset + limit do
    local id = ids[i]
    if id == nil then
      break
    end
    local text = self:get(kind, id)
    if KINDS[kind].source then
      text = json.encode({ name = id, source = text })
    end
    items[#items + 1] = text
  end
  local doc = self:current()
  return answer(200, format('{"items":[%s],"total":%d,"limit":%d,"offset":%d}',
                            concat(items, ","), #ids, limit, offset),
                { ["Content-Type"] = "application/json",
                  ["X-Moongate-Version"] = tostring(doc.version or 0) })
end

local function valid_id(kind, id)
  if KINDS[kind].source or KINDS[kind].id == "name" then
    return find(id, "^[%w_%-]+$") ~= nil
  end
  return find(id, "^[%w_%-%.]+$") ~= nil
end

function API:put(kind, id, body)
  local named = kind .. "." .. id
  local text = body
  local refs -- etcd keys that must exist when the write lands
  if KINDS[kind].source then
    local errs = config_check.policy_source(id, body, check_ctx(self))
    if errs then
      return invalid(errs)
    end
  else
    -- the check the etcd source runs on the same value (config_check)
    local v, checked = config_check.entity(kind, id, body, check_ctx(self))
    if not v then
      return invalid(checked) -- the errors
    end
    text = checked -- the text, with its id when it was left out
    if kind == "routes" and type(v.upstream) == "string" then
      refs = { self.prefix .. "/upstreams/" .. v.upstream }
    end
  end
  local existed = self:get(kind, id) ~= nil
  local key = self.prefix .. "/" .. kind .. "/" .. id
  local rev, err, status
  if refs then
    -- the upstream must still exist when the route lands (another admin
    -- request may be deleting it while we wait on etcd)
    local cmp = {}
    for i, k in ipairs(refs) do
      cmp[i] = { key = k, target = "VERSION", result = "GREATER", value = 0 }
    end
    rev, err, status = self.kv:txn(cmp, { { put = { key, text } } })
    if status == 409 then
      return fail(409, "a referenced entity was deleted meanwhile; try again", named)
    end
  else
    rev, err, status = self.kv:put(key, text)
  end
  if not rev then
    return fail(status or 503, err, named)
  end
  self:remember(kind, id, rev, text)
  local headers = { ["X-Moongate-Revision"] = tostring(rev) }
  if KINDS[kind].source then
    headers["Content-Type"] = "text/plain; charset=utf-8"
  else
    headers["Content-Type"] = "application/json"
  end
  return answer(existed and 200 or 201, text, headers)
end

function API:delete(kind, id)
  local named = kind .. "." .. id
  if self:get(kind, id) == nil then
    return fail(404, "no " .. kind .. " " .. quote(id), named)
  end
  local cmp = {}
  if kind == "upstreams" then
    local users = {}
    for rid, r in pairs(self:decoded("routes")) do
      if type(r) == "table" and r.upstream == id then
        users[#users + 1] = "routes." .. rid
      end
    end
    if #users > 0 then
      sort(users)
      return fail(409, "upstream " .. quote(id) .. " is used by " .. concat(users, ", "), named,
                  { used_by = users })
    end
  elseif kind == "policies" then
    local users = users_of_policy(self, id)
    if #users > 0 then
      return fail(409, "policy " .. quote(id) .. " is used by " .. concat(users, ", "), named,
                  { used_by = users })
    end
  end
  if kind == "upstreams" or kind == "policies" then
    -- no route written since what we checked: a route naming it that
    -- lands meanwhile fails the compare (409) instead of dangling
    local _, rev = self:current()
    for _, p in pairs(self.pending.routes) do
      if p.rev > rev then
        rev = p.rev
      end
    end
    cmp[1] = { key = self.prefix .. "/routes/", prefix = true, target = "MOD", result = "LESS",
               value = rev + 1 }
  end
  local key = self.prefix .. "/" .. kind .. "/" .. id
  local rev, err, status
  if #cmp > 0 and self:current().revision then
    rev, err, status = self.kv:txn(cmp, { { delete = key } })
    if status == 409 then
      return fail(409, "routes changed while checking " .. named .. "; try again", named)
    end
  else
    rev, err, status = self.kv:delete(key)
  end
  if not rev then
    return fail(status or 503, err, named)
  end
  self:remember(kind, id, rev, false)
  return 204, "", { ["X-Moongate-Revision"] = tostring(rev) }
end

function API:read_one(kind, id)
  local text = self:get(kind, id)
  if text == nil then
    return fail(404, "no " .. kind .. " " .. quote(id), kind .. "." .. id)
  end
  local doc = self:current()
  return answer(200, text, {
    ["Content-Type"] = KINDS[kind].source and "text/plain; charset=utf-8" or "application/json",
    ["X-Moongate-Version"] = tostring(doc.version or 0),
  })
end

local function not_allowed(allow, msg)
  local status, body = fail(405, msg or "method not allowed", "")
  return status, body, { ["Content-Type"] = "application/json", Allow = allow }
end

-- req: {method, path, query, header = function(name) -> value | nil,
-- body = function() -> text | nil, err, status}. Returns status, body,
-- headers.
function API:handle(req)
  if self.api_key then
    local given = req.header("X-API-Key")
    if not (given and same_key(given, self.api_key)) then
      return fail(401, given and "invalid X-API-Key" or "X-API-Key required", "")
    end
  end
  local path, method = req.path, req.method
  if path == "/" then
    if method ~= "GET" then
      return not_allowed("GET")
    end
    local doc, rev = self:current()
    return answer(200, { mode = self.mode, version = doc.version or 0, revision = rev,
                         kinds = _M.ORDER })
  end
  local kind, rest = path:match("^/([%w_]+)(.*)$")
  if not (kind and KINDS[kind]) then
    return fail(404, "not found: " .. path, "")
  end
  if rest == "" or rest == "/" then
    if method ~= "GET" then
      return not_allowed("GET")
    end
    return self:list(kind, req.query)
  end
  local id = rest:match("^/([^/]+)$")
  if not id or not valid_id(kind, id) then
    return fail(404, "not found: " .. path, "")
  end
  if method == "GET" then
    return self:read_one(kind, id)
  end
  if method ~= "PUT" and method ~= "DELETE" then
    return not_allowed("GET, PUT, DELETE")
  end
  if self.mode == "file" then
    return not_allowed("GET", "the config is file-backed (config_source.type \"file\""
                              .. (self.routes_path and ", " .. self.routes_path or "")
                              .. "): edit the file and reload, or use an etcd config source")
  end
  if method == "DELETE" then
    return self:delete(kind, id)
  end
  local body, err, status = req.body()
  if not body then
    return fail(status or 400, tostring(err or "a body is required"), "")
  end
  if #body > MAX_BODY then
    return fail(413, "the body is larger than " .. MAX_BODY .. " bytes", "")
  end
  if body == "" then
    return fail(400, "a body is required", "")
  end
  return self:put(kind, id, body)
end

-- ---- the runtime adapter -----------------------------------------------------------------

-- The API of a node (config.load_node's table) over view (a function
-- returning the doc in force): what the control process makes at start.
function _M.from_node(node, view)
  local src = node.config_source
  return _M.new({
    mode = src.type,
    view = view,
    api_key = node.admin.api_key,
    etcd = src.type == "etcd" and { endpoints = src.endpoints, prefix = src.prefix,
                                    timeout_ms = src.timeout_ms, user = src.user,
                                    password = src.password, tls = src.tls } or nil,
    lua_path = node.lua_path,
    sandbox = node.sandbox,
    routes_path = src.path,
  })
end

-- Serves a request of the admin listener (the control process's access
-- handler calls it). The body is read through the runtime (yields) and
-- bounded by MAX_BODY before it is read whole.
function API:serve(rp)
  local ffi = require("ffi")
  local binding = require("moongate.ffi")
  local context = require("moongate.context")
  local request = require("moongate.request")
  local C = binding.C
  local r = ffi.cast("mg_req_t *", rp)
  local v = ffi.cast("mg_req_view_t *", rp)
  context.set(r)
  local req = request.new_req(r, v)
  C.mg_req_set_body_limit(r, MAX_BODY)
  local status, body, headers = self:handle({
    method = req.method,
    path = req.path,
    query = req.query,
    header = function(name) return req:header(name) end,
    body = function()
      local b, err = req:body()
      if not b then
        return nil, "the body could not be read (" .. tostring(err) .. "; at most "
                    .. MAX_BODY .. " bytes)", 413
      end
      return b
    end,
  })
  for name, value in pairs(headers) do
    C.mg_resp_set_header(r, name, #name, value, #value, C.MG_HDR_SET)
  end
  C.mg_resp_send(r, status, body, #body)
end

return _M
