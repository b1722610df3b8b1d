-- moongate.gc_hold: the collector held back during one big build, bounded,
-- and back to its usual pace after.
local gc_hold = require("moongate.gc_hold")

-- n KB of garbage, a table of 1 KB at a time (the last one kept, so the
-- loop is not optimized away)
local last
local function garbage(kb)
  for _ = 1, kb do
    local t = {}
    for i = 1, 120 do
      t[i] = i
    end
    last = t
  end
  return last
end

describe("gc_hold", function()
  local pause
  before_each(function()
    collectgarbage()
    pause = collectgarbage("setpause", 200)
    collectgarbage("setpause", pause)
  end)

  it("lets the heap grow by the headroom without a cycle, then collects again", function()
    local base = collectgarbage("count")
    local token = gc_hold.hold(64)
    garbage(32 * 1024)
    -- nothing collected: the 32 MB made are still counted
    assert.is_true(collectgarbage("count") - base > 30 * 1024)
    gc_hold.release(token)
    assert.equals(pause, collectgarbage("setpause", pause)) -- the pause as it was
    garbage(64 * 1024) -- cycles run again: the heap stays far below what was made
    assert.is_true(collectgarbage("count") - base < 48 * 1024)
  end)

  it("is bounded: past the headroom a cycle runs, and the usual pace is back", function()
    local base = collectgarbage("count")
    local token = gc_hold.hold(8)
    garbage(96 * 1024)
    local grown = collectgarbage("count") - base
    -- the first cycle put the usual pause back, before release
    assert.equals(pause, collectgarbage("setpause", pause))
    gc_hold.release(token)
    assert.is_true(grown < 48 * 1024, ("grew %.0f KB"):format(grown))
    assert.equals(pause, collectgarbage("setpause", pause))
  end)

  it("does nothing inside a hold (one release ends it)", function()
    local token = gc_hold.hold(16)
    assert.is_nil(gc_hold.hold(16))
    gc_hold.release(nil)
    gc_hold.release(token)
    assert.equals(pause, collectgarbage("setpause", pause))
    local again = gc_hold.hold(16) -- released: a new hold works
    assert.is_not_nil(again)
    gc_hold.release(again)
  end)
end)
