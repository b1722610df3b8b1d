-- static-response: the gateway answers by itself (mock endpoints, stubs,
-- maintenance pages); the upstream is never contacted, and a route with
-- this policy needs none.
--
--   {"name": "static-response", "conf": {"status": 200,
--      "headers": {"X-Mock": "yes", "X-Request": "$request_id"},
--      "body": {"users": [], "total": 0}}}
--
-- status: 200..599 (default 200). headers: {name = value}; values take the
-- variables of request-headers ($remote_addr, $request_id, $consumer,
-- $route). body: a string, sent as it is (Content-Type text/plain unless
-- headers gives one), or a JSON object/array, encoded once per config
-- version (Content-Type application/json unless headers gives one); default
-- "" (no body). Priority 700: it answers after the auth and restriction
-- policies ran, and response-headers (900) and cors (4000) still decorate
-- the answer.
local config = require("moongate.config")
local mg = require("moongate")

local headers = dofile(config.policies_dir .. "/lib/headers.lua")
local render = headers.render
local type = type
local pairs = pairs
local lower = string.lower

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    status = { type = "integer", minimum = 200, maximum = 599, default = 200 },
    headers = {
      type = "object", default = {}, additionalProperties = headers.value_def,
      check = function(map) return headers.check_map(map, "response", "set") end,
    },
    body = { type = { "string", "object", "array" }, default = "" },
  },
  check = function(conf)
    local body = conf.body
    local empty = body == "" -- an empty table is a JSON body ("{}")
    if (conf.status == 204 or conf.status == 304) and not empty then
      return false, "a " .. conf.status .. " answer has no body"
    end
    return true
  end,
}

local function init(conf)
  local body = conf.body
  local ct
  if type(body) == "table" then
    body = mg.json.encode(body)
    ct = "application/json"
  elseif body ~= "" then
    ct = "text/plain; charset=utf-8"
  end
  local has_ct = false
  for name in pairs(conf.headers) do
    if lower(name) == "content-type" then
      has_ct = true
    end
  end
  local list = headers.compile_map(conf.headers)
  if ct and not has_ct then
    list[#list + 1] = { name = "Content-Type", value = ct }
  end
  return { status = conf.status, headers = list, body = body }
end

local function access(c, ctx)
  local resp = ctx.resp
  local list = c.headers
  for i = 1, #list do
    local e = list[i]
    local v = render(e, ctx)
    if v ~= "" then
      resp:set_header(e.name, v)
    end
  end
  return c.status, c.body
end

return {
  name = "static-response",
  priority = 700,
  version = "1.0.0",
  schema = schema,
  init = init,
  access = access,
}
