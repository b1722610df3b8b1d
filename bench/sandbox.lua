-- Sandboxed policies (make bench-sandbox): what a sandboxed phase call
-- costs next to the same policy run as a trusted file policy, and how long
-- a policy that never returns holds the worker before the instruction
-- budget stops it (JIT on). Run from the repository root after
-- `make build`:
--
--   luajit bench/sandbox.lua [--calls N] [--budget N]
--
-- Printed: us/call of an access phase that writes ctx.vars (trusted, then
-- sandboxed: pooled coroutine, two debug.sethook calls, the ctx view,
-- interpreted code), and ms to stop `while true do end` and a numeric for
-- loop at the budget (the median of 5).
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local jit = require("jit")
local sandbox = require("moongate.sandbox")

local clock = os.clock
local format = string.format

local opts = lib.args(arg, { calls = 200000, budget = 10000000 },
                      "usage: luajit bench/sandbox.lua [--calls N] [--budget N]")
local CALLS, BUDGET = opts.calls, opts.budget
sandbox.configure({ max_instructions = BUDGET })
assert(jit.status(), "the JIT must be on")

local SRC = "return { access = function(conf, ctx) ctx.vars.seen = conf.value end }"
local trusted = assert(load(SRC))()
local sandboxed = assert(sandbox.load("bench", SRC))

local function per_call(mod)
  local conf = { value = "x" }
  local rounds = {}
  for r = 1, 5 do
    local t0 = clock()
    for _ = 1, CALLS do
      mod.access(conf, { vars = {} })
    end
    rounds[r] = (clock() - t0) / CALLS * 1e6
  end
  return lib.median(rounds)
end

local t_us = per_call(trusted)
local s_us = per_call(sandboxed)
print(format("access phase, trusted:   %6.2f us/call", t_us))
print(format("access phase, sandboxed: %6.2f us/call (+%.2f us)", s_us, s_us - t_us))

for _, loop in ipairs({ "while true do end", "local x = 0 for i = 1, 1e12 do x = x + i end" }) do
  local mod = assert(sandbox.load("spin", "return { access = function() " .. loop .. " end }"))
  local rounds = {}
  for r = 1, 5 do
    local t0 = clock()
    local ok = pcall(mod.access, {}, { vars = {} })
    assert(not ok)
    rounds[r] = (clock() - t0) * 1000
  end
  print(format("stopped at %d instructions in %6.1f ms: %s", BUDGET, lib.median(rounds), loop))
end
