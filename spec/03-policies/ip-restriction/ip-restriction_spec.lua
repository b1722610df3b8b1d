-- ip-restriction: the CIDR matcher (IPv4 and IPv6) as a unit, then allow
-- and deny lists end to end on a gateway listening on 127.0.0.1 and [::1].
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local config = require("moongate.config")
local policy_helper = require("helpers.policy")

local policy = assert(config.policy_loader({})("ip-restriction"))

local function validate(conf)
  return policy_helper.validate("ip-restriction", conf)
end

-- verdict of a conf (validated, as the gateway would use it) for addr
local function permitted(conf, addr)
  return policy._permitted(assert(validate(conf)), addr)
end

-- Whether this machine can listen on and connect to [::1].
local function ipv6_loopback()
  local s = socket.bind("::1", 0)
  if not s then
    return false
  end
  s:close()
  return true
end

describe("ip-restriction", function()
  describe("schema", function()
    it("fills status and message", function()
      assert.same({ deny = { "10.0.0.1" }, status = 403, message = "Your IP address is not allowed" },
                  validate({ deny = { "10.0.0.1" } }))
    end)

    it("needs an allow or a deny list with something in it", function()
      local _, err = validate({})
      assert.matches("conf: allow or deny must list at least one address", err)
      _, err = validate({ allow = {}, deny = {} })
      assert.matches("allow or deny must list at least one address", err)
    end)

    it("refuses malformed addresses and prefixes, naming the entry", function()
      for _, bad in ipairs({ "10.0.0.256", "10.0.0", "10.0.0.0/33", "10.0.0.0/", "::1/129",
                             "2001:db8::1::2", "1:2:3:4:5:6:7:8:9", "12345::", "::g",
                             "localhost", "10.0.0.0/8/8", "" }) do
        local _, err = validate({ deny = { "127.0.0.1", bad } })
        assert.is_truthy(err, bad .. " was accepted")
        assert.is_truthy(err:find("conf.deny[1]: invalid", 1, true), bad .. ": " .. err)
      end
    end)

    it("accepts the address forms", function()
      for _, good in ipairs({ "0.0.0.0/0", "10.0.0.0/8", "192.168.1.7", "::/0", "::1", "fe80::/10",
                              "2001:db8::/32", "2001:0db8:0000:0000:0000:0000:0000:0001",
                              "::ffff:10.0.0.1", "::ffff:0:0/96", "1:2:3:4:5:6:7::" }) do
        assert(validate({ allow = { good } }), good)
      end
    end)
  end)

  describe("matcher", function()
    it("IPv4: prefixes match by their bits only", function()
      local conf = { allow = { "10.0.0.0/8", "192.168.1.0/24", "172.16.5.4" } }
      assert.is_true(permitted(conf, "10.1.2.3"))
      assert.is_true(permitted(conf, "10.255.255.255"))
      assert.is_false(permitted(conf, "11.0.0.0"))
      assert.is_true(permitted(conf, "192.168.1.200"))
      assert.is_false(permitted(conf, "192.168.2.1"))
      assert.is_true(permitted(conf, "172.16.5.4"))
      assert.is_false(permitted(conf, "172.16.5.5"))
    end)

    it("IPv4: host bits in a CIDR are ignored, /0 matches everything, high first octets work", function()
      assert.is_true(permitted({ allow = { "10.9.9.9/8" } }, "10.0.0.1"))
      assert.is_true(permitted({ allow = { "0.0.0.0/0" } }, "255.255.255.255"))
      -- 200.x is above 2^31: signed 32-bit words must still compare right
      assert.is_true(permitted({ allow = { "200.0.0.0/7" } }, "201.255.0.1"))
      assert.is_false(permitted({ allow = { "200.0.0.0/7" } }, "202.0.0.1"))
      assert.is_true(permitted({ allow = { "128.0.0.0/1" } }, "255.1.1.1"))
      assert.is_false(permitted({ allow = { "128.0.0.0/1" } }, "127.1.1.1"))
    end)

    it("IPv6: prefixes across word boundaries, compressed forms, full forms", function()
      local conf = { allow = { "2001:db8::/32", "fe80::/10", "2001:db8:1:2:3:4:5:0/127", "::1" } }
      assert.is_true(permitted(conf, "2001:db8::1"))
      assert.is_true(permitted(conf, "2001:0db8:ffff:ffff:ffff:ffff:ffff:ffff"))
      assert.is_false(permitted(conf, "2001:db9::1"))
      assert.is_true(permitted(conf, "febf::1"))
      assert.is_false(permitted(conf, "fec0::1"))
      assert.is_true(permitted(conf, "::1"))
      assert.is_false(permitted(conf, "::2"))
      assert.is_true(permitted({ allow = { "2001:db8:1:2:3:4:5:0/127" } }, "2001:db8:1:2:3:4:5:1"))
      assert.is_false(permitted({ allow = { "2001:db8:1:2:3:4:5:0/127" } }, "2001:db8:1:2:3:4:5:2"))
      assert.is_true(permitted({ allow = { "2001:db8::/33" } }, "2001:db8:7fff::"))
      assert.is_false(permitted({ allow = { "2001:db8::/33" } }, "2001:db8:8000::"))
      assert.is_true(permitted({ allow = { "::/0" } }, "ffff::ffff"))
    end)

    it("IPv4 lists do not match IPv6 clients and the other way round", function()
      assert.is_false(permitted({ allow = { "0.0.0.0/0" } }, "::1"))
      assert.is_false(permitted({ allow = { "::/0" } }, "127.0.0.1"))
      assert.is_true(permitted({ deny = { "0.0.0.0/0" } }, "::1"))
    end)

    it("an IPv4-mapped client matches the IPv4 lists", function()
      assert.is_false(permitted({ deny = { "10.0.0.0/8" } }, "::ffff:10.1.1.1"))
      assert.is_true(permitted({ allow = { "10.0.0.0/8" } }, "::ffff:10.1.1.1"))
      assert.is_true(permitted({ allow = { "10.0.0.0/8" } }, "::ffff:a01:101"))
      assert.is_false(permitted({ allow = { "10.0.0.0/8" } }, "::ffff:b01:101"))
    end)

    it("deny wins over allow; deny alone lets everything else through", function()
      local conf = { allow = { "10.0.0.0/8" }, deny = { "10.0.0.66" } }
      assert.is_true(permitted(conf, "10.0.0.65"))
      assert.is_false(permitted(conf, "10.0.0.66"))
      assert.is_true(permitted({ deny = { "10.0.0.66" } }, "8.8.8.8"))
    end)
  end)

  describe("on a gateway", function()
    local gw, port6

    -- A gateway listening on 127.0.0.1:<helper's port> and [::1]:<port6>.
    -- gateway.start picks its proxy port with ports.free() and waits on
    -- 127.0.0.1; its first ports.free() is answered with ours, so the node's
    -- listen list can name that port too.
    local function start(routes)
      local p4 = ports.free()
      port6 = ports.free()
      local free = ports.free
      ports.free = function()
        ports.free = free
        return p4
      end
      local ok, res = pcall(gateway.start, {
        routes = routes,
        node = { listen = { { address = "127.0.0.1:" .. p4 }, { address = "[::1]:" .. port6 } } },
      })
      ports.free = free
      assert(ok, res)
      return res
    end

    before_each(function()
      local mock = gateway.mock()
      local function route(id, conf)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = "m", strip_prefix = true,
                 policies = { { name = "ip-restriction", conf = conf } } }
      end
      gw = start({
        upstreams = { gateway.upstream("m", mock) },
        routes = {
          route("allow-v4", { allow = { "127.0.0.0/8" } }),
          route("allow-other", { allow = { "10.0.0.0/8", "2001:db8::/32" } }),
          route("deny-v4", { deny = { "127.0.0.1" } }),
          route("deny-wins", { allow = { "127.0.0.0/8", "::1" }, deny = { "127.0.0.1/32", "::1/128" } }),
          route("allow-v6", { allow = { "::1/128" } }),
          route("deny-v6", { deny = { "::/0" } }),
          route("custom", { deny = { "0.0.0.0/0", "::/0" }, status = 451, message = "not from here" }),
        },
      })
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
    end)

    local function get(path, v6)
      return assert(client.request(v6 and port6 or gw.port,
                                   { path = path, addr = v6 and "::1" or "127.0.0.1" }))
    end

    it("an allowed IPv4 client reaches the upstream", function()
      local res = get("/allow-v4/x")
      assert.equal(200, res.status)
      assert.equal("127.0.0.1", cjson.decode(res.body).headers["x-forwarded-for"])
    end)

    it("a client outside the allow list gets a JSON 403", function()
      local res = get("/allow-other/x")
      assert.equal(403, res.status)
      assert.matches("^application/json", res.headers["content-type"])
      assert.same({ error = "Your IP address is not allowed" }, cjson.decode(res.body))
    end)

    it("a denied IPv4 client gets 403", function()
      assert.equal(403, get("/deny-v4/x").status)
    end)

    it("deny wins over allow, for IPv4 and IPv6 clients", function()
      assert.equal(403, get("/deny-wins/x").status)
      if ipv6_loopback() then
        assert.equal(403, get("/deny-wins/x", true).status)
      end
    end)

    it("status and message are configurable", function()
      local res = get("/custom/x")
      assert.equal(451, res.status)
      assert.same({ error = "not from here" }, cjson.decode(res.body))
    end)

    describe("IPv6 clients (on [::1])", function()
      it("an allowed IPv6 client reaches the upstream; the same route refuses IPv4", function()
        if not ipv6_loopback() then
          pending("no IPv6 loopback on this machine")
          return
        end
        local res = get("/allow-v6/x", true)
        assert.equal(200, res.status)
        assert.equal("::1", cjson.decode(res.body).headers["x-forwarded-for"])
        assert.equal(403, get("/allow-v6/x").status)
      end)

      it("a denied IPv6 client gets 403; an IPv4 client passes the IPv6 deny list", function()
        if not ipv6_loopback() then
          pending("no IPv6 loopback on this machine")
          return
        end
        assert.equal(403, get("/deny-v6/x", true).status)
        assert.equal(200, get("/deny-v6/x").status)
        assert.equal(403, get("/allow-other/x", true).status)
      end)
    end)
  end)
end)
