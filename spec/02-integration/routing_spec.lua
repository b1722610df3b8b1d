-- Routing through a real gateway in front of the mock backend (which echoes
-- the request it received as JSON): which route a request takes, the path
-- the backend receives after strip_prefix and rewrite, the parameters a
-- policy sees, and the 404 JSON when nothing matches. Routes that only
-- need to say "this one was taken" rewrite the path to /tag/<route id>.
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-it"

local function tagged(id, t)
    t.id = id
    t.upstream = "mock"
    t.rewrite = "/tag/" .. id
    return t
end

local ROUTES = {
    -- strip_prefix and rewrite
    { id = "strip", paths = { "/svc/*" }, upstream = "mock", strip_prefix = true },
    { id = "strip-rewrite", paths = { "/v1/*" }, upstream = "mock", strip_prefix = true,
      rewrite = "/api/v2/" },
    { id = "tenant", paths = { "/t/:tenant/*" }, upstream = "mock", strip_prefix = true },
    { id = "kept", paths = { "/keep/*" }, upstream = "mock" },
    -- paths: exact over parameter over prefix
    tagged("p-prefix", { paths = { "/p/*" } }),
    tagged("p-param", { paths = { "/p/:id" } }),
    tagged("p-exact", { paths = { "/p/me" } }),
    -- hosts: exact over wildcard over none
    tagged("h-none", { paths = { "/h/*" } }),
    tagged("h-wild", { paths = { "/h/*" }, hosts = { "*.example.com" } }),
    tagged("h-exact", { paths = { "/h/*" }, hosts = { "api.example.com" } }),
    tagged("h-suffix", { paths = { "/h/*" }, hosts = { "example.*" } }),
    -- methods: one prefix, two routes
    tagged("m-get", { paths = { "/m/*" }, methods = { "GET" } }),
    tagged("m-post", { paths = { "/m/*" }, methods = { "POST" } }),
    -- a failing longer prefix falls back to the shorter one
    tagged("f-long-put", { paths = { "/f/a/*" }, methods = { "PUT" } }),
    tagged("f-short", { paths = { "/f/*" } }),
    -- header and query predicates
    tagged("canary", { paths = { "/c/*" }, headers = { ["X-Canary"] = { "1", "yes" } } }),
    tagged("stable", { paths = { "/c/*" } }),
    tagged("q-v2", { paths = { "/q" }, query = { v = "2" } }),
    tagged("q-any", { paths = { "/q" } }),
    -- priority beats a more specific path
    tagged("pr-exact", { paths = { "/pr/exact" } }),
    tagged("pr-high", { paths = { "/pr/*" }, priority = 10 }),
    -- percent-encoded paths are matched as received
    tagged("enc", { paths = { "/enc/a%20b" } }),
    -- parameters as a policy sees them (it-inspect answers with ctx.params)
    { id = "inspect", paths = { "/users/:id/posts/:post" }, upstream = "mock",
      policies = { { name = "it-inspect", conf = {} } } },
    -- the same after a sleep (it-sleep runs first: priority 70 > 10)
    { id = "slow-inspect", paths = { "/slow/:id/:n/*" }, upstream = "mock",
      policies = { { name = "it-sleep", conf = { ms = 150 } }, { name = "it-inspect", conf = {} } } },
}

