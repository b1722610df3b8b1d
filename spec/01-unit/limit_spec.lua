-- mg.limit and mg.breaker from Lua, on the real library: plain luajit has
-- no master, so the built-in zones are created in this process on first use
-- (the same C code the gateway's workers share through fork). Each test
-- uses keys of its own: the zones live as long as the busted process.
local mg = require("moongate")
local socket = require("socket")

local uniq = 0
local function key(name)
  uniq = uniq + 1
  return ("%s-%d-%d"):format(name, uniq, math.floor(socket.gettime() * 1e6))
end

describe("mg.limit", function()
  it("token bucket: burst, then refused with a retry time; a refusal takes nothing", function()
    local lim = mg.limit.new{ algorithm = "token_bucket", rate = 1, burst = 3 }
    local k = key("tb")
    for i = 1, 3 do
      local ok, remaining = lim:take(k)
      assert.is_true(ok)
      assert.equal(3 - i, remaining)
    end
    local ok, remaining, reset, retry_after = lim:take(k)
    assert.is_false(ok)
    assert.equal(0, remaining)
    assert.is_true(retry_after > 0.9 and retry_after <= 1, tostring(retry_after))
    assert.is_true(reset > 2.9 and reset <= 3, tostring(reset))
    -- n > 1 and n > burst
    local k2 = key("tb2")
    assert.is_true((lim:take(k2, 2)))
    assert.is_false((lim:take(k2, 2)))
    assert.is_true((lim:take(k2, 1)))
    local _, _, _, never = lim:take(key("tb3"), 4)
    assert.equal(-1, never)
  end)

  it("burst defaults to the rate (at least 1)", function()
    assert.equal(50, mg.limit.new{ rate = 50 }.limit)
    assert.equal(1, mg.limit.new{ rate = 0.5 }.limit)
  end)

  it("fixed and sliding windows count per window", function()
    for _, algorithm in ipairs({ "fixed_window", "sliding_window" }) do
      local lim = mg.limit.new{ algorithm = algorithm, limit = 2, window_ms = 60000 }
      local k = key(algorithm)
      assert.is_true((lim:take(k)))
      assert.is_true((lim:take(k)))
      local ok, remaining, reset, retry_after = lim:take(k)
      assert.is_false(ok, algorithm)
      assert.equal(0, remaining)
      assert.is_true(reset > 0 and reset <= 60, algorithm .. " reset " .. reset)
      assert.is_true(retry_after > 0 and retry_after <= 120, algorithm .. " retry " .. retry_after)
      assert.is_true((lim:take(key(algorithm), 0))) -- a peek at a fresh key
    end
  end)

  it("take_all: a refusal at one level consumes nothing at the others", function()
    local tenant = mg.limit.new{ algorithm = "fixed_window", limit = 100, window_ms = 60000 }
    local consumer = mg.limit.new{ algorithm = "fixed_window", limit = 10, window_ms = 60000 }
    local route = mg.limit.new{ algorithm = "token_bucket", rate = 0.001, burst = 2 }
    local levels = { tenant, consumer, route }
    local keys = { key("tenant"), key("consumer"), key("route") }
    assert.is_true(mg.limit.take_all(levels, keys))
    assert.is_true(mg.limit.take_all(levels, keys))
    local ok, refused = mg.limit.take_all(levels, keys)
    assert.is_false(ok)
    assert.equal(3, refused)
    local allowed, limit, remaining, _, retry = mg.limit.level(3)
    assert.is_false(allowed)
    assert.equal(2, limit)
    assert.equal(0, remaining)
    assert.is_true(retry > 0)
    local _, _, tenant_left = mg.limit.level(1)
    assert.equal(98, tenant_left) -- what it has: the refused take is not counted
    local peek_ok, left = tenant:take(keys[1], 0)
    assert.is_true(peek_ok)
    assert.equal(98, left)
    left = select(2, consumer:take(keys[2], 0))
    assert.equal(8, left)
    assert.equal(8, mg.limit.results[1].remaining)
  end)

  it("raises on a caller's mistake, naming it", function()
    assert.has_error(function() mg.limit.new{ algorithm = "leaky" } end,
      "mg.limit.new: algorithm must be token_bucket, fixed_window or sliding_window")
    assert.has_error(function() mg.limit.new{ rate = 0 } end,
      "mg.limit.new: rate must be a positive number")
    assert.has_error(function() mg.limit.new{ algorithm = "fixed_window", limit = 1 } end,
      "mg.limit.new: window_ms must be a positive number")
    assert.has_error(function() mg.limit.new{ rate = 1, zone = "nope" } end,
      'mg.limit.new: no shm zone "nope" (declare it in the node config\'s shm)')
    local lim = mg.limit.new{ rate = 1 }
    assert.has_error(function() lim:take(42) end, "limiter:take: key must be a string")
    assert.has_error(function() lim:take("k", -1) end, "limiter:take: n must be a number >= 0")
    assert.has_error(function() mg.limit.take_all({}, {}) end,
      "mg.limit.take_all: 1 to 8 limiters and as many keys")
    -- concurrency belongs to a request
    assert.has_error(function() mg.limit.concurrency("k", 1) end)
  end)

  it("runs on a clock set by the caller (outside a worker): windows turn at their edges",
    function()
      local shm = require("moongate.shm")
      local lim = mg.limit.new{ algorithm = "fixed_window", limit = 1, window_ms = 1000 }
      local k = key("clock")
      finally(function() shm.set_clock(nil) end)
      shm.set_clock(5000 * 1000000 + 999999) -- the last microsecond of a window
      assert.is_true((lim:take(k)))
      local ok, _, reset, retry_after = lim:take(k)
      assert.is_false(ok)
      assert.is_true(math.abs(reset - 0.000001) < 1e-9 and retry_after == reset)
      shm.set_clock(5001 * 1000000)
      assert.is_true((lim:take(k)))
      assert.has_error(function() shm.set_clock(-1) end,
        "mg.shm.set_clock: not in a worker, and now_us >= 0")
    end)

  it("keys longer than 64 bytes stay distinct", function()
    local lim = mg.limit.new{ algorithm = "fixed_window", limit = 1, window_ms = 60000 }
    local base = key("long") .. ("x"):rep(100)
    assert.is_true((lim:take(base .. "a")))
    assert.is_true((lim:take(base .. "b")))
    assert.is_false((lim:take(base .. "a")))
  end)

  it("reports zone stats", function()
    local used, capacity, evictions = mg.limit.stats()
    assert.is_true(used > 0 and capacity > 100000 and evictions >= 0)
  end)
end)

describe("mg.breaker", function()
  it("opens on failures, fails fast, then probes and closes", function()
    local brk = mg.breaker.new{ window_ms = 10000, min_requests = 4, failure_rate = 0.5,
                                open_ms = 100, probes = 1, close_after = 2 }
    local k = key("target")
    assert.equal("closed", brk:state(k))
    for i = 1, 4 do
      assert.is_true((brk:acquire(k)))
      assert.is_true(brk:report(k, i % 2 == 0, 5))
    end
    assert.equal("open", brk:state(k))
    local ok, probe, retry_after, state = brk:acquire(k)
    assert.is_false(ok)
    assert.is_false(probe)
    assert.is_true(retry_after > 0 and retry_after <= 0.1)
    assert.equal("open", state)
    socket.sleep(0.12)
    assert.equal("half_open", brk:state(k))
    ok, probe = brk:acquire(k)
    assert.is_true(ok and probe)
    assert.is_false((brk:acquire(k))) -- one probe at a time
    brk:report(k, true, 5, probe)
    ok, probe = brk:acquire(k)
    assert.is_true(ok and probe)
    brk:report(k, true, 5, probe)
    assert.equal("closed", brk:state(k))
  end)

  it("validates its options", function()
    assert.has_error(function() mg.breaker.new{ failure_rate = 2 } end,
      "mg.breaker.new: failure_rate must be a number in (0, 1]")
    assert.has_error(function() mg.breaker.new{ failure_rate = 0 / 0 } end,
      "mg.breaker.new: failure_rate must be a number in (0, 1]")
    assert.has_error(function() mg.breaker.new{ slow_rate = 0 / 0 } end,
      "mg.breaker.new: slow_rate must be a number in [0, 1]")
    assert.has_error(function() mg.breaker.new{ probes = 0 } end,
      "mg.breaker.new: probes must be an integer >= 1")
    assert.has_error(function() mg.breaker.new{ zone = "limits" } end,
      'mg.breaker.new: zone "limits" holds entries too small for breakers'
      .. ' (use "breakers" or a zone of your own)')
  end)
end)
