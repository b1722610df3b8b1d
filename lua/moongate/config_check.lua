-- The control process's check of each new config (control.lua): what
-- `moongate check` finds, from one Lua state kept across reloads, so that
-- a one-route change validates that route, not the whole config.
--
--   local errs, parts = config_check.check(node_path, node_text, routes_text)
--   -- errs: {} when valid; parts: the valid version's texts as
--   -- config_version keeps them (parts.doc: routes.json split by
--   -- json_split; nil when the file could not be split)
--   config_check.stats()  -- the last valid check's {routes =, validated =,
--                         -- whole =} (specs, logs)
--
-- node_text, routes_text: the files' contents as the caller read them
-- (nil: read here). A config_version builder in check mode keeps, from
-- check to check, the entities it validated by their text (as a worker
-- does). Valid: an empty list. Invalid: config.check's list, run on the
-- whole config, so the errors are word for word those of `moongate
-- check` (a refused reload is rare; its cost does not matter). Nothing
-- here runs a policy's init() or makes a C handle.
--
-- One entity (a PUT of the Admin API, a key of the etcd source): the one
-- check both run, so that what one refuses the other refuses with the same
-- error at the same path, as `moongate check` does in a file
-- (config.check_routes, on a document holding the entity):
--
--   local value, text = config_check.entity(kind, id, text, ctx)
--   -- or nil, errs: {{path = "routes.demo.paths[0]", error = "..."}, ...}
--   local errs = config_check.policy_source(name, source, ctx) -- nil: valid
--   config_check.error_text(errs)  -- "path: error; path: error" (logs)
--   config_check.parse(kind, id, text)  -- entity()'s first half (JSON, id)
--   config_check.named_errors(errs, "routes[3]", "routes.demo")
--
-- kind: upstreams, routes, consumers, global_policies (keyed by their
-- policy name), certificates (shape only: PEM strings); id: what it is
-- stored under (the Admin API's path, the etcd key's last part). text:
-- the JSON as written; returned with the id (a global policy's name)
-- written in as the first member when it was left out; one that differs
-- is refused. Paths start "<kind>.<id>" (the index of the document goes).
-- ctx: upstream = function(id) -> text | nil (the upstream a route names,
-- as the caller sees it), policy_loader (config.policy_loader). For
-- policy_source: lua_path, policies_dir, max_instructions, sources = {name
-- = text} (the sandboxed policies accepted), users = function(name) ->
-- {{kind =, id =, text =}} (what names it: each is checked again with the
-- new source), upstream.

local cjson = require("cjson.safe")
local config = require("moongate.config")
local schema = require("moongate.schema")

local pcall = pcall
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local find = string.find
local sub = string.sub
local concat = table.concat

local _M = {}

local builder -- made on the first check
local last_stats

function _M.check(node_path, node_text, routes_text)
  -- required here: the entity checks below (the Admin API, the etcd
  -- source) need none of the builder's modules (router, FFI)
  builder = builder or require("moongate.config_version").new({ check = true })
  local ok, v = pcall(builder.build, builder, config.resolve_path(node_path), node_text,
                      routes_text)
  if ok and v then
    local parts = v.parts
    builder:commit(v)
    last_stats = v.stats
    return {}, parts
  end
  if not ok then
    builder = nil -- raised: a bug; start over rather than trust its indexes
  end
  return config.check(node_path)
end

function _M.stats()
  return last_stats
end

-- ---- one entity --------------------------------------------------------------------

local json = cjson.new()
json.decode_invalid_numbers(false)
json.encode_invalid_numbers(false)
json.decode_max_depth(62) -- as config_version's per-entity decoder: what a worker reads

-- the member an entity of kind is stored under
local ID_FIELD = { upstreams = "id", routes = "id", consumers = "id", global_policies = "name",
                   certificates = "id" }
_M.ID_FIELD = ID_FIELD

local function quote(s)
  return '"' .. tostring(s) .. '"'
end

local CERT_DEF = schema.compile({
  type = "object",
  additionalProperties = false,
  required = { "id", "cert", "key" },
  properties = {
    id = { type = "string", minLength = 1 },
    cert = { type = "string", check = function(s)
      if not find(s, "-----BEGIN CERTIFICATE-----", 1, true) then
        return false, "expected a PEM certificate (-----BEGIN CERTIFICATE-----)"
      end
      return true
    end },
    key = { type = "string", check = function(s)
      if not find(s, "-----BEGIN [%u ]*PRIVATE KEY-----") then
        return false, "expected a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
      end
      return true
    end },
    snis = { type = "array", minItems = 1, uniqueItems = true,
             items = { type = "string", minLength = 1 } },
  },
})

-- text with `"field": id` as its first member; the rest stays as written
local function with_id(text, field, id)
  local open = find(text, "{", 1, true)
  local rest = sub(text, open + 1)
  local sep = find(rest, "^%s*}") and "" or ","
  return sub(text, 1, open) .. json.encode(field) .. ":" .. json.encode(id) .. sep .. rest
end

-- "path: message" strings about the document ("routes[0].paths[0]: ...")
-- as {path, error} about the entity ("routes.demo.paths[0]")
local function named_errors(errs, where, named)
  where = where or ""
  local list = {}
  for i, e in ipairs(errs) do
    local path, msg = e:match("^([%w_%.%[%]%-\"]*): (.*)$")
    if not path then
      path, msg = "", e
    end
    if sub(path, 1, #where) == where then
      path = named .. sub(path, #where + 1)
    end
    list[i] = { path = path, error = msg }
  end
  return list
end
_M.named_errors = named_errors

local function one_error(path, msg)
  return { { path = path, error = msg } }
end

local function refused(path, msg)
  return nil, one_error(path, msg)
end

-- The first half of entity(): text decoded, an object, its id set or
-- checked. v (decoded), text (with the id) or nil, errs. For callers that
-- check many entities in one document (etcd_source's batch of routes).
function _M.parse(kind, id, text)
  local named = kind .. "." .. id
  local field = ID_FIELD[kind]
  if not field then
    error("config_check: unknown kind " .. tostring(kind), 2)
  end
  local v, err = json.decode(text)
  if v == nil then
    return refused(named, "invalid JSON: " .. tostring(err))
  end
  if type(v) ~= "table" or not find(text, "^%s*{") then
    return refused(named, "expected a JSON object")
  end
  if v[field] == nil then
    v[field] = id
    text = with_id(text, field, id)
  elseif v[field] ~= id then
    return refused(named .. "." .. field, field .. " " .. json.encode(v[field])
                   .. " differs from " .. quote(id) .. ", the " .. field
                   .. " it is stored under (the path or key)")
  end
  return v, text
end

function _M.entity(kind, id, text, ctx)
  local v
  v, text = _M.parse(kind, id, text)
  if not v then
    return nil, text
  end
  local named = kind .. "." .. id
  local where = kind .. "[0]"
  if kind == "certificates" then
    local ok, errs = CERT_DEF:validate(v, where)
    if not ok then
      return nil, named_errors(schema.format(errs), where, named)
    end
    return v, text
  end
  local doc = { [kind] = { v } }
  if kind == "routes" and type(v.upstream) == "string" then
    -- the upstream it names, so that the reference resolves (none: the
    -- check says "unknown upstream")
    local up = ctx.upstream and ctx.upstream(v.upstream)
    doc.upstreams = { up and json.decode(up) or nil }
  end
  local ok, errs = config.check_routes(doc, { policy_loader = ctx.policy_loader })
  if not ok then
    return nil, named_errors(errs, where, named)
  end
  return v, text
end

function _M.policy_source(name, source, ctx)
  local named = "policies." .. name
  if not config.policy_files(nil, name) then
    return one_error(named, "invalid policy name " .. quote(name)
                            .. " (letters, digits, '_' and '-')")
  end
  local file = config.policy_file(ctx.lua_path, name)
  if file then
    return one_error(named, "a policy file named " .. quote(name) .. " exists (" .. file
                            .. "): a sandboxed policy of that name would never run")
  end
  local sandbox = require("moongate.sandbox") -- it requires config: not at load
  sandbox.configure({ max_instructions = ctx.max_instructions })
  local mod, err = sandbox.load(name, source)
  if not mod then
    return one_error(named, tostring(err))
  end
  -- what names it, checked again with the new source (its schema may
  -- have changed)
  local users = ctx.users and ctx.users(name) or {}
  if #users > 0 then
    local sources = {}
    for n, text in pairs(ctx.sources or {}) do
      sources[n] = text
    end
    sources[name] = source
    local loader = config.policy_loader(ctx.lua_path, {
      sources = sources, dir = ctx.policies_dir, max_instructions = ctx.max_instructions,
    })
    for _, u in ipairs(users) do
      local ok, errs = _M.entity(u.kind, u.id, u.text,
                                 { upstream = ctx.upstream, policy_loader = loader })
      if not ok then
        return errs
      end
    end
  end
  return nil
end

function _M.error_text(errs)
  local out = {}
  for i, e in ipairs(errs) do
    out[i] = e.path ~= "" and (e.path .. ": " .. e.error) or e.error
  end
  return concat(out, "; ")
end

return _M
