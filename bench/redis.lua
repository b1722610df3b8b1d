-- mg.redis round trip (issue 4, item 4): what one Redis command costs a
-- request through the gateway, against the same command sent directly.
--
--   (a) sequential: one keep-alive client connection, N requests to a route
--       whose access phase runs INCR (spec/fixtures/policies-redis/it-redis.lua)
--       and N to the same policy answering without Redis; the difference is
--       what the Redis round trip adds. Then N INCRs from a plain client on
--       one connection (luasocket): the round trip without the gateway.
--   (b) wrk -c50 on both routes (when wrk is installed): requests/s, p99.
--
-- Run from the repository root after `make build` (make bench-redis):
--
--   luajit bench/redis.lua [--requests 5000] [--seconds 5] [--workers 1]
--
-- Loopback only; a real redis-server on a free port, stopped at the end.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local redis = require("helpers.redis")

local format = string.format
local gettime = socket.gettime

local opts = lib.args(arg, { requests = 5000, seconds = 5, workers = 1 },
                      "usage: luajit bench/redis.lua [--requests N] [--seconds S] [--workers W]")

local worker_pid

-- µs per request (median, mean, worker CPU) over n keep-alive requests to path
local function through_gateway(port, path, n)
  local c = assert(client.connect(port))
  local times = {}
  local t_all = gettime()
  local cpu0 = worker_pid and lib.cpu_seconds(worker_pid) or 0
  for i = 1, n do
    local t0 = gettime()
    assert(c:request({ method = "GET", path = path }))
    local res = assert(c:read_response({ timeout = 5 }))
    assert(res.status == 200, path .. ": " .. res.status .. " " .. res.body)
    times[i] = (gettime() - t0) * 1e6
  end
  local mean = (gettime() - t_all) * 1e6 / n
  local cpu = worker_pid and (lib.cpu_seconds(worker_pid) - cpu0) * 1e6 / n or 0
  c:close()
  return lib.median(times), mean, cpu
end

local function direct(port, n)
  local sock = socket.tcp()
  assert(sock:connect("127.0.0.1", port))
  sock:setoption("tcp-nodelay", true)
  local cmd = "*2\r\n$4\r\nINCR\r\n$6\r\ndirect\r\n"
  local times = {}
  local t_all = gettime()
  for i = 1, n do
    local t0 = gettime()
    assert(sock:send(cmd))
    local line = assert(sock:receive("*l"))
    assert(line:sub(1, 1) == ":", line)
    times[i] = (gettime() - t0) * 1e6
  end
  local mean = (gettime() - t_all) * 1e6 / n
  sock:close()
  return lib.median(times), mean
end

local function wrk(port, path)
  local rc, out = proc.run({ "wrk", "-t1", "-c50", "-d" .. opts.seconds .. "s", "--latency",
                             "http://127.0.0.1:" .. port .. path }, { stderr = true })
  if rc ~= 0 then
    return nil
  end
  local rps = tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
  local p99, unit = out:match("99%%%s+([%d%.]+)(%a+)")
  p99 = tonumber(p99)
  if p99 and unit == "us" then
    p99 = p99 / 1000
  elseif p99 and unit == "s" then
    p99 = p99 * 1000
  end
  local errors = out:match("Non%-2xx or 3xx responses: (%d+)")
  return rps, p99, tonumber(errors) or 0
end

local srv = redis.start()
local ok, err = pcall(function()
  local p = function(conf)
    return { { name = "it-redis", conf = conf } }
  end
  local gw = gateway.start({
    workers = opts.workers,
    node = { lua_path = { gateway.root .. "/spec/fixtures/policies-redis" },
             redis = { host = "127.0.0.1", port = srv.port, timeout_ms = 1000 } },
    routes = {
      upstreams = gateway.array(), consumers = gateway.array(),
      global_policies = gateway.array(),
      routes = {
        { id = "incr", paths = { "/incr" }, policies = p({ op = "incr", key = "bench" }) },
        { id = "noop", paths = { "/noop" }, policies = p({ op = "noop" }) },
      },
    },
  })
  worker_pid = opts.workers == 1 and gw:workers()[1] or nil
  -- warm up (connect, JIT)
  through_gateway(gw.port, "/incr", 500)
  through_gateway(gw.port, "/noop", 500)
  direct(srv.port, 500)

  local n = opts.requests
  local loadavg = (proc.read_file("/proc/loadavg") or "?"):match("^(%S+)")
  print(format("sequential, %d requests each (one keep-alive connection), %d worker(s), load %s",
               n, opts.workers, loadavg))
  local rows = {}
  for round = 1, 3 do -- interleaved rounds: the machine's load moves
    rows[round] = {
      incr = { through_gateway(gw.port, "/incr", n) },
      noop = { through_gateway(gw.port, "/noop", n) },
      direct = { direct(srv.port, n) },
    }
  end
  local function col(name, k)
    local t = {}
    for r = 1, #rows do
      t[r] = rows[r][name][k]
    end
    return lib.median(t)
  end
  print(format("  %-46s %9s %9s %14s", "", "median", "mean", "worker CPU/req"))
  print(format("  %-46s %7.1f µs %7.1f µs %11.1f µs", "gateway, route running INCR (mg.redis)",
               col("incr", 1), col("incr", 2), col("incr", 3)))
  print(format("  %-46s %7.1f µs %7.1f µs %11.1f µs", "gateway, same policy without Redis",
               col("noop", 1), col("noop", 2), col("noop", 3)))
  print(format("  %-46s %7.1f µs %7.1f µs %11.1f µs", "  => one INCR adds",
               col("incr", 1) - col("noop", 1), col("incr", 2) - col("noop", 2),
               col("incr", 3) - col("noop", 3)))
  print(format("  %-46s %7.1f µs %7.1f µs", "INCR sent directly (luasocket, one connection)",
               col("direct", 1), col("direct", 2)))

  local rps_i, p99_i, err_i = wrk(gw.port, "/incr")
  local rps_n, p99_n, err_n = wrk(gw.port, "/noop")
  if rps_i and rps_n then
    print(format("wrk -t1 -c50 -d%ds:", opts.seconds))
    print(format("  /incr %9.0f req/s  p99 %6.2f ms  non-2xx %d", rps_i, p99_i or -1, err_i))
    print(format("  /noop %9.0f req/s  p99 %6.2f ms  non-2xx %d", rps_n, p99_n or -1, err_n))
  else
    print("wrk not run (not installed?)")
  end
end)
gateway.stop_all()
redis.stop_all()
proc.cleanup()
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
