-- CPU per config change, without load (make bench-churn): the work that
-- bench/reload.lua's p99 run puts on the two CPUs, measured in one
-- process with os.clock (CPU time: what other jobs on the machine do
-- moves it much less than wall time). 5,000 routes, the config and the
-- cycle of changes of bench/reload.lua (route 7's policy conf edited, a
-- route added at the end, that route removed), each version one change
-- away from the last, or with --fold two (what a reload that folded two
-- writes sees: an edit near the top and a change at the end).
--
--   control  the control process's share (control.lua's load_source, then
--            publish): the routes file read, config_check.check (split,
--            check), config_doc.diff and encode, the last-known-good copy
--   worker   a worker's (worker.lua): the frame decoded and applied, the
--            build in a coroutine sliced as in a worker (0.5 ms), commit;
--            each slice's CPU (a slice is what one loop turn runs of it)
--
-- Run from the repository root after `make build`:
--
--   luajit bench/churn.lua [--routes 5000] [--changes 200] [--fold]
--
-- Targets (issue 3 item 7, the parts of it that are CPU): the control
-- under 1 ms per one-route change, no slice of a worker's build over
-- ~1.5 ms.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path

local cjson = require("cjson")
local proc = require("helpers.proc")
local config_check = require("moongate.config_check")
local config_doc = require("moongate.config_doc")
local config_version = require("moongate.config_version")
local slice = require("moongate.slice")

local clock = os.clock
local format = string.format

local lib = require("bench.lib")
local opts = lib.args(arg, { routes = 5000, changes = 200, fold = false },
                      "usage: luajit bench/churn.lua [--routes N] [--changes N] [--fold]")

-- bench/reload.lua's policies and routes
local POLICIES = lib.RELOAD_POLICIES
local route = lib.reload_route

