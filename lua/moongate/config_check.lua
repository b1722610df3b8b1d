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

local config = require("moongate.config")
local config_version = require("moongate.config_version")

local pcall = pcall

local _M = {}

local builder -- made on the first check
local last_stats

function _M.check(node_path, node_text, routes_text)
  builder = builder or config_version.new({ check = true })
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

return _M
