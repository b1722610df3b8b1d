-- Shared-memory primitives microbenchmark (make bench-prims): the cost of
-- one call from Lua, through the FFI, of mg.limit and mg.breaker, with
-- PASS/FAIL against the target (a take < 100 ns). Run from the repository
-- root with plain luajit after `make build` (moongate.ffi loads
-- build/libmoongate.so; the zones are created in this process, as in the
-- C tests: the same code the workers share through fork):
--
--   luajit bench/prims.lua [--calls N] [--rounds N] [--jv FILE]
--
-- Rows: each algorithm on one hot key, and cycling through 10,000 distinct
-- keys (their entries are spread over the 16 MiB zone, mostly out of the
-- CPU caches); take_all with 3 levels; a breaker acquire + report pair.
-- Each row is the median of --rounds (5) rounds of --calls (1,000,000)
-- calls. One process, so no lock is ever contended: this is the cost a
-- request pays, not a measure of contention between workers.
--
-- Time: in a worker the primitives read the loop's time (updated once per
-- loop turn), not the clock. Plain luajit has no loop, so the rows fix the
-- time (moongate.shm.set_clock, the same no-read path); the last row reads
-- CLOCK_MONOTONIC on every call, for comparison (50-150 ns on some VMs).
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local mg = require("moongate")
local shm = require("moongate.shm")
local ffi = require("ffi")

local clock = os.clock
local format = string.format

local opts = lib.args(arg, { calls = 1000000, rounds = 5, jv = lib.STRING },
                      "usage: luajit bench/prims.lua [--calls N] [--rounds N] [--jv FILE]")
local CALLS, ROUNDS, JV = opts.calls, opts.rounds, opts.jv
if JV then
  require("jit.v").start(JV)
end

local TARGET_NS = 100
local NKEYS = 10000
local keys = {}
for i = 1, NKEYS do
  keys[i] = "consumer:" .. i
end

-- Limits high enough that every take is admitted (the common case, and the
-- path that writes): what is measured is a take, not a refusal.
local limiters = {
  token_bucket = mg.limit.new{ algorithm = "token_bucket", rate = 1e9, burst = 1e12 },
  fixed_window = mg.limit.new{ algorithm = "fixed_window", limit = 1e12, window_ms = 60000 },
  sliding_window = mg.limit.new{ algorithm = "sliding_window", limit = 1e12, window_ms = 60000 },
}

local function measure(fn)
  local samples = {}
  fn(math.floor(CALLS / 10) + 1) -- warm up: compile the loop
  for r = 1, ROUNDS do
    local t0 = clock()
    fn(CALLS)
    samples[r] = (clock() - t0) * 1e9 / CALLS
  end
  return lib.median(samples)
end

local rows = {}
local function row(name, ns, target)
  rows[#rows + 1] = { name, ns, target }
  io.write(format("%-36s %8.1f ns%s\n", name, ns,
                  target and (ns < target and "   PASS" or "   FAIL") or ""))
  io.flush()
end

print(format("mg.limit / mg.breaker from Lua: median of %d rounds of %d calls", ROUNDS, CALLS))
do -- the time a worker would have: the real clock's, read once
  local ts = ffi.new("struct { long s, ns; }")
  ffi.cdef("int clock_gettime(int, void *);")
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  shm.set_clock(tonumber(ts.s) * 1000000 + math.floor(tonumber(ts.ns) / 1000))
end
for _, name in ipairs({ "token_bucket", "fixed_window", "sliding_window" }) do
  local lim = limiters[name]
  row(name .. " take, one key", measure(function(n)
    for _ = 1, n do
      if not lim:take("hot") then
        error("refused")
      end
    end
  end), TARGET_NS)
  -- informational: the entries of 10k keys are out of the CPU caches and
  -- TLB, so this row measures memory misses more than the take
  row(name .. " take, 10k keys", measure(function(n)
    local k = 1
    for _ = 1, n do
      if not lim:take(keys[k]) then
        error("refused")
      end
      k = k + 1
      if k > NKEYS then
        k = 1
      end
    end
  end))
end

local levels = { limiters.fixed_window, limiters.token_bucket, limiters.sliding_window }
local level_keys = { "tenant:acme", "consumer:alice", "route:demo" }
row("take_all, 3 levels", measure(function(n)
  local take_all = mg.limit.take_all
  for _ = 1, n do
    if not take_all(levels, level_keys) then
      error("refused")
    end
  end
end))

local brk = mg.breaker.new{ min_requests = 1000000000 }
row("breaker acquire + report", measure(function(n)
  for _ = 1, n do
    local ok, probe = brk:acquire("10.0.0.1:8080")
    brk:report("10.0.0.1:8080", ok, 3, probe)
  end
end))

shm.set_clock(nil)
row("token_bucket take, one key, clock read", measure(function(n)
  local lim = limiters.token_bucket
  for _ = 1, n do
    if not lim:take("hot") then
      error("refused")
    end
  end
end))

local used, capacity, evictions = mg.limit.stats()
print(format("limits zone: %d of %d entries used, %d evictions", used, capacity, evictions))
local failed = 0
for _, r in ipairs(rows) do
  if r[3] and r[2] >= r[3] then
    failed = failed + 1
  end
end
print(failed == 0 and "PASS: a take on a hot key < 100 ns"
      or format("FAIL: %d row(s) >= 100 ns", failed))