local function routes_text(edited, added)
  local ups = {}
  for i = 0, 9 do
    ups[#ups + 1] = { id = "u" .. i, targets = { { host = "127.0.0.1", port = 9001, weight = 1 } } }
  end
  local routes = {}
  for i = 1, opts.routes do
    routes[i] = route(i)
  end
  routes[7].policies[1].conf.value = edited
  if added then
    routes[#routes + 1] = route(opts.routes + 1)
  end
  return cjson.encode({ upstreams = ups, routes = routes })
end

-- the cycle of texts: step c edits route 7 (c % 3 == 1), adds a route
-- (2) or removes it (0); with --fold each text is two steps on
local texts = {}
do
  local edited, added = "r7", false
  local per = opts.fold and 2 or 1
  for c = 1, 6 * per do
    local kind = c % 3
    if kind == 1 then
      edited = "edited-" .. c
    else
      added = kind == 2
    end
    if c % per == 0 then
      texts[#texts + 1] = routes_text(edited, added)
    end
  end
end

local function percentile(list, p)
  local s = {}
  for i, v in ipairs(list) do
    s[i] = v
  end
  table.sort(s)
  return s[math.max(1, math.ceil(#s * p))] or 0 / 0
end

local dir = proc.tmpdir()
local function main()
  local pdir = dir .. "/policies"
  os.execute("mkdir -p " .. pdir)
  for name, src in pairs(POLICIES) do
    proc.write_file(pdir .. "/" .. name .. ".lua", src)
  end
  local conf_path = dir .. "/moongate.json"
  local routes_path = dir .. "/routes.json"
  local lkg_path = dir .. "/moongate.lkg.json"
  proc.write_file(conf_path, cjson.encode({
    listen = { { address = "127.0.0.1:8080" } }, lua_path = { pdir },
    config_source = { type = "file", path = "routes.json" } }))

  local T = {}
  local function took(name, t0)
    local t1 = clock()
    T[name] = T[name] or {}
    table.insert(T[name], (t1 - t0) * 1000)
    return t1
  end

  -- the control: a change read, checked, diffed, sent and saved
  local current
  local function control_change()
    local t = clock()
    local node_text = proc.read_file(conf_path)
    local routes = proc.read_file(routes_path)
    t = took("control: read both files", t)
    local errs, parts = config_check.check(conf_path, node_text, routes)
    assert(#errs == 0, errs[1])
    t = took("control: check", t)
    local doc = config_doc.from_split(node_text, parts.doc)
    doc.version = (current and current.version or 0) + 1
    local frame = current and config_doc.diff(current, doc) or config_doc.snapshot(doc)
    local text = config_doc.encode(frame)
    t = took("control: diff + encode", t)
    assert(config_doc.lkg_write(lkg_path, doc))
    took("control: last-known-good copy", t)
    current = doc
    return text
  end

  -- a worker: the frame decoded, applied, built in slices, committed
  local builder = config_version.new({ upstream = function(u) return { id = u.id } end })
  local received
  local slices, paths = {}, { delta = 0, full = 0 }
  local function worker_apply(text)
    local t0 = clock()
    local co = coroutine.create(function()
      slice.begin(0.5)
      local doc = assert(config_doc.apply(received, assert(config_doc.decode(text))))
      received = doc
      local v = assert(builder:build(conf_path, doc.node, nil, doc))
      slice.check()
      builder:commit(v)
      slice.finish()
      return v
    end)
    while true do
      local s0 = clock()
      local ok, v = coroutine.resume(co)
      assert(ok, v)
      slices[#slices + 1] = (clock() - s0) * 1000
      if coroutine.status(co) == "dead" then
        local how = v.stats.delta and "delta" or "full"
        paths[how] = paths[how] + 1
        break
      end
    end
    took("worker: decode, apply, build, commit", t0)
  end

  -- the first version (a full build on both sides), then warm-up
  proc.write_file(routes_path, routes_text("r7", false))
  worker_apply(control_change())
  for c = 1, 12 do
    proc.write_file(routes_path, texts[c % #texts + 1])
    worker_apply(control_change())
  end
  T, slices, paths = {}, {}, { delta = 0, full = 0 }

  for c = 1, opts.changes do
    proc.write_file(routes_path, texts[c % #texts + 1])
    worker_apply(control_change())
  end

  io.write(format("%d routes, %d versions, each %s (CPU per version, ms: median, p90, max)\n",
                  opts.routes, opts.changes,
                  opts.fold and "two changes far apart (--fold)" or "one change"))
  local control_total = {}
  local names = {}
  for name in pairs(T) do
    names[#names + 1] = name
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local l = T[name]
    io.write(format("  %-40s %6.3f %6.3f %6.3f\n", name, percentile(l, 0.5), percentile(l, 0.9),
                    percentile(l, 1)))
    if name:match("^control") then
      for i, v in ipairs(l) do
        control_total[i] = (control_total[i] or 0) + v
      end
    end
  end
  local ctl_med = percentile(control_total, 0.5)
  io.write(format("  %-40s %6.3f %6.3f %6.3f\n", "control: total", ctl_med,
                  percentile(control_total, 0.9), percentile(control_total, 1)))
  io.write(format("worker builds: %d by the delta path, %d full; slices: %d, median %.3f, p99 %.3f, "
                  .. "max %.3f ms\n", paths.delta, paths.full, #slices, percentile(slices, 0.5),
                  percentile(slices, 0.99), percentile(slices, 1)))
  local max_slice = percentile(slices, 1)
  io.write(format("control per version < 1 ms: %s; worker slices <= 1.5 ms: %s\n",
                  ctl_med < 1 and "PASS" or "FAIL", max_slice <= 1.5 and "PASS" or "FAIL"))
  return ctl_med < 1 and max_slice <= 1.5
end

local ok, res = pcall(main)
proc.cleanup()
if not ok then
  io.stderr:write("bench/churn.lua: ", tostring(res), "\n")
  os.exit(1)
end
os.exit(res and 0 or 1)
