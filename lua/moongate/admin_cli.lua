-- `moongate config dump -c CONF` and `moongate config push FILE -c CONF`:
-- the Admin API's command-line client (runtime/src/cli_config.c runs it
-- with a blocking HTTP call on the runtime's own client).
--
--   dump: GETs every kind, page by page, and prints a routes.json-shaped
--         document (upstreams, routes, consumers, global_policies) of the
--         version in force, each entity as the text it was written as.
--         Certificates and sandboxed policies are not part of routes.json:
--         a note on stderr counts them (GET /certificates, /policies).
--   push: validates FILE as `moongate check` does (the sandboxed policies
--         the Admin API has count), then PUTs upstreams, routes, consumers
--         and global policies in that order (references first), each as
--         the text FILE has; every failure is reported, the rest go on.
--         Entities that FILE does not list are left alone.
--
-- The Admin API's address and key come from CONF (admin.listen,
-- admin.api_key); an unspecified address (0.0.0.0, ::) is reached on
-- loopback. Exit code: 0, or 1 with the reasons on stderr.

local cjson = require("cjson.safe")
local config = require("moongate.config")
local json_split = require("moongate.json_split")

local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local concat = table.concat
local format = string.format
local io_stderr = io.stderr
local io_stdout = io.stdout

local _M = {}

local PAGE = 1000 -- the Admin API's largest page
local TIMEOUT_MS = 30000
local DUMPED = { "upstreams", "routes", "consumers", "global_policies" }
local ID = { upstreams = "id", routes = "id", consumers = "id", global_policies = "name" }

local function err(sub, msg)
  io_stderr:write("moongate: config ", sub, ": ", msg, "\n")
end

local function client(node, http)
  local host = node.admin.host
  if host == "0.0.0.0" then
    host = "127.0.0.1"
  elseif host == "::" then
    host = "::1"
  end
  if host:find(":", 1, true) then
    host = "[" .. host .. "]"
  end
  local base = "http://" .. host .. ":" .. node.admin.port
  local headers = node.admin.api_key and { ["X-API-Key"] = node.admin.api_key } or {}
  local c = { base = base }
  -- returns status, body, or nil, "METHOD url: why"
  function c.call(method, path, body)
    local h = headers
    if body then
      h = { ["Content-Type"] = "application/json" }
      for k, v in pairs(headers) do
        h[k] = v
      end
    end
    local status, res = http(method, base .. path, h, body, TIMEOUT_MS)
    if not status then
      return nil, method .. " " .. base .. path .. ": " .. tostring(res)
    end
    return status, res
  end
  return c
end

-- "status error (path)" of an Admin API answer
local function reason(status, body)
  local v = cjson.decode(body)
  if type(v) == "table" and v.error then
    local s = status .. " " .. tostring(v.error)
    if v.path and v.path ~= "" then
      s = s .. " (" .. tostring(v.path) .. ")"
    end
    return s
  end
  return status .. " " .. tostring(body):sub(1, 200)
end

-- Every item of kind, as texts (json_split keeps them as the API sent
-- them). Returns the list, or nil and why.
local function fetch(c, kind)
  local out, offset = {}, 0
  while true do
    local path = format("/%s?limit=%d&offset=%d", kind, PAGE, offset)
    local status, body = c.call("GET", path)
    if not status then
      return nil, body
    end
    if status ~= 200 then
      return nil, "GET " .. c.base .. path .. ": " .. reason(status, body)
    end
    local doc = json_split.split(body, { items = true })
    local total = cjson.decode(body)
    if not doc or type(total) ~= "table" or type(total.total) ~= "number" then
      return nil, "GET " .. c.base .. path .. ": not a list"
    end
    local items = doc.elements.items or {}
    for _, t in ipairs(items) do
      out[#out + 1] = t
    end
    offset = offset + #items
    if #items == 0 or offset >= total.total then
      return out
    end
  end
end

local function dump(c)
  local parts = {}
  for i, kind in ipairs(DUMPED) do
    local items, e = fetch(c, kind)
    if not items then
      err("dump", e)
      return 1
    end
    local body = #items > 0 and "\n    " .. concat(items, ",\n    ") .. "\n  " or ""
    parts[i] = format('  "%s": [%s]', kind, body)
  end
  io_stdout:write("{\n", concat(parts, ",\n"), "\n}\n")
  local extra = {}
  for _, kind in ipairs({ "certificates", "policies" }) do
    local status, body = c.call("GET", "/" .. kind .. "?limit=0")
    local v = status == 200 and cjson.decode(body)
    if type(v) == "table" and type(v.total) == "number" and v.total > 0 then
      extra[#extra + 1] = v.total .. " " .. kind
    end
  end
  if #extra > 0 then
    err("dump", "not in routes.json: " .. concat(extra, ", ")
                .. " (GET /certificates, GET /policies)")
  end
  return 0
end

local function push(c, node, file)
  -- the sandboxed policies the gateway has count for validation
  local sources = {}
  local items, e = fetch(c, "policies")
  if not items then
    err("push", e)
    return 1
  end
  for _, t in ipairs(items) do
    local v = cjson.decode(t)
    if type(v) == "table" and type(v.name) == "string" then
      sources[v.name] = v.source
    end
  end
  local path = config.resolve_path(file)
  local f = io.open(path, "rb")
  if not f then
    err("push", path .. ": cannot be read")
    return 1
  end
  local text = f:read("*a")
  f:close()
  local routes, errs = config.load_routes(path, {
    policy_loader = config.policy_loader(node.lua_path, {
      sources = sources, dir = node.sandbox.policies_dir,
      max_instructions = node.sandbox.max_instructions,
    }),
  }, text, config.check_routes)
  if not routes then
    for _, m in ipairs(errs) do
      if m:sub(1, #path + 2) ~= path .. ": " then
        m = path .. ": " .. m
      end
      io_stderr:write(m, "\n")
    end
    return 1
  end
  local split, serr = json_split.split(text, { upstreams = true, routes = true, consumers = true,
                                               global_policies = true })
  if not split then
    err("push", path .. ": " .. tostring(serr))
    return 1
  end
  local counts, failed = {}, 0
  for _, kind in ipairs(DUMPED) do
    local n = 0
    for _, t in ipairs(split.elements[kind] or {}) do
      local id = cjson.decode(t)[ID[kind]]
      local status, body = c.call("PUT", "/" .. kind .. "/" .. id, t)
      if status == 200 or status == 201 then
        n = n + 1
      else
        failed = failed + 1
        err("push", kind .. "." .. id .. ": " .. (status and reason(status, body) or body))
      end
    end
    counts[#counts + 1] = n .. " " .. kind
  end
  io_stdout:write("pushed ", concat(counts, ", "), "\n")
  return failed == 0 and 0 or 1
end

-- sub: "dump" | "push"; file: the routes.json to push; http: (method,
-- url, headers, body, timeout_ms) -> status, body | nil, err. Returns
-- the exit code.
function _M.run(sub, file, conf_path, http)
  local node, errs = config.load_node(config.resolve_path(conf_path))
  if not node then
    for _, m in ipairs(errs) do
      io_stderr:write(conf_path, ": ", m, "\n")
    end
    return 1
  end
  local c = client(node, http)
  if sub == "dump" then
    return dump(c)
  end
  return push(c, node, file)
end

return _M
