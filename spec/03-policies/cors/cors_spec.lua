-- cors: preflights answered at the gateway, CORS headers on actual
-- requests, on a real gateway; a trap upstream proves a preflight never
-- leaves the gateway.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local policy_helper = require("helpers.policy")

local APP = "https://app.example.com"
local EVIL = "https://evil.example.net"

local function validate(conf)
  return policy_helper.validate("cors", conf)
end

local trap = policy_helper.trap

local function values(res, name)
  local out = {}
  for _, h in ipairs(res.header_list) do
    if h[1]:lower() == name:lower() then
      out[#out + 1] = h[2]
    end
  end
  return out
end

-- the Access-Control-* headers of a response, as a table
local function cors_headers(res)
  local t = {}
  for _, h in ipairs(res.header_list) do
    local n = h[1]:lower()
    if n:find("^access%-control%-") then
      t[n] = h[2]
    end
  end
  return t
end

local function preflight(port, path, origin, extra)
  local headers = { Origin = origin, ["Access-Control-Request-Method"] = "PUT" }
  for k, v in pairs(extra or {}) do
    headers[k] = v
  end
  return assert(client.request(port, { method = "OPTIONS", path = path, headers = headers }))
end

describe("cors", function()
  describe("schema", function()
    it("fills the defaults", function()
      assert.same({
        origins = { "*" },
        methods = { "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS" },
        expose_headers = {},
        credentials = false,
        max_age = 5,
      }, validate({}))
    end)

    it("refuses an origin with a path, and unknown fields", function()
      local _, err = validate({ origins = { "https://app.example.com/" } })
      assert.matches("conf%.origins%[0%]: must be", err)
      _, err = validate({ allow_origins = "*" })
      assert.matches("conf%.allow_origins: unknown field", err)
    end)

    it("refuses a negative max_age", function()
      local _, err = validate({ max_age = -1 })
      assert.matches("conf%.max_age: must be >= 0", err)
    end)
  end)

  describe("on a gateway", function()
    local gw, tr

    before_each(function()
      local mock = gateway.mock()
      tr = trap()
      local function route(id, upstream, conf, more)
        local policies = { { name = "cors", conf = conf } }
        for _, p in ipairs(more or {}) do
          policies[#policies + 1] = p
        end
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream, strip_prefix = true,
                 policies = policies }
      end
      local listed = { origins = { APP, "https://other.example.com" },
                       expose_headers = { "X-Total", "X-Page" }, max_age = 600 }
      gw = gateway.start{ routes = {
        upstreams = { gateway.upstream("m", mock), gateway.upstream("trap", tr.port),
                      gateway.upstream("down", ports.free()) },
        consumers = gateway.array(),
        routes = {
          route("listed", "m", listed),
          route("trapped", "trap", listed),
          route("fixed", "m", { origins = { APP }, headers = { "Content-Type", "X-Api" },
                                methods = { "GET", "POST" } }),
          route("any", "m", {}),
          route("anycred", "m", { credentials = true }),
          route("cred", "m", { origins = { APP }, credentials = true }),
          route("auth", "m", { origins = { APP } }, { { name = "key-auth", conf = {} } }),
          route("down", "down", { origins = { APP } }),
        },
      } }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
      tr.close()
    end)

    describe("preflight", function()
      it("from an allowed origin: 204 at the gateway with the CORS answer; the upstream sees nothing",
         function()
        local res = preflight(gw.port, "/trapped/items", APP,
                              { ["Access-Control-Request-Headers"] = "X-Custom, Content-Type" })
        assert.equal(204, res.status)
        assert.equal("", res.body)
        assert.same({
          ["access-control-allow-origin"] = APP,
          ["access-control-allow-methods"] = "GET, HEAD, PUT, PATCH, POST, DELETE, OPTIONS",
          ["access-control-allow-headers"] = "X-Custom, Content-Type",
          ["access-control-max-age"] = "600",
        }, cors_headers(res))
        assert.same({ "Origin", "Access-Control-Request-Headers" }, values(res, "Vary"))
        assert.is_false(tr.connected())
      end)

      it("with configured headers and methods: those, not the request's", function()
        local res = preflight(gw.port, "/fixed/items", APP,
                              { ["Access-Control-Request-Headers"] = "X-Other" })
        assert.equal(204, res.status)
        assert.equal("Content-Type, X-Api", res.headers["access-control-allow-headers"])
        assert.equal("GET, POST", res.headers["access-control-allow-methods"])
        assert.equal("5", res.headers["access-control-max-age"]) -- the default
        assert.same({ "Origin" }, values(res, "Vary"))
      end)

      it("from another origin: still answered 204 at the gateway, with no CORS headers", function()
        local res = preflight(gw.port, "/trapped/items", EVIL)
        assert.equal(204, res.status)
        assert.same({}, cors_headers(res))
        assert.same({ "Origin" }, values(res, "Vary"))
        assert.is_false(tr.connected())
      end)

      it("with credentials: Allow-Credentials and the origin echoed", function()
        local res = preflight(gw.port, "/cred/items", APP)
        assert.equal(204, res.status)
        assert.equal(APP, res.headers["access-control-allow-origin"])
        assert.equal("true", res.headers["access-control-allow-credentials"])
      end)

      it("an OPTIONS without Access-Control-Request-Method is an actual request: proxied", function()
        local res = assert(client.request(gw.port, { method = "OPTIONS", path = "/listed/items",
                                                     headers = { Origin = APP } }))
        assert.equal(200, res.status)
        assert.equal("OPTIONS", cjson.decode(res.body).method)
        assert.equal(APP, res.headers["access-control-allow-origin"])
      end)
    end)

    describe("actual requests", function()
      it("from an allowed origin: proxied, with Allow-Origin, Expose-Headers and Vary", function()
        local res = assert(client.get(gw.port, "/listed/items", { Origin = APP }))
        assert.equal(200, res.status)
        local echo = cjson.decode(res.body)
        assert.equal("/items", echo.path)
        assert.equal(APP, echo.headers.origin)
        assert.same({
          ["access-control-allow-origin"] = APP,
          ["access-control-expose-headers"] = "X-Total, X-Page",
        }, cors_headers(res))
        assert.same({ "Origin" }, values(res, "Vary"))
      end)

      it("from another origin: proxied, without CORS headers", function()
        local res = assert(client.get(gw.port, "/listed/items", { Origin = EVIL }))
        assert.equal(200, res.status)
        assert.same({}, cors_headers(res))
      end)

      it("without an Origin: no CORS headers and no Vary", function()
        local res = assert(client.get(gw.port, "/listed/items"))
        assert.equal(200, res.status)
        assert.same({}, cors_headers(res))
        assert.same({}, values(res, "Vary"))
      end)

      it('"*" without credentials: Allow-Origin "*" and no Vary: Origin', function()
        local res = assert(client.get(gw.port, "/any/items", { Origin = EVIL }))
        assert.equal("*", res.headers["access-control-allow-origin"])
        assert.is_nil(res.headers["access-control-allow-credentials"])
        assert.same({}, values(res, "Vary"))
      end)

      it('"*" with credentials: the origin echoed, never "*"', function()
        local res = assert(client.get(gw.port, "/anycred/items", { Origin = EVIL }))
        assert.equal(EVIL, res.headers["access-control-allow-origin"])
        assert.equal("true", res.headers["access-control-allow-credentials"])
        assert.same({ "Origin" }, values(res, "Vary"))
        res = preflight(gw.port, "/anycred/items", APP)
        assert.equal(APP, res.headers["access-control-allow-origin"])
      end)

      it("replace the upstream's CORS headers and keep its Vary", function()
        local res = assert(client.get(gw.port,
          "/listed/items?header=Access-Control-Allow-Origin:*&header=Vary:Accept-Encoding",
          { Origin = APP }))
        assert.same({ APP }, values(res, "Access-Control-Allow-Origin"))
        assert.same({ "Accept-Encoding", "Origin" }, values(res, "Vary"))
      end)

      it("reach a later policy's 401, so the browser can read it", function()
        local res = assert(client.get(gw.port, "/auth/items", { Origin = APP }))
        assert.equal(401, res.status)
        assert.equal(APP, res.headers["access-control-allow-origin"])
        -- and the preflight is answered before key-auth asks for a key
        res = preflight(gw.port, "/auth/items", APP)
        assert.equal(204, res.status)
      end)

      it("reach the gateway's own 502", function()
        local res = assert(client.get(gw.port, "/down/items", { Origin = APP }))
        assert.equal(502, res.status)
        assert.equal(APP, res.headers["access-control-allow-origin"])
      end)
    end)
  end)
end)
