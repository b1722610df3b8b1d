-- static-response: answers made at the gateway, on a real gateway; a trap
-- upstream proves nothing is forwarded.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local policy_helper = require("helpers.policy")

local function validate(conf)
  return policy_helper.validate("static-response", conf)
end

local trap = policy_helper.trap

describe("static-response", function()
  describe("schema", function()
    it("fills the defaults", function()
      assert.same({ status = 200, headers = {}, body = "" }, validate({}))
    end)

    it("refuses a status out of range, a body on 204/304, framing headers", function()
      local _, err = validate({ status = 101 })
      assert.matches("conf%.status: must be >= 200", err)
      _, err = validate({ status = 204, body = "x" })
      assert.matches("conf: a 204 answer has no body", err)
      _, err = validate({ status = 304, body = { a = 1 } })
      assert.matches("conf: a 304 answer has no body", err)
      _, err = validate({ headers = { ["Content-Length"] = "3" } })
      assert.matches("conf%.headers: Content%-Length is set by the gateway", err)
      _, err = validate({ body = 3 })
      assert.matches("conf%.body: expected string or object or array, got number", err)
    end)
  end)

  describe("on a gateway", function()
    local gw, tr

    before_each(function()
      tr = trap()
      local function route(id, conf, upstream)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream,
                 policies = { { name = "static-response", conf = conf } } }
      end
      gw = gateway.start{ routes = {
        upstreams = { gateway.upstream("trap", tr.port) },
        routes = {
          route("json", { body = { users = { "alice" }, total = 1 } }, "trap"),
          route("array", { status = 202, body = { 1, 2, 3 } }),
          route("html", { status = 503, body = "<h1>down</h1>",
                          headers = { ["Content-Type"] = "text/html", ["Retry-After"] = "120",
                                      ["X-Request"] = "$request_id", ["X-Route"] = "$route" } }),
          route("text", { body = "pong" }),
          route("empty", { status = 204 }),
          route("default", {}),
        },
      } }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
      tr.close()
    end)

    it("a JSON object body: 200 application/json, and the upstream is never contacted", function()
      local res = assert(client.get(gw.port, "/json/x"))
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      assert.same({ users = { "alice" }, total = 1 }, cjson.decode(res.body))
      assert.equal(tostring(#res.body), res.headers["content-length"])
      assert.is_false(tr.connected())
    end)

    it("a JSON array body with its status, on a route without an upstream", function()
      local res = assert(client.get(gw.port, "/array/x"))
      assert.equal(202, res.status)
      assert.equal("[1,2,3]", res.body)
      assert.equal("application/json", res.headers["content-type"])
    end)

    it("a string body with its own Content-Type, headers and variables", function()
      local res = assert(client.get(gw.port, "/html/x"))
      assert.equal(503, res.status)
      assert.equal("<h1>down</h1>", res.body)
      assert.same({ "text/html" }, { res.headers["content-type"] })
      assert.equal("120", res.headers["retry-after"])
      assert.equal("html", res.headers["x-route"])
      assert.is_truthy(res.headers["x-request-id"])
      assert.equal(res.headers["x-request-id"], res.headers["x-request"])
    end)

    it("a string body without a Content-Type is text/plain", function()
      local res = assert(client.get(gw.port, "/text/x"))
      assert.equal(200, res.status)
      assert.equal("pong", res.body)
      assert.equal("text/plain; charset=utf-8", res.headers["content-type"])
    end)

    it("204 and the empty default have no body and no Content-Type", function()
      local res = assert(client.get(gw.port, "/empty/x"))
      assert.equal(204, res.status)
      assert.equal("", res.body)
      assert.is_nil(res.headers["content-type"])
      res = assert(client.get(gw.port, "/default/x"))
      assert.equal(200, res.status)
      assert.equal("", res.body)
      assert.equal("0", res.headers["content-length"])
      assert.is_nil(res.headers["content-type"])
    end)

    it("answers any method, and the connection serves the next request", function()
      local c = assert(client.connect(gw.port))
      assert(c:request({ method = "POST", path = "/text/x", body = string.rep("b", 5000) }))
      local res = assert(c:read_response())
      assert.equal(200, res.status)
      assert.equal("pong", res.body)
      assert(c:request({ method = "HEAD", path = "/json/x" }))
      res = assert(c:read_response())
      assert.equal(200, res.status)
      assert(c:request({ path = "/array/x" }))
      res = assert(c:read_response())
      assert.equal(202, res.status)
      assert.equal("[1,2,3]", res.body)
    end)
  end)
end)
