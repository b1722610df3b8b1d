-- The etcd config source end to end (issue 5): a real etcd (Debian's
-- etcd-server, spec/helpers/etcd.lua) and real gateways with 2 workers.
-- Writes go through etcdctl, a separate client, never the gateway's own.
--
-- Every worker is seen through routes whose answer names the worker: a
-- sandboxed policy (<prefix>/policies/whoami, itself from etcd) answers
-- {worker = mg.worker_id(), route = ctx.route.id, tag = conf.tag}. With
-- SO_REUSEPORT a client cannot pick a worker, so each check opens new
-- connections until both workers answered (bounded in count and time).
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local etcd_helper = require("helpers.etcd")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local gettime = socket.gettime

local PREFIX = "/moongate"
local NWORKERS = 2

local WHOAMI = [[
local mg = require("moongate")
return {
  name = "whoami",
  priority = 1000,
  version = "1",
  schema = { type = "object", additionalProperties = false,
             properties = { tag = { type = "string" } } },
  access = function(conf, ctx)
    return 200, { worker = mg.worker_id(), route = ctx.route.id, tag = conf.tag or "" }
  end,
}
]]

-- polls every 10 ms: the propagation spec measures through it
local function eventually(fn, timeout)
  return proc.eventually(fn, timeout, 0.01)
end

local function key(kind, id)
  return PREFIX .. "/" .. kind .. "/" .. id
end

local function route_json(id, extra)
  local r = { id = id, paths = { "/" .. id .. "/*" }, upstream = "m",
              policies = { { name = "whoami", conf = { tag = id } } } }
  for k, v in pairs(extra or {}) do
    r[k] = v
  end
  return cjson.encode(r)
end

-- what one new connection got for GET path: status, decoded body or nil
local function get(gw, path)
  local res = client.get(gw.port, path, nil, { timeout = 2 })
  if not res then
    return nil
  end
  local ok, body = pcall(cjson.decode, res.body)
  return res.status, ok and body or nil
end

-- true once every worker answered GET path with want(status, body); up
-- to `timeout` s, new connections each time. An answer that names no
-- worker (a 404) counts once four come in a row (the caller checks
-- /metrics too: every worker applied the version)
local function all_workers(gw, path, want, timeout)
  local seen, n, anon = {}, 0, 0
  return eventually(function()
    local status, body = get(gw, path)
    if status and want(status, body) then
      local w = body and body.worker
      if w == nil then
        anon = anon + 1
        return anon >= 4
      end
      if not seen[w] then
        seen[w], n = true, n + 1
      end
      return n >= NWORKERS
    end
    seen, n, anon = {}, 0, 0
    return false
  end, timeout or 5)
end

local function served(gw, id, tag)
  return all_workers(gw, "/" .. id .. "/x", function(status, body)
    return status == 200 and body and body.route == id and (tag == nil or body.tag == tag)
  end)
end

local function not_found(gw, id)
  return all_workers(gw, "/" .. id .. "/x", function(status)
    return status == 404
  end)
end

-- every worker at version, within 5 s
local function all_at(gw, version)
  return eventually(function() return gw:config_all_at(version) end, 5)
end

local count = proc.count
local function etcd_node(endpoints, extra)
  local src = { type = "etcd", path = gateway.DELETE, endpoints = endpoints, prefix = PREFIX }
  for k, v in pairs(extra or {}) do
    src[k] = v
  end
  return { config_source = src }
end

-- the upstream and the whoami policy, then a route
local function seed(e, mock)
  e:put(key("upstreams", "m"), cjson.encode(gateway.upstream("m", mock)))
  e:put(key("policies", "whoami"), WHOAMI)
  return e:put(key("routes", "base"), route_json("base"))
end

