-- mg.redis end to end: a real redis-server (spec/helpers/redis.lua), real
-- gateways whose routes run spec/fixtures/policies-redis/it-redis.lua in
-- their access phase, and what the clients get when Redis answers, is
-- killed, paused, restarted, or refuses the password.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local redis = require("helpers.redis")
local proc = require("helpers.proc")

local gettime = socket.gettime

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-redis"
local TIMEOUT_MS = 300
-- what a request may take past the timeout: the loop's timer granularity,
-- plus scheduling on a loaded 2-core machine
local MARGIN = 0.4

local SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
local NESTED = "return {1, 'a', {2, 'b'}, string.rep('x', 100000)}"

local function p(conf)
  return { { name = "it-redis", conf = conf } }
end

local function routes(mock)
  return {
    upstreams = { gateway.upstream("mock", mock) },
    consumers = gateway.array(), global_policies = gateway.array(),
    routes = {
      { id = "incr", paths = { "/incr" }, policies = p({ op = "incr", key = "hits" }) },
      { id = "cmd", paths = { "/cmd" }, policies = p({ op = "command" }) },
      { id = "state", paths = { "/state" }, policies = p({ op = "state" }) },
      { id = "script", paths = { "/script" }, policies = p({ op = "script", source = SCRIPT }) },
      { id = "nested", paths = { "/nested" }, policies = p({ op = "script", source = NESTED }) },
      { id = "plain", paths = { "/plain" }, upstream = "mock" },
    },
  }
end

local function start_gw(srv, opts)
  opts = opts or {}
  local conf = { host = "127.0.0.1", port = srv.port, timeout_ms = TIMEOUT_MS }
  for k, v in pairs(opts.redis or {}) do
    conf[k] = v
  end
  return gateway.start({
    workers = opts.workers or 1,
    node = { lua_path = { POLICY_DIR }, redis = conf },
    routes = routes(opts.mock or gateway.mock()),
  })
end

-- status, decoded JSON body, seconds taken
local function call(gw, path, headers)
  local t0 = gettime()
  local res, err = client.get(gw.port, path, headers, { timeout = 5 })
  local took = gettime() - t0
  assert(res, "no answer on " .. path .. ": " .. tostring(err))
  local ok, body = pcall(cjson.decode, res.body)
  return res.status, ok and body or res.body, took
end

local function cmd(gw, ...)
  return call(gw, "/cmd", { ["X-Redis-Cmd"] = cjson.encode({ ... }) })
end

local count = proc.count
local eventually = proc.eventually

-- A client that sends a request and resets the connection (SO_LINGER 0)
-- while the gateway waits on Redis for it. (A plain close is a half-close
-- the gateway still answers.)
local function leave_midway(gw)
  local c = assert(client.connect(gw.port))
  assert(c:request({ method = "GET", path = "/incr" }))
  socket.sleep(0.02)
  c.sock:setoption("linger", { on = true, timeout = 0 })
  c:close()
end

