-- key-auth: the consumer is whoever holds the API key the request carries.
--
--   "consumers": [{"id": "alice", "tenant": "acme",
--                  "credentials": {"key-auth": {"key": "alice-secret"}}}]
--   {"name": "key-auth", "conf": {"header": "apikey", "query_param": "apikey"}}
--
-- The key is read from the `header` (default "apikey"), else from the
-- `query_param` (default "apikey"); key_in_header / key_in_query = false
-- turn either source off. It is looked up in consumers[].credentials
-- ["key-auth"].key (a string, or a list of keys of one consumer); the
-- header wins when both carry one. Found: ctx.consumer is that consumer,
-- ctx.tenant its tenant, and the header and the query parameter are removed
-- before the request goes upstream (hide_credentials = false forwards them). Missing or unknown: 401
-- {"error": ...} with WWW-Authenticate: Key realm="moongate". A key given
-- twice (two headers, two query parameters) is refused, not guessed at.
-- Priority 2500: after cors (a preflight carries no key) and
-- ip-restriction, before the policies that use ctx.consumer.
-- the decoding ctx.req:arg uses, so the parameter removed is the one read
local unescape = require("moongate.request").unescape

local gmatch = string.gmatch
local concat = table.concat

local CHALLENGE = 'Key realm="moongate"'
local MISSING = { error = "no API key found in request" }
local INVALID = { error = "invalid API key" }

local NAME = "^[%w!#%$%%&'%*%+%-%.%^_`|~]+$"

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    header = { type = "string", pattern = NAME, default = "apikey" },
    query_param = { type = "string", minLength = 1, default = "apikey" },
    key_in_header = { type = "boolean", default = true },
    key_in_query = { type = "boolean", default = true },
    hide_credentials = { type = "boolean", default = true },
  },
  check = function(conf)
    if not conf.key_in_header and not conf.key_in_query then
      return false, "key_in_header and key_in_query cannot both be false"
    end
    return true
  end,
}

-- the raw query without the parameters named `name` (others kept byte for
-- byte)
local function without_param(query, name)
  local keep, n = {}, 0
  for pair in gmatch(query, "[^&]+") do
    local k = pair:match("^([^=]*)")
    if unescape(k) ~= name then
      n = n + 1
      keep[n] = pair
    end
  end
  return concat(keep, "&", 1, n)
end

local function unauthorized(ctx, body)
  ctx.resp:set_header("WWW-Authenticate", CHALLENGE)
  return 401, body
end

local function access(conf, ctx)
  local req = ctx.req
  local from_header, from_query
  if conf.key_in_header then
    from_header = req:header(conf.header)
  end
  if conf.key_in_query and req.query ~= "" then
    from_query = req:arg(conf.query_param)
  end
  local key = from_header
  if key == nil then
    key = from_query
  end
  if key == nil or key == "" or key == true then -- "?apikey" alone is true
    return unauthorized(ctx, MISSING)
  end
  -- ?apikey=a&apikey=b gives a list: no consumer has a list for a key
  local consumer = ctx.consumers:find("key-auth", "key", key)
  if not consumer then
    return unauthorized(ctx, INVALID)
  end
  ctx.consumer = consumer
  ctx.tenant = consumer.tenant
  -- both places are cleaned: a second key beside the one used is a
  -- credential too
  if conf.hide_credentials then
    if from_header ~= nil then
      req:set_header(conf.header, nil)
    end
    if from_query ~= nil then
      req:set_query(without_param(req.query, conf.query_param))
    end
  end
end

return {
  name = "key-auth",
  priority = 2500,
  version = "1.0.0",
  schema = schema,
  access = access,
}
