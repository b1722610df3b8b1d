-- redirect: Location and status of the gateway's answer, on a real
-- gateway; nothing is forwarded (a trap upstream tells).
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local policy_helper = require("helpers.policy")

local function validate(conf)
  return policy_helper.validate("redirect", conf)
end

local trap = policy_helper.trap

describe("redirect", function()
  describe("schema", function()
    it("needs `to`; fills status and keep_query", function()
      local _, err = validate({})
      assert.matches("conf%.to: required field missing", err)
      assert.same({ to = "/new", status = 302, keep_query = false }, validate({ to = "/new" }))
    end)

    it("refuses other statuses and targets that are neither a URL nor a path", function()
      local _, err = validate({ to = "/new", status = 200 })
      assert.matches("conf%.status: must be one of: 301, 302, 303, 307, 308", err)
      for _, bad in ipairs({ "new", "//evil.example.com/x", "https://", "/a b", "/a\r\nX: y", "" }) do
        _, err = validate({ to = bad })
        assert.is_truthy(err, bad)
        assert.matches("conf%.to: must", err)
      end
    end)
  end)

  describe("on a gateway", function()
    local gw, tr

    before_each(function()
      tr = trap()
      local function route(id, conf)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = "trap",
                 policies = { { name = "redirect", conf = conf } } }
      end
      gw = gateway.start{ routes = {
        upstreams = { gateway.upstream("trap", tr.port) },
        routes = {
          route("moved", { to = "https://new.example.com/docs", status = 301 }),
          route("path", { to = "/v2/home" }),
          route("keep", { to = "https://new.example.com/search", status = 308, keep_query = true }),
          route("keepmore", { to = "/s?lang=en#top", status = 307, keep_query = true }),
        },
      } }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
      tr.close()
    end)

    it("301 to a URL, no body, the upstream never contacted; the query is dropped", function()
      local res = assert(client.get(gw.port, "/moved/anything?q=1"))
      assert.equal(301, res.status)
      assert.equal("https://new.example.com/docs", res.headers["location"])
      assert.equal("", res.body)
      assert.equal("0", res.headers["content-length"])
      assert.is_false(tr.connected())
    end)

    it("302 (the default) to a path", function()
      local res = assert(client.get(gw.port, "/path/x"))
      assert.equal(302, res.status)
      assert.equal("/v2/home", res.headers["location"])
    end)

    it("keep_query appends the query as sent", function()
      local res = assert(client.request(gw.port, { method = "POST", path = "/keep/x?q=a%20b&page=2",
                                                   body = "data" }))
      assert.equal(308, res.status)
      assert.equal("https://new.example.com/search?q=a%20b&page=2", res.headers["location"])
      res = assert(client.get(gw.port, "/keep/x"))
      assert.equal("https://new.example.com/search", res.headers["location"])
    end)

    it("keep_query joins a target's own query with & and keeps its fragment last", function()
      local res = assert(client.get(gw.port, "/keepmore/x?q=1"))
      assert.equal(307, res.status)
      assert.equal("/s?lang=en&q=1#top", res.headers["location"])
    end)
  end)
end)
