-- response-headers: what the client gets, on a real gateway in front of the
-- mock (its ?header=Name:Value makes the upstream send headers).
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local policy_helper = require("helpers.policy")

local function validate(conf)
  return policy_helper.validate("response-headers", conf)
end

-- every value of the response header name, in order
local function values(res, name)
  local out = {}
  for _, h in ipairs(res.header_list) do
    if h[1]:lower() == name:lower() then
      out[#out + 1] = h[2]
    end
  end
  return out
end

local EDITS = {
  remove = { "X-Secret" },
  set = { ["X-Set"] = "gateway", ["X-Route"] = "$route", ["X-Rid"] = "$request_id" },
  add = { ["X-Add"] = "added", ["X-Many"] = { "one", "two" } },
}

describe("response-headers", function()
  describe("schema", function()
    it("fills empty remove, set and add", function()
      assert.same({ remove = {}, set = {}, add = {} }, validate({}))
    end)

    it("refuses the framing and hop-by-hop headers the gateway sets", function()
      local _, err = validate({ set = { ["Transfer-Encoding"] = "chunked" } })
      assert.matches("conf%.set: Transfer%-Encoding is set by the gateway", err)
      _, err = validate({ remove = { "Content-Length" } })
      assert.matches("conf%.remove%[0%]: Content%-Length is set by the gateway", err)
    end)

    it("refuses an unknown variable", function()
      local _, err = validate({ add = { ["X-A"] = { "ok", "$upstream" } } })
      assert.matches("unknown variable %$upstream", err)
    end)
  end)

  describe("on a gateway", function()
    local gw

    before_each(function()
      local mock = gateway.mock()
      local function route(id, upstream, policies)
        return { id = id, paths = { "/" .. id .. "/*" }, upstream = upstream, strip_prefix = true,
                 policies = policies }
      end
      local rh = { name = "response-headers", conf = EDITS }
      gw = gateway.start{ routes = {
        upstreams = { gateway.upstream("m", mock), gateway.upstream("down", ports.free()) },
        consumers = { { id = "alice", credentials = { ["key-auth"] = { key = "k" } } } },
        routes = {
          route("up", "m", { rh }),
          route("plain", "m", {}),
          route("down", "down", { rh }),
          route("static", nil, { rh, { name = "static-response", conf = { status = 201, body = "made" } } }),
          route("auth", "m", { rh, { name = "key-auth", conf = {} } }),
        },
      } }
    end)

    after_each(function()
      client.close_all()
      gateway.stop_all()
    end)

    it("set replaces the upstream's header and adds one it did not send", function()
      local res = assert(client.get(gw.port, "/up/x?header=X-Set:upstream"))
      assert.equal(200, res.status)
      assert.same({ "gateway" }, values(res, "X-Set"))
      -- the same request without the policy: the upstream's value comes through
      local plain = assert(client.get(gw.port, "/plain/x?header=X-Set:upstream"))
      assert.same({ "upstream" }, values(plain, "X-Set"))
    end)

    it("add keeps the upstream's value and adds each listed value", function()
      local res = assert(client.get(gw.port, "/up/x?header=X-Add:upstream&header=X-Many:zero"))
      assert.same({ "upstream", "added" }, values(res, "X-Add"))
      assert.same({ "zero", "one", "two" }, values(res, "X-Many"))
    end)

    it("remove drops the upstream's header", function()
      local res = assert(client.get(gw.port, "/up/x?header=X-Secret:s3cr3t&header=X-Other:o"))
      assert.same({}, values(res, "X-Secret"))
      assert.same({ "o" }, values(res, "X-Other"))
      local plain = assert(client.get(gw.port, "/plain/x?header=X-Secret:s3cr3t"))
      assert.same({ "s3cr3t" }, values(plain, "X-Secret"))
    end)

    it("renders $route and $request_id", function()
      local res = assert(client.get(gw.port, "/up/x"))
      assert.same({ "up" }, values(res, "X-Route"))
      assert.is_truthy(res.headers["x-request-id"])
      assert.same({ res.headers["x-request-id"] }, values(res, "X-Rid"))
    end)

    it("decorates the gateway's own 502", function()
      local res = assert(client.get(gw.port, "/down/x"))
      assert.equal(502, res.status)
      assert.same({ "gateway" }, values(res, "X-Set"))
    end)

    it("decorates the answer of static-response (which runs after it)", function()
      local res = assert(client.get(gw.port, "/static/x"))
      assert.equal(201, res.status)
      assert.equal("made", res.body)
      assert.same({ "gateway" }, values(res, "X-Set"))
    end)

    it("decorates key-auth's 401 (header_filter runs on it) and the request it lets through",
       function()
      local res = assert(client.get(gw.port, "/auth/x"))
      assert.equal(401, res.status)
      assert.same({ "gateway" }, values(res, "X-Set"))
      assert.equal('Key realm="moongate"', res.headers["www-authenticate"])
      res = assert(client.get(gw.port, "/auth/x", { apikey = "k" }))
      assert.equal(200, res.status)
      assert.same({ "gateway" }, values(res, "X-Set"))
    end)
  end)
end)
