-- Change speed (issue 3, item 7; make bench-reload): a gateway with 5,000
-- routes (each with one or two small policies) in front of the mock backend.
--
--   (a) one-route changes, one at a time (a policy conf edited, a route
--       added, one removed, in turn): the time each worker's reload took,
--       from the line MOONGATE_RELOAD_TIMING=1 makes it log ("reloaded
--       configuration version N in X ms (changed routes: ...)").
--       Target: median < 50 ms per worker.
--   (b) wrk against one route, steady, then while routes.json is rewritten
--       and the master SIGHUPed 20 times a second (--cli: `moongate reload`
--       instead of the SIGHUP, which validates the whole config first;
--       --direct: SIGHUP to the control process itself): p99 of
--       each run and their ratio.
--       Target: p99 during changes < 2x the steady p99.
--       Between them, the same writer at the same rate writing the text in
--       force (the control reads and checks it, finds nothing changed):
--       the p99 that wrk, the writer and the control's read cost on these
--       CPUs without any change reaching the worker.
--       --stall-ms N: the workers log each loop turn busy >= N ms
--       (MOONGATE_LOOP_STALL_MS); each run then also prints how many there
--       were and the CPU they used (a turn much longer than its CPU is the
--       worker waiting for a core).
--
-- Run from the repository root after `make build`:
--
--   luajit bench/reload.lua [--routes 5000] [--changes 20] [--handoffs 50]
--                           [--rate 20] [--seconds 5] [--workers 1]
--                           [--connections 8] [--cli | --direct] [--keep-tmp]
--                           [--stall-ms N]
--
-- (c) between them: the hand-off, from a file change + reload to every
-- worker serving the new version (p50/p95 over --handoffs changes).
--
-- It needs wrk. Everything runs on loopback; the temp dir (configs, policies,
-- logs) is removed at the end unless --keep-tmp. Also prints what the
-- control process (which validates each change) and the master spent per
-- change.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local cjson = require("cjson")
local socket = require("socket")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local client = require("helpers.client")

local gettime = socket.gettime
local format = string.format

local opts = lib.args(arg, { routes = 5000, changes = 20, handoffs = 50, rate = 20, seconds = 5,
                             workers = 1, connections = 8, cli = false, direct = false,
                             keep_tmp = false, stall_ms = 0 },
                      "usage: luajit bench/reload.lua [--routes N] [--changes N] [--handoffs N] "
                      .. "[--rate N] [--seconds N] [--workers N] [--connections N] "
                      .. "[--cli | --direct] [--keep-tmp] [--stall-ms N]")

if proc.run({ "sh", "-c", "command -v wrk" }) ~= 0 then
  io.stderr:write("bench/reload.lua: wrk is not installed (make deps)\n")
  os.exit(2)
end

-- ---- the config ------------------------------------------------------------

local POLICIES = lib.RELOAD_POLICIES
local route = lib.reload_route

local function routes_doc(mock, edit)
  local ups = {}
  for i = 0, 9 do
    ups[#ups + 1] = gateway.upstream("u" .. i, mock)
  end
  local routes = {}
  for i = 1, opts.routes do
    routes[i] = route(i)
  end
  if edit then
    edit(routes)
  end
  return cjson.encode({ upstreams = ups, routes = routes })
end

-- ---- measuring -------------------------------------------------------------

-- wrk's --latency distribution: a time like "1.23ms" / "850.00us" / "1.02s"
local function ms_of(v, unit)
  v = tonumber(v)
  if unit == "us" then
    return v / 1000
  elseif unit == "s" then
    return v * 1000
  end
  return v
end

local function parse_wrk(out)
  local res = {}
  local v, u = out:match("\n%s+99%%%s+([%d.]+)(%a+)")
  res.p99 = v and ms_of(v, u)
  v, u = out:match("\n%s+50%%%s+([%d.]+)(%a+)")
  res.p50 = v and ms_of(v, u)
  res.rps = tonumber(out:match("Requests/sec:%s+([%d.]+)"))
  res.errors = out:match("Non%-2xx or 3xx responses: (%d+)") or "0"
  local sock = out:match("Socket errors: ([^\n]+)")
  res.socket_errors = sock
  return res
end

local function wrk_cmd(url, seconds)
  return format("wrk -t1 -c%d -d%ds --latency %s 2>&1", opts.connections, seconds, url)
end

local eventually = proc.eventually
local percentile, timing_lines, verdict = lib.percentile, lib.timing_lines, lib.verdict
local cpu_seconds = lib.cpu_seconds

-- the busy loop turns the log holds from byte `from` on (--stall-ms):
-- "N turns >= X ms (cpu p50 A, max B ms; busy max C ms)"
local function stalls(log, from)
  local busy, cpu = {}, {}
  for b, c in log:sub(from):gmatch("loop turn busy ([%d.]+) ms %(cpu ([%d.]+) ms%)") do
    busy[#busy + 1], cpu[#cpu + 1] = tonumber(b), tonumber(c)
  end
  if #busy == 0 then
    return format("no turn >= %g ms", opts.stall_ms)
  end
  return format("%d turns >= %g ms (cpu p50 %.2f, max %.2f ms; busy max %.2f ms)", #busy,
                opts.stall_ms, percentile(cpu, 0.5), percentile(cpu, 1), percentile(busy, 1))
end

-- ---- the run ------------------------------------------------------------------

local results = {}

local function main()
  local dir = proc.tmpdir()
  local pdir = dir .. "/policies"
  os.execute("mkdir -p " .. pdir)
  for name, src in pairs(POLICIES) do
    proc.write_file(pdir .. "/" .. name .. ".lua", src)
  end

  -- other processes skew every figure here: say how busy the machine was
  local nproc_rc, ncpu = proc.run({ "nproc" })
  io.write(format("machine: %s CPU(s), load average %s", nproc_rc == 0 and ncpu:match("%d+") or "?",
                  (proc.read_file("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)") or "?"), "\n")
  local mock = gateway.mock()
  local base = routes_doc(mock)
  io.write(format("routes.json: %d routes, %d upstreams, %.0f KiB\n", opts.routes, 10, #base / 1024))
  local t0 = gettime()
  local gw = gateway.start{
    routes = base, workers = opts.workers, timeout = 60,
    node = { lua_path = { pdir }, log = { level = "info", access = "off" } },
    env = { MOONGATE_RELOAD_TIMING = "1",
            MOONGATE_LOOP_STALL_MS = opts.stall_ms > 0 and tostring(opts.stall_ms) or nil },
  }
  assert(eventually(function()
    local _, n = gw:log():gsub("worker %d+ started", "")
    return n >= opts.workers
  end, 60), "workers did not start:\n" .. gw:log_tail())
  io.write(format("gateway up in %.2f s (%d worker(s), full compile at start)\n",
                  gettime() - t0, opts.workers))
  local res = assert(client.get(gw.port, "/r42/x"))
  assert(res.status == 200 and res.headers["x-bench-tag"] == "r42", "route r42 does not answer")

  local version = 1 -- every worker's: 1 at start, +1 a reload
  local function apply(text)
    gw:write_routes(text)
    if opts.cli then
      local rc, out = gw:reload()
      assert(rc == 0, out)
    elseif opts.direct then
      proc.kill(assert(gw:control(), "no control process"), "HUP")
    else
      proc.kill(gw.pid, "HUP")
    end
  end

  -- (a) one-route changes, one at a time, in turn: r7's policy conf
  -- edited, a route added, that route removed
  local edited, added = "r7", false
  local function next_text(c)
    local kind = c % 3
    if kind == 1 then
      edited = "edited-" .. c
    elseif kind == 2 then
      added = true
    else
      added = false
    end
    return routes_doc(mock, function(routes)
      routes[7].policies[1].conf.value = edited
      if added then
        routes[#routes + 1] = route(opts.routes + 1)
      end
    end)
  end
  local per_change, routers, rest = {}, {}, {}
  local updated = 0
  for c = 1, opts.changes do
    local text = next_text(c)
    local from = #gw:log() + 1
    apply(text)
    version = version + 1
    local lines = eventually(function()
      local l = timing_lines(gw:log(), from)
      return #l >= opts.workers and l
    end, 30)
    assert(lines, "change " .. c .. " not applied:\n" .. gw:log_tail())
    for _, l in ipairs(lines) do
      assert(l.version == version, "a worker is at version " .. l.version .. ", not " .. version)
      per_change[#per_change + 1] = l.ms
      routers[#routers + 1] = l.router_ms
      rest[#rest + 1] = l.ms - l.router_ms
      if l.router == "updated" then
        updated = updated + 1
      end
      assert(l.changed <= 1, "change " .. c .. " recompiled " .. l.changed .. " routes")
    end
  end
  local med = percentile(per_change, 0.5)
  results.a = format("(a) one-route change, per worker (%d reloads): median %.1f ms, p90 %.1f ms, "
                     .. "max %.1f ms (router median %.1f ms, updated in place %d of %d; the rest "
                     .. "median %.1f ms)  target < 50 ms: %s",
                     #per_change, med, percentile(per_change, 0.9), percentile(per_change, 1),
                     percentile(routers, 0.5), updated, #routers, percentile(rest, 0.5),
                     verdict(med < 50))
  io.write(results.a, "\n")

  -- (c) hand-off: from routes.json written and the reload sent (as in
  -- apply) to every worker having the new version in force, as the control
  -- process's /metrics shows it (polled every 2 ms): the master's forward,
  -- the control process's read, check, diff and write of the last-known-
  -- good copy, the frame, each worker's build. One route added, one
  -- removed, each time; the changes 150 ms apart (a SIGHUP within 100 ms
  -- of the last reload waits for those 100 ms to pass: that fold is not
  -- what is measured here).
  local handoff = {}
  for c = 1, opts.handoffs do
    socket.sleep(0.15)
    local text = routes_doc(mock, function(routes)
      routes[#routes + 1] = { id = "h" .. c, paths = { "/h" .. c .. "/*" }, upstream = "u1" }
    end)
    local t_start = gettime()
    apply(text)
    version = version + 1
    assert(eventually(function()
      local m = gw:config_versions()
      for w = 0, opts.workers - 1 do
        if m[w] ~= version then
          return false
        end
      end
      return true
    end, 30), "hand-off " .. c .. " not applied:\n" .. gw:log_tail())
    handoff[#handoff + 1] = (gettime() - t_start) * 1000
    local r = assert(client.get(gw.port, "/h" .. c .. "/x"))
    assert(r.status == 200, "route h" .. c .. " does not answer")
  end
  results.c = format("(c) hand-off, file written + %s to every worker serving it (%d changes, "
                     .. "%d worker(s)): p50 %.1f ms, p95 %.1f ms, max %.1f ms",
                     opts.cli and "moongate reload" or opts.direct and "SIGHUP to the control"
                       or "SIGHUP to the master", #handoff, opts.workers,
                     percentile(handoff, 0.5), percentile(handoff, 0.95), percentile(handoff, 1))
  io.write(results.c, "\n")

  -- (b) p99 steady, with the writer writing no change, then during changes
  local url = "http://127.0.0.1:" .. gw.port .. "/r42/x"
  proc.run(wrk_cmd(url, 1)) -- warm-up
  local ctl_pid = assert(gw:control(), "no control process")

  -- wrk for opts.seconds while texts (nil: none) are written and applied
  -- opts.rate times a second, in turn. Returns wrk's figures, plus sent,
  -- elapsed, the CPU of master and control, the log from the start.
  local function run_wrk(texts)
    local master_cpu0, ctl_cpu0 = cpu_seconds(gw.pid), cpu_seconds(ctl_pid)
    local from = #gw:log() + 1
    local wrk = assert(io.popen(wrk_cmd(url, opts.seconds), "r"))
    local start = gettime()
    local sent, period = 0, 1 / opts.rate
    while texts and gettime() - start < opts.seconds - period do
      sent = sent + 1
      apply(texts[sent % #texts + 1])
      local next_at = start + sent * period
      local wait = next_at - gettime()
      if wait > 0 then
        socket.sleep(wait)
      end
    end
    local elapsed = gettime() - start
    local out = wrk:read("*a")
    wrk:close()
    local r = parse_wrk(out)
    assert(r.p99, "no p99 from wrk:\n" .. out)
    r.sent, r.elapsed, r.from = sent, elapsed, from
    r.master_cpu = cpu_seconds(gw.pid) - master_cpu0
    r.ctl_cpu = cpu_seconds(ctl_pid) - ctl_cpu0
    return r
  end

  local steady = run_wrk(nil)
  local steady_stalls = opts.stall_ms > 0 and stalls(gw:log(), steady.from)

  -- the writer alone: the text in force, written and applied at the same
  -- rate (the control reads and checks it; nothing reaches the workers)
  local same = next_text(opts.changes + 1)
  local before = #gw:log() + 1
  apply(same)
  version = version + 1
  assert(eventually(function()
    return #timing_lines(gw:log(), before) >= opts.workers
  end, 30), "the writer's text was not applied:\n" .. gw:log_tail())
  local idle = run_wrk({ same })
  local idle_stalls = opts.stall_ms > 0 and stalls(gw:log(), idle.from)

  -- a cycle of texts each one route away from the one before
  local texts = {}
  for c = 1, 6 do
    texts[c] = next_text(opts.changes + 1 + c)
  end
  local during = run_wrk(texts)
  socket.sleep(1)
  local during_stalls = opts.stall_ms > 0 and stalls(gw:log(), during.from)
  local applied = timing_lines(gw:log(), during.from)
  local apply_ms = {}
  for i, l in ipairs(applied) do
    apply_ms[i] = l.ms
  end
  local ratio = during.p99 / steady.p99
  results.b = format("(b) wrk -t1 -c%d %ds on /r42/x: steady p99 %.2f ms (p50 %.2f, %.0f req/s); "
                     .. "during %d changes/s p99 %.2f ms (p50 %.2f, %.0f req/s, non-2xx %s%s); "
                     .. "ratio %.2f  target < 2: %s",
                     opts.connections, opts.seconds, steady.p99, steady.p50, steady.rps,
                     opts.rate, during.p99, during.p50, during.rps, during.errors,
                     during.socket_errors and ", socket errors " .. during.socket_errors or "",
                     ratio, verdict(ratio < 2 and during.errors == "0"))
  results.b1 = format("    the writer alone (%d writes of the text in force, %d/s): p99 %.2f ms "
                      .. "(p50 %.2f, %.0f req/s; %.2f x steady; during changes / this %.2f); "
                      .. "control CPU per write %.1f ms",
                      idle.sent, opts.rate, idle.p99, idle.p50, idle.rps, idle.p99 / steady.p99,
                      during.p99 / idle.p99, idle.ctl_cpu * 1000 / math.max(idle.sent, 1))
  results.b2 = format("    %d changes sent in %.1f s (%s); worker reloads applied: %d (median %.1f ms, "
                      .. "max %.1f ms); CPU per change sent: control process %.1f ms, "
                      .. "master %.1f ms",
                      during.sent, during.elapsed, opts.cli and "moongate reload"
                        or opts.direct and "SIGHUP to the control process" or "SIGHUP to the master",
                      #applied, percentile(apply_ms, 0.5), percentile(apply_ms, 1),
                      during.ctl_cpu * 1000 / during.sent, during.master_cpu * 1000 / during.sent)
  io.write(results.b, "\n", results.b1, "\n", results.b2, "\n")
  if opts.stall_ms > 0 then
    io.write(format("    busy loop turns: steady %s; writer alone %s; during changes %s\n",
                    steady_stalls, idle_stalls, during_stalls))
  end

  gateway.stop_all()
  if not opts.keep_tmp then
    proc.cleanup()
  else
    io.write("kept ", dir, "\n")
  end
end

local ok, err = pcall(main)
if not ok then
  io.stderr:write("bench/reload.lua: ", tostring(err), "\n")
  gateway.stop_all()
  if not opts.keep_tmp then
    proc.cleanup()
  end
  os.exit(1)
end
io.write(lib.all_passed() and "PASS\n" or "FAIL\n")
os.exit(lib.all_passed() and 0 or 1)
