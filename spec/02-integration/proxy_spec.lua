-- Proxying HTTP/1.1 through the gateway to the mock backend: what the
-- client gets, and what the backend received (the mock echoes the request
-- it saw as JSON: method, path, query, headers, body length and sha256).
local cjson = require("cjson")
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")
local socket = require("socket")

local concat = table.concat
local floor = math.floor
local io_open = io.open
local rep = string.rep
local tonumber = tonumber

-- The limits of the shared gateway: small, so each limit is quick to hit.
local LIMITS = {
    max_header_bytes = 2048,
    max_uri_bytes = 512,
    max_body_bytes = 65536,
    client_header_timeout_ms = 600,
    client_body_timeout_ms = 600,
    keepalive_timeout_ms = 1000,
    send_timeout_ms = 1000,
}
local SLOW_READ_MS = 300
local CONNECT_MS = 300

-- The mock's body for bytes=N: its 64-byte pattern repeated, cut at N.
local MOCK_PATTERN = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
local function mock_body(n)
    return rep(MOCK_PATTERN, floor(n / 64) + 1):sub(1, n)
end

-- Established TCP connections whose remote end is 127.0.0.1:port (read
-- from /proc/net/tcp, so no ss/netstat is needed): the gateway's upstream
-- connections to a mock.
local function established_to(port)
    local f = assert(io_open("/proc/net/tcp", "r"))
    local n = 0
    local want = ("0100007F:%04X"):format(port)
    for line in f:lines() do
        local rem, st = line:match("^%s*%d+: %x+:%x+ (%x+:%x+) (%x+)")
        if rem == want and st == "01" then
            n = n + 1
        end
    end
    f:close()
    return n
end

