-- Helpers shared by the policy specs (spec/03-policies/*): validating a
-- policy's conf the way routes.json is validated, and a trap upstream that
-- tells whether the gateway ever connected to it.
local socket = require("socket")
local config = require("moongate.config")

local _M = {}

-- The conf as the gateway would use it (defaults filled), or nil, errors
-- (one "path: message" per line).
function _M.validate(policy, conf)
  local routes, errs = config.validate_routes({ routes = { {
    id = "r", paths = { "/r" }, policies = { { name = policy, conf = conf } },
  } } }, {})
  if not routes then
    return nil, table.concat(errs, "\n")
  end
  return routes.routes[1].policies[1].conf
end

-- A TCP listener that never answers: trap.connected() tells whether the
-- gateway opened a connection to it.
function _M.trap()
  local server = assert(socket.bind("127.0.0.1", 0))
  local _, port = server:getsockname()
  server:settimeout(0)
  local t = { port = tonumber(port) }
  function t.connected()
    local c = server:accept()
    if c then
      c:close()
      return true
    end
    return false
  end
  function t.close()
    server:close()
  end
  return t
end

return _M
