-- redirect: answers with a redirect to a URL or a path; the upstream is
-- never contacted.
--
--   {"name": "redirect", "conf": {"to": "https://new.example.com/docs",
--                                 "status": 301, "keep_query": true}}
--
-- to: an absolute URL (scheme://host...) or a path starting with "/".
-- status: 301, 302 (default), 303, 307 or 308 (307/308 keep the method and
-- body). keep_query: the request's query is appended to the Location
-- (after "&" when `to` has a query of its own). No body. Priority 800:
-- after the auth policies, before static-response; response-headers (900)
-- decorates the answer.
local find = string.find

local function target_ok(to)
  if find(to, "[%c%s]") then
    return false, "must not contain spaces or control characters"
  end
  if find(to, "^/") and not find(to, "^//") or find(to, "^%a[%w+.-]*://[^/?#]") then
    return true
  end
  return false, "must be an absolute URL (scheme://host/...) or a path starting with one \"/\""
end

local schema = {
  type = "object",
  additionalProperties = false,
  required = { "to" },
  properties = {
    to = { type = "string", check = target_ok },
    status = { type = "integer", enum = { 301, 302, 303, 307, 308 }, default = 302 },
    keep_query = { type = "boolean", default = false },
  },
}

local function init(conf)
  local base = conf.to
  local hash = find(base, "#", 1, true)
  local fragment = ""
  if hash then -- the query goes before a fragment
    fragment = base:sub(hash)
    base = base:sub(1, hash - 1)
  end
  return {
    to = conf.to,
    status = conf.status,
    keep_query = conf.keep_query,
    base = base,
    fragment = fragment,
    joiner = find(base, "?", 1, true) and "&" or "?",
  }
end

local function access(c, ctx)
  local location = c.to
  if c.keep_query then
    local q = ctx.req.query
    if q ~= "" then
      location = c.base .. c.joiner .. q .. c.fragment
    end
  end
  ctx.resp:set_header("Location", location)
  return c.status
end

return {
  name = "redirect",
  priority = 800,
  version = "1.0.0",
  schema = schema,
  init = init,
  access = access,
}
