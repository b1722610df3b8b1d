-- Specs of spec/helpers/gateway.lua, run against spec/helpers/fake_moongate.lua
-- (a stand-in that speaks the CLI and reads the same files), so the helper
-- is proven before bin/moongate exists.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local ipairs = ipairs

describe("helpers.gateway", function()
    local bin_dir

    setup(function()
        bin_dir = proc.tmpdir()
        proc.write_file(bin_dir .. "/moongate", "#!/bin/sh\nexec luajit "
            .. proc.quote(gateway.root .. "/spec/helpers/fake_moongate.lua") .. ' "$@"\n')
        assert.equal(0, (proc.run({ "chmod", "+x", bin_dir .. "/moongate" })))
        gateway.use_bin(bin_dir .. "/moongate")
    end)

    teardown(function()
        gateway.stop_all()
        gateway.use_bin(nil)
        proc.cleanup(bin_dir)
    end)

    -- busted keeps only the last finally() of a test: stop_all covers all
    after_each(function()
        gateway.stop_all()
    end)

    local start = gateway.start

    it("finds the repository root and the binary", function()
        assert.is_truthy(proc.read_file(gateway.root .. "/spec/helpers/gateway.lua"))
        assert.equal(bin_dir .. "/moongate", gateway.bin())
        gateway.use_bin(nil)
        local env = os.getenv("MOONGATE_BIN")
        assert.equal((env and env ~= "") and env or (gateway.root .. "/bin/moongate"),
            gateway.bin())
        gateway.use_bin(bin_dir .. "/moongate")
    end)

    it("encodes gateway.array as [] and other empty tables as {}", function()
        local s = gateway.json_encode({ list = gateway.array(), obj = {},
            full = gateway.array({ 1, 2 }), nested = { { conf = {}, paths = gateway.array() } } })
        local back = cjson.decode(s)
        assert.matches('"list":%[%]', s)
        assert.matches('"obj":{}', s)
        assert.matches('"paths":%[%]', s)
        assert.matches('"conf":{}', s)
        assert.same({ 1, 2 }, back.full)
    end)

    it("merges node settings: objects merge, arrays replace, DELETE removes", function()
        local merged = gateway.merge(
            { log = { level = "info", access = "off" }, listen = { { address = "a" } }, admin = {} },
            { log = { level = "debug" }, listen = { { address = "b" }, { address = "c" } },
              admin = gateway.DELETE })
        assert.same({ log = { level = "debug", access = "off" },
                      listen = { { address = "b" }, { address = "c" } } }, merged)
    end)

    it("start writes moongate.json and routes.json and waits for the proxy", function()
        local routes = { upstreams = { gateway.upstream("u1", 9999) },
                         routes = { { id = "r1", paths = { "/x" }, upstream = "u1",
                                      policies = gateway.array() } } }
        local gw = start{ routes = routes, workers = 2,
                          node = { limits = { max_body_bytes = 10 }, log = { level = "debug" } } }
        local node = cjson.decode(proc.read_file(gw.dir .. "/moongate.json"))
        assert.same({ { address = "127.0.0.1:" .. gw.port } }, node.listen)
        assert.equal("127.0.0.1:" .. gw.admin_port, node.admin.listen)
        assert.equal("127.0.0.1:" .. gw.status_port, node.status.listen)
        assert.equal(gw.dir .. "/moongate.pid", node.pid_file)
        assert.same({ level = "debug", access = "off" }, node.log)
        assert.same({ type = "file", path = "routes.json" }, node.config_source)
        assert.same({ max_body_bytes = 10 }, node.limits)
        assert.equal(2, node.workers)
        local text = proc.read_file(gw.dir .. "/routes.json")
        assert.matches('"policies":%[%]', text)
        assert.same({ id = "u1", targets = { { host = "127.0.0.1", port = 9999, weight = 1 } } },
            cjson.decode(text).upstreams[1])
        -- the fake answers with routes.json: the proxy port is its port
        local res = assert(client.get(gw.port, "/"))
        assert.equal(text, res.body)
        assert.equal("http://127.0.0.1:" .. gw.port .. "/a?b", gw:url("/a?b"))
        assert.equal(gw.dir .. "/gateway.log", gw.log_path)
        assert.matches("fake moongate started, pid " .. gw.pid, gw:log(), 1, true)
        assert.is_true(proc.alive(gw.pid))
    end)

    it("writes empty lists when no routes are given", function()
        local gw = start()
        assert.same({ upstreams = {}, routes = {}, consumers = {}, global_policies = {} },
            cjson.decode(proc.read_file(gw.routes_path)))
        assert.matches('"routes":%[%]', proc.read_file(gw.routes_path))
    end)

    it("workers() lists the master's workers, not its control process", function()
        local gw = start{ workers = 3 }
        local workers = gw:workers()
        assert.equal(3, #workers)
        for _, w in ipairs(workers) do
            assert.same({ "sleep", "300" }, proc.cmdline(w))
        end
        assert.equal(4, #gw:children())
    end)

    it("write_routes and reload", function()
        local gw = start()
        gw:write_routes({ routes = gateway.array(), upstreams = { gateway.upstream("m", 1) } })
        assert.equal(gateway.json_encode({ routes = gateway.array(),
                                           upstreams = { gateway.upstream("m", 1) } }),
            assert(client.get(gw.port, "/")).body)
        gw:write_routes('{"raw": true}')
        assert.equal('{"raw": true}', assert(client.get(gw.port, "/")).body)
        local rc, out = gw:reload()
        assert.equal(0, rc)
        assert.equal("reload signalled " .. gw.pid .. "\n", out)
    end)

    it("stop ends the master and its workers", function()
        local gw = gateway.start{ workers = 2 }
        local kids = gw:children()
        assert.equal(3, #kids)
        local clean, info = gw:stop()
        assert.is_true(clean)
        assert.equal(0, info.rc)
        assert.is_true(info.master_exited)
        assert.same({}, info.killed)
        assert.is_false(proc.alive(gw.pid))
        for _, k in ipairs(kids) do
            assert.is_false(proc.alive(k))
        end
        assert.is_true((gw:stop()))
        assert.is_nil(client.get(gw.port, "/"))
    end)

    it("stop SIGKILLs the workers a dead master leaves behind", function()
        local gw = gateway.start{ workers = 2, node = { fake_orphans = true } }
        local kids = gw:children()
        local clean, info = gw:stop()
        assert.is_false(clean)
        assert.is_true(info.master_exited)
        table.sort(info.killed)
        assert.same(kids, info.killed)
        for _, k in ipairs(kids) do
            assert.is_false(proc.alive(k))
        end
    end)

    it("start fails with the log tail when the gateway exits", function()
        local before = gateway.running_count()
        local ok, err = pcall(gateway.start, { env = { FAKE_MOONGATE_FAIL = "1" } })
        assert.is_false(ok)
        assert.matches("gateway.start: ", err, 1, true)
        assert.matches("exited", err, 1, true)
        assert.matches("config error at routes[0].paths", err, 1, true)
        assert.equal(before, gateway.running_count())
    end)

    it("start fails in time when nothing listens, and kills the master", function()
        local t0 = proc.now()
        local ok, err = pcall(gateway.start, { env = { FAKE_MOONGATE_NOLISTEN = "1" },
                                               timeout = 0.5 })
        assert.is_false(ok)
        assert.is_true(proc.now() - t0 < 5)
        assert.matches("nothing listened on 127.0.0.1:%d+ within 0.5 s", err)
        local pid = tonumber(err:match("master pid (%d+)"))
        assert.is_number(pid)
        assert.is_false(proc.alive(pid))
    end)

    it("mock starts a backend; stop and url work with . and :", function()
        local m = gateway.mock()
        assert.equal("mock /hello", assert(client.get(m.port, "/hello")).body)
        assert.equal("http://127.0.0.1:" .. m.port .. "/p", m.url("/p"))
        assert.equal("http://127.0.0.1:" .. m.port .. "/p", m:url("/p"))
        assert.same({ id = "up", targets = { { host = "127.0.0.1", port = m.port, weight = 1 } } },
            gateway.upstream("up", m))
        assert.is_true(m:stop())
        assert.is_false(proc.alive(m.pid))
        assert.is_true(m.stop())
    end)

    it("stop_all stops every gateway and mock and removes their directories", function()
        local before = gateway.running_count()
        local gw = gateway.start()
        local m = gateway.mock()
        assert.equal(before + 2, gateway.running_count())
        gateway.stop_all()
        assert.equal(0, gateway.running_count())
        assert.is_false(proc.alive(gw.pid))
        assert.is_false(proc.alive(m.pid))
        assert.equal(1, (proc.run("test -d " .. proc.quote(gw.dir))))
        assert.equal(1, (proc.run("test -d " .. proc.quote(m.dir))))
    end)
end)
