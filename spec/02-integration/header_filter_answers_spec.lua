-- header_filter and body_filter run on every response of a route, not only
-- proxied ones: a policy's own answer (`return status, body`), the 500 of a
-- policy that raised, the gateway's errors after routing (502 refused,
-- 504). A filter that raises on such an answer gives one 500, no loop. A
-- request that matched no route has no route policies to run.
local cjson = require("cjson")
local gateway = require("helpers.gateway")
local client = require("helpers.client")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local ROOT = gateway.root

local count = proc.count

describe("filters on answers made at the gateway", function()
  local gw

  before_each(function()
    local rh = { name = "response-headers", conf = { set = { ["X-Route"] = "$route" } } }
    local function route(id, upstream, policies)
      return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream, strip_prefix = true,
               policies = policies }
    end
    gw = gateway.start({
      node = { lua_path = { ROOT .. "/spec/fixtures/policies-hf", ROOT .. "/spec/fixtures/policies-bf" } },
      routes = {
        upstreams = { gateway.upstream("m", gateway.mock()), gateway.upstream("down", ports.free()),
                      { id = "slow", targets = { { host = "127.0.0.1", port = gateway.mock().port } },
                        timeouts = { connect_ms = 1000, send_ms = 1000, read_ms = 300 } } },
        consumers = { { id = "alice", credentials = { ["key-auth"] = { key = "k" } } } },
        routes = {
          route("auth", "m", { rh, { name = "key-auth", conf = {} } }),
          route("down", "down", { rh, { name = "hf-status" } }),
          route("slow", "slow", { rh }),
          route("static", nil, { { name = "static-response", conf = { status = 200, body = "made" } },
                                 { name = "bf-upper", conf = { trailer = "!" } }, rh }),
          route("boom-auth", "m", { { name = "key-auth", conf = {} }, { name = "hf-raise" } }),
          route("boom-down", "down", { { name = "hf-raise" } }),
        },
      },
    })
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
  end)

  it("a policy's refusal (key-auth's 401) goes through header_filter", function()
    local res = assert(client.get(gw.port, "/auth/x"))
    assert.equal(401, res.status)
    assert.equal("auth", res.headers["x-route"])
  end)

  it("the gateway's 502 (upstream refused) goes through header_filter, which may change its status",
     function()
    local res = assert(client.get(gw.port, "/down/x"))
    assert.equal(503, res.status)
    assert.equal("502", res.headers["x-seen-status"])
    assert.equal("down", res.headers["x-route"])
    local body = cjson.decode(res.body) -- the gateway's JSON error, with the request id
    assert.equal(res.headers["x-request-id"], body.request_id)
  end)

  it("the gateway's 504 (upstream read timeout) goes through header_filter", function()
    local res = assert(client.get(gw.port, "/slow/x?delay_ms=2000"))
    assert.equal(504, res.status)
    assert.equal("slow", res.headers["x-route"])
  end)

  it("a policy's answer goes through header_filter and body_filter, sent with its new length",
     function()
    local res = assert(client.get(gw.port, "/static/x"))
    assert.equal(200, res.status)
    assert.equal("MADE!", res.body)
    assert.equal("5", res.headers["content-length"])
    assert.equal("static", res.headers["x-route"])
  end)

  it("a header_filter raising on a policy's answer gives one 500 and no loop", function()
    local res = assert(client.get(gw.port, "/boom-auth/x"))
    assert.equal(500, res.status)
    assert.equal("internal error", cjson.decode(res.body).error)
    local rid = res.headers["x-request-id"]
    assert.equal(1, count(gw:log(), "hf-raise saw 401 for " .. rid))
    -- the worker keeps serving
    assert.equal(401, assert(client.get(gw.port, "/auth/x")).status)
  end)

  it("a header_filter raising on the gateway's 502 gives one 500 and no loop", function()
    local res = assert(client.get(gw.port, "/boom-down/x"))
    assert.equal(500, res.status)
    local rid = res.headers["x-request-id"]
    assert.equal(1, count(gw:log(), "hf-raise saw 502 for " .. rid))
    res = assert(client.get(gw.port, "/auth/x"))
    assert.equal(401, res.status)
  end)

  it("a request that matched no route runs no route policy", function()
    local res = assert(client.get(gw.port, "/nosuch/x"))
    assert.equal(404, res.status)
    assert.is_nil(res.headers["x-route"])
  end)
end)
