-- key-auth: API keys from a header or the query, looked up in the
-- consumers, on a real gateway. A probe policy (written to a temporary
-- lua_path directory) forwards ctx.consumer and ctx.tenant as headers, so
-- the mock's echo shows what key-auth set.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local policy_helper = require("helpers.policy")

local PROBE = [[
return {
  name = "probe-consumer",
  priority = 10,
  access = function(_, ctx)
    if ctx.consumer then
      ctx.req:set_header("X-Probe-Consumer", ctx.consumer.id)
    end
    if ctx.tenant then
      ctx.req:set_header("X-Probe-Tenant", ctx.tenant)
    end
  end,
}
]]

local function validate(conf)
  return policy_helper.validate("key-auth", conf)
end

local trap = policy_helper.trap

local function echo_of(res)
  assert.equal(200, res.status, res.body)
  return cjson.decode(res.body)
end

local function values(echo, name)
  local out = {}
  for _, h in ipairs(echo.header_list) do
    if h[1]:lower() == name:lower() then
      out[#out + 1] = h[2]
    end
  end
  return out
end

describe("key-auth", function()
  describe("schema", function()
    it("fills the defaults", function()
      assert.same({ header = "apikey", query_param = "apikey", key_in_header = true,
                    key_in_query = true, hide_credentials = true }, validate({}))
    end)

    it("refuses turning both sources off, a bad header name, unknown fields", function()
      local _, err = validate({ key_in_header = false, key_in_query = false })
      assert.matches("conf: key_in_header and key_in_query cannot both be false", err)
      _, err = validate({ header = "api key" })
      assert.matches("conf%.header: does not match pattern", err)
      _, err = validate({ key_names = { "apikey" } })
      assert.matches("conf%.key_names: unknown field", err)
    end)
  end)

  describe("on a gateway", function()
    local gw, tr, dir

    before_each(function()
      local mock = gateway.mock()
      tr = trap()
      dir = proc.tmpdir()
      proc.write_file(dir .. "/probe-consumer.lua", PROBE)
      local function route(id, conf, upstream)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream or "m", strip_prefix = true,
                 policies = { { name = "key-auth", conf = conf }, { name = "probe-consumer" } } }
      end
      gw = gateway.start{
        node = { lua_path = { dir } },
        routes = {
          upstreams = { gateway.upstream("m", mock), gateway.upstream("trap", tr.port) },
          consumers = {
            { id = "alice", tenant = "acme", credentials = { ["key-auth"] = { key = "alice-key" } } },
            { id = "bob", credentials = { ["key-auth"] = { key = { "bob-1", "bob-2" } } } },
            { id = "carol", tenant = "initech", credentials = { ["key-auth"] = { key = "a+b c" } } },
          },
          routes = {
            route("default", {}),
            route("trapped", {}, "trap"),
            route("keep", { hide_credentials = false }),
            route("custom", { header = "X-Api-Key", query_param = "token" }),
            route("header-only", { key_in_query = false }),
            route("query-only", { key_in_header = false }),
          },
        },
      }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
      tr.close()
      proc.cleanup(dir)
    end)

    it("a known key in the apikey header: the consumer and tenant are set, the key is not forwarded",
       function()
      local echo = echo_of(client.get(gw.port, "/default/x", { apikey = "alice-key" }))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.same({ "acme" }, values(echo, "X-Probe-Tenant"))
      assert.same({}, values(echo, "apikey"))
      assert.equal("/x", echo.path)
    end)

    it("a consumer without a tenant: ctx.tenant stays unset", function()
      local echo = echo_of(client.get(gw.port, "/default/x", { apikey = "bob-1" }))
      assert.same({ "bob" }, values(echo, "X-Probe-Consumer"))
      assert.same({}, values(echo, "X-Probe-Tenant"))
    end)

    it("any key of a consumer's list works", function()
      local echo = echo_of(client.get(gw.port, "/default/x", { apikey = "bob-2" }))
      assert.same({ "bob" }, values(echo, "X-Probe-Consumer"))
    end)

    it("a key in the query: removed from the query, the rest and the stripped path kept as sent",
       function()
      local echo = echo_of(client.get(gw.port, "/default/a/b?x=1&apikey=alice-key&y=%20z&apikey2=v"))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.equal("/a/b", echo.path)
      assert.equal("x=1&y=%20z&apikey2=v", echo.query)
    end)

    it("a query holding only the key leaves none", function()
      local echo = echo_of(client.get(gw.port, "/default/a?apikey=alice-key"))
      assert.equal("/a", echo.path)
      assert.equal("", echo.query)
    end)

    it("a percent-encoded parameter name is the same parameter, and is removed too", function()
      local echo = echo_of(client.get(gw.port, "/default/x?a=1&api%6Bey=alice-key"))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.equal("a=1", echo.query)
    end)

    it("a percent-encoded key in the query is decoded before the lookup", function()
      local echo = echo_of(client.get(gw.port, "/default/x?apikey=a%2Bb+c"))
      assert.same({ "carol" }, values(echo, "X-Probe-Consumer"))
      assert.same({ "initech" }, values(echo, "X-Probe-Tenant"))
    end)

    it("the header wins over the query; both are removed", function()
      local echo = echo_of(client.get(gw.port, "/default/x?apikey=wrong&q=1", { apikey = "alice-key" }))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.same({}, values(echo, "apikey"))
      assert.equal("q=1", echo.query)
    end)

    it("hide_credentials = false forwards the header and the query parameter", function()
      local echo = echo_of(client.get(gw.port, "/keep/x", { apikey = "alice-key" }))
      assert.same({ "alice-key" }, values(echo, "apikey"))
      echo = echo_of(client.get(gw.port, "/keep/x?apikey=alice-key"))
      assert.equal("apikey=alice-key", echo.query)
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
    end)

    it("no key: 401 JSON with WWW-Authenticate, and the upstream is never contacted", function()
      local res = assert(client.get(gw.port, "/trapped/x"))
      assert.equal(401, res.status)
      assert.matches("^application/json", res.headers["content-type"])
      assert.same({ error = "no API key found in request" }, cjson.decode(res.body))
      assert.equal('Key realm="moongate"', res.headers["www-authenticate"])
      assert.is_false(tr.connected())
    end)

    it("an unknown key: 401 invalid API key", function()
      local res = assert(client.get(gw.port, "/trapped/x", { apikey = "nobody" }))
      assert.equal(401, res.status)
      assert.same({ error = "invalid API key" }, cjson.decode(res.body))
      assert.equal('Key realm="moongate"', res.headers["www-authenticate"])
      assert.is_false(tr.connected())
    end)

    it("an empty key or a bare ?apikey is a missing key", function()
      local res = assert(client.get(gw.port, "/default/x", { apikey = "" }))
      assert.equal(401, res.status)
      assert.same({ error = "no API key found in request" }, cjson.decode(res.body))
      res = assert(client.get(gw.port, "/default/x?apikey"))
      assert.equal(401, res.status)
      assert.same({ error = "no API key found in request" }, cjson.decode(res.body))
    end)

    it("a key given twice is refused, even when one of them is valid", function()
      local res = assert(client.get(gw.port, "/default/x?apikey=alice-key&apikey=nobody"))
      assert.equal(401, res.status)
      res = assert(client.get(gw.port, "/default/x", { { "apikey", "alice-key" }, { "apikey", "bob-1" } }))
      assert.equal(401, res.status)
    end)

    it("a configured header and query parameter replace apikey", function()
      local echo = echo_of(client.get(gw.port, "/custom/x", { ["X-Api-Key"] = "alice-key" }))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.same({}, values(echo, "X-Api-Key"))
      echo = echo_of(client.get(gw.port, "/custom/x?token=alice-key&apikey=alice-key"))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      assert.equal("apikey=alice-key", echo.query)
      assert.equal(401, assert(client.get(gw.port, "/custom/x", { apikey = "alice-key" })).status)
    end)

    it("key_in_query = false ignores the query; key_in_header = false ignores the header", function()
      assert.equal(401, assert(client.get(gw.port, "/header-only/x?apikey=alice-key")).status)
      assert.equal(200, assert(client.get(gw.port, "/header-only/x", { apikey = "alice-key" })).status)
      assert.equal(401, assert(client.get(gw.port, "/query-only/x", { apikey = "alice-key" })).status)
      local echo = echo_of(client.get(gw.port, "/query-only/x?apikey=alice-key", { apikey = "kept" }))
      assert.same({ "alice" }, values(echo, "X-Probe-Consumer"))
      -- the header is not this route's credential: it is forwarded untouched
      assert.same({ "kept" }, values(echo, "apikey"))
    end)
  end)
end)
