-- Router microbenchmark (make bench-router): lookup mean, build time and
-- memory of lua/moongate/router.lua at 100 / 1k / 10k / 100k routes, with
-- PASS/FAIL against the targets at 10k (lookup < 2 us, build < 100 ms,
-- memory < 20 MB) and "flat as the count grows" (below). Run from the
-- repository root with plain luajit after `make build` (moongate.ffi loads
-- build/libmoongate.so):
--
--   luajit bench/router.lua [--lookups N] [--sizes 100,1000,...] [--samples N]
--                             [--jv FILE] [--quick]
--
-- The routes are a mix like a large deployment's: 40% exact paths, 30%
-- prefixes, 20% paths with two parameters, 10% on hosts (half exact hosts,
-- half wildcard), a third of them with methods, 2% with a header predicate,
-- 1% with a query predicate, a few priorities. Lookups are random paths of
-- existing routes (each checked against the route it must reach) plus 10%
-- misses, through fake mg_req_view_t cdata built once. Printed per size:
--   lookup ns  mean over the random requests (cycling through SAMPLES of
--              them: the tries of most routes are out of the CPU caches)
--   hot ns     the same lookups cycling through HOT requests only (their
--              tries stay cached: what is left is the work of a lookup)
--   peer ns    the peer (make_peer: one hash lookup of the path, what
--              lua-resty-radixtree does for an exact path) over the same
--              routes, timed in turns with the lookups
--   C instr    instructions per call of the C lookup (callgrind: work();
--              not with --quick, which skips valgrind)
--   build ms, memory MB (collectgarbage("count") after a full GC, plus the
--              arrays the router mapped itself), hits,
--   B/lookup   garbage per lookup (the collector stopped)
--   exits/1k   trace exits to the interpreter per 1000 lookups (each a
--              lookup that ran partly interpreted; watch() and
--              exits_per_lookup())
-- Timings are the median of 5 rounds. --jv FILE writes LuaJIT's -jv log
-- of the timed loop (what compiles, what aborts).
--
-- --child N --count M builds the router of N routes, warms up, then does
-- exactly M lookups over the same requests and exits: for valgrind
-- (work() counts the C lookup's instructions over such a run; the whole
-- process's, with M = 0 and M = 200000, differ by the lookups' but also by
-- ~40M instructions from run to run: the two builds are not the same work).
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local lib = require("bench.lib")
local ffi = require("ffi")
local jit = require("jit")
require("moongate.ffi")
local router = require("moongate.router")

local floor = math.floor
local clock = os.clock
local format = string.format

local SAMPLES = 20000 -- distinct requests per size, cycled through (--samples)
local HOT = 256       -- requests of the hot measure
local MISS_RATIO = 0.1
-- --child N: measure N routes, print one RESULT line (see below);
-- --count M: with --child, only M lookups (see above)
local args = lib.args(arg, { lookups = 400000, sizes = { 100, 1000, 10000, 100000 },
                             samples = SAMPLES, jv = lib.STRING, child = lib.NUMBER,
                             count = lib.NUMBER, quick = false },
                      "usage: luajit bench/router.lua [--lookups N] [--sizes A,B,...] "
                      .. "[--samples N] [--jv FILE] [--quick]")
local SIZES, LOOKUPS, JV_FILE, CHILD, COUNT = args.sizes, args.lookups, args.jv, args.child,
                                              args.count
SAMPLES = args.samples

-- a fixed pseudo-random sequence (same routes and requests every run)
local seed = 12345
local function rand(n)
  seed = (seed * 1103515245 + 12345) % 2147483648
  return floor(seed / 65536) % n + 1
end

local WORDS = { "items", "orders", "users", "catalog", "search", "billing", "accounts",
                "events", "reports", "media" }

