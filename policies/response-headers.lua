-- response-headers: edits the response headers the client gets.
--
--   {"name": "response-headers", "conf": {
--      "remove": ["Server"],
--      "set": {"Cache-Control": "no-store", "X-Request-Route": "$route"},
--      "add": {"Set-Cookie": ["a=1", "b=2"]}}}
--
-- remove (the upstream's), then set (replaces the upstream's), then add
-- (beside the upstream's). Values take the variables of request-headers.
-- The edits are made in header_filter, which runs on every response of
-- the route: the upstream's, the gateway's own errors after routing
-- (502/504, 413...) and every policy's answer (key-auth's 401, cors'
-- preflight, static-response, redirect).
local config = require("moongate.config")

local headers = dofile(config.policies_dir .. "/lib/headers.lua")
local apply = headers.apply

return {
  name = "response-headers",
  priority = 900,
  version = "1.0.0",
  schema = headers.edits_schema("response"),
  init = headers.compile_edits,
  header_filter = function(edits, ctx)
    apply(edits, ctx.resp, ctx)
  end,
}
