-- cors: Cross-Origin Resource Sharing, answered and decorated at the gateway.
--
--   {"name": "cors", "conf": {"origins": ["https://app.example.com"],
--      "credentials": true, "expose_headers": ["X-Total"], "max_age": 600}}
--
-- A preflight (OPTIONS with Origin and Access-Control-Request-Method) is
-- answered 204 here and never reaches the upstream. From an allowed origin
-- it carries Access-Control-Allow-Origin, -Allow-Methods, -Allow-Headers
-- (the configured list, or else the request's Access-Control-Request-
-- Headers echoed), -Max-Age and, with credentials, -Allow-Credentials.
-- From any other origin it is still answered 204, without CORS headers, so
-- the browser refuses the call: what Kong's and APISIX's cors plugins do.
--
-- Any other request with an Origin gets Access-Control-Allow-Origin (and
-- -Allow-Credentials, -Expose-Headers) from an allowed origin, nothing from
-- another. They are set in access, so they reach whatever response the
-- client gets, including a later policy's 401 and the gateway's 502 (a
-- browser can then read the error); they replace the upstream's own CORS
-- headers. "*" allows every origin; with credentials the origin is echoed
-- instead, since browsers refuse "*" with credentials. Vary: Origin is
-- added whenever the answer depends on the origin.
local tostring = tostring
local ipairs = ipairs
local concat = table.concat
local upper = string.upper

local TOKEN = "^[%w!#%$%%&'%*%+%-%.%^_`|~]+$"

local function origin_ok(o)
  if o == "*" or o == "null" or o:find("^%a[%w+.-]*://[^/%s?#]+$") then
    return true
  end
  return false, "must be \"*\", \"null\" or scheme://host[:port] (no path), got \"" .. o .. "\""
end

local function token_list(default)
  return { type = "array", default = default, uniqueItems = true,
           items = { type = "string", pattern = TOKEN } }
end

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    origins = { type = "array", minItems = 1, uniqueItems = true, default = { "*" },
                items = { type = "string", check = origin_ok } },
    methods = token_list({ "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS" }),
    -- no default: a preflight's Access-Control-Request-Headers is echoed
    headers = { type = "array", uniqueItems = true, items = { type = "string", pattern = TOKEN } },
    expose_headers = token_list({}),
    credentials = { type = "boolean", default = false },
    max_age = { type = "integer", minimum = 0, maximum = 86400, default = 5 },
  },
}

local function init(conf)
  local c = {
    any = false,
    set = {},
    credentials = conf.credentials,
    max_age = tostring(conf.max_age),
  }
  for _, o in ipairs(conf.origins) do
    if o == "*" then
      c.any = true
    else
      c.set[o] = true
    end
  end
  local methods = {}
  for i, m in ipairs(conf.methods) do
    methods[i] = upper(m)
  end
  c.methods = concat(methods, ", ")
  if conf.headers then
    c.headers = concat(conf.headers, ", ")
  end
  if #conf.expose_headers > 0 then
    c.expose = concat(conf.expose_headers, ", ")
  end
  -- "*" answers the same to every origin, unless credentials echo it
  c.vary = not (c.any and not c.credentials)
  c.allow_origin = (c.any and not c.credentials) and "*" or nil
  return c
end

local function allowed(c, origin)
  return c.any or c.set[origin] == true
end

local function access(c, ctx)
  local req, resp = ctx.req, ctx.resp
  local origin = req:header("Origin")
  if not origin then
    return
  end
  local ok = allowed(c, origin)
  if c.vary then
    resp:add_header("Vary", "Origin")
  end
  local preflight = req.method == "OPTIONS"
                    and req:header("Access-Control-Request-Method") ~= nil
  if ok then
    resp:set_header("Access-Control-Allow-Origin", c.allow_origin or origin)
    if c.credentials then
      resp:set_header("Access-Control-Allow-Credentials", "true")
    end
  end
  if not preflight then
    if ok and c.expose then
      resp:set_header("Access-Control-Expose-Headers", c.expose)
    end
    return
  end
  if ok then
    resp:set_header("Access-Control-Allow-Methods", c.methods)
    local allow_headers = c.headers
    if not allow_headers then
      allow_headers = req:header("Access-Control-Request-Headers")
      resp:add_header("Vary", "Access-Control-Request-Headers")
    end
    if allow_headers and allow_headers ~= "" then
      resp:set_header("Access-Control-Allow-Headers", allow_headers)
    end
    resp:set_header("Access-Control-Max-Age", c.max_age)
  end
  return 204
end

return {
  name = "cors",
  priority = 4000,
  version = "1.0.0",
  schema = schema,
  init = init,
  access = access,
}
