-- The policy kit (DESIGN.md) as route policies use it, end to end: small
-- policies from spec/fixtures/policies-it/ (found through the node's
-- lua_path) on routes of a real gateway in front of mock backends; what the
-- mock receives and what the client gets are asserted.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local gettime = socket.gettime

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-it"

local eventually = proc.eventually

-- an upstream that must not be reached: trap.connected() tells
local trap = require("helpers.policy").trap

local function route(id, path, upstream, policies, extra)
    local r = { id = id, paths = { path }, upstream = upstream, strip_prefix = true,
                policies = policies }
    for k, v in pairs(extra or {}) do
        r[k] = v
    end
    return r
end

local function p(name, conf)
    return { name = name, conf = conf or {} }
end

-- Until the gateway's first worker has loaded its Lua, a connection waits;
-- this makes sure the first timed request does not pay for that.
local function wait_ready(gw, path)
    assert(eventually(function()
        local res = client.get(gw.port, path, nil, { timeout = 2 })
        return res ~= nil
    end, 5), "gateway not answering:\n" .. gw:log_tail())
end

local function echo_of(res)
    assert.equal(200, res.status, res.body)
    local ok, echo = pcall(cjson.decode, res.body)
    assert(ok, "not the mock's echo: " .. tostring(res.body))
    return echo
end

