-- MOONGATE_LOOP_STALL_MS=N (README "Reload"): each worker logs every
-- event-loop turn busy N ms or more, with the CPU of that turn; a value
-- that is not a number of ms > 0 is named in the log and ignored; unset, no
-- such line. N = 0.001 ms: any turn that serves a request is longer.
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local BUSY = "loop turn busy %d+%.%d%d ms %(cpu %d+%.%d%d ms%)"

-- a request answered (404: no routes), then the gateway's log once stopped
local function log_after_a_request(env)
  local gw = gateway.start({ env = env })
  local res = assert(client.get(gw.port, "/nothing"))
  assert.equal(404, res.status)
  assert.is_true(gw:stop())
  return gw:log()
end

describe("MOONGATE_LOOP_STALL_MS", function()
  after_each(function()
    gateway.stop_all()
  end)

  it("logs each loop turn busy N ms or more, with its CPU", function()
    local log = log_after_a_request({ MOONGATE_LOOP_STALL_MS = "0.001" })
    assert.matches("#w0: " .. BUSY, log)
  end)

  it("is off when unset", function()
    local log = log_after_a_request(nil)
    assert.is_nil(log:find("loop turn busy", 1, true), log)
  end)

  it("names a value that is not a number of ms > 0 and ignores it", function()
    for _, bad in ipairs({ "0", "-5", "abc", "5ms" }) do
      local log = log_after_a_request({ MOONGATE_LOOP_STALL_MS = bad })
      assert.equal(1, proc.count(log, "MOONGATE_LOOP_STALL_MS=" .. bad
        .. " ignored: not a number of ms > 0"), log)
      assert.is_nil(log:find("loop turn busy", 1, true), log)
    end
  end)
end)
