-- circuit-breaker: per upstream target, node-wide, acting in the proxy.
-- Every transition is walked on a real gateway in front of the mock
-- backend, with short durations; the mock's hit counter (/__mock/hits)
-- tells whether a request reached the backend. Each test has its own
-- upstream (the breaker's key is "<upstream id>/<host>:<port>"), so their
-- states never mix.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")
local policy_helper = require("helpers.policy")

local function validate(conf)
  return policy_helper.validate("circuit-breaker", conf)
end

local eventually = proc.eventually

local function hits(mock)
  local res = assert(client.get(mock.port, "/__mock/hits"))
  return cjson.decode(res.body).hits
end

-- the gateway's own refusal: 503, JSON, Retry-After
local function assert_open(res, retry_after)
  assert.equal(503, res.status, res.body)
  assert.matches("^application/json", res.headers["content-type"])
  local body = cjson.decode(res.body)
  assert.equal("upstream circuit open", body.error)
  assert.equal(res.headers["x-request-id"], body.request_id)
  if retry_after then
    assert.equal(tostring(retry_after), res.headers["retry-after"])
  else
    assert.matches("^%d+$", res.headers["retry-after"])
  end
end

describe("circuit-breaker", function()
  describe("schema", function()
    it("fills the defaults of the issue", function()
      assert.same({ window_ms = 10000, min_requests = 20, failure_rate = 0.5,
                    failure_statuses = { 500, 502, 503, 504 }, open_ms = 30000, probes = 10,
                    close_after = 5 }, validate({}))
    end)

    it("refuses bad confs, naming the field", function()
      local cases = {
        { { failure_rate = 1.5 }, "conf%.failure_rate: must be <= 1" },
        { { failure_rate = 0 }, "conf%.failure_rate: must be > 0" },
        { { slow_ms = 100, slow_rate = 2 }, "conf%.slow_rate: must be <= 1" },
        { { window_ms = 5 }, "conf%.window_ms: must be >= 10" },
        { { probes = 0 }, "conf%.probes: must be >= 1" },
        { { close_after = 1.5 }, "conf%.close_after" },
        { { failure_statuses = { 99 } }, "conf%.failure_statuses%[0%]: must be >= 100" },
        { { failure_statuses = { 500, 500 } }, "conf%.failure_statuses" },
        { { slow_ms = 100 }, "conf: slow_ms and slow_rate go together" },
        { { slow_rate = 0.5 }, "conf: slow_ms and slow_rate go together" },
        { { open_ms = 1000, max_open_ms = 500 }, "conf: max_open_ms must be >= open_ms" },
        { { bogus = 1 }, "conf%.bogus" },
      }
      for _, c in ipairs(cases) do
        local ok, err = validate(c[1])
        assert.is_nil(ok, cjson.encode(c[1]))
        assert.matches(c[2], err)
      end
    end)

    it("moongate check exits 1 with the JSON path of each error", function()
      local dir = proc.tmpdir()
      proc.write_file(dir .. "/moongate.json", cjson.encode({
        listen = { { address = "127.0.0.1:" .. ports.free() } },
        config_source = { type = "file", path = "routes.json" },
      }))
      proc.write_file(dir .. "/routes.json", cjson.encode({
        upstreams = { gateway.upstream("u", 9) },
        routes = { { id = "r", paths = { "/r" }, upstream = "u", policies = {
          { name = "circuit-breaker", conf = { failure_rate = 2, probes = 0 } } } } },
      }))
      local rc, out = proc.run({ gateway.bin(), "check", "-c", dir .. "/moongate.json" },
                               { stderr = true })
      proc.cleanup(dir)
      assert.equal(1, rc, out)
      assert.matches("routes%[0%]%.policies%[0%]%.conf%.failure_rate: must be <= 1", out)
      assert.matches("routes%[0%]%.policies%[0%]%.conf%.probes: must be >= 1", out)
    end)
  end)

  describe("on a gateway", function()
    local gw, mock, refused

    -- one upstream per test: id, targets (default: the mock), timeouts
    local tests = {
      { "below", { min_requests = 5, failure_rate = 0.5, open_ms = 60000 } },
      { "rate", { min_requests = 4, failure_rate = 0.5, open_ms = 60000 } },
      { "slow", { min_requests = 2, failure_rate = 1, slow_ms = 100, slow_rate = 0.5,
                  open_ms = 60000 } },
      { "timeout", { min_requests = 2, failure_rate = 1, open_ms = 60000 },
        timeouts = { read_ms = 100 } },
      { "refused", { min_requests = 2, failure_rate = 1, open_ms = 60000 }, refused = true },
      { "probes", { min_requests = 2, failure_rate = 1, open_ms = 800, probes = 2,
                    close_after = 2 } },
      { "reopen", { min_requests = 2, failure_rate = 1, open_ms = 300, probes = 1,
                    close_after = 1 } },
      { "grow", { min_requests = 2, failure_rate = 1, open_ms = 500, max_open_ms = 5000,
                  probes = 1, close_after = 1 } },
      { "two", { min_requests = 4, failure_rate = 0.5, open_ms = 60000 }, two = true },
      { "abort", { min_requests = 2, failure_rate = 1, open_ms = 1500, probes = 1,
                   close_after = 1 } },
      { "statuses", { min_requests = 2, failure_rate = 0.5, open_ms = 60000,
                      failure_statuses = { 429 } } },
      { "plain" },
    }

    setup(function()
      mock = gateway.mock()
      refused = ports.free() -- nothing listens there
      local upstreams, routes = {}, {}
      for _, t in ipairs(tests) do
        local id = t[1]
        local targets = { { host = "127.0.0.1", port = t.refused and refused or mock.port } }
        if t.two then
          targets = { { host = "127.0.0.1", port = refused }, { host = "127.0.0.1", port = mock.port } }
        end
        upstreams[#upstreams + 1] = { id = id, targets = targets, timeouts = t.timeouts }
        routes[#routes + 1] = {
          id = id, paths = { "/" .. id .. "/*" }, upstream = id, strip_prefix = true,
          policies = t[2] and { { name = "circuit-breaker", conf = t[2] } } or gateway.array(),
        }
      end
      gw = gateway.start{ routes = { upstreams = upstreams, routes = routes } }
    end)

    teardown(function()
      client.close_all()
      gateway.stop_all()
    end)

    local function get(path)
      return assert(client.get(gw.port, path))
    end

    it("stays closed below min_requests, even at 100% failures", function()
      local before = hits(mock)
      for _ = 1, 4 do
        assert.equal(500, get("/below/x?status=500").status)
      end
      -- 4 calls, all failed: still closed, the 5th reaches the backend
      assert.equal(200, get("/below/x").status)
      assert.equal(before + 5, hits(mock))
    end)

    it("opens at the failure rate: then 503 with Retry-After and JSON, the backend untouched",
       function()
      assert.equal(200, get("/rate/x").status)
      assert.equal(503, get("/rate/x?status=503").status) -- the mock's 503
      assert.equal(200, get("/rate/x").status)
      assert.equal(503, get("/rate/x?status=503").status) -- 4 calls, 2 failed: opens
      local before = hits(mock)
      for _ = 1, 5 do
        assert_open(get("/rate/x"), 60)
      end
      assert.equal(before, hits(mock))
      -- a route without the policy is not affected by anything
      assert.equal(200, get("/plain/x?status=200").status)
    end)

    it("slow calls open it (slow_ms, slow_rate)", function()
      assert.equal(200, get("/slow/x?delay_ms=150").status)
      assert.equal(200, get("/slow/x?delay_ms=150").status)
      local before = hits(mock)
      assert_open(get("/slow/x"))
      assert.equal(before, hits(mock))
    end)

    it("timeouts count as failures", function()
      assert.equal(504, get("/timeout/x?delay_ms=400").status)
      assert.equal(504, get("/timeout/x?delay_ms=400").status)
      assert_open(get("/timeout/x"))
    end)

    it("connect errors count as failures", function()
      assert.equal(502, get("/refused/x").status)
      assert.equal(502, get("/refused/x").status)
      assert_open(get("/refused/x"))
    end)

    it("half-open after open_ms: at most `probes` concurrent probes; close_after successes close it",
       function()
      assert.equal(500, get("/probes/x?status=500").status)
      assert.equal(500, get("/probes/x?status=500").status)
      assert_open(get("/probes/x"))
      socket.sleep(0.9) -- open_ms 800: half-open
      local before = hits(mock)
      local conns = {}
      for i = 1, 5 do
        conns[i] = assert(client.connect(gw.port))
        assert(conns[i]:request{ path = "/probes/x?delay_ms=300" })
      end
      local statuses = {}
      for i = 1, 5 do
        statuses[i] = assert(conns[i]:read_response()).status
        conns[i]:close()
      end
      table.sort(statuses)
      assert.same({ 200, 200, 503, 503, 503 }, statuses)
      assert.equal(before + 2, hits(mock))
      -- two successes closed it: one failure now does not reopen it (a
      -- failed probe would), and the next call passes
      assert.equal(500, get("/probes/x?status=500").status)
      assert.equal(200, get("/probes/x").status)
    end)

    it("a failed probe reopens it", function()
      assert.equal(500, get("/reopen/x?status=500").status)
      assert.equal(500, get("/reopen/x?status=500").status)
      assert_open(get("/reopen/x"))
      socket.sleep(0.35)
      assert.equal(500, get("/reopen/x?status=500").status) -- the probe fails
      local before = hits(mock)
      assert_open(get("/reopen/x"))
      assert.equal(before, hits(mock))
      socket.sleep(0.35)
      assert.equal(200, get("/reopen/x").status) -- the probe succeeds: closed
      assert.equal(200, get("/reopen/x").status)
    end)

    it("max_open_ms: each reopen lasts twice as long", function()
      assert.equal(500, get("/grow/x?status=500").status)
      assert.equal(500, get("/grow/x?status=500").status)
      socket.sleep(0.55) -- first opening: 500 ms
      assert.equal(500, get("/grow/x?status=500").status) -- reopened for 1000 ms
      local t0 = socket.gettime()
      socket.sleep(0.6)
      assert_open(get("/grow/x")) -- 600 ms later: would be half-open without growth
      local wait = 1.05 - (socket.gettime() - t0)
      if wait > 0 then
        socket.sleep(wait)
      end
      assert.equal(200, get("/grow/x").status)
    end)

    it("two targets: the open one is skipped, traffic goes to the healthy one", function()
      local before = hits(mock)
      local statuses = {}
      for i = 1, 20 do
        statuses[i] = get("/two/x").status
      end
      local n502 = 0
      for i = 1, 20 do
        if statuses[i] == 502 then
          n502 = n502 + 1
        else
          assert.equal(200, statuses[i])
        end
      end
      -- round robin sends every other call to the refused target until its
      -- breaker has seen min_requests (4) failures; then it is skipped
      assert.equal(4, n502, table.concat(statuses, " "))
      for i = 9, 20 do
        assert.equal(200, statuses[i], table.concat(statuses, " "))
      end
      assert.equal(before + 16, hits(mock))
    end)

    it("a client aborting a probe frees its slot", function()
      assert.equal(500, get("/abort/x?status=500").status)
      assert.equal(500, get("/abort/x?status=500").status)
      socket.sleep(1.55) -- open_ms 1500
      local a = assert(client.connect(gw.port))
      assert(a:request{ path = "/abort/x?delay_ms=2000" }) -- the only probe
      socket.sleep(0.1)
      assert_open(get("/abort/x"), 1) -- the probe slot is taken
      a.sock:setoption("linger", { on = true, timeout = 0 })
      a:close() -- a reset: the gateway drops the exchange
      -- well before the breaker's own recovery of lost probes (open_ms)
      local res = eventually(function()
        local r = get("/abort/x")
        return r.status == 200 and r
      end, 1)
      assert.is_truthy(res, "the aborted probe's slot never came back")
    end)

    it("failure_statuses: 429 counts, 500 does not", function()
      for _ = 1, 3 do
        assert.equal(500, get("/statuses/x?status=500").status)
      end
      assert.equal(429, get("/statuses/x?status=429").status) -- 1 of 4
      assert.equal(429, get("/statuses/x?status=429").status) -- 2 of 5
      assert.equal(429, get("/statuses/x?status=429").status) -- 3 of 6: opens
      assert_open(get("/statuses/x"))
    end)
  end)

  describe("over 2 workers", function()
    local gw, mock

    setup(function()
      mock = gateway.mock()
      local function route(id, policies)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = "u", strip_prefix = true,
                 policies = policies }
      end
      gw = gateway.start{
        workers = 2,
        node = { lua_path = { gateway.root .. "/spec/fixtures/policies-it" } },
        routes = {
          upstreams = { gateway.upstream("u", mock) },
          routes = {
            route("r", { { name = "it-limit", conf = {} }, -- X-Worker
                         { name = "circuit-breaker",
                           conf = { min_requests = 6, failure_rate = 1, open_ms = 60000 } } }),
            route("plain", gateway.array()),
          },
        },
      }
      assert(eventually(function() return client.get(gw.port, "/plain/x") end, 5), gw:log_tail())
    end)

    teardown(function()
      client.close_all()
      gateway.stop_all()
    end)

    it("the state is node-wide: 6 failures open it for every worker", function()
      for _ = 1, 6 do -- a new connection each time: spread over the workers
        local res = assert(client.get(gw.port, "/r/x?status=500", { Connection = "close" }))
        assert.equal(500, res.status)
      end
      local before = hits(mock)
      local workers = {}
      for _ = 1, 20 do
        local res = assert(client.get(gw.port, "/r/x", { Connection = "close" }))
        assert_open(res, 60)
        workers[res.headers["x-worker"]] = true
      end
      assert.is_true(workers["0"] and workers["1"], "both workers refused")
      assert.equal(before, hits(mock))
    end)
  end)
end)
