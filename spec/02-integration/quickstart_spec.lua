-- README's first two commands, and the shipped config they run: the proxy
-- in front of the mock backend answers /demo/hello.
local cjson = require("cjson.safe")
local gateway = require("helpers.gateway")
local client = require("helpers.client")
local proc = require("helpers.proc")

local ROOT = gateway.root

describe("quick start", function()
  after_each(function()
    client.close_all()
    gateway.stop_all()
  end)

  it("README opens with the set-up-and-run command, then make test", function()
    local readme = assert(proc.read_file(ROOT .. "/README.md"))
    local block = readme:match("```sh\n(.-)```")
    assert.is_truthy(block)
    local cmds = {}
    for line in block:gmatch("[^\n]+") do
      cmds[#cmds + 1] = line:match("^(%S+ %S+)")
    end
    assert.same({ "make run", "make test" }, cmds)
    local mk = assert(proc.read_file(ROOT .. "/Makefile"))
    assert.is_truthy(mk:find("\nrun: deps build\n", 1, true))
    assert.is_truthy(mk:find("mock --listen 127.0.0.1:9001", 1, true))
    assert.is_truthy(mk:find("start -c conf/moongate.json", 1, true))
  end)

  it("the shipped conf proxies /demo/hello to the mock on port 9001", function()
    local node = assert(cjson.decode((assert(proc.read_file(ROOT .. "/conf/moongate.json")))))
    local routes = assert(cjson.decode((assert(proc.read_file(ROOT .. "/conf/routes.json")))))
    assert.equal("0.0.0.0:8080", node.listen[1].address)
    assert.equal(9001, routes.upstreams[1].targets[1].port)
    -- the same config on free ports (8080/9001 may be taken where specs run)
    local mock = gateway.mock({})
    routes.upstreams[1].targets[1].port = mock.port
    node.listen, node.admin, node.status = nil, nil, nil
    node.workers = 1
    local gw = gateway.start({ node = node, routes = routes })
    local res = assert(client.get(gw.port, "/demo/hello"))
    assert.equal(200, res.status)
    local echo = assert(cjson.decode(res.body))
    assert.equal("/hello", echo.path)
    assert.equal("GET", echo.method)
  end)
end)
