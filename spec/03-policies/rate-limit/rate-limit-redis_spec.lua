-- rate-limit, Redis mode, against a real redis-server (spec/helpers/redis.lua)
-- shared by real gateways: one count across gateways, one script call per
-- decision, and what happens while Redis is killed, paused, and back.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local redis = require("helpers.redis")
local proc = require("helpers.proc")

local gettime = socket.gettime

local DAY = 86400000
local TIMEOUT_MS = 300
-- what a request may take past the timeout: timer granularity plus
-- scheduling on a loaded 2-core machine
local MARGIN = 0.5

local function fw(limit, extra)
  local c = { algorithm = "fixed_window", limit = limit, window_ms = DAY, key = "route",
              policy = "redis" }
  for k, v in pairs(extra or {}) do
    c[k] = v
  end
  return c
end

local function route(id, conf, auth)
  local pols = {}
  if auth then
    pols[1] = { name = "key-auth" }
  end
  pols[#pols + 1] = { name = "rate-limit", conf = conf }
  return { id = id, paths = { "/" .. id .. "/*" }, upstream = "m", strip_prefix = true,
           policies = pols }
end

local function start_gw(srv, mock, list, workers)
  return gateway.start{
    workers = workers or 1,
    node = { redis = { host = "127.0.0.1", port = srv.port, timeout_ms = TIMEOUT_MS } },
    routes = {
      upstreams = { gateway.upstream("m", mock) },
      consumers = {
        { id = "alice", tenant = "acme", credentials = { ["key-auth"] = { key = "alice-key" } } },
        { id = "bob", tenant = "acme", credentials = { ["key-auth"] = { key = "bob-key" } } },
      },
      routes = list,
    },
  }
end

-- a GET on a new connection; the response and the seconds it took
local function get(gw, path, headers)
  headers = headers or {}
  headers.Connection = "close"
  local t0 = gettime()
  local res, err = client.get(gw.port, path, headers, { timeout = 5 })
  assert(res, "no answer on " .. path .. ": " .. tostring(err))
  return res, gettime() - t0
end

local count = proc.count
local eventually = proc.eventually

local FAILED = "rate-limit: redis failed"
local BACK = "rate-limit: redis answers again"

describe("rate-limit with policy redis", function()
  local srv, mock

  before_each(function()
    srv = redis.start()
    mock = gateway.mock()
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
    redis.stop_all()
  end)

  it("two gateways of 2 workers sharing a limit of 60 admit exactly 60, each algorithm", function()
    local list = {
      route("fw", fw(60)),
      route("sw", fw(60, { algorithm = "sliding_window" })),
      route("tb", { rate = 0.01, burst = 60, key = "route", policy = "redis" }),
    }
    local gws = { start_gw(srv, mock, list, 2), start_gw(srv, mock, list, 2) }
    for _, id in ipairs({ "fw", "sw", "tb" }) do
      local counts = {}
      for i = 1, 150 do
        local res = get(gws[i % 2 + 1], "/" .. id .. "/x")
        counts[res.status] = (counts[res.status] or 0) + 1
        if res.status == 429 then
          assert.same({ error = "API rate limit exceeded" }, cjson.decode(res.body))
          assert.truthy(tonumber(res.headers["retry-after"]))
          assert.equal("0", res.headers["ratelimit-remaining"])
        end
        assert.equal("60", res.headers["ratelimit-limit"])
      end
      assert.same({ [200] = 60, [429] = 90 }, counts, id)
    end
    -- keys named <prefix>:<scope>|<window>|<parts>, expiring
    local keys = assert(srv:command("KEYS", "moongate:rl:*"))
    table.sort(keys)
    assert.same({ "moongate:rl:route=2:fw|fw86400000|route=2:fw",
                  "moongate:rl:route=2:sw|sw86400000|route=2:sw",
                  "moongate:rl:route=2:tb|tb|route=2:tb" }, keys)
    for _, k in ipairs(keys) do
      local ttl = srv:command("PTTL", k)
      assert.is_true(ttl > 0 and ttl <= 2 * DAY + 1000, k .. " " .. tostring(ttl))
    end
    for _, gw in ipairs(gws) do
      assert.equal(0, count(gw:log(), FAILED), gw:log_tail())
    end
  end)

  it("hierarchical: one EVALSHA per decision, and a refusal at one level takes nothing at the others",
     function()
    local levels = function(route_limit)
      return { algorithm = "fixed_window", policy = "redis", group = "h", limits = {
        { key = "tenant", limit = 5, window_ms = DAY },
        { key = "consumer", limit = 100, window_ms = DAY },
        { key = "route", limit = route_limit, window_ms = DAY },
      } }
    end
    local gw = start_gw(srv, mock, { route("ha", levels(2), true), route("hb", levels(100), true) })
    local before = srv:command_calls()
    local statuses = {}
    for i = 1, 10 do
      statuses[i] = get(gw, "/ha/x", { apikey = "alice-key" }).status
    end
    assert.same({ 200, 200, 429, 429, 429, 429, 429, 429, 429, 429 }, statuses)
    local after = srv:command_calls()
    -- 10 decisions: 10 EVALSHA (+ 1 EVAL when the script was new), all levels in each
    assert.equal(10, (after.evalsha or 0) - (before.evalsha or 0))
    assert.is_true((after.eval or 0) - (before.eval or 0) <= 1)
    -- acme's 5: 2 taken on ha, 3 left for hb
    local admitted, last = 0, nil
    for _ = 1, 6 do
      last = get(gw, "/hb/x", { apikey = "alice-key" })
      admitted = admitted + (last.status == 200 and 1 or 0)
    end
    assert.equal(3, admitted)
    assert.equal(429, last.status)
    assert.equal("5", last.headers["ratelimit-limit"]) -- the refusing level: the tenant's
    assert.equal(429, get(gw, "/hb/x", { apikey = "bob-key" }).status)
  end)

  it("Redis killed: answers within the timeout, limits enforced locally, one log line; "
     .. "Redis back: one count across gateways again", function()
    local list = { route("main", fw(6)), route("after", fw(6)),
                   route("ping", fw(1000000)) }
    local gws = { start_gw(srv, mock, list), start_gw(srv, mock, list) }
    assert.equal(200, get(gws[1], "/main/x").status)
    assert.equal(200, get(gws[2], "/main/x").status)
    srv:kill()
    -- each gateway now counts alone, on its own shared memory
    for _, gw in ipairs(gws) do
      local counts = {}
      for _ = 1, 10 do
        local res, took = get(gw, "/main/x")
        assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
        counts[res.status] = (counts[res.status] or 0) + 1
      end
      assert.same({ [200] = 6, [429] = 4 }, counts)
    end
    socket.sleep(1) -- probes fail meanwhile: still one line
    for _, gw in ipairs(gws) do
      assert.equal(1, count(gw:log(), FAILED), gw:log_tail())
    end

    srv:restart()
    for _, gw in ipairs(gws) do
      assert.truthy(eventually(function()
        get(gw, "/ping/x")
        return gw:log():find(BACK, 1, true)
      end, 10), "never back on redis:\n" .. gw:log_tail())
    end
    local admitted = 0
    for i = 1, 12 do
      admitted = admitted + (get(gws[i % 2 + 1], "/after/x").status == 200 and 1 or 0)
    end
    assert.equal(6, admitted) -- 6 in all, not 6 per gateway
    for _, gw in ipairs(gws) do
      local log = gw:log()
      assert.equal(1, count(log, FAILED), log)
      assert.equal(1, count(log, BACK), log)
    end
  end)

  it("Redis slower than the timeout: every answer within it, limits enforced locally", function()
    local gw = start_gw(srv, mock, { route("slow", fw(3)) })
    assert.equal(200, get(gw, "/slow/x").status)
    srv:pause(3000)
    local statuses = {}
    for i = 1, 6 do
      local res, took = get(gw, "/slow/x")
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
      statuses[i] = res.status
    end
    assert.same({ 200, 200, 200, 429, 429, 429 }, statuses)
    assert.equal(1, count(gw:log(), FAILED), gw:log_tail())
  end)

  it("fallback allow admits and fallback deny refuses with 503 while Redis is down", function()
    local gw = start_gw(srv, mock, { route("allow", fw(2, { fallback = "allow" })),
                                     route("deny", fw(2, { fallback = "deny" })) })
    assert.equal(200, get(gw, "/allow/x").status)
    srv:kill()
    for _ = 1, 5 do
      local res, took = get(gw, "/allow/x")
      assert.equal(200, res.status)
      assert.is_nil(res.headers["ratelimit-limit"])
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
      res, took = get(gw, "/deny/x")
      assert.equal(503, res.status)
      assert.same({ error = "rate limiting unavailable" }, cjson.decode(res.body))
      assert.equal("1", res.headers["retry-after"])
      assert.is_true(took < TIMEOUT_MS / 1000 + MARGIN, "took " .. took .. " s")
    end
    assert.equal(1, count(gw:log(), FAILED), gw:log_tail())
  end)
end)
