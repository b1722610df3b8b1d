-- mg.http.request (the runtime's async HTTP client, DESIGN.md policy kit)
-- end to end: a policy (spec/fixtures/policies-http/it-http.lua) calls it
-- in access against the mock backend and a scripted raw-socket server
-- (spec/helpers/script_server.lua) for the responses the mock cannot give,
-- and answers with what it got. The client sees the outcome; the worker
-- must survive every bad case and keep serving.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-http"

-- the mock's body for bytes=N: this 64-byte period, repeated
local PERIOD = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
local function mock_body(n)
    return string.rep(PERIOD, math.ceil(n / 64)):sub(1, n)
end

local function esc(s)
    return (s:gsub("[^%w%-%._~]", function(ch) return string.format("%%%02X", ch:byte()) end))
end

describe("mg.http.request", function()
    local gw, mock, script_port, script_pid

    local function call(params, opts)
        local q = {}
        for k, v in pairs(params) do
            q[#q + 1] = k .. "=" .. esc(tostring(v))
        end
        table.sort(q)
        local res = assert(client.get(gw.port, "/h?" .. table.concat(q, "&"), nil,
            { timeout = (opts and opts.timeout) or 10 }))
        local ok, out = pcall(cjson.decode, res.body)
        assert(ok, "not JSON: " .. tostring(res.body))
        return res.status, out
    end

    local function script(path)
        return "http://127.0.0.1:" .. script_port .. path
    end

    -- the worker is alive and answers a plain call
    local function still_serving()
        local status, out = call({ url = mock.url("/alive") })
        assert.equal(200, status)
        assert.equal(200, out.status)
        assert.equal("/alive", cjson.decode(out.body).path)
    end

    setup(function()
        mock = gateway.mock()
        script_port = ports.free()
        script_pid = proc.spawn({ "luajit", "spec/helpers/script_server.lua",
            tostring(script_port), "300" }, { log = proc.tmpdir() .. "/script.log",
            cwd = gateway.root })
        assert(proc.wait_port("127.0.0.1", script_port, 10), "script server did not start")
        gw = gateway.start({
            workers = 1,
            node = { lua_path = { POLICY_DIR } },
            routes = {
                upstreams = { gateway.upstream("mock", mock) },
                routes = { { id = "h", paths = { "/h" },
                             policies = { { name = "it-http", conf = {} } } },
                           { id = "hf", paths = { "/hf/*" }, upstream = "mock",
                             policies = { { name = "it-http-hf",
                                            conf = { url = mock.url("/side?status=203") } } } } },
                consumers = gateway.array(), global_policies = gateway.array(),
            },
        })
    end)

    teardown(function()
        client.close_all()
        if script_pid and proc.alive(script_pid) then
            proc.kill(script_pid, "KILL")
            proc.wait_exit(script_pid, 5)
        end
        gateway.stop_all()
    end)

    it("GETs from the mock: status, headers and body", function()
        local status, out = call({ url = mock.url("/x/y?a=1&b=two") })
        assert.equal(200, status)
        assert.equal(200, out.status)
        assert.equal("application/json", out.headers["content-type"])
        local echo = cjson.decode(out.body)
        assert.equal("GET", echo.method)
        assert.equal("/x/y", echo.path)
        assert.equal("a=1&b=two", echo.query)
        -- the headers the policy set, the Host and User-Agent the client adds
        assert.equal("probe-1", echo.headers["x-probe"])
        assert.same({ "m1", "m2" }, echo.headers["x-multi"])
        assert.equal("127.0.0.1:" .. mock.port, echo.headers.host)
        assert.matches("^moongate/", echo.headers["user-agent"])
        assert.equal(0, echo.body_length)
    end)

    it("POSTs a body", function()
        local body = string.rep("payload-", 1000)
        local status, out = call({ url = mock.url("/post"), method = "POST", body = body })
        assert.equal(200, status)
        local echo = cjson.decode(out.body)
        assert.equal("POST", echo.method)
        assert.equal(#body, echo.body_length)
        assert.equal(client.sha256_hex(body), echo.body_sha256)
        assert.equal(tostring(#body), echo.headers["content-length"])
    end)

    it("passes the status of the response on (not only 2xx)", function()
        local status, out = call({ url = mock.url("/s?status=418") })
        assert.equal(200, status)
        assert.equal(418, out.status)
    end)

    it("reads repeated response headers: joined, Set-Cookie as a list", function()
        local status, out = call({ url = script("/headers") })
        assert.equal(200, status)
        assert.equal(200, out.status)
        assert.same({ "a=1; Path=/", "b=2" }, out.headers["set-cookie"])
        assert.equal("one, two", out.headers["x-multi"])
        assert.equal("text/plain", out.headers["content-type"])
        assert.equal("padded", out.headers["x-spaces"])
        assert.equal("ok", out.body)
    end)

    it("reads chunked and close-delimited bodies", function()
        local _, out = call({ url = script("/chunked") })
        assert.equal("hello world", out.body)
        _, out = call({ url = script("/close") })
        assert.equal("close-delimited body", out.body)
        -- a large chunked body from the mock, whole
        _, out = call({ url = mock.url("/big?bytes=1000000&chunked=1") })
        assert.equal(200, out.status)
        assert.equal(1000000, out.body_length)
        assert.is_true(mock_body(1000000) == out.body)
        -- and one delimited by the close
        _, out = call({ url = mock.url("/big?bytes=300000&close=1") })
        assert.equal(300000, out.body_length)
        assert.is_true(mock_body(300000) == out.body)
    end)

    it("keeps connections alive: calls in a row, and across requests, share one", function()
        local _, out = call({ url = script("/conn"), n = 3 })
        local id = out.bodies[1]:match("^(%d+):")
        assert.same({ id .. ":1", id .. ":2", id .. ":3" }, out.bodies)
        _, out = call({ url = script("/conn") })
        assert.equal(id .. ":4", out.body)
    end)

    it("returns nil, \"timeout\" within timeout_ms when the server never answers", function()
        local t0 = proc.now()
        local status, out = call({ url = script("/silent"), timeout_ms = 300 })
        local took = proc.now() - t0
        assert.equal(502, status)
        assert.equal("timeout", out.error)
        assert.is_true(took >= 0.28 and took < 2, "took " .. took)
        still_serving()
    end)

    it("returns nil, \"connection refused\" when nothing listens", function()
        local status, out = call({ url = "http://127.0.0.1:" .. ports.free() .. "/" })
        assert.equal(502, status)
        assert.equal("connection refused", out.error)
    end)

    it("returns nil, \"invalid url ...\" for a URL it cannot use", function()
        for _, url in ipairs({ "ftp://127.0.0.1/", "127.0.0.1:80/x", "http://", "http://a@b/",
                               "https://", "https://a b/" }) do
            local status, out = call({ url = url })
            assert.equal(502, status)
            assert.matches("^invalid url ", out.error)
        end
    end)

    it("returns nil, \"response too large\" beyond max_body (declared or streamed)", function()
        local status, out = call({ url = mock.url("/b?bytes=5000"), max_body = 4096 })
        assert.equal(502, status)
        assert.equal("response too large", out.error)
        status, out = call({ url = mock.url("/b?bytes=5000&chunked=1"), max_body = 4096 })
        assert.equal(502, status)
        assert.equal("response too large", out.error)
        -- at the cap it is fine
        status, out = call({ url = mock.url("/b?bytes=4096&chunked=1"), max_body = 4096 })
        assert.equal(200, status)
        assert.equal(4096, out.body_length)
        -- the default cap is 10 MiB
        status, out = call({ url = mock.url("/b?bytes=" .. (10 * 1048576 + 1)) })
        assert.equal(502, status)
        assert.equal("response too large", out.error)
        still_serving()
    end)

    it("returns nil, \"bad response: ...\" for malformed responses, and keeps serving", function()
        for _, path in ipairs({ "/badstatus", "/clte", "/badchunk", "/partial", "/hangup" }) do
            local status, out = call({ url = script(path) })
            assert.equal(502, status, path)
            if path == "/partial" then
                assert.matches("closed", out.error)
            elseif path == "/hangup" then
                assert.equal("connection closed before the response", out.error)
            else
                assert.matches("^bad response: ", out.error)
            end
            still_serving()
        end
    end)

    it("raises on the caller's mistakes", function()
        for _, m in ipairs({ "url", "notable", "header", "framing", "method" }) do
            local status, out = call({ mistake = m })
            assert.equal(200, status)
            assert.is_true(out.raised, m)
            assert.matches("mg.http.request", out.error, 1, true)
        end
    end)

    it("works in header_filter, while the upstream's response waits", function()
        local res = assert(client.get(gw.port, "/hf/x?bytes=100000"))
        assert.equal(200, res.status)
        assert.equal("203", res.headers["x-hf-status"])
        assert.equal("/side", res.headers["x-hf-path"])
        assert.equal(100000, #res.body)
        assert.is_true(mock_body(100000) == res.body)
    end)

    it("survives the client leaving while the call is pending", function()
        local worker = gw:workers()[1]
        for i = 1, 6 do
            local c = assert(client.connect(gw.port))
            assert.is_true(c:request({ path = "/h?url=" .. esc(script("/silent"))
                .. "&timeout_ms=1000" }))
            socket.sleep(0.1)
            if i % 2 == 0 then
                -- a reset ends the request at once (req.c's abort path): the
                -- pending call is cancelled under the suspended coroutine
                c.sock:setoption("linger", { on = true, timeout = 0 })
            end -- else a half-close: the request goes on until its timeout
            c:close()
        end
        socket.sleep(0.2)
        still_serving()
        socket.sleep(1) -- the half-closed ones time out and answer into the void
        still_serving()
        assert.same({ worker }, gw:workers())
        assert.is_nil(gw:log():find("signal", 1, true))
    end)

    it("serves many concurrent calls from concurrent requests", function()
        local n = 40
        local conns = {}
        local t0 = proc.now()
        for i = 1, n do
            conns[i] = assert(client.connect(gw.port))
            assert.is_true(conns[i]:request({
                path = "/h?url=" .. esc(mock.url("/c" .. i .. "?delay_ms=200")) }))
        end
        for i = 1, n do
            local res = assert(conns[i]:read_response({ timeout = 10 }))
            assert.equal(200, res.status)
            local out = cjson.decode(res.body)
            assert.equal("/c" .. i, cjson.decode(out.body).path)
            conns[i]:close()
        end
        -- concurrent, not one after the other (40 x 200 ms = 8 s)
        assert.is_true(proc.now() - t0 < 4, "took " .. (proc.now() - t0))
        still_serving()
    end)
end)