describe("mg.redis", function()
  after_each(function()
    client.close_all()
    gateway.stop_all()
    redis.stop_all()
  end)

  it("runs commands and converts their replies", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    for i = 1, 5 do
      local status, body = call(gw, "/incr")
      assert.equal(200, status)
      assert.equal(i, body.value)
    end
    assert.equal(5, tonumber(srv:command("GET", "hits")))

    local status, body = cmd(gw, "SET", "a", "x")
    assert.same({ 200, "OK" }, { status, body.value })          -- status reply
    status, body = cmd(gw, "GET", "a")
    assert.same({ 200, "x" }, { status, body.value })           -- bulk
    status, body = cmd(gw, "GET", "missing")
    assert.same({ 200, cjson.null }, { status, body.value })    -- nil: mg.redis.null
    status, body = cmd(gw, "MGET", "a", "missing")
    assert.same({ 200, { "x", cjson.null } }, { status, body.value }) -- array, nil inside
    -- numbers go as Redis reads them: 1e15 as 1000000000000000, not 1e+15
    status, body = cmd(gw, "INCRBY", "n", 1e15)
    assert.same({ 200, 1e15 }, { status, body.value })
    status, body = cmd(gw, "INCRBYFLOAT", "f", 0.5)
    assert.same({ 200, "0.5" }, { status, body.value })
    -- an error reply is nil, "ERR ..."
    status, body = cmd(gw, "INCR", "a")
    assert.equal(503, status)
    assert.equal("ERR value is not an integer or out of range", body.error)
    -- a script's nested array, and a 100 kB bulk string in it
    status, body = call(gw, "/nested", { ["X-Redis-Eval"] = "{}" })
    assert.equal(200, status)
    assert.same({ 1, "a", { 2, "b" } }, { body.value[1], body.value[2], body.value[3] })
    assert.equal(string.rep("x", 100000), body.value[4])
  end)

  it("refuses commands that would change or hold the shared connection", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    for _, name in ipairs({ "MULTI", "subscribe", "SELECT", "BLPOP", "CLIENT", "AUTH" }) do
      local status, body = cmd(gw, name, "x", "0")
      assert.equal(400, status)
      assert.truthy(body.raised:find(name .. " is not allowed", 1, true), body.raised)
    end
    local status, body = cmd(gw)
    assert.equal(400, status)
    assert.truthy(body.raised:find("no command given", 1, true))
    -- and the connection still works for everyone
    status = call(gw, "/incr")
    assert.equal(200, status)
  end)

  it("counts exactly across 2 workers and 2 gateways sharing one Redis", function()
    local srv = redis.start()
    local mock = gateway.mock()
    local gws = { start_gw(srv, { workers = 2, mock = mock }),
                  start_gw(srv, { workers = 2, mock = mock }) }
    local seen, workers = {}, { {}, {} }
    for i = 1, 60 do
      local g = (i % 2) + 1
      local status, body = call(gws[g], "/incr")
      assert.equal(200, status, cjson.encode(body))
      assert.is_nil(seen[body.value], "value " .. tostring(body.value) .. " given twice")
      seen[body.value] = true
      workers[g][body.worker] = true
    end
    for v = 1, 60 do
      assert.is_true(seen[v], "value " .. v .. " missing")
    end
    assert.equal(60, tonumber(srv:command("GET", "hits")))
    -- each gateway's two workers both counted (SO_REUSEPORT spreads new
    -- connections; 30 of them on one worker would be a 1 in 2^29 chance)
    for g = 1, 2 do
      assert.is_true(workers[g][0] and workers[g][1], "gateway " .. g .. " used one worker")
    end
  end)

  it("runs scripts with EVALSHA, loading them with EVAL on NOSCRIPT", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    local eval = { ["X-Redis-Eval"] = cjson.encode({ keys = { "s" }, args = { 5 } }) }
    local status, body = call(gw, "/script", eval)        -- fresh server: NOSCRIPT, then EVAL
    assert.same({ 200, 5 }, { status, body.value })
    for i = 2, 4 do
      status, body = call(gw, "/script", eval)
      assert.same({ 200, 5 * i }, { status, body.value })
    end
    local calls = srv:command_calls()
    assert.equal(1, calls.eval)       -- loaded once, and our sha1 is Redis' own:
    assert.is_true(calls.evalsha >= 4) -- later calls found it
    assert.equal("OK", srv:command("SCRIPT", "FLUSH"))
    status, body = call(gw, "/script", eval)
    assert.same({ 200, 25 }, { status, body.value })
    status, body = call(gw, "/script", eval)
    assert.same({ 200, 30 }, { status, body.value })
    assert.equal(2, srv:command_calls().eval)
  end)

  it("answers at once while Redis is down, logs the outage once, and recovers", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    local down_line = "redis 127.0.0.1:" .. srv.port .. " down:"
    local up_line = "redis 127.0.0.1:" .. srv.port .. " up"
    assert.equal(200, (call(gw, "/incr")))
    local pids = gw:workers()
    srv:kill()
    for _ = 1, 10 do
      local status, body, took = call(gw, "/incr")
      assert.equal(503, status)
      assert.equal("redis unavailable", body.error)
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
      assert.equal(200, (call(gw, "/plain")))  -- the worker serves the rest as ever
    end
    local _, state = call(gw, "/state")
    assert.same({ state = "down", available = false }, state)
    socket.sleep(1) -- a few failed probes: still one line
    assert.equal(1, count(gw:log(), down_line), gw:log_tail())

    srv:restart()
    local back = eventually(function()
      local status, body = call(gw, "/incr")
      return status == 200 and body
    end, 8)
    assert.truthy(back, "no recovery:\n" .. gw:log_tail())
    assert.equal(1, back.value) -- the new, empty server counts
    local log = gw:log()
    assert.equal(1, count(log, down_line), log)
    assert.equal(2, count(log, up_line), log) -- the first connection, and the recovery
    assert.same(pids, gw:workers())
  end)

  it("fails waiting commands at once when Redis resets the connection", function()
    local srv = redis.start()
    local gw = start_gw(srv, { redis = { timeout_ms = 3000 } })
    assert.equal(200, (call(gw, "/incr")))
    srv:freeze() -- our INCR stays unread in its socket: killed, it resets
    local c = assert(client.connect(gw.port))
    assert(c:request({ method = "GET", path = "/incr" }))
    socket.sleep(0.2)
    local t0 = gettime()
    srv:kill()
    local res = assert(c:read_response({ timeout = 5 }))
    local took = gettime() - t0
    assert.equal(503, res.status)
    assert.equal("redis unavailable", cjson.decode(res.body).error)
    assert.is_true(took < 1, "took " .. took .. " s (the 3 s timeout?)")
    assert.equal(1, count(gw:log(), " down:"), gw:log())
  end)

  it("fails waiting commands with 'timeout' at the deadline while Redis is paused", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    assert.equal(200, (call(gw, "/incr")))
    srv:pause(2000)
    -- five requests at once: every one answered by the deadline
    local conns = {}
    local t0 = gettime()
    for i = 1, 5 do
      conns[i] = assert(client.connect(gw.port))
      assert(conns[i]:request({ method = "GET", path = "/incr" }))
    end
    for i = 1, 5 do
      local res = assert(conns[i]:read_response({ timeout = 5 }))
      local took = gettime() - t0
      assert.equal(503, res.status)
      assert.equal("timeout", cjson.decode(res.body).error)
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
    end
    -- then the connection is down: no more waiting, until a probe answers
    for _ = 1, 3 do
      local status, body, took = call(gw, "/incr")
      assert.equal(503, status)
      assert.truthy(body.error == "redis unavailable" or body.error == "timeout", body.error)
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
    end
    assert.truthy(eventually(function()
      return call(gw, "/incr") == 200
    end, 8), "no recovery:\n" .. gw:log_tail())
    local log = gw:log()
    assert.equal(1, count(log, "down: no answer within " .. TIMEOUT_MS .. " ms"), log)
    assert.equal(1, count(log, " down:"), log)
  end)

  it("authenticates and selects the database", function()
    local srv = redis.start({ password = "s3cret" })
    local gw = start_gw(srv, { redis = { password = "s3cret", db = 3 } })
    local status, body = cmd(gw, "SET", "where", "db3")
    assert.same({ 200, "OK" }, { status, body.value })
    assert.equal("db3", srv:command_db(3, "GET", "where"))
    assert.equal(false, srv:command_db(0, "GET", "where"))
  end)

  it("takes a host name, resolved once at start", function()
    local srv = redis.start()
    local gw = start_gw(srv, { redis = { host = "localhost" } })
    assert.equal(200, (call(gw, "/incr")))
    assert.truthy(gw:log():find("redis 127.0.0.1:" .. srv.port .. " up", 1, true), gw:log_tail())
  end)

  it("treats a wrong password as down, logged once", function()
    local srv = redis.start({ password = "s3cret" })
    local gw = start_gw(srv, { redis = { password = "wrong" } })
    for _ = 1, 3 do
      local status, body, took = call(gw, "/incr")
      assert.equal(503, status)
      assert.equal("redis unavailable", body.error)
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
    end
    socket.sleep(1.2) -- probes fail the same way meanwhile
    assert.equal(503, (call(gw, "/incr")))
    local log = gw:log()
    assert.equal(1, count(log, " down: AUTH failed: WRONGPASS"), log)
    assert.equal(0, count(log, " up"), log)
  end)

  it("survives clients that leave while their command waits", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    assert.equal(200, (call(gw, "/incr")))
    local pids = gw:workers()
    -- the reply comes after the client left (a pause shorter than the timeout)
    srv:pause(150)
    for _ = 1, 5 do
      leave_midway(gw)
    end
    socket.sleep(0.3)
    local status, body = call(gw, "/incr")
    assert.equal(200, status)
    -- those left behind were counted all the same, as far as the gateway
    -- read them before their client left (all five, unless very loaded)
    assert.is_true(body.value >= 2 and body.value <= 7, tostring(body.value))
    -- the deadline passes after the client left (a pause past the timeout)
    srv:pause(1000)
    for _ = 1, 5 do
      leave_midway(gw)
    end
    socket.sleep(TIMEOUT_MS / 1000 + 0.2)
    assert.equal(200, (call(gw, "/plain")))
    assert.truthy(eventually(function()
      return call(gw, "/incr") == 200
    end, 8), "no recovery:\n" .. gw:log_tail())
    assert.same(pids, gw:workers())
    assert.is_nil(gw:log():find("%[error%].-request"), gw:log_tail())
  end)

  it("does not connect while no policy uses Redis", function()
    local srv = redis.start()
    local gw = start_gw(srv)
    assert.equal(200, (call(gw, "/plain")))
    assert.equal(0, tonumber((srv:command("INFO", "clients"):match("connected_clients:(%d+)"))) - 1)
    assert.is_nil(gw:log():find("redis", 1, true))
  end)
end)