-- routes[k] and a function giving a request that must reach it
local function make_routes(n)
  local routes, gens = {}, {}
  for k = 1, n do
    local svc = "svc-" .. k
    local w = WORDS[k % #WORDS + 1]
    local kind = k % 10
    local route = { id = "r" .. k, upstream = "u" }
    local gen
    if kind <= 3 then
      local p = "/api/v" .. (k % 3 + 1) .. "/" .. svc .. "/" .. w
      route.paths = { p }
      gen = function() return p end
    elseif kind <= 6 then
      local p = "/" .. svc .. "/" .. w
      route.paths = { p .. "/*" }
      route.strip_prefix = true
      gen = function() return p .. "/" .. WORDS[rand(#WORDS)] .. "/" .. rand(100000) end
    elseif kind <= 8 then
      local p = "/api/v2/" .. svc .. "/"
      route.paths = { p .. w .. "/:id/lines/:line" }
      gen = function() return p .. w .. "/" .. rand(1e6) .. "/lines/" .. rand(50) end
    else
      local host
      if k % 20 == 9 then
        host = svc .. ".example.com"
        route.hosts = { host }
      else
        route.hosts = { "*." .. svc .. ".example.net" }
        host = "t" .. rand(9) .. "." .. svc .. ".example.net"
      end
      route.paths = { "/v1/*" }
      gen = function() return "/v1/" .. w .. "/" .. rand(1000), host end
    end
    if k % 3 == 0 then
      route.methods = (k % 2 == 0) and { "GET" } or { "GET", "POST" }
    end
    if k % 50 == 1 then
      route.headers = { ["x-canary"] = { "1", "true" } }
    elseif k % 100 == 2 then
      route.query = { v = "2" }
    end
    if k % 97 == 0 then
      route.priority = 10
    end
    routes[k] = route
    gens[k] = gen
  end
  -- what every deployment has
  routes[#routes + 1] = { id = "health", paths = { "/health" }, upstream = "u" }
  routes[#routes + 1] = { id = "static", paths = { "/static/*" }, upstream = "u" }
  return routes, gens
end

-- The fake requests: one array of views, their strings in one buffer, so
-- that the bench's own data costs few cache lines per lookup. The request
-- handle "r" is the request's number: host_of and bench_header look it up.
local req_hosts, req_headers = {}, {}

local function host_of(r)
  return req_hosts[r]
end

local function bench_header(r, name)
  local h = req_headers[r]
  return h and h[name]
end

-- views[s] (s = 1..#list) over list[s] = { path, method, query } in one
-- buffer, and a pointer to each view made once: views + j in the timed loop
-- would be a cdata allocated per lookup (the bench's garbage, not the
-- router's)
local function make_views(list)
  local n, bytes = #list, 0
  for s = 1, n do
    bytes = bytes + #list[s][1] + #list[s][2] + #list[s][3]
  end
  local views = ffi.new("mg_req_view_t[?]", n + 1)
  local buf = ffi.new("char[?]", bytes + 1)
  local off = 0
  local function put(str)
    local p = buf + off
    ffi.copy(p, str, #str)
    off = off + #str
    return p, #str
  end
  local ptrs = {}
  for s = 1, n do
    local v = views[s]
    v.path, v.path_len = put(list[s][1])
    v.method, v.method_len = put(list[s][2])
    v.query, v.query_len = put(list[s][3])
    ptrs[s] = views + s
  end
  return { views = views, buf = buf, ptrs = ptrs, n = n }
end

local function make_requests(routes, gens, n)
  local list, want = {}, {}
  local nroutes = #gens
  for s = 1, n do
    local path
    local method, query, host = "GET", nil, "api.example.org"
    req_headers[s] = nil
    if s % floor(1 / MISS_RATIO) == 0 then
      local miss = rand(3)
      path = miss == 1 and "/api/v4/nosuch-" .. rand(1e6) .. "/items"
             or miss == 2 and "/svc-" .. rand(nroutes) .. "x/items/1"
             or "/api/v2/svc-" .. rand(nroutes) .. "/nothing/1/2"
      want[s] = false
    else
      local k = rand(nroutes)
      local route = routes[k]
      local rhost
      path, rhost = gens[k]()
      host = rhost or host
      if route.methods then
        method = route.methods[rand(#route.methods)]
      end
      if route.headers then
        req_headers[s] = { ["x-canary"] = "1" }
      end
      if route.query then
        query = "a=1&v=2"
      end
      want[s] = route
    end
    req_hosts[s] = host
    list[s] = { path, method, query or "" }
  end
  return make_views(list), want
end

-- The peer: what a Lua router does for a route with one exact path, as
-- lua-resty-radixtree (APISIX's router) does with its hash_path table: a
-- Lua string made of the request's path, looked up in a table of every
-- route's path. One hash lookup whatever the count (the floor of any
-- router: find one of N routes from the request's bytes). Its table holds
-- one path per route (a path each of its requests could have), and its
-- requests reach the same routes as the router's (each request's route's
-- path; a miss stays a miss), so it reads as many distinct routes' data.
local function make_peer(routes, gens, want, reqs)
  local map, path_of = {}, {}
  for k = 1, #gens do
    path_of[routes[k]] = (gens[k]())
    map[path_of[routes[k]]] = routes[k]
  end
  local list = {}
  for s = 1, reqs.n do
    local v = reqs.ptrs[s]
    list[s] = { want[s] and path_of[want[s]] or ffi.string(v.path, v.path_len), "GET", "" }
  end
  return map, make_views(list)
end

local function mb(kb)
  return kb / 1024
end

local function full_gc()
  collectgarbage("collect")
  collectgarbage("collect")
end

-- the timed loop: its own function so that it is the trace being watched
local function lookups(rt, reqs, count)
  local match = router.match
  local ptrs, n = reqs.ptrs, reqs.n
  local hits = 0
  local j = 1
  for _ = 1, count do
    local route = match(rt, ptrs[j], host_of, j)
    if route then
      hits = hits + 1
    end
    j = j + 1
    if j > n then
      j = 1
    end
  end
  return hits
end

-- the peer's timed loop (make_peer): lookups' loop again, not lookups
-- given a function (a loop is one trace, specialised to what it called
-- first: the router's and the peer's would share it)
local function peer_lookups(map, reqs, count)
  local ffi_string = ffi.string
  local ptrs, n = reqs.ptrs, reqs.n
  local hits = 0
  local j = 1
  for _ = 1, count do
    local v = ptrs[j]
    local route = map[ffi_string(v.path, v.path_len)]
    if route then
      hits = hits + 1
    end
    j = j + 1
    if j > n then
      j = 1
    end
  end
  return hits
end

-- Whether the lookups run compiled: watch(fn) runs fn and returns
-- whether a trace starting in lookups (its loop) was completed meanwhile,
-- and how many traces made meanwhile fall back to the interpreter;
-- exits_per_lookup(fn, count) the trace exits to the interpreter per
-- lookup while fn does count lookups (each one a lookup that ran partly
-- interpreted). (This was the profiler's VM states first; it flushes the
-- traces when it starts, and its hook runs only when a trace exits, with
-- the state of the first sample since the last exit for all of them: a
-- few exits made a 0% or a 33% "interpreted" out of the same code.)
local function watch(fn)
  local traceinfo = require("jit.util").traceinfo
  local started, done, fallbacks = {}, false, 0
  local function on_trace(what, tr, func)
    if what == "start" and func == lookups then
      started[tr] = true
    elseif what == "stop" then
      done = done or started[tr] == true
      -- a side trace that only goes back to the interpreter: what follows
      -- that exit runs interpreted every time, and is no trace exit
      -- (texit)
      if traceinfo(tr).linktype == "interpreter" then
        fallbacks = fallbacks + 1
      end
    end
  end
  jit.attach(on_trace, "trace")
  fn()
  jit.attach(on_trace)
  return done, fallbacks
end

local function exits_per_lookup(fn, count)
  local exits = 0
  local function on_exit()
    exits = exits + 1
  end
  jit.attach(on_exit, "texit")
  fn()
  jit.attach(on_exit)
  return exits / count
end

-- ns per lookup: the median of ROUNDS timed rounds (the machine may be
-- shared; a median is robust to a round that another process slowed); with
-- a peer (map, peer_reqs), a round of its lookups after each, and its
-- median third
local ROUNDS = 5
-- the growth of a time taken as flat (see the targets)
local NOISE = 1.25
local function time_lookups(rt, reqs, count, map, peer_reqs)
  local per, peer = {}, {}
  local hits = 0
  local n = floor(count / ROUNDS)
  for k = 1, ROUNDS do
    local t0 = clock()
    hits = lookups(rt, reqs, n)
    per[k] = (clock() - t0) * 1e9 / n
    if map then
      t0 = clock()
      peer_lookups(map, peer_reqs, n)
      peer[k] = (clock() - t0) * 1e9 / n
    end
  end
  return lib.median(per), hits / n, map and lib.median(peer)
end

local function run(size)
  local routes, gens = make_routes(size)
  local opts = { header = bench_header }

  -- build time: from scratch, median of 3
  local times = {}
  for t = 1, 3 do
    full_gc()
    local t0 = clock()
    local rt = router.new(routes, opts)
    times[t] = (clock() - t0) * 1000
    assert(rt.size == #routes)
  end
  local build_ms = lib.median(times)

  -- memory: what the router holds, after a full GC
  full_gc()
  local before = collectgarbage("count")
  local rt = router.new(routes, opts)
  full_gc()
  -- plus what it mapped outside the GC's heap (its largest arrays)
  local mem_mb = mb(collectgarbage("count") - before + rt.mapped_bytes / 1024)

  local reqs, want = make_requests(routes, gens, SAMPLES)

  -- correctness: each request reaches the route it was made for
  local wrong = 0
  for s = 1, reqs.n do
    local v = reqs.ptrs[s]
    local route = router.match(rt, v, host_of, s)
    if (route or false) ~= want[s] then
      wrong = wrong + 1
      if wrong <= 3 then
        io.stderr:write(format("  mismatch: %s -> %s (want %s)\n",
          ffi.string(v.path, v.path_len),
          route and route.id or "none", want[s] and want[s].id or "none"))
      end
    end
  end

  -- the peer (make_peer), in the same process (the router still in it, as
  -- in a worker)
  local map, peer_reqs = make_peer(routes, gens, want, reqs)

  -- warm-up (lets the JIT compile), then the timed rounds with GC on, the
  -- router's and the peer's in turns: a noisy neighbour slows both alike
  local traced, fallbacks = watch(function() lookups(rt, reqs, 100000) end)
  peer_lookups(map, peer_reqs, 100000)
  if JV_FILE then
    require("jit.v").on(JV_FILE .. "." .. size)
  end
  local lookup_ns, hits, peer_ns = time_lookups(rt, reqs, LOOKUPS, map, peer_reqs)
  if JV_FILE then
    require("jit.v").off()
  end
  -- the same requests, cycling through the first HOT of them only: their
  -- tries stay in the CPU caches, what is left is the work of a lookup
  local hot = { ptrs = reqs.ptrs, n = HOT }
  lookups(rt, hot, 50000)
  local hot_ns = time_lookups(rt, hot, LOOKUPS)

  -- how many of the lookups left their traces for the interpreter
  local exits = exits_per_lookup(function() lookups(rt, reqs, LOOKUPS) end, LOOKUPS)

  -- garbage per lookup: the same loop with the collector stopped
  full_gc()
  collectgarbage("stop")
  local g0 = collectgarbage("count")
  lookups(rt, reqs, 100000)
  local garbage = (collectgarbage("count") - g0) * 1024 / 100000
  collectgarbage("restart")

  return {
    size = size, routes = #routes, build_ms = build_ms, mem_mb = mem_mb,
    lookup_ns = lookup_ns, hot_ns = hot_ns, peer_ns = peer_ns, hits = hits, wrong = wrong,
    garbage = garbage, traced = traced and 1 or 0, fallbacks = fallbacks, exits = exits,
  }
end

-- Each size is measured in a process of its own: a fresh VM, as a worker
-- has one router, and the JIT's traces (or a profiler signal aborting one)
-- from a size never carry over to the next.
local FIELDS = { "size", "routes", "lookup_ns", "hot_ns", "peer_ns", "build_ms", "mem_mb", "hits",
                 "wrong", "garbage", "traced", "fallbacks", "exits" }

if CHILD and COUNT then
  local routes, gens = make_routes(CHILD)
  local rt = router.new(routes, { header = bench_header })
  local reqs = make_requests(routes, gens, SAMPLES)
  lookups(rt, reqs, 100000) -- warm-up: the JIT compiles
  full_gc()
  collectgarbage("stop") -- the same work in both runs but the lookups
  local hits = lookups(rt, reqs, COUNT)
  print(format("COUNTED %d lookups, %d hits", COUNT, hits))
  os.exit(0)
end

if CHILD then
  local res = run(CHILD)
  local out = {}
  for k, name in ipairs(FIELDS) do
    out[k] = format("%.6g", res[name])
  end
  print("RESULT " .. table.concat(out, " "))
  os.exit(0)
end

-- The work of the C lookup at size routes: instructions per call of
-- mg_route_find and mg_route_resume (inclusive), counted by callgrind over
-- a --child --count run (its warm-up and its lookups: 2 * WORK_LOOKUPS
-- calls of mg_route_find). Deterministic, where timings on a shared
-- machine are not; nil without valgrind. The rest of a lookup (match's
-- Lua around the call) is the same code whatever the count.
local WORK_LOOKUPS = 100000
local function work(size)
  if os.execute("command -v valgrind >/dev/null 2>&1") ~= 0 then
    return nil
  end
  local out = os.tmpname()
  local cmd = format("valgrind --tool=callgrind --callgrind-out-file=%s "
    .. "--toggle-collect=mg_route_find --toggle-collect=mg_route_resume %s %s --child %d "
    .. "--count %d --samples %d >/dev/null 2>&1", out, arg[-1] or "luajit", arg[0], size,
    WORK_LOOKUPS, SAMPLES)
  local ok = os.execute(cmd)
  local f = io.open(out, "r")
  local text = f and f:read("*a") or ""
  if f then
    f:close()
  end
  os.remove(out)
  local ir = tonumber(text:match("\nsummary: (%d+)") or text:match("\ntotals: (%d+)"))
  if ok ~= 0 or not ir then
    error("callgrind run for " .. size .. " routes failed: " .. cmd)
  end
  return ir / (2 * WORK_LOOKUPS)
end

local function measure(size)
  local cmd = format("%s %s --child %d --lookups %d --samples %d%s", arg[-1] or "luajit", arg[0],
                     size, LOOKUPS, SAMPLES, JV_FILE and (" --jv " .. JV_FILE) or "")
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("*a")
  p:close()
  local line = out:match("RESULT ([^\n]*)")
  if not line then
    io.stderr:write(out)
    error("bench child for " .. size .. " routes failed: " .. cmd)
  end
  local res, k = {}, 0
  for x in line:gmatch("%S+") do
    k = k + 1
    res[FIELDS[k]] = tonumber(x)
  end
  return res
end

print(format("router bench: %s, %d lookups per size in %d rounds (median), over %d distinct"
  .. " requests (%d%% misses); hot: the first %d of them", jit.version, LOOKUPS, ROUNDS, SAMPLES,
  MISS_RATIO * 100, HOT))
print(format("%8s %10s %8s %8s %8s %9s %10s %7s %8s %9s", "routes", "lookup ns", "hot ns",
  "peer ns", "C instr", "build ms", "memory MB", "hits", "B/lookup", "exits/1k"))
local results = {}
for _, size in ipairs(SIZES) do
  local res = measure(size)
  res.instr = not args.quick and work(size) or nil
  results[#results + 1] = res
  print(format("%8d %10.0f %8.0f %8.0f %8s %9.1f %10.2f %6.0f%% %8.1f %9.2f%s%s",
    res.size, res.lookup_ns, res.hot_ns, res.peer_ns,
    res.instr and format("%.0f", res.instr) or "-", res.build_ms, res.mem_mb, res.hits * 100,
    res.garbage, res.exits * 1000, (res.traced == 1 and "" or "  (LOOP NOT COMPILED)")
    .. (res.fallbacks == 0 and "" or format("  (%d traces fall back)", res.fallbacks)),
    res.wrong > 0 and format("  (%d WRONG MATCHES)", res.wrong) or ""))
end

-- targets
local at10k
local fastest, slowest = math.huge, 0
local hot_fastest, hot_slowest = math.huge, 0
local peer_fastest, peer_slowest = math.huge, 0
local instr_least, instr_most = math.huge, 0
local wrong, exits, untraced, fallbacks = 0, 0, 0, 0
for _, res in ipairs(results) do
  if res.size == 10000 then
    at10k = res
  end
  fastest = math.min(fastest, res.lookup_ns)
  slowest = math.max(slowest, res.lookup_ns)
  hot_fastest = math.min(hot_fastest, res.hot_ns)
  hot_slowest = math.max(hot_slowest, res.hot_ns)
  peer_fastest = math.min(peer_fastest, res.peer_ns)
  peer_slowest = math.max(peer_slowest, res.peer_ns)
  if res.instr then
    instr_least = math.min(instr_least, res.instr)
    instr_most = math.max(instr_most, res.instr)
  end
  wrong = wrong + res.wrong
  exits = math.max(exits, res.exits)
  untraced = untraced + (1 - res.traced)
  fallbacks = fallbacks + res.fallbacks
end

local failed = 0
local function target(ok, what)
  print((ok and "PASS " or "FAIL ") .. what)
  if not ok then
    failed = failed + 1
  end
end

if at10k then
  target(at10k.lookup_ns < 2000, format("lookup mean at 10k routes < 2 us: %.0f ns", at10k.lookup_ns))
  target(at10k.build_ms < 100, format("build at 10k routes < 100 ms: %.1f ms", at10k.build_ms))
  target(at10k.mem_mb < 20, format("memory at 10k routes < 20 MB: %.2f MB", at10k.mem_mb))
else
  print("(10k not measured: --sizes without 10000)")
end
if #results > 1 then
  -- Flat as the count grows. The work of a lookup must not grow: the C
  -- lookup's instructions (callgrind, exact) at the largest count within
  -- 1.25x of the smallest's. Its time grows anyway: among 100k routes a
  -- random request reads a record and an entry from memory where among
  -- 100 they are in the CPU caches, ~100 ns a read on this kind of
  -- machine (and more when neighbours share its L3). That costs any
  -- structure, the peer's single hash lookup too, so the time's measure is
  -- the peer's: the router's cold time grows no more than the peer's from
  -- the fewest routes to the most (timed in turns in each process), and
  -- stays under the 10k target's 2 us at every count (a ratio alone would
  -- pass a router slow everywhere). Growth under NOISE is flat whatever
  -- the peer's: one size's runs differ by that much on a shared machine
  -- (100 routes: 171-262 ns in six runs), so between sizes where neither
  -- grows (100 and 1,000) the ratio of the two ratios would be a coin. The hot figures (the same data
  -- cached) are printed, not judged: they move with what the neighbours
  -- leave of the caches.
  if instr_most > 0 then
    target(instr_most < 1.25 * instr_least, format("work per lookup flat as routes grow (C "
      .. "lookup instructions, callgrind; most < 1.25x least): %.0f..%.0f, x%.2f", instr_least,
      instr_most, instr_most / instr_least))
  else
    print("(work per lookup not measured: --quick, or valgrind not found)")
  end
  target(slowest / fastest <= math.max(peer_slowest / peer_fastest, NOISE) and slowest < 2000,
    format("lookup time flat as routes grow (grows no more than the peer's single hash lookup "
    .. "or x%.2f, < 2 us at every count): %.0f..%.0f ns, x%.2f; peer %.0f..%.0f ns, x%.2f",
    NOISE, fastest, slowest, slowest / fastest, peer_fastest, peer_slowest,
    peer_slowest / peer_fastest))
  print(format("     hot lookups (not judged): %.0f..%.0f ns, x%.2f", hot_fastest, hot_slowest,
    hot_slowest / hot_fastest))
end
target(wrong == 0, "every request reached the route it was made for")
-- (traces falling back to the interpreter are printed, not judged: one
-- in about one process in ten at 100 routes, in match or a predicate
-- check, the lookups no slower; how often one runs, LuaJIT does not say)
target(untraced == 0 and exits < 0.01, format("lookups run compiled (their loop traced at every "
  .. "count, < 1%% of lookups leaving it for the interpreter): %d not traced, at most %.3f%% "
  .. "left; %d traces fall back", untraced, exits * 100, fallbacks))
os.exit(failed == 0 and 0 or 1, true)
