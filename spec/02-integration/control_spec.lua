-- The control process (issue 5): one per node, supervised like a worker;
-- it owns the config source and hands each version to the workers, which
-- serve from it; the status listener shows what each worker applied.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local gettime = socket.gettime

local eventually = proc.eventually

local routes_with, route = gateway.demo_routes, gateway.demo_route

local function ready(gw)
    local res = client.get(gw.status_port, "/status/ready")
    return res and res.status == 200 and cjson.decode(res.body)
end

-- the version in force, once every worker has it
local function settled(gw)
    local r = eventually(function() return ready(gw) end, 5)
    assert.is_truthy(r, gw:log_tail())
    return r.version
end

-- a pid that is not a zombie of ours: proc.children lists live ones only
local function wait_new_control(gw, old)
    return eventually(function()
        local c = gw:control()
        return c and c ~= old and c
    end, 5)
end

describe("control process", function()
    after_each(function()
        client.close_all()
        gateway.stop_all()
    end)

    it("is one per node, a child of the master, whatever the worker count", function()
        local mock = gateway.mock()
        for _, n in ipairs({ 1, 3 }) do
            local gw = gateway.start{ routes = routes_with(mock), workers = n }
            assert.is_truthy(eventually(function() return #gw:workers() == n end, 5))
            local ctl = gw:control()
            assert.is_truthy(ctl)
            assert.equal(n + 1, #gw:children())
            -- and nothing below the master's children
            assert.equal(n + 1, #proc.descendants(gw.pid))
            assert.equal("moongate-ctl", (proc.read_file("/proc/" .. ctl .. "/comm") or ""):match("%S+"))
            assert.matches("control process started", gw:log())
            gw:stop()
        end
    end)

    it("is respawned when killed; workers serve meanwhile; a reload works after", function()
        local mock = gateway.mock()
        local gw = gateway.start{ routes = routes_with(mock), workers = 2 }
        local v1 = settled(gw)
        local workers = gw:workers()
        local ctl = gw:control()
        proc.kill(ctl, "KILL")
        -- requests never stop being answered
        local deadline = gettime() + 0.5
        local n = 0
        while gettime() < deadline do
            local res = assert(client.get(gw.port, "/demo/x"))
            assert.equal(200, res.status)
            n = n + 1
        end
        assert.is_true(n > 5)
        local new = wait_new_control(gw, ctl)
        assert.is_truthy(new, gw:log_tail())
        assert.matches("control process %(pid " .. ctl .. "%) exited on signal 9; respawning", gw:log())
        -- the same config: the same version, the workers untouched
        assert.equal(v1, settled(gw))
        assert.same(workers, gw:workers())
        -- a reload through the new control process
        gw:write_routes(routes_with(mock, { route("after") }))
        assert.equal(0, (gw:reload()))
        assert.is_truthy(eventually(function() return gw:config_all_at(v1 + 1) end, 5),
            gw:log_tail())
        for _ = 1, 10 do
            assert.equal(200, assert(client.get(gw.port, "/after/x")).status)
        end
        assert.same(workers, gw:workers())
    end)

    it("hands a route added by file + reload to every worker; /metrics shows it per worker",
        function()
            local mock = gateway.mock()
            local gw = gateway.start{ routes = routes_with(mock), workers = 2 }
            local v = settled(gw)
            assert.same({ [0] = v, [1] = v }, (gw:config_versions()))
            gw:write_routes(routes_with(mock, { route("added") }))
            assert.equal(0, (gw:reload()))
            assert.is_truthy(eventually(function() return gw:config_all_at(v + 1) end, 5),
                gw:log_tail())
            assert.equal(v + 1, ready(gw).version)
            -- each new connection may land on either worker: all are served
            for _ = 1, 20 do
                assert.equal(200, assert(client.get(gw.port, "/added/x")).status)
            end
            assert.matches("config version " .. (v + 1) .. " %(signal%): routes %+1 ~0 %-0", gw:log())
            local _, text = gw:config_versions()
            assert.is_string(text)
            local dir = proc.tmpdir()
            proc.write_file(dir .. "/metrics.txt", text)
            local rc, out = proc.run("promtool check metrics < " .. proc.quote(dir .. "/metrics.txt")
                               .. " 2>&1")
            proc.cleanup(dir)
            assert.equal(0, rc, out)
            assert.matches("# TYPE gateway_config_version gauge", text)
        end)

    it("answers the status endpoints and refuses others", function()
        local gw = gateway.start{}
        local res = assert(client.get(gw.status_port, "/status/live"))
        assert.equal(200, res.status)
        assert.same({ status = "ok" }, cjson.decode(res.body))
        assert.equal(404, assert(client.get(gw.status_port, "/nope")).status)
        res = assert(client.request(gw.status_port, { method = "POST", path = "/metrics",
                                                      body = "x" }))
        assert.equal(405, res.status)
        assert.equal("GET, HEAD", res.headers["allow"])
        -- the admin listener serves the Admin API (admin_spec.lua), the
        -- status listener does not
        res = assert(client.get(gw.admin_port, "/routes"))
        assert.equal(200, res.status)
        assert.equal(0, cjson.decode(res.body).total)
        assert.equal(404, assert(client.get(gw.status_port, "/routes")).status)
    end)

    it("/status/ready is 503 naming the worker while it applies a version, then 200", function()
        local mock = gateway.mock()
        local pdir = proc.tmpdir()
        -- a policy whose init takes 1 s: the worker is busy applying
        proc.write_file(pdir .. "/slow-init.lua", [[
return { name = "slow-init", priority = 1, schema = { type = "object" },
         init = function(conf) local t = os.clock() + 1 while os.clock() < t do end return conf end,
         access = function() end }
]])
        local gw = gateway.start{ routes = routes_with(mock), node = { lua_path = { pdir } } }
        local v = settled(gw)
        gw:write_routes(routes_with(mock, { { id = "slow", paths = { "/slow/*" }, upstream = "m",
                                              policies = { { name = "slow-init" } } } }))
        assert.equal(0, (gw:reload()))
        local late = eventually(function()
            local res = client.get(gw.status_port, "/status/ready", nil, { timeout = 3 })
            return res and res.status == 503 and cjson.decode(res.body)
        end, 3)
        assert.is_truthy(late, gw:log_tail())
        assert.equal(v + 1, late.version)
        assert.equal(0, late.workers[1].worker)
        assert.equal(v, late.workers[1].applied)
        assert.equal(v + 1, settled(gw))
        assert.equal(200, assert(client.get(gw.port, "/slow/x")).status)
        proc.cleanup(pdir)
    end)

    it("watch: true applies a file change without a reload command", function()
        local mock = gateway.mock()
        local gw = gateway.start{ routes = routes_with(mock), workers = 2,
                                  node = { config_source = { watch = true } } }
        local v = settled(gw)
        assert.matches("watching [^\n]*routes%.json for changes", gw:log())
        gw:write_routes(routes_with(mock, { route("watched") }))
        assert.is_truthy(eventually(function()
            local res = client.get(gw.port, "/watched/x")
            return res and res.status == 200
        end, 5), gw:log_tail())
        assert.is_truthy(eventually(function() return gw:config_all_at(v + 1) end, 5))
        assert.matches("config version " .. (v + 1) .. " %(watch%)", gw:log())
        -- an invalid edit is refused, logged, and the version stays
        gw:write_routes('{"routes": [{"id": "bad", "paths": [5]}]}')
        assert.is_truthy(eventually(function()
            return gw:log():find("reload: [^\n]*routes%[0%]%.paths%[0%]")
        end, 5), gw:log_tail())
        assert.equal(200, assert(client.get(gw.port, "/watched/x")).status)
        assert.equal(v + 1, settled(gw))
        -- the same text written again (touched, rewritten): no new version
        gw:write_routes(routes_with(mock, { route("watched") }))
        socket.sleep(0.5)
        assert.equal(v + 1, settled(gw))
    end)

    it("writes the last-known-good copy: the version in force, node and routes", function()
        local mock = gateway.mock()
        local gw = gateway.start{ routes = routes_with(mock), workers = 2 }
        gw:write_routes(routes_with(mock, { route("kept") }))
        assert.equal(0, (gw:reload()))
        assert.is_truthy(eventually(function() return ready(gw) and ready(gw).version == 2 end, 5))
        local lkg = cjson.decode((assert(proc.read_file(gw.dir .. "/moongate.lkg.json"))))
        assert.equal(2, lkg.version)
        assert.same(cjson.decode(proc.read_file(gw.conf_path)), lkg.node)
        assert.same(cjson.decode(proc.read_file(gw.routes_path)), lkg.routes)
    end)

    it("a worker killed after a refused reload comes back on the last good version, "
       .. "even after the control process was respawned", function()
        local mock = gateway.mock()
        local gw = gateway.start{ routes = routes_with(mock, { route("good") }), workers = 1 }
        local v = settled(gw)
        gw:write_routes('{"routes": [{"id": "bad", "paths": [5]}]}')
        assert.equal(1, (gw:reload()))
        proc.kill(gw.pid, "HUP") -- the control process refuses it too
        assert.is_truthy(eventually(function()
            return gw:log():find("reload: [^\n]*routes%[0%]%.paths%[0%]")
        end, 5), gw:log_tail())
        -- the control process restarts on the broken file: it takes the
        -- last-known-good copy
        local ctl = gw:control()
        proc.kill(ctl, "KILL")
        assert.is_truthy(wait_new_control(gw, ctl), gw:log_tail())
        assert.is_truthy(eventually(function()
            return gw:log():find("starting from the last-known-good copy", 1, true)
        end, 5), gw:log_tail())
        local victim = gw:workers()[1]
        proc.kill(victim, "KILL")
        assert.is_truthy(eventually(function()
            local now = gw:workers()
            return #now == 1 and now[1] ~= victim
        end, 3))
        for _ = 1, 5 do
            local res = assert(client.get(gw.port, "/good/x", nil, { timeout = 3 }))
            assert.equal(200, res.status)
        end
        assert.equal(v, settled(gw))
        assert.is_nil(gw:log():find("exited with code 1", 1, true), gw:log_tail())
    end)

    it("a last-known-good copy is validated by the workers, not trusted like the source",
        function()
            -- what the control process checked, a worker only completes
            -- (defaults); a copy read from disk may have been edited: here a
            -- response header the gateway sets, which only the policy's
            -- check refuses
            local mock = gateway.mock()
            local gw = gateway.start{ routes = routes_with(mock, { route("good") }), workers = 1 }
            local v = settled(gw)
            gw:write_routes('{"routes": [{"id": "bad", "paths": [5]}]}')
            proc.kill(gw.pid, "HUP") -- refused: the copy stays as written below
            assert.is_truthy(eventually(function()
                return gw:log():find("reload: [^\n]*routes%[0%]%.paths%[0%]")
            end, 5), gw:log_tail())
            local edited = routes_with(mock, { route("good") })
            edited.routes[2].policies = { { name = "response-headers",
                                            conf = { set = { ["Content-Length"] = "5" } } } }
            proc.write_file(gw.dir .. "/moongate.lkg.json", cjson.encode({
                version = v + 5, node = cjson.decode(proc.read_file(gw.conf_path)),
                routes = edited }))
            -- the control process restarts on the broken file: it takes the copy
            local ctl = gw:control()
            proc.kill(ctl, "KILL")
            assert.is_truthy(wait_new_control(gw, ctl), gw:log_tail())
            assert.is_truthy(eventually(function()
                return gw:log():find("worker 0 refused config version " .. (v + 5)
                                     .. ": [^\n]*Content%-Length is set by the gateway")
            end, 5), gw:log_tail())
            -- the worker keeps the version it had
            local res = assert(client.get(gw.port, "/good/x"))
            assert.equal(200, res.status)
            assert.is_nil(res.headers["content-length"] == "5" or nil)
        end)

    it("a node whose control process finds no configuration stops, exit 1, saying why",
        function()
            -- valid for `moongate check`, but not splittable into entities (a
            -- member name written with an escape): the control process has
            -- nothing to hand out and no last-known-good copy
            local dir = proc.tmpdir()
            local port = require("helpers.ports").free()
            local sport, aport = require("helpers.ports").free(), require("helpers.ports").free()
            proc.write_file(dir .. "/moongate.json", cjson.encode({
                workers = 1, listen = { { address = "127.0.0.1:" .. port } },
                status = { listen = "127.0.0.1:" .. sport },
                admin = { listen = "127.0.0.1:" .. aport },
            }))
            proc.write_file(dir .. "/routes.json", '{"rout\\u0065s": []}')
            local rc, out = proc.run({ gateway.bin(), "check", "-c", dir .. "/moongate.json" },
                                     { stderr = true })
            assert.equal(0, rc, out)
            rc, out = proc.run({ "timeout", "15", gateway.bin(), "start", "-c",
                                 dir .. "/moongate.json" }, { stderr = true })
            proc.cleanup(dir)
            assert.equal(1, rc, out)
            assert.matches("no valid configuration", out)
            assert.matches("the control process has no configuration to serve", out)
        end)
end)
