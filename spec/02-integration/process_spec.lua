-- The moongate processes as an operator drives them: version, check, start
-- (foreground and -d), stop (graceful drain), reload (routes swapped without
-- restarting workers), worker respawn, start-up failures, worker counts.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local gettime = socket.gettime

-- Lines of s, without empty ones.
local function lines(s)
    local out = {}
    for line in (s or ""):gmatch("[^\n]+") do
        out[#out + 1] = line
    end
    return out
end

local function contains(list, value)
    for _, v in ipairs(list) do
        if v == value then
            return true
        end
    end
    return false
end

local function nproc()
    local rc, out = proc.run({ "nproc" })
    assert(rc == 0, "nproc failed")
    return tonumber(out:match("%d+"))
end

local eventually = proc.eventually

-- moongate <args...>, its stdout+stderr merged, killed after 15 s should it
-- not return (a start that unexpectedly succeeds would run forever).
local function moongate(...)
    return proc.run({ "timeout", "-s", "KILL", "15", gateway.bin(), ... }, { stderr = true })
end

-- gateway.start returns once the proxy port accepts connections, which the
-- master's sockets do before the pid file is written and the workers are up.
-- This also waits for those: the pid file, and expect_workers (default
-- opts.workers, else 1) workers that have logged "worker N started".
local function start(opts)
    local gw = gateway.start(opts)
    local n = opts.expect_workers or opts.workers or 1
    local ready = eventually(function()
        if not proc.read_file(gw.dir .. "/moongate.pid") or #gw:workers() ~= n then
            return false
        end
        local _, count = gw:log():gsub("worker %d+ started", "")
        return count >= n
    end, 5)
    assert(ready, "gateway not ready with " .. n .. " workers:\n" .. gw:log_tail())
    return gw
end

describe("moongate processes", function()
    local dirs = {}     -- temporary directories of this spec's own configs
    local strays = {}   -- pids to kill in after_each (a daemon we started)

    -- A directory with moongate.json (node, merged over a minimal node on a
    -- free port) and routes.json (a table or a JSON string).
    local function config_dir(node, routes)
        local dir = proc.tmpdir()
        dirs[#dirs + 1] = dir
        local port = ports.free()
        local n = gateway.merge({
            workers = 1,
            listen = { { address = "127.0.0.1:" .. port } },
            admin = { listen = "127.0.0.1:" .. ports.free() },
            status = { listen = "127.0.0.1:" .. ports.free() },
            log = { level = "info", access = "off" },
            config_source = { type = "file", path = "routes.json" },
        }, node)
        proc.write_file(dir .. "/moongate.json", gateway.json_encode(n))
        if type(routes) == "string" then
            proc.write_file(dir .. "/routes.json", routes)
        else
            proc.write_file(dir .. "/routes.json", gateway.json_encode(routes or {
                upstreams = gateway.array(), routes = gateway.array(),
                consumers = gateway.array(), global_policies = gateway.array(),
            }))
        end
        return dir, dir .. "/moongate.json", port
    end

    local function demo_routes(mock, extra)
        local routes = {
            upstreams = { gateway.upstream("m", mock) },
            routes = { { id = "demo", paths = { "/demo/*" }, upstream = "m", strip_prefix = true } },
        }
        for _, r in ipairs(extra or {}) do
            routes.routes[#routes.routes + 1] = r
        end
        return routes
    end

    after_each(function()
        client.close_all()
        gateway.stop_all()
        for _, pid in ipairs(strays) do
            if proc.alive(pid) then
                for _, p in ipairs(proc.descendants(pid)) do
                    proc.kill(p, "KILL")
                end
                proc.kill(pid, "KILL")
                proc.wait_exit(pid, 2)
            end
        end
        strays = {}
        for _, d in ipairs(dirs) do
            proc.cleanup(d)
        end
        dirs = {}
    end)

    describe("version", function()
        it("prints moongate's version and its libraries', exit 0", function()
            local rc, out = moongate("version")
            assert.equal(0, rc)
            local l = lines(out)
            assert.matches("^moongate %d+%.%d+%.%d+", l[1])
            assert.matches("LuaJIT 2%.1", out)
            assert.matches("libuv %d+%.%d+", out)
            assert.matches("llhttp %d+%.%d+", out)
            assert.matches("OpenSSL %d", out)
        end)

        it("rejects options with exit 1 and one line", function()
            local rc, out = moongate("version", "--bogus")
            assert.equal(1, rc)
            assert.equal(1, #lines(out))
        end)
    end)

    describe("check", function()
        it("says ok and exits 0 for a valid config", function()
            local mock_port = ports.free()
            local _, conf = config_dir(nil, demo_routes(mock_port))
            local rc, out = moongate("check", "-c", conf)
            assert.equal(0, rc)
            assert.same({ "ok" }, lines(out))
        end)

        it("accepts the shipped conf/moongate.json", function()
            local rc, out = moongate("check", "-c", gateway.root .. "/conf/moongate.json")
            assert.equal(0, rc, out)
            assert.same({ "ok" }, lines(out))
        end)

        it("exits 1 with one line per node error, each naming its JSON path", function()
            local _, conf = config_dir({
                workers = "many",
                listen = { { address = "127.0.0.1:8080" }, { address = "not an address" } },
                limits = { max_header_bytes = 10 },
                bogus = true,
            })
            local rc, out = moongate("check", "-c", conf)
            assert.equal(1, rc)
            local l = lines(out)
            assert.equal(4, #l, out)
            local expect = { "workers", "listen[1].address", "limits.max_header_bytes", "bogus" }
            for _, path in ipairs(expect) do
                local found = false
                for _, line in ipairs(l) do
                    if line:find(": " .. path .. ": ", 1, true) then
                        found = true
                    end
                end
                assert.is_true(found, "no line for " .. path .. " in:\n" .. out)
            end
            -- each line names the file first
            for _, line in ipairs(l) do
                assert.equal(1, line:find(conf .. ": ", 1, true), line)
            end
        end)

        it("exits 1 with one line per routes error, each naming its JSON path", function()
            local _, conf = config_dir(nil, {
                upstreams = { { id = "u", targets = { { host = "127.0.0.1", port = 99999 } } } },
                routes = {
                    { id = "a", paths = { "/a" }, upstream = "u" },
                    { id = "b", paths = { 5 }, upstream = "nope" },
                },
            })
            local rc, out = moongate("check", "-c", conf)
            assert.equal(1, rc)
            local l = lines(out)
            assert.equal(3, #l, out)
            assert.matches("routes%.json: upstreams%[0%]%.targets%[0%]%.port: ", out)
            assert.matches("routes%.json: routes%[1%]%.paths%[0%]: ", out)
            assert.matches("routes%.json: routes%[1%]%.upstream: ", out)
        end)

        it("exits 1 with one line for a config that is not JSON", function()
            local dir = config_dir()
            proc.write_file(dir .. "/broken.json", '{"listen": [')
            local rc, out = moongate("check", "-c", dir .. "/broken.json")
            assert.equal(1, rc)
            assert.equal(1, #lines(out), out)
            assert.matches("broken%.json", out)
        end)

        it("exits 1 naming a policy that cannot be found", function()
            local _, conf = config_dir(nil, {
                upstreams = { gateway.upstream("u", 1) },
                routes = { { id = "a", paths = { "/a" }, upstream = "u",
                             policies = { { name = "no-such-policy" } } } },
            })
            local rc, out = moongate("check", "-c", conf)
            assert.equal(1, rc)
            assert.equal(1, #lines(out), out)
            assert.matches("routes%[0%]%.policies%[0%]", out)
            assert.matches("no%-such%-policy", out)
        end)
    end)

    describe("start and stop", function()
        it("runs in the foreground, writes the pid file, and stop drains an in-flight request",
            function()
                local mock = gateway.mock()
                local gw = start{ routes = demo_routes(mock), workers = 1 }
                local pid_text = proc.read_file(gw.dir .. "/moongate.pid")
                assert.equal(gw.pid, tonumber(pid_text))

                local c = assert(client.connect(gw.port))
                assert(c:request({ path = "/demo/slow?delay_ms=1500" }))
                socket.sleep(0.3) -- the request is at the mock now

                local t0 = gettime()
                local rc, out = moongate("stop", "-c", gw.conf_path)
                local took = gettime() - t0
                assert.equal(0, rc, out)
                -- stop returned once the master had exited, after the drain
                assert.is_false(proc.alive(gw.pid))
                assert.is_true(took >= 0.9, "stop returned after " .. took .. " s")
                local res = assert(c:read_response())
                assert.equal(200, res.status)
                assert.equal("/slow", cjson.decode(res.body).path)
                assert.is_nil(proc.read_file(gw.dir .. "/moongate.pid"))
                assert.matches("graceful stop", gw:log())
                -- and nothing answers any more
                assert.is_nil(client.connect(gw.port, nil, 1))
            end)

        it("refuses new connections while draining instead of leaving them hanging", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 1 }
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/demo/slow?delay_ms=2000" }))
            socket.sleep(0.3)
            local stopper = proc.spawn({ gateway.bin(), "stop", "-c", gw.conf_path })
            strays[#strays + 1] = stopper
            socket.sleep(0.5) -- the workers are draining now
            assert.is_true(proc.alive(gw.pid))
            -- a new client is told at once (refused, or closed without an
            -- answer), not left waiting for the end of the drain
            local t0 = gettime()
            local late = client.connect(gw.port, nil, 3)
            if late then
                late:request({ path = "/demo/late" })
                local res, err = late:read_response({ timeout = 3 })
                assert.is_nil(res)
                assert.equal("closed", err)
            end
            assert.is_true(gettime() - t0 < 1, "a new client waited "
                .. (gettime() - t0) .. " s during the drain")
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            assert.is_true(proc.wait_exit(gw.pid, 5))
        end)

        it("stop gives up on a request longer than shutdown_timeout_ms", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 1,
                                      node = { shutdown_timeout_ms = 500 } }
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/demo/slow?delay_ms=5000" }))
            socket.sleep(0.2)
            local t0 = gettime()
            local rc, out = moongate("stop", "-c", gw.conf_path)
            local took = gettime() - t0
            assert.equal(0, rc, out)
            assert.is_false(proc.alive(gw.pid))
            assert.is_true(took >= 0.4 and took < 3, "stop took " .. took .. " s")
            local res, err = c:read_response({ timeout = 2 })
            assert.is_nil(res)
            assert.equal("closed", err)
        end)

        it("stop with no gateway running exits 1 with one line", function()
            local _, conf = config_dir()
            local rc, out = moongate("stop", "-c", conf)
            assert.equal(1, rc)
            assert.equal(1, #lines(out), out)
            assert.matches("not running", out)
        end)

        it("refuses a second start on the same pid file, exit 1, and the first keeps serving",
            function()
                local mock = gateway.mock()
                local gw = start{ routes = demo_routes(mock) }
                local rc, out = moongate("start", "-c", gw.conf_path)
                assert.equal(1, rc)
                assert.equal(1, #lines(out), out)
                assert.matches("already running", out)
                assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
                assert.equal(gw.pid, tonumber(proc.read_file(gw.dir .. "/moongate.pid")))
            end)

        it("starts over a stale pid file left by a killed master", function()
            local mock = gateway.mock()
            local dir, conf = config_dir({ pid_file = "moongate.pid" }, demo_routes(mock))
            proc.write_file(dir .. "/moongate.pid", "999999\n")
            local pid = proc.spawn({ gateway.bin(), "start", "-c", conf },
                { log = dir .. "/gw.log" })
            strays[#strays + 1] = pid
            local node = cjson.decode(proc.read_file(conf))
            local port = tonumber(node.listen[1].address:match(":(%d+)$"))
            assert.is_truthy(proc.wait_port("127.0.0.1", port, 10), proc.read_file(dir .. "/gw.log"))
            -- the master listens first, then writes its pid file
            assert.is_truthy(eventually(function()
                return tonumber(proc.read_file(dir .. "/moongate.pid")) == pid
            end, 5), proc.read_file(dir .. "/gw.log"))
            assert.equal(0, (moongate("stop", "-c", conf)))
            assert.is_true(proc.wait_exit(pid, 5))
        end)

        it("-d daemonizes: start returns, the gateway answers, stop stops it", function()
            local mock = gateway.mock()
            local dir, conf, port = config_dir({ workers = 2 }, demo_routes(mock))
            local t0 = gettime()
            local rc, out = moongate("start", "-c", conf, "-d")
            assert.equal(0, rc, out)
            assert.is_true(gettime() - t0 < 5)
            local pid = tonumber(proc.read_file(dir .. "/moongate.pid"))
            assert.is_truthy(pid, "no pid file after start -d")
            strays[#strays + 1] = pid
            assert.is_true(proc.alive(pid))
            -- a daemon: not our child, its own session
            local function session_of(stat)
                return tonumber(stat:match("%) %a %d+ %d+ (%d+)"))
            end
            local session = session_of(proc.read_file("/proc/" .. pid .. "/stat"))
            assert.is_truthy(session)
            assert.is_not.equal(session_of(proc.read_file("/proc/self/stat")), session)
            local res = assert(client.get(port, "/demo/hello"))
            assert.equal(200, res.status)
            assert.equal("/hello", cjson.decode(res.body).path)
            -- two workers and the control process
            assert.is_truthy(eventually(function()
                return #proc.children(pid) == 3
            end, 5))
            -- the error log goes to <conf dir>/moongate.log
            assert.matches("moongate started", proc.read_file(dir .. "/moongate.log") or "")
            rc, out = moongate("stop", "-c", conf)
            assert.equal(0, rc, out)
            assert.is_false(proc.alive(pid))
            assert.is_nil(proc.read_file(dir .. "/moongate.pid"))
            assert.is_nil(client.connect(port, nil, 1))
        end)

        it("-d reports a start-up failure on the terminal with exit 1", function()
            local holder = assert(socket.bind("127.0.0.1", 0))
            local _, held = holder:getsockname()
            local _, conf = config_dir({ listen = { { address = "127.0.0.1:" .. held } } })
            local rc, out = moongate("start", "-c", conf, "-d")
            holder:close()
            assert.equal(1, rc)
            assert.equal(1, #lines(out), out)
            assert.matches("in use", out)
        end)
    end)

    describe("start-up failures", function()
        it("port already in use: exit 1 with a one-line reason", function()
            local holder = assert(socket.bind("127.0.0.1", 0))
            local _, held = holder:getsockname()
            local _, conf = config_dir({ listen = { { address = "127.0.0.1:" .. held } } })
            local rc, out = moongate("start", "-c", conf)
            holder:close()
            assert.equal(1, rc)
            local l = lines(out)
            assert.equal(1, #l, out)
            assert.matches("127%.0%.0%.1:" .. held, l[1])
            assert.matches("in use", l[1])
        end)

        it("port held by another moongate (SO_REUSEPORT too): exit 1, the first keeps it",
            function()
                local mock = gateway.mock()
                local gw = start{ routes = demo_routes(mock) }
                local _, conf = config_dir({ listen = { { address = "127.0.0.1:" .. gw.port } } },
                    demo_routes(mock))
                local rc, out = moongate("start", "-c", conf)
                assert.equal(1, rc)
                assert.equal(1, #lines(out), out)
                assert.matches("in use", out)
                for _ = 1, 10 do
                    assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
                end
            end)

        local function assert_one_line_failure(rc, out, dir)
            assert.equal(1, rc, "exit code " .. rc .. " (a signal or core dump is not 1)")
            assert.equal(1, #lines(out), out)
            assert.is_nil(out:find("core dumped", 1, true))
            assert.is_nil(proc.read_file(dir .. "/core"))
        end

        it("config file missing: exit 1 with one line naming it", function()
            local dir = config_dir()
            local rc, out = proc.run({ "sh", "-c", "cd " .. proc.quote(dir) .. " && exec "
                .. proc.quote(gateway.bin()) .. " start -c " .. proc.quote(dir .. "/nope.json") },
                { stderr = true })
            assert_one_line_failure(rc, out, dir)
            assert.matches("nope%.json", out)
        end)

        it("config path is a directory: exit 1 with one line", function()
            local dir = config_dir()
            local rc, out = proc.run({ "sh", "-c", "cd " .. proc.quote(dir) .. " && exec "
                .. proc.quote(gateway.bin()) .. " start -c " .. proc.quote(dir) },
                { stderr = true })
            assert_one_line_failure(rc, out, dir)
        end)

        it("config file without read permission: exit 1 with one line", function()
            local dir, conf = config_dir()
            assert.equal(0, (proc.run({ "chmod", "000", conf })))
            assert.equal(0, (proc.run({ "chmod", "755", dir })))
            local argv = { gateway.bin(), "start", "-c", conf }
            local rc0 = proc.run({ "id", "-u" })
            local _, uid = proc.run({ "id", "-u" })
            if rc0 == 0 and tonumber(uid) == 0 then
                -- root reads anything: run as nobody, who cannot
                argv = { "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         gateway.bin(), "start", "-c", conf }
            end
            local rc, out = proc.run(argv, { stderr = true })
            assert_one_line_failure(rc, out, dir)
            assert.matches("moongate%.json", out)
            assert.matches("[Pp]ermission denied", out)
        end)

        it("config that is not JSON: exit 1 with one line", function()
            local dir, conf = config_dir()
            proc.write_file(conf, "workers = 2\n")
            local rc, out = moongate("start", "-c", conf)
            assert_one_line_failure(rc, out, dir)
        end)

        it("routes.json invalid: exit 1, nothing left running", function()
            local dir, conf, port = config_dir(nil, '{"routes": [{"id": 1}]}')
            local rc, out = moongate("start", "-c", conf)
            assert.equal(1, rc, out)
            assert.matches("routes%[0%]", out)
            assert.is_nil(proc.read_file(dir .. "/moongate.pid"))
            assert.is_nil(client.connect(port, nil, 1))
        end)
    end)

    describe("reload", function()
        it("swaps in a changed routes.json without restarting master or workers", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 2 }
            local before = gw:workers()
            assert.equal(2, #before)
            assert.equal(404, assert(client.get(gw.port, "/new/x")).status)

            gw:write_routes(demo_routes(mock, {
                { id = "new", paths = { "/new/*" }, upstream = "m" },
            }))
            local rc, out = gw:reload()
            assert.equal(0, rc, out)
            -- every worker has the new routes (several connections reach both)
            assert.is_truthy(eventually(function()
                for _ = 1, 10 do
                    local res = client.get(gw.port, "/new/x")
                    if not res or res.status ~= 200 then
                        return false
                    end
                end
                return true
            end, 3), gw:log_tail())
            local res = assert(client.get(gw.port, "/new/x"))
            assert.equal("/new/x", cjson.decode(res.body).path)
            assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
            assert.is_true(proc.alive(gw.pid))
            assert.same(before, gw:workers())
        end)

        it("drops a removed route", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock, {
                { id = "gone", paths = { "/gone/*" }, upstream = "m" },
            }) }
            assert.equal(200, assert(client.get(gw.port, "/gone/x")).status)
            gw:write_routes(demo_routes(mock))
            assert.equal(0, (gw:reload()))
            assert.is_truthy(eventually(function()
                return assert(client.get(gw.port, "/gone/x")).status == 404
            end, 3))
        end)

        it("lets a request in flight finish on its old route", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock) }
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/demo/slow?delay_ms=800" }))
            socket.sleep(0.2)
            gw:write_routes({ upstreams = { gateway.upstream("m", mock) },
                              routes = { { id = "other", paths = { "/other/*" }, upstream = "m" } } })
            assert.equal(0, (gw:reload()))
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            assert.equal("/slow", cjson.decode(res.body).path)
        end)

        it("refuses an invalid routes.json: exit 1 naming the error, old routes keep answering",
            function()
                local mock = gateway.mock()
                local gw = start{ routes = demo_routes(mock), workers = 2 }
                local before = gw:workers()
                gw:write_routes('{"routes": [{"id": "bad", "paths": ["/b/*"], "upstream": "nope"}]}')
                local rc, out = gw:reload()
                assert.equal(1, rc)
                assert.matches("routes%[0%]%.upstream", out)
                for _ = 1, 10 do
                    local res = assert(client.get(gw.port, "/demo/x"))
                    assert.equal(200, res.status)
                end
                assert.equal(404, assert(client.get(gw.port, "/b/x")).status)
                assert.same(before, gw:workers())
                assert.is_true(proc.alive(gw.pid))
            end)

        it("refuses routes.json that is not JSON: exit 1, old routes keep answering", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock) }
            gw:write_routes('{"routes": [')
            local rc, out = gw:reload()
            assert.equal(1, rc)
            assert.is_truthy(#lines(out) >= 1)
            assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
        end)

        it("SIGHUP to the master with an invalid routes.json keeps the old routes and logs why",
            function()
                local mock = gateway.mock()
                local gw = start{ routes = demo_routes(mock) }
                gw:write_routes('{"routes": [{"id": "bad", "paths": [5]}]}')
                proc.kill(gw.pid, "HUP")
                assert.is_truthy(eventually(function()
                    return gw:log():find("routes%[0%]%.paths%[0%]")
                end, 3), gw:log_tail())
                for _ = 1, 5 do
                    assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
                end
                assert.is_true(proc.alive(gw.pid))
            end)

        it("a worker respawned after a refused reload runs the last good routes", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 1 }
            assert.equal(200, assert(client.get(gw.port, "/demo/x")).status)
            gw:write_routes('{"routes": [{"id": "bad", "paths": [5]}]}')
            assert.equal(1, (gw:reload()))
            local victim = gw:workers()[1]
            proc.kill(victim, "KILL")
            assert.is_truthy(eventually(function()
                local now = gw:workers()
                return #now == 1 and now[1] ~= victim
            end, 2))
            for _ = 1, 5 do
                local res = assert(client.get(gw.port, "/demo/x", nil, { timeout = 3 }))
                assert.equal(200, res.status)
            end
            assert.is_nil(gw:log():find("exited with code 1", 1, true), gw:log_tail())
        end)

        it("a worker respawned after a good reload runs the new routes", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 1 }
            gw:write_routes(demo_routes(mock, { { id = "new", paths = { "/new/*" }, upstream = "m" } }))
            assert.equal(0, (gw:reload()))
            assert.is_truthy(eventually(function()
                return assert(client.get(gw.port, "/new/x")).status == 200
            end, 3))
            local victim = gw:workers()[1]
            proc.kill(victim, "KILL")
            proc.wait_exit(victim, 1)
            local res = assert(client.get(gw.port, "/new/x", nil, { timeout = 3 }))
            assert.equal(200, res.status)
        end)

        it("re-reads a changed policy module", function()
            local mock = gateway.mock()
            local pdir = proc.tmpdir()
            dirs[#dirs + 1] = pdir
            local function write_policy(value)
                proc.write_file(pdir .. "/tag-it.lua", ([[
                    return { name = "tag-it", priority = 1,
                      header_filter = function(conf, ctx)
                        ctx.resp:set_header("X-Tag", %q)
                      end }
                ]]):format(value))
            end
            write_policy("v1")
            local routes = { upstreams = { gateway.upstream("m", mock) },
                             routes = { { id = "t", paths = { "/t/*" }, upstream = "m",
                                          policies = { { name = "tag-it" } } } } }
            local gw = start{ routes = routes, node = { lua_path = { pdir } } }
            assert.equal("v1", assert(client.get(gw.port, "/t/x")).headers["x-tag"])
            write_policy("v2")
            assert.equal(0, (gw:reload()))
            assert.is_truthy(eventually(function()
                return assert(client.get(gw.port, "/t/x")).headers["x-tag"] == "v2"
            end, 3), gw:log_tail())
        end)

        it("reload with no gateway running exits 1 with one line", function()
            local _, conf = config_dir()
            local rc, out = moongate("reload", "-c", conf)
            assert.equal(1, rc)
            assert.equal(1, #lines(out), out)
        end)
    end)

    describe("workers", function()
        it("a SIGKILLed worker is respawned within 1 s and the master logs it", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 2 }
            local before = gw:workers()
            assert.equal(2, #before)
            local victim = before[1]
            assert.is_true(proc.kill(victim, "KILL"))
            local t0 = gettime()
            local after = eventually(function()
                local now = gw:workers()
                if #now == 2 and not contains(now, victim) then
                    return now
                end
            end, 1.5)
            local took = gettime() - t0
            assert.is_truthy(after, "no respawn; workers now: "
                .. table.concat(gw:workers(), " "))
            assert.is_true(took <= 1.0, "respawned after " .. took .. " s")
            assert.is_true(contains(after, before[2]), "the other worker was restarted too")
            for _ = 1, 20 do
                local res = assert(client.get(gw.port, "/demo/x"))
                assert.equal(200, res.status)
            end
            assert.matches("pid " .. victim .. "%) exited on signal 9", gw:log())
            assert.matches("respawn", gw:log())
        end)

        it("the only worker killed: requests are answered again once it is back", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 1 }
            local victim = gw:workers()[1]
            proc.kill(victim, "KILL")
            proc.wait_exit(victim, 1)
            -- connections made meanwhile wait in the socket the master keeps
            local res = assert(client.get(gw.port, "/demo/x", nil, { timeout = 3 }))
            assert.equal(200, res.status)
            local now = gw:workers()
            assert.equal(1, #now)
            assert.is_not.equal(victim, now[1])
        end)

        it("workers = 3 in the conf gives 3 workers", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 3 }
            assert.is_truthy(eventually(function()
                return #gw:workers() == 3
            end, 3), "workers: " .. table.concat(gw:workers(), " "))
            socket.sleep(0.2)
            assert.equal(3, #gw:workers())
            assert.matches("3 worker%(s%)", gw:log())
        end)

        it('workers = "auto" (the default) gives one per core', function()
            local cores = nproc()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), expect_workers = cores,
                              node = { workers = gateway.DELETE } }
            assert.is_truthy(eventually(function()
                return #gw:workers() == cores
            end, 3), "workers: " .. table.concat(gw:workers(), " ") .. ", cores: " .. cores)
            local gw2 = start{ routes = demo_routes(mock), expect_workers = cores,
                               node = { workers = "auto" } }
            assert.is_truthy(eventually(function()
                return #gw2:workers() == cores
            end, 3))
        end)

        it("workers of a stopped gateway are all gone", function()
            local mock = gateway.mock()
            local gw = start{ routes = demo_routes(mock), workers = 2 }
            local ws = gw:workers()
            assert.equal(2, #ws)
            local clean, info = gw:stop()
            assert.is_true(clean, info.output)
            for _, p in ipairs(ws) do
                assert.is_false(proc.alive(p))
            end
        end)
    end)
end)
