-- Cooperative slicing of long work on a worker (a reload's rebuild): the
-- work runs in a coroutine that C resumes once per event-loop turn, and the
-- loops of that work call slice.check(), which yields once the slice has
-- used its budget. Requests are served between slices (on the config in
-- force: a new version is swapped in only when its build is complete).
--
-- Outside such a coroutine (worker start, specs, benches) check() does
-- nothing. It must not be called where a yield cannot cross (inside a
-- table.sort comparator, a gsub callback, a metamethod called from C).

local binding = require("moongate.ffi")

local C = binding.C
local co_running = coroutine.running
local co_yield = coroutine.yield

local _M = {}

local active -- the coroutine being sliced
local started = 0
local budget = 0.001 -- seconds per slice

function _M.begin(ms)
  active = co_running()
  budget = (ms or 1) / 1000
  started = C.mg_time_now()
end

function _M.finish()
  active = nil
end

function _M.check()
  if active ~= nil and co_running() == active and C.mg_time_now() - started >= budget then
    co_yield()
    started = C.mg_time_now()
  end
end

return _M
