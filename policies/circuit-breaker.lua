-- circuit-breaker: stops sending requests to an upstream target that keeps
-- failing, node-wide (state in the "breakers" shm zone, shared by every
-- worker), per upstream target.
--
--   {"name": "circuit-breaker", "conf": {"window_ms": 10000, "min_requests": 20,
--     "failure_rate": 0.5, "open_ms": 30000, "probes": 10, "close_after": 5}}
--
-- The breaker acts in the proxy, after access, on the target the balancer
-- picks (runtime/src/proxy_breaker.c): closed, calls pass and their
-- outcomes fill a rolling window; once it holds min_requests calls and the
-- failure rate (a status of failure_statuses, a timeout, a connect error,
-- a reset) or the slow-call rate (slow_ms, slow_rate) reaches its
-- threshold, it opens: the target is skipped for open_ms (max_open_ms: each
-- reopen doubles it up to that), and when no target of the upstream admits
-- the client gets 503 {"error": "upstream circuit open", ...} with
-- Retry-After, the backend untouched. Then half-open: at most `probes`
-- concurrent requests go through; close_after consecutive successes close
-- it, any failed (or slow) probe reopens it. This policy only compiles the
-- conf (init) and attaches it to the request (access).
--
-- Priority 600: after the shipped policies, so a request they refuse or
-- answer never counts (it never reaches the proxy anyway).
local mg = require("moongate")

local MAX_U32 = 4294967295

local function int(min, default)
  return { type = "integer", minimum = min, maximum = MAX_U32, default = default }
end

local schema = {
  type = "object",
  additionalProperties = false,
  properties = {
    window_ms = int(10, 10000),
    min_requests = int(1, 20),
    failure_rate = { type = "number", exclusiveMinimum = 0, maximum = 1, default = 0.5 },
    slow_ms = int(1),
    slow_rate = { type = "number", exclusiveMinimum = 0, maximum = 1 },
    failure_statuses = {
      type = "array", uniqueItems = true, maxItems = 500,
      items = { type = "integer", minimum = 100, maximum = 599 },
      default = { 500, 502, 503, 504 },
    },
    open_ms = int(1, 30000),
    max_open_ms = int(1),
    probes = int(1, 10),
    close_after = int(1, 5),
  },
  check = function(conf)
    if (conf.slow_ms == nil) ~= (conf.slow_rate == nil) then
      return false, "slow_ms and slow_rate go together (a call is slow past slow_ms; "
                    .. "slow_rate of them opens the breaker)"
    end
    if conf.max_open_ms and conf.max_open_ms < conf.open_ms then
      return false, "max_open_ms must be >= open_ms"
    end
    return true
  end,
}

return {
  name = "circuit-breaker",
  priority = 600,
  version = "1.0.0",
  schema = schema,
  init = function(conf)
    return {
      breaker = mg.breaker.upstream{
        window_ms = conf.window_ms, min_requests = conf.min_requests,
        failure_rate = conf.failure_rate, slow_ms = conf.slow_ms or 0,
        slow_rate = conf.slow_rate or 0, open_ms = conf.open_ms,
        max_open_ms = conf.max_open_ms or 0, probes = conf.probes,
        close_after = conf.close_after, failure_statuses = conf.failure_statuses,
      },
    }
  end,
  access = function(conf)
    conf.breaker:attach()
  end,
}
