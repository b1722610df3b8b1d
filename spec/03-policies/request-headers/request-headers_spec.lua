-- request-headers: what the upstream (the mock) receives, on a real gateway.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local policy_helper = require("helpers.policy")

-- the conf as the config validator leaves it, or nil, errors
local function validate(conf)
  return policy_helper.validate("request-headers", conf)
end

local function echo_of(res)
  assert.equal(200, res.status, res.body)
  return cjson.decode(res.body)
end

-- every value the mock received under name, in order
local function values(echo, name)
  local out = {}
  for _, h in ipairs(echo.header_list) do
    if h[1]:lower() == name:lower() then
      out[#out + 1] = h[2]
    end
  end
  return out
end

describe("request-headers", function()
  describe("schema", function()
    it("fills empty remove, set and add", function()
      assert.same({ remove = {}, set = {}, add = {} }, validate({}))
    end)

    it("refuses an unknown field", function()
      local _, err = validate({ sett = {} })
      assert.matches("routes%[0%]%.policies%[0%]%.conf%.sett: unknown field", err)
    end)

    it("refuses an unknown variable, naming it", function()
      local _, err = validate({ set = { ["X-A"] = "$consumer_id" } })
      assert.matches('conf%.set%["X%-A"%]: unknown variable %$consumer_id', err)
    end)

    it("refuses headers the gateway frames or appends to", function()
      local _, err = validate({ set = { ["Content-Length"] = "3" } })
      assert.matches("conf%.set: Content%-Length is set by the gateway", err)
      _, err = validate({ add = { Connection = "close" } })
      assert.matches("conf%.add: Connection is set by the gateway", err)
      _, err = validate({ set = { ["X-Forwarded-For"] = "1.2.3.4" } })
      assert.matches("conf%.set: X%-Forwarded%-For is appended to by the gateway", err)
    end)

    it("refuses control characters in values and bad names", function()
      local _, err = validate({ set = { ["X-A"] = "a\r\nX-Evil: 1" } })
      assert.matches('conf%.set%["X%-A"%]: control characters', err)
      _, err = validate({ remove = { "X A" } })
      assert.matches("conf%.remove%[0%]: invalid header name", err)
    end)

    it("refuses the same header twice in one map (names are case-insensitive)", function()
      local _, err = validate({ set = { ["X-A"] = "1", ["x-a"] = "2" } })
      assert.matches("given twice", err)
    end)
  end)

  describe("on a gateway", function()
    local gw

    before_each(function()
      local mock = gateway.mock()
      local function route(id, conf, extra)
        local r = { id = id, paths = { "/" .. id .. "/*" }, upstream = "m", strip_prefix = true,
                    policies = { { name = "request-headers", conf = conf } } }
        for _, p in ipairs(extra or {}) do
          table.insert(r.policies, p)
        end
        return r
      end
      gw = gateway.start{ routes = {
        upstreams = { gateway.upstream("m", mock) },
        consumers = { { id = "alice", tenant = "acme",
                        credentials = { ["key-auth"] = { key = "alice-key" } } } },
        routes = {
          route("edit", {
            remove = { "X-Drop" },
            set = { ["X-Set"] = "gateway", ["X-Replace"] = "new" },
            add = { ["X-Add"] = "added", ["X-Many"] = { "one", "two" } },
          }),
          route("vars", { set = {
            ["X-Addr"] = "$remote_addr", ["X-Rid"] = "$request_id", ["X-Route"] = "$route",
            ["X-Braced"] = "${route}suffix", ["X-Mixed"] = "route=$route; addr=$remote_addr",
            ["X-Dollar"] = "costs 5$ or $$", ["X-Price"] = "$5 off on $route, $",
            ["X-Consumer"] = "$consumer",
          } }),
          route("auth", { set = { ["X-Consumer"] = "$consumer" }, add = { ["X-Who"] = "$consumer" } },
                { { name = "key-auth", conf = {} } }),
          route("xff", { remove = { "X-Forwarded-For" } }),
        },
      } }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
    end)

    it("set replaces the client's value, remove drops the client's header", function()
      local echo = echo_of(client.get(gw.port, "/edit/x",
                                      { ["X-Replace"] = "old", ["X-Drop"] = "secret", ["X-Keep"] = "k" }))
      assert.same({ "gateway" }, values(echo, "X-Set"))
      assert.same({ "new" }, values(echo, "X-Replace"))
      assert.same({}, values(echo, "X-Drop"))
      assert.same({ "k" }, values(echo, "X-Keep"))
    end)

    it("add keeps the client's values and adds each listed value", function()
      local echo = echo_of(client.get(gw.port, "/edit/x", { { "X-Add", "client" }, { "X-Many", "zero" } }))
      assert.same({ "client", "added" }, values(echo, "X-Add"))
      assert.same({ "zero", "one", "two" }, values(echo, "X-Many"))
    end)

    it("renders $remote_addr, $request_id, $route and ${route}", function()
      local res = client.get(gw.port, "/vars/x")
      local echo = echo_of(res)
      assert.same({ "127.0.0.1" }, values(echo, "X-Addr"))
      local rid = res.headers["x-request-id"]
      assert.is_truthy(rid)
      assert.same({ rid }, values(echo, "X-Rid"))
      assert.same({ rid }, values(echo, "X-Request-Id"))
      assert.same({ "vars" }, values(echo, "X-Route"))
      assert.same({ "varssuffix" }, values(echo, "X-Braced"))
      assert.same({ "route=vars; addr=127.0.0.1" }, values(echo, "X-Mixed"))
    end)

    it("renders per request: two requests get their own request ids", function()
      local a = echo_of(client.get(gw.port, "/vars/x", { ["X-Request-Id"] = "first-id" }))
      local b = echo_of(client.get(gw.port, "/vars/x", { ["X-Request-Id"] = "second-id" }))
      assert.same({ "first-id" }, values(a, "X-Rid"))
      assert.same({ "second-id" }, values(b, "X-Rid"))
    end)

    it("a $ that starts no variable is sent as it is", function()
      local echo = echo_of(client.get(gw.port, "/vars/x"))
      assert.same({ "costs 5$ or $$" }, values(echo, "X-Dollar"))
      assert.same({ "$5 off on vars, $" }, values(echo, "X-Price"))
    end)

    it("$consumer is the id of the consumer key-auth found", function()
      local echo = echo_of(client.get(gw.port, "/auth/x", { apikey = "alice-key", ["X-Consumer"] = "mallory" }))
      assert.same({ "alice" }, values(echo, "X-Consumer"))
      assert.same({ "alice" }, values(echo, "X-Who"))
    end)

    it("without a consumer, set removes the client's header and add adds nothing", function()
      local echo = echo_of(client.get(gw.port, "/vars/x", { ["X-Consumer"] = "mallory" }))
      assert.same({}, values(echo, "X-Consumer"))
    end)

    it("removing X-Forwarded-For drops the client's chain; the gateway's hop stays", function()
      local echo = echo_of(client.get(gw.port, "/xff/x", { ["X-Forwarded-For"] = "6.6.6.6" }))
      assert.same({ "127.0.0.1" }, values(echo, "X-Forwarded-For"))
      -- without the policy the client's chain is kept (so the test above can fail)
      local plain = echo_of(client.get(gw.port, "/edit/x", { ["X-Forwarded-For"] = "6.6.6.6" }))
      assert.same({ "6.6.6.6, 127.0.0.1" }, values(plain, "X-Forwarded-For"))
    end)
  end)
end)
