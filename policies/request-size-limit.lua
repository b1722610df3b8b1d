-- request-size-limit: a route's own request body limit, below the node's
-- limits.max_body_bytes.
--
--   {"name": "request-size-limit", "conf": {"max_bytes": "1m"}}
--
-- max_bytes: bytes (an integer) or a size "64k", "10m", "1g" (1024-based).
-- A Content-Length above it gets 413 {"error": "request body too large"}
-- before anything reaches the upstream. A chunked body is counted as it
-- arrives (by the runtime, mg_req_set_body_limit): once it grows past the
-- limit the client gets the gateway's 413 and the upstream request is cut
-- (an upstream that already answered keeps nothing of it: the exchange is
-- aborted). Runs early (priority 2900: after ip-restriction, before
-- key-auth), so an oversized request costs no credential lookup.
local tonumber = tonumber
local lower = string.lower
local match = string.match

local UNITS = { [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 }

local function bytes_of(v)
  if type(v) == "number" then
    return v
  end
  local n, unit = match(v, "^(%d+)([kKmMgG]?)$")
  if not n then
    return nil
  end
  return tonumber(n) * UNITS[lower(unit)]
end

local schema = {
  type = "object",
  additionalProperties = false,
  required = { "max_bytes" },
  properties = {
    max_bytes = {
      oneOf = {
        { type = "integer", minimum = 0 },
        { type = "string", pattern = "^%d+[kKmMgG]?$" },
      },
    },
  },
}

return {
  name = "request-size-limit",
  priority = 2900,
  version = "1.0.0",
  schema = schema,
  init = function(conf)
    return { max = bytes_of(conf.max_bytes) }
  end,
  access = function(c, ctx)
    if not ctx.req:set_body_limit(c.max) then
      return 413, { error = "request body too large" }
    end
  end,
}
