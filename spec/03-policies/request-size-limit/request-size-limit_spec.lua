-- request-size-limit: a route's body limit, on a real gateway: a
-- Content-Length above it is refused before the upstream is contacted
-- (a trap upstream tells), a chunked body is cut once it grows past it.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local policy_helper = require("helpers.policy")

local function validate(conf)
  return policy_helper.validate("request-size-limit", conf)
end

local trap = policy_helper.trap

describe("request-size-limit", function()
  describe("schema", function()
    it("takes bytes or a size with k, m or g", function()
      assert.same({ max_bytes = 100 }, validate({ max_bytes = 100 }))
      assert.same({ max_bytes = "64k" }, validate({ max_bytes = "64k" }))
      assert.same({ max_bytes = "1G" }, validate({ max_bytes = "1G" }))
    end)

    it("needs max_bytes and refuses what is not a size", function()
      local _, err = validate({})
      assert.matches("conf%.max_bytes: required field missing", err)
      for _, bad in ipairs({ "1x", "1.5m", "-1", "k" }) do
        _, err = validate({ max_bytes = bad })
        assert.matches("conf%.max_bytes", err)
      end
      _, err = validate({ max_bytes = -1 })
      assert.matches("conf%.max_bytes", err)
      _, err = validate({ max_bytes = 1.5 })
      assert.matches("conf%.max_bytes", err)
    end)
  end)

  describe("on a gateway", function()
    local gw, tr

    before_each(function()
      local mock = gateway.mock()
      tr = trap()
      local function route(id, upstream, max)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream, strip_prefix = true,
                 policies = max and { { name = "request-size-limit", conf = { max_bytes = max } } } or {} }
      end
      gw = gateway.start{
        node = { limits = { max_body_bytes = 4096 } },
        routes = {
          upstreams = { gateway.upstream("m", mock), gateway.upstream("trap", tr.port) },
          routes = {
            route("small", "m", 1000),
            route("trapped", "trap", 1000),
            route("kib", "m", "1k"),
            route("zero", "m", 0),
            route("huge", "m", "1m"),
            route("none", "m", nil),
          },
        },
      }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
      tr.close()
    end)

    local function post(path, n, chunked)
      return assert(client.request(gw.port, { method = "POST", path = path,
                                              body = client.pattern(0, n), chunked = chunked }))
    end

    it("a Content-Length at the limit passes whole", function()
      local res = post("/small/x", 1000)
      assert.equal(200, res.status, res.body)
      local echo = cjson.decode(res.body)
      assert.equal(1000, echo.body_length)
      assert.equal(client.pattern_sha256(1000), echo.body_sha256)
    end)

    it("a Content-Length above it: 413 JSON, and the upstream is never contacted", function()
      local res = post("/trapped/x", 1001)
      assert.equal(413, res.status)
      assert.matches("^application/json", res.headers["content-type"])
      assert.same({ error = "request body too large" }, cjson.decode(res.body))
      assert.is_false(tr.connected())
    end)

    it("a chunked body under the limit passes whole", function()
      local res = post("/small/x", 900, { client.pattern(0, 500), client.pattern(500, 400) })
      assert.equal(200, res.status, res.body)
      local echo = cjson.decode(res.body)
      assert.equal(900, echo.body_length)
      assert.equal(client.pattern_sha256(900), echo.body_sha256)
    end)

    it("a chunked body that grows past the limit gets 413", function()
      local chunks = {}
      for i = 0, 5 do
        chunks[#chunks + 1] = client.pattern(i * 300, 300)
      end
      local res = post("/small/x", 1800, chunks)
      assert.equal(413, res.status)
    end)

    it("sizes with units: 1k is 1024 bytes", function()
      assert.equal(200, post("/kib/x", 1024).status)
      assert.equal(413, post("/kib/x", 1025).status)
    end)

    it("0 refuses any body and lets bodiless requests through", function()
      assert.equal(413, post("/zero/x", 1).status)
      assert.equal(200, assert(client.get(gw.port, "/zero/x")).status)
    end)

    it("is per route: a route without it takes the node's limit", function()
      assert.equal(200, post("/none/x", 3000).status)
      assert.equal(413, post("/small/x", 3000).status)
    end)

    it("never raises the node's limit", function()
      assert.equal(413, post("/huge/x", 5000).status)
      assert.equal(413, post("/huge/x", 5000, true).status)
    end)
  end)
end)
