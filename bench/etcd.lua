-- The etcd config source's speed (issue 5; make bench-etcd): a real etcd
-- (spec/helpers/etcd.lua) holding --routes routes (default 10,000) under
-- /moongate, and a gateway with --workers workers (default 2) reading it.
--
--   (a) start: from `moongate start` to the last route served (every
--       worker has the version: /status/ready, then GET /r<N>/x answers
--       200). Target: < 1 s at 10,000 routes.
--   (b) one change at a time (--changes, default 20; a route's conf edited,
--       a route added, one deleted, in turn) written to etcd: the time each
--       worker took to apply it, from the line MOONGATE_RELOAD_TIMING=1
--       makes it log ("reloaded configuration version N in X ms"), and the
--       hand-off from etcd's acknowledgement to every worker on the new
--       version (/metrics gateway_config_version). Target: median apply <
--       5 ms per worker.
--
-- Run from the repository root after `make build`:
--
--   luajit bench/etcd.lua [--routes 10000] [--workers 2] [--changes 20] [--keep-tmp]
--
-- The routes are written through etcd's JSON gateway (POST /v3/kv/put on
-- one keep-alive connection), not by the gateway. Loopback only; the temp
-- dirs go at the end unless --keep-tmp.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local etcd_helper = require("helpers.etcd")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local gettime = socket.gettime
local format = string.format

local opts = lib.args(arg, { routes = 10000, workers = 2, changes = 20, keep_tmp = false },
                      "usage: luajit bench/etcd.lua [--routes N] [--workers N] [--changes N] "
                      .. "[--keep-tmp]")

local PREFIX = "/moongate"
-- etcd's JSON gateway takes keys and values in base64
local b64 = require("moongate.etcd_kv").b64
local percentile, timing_lines, verdict = lib.percentile, lib.timing_lines, lib.verdict

-- polls every 2 ms: the times measured are a few ms
local function eventually(fn, timeout)
  return proc.eventually(fn, timeout, 0.002)
end

local function route(i, tag)
  return cjson.encode({ id = "r" .. i, paths = { "/r" .. i .. "/*" }, methods = { "GET" },
                        upstream = "u" .. (i % 10),
                        policies = { { name = "response-headers",
                                       conf = { set = { ["X-Tag"] = tag or ("r" .. i) } } } } })
end

-- PUTs through etcd's JSON gateway on one keep-alive connection
local function writer(e)
  local c = assert(client.connect(e.client_port))
  local w = {}
  function w.put(key, value)
    local body = cjson.encode({ key = b64(key), value = b64(value) })
    assert(c:request({ method = "POST", path = "/v3/kv/put", body = body,
                       headers = { ["Content-Type"] = "application/json" } }))
    local res = assert(c:read_response({}))
    assert(res.status == 200, res.body)
    return tonumber(cjson.decode(res.body).header.revision)
  end
  function w.delete(key)
    assert(c:request({ method = "POST", path = "/v3/kv/deleterange",
                       body = cjson.encode({ key = b64(key) }),
                       headers = { ["Content-Type"] = "application/json" } }))
    local res = assert(c:read_response({}))
    assert(res.status == 200, res.body)
    return tonumber(cjson.decode(res.body).header.revision)
  end
  -- many puts in one transaction (etcd allows 128 operations per txn)
  function w.put_many(kvs)
    local ops = {}
    for i, kv in ipairs(kvs) do
      ops[i] = { request_put = { key = b64(kv[1]), value = b64(kv[2]) } }
    end
    assert(c:request({ method = "POST", path = "/v3/kv/txn", body = cjson.encode({ success = ops }),
                       headers = { ["Content-Type"] = "application/json" } }))
    local res = assert(c:read_response({}))
    assert(res.status == 200, res.body)
  end
  function w.close()
    c:close()
  end
  return w
end

