-- Which request the running coroutine serves. The policy kit's yielding
-- calls (mg.sleep, ctx.req:body()) need the C request handle without the
-- policy passing it around. Coroutines are pooled by C: the entry points
-- set the mapping at the start of every phase.

local coroutine_running = coroutine.running

local _M = {}

local current = setmetatable({}, { __mode = "k" })

-- co: the running coroutine when the caller has it (C passes it to the
-- entry points: coroutine.running is not compiled by LuaJIT, it would
-- stitch the request's trace)
function _M.set(r, co)
  current[co or coroutine_running()] = r
end

-- co serves the request of the running coroutine too (moongate.sandbox
-- runs a sandboxed policy in a coroutine of its own)
function _M.inherit(co)
  local running = coroutine_running()
  current[co] = running and current[running] or nil
end

function _M.get()
  local r = current[coroutine_running()]
  if not r then
    error("not in a request (the policy kit's yielding calls need one)", 3)
  end
  return r
end

return _M
