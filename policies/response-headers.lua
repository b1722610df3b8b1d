-- response-headers: edits the response headers the client gets.
--
--   {"name": "response-headers", "conf": {
--      "remove": ["Server"],
--      "set": {"Cache-Control": "no-store", "X-Request-Route": "$route"},
--      "add": {"Set-Cookie": ["a=1", "b=2"]}}}
--
-- remove (the upstream's), then set (replaces the upstream's), then add
-- (beside the upstream's). Values take the variables of request-headers.
-- The edits are made in access, so they reach whatever response the client
-- gets after this policy ran: the upstream's, the gateway's own 502/504,
-- and the answers of static-response and redirect (which run later,
-- priority 700/800 < 900). Answers of policies that run earlier (cors,
-- ip-restriction, request-size-limit, key-auth) do not carry them.
local config = require("moongate.config")

local headers = dofile(config.policies_dir .. "/lib/headers.lua")
local apply = headers.apply

return {
  name = "response-headers",
  priority = 900,
  version = "1.0.0",
  schema = headers.edits_schema("response"),
  init = headers.compile_edits,
  access = function(edits, ctx)
    apply(edits, ctx.resp, ctx)
  end,
}