describe("etcd config source", function()
  local e, mock

  before_each(function()
    e = etcd_helper.start()
    mock = gateway.mock()
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
    if e then
      e:stop()
    end
  end)

  it("starts from etcd, applies PUT and DELETE on every worker, refuses invalid values by key, "
     .. "numbers versions by revision", function()
    local rev = seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev), gw:log_tail())

    -- a PUT: served by both workers; the version is its revision
    rev = e:put(key("routes", "r1"), route_json("r1"))
    assert.is_truthy(served(gw, "r1"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))

    -- a change of one route
    rev = e:put(key("routes", "r1"), route_json("r1", { policies = {
      { name = "whoami", conf = { tag = "two" } } } }))
    assert.is_truthy(served(gw, "r1", "two"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))

    -- invalid values: logged with the key, the previous value stays, no
    -- new version
    local good = rev
    e:put(key("routes", "r1"), "{not json")
    e:put(key("routes", "r1"), cjson.encode({ id = "r1", paths = { "no-slash" }, upstream = "m" }))
    e:put(key("routes", "r1"), route_json("r1", { upstream = "nope", policies = {
      { name = "whoami", conf = { tag = "three" } } } }))
    e:put(key("routes", "r2"), route_json("r2", { upstream = "nope" }))
    assert.is_truthy(eventually(function()
      return count(gw:log(), "etcd: " .. key("routes", "r2") .. ": refused") == 1
    end, 5), gw:log_tail())
    local log = gw:log()
    assert.matches("etcd: /moongate/routes/r1: refused: routes%.r1: invalid JSON[^\n]*; the "
                   .. "previous value stays", log)
    assert.matches("etcd: /moongate/routes/r1: refused: routes%.r1%.paths%[0%]: must start with "
                   .. "\"/\"[^\n]*the previous value stays", log)
    assert.matches("etcd: /moongate/routes/r1: refused: routes%.r1%.upstream: unknown upstream "
                   .. "\"nope\"", log)
    assert.is_truthy(served(gw, "r1", "two"))
    assert.is_truthy(not_found(gw, "r2"))
    assert.is_truthy(all_at(gw, good))

    -- the upstream they name comes: etcd's values are valid now, and taken
    rev = e:put(key("upstreams", "nope"), cjson.encode(gateway.upstream("nope", mock)))
    assert.is_truthy(served(gw, "r2"), gw:log_tail())
    assert.is_truthy(served(gw, "r1", "three"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))

    -- a DELETE: 404 on both
    rev = e:delete(key("routes", "r1"))
    assert.is_truthy(not_found(gw, "r1"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    assert.is_truthy(served(gw, "base"))
    -- nothing crashed: the master's children are the ones it started with
    assert.equal(NWORKERS + 1, #gw:children())
    assert.not_matches("respawning", gw:log())
  end)

  it("loads sandboxed policies from etcd into every worker; a broken one is logged and ignored",
     function()
    seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "base", "base"), gw:log_tail())
    -- a new source for the policy: every route naming it uses it
    local v2 = WHOAMI:gsub('tag = conf.tag or ""', 'tag = "v2:" .. (conf.tag or "")')
    local rev = e:put(key("policies", "whoami"), v2)
    assert.is_truthy(served(gw, "base", "v2:base"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    -- broken sources: refused with the key, the previous one stays
    e:put(key("policies", "whoami"), "return {name = ")
    e:put(key("policies", "whoami"), "while true do end")
    e:put(key("policies", "whoami"), "return { name = 'whoami', access = 42 }")
    assert.is_truthy(eventually(function()
      return count(gw:log(), "etcd: /moongate/policies/whoami: refused") == 3
    end, 5), gw:log_tail())
    assert.matches("etcd: /moongate/policies/whoami: refused: [^\n]*the previous value stays",
                   gw:log())
    assert.is_truthy(served(gw, "base", "v2:base"))
    assert.is_truthy(all_at(gw, rev))
    -- a policy no route names yet, then a route naming it
    e:put(key("policies", "hello"), [[
return { name = "hello", access = function() return 200, { hello = "etcd" } end }]])
    e:put(key("routes", "h"), cjson.encode({ id = "h", paths = { "/h" }, upstream = "m",
                                             policies = { { name = "hello" } } }))
    assert.is_truthy(all_workers(gw, "/h", function(status, body)
      return status == 200 and body and body.hello == "etcd"
    end), gw:log_tail())
    -- deleting a policy a route still names is refused
    e:delete(key("policies", "hello"))
    assert.is_truthy(eventually(function()
      return gw:log():find("etcd: /moongate/policies/hello: delete refused: still used by routes/h",
                           1, true)
    end, 5), gw:log_tail())
  end)

  it("keeps serving while etcd is down (one log line), and picks up writes once it is back",
     function()
    seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    e:kill()
    -- 1.5 s down: several reconnection attempts; requests all answered
    local deadline = gettime() + 1.5
    local n = 0
    while gettime() < deadline do
      local status, body = get(gw, "/base/x")
      assert.equal(200, status)
      assert.equal("base", body.route)
      n = n + 1
      socket.sleep(0.01)
    end
    assert.is_true(n > 20)
    assert.equal(1, count(gw:log(), "etcd: connection lost"), gw:log_tail())
    e:restart()
    assert.is_truthy(eventually(function()
      return gw:log():find("etcd: connected again", 1, true)
    end, 10), gw:log_tail())
    local rev = e:put(key("routes", "after"), route_json("after"))
    assert.is_truthy(served(gw, "after"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    assert.equal(1, count(gw:log(), "etcd: connection lost"))
  end)

  -- Compaction while the gateway is not watching, made deterministic: the
  -- control process is stopped (SIGSTOP) while etcd is killed, restarted,
  -- written to and compacted; resumed, it finds its watch's revision gone
  -- and reads everything again.
  it("converges after a compaction it missed while disconnected", function()
    seed(e, mock)
    e:put(key("routes", "gone"), route_json("gone"))
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "gone"), gw:log_tail())
    local ctl = gw:control()
    proc.kill(ctl, "STOP")
    local ok, err = pcall(function()
      e:restart()
      e:put(key("routes", "new"), route_json("new"))
      e:delete(key("routes", "gone"))
      e:put(key("routes", "base"), route_json("base", { policies = {
        { name = "whoami", conf = { tag = "changed" } } } }))
      e:compact()
    end)
    proc.kill(ctl, "CONT")
    assert(ok, err)
    local rev = e:revision()
    assert.is_truthy(served(gw, "new"), gw:log_tail())
    assert.is_truthy(not_found(gw, "gone"))
    assert.is_truthy(served(gw, "base", "changed"))
    assert.is_truthy(all_at(gw, rev), gw:log_tail())
    assert.matches("etcd: the watch was cancelled %(history compacted", gw:log())
    -- and a SIGHUP (`moongate reload`) reads etcd again
    local rc, out = gw:reload()
    assert.equal(0, rc, out)
    assert.is_truthy(eventually(function()
      return gw:log():find("reload: etcd holds the config in force", 1, true)
    end, 5), gw:log_tail())
  end)

  it("a respawned control process reads etcd again; the workers keep their version", function()
    local rev = seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    local ctl = gw:control()
    proc.kill(ctl, "KILL")
    assert.is_truthy(eventually(function()
      local c = gw:control()
      return c and c ~= ctl
    end, 5), gw:log_tail())
    -- the same config as the copy: the same number, nothing rebuilt
    assert.is_truthy(all_at(gw, rev), gw:log_tail())
    assert.is_truthy(served(gw, "base"))
    rev = e:put(key("routes", "again"), route_json("again"))
    assert.is_truthy(served(gw, "again"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
  end)

  it("fails over to the next endpoint when the first is dead", function()
    local ports = require("helpers.ports")
    seed(e, mock)
    local dead = "http://127.0.0.1:" .. ports.free()
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ dead, e.url }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    local rev = e:put(key("routes", "fo"), route_json("fo"))
    assert.is_truthy(served(gw, "fo"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
  end)

  it("holds one TCP connection to etcd per node, whatever the worker count", function()
    seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    local mine = { [gw.pid] = true }
    for _, p in ipairs(proc.descendants(gw.pid)) do
      mine[p] = true
    end
    local rc, out = proc.run({ "ss", "-tnpH", "state", "established",
                               "dst", "127.0.0.1:" .. e.client_port })
    assert.equal(0, rc, out)
    local pids = {}
    for pid in out:gmatch("pid=(%d+)") do
      if mine[tonumber(pid)] then
        pids[#pids + 1] = tonumber(pid)
      end
    end
    assert.same({ gw:control() }, pids)
  end)

  it("starts from the last-known-good copy when etcd is unreachable; without one, refuses "
     .. "to start", function()
    local dir = proc.tmpdir()
    local cache = dir .. "/lkg.json"
    local rev = seed(e, mock)
    local node = etcd_node({ e.url }, { timeout_ms = 500, cache = cache })
    local gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    gw:stop()
    e:kill()

    -- the copy: the same routes, the same version
    gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev))
    assert.matches("etcd: unreachable at start [^\n]*; serving the last%-known%-good copy", gw:log())
    -- etcd back: it is followed again
    e:restart()
    local rev2 = e:put(key("routes", "later"), route_json("later"))
    assert.is_truthy(served(gw, "later"), gw:log_tail())
    assert.is_truthy(all_at(gw, rev2))
    gw:stop()
    e:kill()

    -- no copy: `moongate start` fails, saying why
    local node2 = etcd_node({ e.url }, { timeout_ms = 300, cache = dir .. "/none.json" })
    node2.config_source.path = nil
    local out = gateway.start_refused(node2, dir, NWORKERS)
    assert.matches("etcd: unreachable at start [^\n]* and no last%-known%-good copy in "
                   .. dir:gsub("%p", "%%%0") .. "/none.json: refusing to start", out)
    assert.matches("the control process has no configuration to serve", out)
    proc.cleanup(dir)
  end)

  it("serves a route PUT through the Admin API on every worker within 100 ms p95 (50 changes)",
     function()
    seed(e, mock)
    local node = etcd_node({ e.url })
    node.admin = { api_key = "spec-key" }
    local gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    local times = {}
    for i = 1, 50 do
      local id = "p" .. i
      local res = assert(client.request(gw.admin_port, {
        method = "PUT", path = "/routes/" .. id, body = route_json(id),
        headers = { ["X-API-Key"] = "spec-key", ["Content-Type"] = "application/json" },
      }))
      assert.equal(201, res.status, res.body)
      local t0 = gettime() -- the Admin API answered: etcd holds the write
      local rev = tonumber(res.headers["x-moongate-revision"])
      assert.is_truthy(served(gw, id), gw:log_tail())
      times[#times + 1] = (gettime() - t0) * 1000
      if i == 50 then
        assert.is_truthy(all_at(gw, rev))
      end
    end
    table.sort(times)
    local p50, p95 = times[25], times[48]
    print(("\netcd propagation (Admin API PUT /routes/{id} answered -> both workers serve the "
           .. "route), 50 changes: p50 %.1f ms, p95 %.1f ms, max %.1f ms"):format(p50, p95,
                                                                                times[50]))
    assert.is_true(p95 < 100, ("p95 %.1f ms"):format(p95))
  end)
end)