-- Compares bodies by length and first differing byte (not by printing
-- megabytes of both).
local function same_body(expected, got)
    assert.is_string(got, "no body")
    if expected == got then
        return
    end
    local i = 1
    while i <= #expected and expected:byte(i) == got:byte(i) do
        i = i + 1
    end
    error(("body differs at byte %d (expected %d bytes, got %d): expected %q, got %q")
        :format(i, #expected, #got, expected:sub(i, i + 15), got:sub(i, i + 15)), 2)
end

local function echo_of(res)
    assert.is_truthy(res, "no response")
    local ok, e = pcall(cjson.decode, res.body)
    assert.is_true(ok, "the body is not the mock's JSON echo: " .. tostring(res.body))
    return e
end

local function get(port, path, headers, opts)
    local res, err = client.get(port, path, headers, opts)
    assert.is_truthy(res, "request " .. path .. " failed: " .. tostring(err))
    return res
end

-- A connection to port, asserted.
local function connect(port)
    local c, err = client.connect(port)
    assert.is_truthy(c, err)
    return c
end

local function read(c, opts)
    local res, err = c:read_response(opts)
    assert.is_truthy(res, "no response: " .. tostring(err))
    return res
end

local HEX32 = "^" .. rep("%x", 32) .. "$"

-- Accepts one connection on a listener of this process and reads one
-- request head from it; returns the peer socket and the request line.
local function accept_request(listener)
    listener:settimeout(3)
    local peer = assert(listener:accept())
    peer:settimeout(2)
    local first = assert(peer:receive("*l"))
    repeat
        local line = assert(peer:receive("*l"))
    until line == ""
    return peer, first
end

-- Reads one more request head from a peer already accepted.
local function next_request(peer)
    local first = assert(peer:receive("*l"))
    repeat
        local line = assert(peer:receive("*l"))
    until line == ""
    return first
end

describe("proxy", function()
    local mock, ka_mock, gw
    local big_gw -- the same routes, with room for bodies of many MiB
    local rude -- a listener in this process: accepts, then closes or resets
    local full, fillers -- a listener whose accept queue is full: SYNs to it are dropped

    setup(function()
        rude = assert(socket.bind("127.0.0.1", 0))
        local _, rude_port = rude:getsockname()
        -- backlog 0 holds one connection; it is never accepted, so once it
        -- is queued the kernel drops further SYNs and a connect hangs
        full = assert(socket.bind("127.0.0.1", 0, 0))
        local _, full_port = full:getsockname()
        fillers = {}
        for i = 1, 3 do
            fillers[i] = socket.tcp()
            fillers[i]:settimeout(0)
            fillers[i]:connect("127.0.0.1", full_port)
        end
        local blackhole = gateway.upstream("blackhole", tonumber(full_port))
        blackhole.timeouts = { connect_ms = CONNECT_MS, send_ms = 5000, read_ms = 5000 }
        mock = gateway.mock()
        ka_mock = gateway.mock()
        local slow = gateway.upstream("slow", mock)
        slow.timeouts = { connect_ms = 1000, send_ms = SLOW_READ_MS, read_ms = SLOW_READ_MS }
        local routes = {
            upstreams = {
                gateway.upstream("mock", mock),
                gateway.upstream("ka", ka_mock),
                slow,
                gateway.upstream("refused", ports.free()),
                gateway.upstream("rude", tonumber(rude_port)),
                blackhole,
            },
            routes = {
                { id = "echo", paths = { "/echo/*" }, upstream = "mock" },
                { id = "strip", paths = { "/strip/*" }, upstream = "mock", strip_prefix = true },
                { id = "ka", paths = { "/ka/*" }, upstream = "ka" },
                { id = "slow", paths = { "/slow/*" }, upstream = "slow" },
                { id = "refused", paths = { "/refused/*" }, upstream = "refused" },
                { id = "rude", paths = { "/rude/*" }, upstream = "rude" },
                { id = "blackhole", paths = { "/blackhole/*" }, upstream = "blackhole" },
            },
            consumers = gateway.array(), global_policies = gateway.array(),
        }
        gw = gateway.start({ node = { limits = LIMITS }, routes = routes })
        big_gw = gateway.start({ node = { limits = { max_body_bytes = 256 * 1024 * 1024 } },
            routes = routes })
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
        rude:close()
        for _, f in ipairs(fillers) do
            f:close()
        end
        full:close()
    end)

    after_each(function()
        client.close_all()
    end)

    describe("connections", function()
        it("serves several requests on one keep-alive connection over one upstream connection", function()
            local c = connect(gw.port)
            for i = 1, 5 do
                assert.is_true(c:request({ path = "/ka/r?i=" .. i }))
                local res = read(c)
                assert.equal(200, res.status)
                assert.is_nil(res.headers.connection)
                local e = echo_of(res)
                assert.equal("/ka/r", e.path)
                assert.equal("i=" .. i, e.query)
            end
            assert.is_false(c:closed(0.2))
            -- the upstream pool reused one connection for all five
            assert.equal(1, established_to(ka_mock.port))
        end)

        it("never reuses an upstream connection whose response was not read to the end", function()
            local c = connect(gw.port)
            -- a slow body (20 s), so the response is surely unfinished
            assert.is_true(c:request({ path = "/ka/big?bytes=1000000&drip_ms=20&chunk=1000" }))
            local raw = c:read_raw(0.3)
            assert.is_true(#raw > 0)
            assert.equal(1, established_to(ka_mock.port))
            c:close()
            proc.sleep(0.3)
            -- the half-read upstream connection is gone, not pooled
            assert.equal(0, established_to(ka_mock.port))
            for i = 1, 3 do
                local res = get(gw.port, "/ka/after?i=" .. i)
                assert.equal(200, res.status)
                assert.equal("i=" .. i, echo_of(res).query)
            end
        end)

        it("passes an early answer from a backend that skips the body, and stays healthy", function()
            local c = connect(big_gw.port)
            c:request_stream({ path = "/ka/early?skip_body=1&status=401", length = 4 * 1024 * 1024,
                total = 4 * 1024 * 1024 })
            local res = read(c)
            assert.equal(401, res.status)
            -- the upstream connection had unread body bytes: never reused
            for i = 1, 3 do
                local r = client.request(big_gw.port, { method = "POST", path = "/ka/after?i=" .. i,
                    body = "x" .. i })
                assert.equal(200, r.status)
                local e = echo_of(r)
                assert.equal("i=" .. i, e.query)
                assert.equal(2, e.body_length)
            end
        end)

        it("keeps an HTTP/1.0 keep-alive connection open", function()
            local c = connect(gw.port)
            for i = 1, 2 do
                assert.is_true(c:request({ path = "/echo/ten?i=" .. i, version = "HTTP/1.0",
                    headers = { Connection = "keep-alive" } }))
                local res = read(c)
                assert.equal(200, res.status)
                assert.equal("HTTP/1.0", res.version)
                assert.equal("keep-alive", res.headers.connection)
                assert.equal("i=" .. i, echo_of(res).query)
            end
            -- and without keep-alive, a 1.0 connection closes
            assert.is_true(c:request({ path = "/echo/ten", version = "HTTP/1.0" }))
            assert.equal(200, read(c).status)
            assert.is_true(c:closed(2))
        end)

        it("closes a connection whose client stops reading (send_timeout_ms)", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/x?bytes=100000000" }))
            proc.sleep(2.5)
            local got, how = c:read_raw(5)
            assert.equal("closed", how)
            assert.is_true(#got < 100000000, "got all " .. #got .. " bytes")
        end)

        it("answers pipelined requests in order", function()
            local c = connect(gw.port)
            local host = "Host: 127.0.0.1\r\n"
            -- the first is slow at the backend: order must still hold
            assert.is_true(c:send(
                "GET /echo/one?delay_ms=200 HTTP/1.1\r\n" .. host .. "\r\n"
                .. "POST /echo/two HTTP/1.1\r\n" .. host .. "Content-Length: 5\r\n\r\nhello"
                .. "GET /echo/three HTTP/1.1\r\n" .. host .. "\r\n"))
            local paths = {}
            for i = 1, 3 do
                local res = read(c)
                assert.equal(200, res.status)
                local e = echo_of(res)
                paths[i] = e.path
                if i == 2 then
                    assert.equal("POST", e.method)
                    assert.equal(5, e.body_length)
                    assert.equal(client.sha256_hex("hello"), e.body_sha256)
                end
            end
            assert.same({ "/echo/one", "/echo/two", "/echo/three" }, paths)
            assert.is_false(c:closed(0.2))
        end)
    end)

    describe("request bodies", function()
        it("forwards a Content-Length body whole", function()
            local body = client.pattern(0, 50000)
            local res = client.request(gw.port, { method = "POST", path = "/echo/cl", body = body })
            assert.equal(200, res.status)
            local e = echo_of(res)
            assert.equal(50000, e.body_length)
            assert.equal(client.sha256_hex(body), e.body_sha256)
            assert.equal("50000", e.headers["content-length"])
            assert.is_nil(e.headers["transfer-encoding"])
        end)

        it("forwards a chunked body whole", function()
            local pieces = { client.pattern(0, 1), client.pattern(1, 20000), client.pattern(20001, 7) }
            local res = client.request(gw.port, { method = "PUT", path = "/echo/chunked",
                chunked = pieces })
            assert.equal(200, res.status)
            local e = echo_of(res)
            assert.equal("PUT", e.method)
            assert.equal(20008, e.body_length)
            assert.equal(client.sha256_hex(concat(pieces)), e.body_sha256)
        end)

        it("forwards an empty POST with Content-Length: 0", function()
            local res = client.request(gw.port, { method = "POST", path = "/echo/empty", body = "" })
            assert.equal(200, res.status)
            local e = echo_of(res)
            assert.equal(0, e.body_length)
            assert.equal("0", e.headers["content-length"])
        end)
    end)

    describe("response bodies", function()
        it("delivers a Content-Length body", function()
            local res = get(gw.port, "/echo/x?bytes=100000")
            assert.equal(200, res.status)
            assert.equal("100000", res.headers["content-length"])
            assert.is_false(res.chunked)
            same_body(mock_body(100000), res.body)
        end)

        it("delivers a chunked body", function()
            local res = get(gw.port, "/echo/x?bytes=100000&chunked=1")
            assert.equal(200, res.status)
            assert.is_true(res.chunked)
            assert.is_nil(res.headers["content-length"])
            same_body(mock_body(100000), res.body)
        end)

        it("delivers a close-delimited body whole, chunked, and keeps the client connection", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/x?bytes=70000&close=1" }))
            local res = read(c)
            assert.equal(200, res.status)
            assert.is_true(res.chunked)
            assert.equal(70000, res.body_length)
            same_body(mock_body(70000), res.body)
            -- the same connection still serves
            assert.is_true(c:request({ path = "/echo/after" }))
            local res2 = read(c)
            assert.equal(200, res2.status)
            assert.equal("/echo/after", echo_of(res2).path)
        end)

        it("delivers a close-delimited body to an HTTP/1.0 client by closing", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/x?bytes=70000&close=1", version = "HTTP/1.0" }))
            local res = read(c)
            assert.equal(200, res.status)
            assert.is_true(res.close_delimited)
            same_body(mock_body(70000), res.body)
        end)

        it("delivers a slow (dripped) body whole", function()
            local res = get(gw.port, "/echo/x?bytes=5000&drip_ms=5&chunk=500")
            assert.equal(200, res.status)
            assert.equal(5000, res.body_length)
            same_body(mock_body(5000), res.body)
        end)

        it("answers HEAD with the headers and no body", function()
            local c = connect(gw.port)
            c:settimeout(2)
            assert.is_true(c:request({ method = "HEAD", path = "/echo/x?bytes=500" }))
            local res = read(c)
            assert.equal(200, res.status)
            assert.equal("500", res.headers["content-length"])
            assert.equal("", res.body)
            -- no stray body bytes: the next response parses cleanly
            assert.is_true(c:request({ path = "/echo/next" }))
            local res2 = read(c)
            assert.equal(200, res2.status)
            assert.equal("/echo/next", echo_of(res2).path)
        end)
    end)

    describe("bodyless responses", function()
        -- each must complete at once: the next request on the connection
        -- is answered (it used to wait for the upstream read timeout)
        for _, case in ipairs({
            { "Content-Length: 0", "/echo/x?bytes=0", 200 },
            { "204", "/echo/x?status=204", 204 },
            { "304", "/echo/x?status=304", 304 },
        }) do
            it("completes a " .. case[1] .. " response and serves the next request", function()
                local c = connect(gw.port)
                c:settimeout(2)
                assert.is_true(c:request({ path = case[2] }))
                local res = read(c)
                assert.equal(case[3], res.status)
                assert.equal("", res.body)
                assert.is_true(c:request({ path = "/echo/next" }))
                local res2 = read(c)
                assert.equal(200, res2.status)
                assert.equal("/echo/next", echo_of(res2).path)
            end)
        end
    end)

    describe("interim responses", function()
        it("answers Expect: 100-continue with 100, then the response; the backend never sees Expect", function()
            local c = connect(gw.port)
            assert.is_true(c:send("POST /echo/expect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                .. "Expect: 100-continue\r\nContent-Length: 11\r\n\r\n"))
            local cont = read(c, { timeout = 3 })
            assert.equal(100, cont.status)
            assert.is_true(c:send("hello world"))
            local res = read(c)
            assert.equal(200, res.status)
            local e = echo_of(res)
            assert.is_nil(e.headers.expect)
            assert.equal(11, e.body_length)
            assert.equal(client.sha256_hex("hello world"), e.body_sha256)
        end)

        it("forwards a 1xx from the upstream before the final response", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/x?interim=103" }))
            local early = read(c)
            assert.equal(103, early.status)
            assert.equal("</style.css>; rel=preload", early.headers.link)
            local res = read(c)
            assert.equal(200, res.status)
            assert.equal("/echo/x", echo_of(res).path)
        end)
    end)

    describe("headers", function()
        it("removes hop-by-hop request headers, and those named in Connection", function()
            local res = client.request(gw.port, { path = "/echo/hop", headers = {
                { "Connection", "close, X-Secret" },
                { "Keep-Alive", "timeout=5" },
                { "Proxy-Connection", "keep-alive" },
                { "TE", "trailers" },
                { "Trailer", "X-Trailer" },
                { "Upgrade", "websocket" },
                { "Proxy-Authorization", "Basic eDp5" },
                { "X-Secret", "hidden" },
                { "X-Kept", "yes" },
            } })
            assert.equal(200, res.status)
            local h = echo_of(res).headers
            for _, name in ipairs({ "connection", "keep-alive", "proxy-connection", "te",
                "trailer", "upgrade", "proxy-authorization", "x-secret" }) do
                assert.is_nil(h[name], name .. " reached the backend")
            end
            assert.equal("yes", h["x-kept"])
            -- the client asked to close
            assert.equal("close", res.headers.connection)
        end)

        it("removes hop-by-hop response headers, and those named in Connection", function()
            local q = concat({
                "header=Connection:X-Resp-Secret",
                "header=Keep-Alive:timeout%3D9",
                "header=Proxy-Connection:keep-alive",
                "header=Proxy-Authenticate:Basic",
                "header=Trailer:X-T",
                "header=Upgrade:h2c",
                "header=TE:trailers",
                "header=X-Resp-Secret:s",
                "header=X-Resp-Kept:yes",
            }, "&")
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/x?bytes=10&" .. q }))
            local res = read(c)
            assert.equal(200, res.status)
            for _, name in ipairs({ "connection", "keep-alive", "proxy-connection",
                "proxy-authenticate", "trailer", "upgrade", "te", "x-resp-secret" }) do
                assert.is_nil(res.headers[name], name .. " reached the client")
            end
            assert.equal("yes", res.headers["x-resp-kept"])
            same_body(mock_body(10), res.body)
            assert.is_false(c:closed(0.2))
        end)

        it("appends X-Forwarded-For, -Proto and -Host", function()
            local res = get(gw.port, "/echo/fwd", { ["X-Forwarded-For"] = "1.2.3.4" },
                { host = "api.example.com:8000" })
            local h = echo_of(res).headers
            assert.equal("1.2.3.4, 127.0.0.1", h["x-forwarded-for"])
            assert.equal("http", h["x-forwarded-proto"])
            assert.equal("api.example.com:8000", h["x-forwarded-host"])
            assert.equal("api.example.com:8000", h.host)

            local res2 = get(gw.port, "/echo/fwd")
            assert.equal("127.0.0.1", echo_of(res2).headers["x-forwarded-for"])

            local res3 = client.request(gw.port, { path = "/echo/fwd", headers = {
                { "X-Forwarded-For", "1.1.1.1" }, { "X-Forwarded-For", "2.2.2.2, 3.3.3.3" },
                { "X-Forwarded-Proto", "https" } } })
            local h3 = echo_of(res3).headers
            assert.equal("1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1", h3["x-forwarded-for"])
            assert.equal("https, http", h3["x-forwarded-proto"])
        end)

        it("generates an X-Request-Id and gives the same one to the backend and the client", function()
            local res = get(gw.port, "/echo/rid")
            local id = res.headers["x-request-id"]
            assert.matches(HEX32, id)
            assert.equal(id, echo_of(res).headers["x-request-id"])
            local res2 = get(gw.port, "/echo/rid")
            assert.not_equal(id, res2.headers["x-request-id"])
        end)

        it("keeps a sane client X-Request-Id and replaces an insane one", function()
            local res = get(gw.port, "/echo/rid", { ["X-Request-Id"] = "trace-42.a_b" })
            assert.equal("trace-42.a_b", res.headers["x-request-id"])
            assert.equal("trace-42.a_b", echo_of(res).headers["x-request-id"])

            local bad = get(gw.port, "/echo/rid", { ["X-Request-Id"] = "a b<script>" })
            local id = bad.headers["x-request-id"]
            assert.matches(HEX32, id)
            assert.equal(id, echo_of(bad).headers["x-request-id"])
        end)

        it("keeps repeated Set-Cookie headers separate", function()
            local res = get(gw.port, "/echo/x?bytes=2&header=Set-Cookie:a%3D1%3B%20Path%3D%2F"
                .. "&header=Set-Cookie:b%3D2%2C%20c")
            assert.same({ "a=1; Path=/", "b=2, c" }, res.headers["set-cookie"])
            local n = 0
            for _, pair in ipairs(res.header_list) do
                if pair[1]:lower() == "set-cookie" then
                    n = n + 1
                end
            end
            assert.equal(2, n)
        end)

        it("passes the status line and other headers unchanged", function()
            local res = get(gw.port, "/echo/x?status=201&bytes=3&header=X-Custom:Mixed%20Case%20Value"
                .. "&header=X-Multi:one&header=X-Multi:two")
            assert.equal(201, res.status)
            assert.equal("Created", res.reason)
            assert.equal("HTTP/1.1", res.version)
            assert.equal("application/octet-stream", res.headers["content-type"])
            local seen = {}
            for _, pair in ipairs(res.header_list) do
                seen[#seen + 1] = pair[1] .. ": " .. pair[2]
            end
            local all = concat(seen, "\n")
            assert.matches("X%-Custom: Mixed Case Value", all)
            assert.matches("X%-Multi: one\nX%-Multi: two", all)

            local nf = get(gw.port, "/echo/x?status=404&bytes=1")
            assert.equal(404, nf.status)
            assert.equal("0", nf.body)
        end)

        it("takes the authority of an absolute-form target as the Host", function()
            local c = connect(gw.port)
            assert.is_true(c:send("GET http://api.example.com/echo/abs?q=1 HTTP/1.1\r\n"
                .. "Host: other.example.com\r\n\r\n"))
            local e = echo_of(read(c))
            assert.equal("/echo/abs", e.path)
            assert.equal("q=1", e.query)
            assert.equal("api.example.com", e.headers.host)
        end)

        it("forwards the method, path and query as received", function()
            local res = client.request(gw.port, { method = "DELETE", path = "/echo/a%20b/c?x=1&y=%2F" })
            local e = echo_of(res)
            assert.equal("DELETE", e.method)
            assert.equal("/echo/a%20b/c", e.path)
            assert.equal("x=1&y=%2F", e.query)
        end)
    end)

    describe("routing", function()
        it("strips the route prefix when strip_prefix is set", function()
            local e = echo_of(get(gw.port, "/strip/a/b?x=1"))
            assert.equal("/a/b", e.path)
            assert.equal("x=1", e.query)
            assert.equal("/", echo_of(get(gw.port, "/strip")).path)
            -- without strip_prefix the path is kept
            assert.equal("/echo/a/b", echo_of(get(gw.port, "/echo/a/b")).path)
        end)

        it("answers 404 with JSON when no route matches", function()
            local res = get(gw.port, "/nowhere")
            assert.equal(404, res.status)
            assert.matches("application/json", res.headers["content-type"])
            local body = cjson.decode(res.body)
            assert.is_string(body.error)
            assert.equal(res.headers["x-request-id"], body.request_id)
        end)
    end)

    describe("upstream failures", function()
        it("answers 502 when the upstream refuses the connection", function()
            local res = get(gw.port, "/refused/x")
            assert.equal(502, res.status)
            local body = cjson.decode(res.body)
            assert.equal(res.headers["x-request-id"], body.request_id)
        end)

        for _, how in ipairs({ "closes", "resets" }) do
            it("answers 502 when the upstream " .. how .. " the connection before answering", function()
                local c = connect(gw.port)
                assert.is_true(c:request({ path = "/rude/x" }))
                rude:settimeout(3)
                local peer = assert(rude:accept())
                peer:settimeout(1)
                assert.matches("^GET /rude/x HTTP/1.1", peer:receive("*l"))
                if how == "resets" then
                    peer:setoption("linger", { on = true, timeout = 0 })
                end
                peer:close()
                local res = read(c)
                assert.equal(502, res.status)
                assert.equal(res.headers["x-request-id"], cjson.decode(res.body).request_id)
            end)
        end

        it("answers 502 to an invalid response from the upstream", function()
            for _, bad in ipairs({
                "garbage\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "HTTP/1.1 200 OK\r\nX-Bad: a\0b\r\nContent-Length: 2\r\n\r\nok",
                -- a name that is not a token, or space before the colon: a client
                -- could read these two ways, so they never reach it
                "HTTP/1.1 200 OK\r\nX-Bad : a\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\nX(Bad): a\r\nContent-Length: 2\r\n\r\nok",
                -- obs-fold in a response: a client could join the lines its own way
                "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
            }) do
                local c = connect(gw.port)
                assert.is_true(c:request({ path = "/rude/bad" }))
                local peer = accept_request(rude)
                peer:send(bad)
                local res = read(c)
                assert.equal(502, res.status, "for " .. bad)
                peer:close()
            end
        end)

        it("cuts the client connection when the upstream body is truncated", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/rude/cut" }))
            local peer = accept_request(rude)
            peer:send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            proc.sleep(0.1)
            peer:close()
            -- never a complete response: the head went out, then a close
            local res, err, partial = c:read_response({ timeout = 3 })
            assert.is_nil(res)
            assert.equal("closed", err)
            assert.equal(200, partial.status)
            assert.equal("abc", partial.body)
        end)

        it("retries on a new connection when the backend closed an idle pooled one", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/rude/one" }))
            local peer = accept_request(rude)
            peer:send("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
            assert.equal("one", read(c).body)
            -- the pooled connection dies just as the next request comes
            peer:close()
            assert.is_true(c:request({ path = "/rude/two" }))
            local peer2, line = accept_request(rude)
            assert.matches("^GET /rude/two ", line)
            peer2:send("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
            local res = read(c)
            assert.equal(200, res.status)
            assert.equal("two", res.body)
            peer2:close()
        end)

        it("reuses a pooled upstream connection for the next request", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/rude/a" }))
            local peer = accept_request(rude)
            peer:send("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
            assert.equal("a", read(c).body)
            c:close()
            local c2 = connect(gw.port)
            assert.is_true(c2:request({ path = "/rude/b" }))
            assert.matches("^GET /rude/b ", next_request(peer))
            peer:send("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
            assert.equal("b", read(c2).body)
            peer:close()
        end)

        it("answers 504 when the upstream does not take the request body in time", function()
            local c = connect(big_gw.port)
            c:request_stream({ path = "/slow/x?delay_ms=3000", length = 32 * 1024 * 1024,
                total = 32 * 1024 * 1024 })
            local res = read(c, { timeout = 5 })
            assert.equal(504, res.status)
            assert.is_true(c:closed(2))
        end)

        it("answers 504 when the upstream is slower than its read timeout", function()
            local t0 = proc.now()
            local res = get(gw.port, "/slow/x?delay_ms=3000")
            local took = proc.now() - t0
            assert.equal(504, res.status)
            assert.is_true(took < 2, "took " .. took .. " s")
            assert.is_true(took >= SLOW_READ_MS / 1000 - 0.05, "took " .. took .. " s")
            -- an answer within the timeout passes
            assert.equal(200, get(gw.port, "/slow/x?delay_ms=50").status)
        end)

        it("answers 504 when the upstream does not accept the connection in time", function()
            local t0 = proc.now()
            local res = get(gw.port, "/blackhole/x")
            local took = proc.now() - t0
            assert.equal(504, res.status)
            assert.matches("connect timed out", res.body)
            assert.is_true(took >= CONNECT_MS / 1000 - 0.05, "took " .. took .. " s")
            assert.is_true(took < CONNECT_MS / 1000 + 1, "took " .. took .. " s")
            -- the worker keeps serving
            assert.equal(200, get(gw.port, "/echo/after").status)
        end)
    end)

    describe("limits", function()
        it("answers 431 to a head over max_header_bytes and closes", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/big", headers = { ["X-Big"] = rep("a", 3000) } }))
            local res = read(c)
            assert.equal(431, res.status)
            assert.is_true(c:closed(2))
        end)

        it("answers 414 to a URI over max_uri_bytes and closes", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/" .. rep("u", 600) }))
            local res = read(c)
            assert.equal(414, res.status)
            assert.is_true(c:closed(2))
            -- just under the limit passes
            local ok = get(gw.port, "/echo/" .. rep("u", 400))
            assert.equal(200, ok.status)
        end)

        it("answers 413 to a Content-Length over max_body_bytes without reading it", function()
            local c = connect(gw.port)
            assert.is_true(c:send("POST /echo/big HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                .. "Content-Length: 70000\r\n\r\n"))
            local res = read(c)
            assert.equal(413, res.status)
            assert.is_true(c:closed(2))
        end)

        it("answers 413 to a chunked body that grows past max_body_bytes", function()
            local c = connect(gw.port)
            local ok = c:request_stream({ path = "/echo/grow", chunked = true, total = 200000,
                chunk_size = 16384 })
            -- the gateway may close while we still send: that is fine
            local _ = ok
            local res = read(c)
            assert.equal(413, res.status)
            assert.is_true(c:closed(2))
            -- a body at the limit passes
            local fit = client.request(gw.port, { method = "POST", path = "/echo/fit",
                chunked = { client.pattern(0, 65536) } })
            assert.equal(200, fit.status)
            assert.equal(65536, echo_of(fit).body_length)
        end)

        it("answers 408 and closes when the head does not arrive in time", function()
            local c = connect(gw.port)
            assert.is_true(c:send("GET /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"))
            local t0 = proc.now()
            local res = read(c, { timeout = 3 })
            local took = proc.now() - t0
            assert.equal(408, res.status)
            assert.is_true(took >= 0.5 and took < 2, "took " .. took .. " s")
            assert.is_true(c:closed(2))
        end)

        it("answers 408 and closes when the body stalls", function()
            local c = connect(gw.port)
            assert.is_true(c:send("POST /echo/stall HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                .. "Content-Length: 10\r\n\r\nabc"))
            local res = read(c, { timeout = 3 })
            assert.equal(408, res.status)
            assert.is_true(c:closed(2))
        end)

        it("closes an idle keep-alive connection after keepalive_timeout_ms", function()
            local c = connect(gw.port)
            assert.is_true(c:request({ path = "/echo/idle" }))
            assert.equal(200, read(c).status)
            local t0 = proc.now()
            assert.is_true(c:closed(3))
            local took = proc.now() - t0
            assert.is_true(took >= 0.8 and took < 2.5, "closed after " .. took .. " s")
        end)

        it("closes a connection that never sends a byte", function()
            local c = connect(gw.port)
            assert.is_true(c:closed(3))
        end)
    end)
end)

describe("proxy max_keepalive_requests", function()
    after_each(function()
        client.close_all()
        gateway.stop_all()
    end)

    it("closes the connection after max_keepalive_requests responses", function()
        local mock = gateway.mock()
        local gw = gateway.start({
            node = { limits = { max_keepalive_requests = 3 } },
            routes = {
                upstreams = { gateway.upstream("mock", mock) },
                routes = { { id = "all", paths = { "/*" }, upstream = "mock" } },
                consumers = gateway.array(), global_policies = gateway.array(),
            },
        })
        local c = connect(gw.port)
        for i = 1, 3 do
            assert.is_true(c:request({ path = "/n" .. i }))
            local res = read(c)
            assert.equal(200, res.status)
            assert.equal("/n" .. i, echo_of(res).path)
            if i < 3 then
                assert.is_nil(res.headers.connection)
            else
                assert.equal("close", res.headers.connection)
            end
        end
        assert.is_true(c:closed(2))
    end)
end)

-- A connection's timeouts are one lazy deadline (deadline.c): the timer
-- armed for an earlier deadline fires and must re-arm for a later one, and a
-- shorter one set later must move it. A keep-alive timeout far longer than
-- the header one tells the two apart under load.
describe("proxy timeouts on a kept-alive connection", function()
    local gw
    setup(function()
        local mock = gateway.mock()
        gw = gateway.start({
            node = { limits = { client_header_timeout_ms = 500, keepalive_timeout_ms = 3000 } },
            routes = {
                upstreams = { gateway.upstream("mock", mock) },
                routes = { { id = "all", paths = { "/*" }, upstream = "mock" } },
                consumers = gateway.array(), global_policies = gateway.array(),
            },
        })
    end)
    teardown(function()
        client.close_all()
        gateway.stop_all()
    end)

    it("counts keepalive_timeout_ms from the last response of a busy connection", function()
        local c = connect(gw.port)
        local t_start = proc.now()
        -- requests for longer than client_header_timeout_ms (500)
        for i = 1, 4 do
            assert.is_true(c:request({ path = "/busy" .. i }))
            assert.equal(200, read(c).status)
            socket.sleep(0.2)
        end
        assert.is_true(c:request({ path = "/last" }))
        assert.equal(200, read(c).status)
        assert.is_true(proc.now() - t_start > 0.6)
        local t0 = proc.now()
        assert.is_true(c:closed(6))
        local took = proc.now() - t0
        assert.is_true(took >= 2.8 and took < 5, "closed after " .. took .. " s")
    end)

    it("times out a head that stalls on a kept-alive connection (408)", function()
        local c = connect(gw.port)
        assert.is_true(c:request({ path = "/first" }))
        assert.equal(200, read(c).status)
        socket.sleep(0.1) -- the keep-alive deadline (3000) is set
        assert.is_true(c:send("GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n"))
        local t0 = proc.now()
        local res = read(c, { timeout = 5 })
        local took = proc.now() - t0
        assert.equal(408, res.status)
        -- the header timeout from the head's first byte, not the idle one
        assert.is_true(took >= 0.4 and took < 2, "took " .. took .. " s")
        assert.is_true(c:closed(2))
    end)
end)