describe("policy kit", function()
    local gw, mock_a, mock_b, upstream_trap, log_file

    setup(function()
        mock_a = gateway.mock()
        mock_b = gateway.mock()
        upstream_trap = trap()
        local tmp = proc.tmpdir()
        log_file = tmp .. "/it-log.txt"
        local routes = {
            upstreams = {
                gateway.upstream("a", mock_a),
                gateway.upstream("b", mock_b),
                gateway.upstream("trap", upstream_trap.port),
                gateway.upstream("down", ports.free()),
            },
            routes = {
                route("reqh", "/reqh/*", "a", { p("it-req-headers", {
                    set = { ["X-Set"] = "s", ["X-Replace"] = "new" },
                    add = { ["X-Added"] = "added", ["X-Multi"] = "third" },
                    remove = { "X-Remove", "X-Remove-Twice" },
                    read_back = "X-Set",
                }) }),
                route("reqh-rewrite", "/reqh-rewrite/*", "a", { p("it-req-headers", {
                    phase = "rewrite", set = { ["X-Rewrite"] = "yes" }, remove = { "X-Remove" },
                }) }),
                route("resph", "/resph/*", "a", { p("it-resp-headers", {
                    set = { ["X-Resp-Set"] = "1", ["X-Replace-Me"] = "by-policy" },
                    add = { ["X-Resp-Add"] = "added" },
                    remove = { "X-From-Upstream" },
                }) }),
                -- numbers: whole ones are formatted in C (no string made in
                -- Lua); the rest go through tostring as before
                route("num-headers", "/num-headers/*", "a", {
                    p("it-req-headers", { set = { ["X-Int"] = 42, ["X-Neg"] = -7, ["X-Zero"] = 0,
                                                  ["X-Big"] = 99999999999999, ["X-Frac"] = 1.5 },
                                          add = { ["X-Multi"] = 3 } }),
                    p("it-resp-headers", { set = { ["X-Int"] = 1234567890123, ["X-Neg"] = -1,
                                                   ["X-Huge"] = 1e300, ["X-Frac"] = 0.25 },
                                           add = { ["X-Resp-Add"] = 5 } }),
                }),
                route("num-framing", "/num-framing/*", "a", { p("it-resp-headers", {
                    set = { ["Content-Length"] = 3 } }) }),
                route("framing-cl", "/framing-cl/*", "a", { p("it-resp-headers", {
                    set = { ["Content-Length"] = "3" } }) }),
                route("framing-te", "/framing-te/*", "a", { p("it-resp-headers", {
                    set = { ["Transfer-Encoding"] = "chunked" } }) }),
                route("framing-access", "/framing-access/*", "a", { p("it-resp-headers", {
                    phase = "access", set = { ["Content-Length"] = "3" } }) }),
                route("framing-deny", "/framing-deny/*", "trap", {
                    p("it-resp-headers", { phase = "access",
                                           set = { ["Transfer-Encoding"] = "chunked" } }),
                    p("it-respond", { status = 403, json = { error = "x" } }),
                }),
                route("decor", "/decor/*", "a", { p("it-resp-headers", {
                    phase = "access", set = { ["X-Decor"] = "d", ["X-Both"] = "policy" },
                }) }),
                route("decor-deny", "/decor-deny/*", "trap", {
                    p("it-resp-headers", { phase = "access", set = { ["X-Decor"] = "d" } }),
                    p("it-respond", { status = 403, json = { error = "x" } }),
                }),
                route("decor-down", "/decor-down/*", "down", {
                    p("it-resp-headers", { phase = "access", set = { ["X-Decor"] = "d" } }),
                }),
                route("deny", "/deny/*", "trap", {
                    p("it-respond", { status = 403, json = { error = "x" } }),
                }),
                route("deny-rewrite", "/deny-rewrite/*", "trap", {
                    p("it-respond", { status = 401, json = { error = "who" }, phase = "rewrite" }),
                }),
                route("local304", "/local304/*", "trap", {
                    p("it-respond", { status = 304, json = { error = "x" } }),
                }),
                route("local204", "/local204/*", "trap", {
                    p("it-respond", { status = 204, text = "text" }),
                }),
                route("text", "/text/*", "trap", {
                    p("it-respond", { status = 200, text = "text" }),
                }),
                route("pick", "/pick/*", "trap", { p("it-pick-upstream") }),
                route("sleep", "/sleep/*", "a", { p("it-sleep", { ms = 300 }) }),
                route("sleep50", "/sleep50/*", "a", { p("it-sleep", { ms = 50 }) }),
                route("body", "/body/*", "a", { p("it-body") }),
                route("body-answer", "/body-answer/*", "trap", { p("it-body", { answer = true }) }),
                route("body-stream", "/body-stream/*", "trap", { p("it-body", { stream = true }) }),
                route("late-body", "/late-body/*", "trap", {
                    p("it-sleep", { ms = 150 }), p("it-body", { answer = true }),
                }),
                route("late-proxy", "/late-proxy/*", "a", { p("it-sleep", { ms = 150 }) }),
                { id = "params", paths = { "/users/:id/items/:item" }, upstream = "trap",
                  policies = { p("it-inspect", { arg = "q" }) } },
                route("inspect", "/inspect/*", "trap", {
                    p("it-inspect", { arg = "q" }), p("it-vars", { value = "shared" }),
                }),
                route("raise", "/raise/*", "a", { p("it-raise", { when_header = true }) }),
                route("raise-late", "/raise-late/*", "a", {
                    p("it-vars", { value = "v" }), p("it-raise", { sleep_ms = 20 }),
                }),
                route("raise-table", "/raise-table/*", "a", {
                    p("it-raise", { table_error = true }),
                }),
                route("ctx", "/ctx/*", "trap", { p("it-ctx") }),
                route("raise-rewrite", "/raise-rewrite/*", "a", {
                    p("it-raise", { phase = "rewrite" }),
                }),
                route("raise-log", "/raise-log/*", "a", { p("it-raise", { phase = "log" }) }),
                route("raise-hf", "/raise-hf/*", "a", {
                    p("it-raise", { phase = "header_filter", when_header = true }),
                }),
                route("hf", "/hf/*", "a", { p("it-header-filter") }),
                route("logged", "/logged/*", "a", {
                    p("it-vars", { value = "v1" }), p("it-log", { file = log_file }),
                }),
                route("logged-deny", "/logged-deny/*", "trap", {
                    p("it-vars", { value = "v2" }), p("it-log", { file = log_file }),
                    p("it-respond", { status = 403, json = { error = "x" } }),
                }),
                route("logged-raise", "/logged-raise/*", "a", {
                    p("it-log", { file = log_file }), p("it-raise"),
                }),
                route("reqh-framing", "/reqh-framing/*", "a", { p("it-req-headers", {
                    set = { ["Content-Length"] = "3", ["Transfer-Encoding"] = "chunked",
                            ["Connection"] = "close" },
                }) }),
                route("plain", "/plain/*", "a", gateway.array()),
            },
        }
        gw = gateway.start{ routes = routes, workers = 1, node = { lua_path = { POLICY_DIR } } }
        wait_ready(gw, "/plain/ready")
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
        upstream_trap.close()
    end)

    after_each(function()
        client.close_all()
    end)

    local function get(path, headers)
        local res, err = client.get(gw.port, path, headers)
        assert(res, err)
        return res
    end

    describe("request headers", function()
        it("set, add and remove reach the upstream as edited", function()
            local echo = echo_of(get("/reqh/x", {
                { "X-Replace", "old" }, { "X-Remove", "gone" }, { "X-Keep", "kept" },
                { "X-Multi", "one" }, { "X-Multi", "two" },
                { "X-Remove-Twice", "1" }, { "X-Remove-Twice", "2" },
            }))
            local h = echo.headers
            assert.equal("s", h["x-set"])
            assert.equal("new", h["x-replace"])
            assert.equal("added", h["x-added"])
            assert.same({ "one", "two", "third" }, h["x-multi"])
            assert.is_nil(h["x-remove"])
            assert.is_nil(h["x-remove-twice"])
            assert.equal("kept", h["x-keep"])
            assert.equal("/x", echo.path)
        end)

        it("framing and hop-by-hop headers a policy sets do not change the framing",
            function()
                local body = ("0123456789"):rep(3)
                local c = assert(client.connect(gw.port))
                assert(c:request({ method = "POST", path = "/reqh-framing/x", body = body }))
                local echo = echo_of(assert(c:read_response()))
                assert.equal(#body, echo.body_length)
                assert.equal(client.sha256_hex(body), echo.body_sha256)
                assert.equal(tostring(#body), echo.headers["content-length"])
                assert.is_nil(echo.headers["transfer-encoding"])
                -- the next request on the same connection is answered as usual
                assert(c:request({ path = "/plain/next" }))
                assert.equal("/next", echo_of(assert(c:read_response())).path)
            end)

        it("number values arrive as their decimal text, added to what came", function()
            local echo = echo_of(get("/num-headers/x", { { "X-Multi", "one" } }))
            local h = echo.headers
            assert.equal("42", h["x-int"])
            assert.equal("-7", h["x-neg"])
            assert.equal("0", h["x-zero"])
            assert.equal("99999999999999", h["x-big"])
            assert.equal("1.5", h["x-frac"])
            assert.same({ "one", "3" }, h["x-multi"])
        end)

        it("a policy reads back the header it set", function()
            local res = get("/reqh/x")
            assert.equal("s", res.headers["x-read-back"])
        end)

        it("edits made in rewrite reach the upstream too", function()
            local echo = echo_of(get("/reqh-rewrite/x", { ["X-Remove"] = "gone" }))
            assert.equal("yes", echo.headers["x-rewrite"])
            assert.is_nil(echo.headers["x-remove"])
        end)

        it("edits on one request do not leak into the next on the same connection", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/reqh/x" }))
            echo_of(assert(c:read_response()))
            assert(c:request({ path = "/plain/x", headers = { ["X-Remove"] = "still-here" } }))
            local echo = echo_of(assert(c:read_response()))
            assert.is_nil(echo.headers["x-set"])
            assert.is_nil(echo.headers["x-added"])
            assert.equal("still-here", echo.headers["x-remove"])
        end)
    end)

    describe("response headers", function()
        it("set, add and remove in header_filter reach the client", function()
            local res = get("/resph/x?header=X-From-Upstream:u&header=X-Replace-Me:old"
                .. "&header=X-Untouched:t")
            assert.equal(200, res.status)
            assert.equal("1", res.headers["x-resp-set"])
            assert.equal("by-policy", res.headers["x-replace-me"])
            assert.equal("added", res.headers["x-resp-add"])
            assert.is_nil(res.headers["x-from-upstream"])
            assert.equal("t", res.headers["x-untouched"])
            -- the body is the upstream's, untouched
            assert.equal("/x", echo_of(res).path)
        end)

        it("number values reach the client as their decimal text", function()
            local res = get("/num-headers/x")
            assert.equal(200, res.status)
            assert.equal("1234567890123", res.headers["x-int"])
            assert.equal("-1", res.headers["x-neg"])
            assert.equal(tostring(1e300), res.headers["x-huge"])
            assert.equal("0.25", res.headers["x-frac"])
            assert.equal("5", res.headers["x-resp-add"])
        end)

        it("a number cannot set a framing header either", function()
            local res = get("/num-framing/x")
            assert.equal(500, res.status)
        end)

        -- A second Content-Length, or a Transfer-Encoding the body does not
        -- have, would make the client read the response differently from
        -- how the gateway framed it: the policy gets an error instead, and
        -- the request the 500 of a failed policy.
        for _, case in ipairs({
            { "/framing-cl/x", "Content-Length in header_filter", 500 },
            { "/framing-te/x", "Transfer-Encoding in header_filter", 500 },
            { "/framing-access/x", "Content-Length in access", 500 },
        }) do
            it("a policy cannot set the framing header " .. case[2], function()
                local c = assert(client.connect(gw.port))
                assert(c:request({ path = case[1] .. "?bytes=100" }))
                local res = assert(c:read_response())
                assert.equal(case[3], res.status)
                if case[3] == 200 then
                    assert.equal(100, #res.body)
                end
                assert.equal(tostring(#res.body), res.headers["content-length"])
                assert.is_nil(res.headers["transfer-encoding"])
                assert.is_truthy(eventually(function()
                    return gw:log():find("invalid header", 1, true)
                end, 2))
                -- and the connection is still in step
                assert(c:request({ path = "/plain/next" }))
                assert.equal("/next", echo_of(assert(c:read_response())).path)
            end)
        end

        it("a policy cannot set the framing header of the gateway's own answer", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/framing-deny/x" }))
            local res = assert(c:read_response())
            assert.equal(500, res.status)
            assert.is_nil(res.headers["transfer-encoding"])
            assert.same(tostring(#res.body), res.headers["content-length"])
            assert(c:request({ path = "/plain/next" }))
            assert.equal("/next", echo_of(assert(c:read_response())).path)
        end)

        it("ctx.resp:set_header in access decorates the proxied response", function()
            local res = get("/decor/x")
            assert.equal("d", res.headers["x-decor"])
            assert.equal("/x", echo_of(res).path)
        end)

        it("a header set in access wins over the upstream's of the same name", function()
            local res = get("/decor/x?header=X-Both:upstream")
            assert.equal("policy", res.headers["x-both"])
        end)

        it("ctx.resp:set_header in access decorates a response a later policy gives", function()
            local res = get("/decor-deny/x")
            assert.equal(403, res.status)
            assert.equal("d", res.headers["x-decor"])
        end)

        it("ctx.resp:set_header in access decorates the gateway's own 502", function()
            local res = get("/decor-down/x")
            assert.equal(502, res.status)
            assert.equal("d", res.headers["x-decor"])
        end)
    end)

    describe("return status, body", function()
        it("return 403, {error = 'x'} gives a JSON 403 and the upstream sees nothing", function()
            local res = get("/deny/x")
            assert.equal(403, res.status)
            assert.matches("^application/json", res.headers["content-type"])
            assert.same({ error = "x" }, cjson.decode(res.body))
            assert.equal(tostring(#res.body), res.headers["content-length"])
            assert.is_truthy(res.headers["x-request-id"])
            assert.is_false(upstream_trap.connected())
        end)

        it("ends the request from rewrite too", function()
            local res = get("/deny-rewrite/x")
            assert.equal(401, res.status)
            assert.same({ error = "who" }, cjson.decode(res.body))
            assert.is_false(upstream_trap.connected())
        end)

        it("return 200, 'text' gives that text", function()
            local res = get("/text/x")
            assert.equal(200, res.status)
            assert.equal("text", res.body)
            assert.matches("^text/plain", res.headers["content-type"])
            assert.is_false(upstream_trap.connected())
        end)

        it("keeps the connection open for the next request", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/deny/x" }))
            assert.equal(403, assert(c:read_response()).status)
            assert(c:request({ path = "/plain/after" }))
            assert.equal("/after", echo_of(assert(c:read_response())).path)
        end)

        -- (found by the proxy fuzz target: the body went out after the
        -- head, where the client reads the next response)
        it("return 304 or 204 with a body sends the head only, the connection in sync", function()
            local c = assert(client.connect(gw.port))
            for _, case in ipairs({ { "/local304/x", 304 }, { "/local204/x", 204 } }) do
                assert(c:request({ path = case[1] }))
                local res = assert(c:read_response({ timeout = 5 }))
                assert.equal(case[2], res.status)
                assert.equal("", res.body)
                assert(c:request({ path = "/plain/after" }))
                assert.equal("/after", echo_of(assert(c:read_response({ timeout = 5 }))).path)
            end
            assert.is_false(upstream_trap.connected())
            c:close()
        end)

        it("a POST answered early keeps the connection in sync", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ method = "POST", path = "/deny/x", body = ("b"):rep(5000) }))
            assert.equal(403, assert(c:read_response()).status)
            if not c:closed(0.2) then
                -- kept open: the unread body must not be taken for a request
                assert(c:request({ path = "/plain/after" }))
                assert.equal("/after", echo_of(assert(c:read_response())).path)
            end
        end)
    end)

    describe("ctx.upstream", function()
        it("sends the request to the upstream a policy chose", function()
            local echo = echo_of(get("/pick/x", { ["X-Pick"] = "b" }))
            assert.equal("/x", echo.path)
            assert.is_false(upstream_trap.connected())
            echo = echo_of(get("/pick/y", { ["X-Pick"] = "a" }))
            assert.equal("/y", echo.path)
        end)

        it("the choice matters: an upstream that is down gives 502", function()
            local res = get("/pick/x", { ["X-Pick"] = "down" })
            assert.equal(502, res.status)
        end)

        it("an unknown upstream name gives 502 naming it", function()
            local res = get("/pick/x", { ["X-Pick"] = "nope" })
            assert.equal(502, res.status)
            assert.matches("nope", res.body)
            assert.is_false(upstream_trap.connected())
        end)
    end)

    describe("mg.sleep", function()
        it("delays the response by at least the sleep", function()
            local t0 = gettime()
            local res = get("/sleep/x")
            local took = gettime() - t0
            assert.equal(200, res.status)
            assert.is_true(took >= 0.3, "took " .. took .. " s")
            assert.is_true(tonumber(res.headers["x-slept-ms"]) >= 299)
        end)

        it("mg.sleep(50) delays the response >= 50 ms", function()
            local t0 = gettime()
            local res = get("/sleep50/x")
            local took = gettime() - t0
            assert.equal(200, res.status)
            assert.is_true(took >= 0.05, "took " .. took .. " s")
            assert.is_true(tonumber(res.headers["x-slept-ms"]) >= 49)
        end)

        it("does not block other requests on the same (only) worker", function()
            assert.equal(1, #gw:workers())
            local c1 = assert(client.connect(gw.port))
            local c2 = assert(client.connect(gw.port))
            local t0 = gettime()
            assert(c1:request({ path = "/sleep/one" }))
            assert(c2:request({ path = "/sleep/two" }))
            -- a request without a sleep is answered meanwhile
            local fast = get("/plain/fast")
            local fast_took = gettime() - t0
            assert.equal(200, fast.status)
            assert.is_true(fast_took < 0.2, "a plain request waited " .. fast_took .. " s")
            local r1 = assert(c1:read_response())
            local r2 = assert(c2:read_response())
            local took = gettime() - t0
            assert.equal("/one", echo_of(r1).path)
            assert.equal("/two", echo_of(r2).path)
            -- both slept 300 ms at the same time, not one after the other
            assert.is_true(took >= 0.3, "took " .. took .. " s")
            assert.is_true(took < 0.55, "two sleeping requests took " .. took .. " s")
        end)
    end)

    describe("ctx.req:body()", function()
        it("reads the whole body in access", function()
            local body = cjson.encode({ hello = "world", n = 42 })
            local res = assert(client.request(gw.port, {
                method = "POST", path = "/body-answer/x", body = body,
                headers = { ["Content-Type"] = "application/json" },
            }))
            assert.equal(200, res.status)
            local got = cjson.decode(res.body)
            assert.equal(#body, got.length)
            assert.equal(body, got.body)
            assert.same({ hello = "world", n = 42 }, got.decoded)
            assert.is_false(upstream_trap.connected())
        end)

        it("reads a chunked body", function()
            local res = assert(client.request(gw.port, {
                method = "POST", path = "/body-answer/x", chunked = { '{"a":', '"b"}' },
            }))
            assert.equal(200, res.status)
            assert.equal('{"a":"b"}', cjson.decode(res.body).body)
        end)

        it("reads a body larger than one buffer", function()
            local body = '"' .. ("x"):rep(300000) .. '"'
            local res = assert(client.request(gw.port, {
                method = "POST", path = "/body-answer/x", body = body,
            }))
            assert.equal(200, res.status)
            assert.equal(#body, cjson.decode(res.body).length)
        end)

        it("gives an empty string for a request without a body", function()
            local res = get("/body-answer/x")
            -- "" is not JSON: decoded is absent, the length is 0
            assert.equal(200, res.status)
            assert.equal(0, cjson.decode(res.body).length)
        end)

        it("the body read in access still reaches the upstream whole", function()
            local body = ("0123456789"):rep(10000)
            local res = assert(client.request(gw.port, {
                method = "POST", path = "/body/x", body = body,
            }))
            assert.equal(tostring(#body), res.headers["x-body-read"])
            local echo = echo_of(res)
            assert.equal(#body, echo.body_length)
            assert.equal(client.sha256_hex(body), echo.body_sha256)
        end)

        -- The client half-closes right after its body, before the gateway
        -- has read it (the policy sleeps first): the body is in the
        -- buffer and the answer must still come.
        local function post_half_closed(path, head_length, body)
            local c = assert(client.connect(gw.port))
            assert(c:send("POST " .. path .. " HTTP/1.1\r\nHost: t\r\nContent-Length: "
                .. head_length .. "\r\n\r\n" .. body))
            c.sock:shutdown("send")
            return assert(c:read_response({ timeout = 5 })), c
        end

        it("answers a half-closed client whose body a policy reads late", function()
            local body = ("b"):rep(5000)
            local res, c = post_half_closed("/late-body/x", #body, body)
            assert.equal(200, res.status)
            assert.equal(#body, cjson.decode(res.body).length)
            assert.is_true(c:closed(2))
        end)

        it("proxies a half-closed client's body whole when access ran late", function()
            local body = ("p"):rep(5000)
            local res = post_half_closed("/late-proxy/x", #body, body)
            assert.equal(200, res.status)
            local echo = echo_of(res)
            assert.equal(#body, echo.body_length)
            assert.equal(client.sha256_hex(body), echo.body_sha256)
        end)

        it("answers 400 to a client that half-closes before its body ends", function()
            local res = post_half_closed("/late-body/x", 100, ("t"):rep(50))
            assert.equal(400, res.status)
            res = post_half_closed("/late-proxy/x", 100, ("t"):rep(50))
            assert.equal(400, res.status)
        end)

        it("a request without a body stays without one upstream after body()", function()
            local echo = echo_of(get("/body/x"))
            assert.equal(0, echo.body_length)
            assert.is_nil(echo.headers["content-length"])
            assert.is_nil(echo.headers["transfer-encoding"])
        end)

        it("a body read piece by piece and not kept is not forwarded short: 500", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ method = "POST", path = "/body-stream/x", body = ("z"):rep(5000) }))
            local res = assert(c:read_response({ timeout = 3 }))
            assert.equal(500, res.status)
            assert.matches("consumed", res.body)
            assert.is_false(upstream_trap.connected())
            -- the body was read whole, so the connection is still usable
            assert(c:request({ path = "/plain/next" }))
            assert.equal("/next", echo_of(assert(c:read_response())).path)
        end)

        it("a chunked body read in access still reaches the upstream whole", function()
            local chunks = { ("a"):rep(1000), ("b"):rep(70000), "c" }
            local whole = table.concat(chunks)
            local res = assert(client.request(gw.port, {
                method = "POST", path = "/body/x", chunked = chunks,
            }))
            local echo = echo_of(res)
            assert.equal(#whole, echo.body_length)
            assert.equal(client.sha256_hex(whole), echo.body_sha256)
        end)
    end)

    describe("ctx fields", function()
        it("ctx.params holds the path parameters", function()
            local res = get("/users/42/items/abc?q=1")
            assert.equal(200, res.status)
            local got = cjson.decode(res.body)
            assert.same({ id = "42", item = "abc" }, got.params)
            assert.equal("params", got.route)
        end)

        it("ctx.req:arg() decodes a query parameter; :args() gives them all", function()
            local got = cjson.decode(get("/inspect/x?q=hello%20world&r=1&r=2&flag").body)
            assert.equal("hello world", got.arg)
            assert.same({ "1", "2" }, got.args.r)
            assert.equal(true, got.args.flag)
            assert.equal("q=hello%20world&r=1&r=2&flag", got.query)
        end)

        it("ctx.req:arg() of an absent parameter is nil", function()
            local got = cjson.decode(get("/inspect/x?other=1").body)
            assert.equal(cjson.null, got.arg)
        end)

        it("ctx.req shows method, path, remote_addr and headers", function()
            local res = assert(client.request(gw.port, { method = "DELETE", path = "/inspect/a/b",
                headers = { { "X-Multi", "1" }, { "X-Multi", "2" } } }))
            local got = cjson.decode(res.body)
            assert.equal("DELETE", got.method)
            assert.equal("/inspect/a/b", got.path)
            assert.equal("127.0.0.1", got.remote_addr)
            assert.equal("1, 2", got.header)
            assert.equal("1, 2", got.header_case)
            assert.is_true(got.missing)
            assert.equal("127.0.0.1:" .. gw.port, got.headers.host)
            assert.equal("1, 2", got.headers["x-multi"])
        end)

        it("ctx.request_id is the X-Request-Id the client gets", function()
            local res = get("/inspect/x")
            local got = cjson.decode(res.body)
            assert.is_truthy(got.request_id and #got.request_id > 0)
            assert.equal(got.request_id, res.headers["x-request-id"])
        end)

        it("ctx.vars is shared by the request's policies, in priority order", function()
            local got = cjson.decode(get("/inspect/x").body)
            assert.equal("shared", got.vars_a)
            assert.equal("inspect", got.route)
        end)

        it("mg.now and mg.json work in a policy", function()
            local got = cjson.decode(get("/inspect/x").body)
            assert.is_true(got.now_ok)
            assert.same({ k = { 1, 2 } }, got.json_roundtrip)
        end)
    end)

    describe("ctx", function()
        it("carries no field from one request to the next", function()
            local c = assert(client.connect(gw.port))
            local ids = {}
            for i = 1, 6 do
                -- every other request sets consumer, tenant, vars, params and
                -- a field of its own; the next one, on the same connection
                -- and worker, must see none of them
                assert(c:request({ path = "/ctx/x", headers = { ["X-Set"] = i % 2 == 1 and "1"
                                                                 or "0" } }))
                local res = assert(c:read_response())
                assert.equal(200, res.status)
                local got = cjson.decode(res.body)
                local null = cjson.null
                assert.same({ consumer = null, tenant = null, upstream = null, answered = null,
                              mark = null, param_mark = null, extra = null, phase = "access",
                              request_id = res.headers["x-request-id"] }, got)
                assert.is_nil(ids[got.request_id])
                ids[got.request_id] = true
            end
        end)
    end)

    describe("a policy that raises", function()
        it("gives a 500 with the request id, logs route and policy, and the worker serves on",
            function()
                local pid = gw:workers()[1]
                local res = get("/raise/x", { ["X-Raise"] = "1" })
                assert.equal(500, res.status)
                local got = cjson.decode(res.body)
                assert.is_truthy(got.request_id)
                assert.equal(res.headers["x-request-id"], got.request_id)
                assert.is_nil(res.body:find("boom", 1, true)) -- no internals to the client
                local line = eventually(function()
                    for l in gw:log():gmatch("[^\n]+") do
                        if l:find(got.request_id, 1, true) then
                            return l
                        end
                    end
                end, 2)
                assert.is_truthy(line, gw:log_tail())
                assert.matches("route raise policy it%-raise failed: ", line)
                assert.matches("went boom in access", line)
                assert.matches("%[error%]", line)
                -- the next request on the same route is fine, same worker
                local ok = get("/raise/x")
                assert.equal(200, ok.status)
                assert.equal("/x", echo_of(ok).path)
                assert.same({ pid }, gw:workers())
            end)

        it("keeps a keep-alive connection usable after the 500", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/raise/x", headers = { ["X-Raise"] = "1" } }))
            assert.equal(500, assert(c:read_response()).status)
            assert(c:request({ path = "/raise/y" }))
            assert.equal("/y", echo_of(assert(c:read_response())).path)
        end)

        it("after its coroutine yielded (mg.sleep) gives the same 500 and log line", function()
            local pid = gw:workers()[1]
            for _ = 1, 3 do
                local res = get("/raise-late/x")
                assert.equal(500, res.status)
                local got = cjson.decode(res.body)
                assert.same({ error = "internal error", request_id = res.headers["x-request-id"] },
                            got)
                assert.is_truthy(eventually(function()
                    for l in gw:log():gmatch("[^\n]+") do
                        if l:find(got.request_id, 1, true) then
                            return l:find("route raise-late policy it-raise failed: ", 1, true)
                                and l:find("went boom in access", 1, true)
                        end
                    end
                end, 2), gw:log_tail())
            end
            assert.equal(200, get("/raise/x").status)
            assert.same({ pid }, gw:workers())
        end)

        it("with a table for its error gives the 500 with the request id", function()
            local res = get("/raise-table/x")
            assert.equal(500, res.status)
            local got = cjson.decode(res.body)
            assert.equal(res.headers["x-request-id"], got.request_id)
            assert.is_truthy(eventually(function()
                for l in gw:log():gmatch("[^\n]+") do
                    if l:find(got.request_id, 1, true) then
                        return l:find("route raise-table policy it-raise failed: table", 1, true)
                    end
                end
            end, 2), gw:log_tail())
        end)

        it("in rewrite gives a 500 too", function()
            local res = get("/raise-rewrite/x")
            assert.equal(500, res.status)
            assert.is_truthy(cjson.decode(res.body).request_id)
        end)

        it("in header_filter (nothing sent yet) gives a 500 with the request id", function()
            local pid = gw:workers()[1]
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/raise-hf/x?bytes=300000",
                               headers = { ["X-Raise"] = "1" } }))
            local res = assert(c:read_response())
            assert.equal(500, res.status)
            local got = cjson.decode(res.body)
            assert.equal(res.headers["x-request-id"], got.request_id)
            assert.is_truthy(eventually(function()
                for l in gw:log():gmatch("[^\n]+") do
                    if l:find(got.request_id, 1, true) and l:find("it-raise", 1, true)
                        and l:find("raise-hf", 1, true) then
                        return true
                    end
                end
            end, 2), gw:log_tail())
            -- the upstream's unread body went nowhere: the next answers are whole
            for i = 1, 3 do
                res = assert(client.get(gw.port, "/raise-hf/" .. i .. "?bytes=1000"))
                assert.equal(200, res.status)
                assert.equal(1000, #res.body)
            end
            assert.same({ pid }, gw:workers())
        end)

        -- (found by the proxy fuzz target: the 500 kept the upstream's
        -- 204 "no body", sent its Content-Length and not its body, and the
        -- client read the next answer as that body)
        it("in header_filter of an upstream 204 or 304 gives a 500 with its body", function()
            local c = assert(client.connect(gw.port))
            for _, status in ipairs({ 204, 304 }) do
                assert(c:request({ path = "/raise-hf/x?status=" .. status,
                                   headers = { ["X-Raise"] = "1" } }))
                local res = assert(c:read_response({ timeout = 5 }))
                assert.equal(500, res.status)
                assert.equal(tostring(#res.body), res.headers["content-length"])
                assert.equal(res.headers["x-request-id"], cjson.decode(res.body).request_id)
                assert(c:request({ path = "/raise-hf/y?bytes=10" }))
                res = assert(c:read_response({ timeout = 5 }))
                assert.equal(200, res.status)
                assert.equal(10, #res.body)
            end
            c:close()
        end)

        it("in log: the client already has its answer; the error is logged", function()
            local res = get("/raise-log/x")
            assert.equal(200, res.status)
            local rid = res.headers["x-request-id"]
            assert.is_truthy(eventually(function()
                return gw:log():find("it%-raise went boom in log")
            end, 2), gw:log_tail())
            assert.is_truthy(rid)
            assert.equal(200, get("/raise-log/y").status)
        end)

        it("many failures in a row leave the worker alive and serving", function()
            local pid = gw:workers()[1]
            for _ = 1, 50 do
                assert.equal(500, get("/raise/x", { ["X-Raise"] = "1" }).status)
            end
            assert.equal(200, get("/raise/x").status)
            assert.same({ pid }, gw:workers())
        end)
    end)

    describe("header_filter", function()
        it("sees the upstream's status and headers and can set response headers", function()
            local res = get("/hf/x?status=201&header=X-From-Upstream:u")
            assert.equal(201, res.status)
            assert.equal("201", res.headers["x-seen-status"])
            assert.equal("application/json", res.headers["x-seen-type"])
            assert.equal("u", res.headers["x-seen-upstream-header"])
            assert.equal("header_filter", res.headers["x-seen-phase"])
        end)

        it("runs for error statuses from the upstream too", function()
            local res = get("/hf/x?status=503")
            assert.equal(503, res.status)
            assert.equal("503", res.headers["x-seen-status"])
        end)

        it("runs for a body-less upstream answer (HEAD, 204)", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ method = "HEAD", path = "/hf/x" }))
            local res = assert(c:read_response())
            assert.equal("200", res.headers["x-seen-status"])
            assert(c:request({ path = "/hf/x?status=204" }))
            res = assert(c:read_response())
            assert.equal(204, res.status)
            assert.equal("204", res.headers["x-seen-status"])
        end)

        -- (found by the proxy fuzz target: a 304 made by a policy went out
        -- with the upstream's body, which the client took for the start of
        -- the next response)
        it("makes a 200 a 204 or 304 without its body, the connection usable after", function()
            local c = assert(client.connect(gw.port))
            for _, status in ipairs({ 304, 204 }) do
                assert(c:request({ path = "/hf/x?n=" .. status,
                                   headers = { ["X-Set-Status"] = tostring(status) } }))
                local res = assert(c:read_response({ timeout = 5 }))
                assert.equal(status, res.status)
                assert.equal("", res.body)
                assert.equal("200", res.headers["x-seen-status"])
                assert.is_nil(res.headers["transfer-encoding"])
                -- the next answer on the same connection starts where it should
                assert(c:request({ path = "/hf/next" }))
                res = assert(c:read_response({ timeout = 5 }))
                assert.equal(200, res.status)
                assert.equal("/next", cjson.decode(res.body).path) -- (strip_prefix)
            end
            c:close()
        end)

        it("makes an upstream's 304 or 204 a 200 with no content, not the 304's length", function()
            local c = assert(client.connect(gw.port))
            -- the mock's 304 says Content-Length: <its JSON's length>; its
            -- 204 has no length at all (a 200 without one would be read to
            -- the connection's close)
            for _, status in ipairs({ 304, 204 }) do
                assert(c:request({ path = "/hf/x?status=" .. status,
                                   headers = { ["X-Set-Status"] = "200" } }))
                local res = assert(c:read_response({ timeout = 5 }))
                assert.equal(200, res.status)
                assert.equal(tostring(status), res.headers["x-seen-status"])
                assert.equal("0", res.headers["content-length"])
                assert.equal("", res.body)
                assert(c:request({ path = "/hf/next" }))
                res = assert(c:read_response({ timeout = 5 }))
                assert.equal(200, res.status)
                assert.equal("/next", cjson.decode(res.body).path) -- (strip_prefix)
            end
            c:close()
        end)
    end)

    describe("log phase", function()
        it("runs after the response with the request's id, route, status and vars", function()
            local res = get("/logged/x?status=202")
            assert.equal(202, res.status)
            local rid = res.headers["x-request-id"]
            local line = eventually(function()
                for l in (proc.read_file(log_file) or ""):gmatch("[^\n]+") do
                    if l:find(rid, 1, true) then
                        return l
                    end
                end
            end, 2)
            assert.equal(rid .. " logged 202 v1", line)
            assert.is_truthy(eventually(function()
                return gw:log():find("it-log: " .. rid, 1, true)
            end, 2))
        end)

        local function logged_line(rid)
            return eventually(function()
                for l in (proc.read_file(log_file) or ""):gmatch("[^\n]+") do
                    if l:find(rid, 1, true) then
                        return l
                    end
                end
            end, 2)
        end

        it("runs for a request a policy answered (403)", function()
            local res = get("/logged-deny/x")
            assert.equal(403, res.status)
            local rid = res.headers["x-request-id"]
            assert.equal(rid .. " logged-deny 403 -", logged_line(rid))
        end)

        it("runs for a request whose policy failed (500)", function()
            local res = get("/logged-raise/x")
            assert.equal(500, res.status)
            local rid = res.headers["x-request-id"]
            assert.equal(rid .. " logged-raise 500 -", logged_line(rid))
        end)

        it("runs for a request whose client went away before the answer", function()
            local c = assert(client.connect(gw.port))
            assert(c:request({ path = "/logged/x?delay_ms=300",
                               headers = { ["X-Request-Id"] = "gone-client-1" } }))
            c.sock:setoption("linger", { on = true, timeout = 0 }) -- a reset, not a FIN
            c:close()
            local line = logged_line("gone-client-1")
            assert.is_truthy(line)
            assert.equal("gone-client-1 logged", line:match("^(%S+ %S+)"))
        end)

        it("runs once per request on a keep-alive connection", function()
            local c = assert(client.connect(gw.port))
            local rids = {}
            for i = 1, 3 do
                assert(c:request({ path = "/logged/" .. i }))
                local res = assert(c:read_response())
                rids[#rids + 1] = res.headers["x-request-id"]
            end
            assert.is_truthy(eventually(function()
                local text = proc.read_file(log_file) or ""
                for _, rid in ipairs(rids) do
                    if not text:find(rid, 1, true) then
                        return false
                    end
                end
                return true
            end, 2))
            local text = proc.read_file(log_file)
            for _, rid in ipairs(rids) do
                local _, n = text:gsub(rid, "")
                assert.equal(1, n)
            end
        end)
    end)
end)

describe("policy kit, gateways of their own", function()
    after_each(function()
        client.close_all()
        gateway.stop_all()
    end)

    it("a policy that cannot be found stops the gateway from starting, naming it", function()
        local mock = gateway.mock()
        local ok, err = pcall(gateway.start, {
            routes = { upstreams = { gateway.upstream("a", mock) },
                       routes = { route("r", "/r/*", "a", { p("it-no-such-policy") }) } },
            node = { lua_path = { POLICY_DIR } }, timeout = 3,
        })
        assert.is_false(ok)
        assert.matches("it%-no%-such%-policy", err)
    end)

    it("a policy in the node's lua_path wins over one of the same name in policies/", function()
        local dir = proc.tmpdir()
        proc.write_file(dir .. "/it-respond.lua", [[
            return { name = "it-respond", access = function() return 209, "from lua_path" end }
        ]])
        local ok_gw = gateway.start{
            routes = { upstreams = gateway.array(),
                       routes = { route("r", "/r/*", nil, { p("it-respond", { status = 200 }) }) } },
            node = { lua_path = { dir, POLICY_DIR } },
        }
        local res = assert(client.get(ok_gw.port, "/r/x", nil, { timeout = 3 }))
        assert.equal(209, res.status)
        assert.equal("from lua_path", res.body)
        proc.cleanup(dir)
    end)

    it("global_policies run on every route", function()
        local mock = gateway.mock()
        local g = gateway.start{
            routes = {
                upstreams = { gateway.upstream("a", mock) },
                routes = { route("one", "/one/*", "a", gateway.array()),
                           route("two", "/two/*", "a", gateway.array()) },
                global_policies = { p("it-resp-headers", { set = { ["X-Global"] = "g" } }) },
            },
            node = { lua_path = { POLICY_DIR } },
        }
        local res = assert(client.get(g.port, "/one/x", nil, { timeout = 3 }))
        assert.equal("g", res.headers["x-global"])
        res = assert(client.get(g.port, "/two/x", nil, { timeout = 3 }))
        assert.equal("g", res.headers["x-global"])
    end)
end)
