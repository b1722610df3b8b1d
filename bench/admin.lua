-- The Admin API handler's costs at 5,000 routes (make bench-admin): what
-- the control process spends per request, HTTP aside. Writes go to a real
-- etcd (started here on free loopback ports) through its JSON gateway;
-- luasocket stands in for mg.http.request (blocking), so a PUT's time
-- includes etcd's fsync. Run from the repository root after `make build`:
--
--   luajit bench/admin.lua [--routes N] [--puts N]
--
-- Printed: ms to index a new version (the first read after it), ms for a
-- page of 1,000 routes and for one route by id (indexed), and the median
-- and p90 ms of a route PUT (validation, txn with the upstream compare,
-- etcd's answer) and of a DELETE.
package.path = "./lua/?.lua;./lua/?/init.lua;./spec/?.lua;" .. package.path

local lib = require("bench.lib")
local admin = require("moongate.admin")
local json_split = require("moongate.json_split")
local etcd = require("helpers.etcd")
local http = require("socket.http")
local ltn12 = require("ltn12")
local socket = require("socket")

local now = socket.gettime
local format = string.format

local opts = lib.args(arg, { routes = 5000, puts = 200 },
                      "usage: luajit bench/admin.lua [--routes N] [--puts N]")
local ROUTES, PUTS = opts.routes, opts.puts

local function request(t)
  local out = {}
  local ok, code = http.request({
    url = t.url, method = t.method,
    headers = { ["content-type"] = "application/json", ["content-length"] = #t.body },
    source = ltn12.source.string(t.body), sink = ltn12.sink.table(out),
  })
  if not ok then
    return nil, tostring(code)
  end
  return { status = code, body = table.concat(out) }
end

local function routes_text(n)
  local r = {}
  for i = 1, n do
    r[i] = format('{"id": "r%d", "paths": ["/svc%d/*"], "methods": ["GET", "POST"], '
                  .. '"upstream": "u1", "policies": [{"name": "cors", "conf": {"origins": ["*"]}}]}',
                  i, i)
  end
  return '{"upstreams": [{"id": "u1", "targets": [{"host": "127.0.0.1", "port": 9001}]}], '
         .. '"routes": [' .. table.concat(r, ",") .. '], "consumers": [], "global_policies": []}'
end

local e = etcd.start()
local ok, err = pcall(function()
  local split = assert(json_split.split(routes_text(ROUTES), { upstreams = true, routes = true,
                                                                consumers = true }))
  local kv = require("moongate.etcd_kv").new({ endpoints = { e.url }, request = request })
  local rev = assert(kv:put("/bench/upstreams/u1", split.elements.upstreams[1]))
  local doc = { version = 1, revision = rev, skeleton = split.skeleton, elements = split.elements }
  local api = admin.new({ mode = "etcd", view = function() return doc end,
                          etcd = { endpoints = { e.url }, prefix = "/bench" }, request = request })
  local function call(method, path, body)
    local p, q = path:match("^([^?]*)%??(.*)$")
    return api:handle({ method = method, path = p, query = q, header = function() end,
                        body = function() return body end })
  end

  local t0 = now()
  assert(call("GET", "/routes?limit=1") == 200)
  local index_ms = (now() - t0) * 1000
  t0 = now()
  for _ = 1, 20 do
    assert(call("GET", "/routes?limit=1000&offset=2000") == 200)
  end
  local page_ms = (now() - t0) * 1000 / 20
  t0 = now()
  for i = 1, 1000 do
    assert(call("GET", "/routes/r" .. i) == 200)
  end
  local one_us = (now() - t0) * 1e6 / 1000

  local puts, dels = {}, {}
  for i = 1, PUTS do
    local t = now()
    local s = call("PUT", "/routes/new" .. i, format('{"paths": ["/new%d"], "upstream": "u1"}', i))
    assert(s == 201, s)
    puts[i] = (now() - t) * 1000
  end
  for i = 1, PUTS do
    local t = now()
    assert(call("DELETE", "/routes/new" .. i) == 204)
    dels[i] = (now() - t) * 1000
  end
  print(format("admin at %d routes: index a version %.1f ms; a page of 1000 %.2f ms; one by id %.1f us",
               ROUTES, index_ms, page_ms, one_us))
  print(format("PUT route (validate + etcd txn): median %.2f ms, p90 %.2f ms; DELETE: median %.2f ms "
               .. "(%d each)", lib.percentile(puts, 0.5), lib.percentile(puts, 0.9),
               lib.percentile(dels, 0.5),
               PUTS))
end)
e:stop()
if not ok then
  error(err, 0)
end