describe("routing", function()
    local gw

    setup(function()
        local mock = gateway.mock()
        gw = gateway.start({
            routes = {
                upstreams = { gateway.upstream("mock", mock) },
                routes = ROUTES,
            },
            node = { lua_path = { POLICY_DIR } },
        })
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
    end)

    -- what the backend received: {method, path, query, headers}
    local function echo(opts)
        local res, err = client.request(gw.port, opts)
        assert.is_truthy(res, "request failed: " .. tostring(err))
        assert.equal(200, res.status, res.body)
        local ok, e = pcall(cjson.decode, res.body)
        assert.is_true(ok, "not the mock's echo: " .. tostring(res.body))
        return e
    end

    local function taken(path, opts)
        opts = opts or {}
        opts.path = path
        local e = echo(opts)
        return e.path:match("^/tag/(.*)$") or e.path
    end

    describe("the path the backend receives", function()
        it("without the prefix under strip_prefix, the query kept", function()
            local e = echo({ path = "/svc/a/b?x=1&y=%20" })
            assert.equal("/a/b", e.path)
            assert.equal("x=1&y=%20", e.query)
            assert.equal("/", echo({ path = "/svc" }).path)
            assert.equal("/", echo({ path = "/svc/" }).path)
        end)

        it("the rewrite plus the rest under strip_prefix and rewrite", function()
            assert.equal("/api/v2/users/7", echo({ path = "/v1/users/7" }).path)
            assert.equal("/api/v2/", echo({ path = "/v1" }).path)
        end)

        it("without the matched prefix, parameter value included, under /t/:tenant/*", function()
            assert.equal("/orders/7", echo({ path = "/t/acme/orders/7" }).path)
            assert.equal("/", echo({ path = "/t/initech" }).path)
        end)

        it("unchanged without strip_prefix, percent-encodings included", function()
            assert.equal("/keep/a%2Fb/c", echo({ path = "/keep/a%2Fb/c" }).path)
        end)
    end)

    describe("precedence", function()
        it("exact path over parameter over prefix", function()
            assert.equal("p-exact", taken("/p/me"))
            assert.equal("p-param", taken("/p/42"))
            assert.equal("p-prefix", taken("/p/42/x"))
            assert.equal("p-prefix", taken("/p/me/"))
            assert.equal("p-prefix", taken("/p"))
        end)

        it("exact host over wildcard over none; a port in Host does not matter", function()
            assert.equal("h-exact", taken("/h/1", { host = "api.example.com" }))
            assert.equal("h-exact", taken("/h/1", { host = "API.Example.com:8080" }))
            assert.equal("h-wild", taken("/h/1", { host = "www.example.com" }))
            assert.equal("h-suffix", taken("/h/1", { host = "example.org" }))
            assert.equal("h-none", taken("/h/1", { host = "other.test" }))
        end)

        it("priority first", function()
            assert.equal("pr-high", taken("/pr/exact"))
        end)
    end)

    describe("predicates", function()
        it("methods: GET and POST routes on one prefix", function()
            assert.equal("m-get", taken("/m/x", { method = "GET" }))
            assert.equal("m-post", taken("/m/x", { method = "POST", body = "" }))
            local res = client.request(gw.port, { method = "DELETE", path = "/m/x" })
            assert.equal(404, res.status)
        end)

        it("a longer prefix whose method fails falls back to the shorter", function()
            assert.equal("f-long-put", taken("/f/a/b", { method = "PUT", body = "" }))
            assert.equal("f-short", taken("/f/a/b", { method = "GET" }))
        end)

        it("headers: a listed value takes the route, any other does not", function()
            assert.equal("canary", taken("/c/x", { headers = { ["X-Canary"] = "1" } }))
            assert.equal("canary", taken("/c/x", { headers = { ["x-canary"] = "yes" } }))
            assert.equal("stable", taken("/c/x", { headers = { ["X-Canary"] = "0" } }))
            assert.equal("stable", taken("/c/x"))
        end)

        it("query: the decoded value must match", function()
            assert.equal("q-v2", taken("/q?v=2"))
            assert.equal("q-v2", taken("/q?a=1&v=%32"))
            assert.equal("q-any", taken("/q?v=3"))
            assert.equal("q-any", taken("/q?v=2&v=3"))
            assert.equal("q-any", taken("/q"))
        end)
    end)

    it("matches percent-encoded paths as received, without decoding", function()
        assert.equal("enc", taken("/enc/a%20b"))
        assert.equal(404, client.get(gw.port, "/enc/a%20B").status)
        assert.equal(404, client.get(gw.port, "/enc/a+b").status)
    end)

    it("gives a policy the path parameters in ctx.params", function()
        local res = client.get(gw.port, "/users/alice/posts/42")
        assert.equal(200, res.status, res.body)
        local body = cjson.decode(res.body)
        assert.equal("inspect", body.route)
        assert.same({ id = "alice", post = "42" }, body.params)
    end)

    it("gives each request its own ctx.params, read after other requests were routed", function()
        -- 8 requests sleep in a policy, then read ctx.params; while they
        -- sleep, 30 more requests with other values are routed (the
        -- values stay in the path until read: nothing of a later lookup
        -- may show through)
        local conns = {}
        for i = 1, 8 do
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/slow/id-" .. i .. "/" .. (i * 1000) .. "/rest/of/it" }))
            conns[i] = c
        end
        for i = 1, 30 do
            local res = client.get(gw.port, "/users/u" .. i .. "/posts/" .. i)
            assert.equal(200, res.status, res.body)
            assert.same({ id = "u" .. i, post = tostring(i) }, cjson.decode(res.body).params)
        end
        for i, c in ipairs(conns) do
            local res = assert(c:read_response({ timeout = 5 }))
            assert.equal(200, res.status, res.body)
            local body = cjson.decode(res.body)
            assert.equal("slow-inspect", body.route)
            assert.same({ id = "id-" .. i, n = tostring(i * 1000) }, body.params)
            c:close()
        end
    end)

    it("answers 404 with a JSON body when no route matches", function()
        for _, path in ipairs({ "/nothing", "/svcx", "/users/alice/posts", "/users//posts/1" }) do
            local res = client.get(gw.port, path)
            assert.equal(404, res.status, path)
            assert.matches("^application/json", res.headers["content-type"])
            local body = cjson.decode(res.body)
            assert.equal("no route matched", body.error)
            assert.is_string(body.request_id)
            assert.equal(res.headers["x-request-id"], body.request_id)
        end
    end)

    -- (these ran against the worker's match cache, gone since the
    -- lookup is C; what they check holds for any lookup)
    describe("repeated and interleaved requests", function()
        it("keeps methods and hosts apart, however the requests interleave", function()
            for _ = 1, 3 do
                assert.equal("m-get", taken("/m/x", { method = "GET" }))
                assert.equal("m-post", taken("/m/x", { method = "POST", body = "" }))
                assert.equal(404, client.request(gw.port, { method = "DELETE",
                                                            path = "/m/x" }).status)
                assert.equal("h-exact", taken("/h/1", { host = "api.example.com" }))
                assert.equal("h-none", taken("/h/1", { host = "other.test" }))
                assert.equal("h-wild", taken("/h/1", { host = "www.example.com" }))
                assert.equal("h-none", taken("/h/1"))
            end
        end)

        it("gives each request its own parameters", function()
            for _, id in ipairs({ "alice", "bob", "alice" }) do
                local res = client.get(gw.port, "/users/" .. id .. "/posts/7")
                assert.equal(200, res.status, res.body)
                assert.same({ id = id, post = "7" }, cjson.decode(res.body).params)
            end
        end)

        it("answers a reload's routes at once", function()
            local mock = gateway.mock()
            local function doc(id)
                local list = { tagged(id, { paths = { "/r/*" } }) }
                if id == "old" then
                    list[2] = tagged("gone", { paths = { "/gone" } })
                end
                return { upstreams = { gateway.upstream("mock", mock) }, routes = list }
            end
            local g = gateway.start({ routes = doc("old"), workers = 1 })
            local function tag(path)
                local res = assert(client.get(g.port, path))
                if res.status ~= 200 then
                    return res.status
                end
                return cjson.decode(res.body).path:match("^/tag/(.*)$")
            end
            for _ = 1, 3 do
                assert.equal("old", tag("/r/x"))
                assert.equal("gone", tag("/gone"))
            end
            local before = g:config_versions()[0]
            g:write_routes(doc("new"))
            local rc, out = g:reload()
            assert.equal(0, rc, out)
            assert.truthy(proc.eventually(function()
                local now = g:config_versions()[0]
                return now and now > before
            end, 10), "the reload did not reach the worker")
            for _ = 1, 3 do
                assert.equal("new", tag("/r/x"))
                assert.equal(404, tag("/gone"))
            end
            g:stop()
        end)

        -- nothing is kept for misses: a client sending a new Host with
        -- every request that 404s must not grow the worker
        it("keeps nothing for requests that miss, whatever their Host", function()
            local c
            local function flood(from, to)
                for i = from, to do
                    if (i - from) % 500 == 0 then -- within keep-alive's request limit
                        if c then
                            c:close()
                        end
                        c = assert(client.connect(gw.port))
                    end
                    assert(c:request({ path = "/nothing/" .. i,
                                       headers = { Host = "h" .. i .. ".flood.test" } }))
                    assert.equal(404, assert(c:read_response()).status)
                end
            end
            local function rss() -- of every worker: connections spread
                local kb = 0
                for _, pid in ipairs(gw:workers()) do
                    kb = kb + proc.rss_kb(pid)
                end
                return kb
            end
            flood(1, 2000) -- warm up: buffers, the GC's own pace
            local before = rss()
            flood(2001, 22000)
            local after = rss()
            -- kept, each miss would hold a host string and a table
            -- (~250 bytes: ~5 MB for 20,000)
            assert.is_true(after - before < 2000,
                           ("worker RSS %d -> %d KiB"):format(before, after))
        end)

        it("answers thousands of distinct paths and long ones", function()
            local c = assert(client.connect(gw.port))
            for i = 1, 5000 do
                assert(c:request({ path = "/keep/" .. i }))
                local res = assert(c:read_response())
                assert.equal(200, res.status)
                if i % 1000 == 0 then
                    assert.equal("/keep/" .. i, cjson.decode(res.body).path)
                end
            end
            assert.equal("/keep/1", echo({ path = "/keep/1" }).path)
            local long = "/keep/" .. ("x"):rep(300)
            assert.equal(long, echo({ path = long }).path)
            assert.equal("/a", echo({ path = "/svc/a" }).path)
        end)
    end)
end)
