-- Settings the schema accepts but this build does not act on are refused
-- with a clear error instead of being silently ignored.
local config = require("moongate.config")

describe("config.unsupported", function()
  local function node(t)
    local n, errs = config.validate_node(t, "/tmp/moongate.json")
    assert(n, errs and errs[1])
    return n
  end

  it("accepts what this build implements", function()
    assert.same({}, config.unsupported(node({ listen = { { address = "127.0.0.1:8080" } } }),
                                       { upstreams = { { id = "a", balancer = "round_robin" } } }))
  end)

  it("refuses TLS listeners and other balancers, naming each path (watch and https etcd "
     .. "endpoints are supported)", function()
    local errs = config.unsupported(
      node({ listen = { { address = "127.0.0.1:8080" }, { address = "127.0.0.1:8443", tls = true } },
             config_source = { type = "file", path = "r.json", watch = true } }),
      { upstreams = { { id = "a", balancer = "round_robin" }, { id = "b", balancer = "least_conn" } } })
    assert.same({
      "listen[1].tls: TLS is not supported by this build yet",
      "upstreams[1].balancer: only round_robin is supported by this build yet",
    }, errs)
    local e2 = config.unsupported(node({ config_source = { type = "etcd" } }), nil)
    assert.same({}, e2)
    local e3 = config.unsupported(node({ config_source = { type = "etcd", endpoints = {
      "http://127.0.0.1:2379", "https://10.0.0.2:2379" } } }), nil)
    assert.same({}, e3)
  end)
end)
