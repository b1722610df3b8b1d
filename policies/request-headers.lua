-- request-headers: edits the request headers the upstream gets.
--
--   {"name": "request-headers", "conf": {
--      "remove": ["X-Debug"],
--      "set": {"X-Consumer": "$consumer", "X-Via": "moongate $route"},
--      "add": {"X-Tag": ["a", "b"]}}}
--
-- remove, then set (replaces every value the client sent), then add (one
-- more value each). Values may use $remote_addr, $request_id, $consumer,
-- $route (${name} before letters); they are compiled once per config
-- version and rendered once per request. A value whose variables come out
-- empty removes the header (set) or adds nothing (add): "X-Consumer:
-- $consumer" without a consumer never forwards the client's X-Consumer.
-- Runs in access after the auth policies (priority 1000 < key-auth's 2500),
-- so $consumer is known.
local config = require("moongate.config")

local headers = dofile(config.policies_dir .. "/lib/headers.lua")
local apply = headers.apply

return {
  name = "request-headers",
  priority = 1000,
  version = "1.0.0",
  schema = headers.edits_schema("request"),
  init = headers.compile_edits,
  access = function(edits, ctx)
    apply(edits, ctx.req, ctx)
  end,
}
