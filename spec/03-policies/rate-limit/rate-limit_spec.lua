-- rate-limit, local mode (the node's shared-memory limiter), on a real
-- gateway of 2 workers: exact counts over both workers, the 429 and its
-- headers, the key sources, hierarchical limits, and `moongate check`.
-- Windows are a day long and buckets refill one token per 100 s, so a slow
-- machine cannot turn a refusal into an admission mid-test.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local policy_helper = require("helpers.policy")

local DAY = 86400000

-- answers carry the worker that served them
local PROBE = [[
local mg = require("moongate")
return {
  name = "probe-worker",
  priority = 10,
  access = function(_, ctx)
    ctx.resp:set_header("X-Worker", tostring(mg.worker_id()))
  end,
}
]]

local function validate(conf)
  return policy_helper.validate("rate-limit", conf)
end

local function fw(limit, extra)
  local c = { algorithm = "fixed_window", limit = limit, window_ms = DAY, key = "route" }
  for k, v in pairs(extra or {}) do
    c[k] = v
  end
  return c
end

local function route(id, conf, auth)
  local pols = {}
  if auth then
    pols[#pols + 1] = { name = "key-auth" }
  end
  pols[#pols + 1] = { name = "rate-limit", conf = conf }
  pols[#pols + 1] = { name = "probe-worker" }
  return { id = id, paths = { "/" .. id .. "/*" }, upstream = "m", strip_prefix = true,
           policies = pols }
end

-- A GET on a new connection (SO_REUSEPORT spreads them over the workers).
local function get(gw, path, headers)
  headers = headers or {}
  headers.Connection = "close"
  return assert(client.get(gw.port, path, headers))
end

-- A GET from another loopback address (the client socket bound to it).
local function get_from(gw, addr, path)
  local s = socket.tcp()
  s:settimeout(5)
  assert(s:bind(addr, 0))
  assert(s:connect("127.0.0.1", gw.port))
  assert(s:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  local data = s:receive("*a")
  s:close()
  return tonumber(data:match("^HTTP/1%.1 (%d+)"))
end

-- n GETs; the count of each status, and the set of workers that answered.
local function burst(gw, path, n, headers)
  local counts, workers, refusals = {}, {}, {}
  for _ = 1, n do
    local h = {}
    for k, v in pairs(headers or {}) do
      h[k] = v
    end
    local res = get(gw, path, h)
    counts[res.status] = (counts[res.status] or 0) + 1
    if res.headers["x-worker"] then
      workers[res.headers["x-worker"]] = true
    end
    if res.status == 429 then
      refusals[#refusals + 1] = res
    end
  end
  return counts, workers, refusals
end

local function assert_refusal(res)
  assert.equal(429, res.status)
  assert.matches("^application/json", res.headers["content-type"])
  assert.same({ error = "API rate limit exceeded" }, cjson.decode(res.body))
  local retry = tonumber(res.headers["retry-after"])
  assert.is_truthy(retry, "Retry-After is an integer: " .. tostring(res.headers["retry-after"]))
  assert.equal(res.headers["retry-after"], tostring(retry))
  assert.is_true(retry >= 1)
  return retry
end

describe("rate-limit", function()
  describe("schema", function()
    it("fills the defaults", function()
      assert.same({ rate = 5, algorithm = "token_bucket", key = "consumer", policy = "local",
                    fallback = "local", headers = true, redis_prefix = "moongate:rl" },
                  validate({ rate = 5 }))
    end)

    it("refuses fields of the wrong algorithm, missing ones, bad keys, duplicate levels", function()
      local cases = {
        { {}, "conf: token_bucket needs rate" },
        { { rate = 1, window_ms = 1000 }, "conf: token_bucket takes rate and burst, not limit and window_ms" },
        { { algorithm = "sliding_window", limit = 5 }, "conf: sliding_window needs limit and window_ms" },
        { { algorithm = "fixed_window", limit = 5, window_ms = 10, rate = 1 },
          "conf: fixed_window takes limit and window_ms, not rate and burst" },
        { { rate = 1, key = "user" }, "conf%.key: must be consumer, tenant, ip, route or header:<name>, got user" },
        { { rate = 1, key = { "ip", "header:" } }, "conf%.key" },
        { { rate = 0 }, "conf%.rate: must be > 0" },
        { { rate = 1, burst = 0.5 }, "conf%.burst: must be >= 1" },
        { { rate = 1, policy = "cluster" }, "conf%.policy: must be one of: local, redis" },
        { { rate = 1, fallback = "open" }, "conf%.fallback: must be one of: local, allow, deny" },
        { { limits = { { rate = 1 } }, rate = 2 }, "conf: give either limits or one limit" },
        { { limits = { { key = "tenant", rate = 1 }, { key = "consumer", limit = 3 } } },
          "conf: limits%[1%]: token_bucket needs rate" },
        { { limits = { { rate = 1 }, { rate = 2 } } },
          "conf: limits%[1%] has the key and window of limits%[0%]" },
        { { limits = {} }, "conf%.limits" },
        { { rate = 1, zone = "x" }, "conf%.zone: unknown field" },
      }
      for _, c in ipairs(cases) do
        local ok, err = validate(c[1])
        assert.is_nil(ok, cjson.encode(c[1]))
        assert.matches(c[2], err)
      end
    end)

    it("`moongate check` names the JSON path of a bad conf and exits 1", function()
      local dir = proc.tmpdir()
      proc.write_file(dir .. "/moongate.json", cjson.encode({
        listen = { { address = "127.0.0.1:1" } },
        config_source = { type = "file", path = "routes.json" } }))
      proc.write_file(dir .. "/routes.json", cjson.encode({
        routes = { { id = "a", paths = { "/a" }, policies = {
          { name = "rate-limit", conf = { algorithm = "token_bucket", limit = 10, window_ms = 1000 } },
        } }, { id = "b", paths = { "/b" }, policies = {
          { name = "rate-limit", conf = { limits = { { key = "tenant", rate = 10 },
                                                    { key = "consumer", algorithm = "fixed_window" } } } },
        } } } }))
      local rc, out = proc.run({ gateway.bin(), "check", "-c", dir .. "/moongate.json" },
                               { stderr = true })
      proc.cleanup(dir)
      assert.equal(1, rc)
      assert.matches("routes%[0%]%.policies%[0%]%.conf: token_bucket needs rate", out)
      assert.matches("routes%[1%]%.policies%[0%]%.conf: limits%[1%]: fixed_window needs limit and window_ms",
                     out)
    end)
  end)

  describe("local, on a gateway of 2 workers", function()
    local gw, dir

    setup(function()
      local mock = gateway.mock()
      dir = proc.tmpdir()
      proc.write_file(dir .. "/probe-worker.lua", PROBE)
      local hier = function(route_limit)
        return { algorithm = "fixed_window", group = "h", limits = {
          { key = "tenant", limit = 5, window_ms = DAY },
          { key = "consumer", limit = 100, window_ms = DAY },
          { key = "route", limit = route_limit, window_ms = DAY },
        } }
      end
      gw = gateway.start{
        workers = 2,
        node = { lua_path = { dir } },
        routes = {
          upstreams = { gateway.upstream("m", mock) },
          consumers = {
            { id = "alice", tenant = "acme", credentials = { ["key-auth"] = { key = "alice-key" } } },
            { id = "bob", tenant = "acme", credentials = { ["key-auth"] = { key = "bob-key" } } },
            { id = "carol", tenant = "initech", credentials = { ["key-auth"] = { key = "carol-key" } } },
            { id = "dave", credentials = { ["key-auth"] = { key = "dave-key" } } },
          },
          routes = {
            route("tb", { rate = 0.01, burst = 10, key = "route" }),
            route("fw", fw(10)),
            route("sw", { algorithm = "sliding_window", limit = 10, window_ms = DAY, key = "route" }),
            route("hdr", fw(3)),
            route("nohdr", fw(1, { headers = false })),
            route("consumer", fw(2, { key = "consumer" }), true),
            route("anon", fw(2, { key = "consumer" })),
            route("ip", fw(2, { key = "ip" })),
            route("header", fw(2, { key = "header:X-User" })),
            route("combined", fw(1, { key = { "header:X-A", "header:X-B" } })),
            route("ra", fw(2)),
            route("rb", fw(2)),
            route("ga", fw(3, { key = "ip", group = "g" })),
            route("gb", fw(3, { key = "ip", group = "g" })),
            route("ha", hier(2), true),
            route("hb", hier(100), true),
            route("ht", { key = "tenant", algorithm = "fixed_window", limit = 1, window_ms = DAY }, true),
          },
        },
      }
    end)

    teardown(function()
      client.close_all()
      gateway.stop_all()
      proc.cleanup(dir)
    end)

    for _, alg in ipairs({ { "token_bucket", "tb" }, { "fixed_window", "fw" },
                           { "sliding_window", "sw" } }) do
      it(alg[1] .. ": a limit of 10 admits exactly 10 of 25 requests over both workers", function()
        local counts, workers, refusals = burst(gw, "/" .. alg[2] .. "/x", 25)
        assert.same({ [200] = 10, [429] = 15 }, counts)
        assert.is_true(workers["0"] and workers["1"], "both workers answered")
        for _, res in ipairs(refusals) do
          local retry = assert_refusal(res)
          if alg[1] == "token_bucket" then
            assert.is_true(retry <= 100, "one token per 100 s") -- 0.01/s
          else
            assert.is_true(retry <= 86400)
          end
          assert.equal("10", res.headers["ratelimit-limit"])
          assert.equal("0", res.headers["ratelimit-remaining"])
        end
      end)
    end

    it("RateLimit-Limit, -Remaining, -Reset on every answer, 200s and 429s", function()
      local remaining = {}
      for i = 1, 4 do
        local res = get(gw, "/hdr/x")
        assert.equal(i <= 3 and 200 or 429, res.status)
        assert.equal("3", res.headers["ratelimit-limit"])
        remaining[i] = res.headers["ratelimit-remaining"]
        local reset = tonumber(res.headers["ratelimit-reset"])
        assert.is_true(reset >= 1 and reset <= 86400, tostring(res.headers["ratelimit-reset"]))
        assert.equal(res.headers["ratelimit-reset"], tostring(reset))
        if i == 4 then
          assert.equal(reset, assert_refusal(res)) -- a window: retry when it ends
        else
          assert.is_nil(res.headers["retry-after"])
        end
      end
      assert.same({ "2", "1", "0", "0" }, remaining)
    end)

    it("headers = false: no RateLimit-* headers; a 429 still says Retry-After", function()
      local res = get(gw, "/nohdr/x")
      assert.equal(200, res.status)
      assert.is_nil(res.headers["ratelimit-limit"])
      assert.is_nil(res.headers["ratelimit-remaining"])
      assert.is_nil(res.headers["ratelimit-reset"])
      res = get(gw, "/nohdr/x")
      assert_refusal(res)
      assert.is_nil(res.headers["ratelimit-limit"])
    end)

    it("key consumer: each consumer (key-auth) has its own count", function()
      assert.same({ [200] = 2, [429] = 2 }, (burst(gw, "/consumer/x", 4, { apikey = "alice-key" })))
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/consumer/x", 3, { apikey = "bob-key" })))
    end)

    it("key consumer without a consumer on the request: the client address", function()
      assert.same({ [200] = 2, [429] = 2 }, (burst(gw, "/anon/x", 4)))
      assert.same({ 200, 200, 429 }, { get_from(gw, "127.0.0.2", "/anon/x"),
                                       get_from(gw, "127.0.0.2", "/anon/x"),
                                       get_from(gw, "127.0.0.2", "/anon/x") })
    end)

    it("key ip: each client address has its own count, whatever the headers", function()
      assert.same({ [200] = 2, [429] = 2 }, (burst(gw, "/ip/x", 4, { ["X-User"] = "u" })))
      assert.equal(200, get_from(gw, "127.0.0.3", "/ip/x"))
    end)

    it("key header:X-User: each value has its own count; without it, the address", function()
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/header/x", 3, { ["X-User"] = "u1" })))
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/header/x", 3, { ["X-User"] = "u2" })))
      -- a header named like the fallback does not pose as the address
      assert.same({ [200] = 1 }, (burst(gw, "/header/x", 1, { ["X-User"] = "127.0.0.1" })))
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/header/x", 3)))
    end)

    it("a combined key: values that would join alike under a plain separator stay apart",
       function()
      assert.equal(200, get(gw, "/combined/x", { ["X-A"] = "a|b", ["X-B"] = "c" }).status)
      assert.equal(429, get(gw, "/combined/x", { ["X-A"] = "a|b", ["X-B"] = "c" }).status)
      assert.equal(200, get(gw, "/combined/x", { ["X-A"] = "a", ["X-B"] = "b|c" }).status)
      assert.equal(200, get(gw, "/combined/x", { ["X-A"] = "a", ["X-B"] = "b" }).status)
      assert.equal(200, get(gw, "/combined/x", { ["X-A"] = "a:1", ["X-B"] = "b" }).status)
    end)

    it("key route: routes count apart; routes of one group share", function()
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/ra/x", 3)))
      assert.same({ [200] = 2, [429] = 1 }, (burst(gw, "/rb/x", 3)))
      assert.same({ [200] = 2 }, (burst(gw, "/ga/x", 2)))
      assert.same({ [200] = 1, [429] = 2 }, (burst(gw, "/gb/x", 3)))
    end)

    it("key tenant: consumers of one tenant share; a consumer without one counts alone", function()
      assert.equal(200, get(gw, "/ht/x", { apikey = "alice-key" }).status)
      assert.equal(429, get(gw, "/ht/x", { apikey = "bob-key" }).status) -- acme too
      assert.equal(200, get(gw, "/ht/x", { apikey = "carol-key" }).status)
      assert.equal(200, get(gw, "/ht/x", { apikey = "dave-key" }).status)
      assert.equal(429, get(gw, "/ht/x", { apikey = "dave-key" }).status)
    end)

    it("hierarchical: a refusal at the route level consumes nothing at the tenant level", function()
      -- tenant acme 5, consumer 100, route ha 2 (hb 100); ha and hb share
      -- the tenant's count (group h)
      local first = get(gw, "/ha/x", { apikey = "alice-key" })
      assert.equal(200, first.status)
      -- the level closest to refusal: the route's (1 left of 2)
      assert.equal("2", first.headers["ratelimit-limit"])
      assert.equal("1", first.headers["ratelimit-remaining"])
      local counts, _, refusals = burst(gw, "/ha/x", 9, { apikey = "alice-key" })
      assert.same({ [200] = 1, [429] = 8 }, counts)
      assert.equal("2", refusals[1].headers["ratelimit-limit"])
      -- 8 refused at ha took nothing from acme: 3 of its 5 are left
      counts, _, refusals = burst(gw, "/hb/x", 6, { apikey = "alice-key" })
      assert.same({ [200] = 3, [429] = 3 }, counts)
      -- refused at the tenant level, which the headers report
      assert.equal("5", refusals[1].headers["ratelimit-limit"])
      assert.equal("0", refusals[1].headers["ratelimit-remaining"])
      -- bob is of acme too; carol's initech is untouched
      assert.equal(429, get(gw, "/hb/x", { apikey = "bob-key" }).status)
      assert.equal(200, get(gw, "/hb/x", { apikey = "carol-key" }).status)
    end)
  end)
end)
