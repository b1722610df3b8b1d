local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local config = require("moongate.config")

local DIR = gateway.root .. "/spec/fixtures/policies-custom"

-- routes.json with one route using api-version with this conf
local function routes(conf, mock)
  return {
    upstreams = { gateway.upstream("backend", mock or 9) },
    routes = { { id = "orders", paths = { "/orders/*" }, upstream = "backend",
                 policies = { { name = "api-version", conf = conf } } } },
  }
end

describe("api-version (a custom policy on lua_path)", function()
  local gw

  before_each(function()
    gw = gateway.start{
      node = { lua_path = { DIR } },
      routes = routes({ supported = { "v1", "v2" }, default = "v2", deprecated = { "v1" } },
                      gateway.mock()),
    }
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
  end)

  it("its schema refuses a default that is not supported, naming the path", function()
    local ok, errs = config.validate_routes(routes({ supported = { "v1" }, default = "v3" }),
                                            { lua_path = { DIR } })
    assert.is_nil(ok)
    assert.same({ "routes[0].policies[0].conf: default v3 is not in supported" }, errs)
  end)

  it("forwards the version the client asked for, and says which one answered", function()
    local res = assert(client.get(gw.port, "/orders/7", { ["X-Api-Version"] = "v1" }))
    assert.equal(200, res.status)
    assert.equal("v1", cjson.decode(res.body).headers["x-api-version"]) -- what the mock got
    assert.equal("v1", res.headers["x-api-version"])
  end)

  it("uses the default when the client names none", function()
    local res = assert(client.get(gw.port, "/orders/7"))
    assert.equal("v2", cjson.decode(res.body).headers["x-api-version"])
    assert.is_nil(res.headers["deprecation"])
  end)

  it("refuses an unsupported version with a JSON 400", function()
    local res = assert(client.get(gw.port, "/orders/7", { ["X-Api-Version"] = "v9" }))
    assert.equal(400, res.status)
    assert.same({ error = "unsupported API version v9", supported = { "v1", "v2" } },
                cjson.decode(res.body))
  end)

  it("marks a deprecated version and logs it", function()
    local res = assert(client.get(gw.port, "/orders/7", { ["X-Api-Version"] = "v1" }))
    assert.equal("true", res.headers["deprecation"])
    local line = "deprecated API version v1 on route orders (status 200)"
    for _ = 1, 100 do -- the log phase runs after the answer: wait up to 5 s
      if gw:log():find(line, 1, true) then
        break
      end
      socket.sleep(0.05)
    end
    assert.truthy(gw:log():find(line, 1, true))
  end)
end)
