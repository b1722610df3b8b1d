-- Reload without restarts, under load (issue 3, item 6): keep-alive clients
-- run through 20 reloads that add and remove routes and edit a policy's Lua
-- source; no request fails, every response shows one whole config version,
-- requests and streams in flight finish on the version they started on,
-- invalid configs are refused and the workers are never restarted.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local gettime = socket.gettime

local ROOT = gateway.root
local FIXTURE = ROOT .. "/spec/fixtures/reload"
local WORKERS = 2
local RELOADS = 20
local LOADERS = 4
-- the policy's source is edited before these reloads
local POLICY_EDITS = { [4] = true, [8] = true, [12] = true, [16] = true, [20] = true }
-- a slow request is sent before these reloads and read after the last one
local SLOW_AT = { [3] = true, [8] = true, [13] = true, [18] = true }
-- 150 pieces 100 ms apart: outlasts the reloads (they take ~7 s)
local STREAM_PATH = "/load/stream?bytes=153600&chunk=1024&drip_ms=100"

local eventually = proc.eventually

local count = proc.count
local function keys(t)
    local out = {}
    for k in pairs(t) do
        out[#out + 1] = k
    end
    table.sort(out)
    return out
end

describe("reload", function()
    local pids, dirs = {}, {}

    after_each(function()
        for _, pid in ipairs(pids) do
            if proc.alive(pid) then
                proc.kill(pid, "KILL")
            end
        end
        pids = {}
        client.close_all()
        gateway.stop_all()
        for _, d in ipairs(dirs) do
            proc.cleanup(d)
        end
        dirs = {}
    end)

    it("serves keep-alive load through 20 reloads: no failed request, one version each",
        function()
            local mock = gateway.mock()
            local pdir = proc.tmpdir()
            local work = proc.tmpdir()
            dirs[#dirs + 1] = pdir
            dirs[#dirs + 1] = work
            local source = assert(proc.read_file(FIXTURE .. "/policies/reload-tag.lua"))

            local policy_version = "p0" -- the fixture's own, until the first edit
            local function write_policy(version)
                local text, n = source:gsub('local VERSION = "p0"',
                    ('local VERSION = "%s"'):format(version))
                assert(n == 1)
                proc.write_file(pdir .. "/reload-tag.lua", text)
                policy_version = version
            end

            local function tag(config)
                return { name = "reload-tag", conf = { config = config } }
            end
            -- version k: /load/* tagged "c<k>", 50 routes that never change,
            -- and /add<k-1>/*, /add<k>/* (so each reload adds one route and
            -- removes one)
            local function routes_for(k)
                local routes = {
                    { id = "load", paths = { "/load/*" }, upstream = "m", policies = { tag("c" .. k) } },
                }
                for i = 1, 50 do
                    routes[#routes + 1] = { id = "f" .. i, paths = { "/f" .. i .. "/*" },
                                            upstream = "m", policies = { tag("filler") } }
                end
                for j = math.max(1, k - 1), k do
                    routes[#routes + 1] = { id = "add" .. j, paths = { "/add" .. j .. "/*" },
                                            upstream = "m", policies = { tag("add") } }
                end
                return { upstreams = { gateway.upstream("m", mock) }, routes = routes }
            end

            -- the versions a response may show: "<config>|<policy source>"
            local valid = {}
            local function version_of(k)
                return "c" .. k .. "|" .. policy_version
            end
            valid[version_of(0)] = true

            local gw = gateway.start{
                routes = routes_for(0), workers = WORKERS,
                node = { lua_path = { pdir, FIXTURE .. "/policies" } },
                env = { MOONGATE_RELOAD_TIMING = "1" },
            }
            -- a SIGHUP before a worker has its handlers is lost for it
            assert.is_truthy(eventually(function()
                local _, started = gw:log():gsub("worker %d+ started", "")
                return started >= WORKERS and #gw:workers() == WORKERS
            end, 10), gw:log_tail())
            assert.is_truthy(eventually(function()
                local res = client.get(gw.port, "/load/x")
                return res and res.status == 200
            end, 5), gw:log_tail())
            local workers = gw:workers()

            -- the clients
            local stop_file = work .. "/stop"
            local env = { LUA_PATH = ROOT .. "/spec/?.lua;" .. ROOT .. "/lua/?.lua;;" }
            local outs = {}
            for i = 1, LOADERS do
                outs[i] = work .. "/load-" .. i .. ".json"
                pids[#pids + 1] = proc.spawn({ "luajit", FIXTURE .. "/load.lua", "loop",
                    tostring(gw.port), "/load/x", stop_file, outs[i], "50000", "60" },
                    { env = env, cwd = ROOT, log = work .. "/load-" .. i .. ".log" })
            end
            local stream_out = work .. "/stream.json"
            local stream_pid = proc.spawn({ "luajit", FIXTURE .. "/load.lua", "stream",
                tostring(gw.port), STREAM_PATH, stream_out },
                { env = env, cwd = ROOT, log = work .. "/stream.log" })
            pids[#pids + 1] = stream_pid
            socket.sleep(0.5)

            local slow = {}
            local reloaded = 0
            local function apply(k)
                local rc, out = gw:reload()
                assert.equal(0, rc, out)
                reloaded = reloaded + 1
                assert.is_truthy(eventually(function()
                    return count(gw:log(), "reloaded configuration\n") >= WORKERS * reloaded
                end, 10), "reload " .. k .. " not applied by every worker\n" .. gw:log_tail())
            end
            local function answers(k)
                local res = assert(client.get(gw.port, "/load/x"))
                assert.equal(200, res.status)
                assert.equal(version_of(k),
                    res.headers["x-config-version"] .. "|" .. res.headers["x-policy-version"])
                -- a route whose entry never changes runs the policy's
                -- current source too
                res = assert(client.get(gw.port, "/f1/x"))
                assert.equal("filler|" .. policy_version,
                    res.headers["x-config-version"] .. "|" .. res.headers["x-policy-version"])
            end

            local t_first = gettime()
            local applied_at = {}
            for k = 1, RELOADS do
                if SLOW_AT[k] then
                    local c = assert(client.connect(gw.port, nil, 10))
                    assert(c:request({ path = "/load/slow?delay_ms=1500" }))
                    slow[#slow + 1] = { conn = c, expect = version_of(k - 1) }
                    socket.sleep(0.2) -- its access phase runs on version k-1
                end

                if k == 7 then
                    -- an invalid routes.json: refused by `reload` and by a
                    -- SIGHUP to the master, both naming the error
                    local bad = routes_for(k)
                    bad.routes[1].upstream = "nope"
                    gw:write_routes(bad)
                    local rc, out = gw:reload()
                    assert.equal(1, rc)
                    assert.matches("routes%[0%]%.upstream: unknown upstream \"nope\"", out)
                    proc.kill(gw.pid, "HUP")
                    assert.is_truthy(eventually(function()
                        return gw:log():find("reload: [^\n]*routes%[0%]%.upstream: unknown upstream")
                    end, 5), gw:log_tail())
                    answers(k - 1)
                end
                if k == 12 then
                    -- a policy source that does not load: refused, the old
                    -- module keeps running
                    proc.write_file(pdir .. "/reload-tag.lua", "return {")
                    local rc, out = gw:reload()
                    assert.equal(1, rc)
                    assert.matches("reload%-tag\" failed to load", out)
                    answers(k - 1)
                end

                if POLICY_EDITS[k] then
                    write_policy("p" .. k)
                end
                gw:write_routes(routes_for(k))
                valid[version_of(k)] = true
                apply(k)
                applied_at[k] = gettime()
                answers(k)
                local res = assert(client.get(gw.port, "/add" .. k .. "/x"))
                assert.equal(200, res.status)
                if k > 2 then
                    assert.equal(404, assert(client.get(gw.port, "/add" .. (k - 2) .. "/x")).status)
                end
                socket.sleep(0.15)
            end

            -- requests in flight finish on the version they started on
            for i, s in ipairs(slow) do
                local res = assert(s.conn:read_response({ timeout = 10 }))
                assert.equal(200, res.status)
                assert.equal(s.expect, res.headers["x-config-version"] .. "|"
                    .. res.headers["x-policy-version"], "slow request " .. i)
            end

            -- the clients
            proc.write_file(stop_file, "stop")
            local requests, seen = 0, {}
            for i = 1, LOADERS do
                assert.is_truthy(proc.wait_exit(pids[i], 20), "load client " .. i .. " still running")
                local text = proc.read_file(outs[i])
                assert.is_string(text, "no summary from load client " .. i)
                local summary = cjson.decode(text)
                assert.same({}, summary.errors, "load client " .. i)
                assert.same({ "200" }, keys(summary.statuses), "load client " .. i)
                for v, n in pairs(summary.versions) do
                    assert.is_true(valid[v] == true, "unknown version " .. v .. " (" .. n .. " responses)")
                    seen[v] = true
                end
                requests = requests + summary.requests
            end
            assert.is_true(requests >= 200, "only " .. requests .. " requests")
            -- the load ran through the reloads, not before or after them
            assert.is_true(#keys(seen) >= RELOADS / 2, "versions seen: " .. table.concat(keys(seen), " "))

            -- the stream stayed open through every reload, on its version
            assert.is_truthy(proc.wait_exit(stream_pid, 30), "the stream did not end")
            local stream = cjson.decode((assert(proc.read_file(stream_out))))
            assert.is_nil(stream.error)
            assert.equal(200, stream.status)
            assert.equal(153600, stream.length)
            assert.equal("c0|p0", stream.version)
            -- (all 20 normally; at least half on a slow build, make asan)
            local spanned = 0
            for k = 1, RELOADS do
                if stream.first_at < t_first and stream.last_at > applied_at[k] then
                    spanned = spanned + 1
                end
            end
            assert.is_true(spanned >= RELOADS / 2, "the stream was open across "
                .. spanned .. " reloads only")

            -- a one-route change recompiles what changed only (version 6 is
            -- reload 5: "load" changed and "add5" added; 50 fillers and
            -- "add4" reused); a policy edit recompiles the routes using it
            local log = gw:log()
            assert.matches("reloaded configuration version 6 in [%d.]+ ms %(changed routes: 2, reused: 51", log)
            assert.matches("reloaded configuration version 5 in [%d.]+ ms %(changed routes: 53, reused: 0", log)

            assert.same(workers, gw:workers())
            assert.is_true(proc.alive(gw.pid))
            -- no worker refused or failed a reload the master passed on
            assert.is_nil(log:find("reload refused", 1, true), log)
            assert.is_nil(log:find("reload failed", 1, true), log)
        end)
end)
