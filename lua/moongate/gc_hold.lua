-- Holding the Lua collector back during one big build (a worker's first
-- version, the control process's read of a whole etcd prefix).
--
-- Such a build allocates a few KB a route, most of which stays (the
-- compiled config). With the default pause (200: a new cycle each time
-- the heap doubles) the collector walks the growing heap again and again:
-- at 10,000 routes that was about a third of a worker's first build
-- (~340 ms of CPU down to ~210 ms with the collector held, bench/etcd.lua).
--
--   local token = gc_hold.hold(128)  -- up to 128 MB more before a cycle
--   ... the build ...
--   gc_hold.release(token)           -- the usual pause again; a cycle
--                                    -- starts now, incremental
--
-- Bounded: the next cycle starts once the heap has grown by headroom_mb
-- past what is live at hold(); that cycle puts the usual pause back (a
-- finalizer of an object made at hold() and dropped at once, which only a
-- cycle collects), so a build that outgrows the headroom runs under the
-- usual pace from then on. hold() itself runs a full cycle over the heap
-- as it is, twice (small before a first build: the modules and the frame;
-- a few ms). Not re-entrant: a hold inside a hold is a no-op.

local collectgarbage = collectgarbage
local floor = math.floor
local getmetatable = getmetatable
local newproxy = newproxy

local _M = {}

local held = nil -- the hold in force: {pause = the usual pause, ended = a cycle ran}

-- Returns a token for release(), or nil when a hold is already in force.
function _M.hold(headroom_mb)
  if held then
    return nil
  end
  -- LuaJIT sets the next cycle's threshold when a cycle ends, to the live
  -- estimate times pause / 100: a full cycle to know what is live, then
  -- one with the pause that puts the threshold headroom_mb above it
  collectgarbage()
  local kb = collectgarbage("count")
  local token = { pause = collectgarbage("setpause", floor(100 * (kb + headroom_mb * 1024) / kb)) }
  collectgarbage()
  held = token
  -- the first cycle from now on collects this: the usual pause is back
  -- before that cycle sets the next threshold
  local sentinel = newproxy(true)
  getmetatable(sentinel).__gc = function()
    if held == token and not token.ended then
      token.ended = true
      collectgarbage("setpause", token.pause)
    end
  end
  return token
end

function _M.release(token)
  if token == nil or held ~= token then
    return
  end
  held = nil
  if not token.ended then
    token.ended = true
    collectgarbage("setpause", token.pause)
  end
  collectgarbage("restart") -- threshold = the heap now: a cycle starts
end

return _M
