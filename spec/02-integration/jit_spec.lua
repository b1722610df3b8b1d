-- The request path stays JIT-compiled: key-auth + rate-limit (the bench
-- row "moongate-ratelimit") on a real gateway with MOONGATE_JITV, and the
-- worker's trace log after a few thousand requests. A change that brings
-- back a pcall per policy, a coroutine.running per phase, a tail call into
-- a builtin or a per-request loop shows here as an abort in a request-path
-- file; the gateway would still answer, only slower (README
-- "Performance").
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

-- the files of the request path
local REQUEST_PATH = { "worker%.lua", "request%.lua", "context%.lua", "consumers%.lua",
                       "limit%.lua", "key%-auth%.lua", "rate%-limit%.lua", "moongate/init%.lua" }

-- The router's walk is C (route.c) since 2026-11-29; when it was a Lua
-- loop, LuaJIT gave up the traces that started before it until it
-- blacklisted their start (what it is meant to do). Kept: a router.lua
-- loop (the predicate checks' loop, parameters past two) may still do so.
local function expected(line)
    return line:find("inner loop in root trace at router.lua", 1, true)
        or line:find("blacklisted at router.lua", 1, true)
end

-- whether a -jv log line names a file of the request path
local function on_path(line)
    for _, file in ipairs(REQUEST_PATH) do
        if line:find(file) then
            return true
        end
    end
    return false
end

describe("JIT", function()
    local gw, jitv, routes

    setup(function()
        local mock = gateway.mock()
        jitv = proc.tmpdir() .. "/jitv"
        routes = {
            upstreams = { gateway.upstream("a", mock) },
            routes = { { id = "bench", paths = { "/*" }, upstream = "a", policies = {
                { name = "key-auth" },
                { name = "rate-limit", conf = { rate = 1e6, burst = 1e6, key = "consumer" } },
            } } },
            consumers = { { id = "bench", credentials = { ["key-auth"] = { key = "k" } } } },
        }
        gw = gateway.start{
            workers = 1,
            env = { MOONGATE_JITV = jitv },
            routes = routes,
        }
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
    end)

    local function read_log(from)
        local f = assert(io.open(jitv .. ".0", "rb"))
        f:seek("set", from or 0)
        local log = f:read("*a")
        f:close()
        return log
    end

    it("key-auth + rate-limit run compiled: no aborts on the request path", function()
        local c = assert(client.connect(gw.port))
        assert(c:request({ path = "/x", headers = { apikey = "k" } }))
        assert.equal(200, assert(c:read_response()).status)
        -- what the config's build traced is before this (config.lua,
        -- schema.lua and worker.lua's building have loops of their own)
        local start = #read_log()
        for i = 1, 3000 do
            assert(c:request({ path = "/x", headers = { apikey = "k" } }))
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            if i == 1 then
                assert.equal("1000000", res.headers["ratelimit-limit"])
                assert.equal("/x", cjson.decode(res.body).path)
            end
        end
        -- a refused key and an error in between change nothing
        assert(c:request({ path = "/x", headers = { apikey = "nope" } }))
        assert.equal(401, assert(c:read_response()).status)
        local log = read_log(start)
        local aborts, traces = {}, 0
        for line in log:gmatch("[^\n]+") do
            if line:find("^%[TRACE %-%-%-") and not expected(line) and on_path(line) then
                aborts[#aborts + 1] = line
            elseif line:find("^%[TRACE +%d+ ") and on_path(line) then
                traces = traces + 1 -- a trace of the request path: the JIT ran on it
            end
        end
        assert.same({}, aborts)
        -- these requests made traces of the request path (the check above
        -- is not vacuous: the JIT was on and compiled it); how many depends
        -- on what the first request's traces covered already
        assert.is_true(traces >= 1, "no trace of the request path:\n" .. log)
    end)

    -- the tools README's "Performance" names: the trace dump as traces are
    -- made, the profile when the worker stops gracefully (a gateway of
    -- their own: jit.v's log and jit.dump do not share the trace events)
    it("MOONGATE_JITDUMP and MOONGATE_JITP write the trace dump and the profile", function()
        local dir = proc.tmpdir()
        local jitp, jitdump = dir .. "/jitp", dir .. "/jitdump"
        local g = gateway.start{
            workers = 1,
            -- "vl": VM states with their lines; i1: a sample every ms
            env = { MOONGATE_JITP = jitp, MOONGATE_JITP_MODE = "vli1", MOONGATE_JITDUMP = jitdump },
            routes = routes,
        }
        local c = assert(client.connect(g.port))
        for _ = 1, 2000 do
            assert(c:request({ path = "/y", headers = { apikey = "k" } }))
            assert.equal(200, assert(c:read_response()).status)
        end
        c:close()
        assert(g:stop())
        local f = assert(io.open(jitdump .. ".0", "rb"))
        local dump = f:read("*a")
        f:close()
        assert.truthy(dump:find("---- TRACE %d+ IR"), "no trace IR in the dump")
        assert.truthy(dump:find("---- TRACE %d+ mcode"), "no machine code in the dump")
        f = assert(io.open(jitp .. ".0", "rb"))
        local prof = f:read("*a")
        f:close()
        -- the VM states sampled (which ones depends on timing: the worker
        -- spends most of its time in C, its compiled Lua a few us a request)
        assert.truthy(prof:find("%d+%%%s+C code") or prof:find("%d+%%%s+Compiled")
                      or prof:find("%d+%%%s+Interpreted"), "no VM state in:\n" .. prof)
        assert.truthy(prof:find("%.lua:%d+"), "no line in:\n" .. prof)
    end)
end)