local function main()
  local nproc_rc, ncpu = proc.run({ "nproc" })
  io.write(format("machine: %s CPU(s), load average %s\n",
                  nproc_rc == 0 and ncpu:match("%d+") or "?",
                  (proc.read_file("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)") or "?"))
  local e = etcd_helper.start()
  local mock = gateway.mock()
  local w = writer(e)
  local t0 = gettime()
  for i = 0, 9 do
    w.put(PREFIX .. "/upstreams/u" .. i, cjson.encode(gateway.upstream("u" .. i, mock)))
  end
  local batch = {}
  for i = 1, opts.routes do
    batch[#batch + 1] = { PREFIX .. "/routes/r" .. i, route(i) }
    if #batch == 100 or i == opts.routes then
      w.put_many(batch)
      batch = {}
    end
  end
  io.write(format("etcd: %d routes and 10 upstreams written in %.1f s (txns of 100 puts)\n",
                  opts.routes, gettime() - t0))

  -- (a) start
  local last = "/r" .. opts.routes .. "/x"
  t0 = gettime()
  local gw = gateway.start({
    workers = opts.workers, timeout = 60,
    node = { config_source = { type = "etcd", path = gateway.DELETE, endpoints = { e.url },
                               prefix = PREFIX },
             log = { level = "info", access = "off" } },
    env = { MOONGATE_RELOAD_TIMING = "1" },
  })
  assert(eventually(function()
    local res = client.get(gw.port, last)
    return res and res.status == 200
  end, 60), "the last route is not served:\n" .. gw:log_tail())
  local start_s = gettime() - t0
  io.write(format("(a) start to the last route served (%d routes, %d workers): %.3f s  "
                  .. "target < 1 s  %s\n", opts.routes, opts.workers, start_s,
                  verdict(start_s < 1)))
  local ctl_line = gw:log():match("config version %d+ %(etcd read[^\n]*")
  io.write("    control: ", tostring(ctl_line), "\n")
  -- each worker's first build (MOONGATE_RELOAD_TIMING=1)
  for wid, line in gw:log():gmatch("#w(%d+): (reloaded configuration version %d+ in [^\n]*)") do
    if not line:find("reused: [1-9]") then
      io.write("    worker ", wid, ": ", line, "\n")
    end
  end

  -- (b) one change at a time
  local applies, handoffs = {}, {}
  local added = opts.routes
  for k = 1, opts.changes do
    local from = #gw:log() + 1
    local rev
    if k % 3 == 1 then
      rev = w.put(PREFIX .. "/routes/r" .. (k * 7), route(k * 7, "changed" .. k))
    elseif k % 3 == 2 then
      added = added + 1
      rev = w.put(PREFIX .. "/routes/r" .. added, route(added))
    else
      rev = w.delete(PREFIX .. "/routes/r" .. (k * 7 + 1))
    end
    local t_ack = gettime()
    assert(eventually(function()
      local v = gw:config_versions()
      for i = 0, opts.workers - 1 do
        if v[i] ~= rev then
          return false
        end
      end
      return true
    end, 10), "change " .. k .. " (revision " .. rev .. ") not applied:\n" .. gw:log_tail())
    handoffs[#handoffs + 1] = (gettime() - t_ack) * 1000
    local lines = eventually(function()
      local l = timing_lines(gw:log(), from)
      return #l >= opts.workers and l
    end, 5) or {}
    for _, l in ipairs(lines) do
      if l.version == rev then
        applies[#applies + 1] = l.ms
      end
    end
  end
  local med = percentile(applies, 0.5)
  io.write(format("(b) one change applied per worker (%d changes x %d workers): median %.2f ms, "
                  .. "p95 %.2f ms  target median < 5 ms  %s\n", opts.changes, opts.workers, med,
                  percentile(applies, 0.95), verdict(med < 5)))
  io.write(format("    etcd acknowledgement -> every worker on the new version (/metrics): "
                  .. "p50 %.1f ms, p95 %.1f ms\n", percentile(handoffs, 0.5),
                  percentile(handoffs, 0.95)))
  w.close()
  client.close_all()
  gw:stop()
  mock.stop()
  e:stop()
  if not opts.keep_tmp then
    gateway.stop_all()
    proc.cleanup(e.dir)
  end
end

local ok, err = pcall(main)
if not ok then
  io.stderr:write("bench/etcd.lua: ", tostring(err), "\n")
  gateway.stop_all()
  os.exit(1)
end
io.write(lib.all_passed() and "all PASS\n" or "some FAIL\n")
os.exit(lib.all_passed() and 0 or 1)
