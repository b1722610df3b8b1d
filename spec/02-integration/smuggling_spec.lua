-- Ambiguous requests: each is answered 400 (505 for an unsupported major
-- version), the connection is closed, and nothing reaches the backend.
--
-- The backend here is a plain listening socket in this process, never
-- served: any byte the gateway forwarded (on any connection it opened)
-- would be waiting in it. When the client has the gateway's answer, every
-- write the gateway made upstream before answering is already in the
-- kernel, so "the backend received nothing" is checked without sleeping.
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local socket = require("socket")

local concat = table.concat
local ipairs = ipairs
local rep = string.rep

local H = "Host: example.test\r\n"

-- Every ambiguous or malformed request, sent as raw bytes on a new
-- connection. Each ends with a well-formed request the gateway must never
-- answer nor forward (it could only come from a smuggled body).
local SMUGGLED = "GET /smuggled HTTP/1.1\r\n" .. H .. "\r\n"

local CASES = {
    -- framing: Content-Length and Transfer-Encoding
    { "Content-Length with Transfer-Encoding",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { "Transfer-Encoding with Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" },
    { "two differing Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!" },
    { "two identical Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello" },
    { "a Content-Length list",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 5, 5\r\n\r\nhello" },
    { "a non-numeric Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: abc\r\n\r\n" },
    { "a Content-Length with a plus sign",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: +5\r\n\r\nhello" },
    { "a negative Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: -5\r\n\r\nhello" },
    { "a hex Content-Length",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 0x5\r\n\r\nhello" },
    { "a Content-Length with inner space",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 1 5\r\n\r\nhello" },
    { "a Content-Length past 64 bits",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length: 18446744073709551621\r\n\r\nhello" },
    { "Transfer-Encoding: gzip (not ending in chunked)",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n" },
    { "Transfer-Encoding: chunked, gzip",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n" },
    { "Transfer-Encoding chunked then gzip in two fields",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n" },
    { "an unknown Transfer-Encoding resembling chunked",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" },
    { "Transfer-Encoding in an HTTP/1.0 request",
      "POST /b HTTP/1.0\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
    { "Transfer-Encoding: chunked, chunked",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n" },
    -- chunked bodies
    { "a non-hex chunk size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n" },
    { "a chunk size that overflows",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n1" .. rep("0", 16)
      .. "\r\nhello\r\n0\r\n\r\n" },
    { "a space before the chunk size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n" },
    { "a space inside the chunk size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n" },
    { "a 0x chunk size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n" },
    { "a negative chunk size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n" },
    { "a chunk longer than its size",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n" },
    { "a control character in a chunk extension",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5;a\1b\r\nhello\r\n0\r\n\r\n" },
    { "a NUL in a chunk extension",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5;a=\0\r\nhello\r\n0\r\n\r\n" },
    { "a bare LF ending a chunk size line",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n" },
    { "a bare CR in a chunk extension",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n" },
    { "a NUL in a trailer field",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\0b\r\n\r\n" },
    { "a bare LF ending the last chunk",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\n" },
    -- header syntax
    { "whitespace before a colon",
      "POST /b HTTP/1.1\r\n" .. H .. "Content-Length : 5\r\n\r\nhello" },
    { "a tab before a colon",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo\t: bar\r\n\r\n" },
    { "whitespace before the colon of Transfer-Encoding",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello" },
    { "obs-fold",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo: a\r\n b\r\n\r\n" },
    { "obs-fold of Transfer-Encoding",
      "POST /b HTTP/1.1\r\n" .. H .. "Transfer-Encoding: gzip,\r\n chunked\r\n\r\n0\r\n\r\n" },
    { "a NUL in a header value",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo: a\0b\r\n\r\n" },
    { "a bare CR in a header value",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo: a\rb\r\n\r\n" },
    { "a bare CR ending a header line",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo: a\rX-Bar: b\r\n\r\n" },
    { "a bare LF ending a header line",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo: a\nX-Bar: b\r\n\r\n" },
    { "a field name with a space",
      "GET /b HTTP/1.1\r\n" .. H .. "X Foo: a\r\n\r\n" },
    { "a header line without a colon",
      "GET /b HTTP/1.1\r\n" .. H .. "X-Foo\r\n\r\n" },
    { "a leading space on the first header line",
      "GET /b HTTP/1.1\r\n Host: example.test\r\n" .. H .. "\r\n" },
    -- request line and Host
    { "an HTTP/0.9 request line", "GET /b\r\n\r\n" },
    { "a missing Host in HTTP/1.1", "GET /b HTTP/1.1\r\n\r\n" },
    { "two Host headers",
      "GET /b HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n" },
    { "a Host with a space", "GET /b HTTP/1.1\r\nHost: a.test b.test\r\n\r\n" },
    { "a bare CR in the request line", "GET /b\rx HTTP/1.1\r\n" .. H .. "\r\n" },
    { "a lowercase version", "GET /b http/1.1\r\n" .. H .. "\r\n" },
    { "HTTP/1.1 with trailing garbage", "GET /b HTTP/1.1x\r\n" .. H .. "\r\n" },
    { "HTTP/2.0", "GET /b HTTP/2.0\r\n" .. H .. "\r\n", 505 },
    { "HTTP/3.0", "GET /b HTTP/3.0\r\n" .. H .. "\r\n", 505 },
}

describe("smuggling", function()
    local backend, gw

    -- Everything the backend has received since the last call: accepts
    -- every pending connection and reads what is already there.
    local function backend_received()
        local got = {}
        backend:settimeout(0)
        while true do
            local peer = backend:accept()
            if not peer then
                break
            end
            peer:settimeout(0.1)
            while true do
                local data, err, partial = peer:receive(65536)
                local piece = data or partial
                if piece and #piece > 0 then
                    got[#got + 1] = piece
                end
                if err then
                    break
                end
            end
            peer:close()
        end
        return concat(got)
    end

    setup(function()
        backend = assert(socket.bind("127.0.0.1", 0))
        local _, port = backend:getsockname()
        gw = gateway.start({
            node = { limits = { client_header_timeout_ms = 2000 } },
            routes = {
                upstreams = { gateway.upstream("backend", tonumber(port)) },
                routes = { { id = "all", paths = { "/*" }, upstream = "backend" } },
                consumers = gateway.array(), global_policies = gateway.array(),
            },
        })
    end)

    teardown(function()
        client.close_all()
        gateway.stop_all()
        backend:close()
    end)

    after_each(function()
        client.close_all()
    end)

    -- a failed test leaves nothing behind for the next one
    before_each(function()
        backend_received()
    end)

    -- The control: a well-formed request does reach this backend, so an
    -- empty backend below means the gateway held the request back.
    it("forwards a well-formed request to the backend (control)", function()
        local c = assert(client.connect(gw.port))
        assert.is_true(c:send("POST /ok HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
            .. "5\r\nhello\r\n0\r\n\r\n"))
        backend:settimeout(3)
        local peer = assert(backend:accept())
        peer:settimeout(2)
        local head = {}
        repeat
            local line = assert(peer:receive("*l"))
            head[#head + 1] = line
        until line == ""
        assert.matches("^POST /ok HTTP/1.1", head[1])
        assert.is_true(assert(peer:send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")) > 0)
        local res = assert(c:read_response())
        assert.equal(200, res.status)
        assert.equal("ok", res.body)
        peer:close()
        backend_received()
    end)

    for _, case in ipairs(CASES) do
        local name, raw, status = case[1], case[2], case[3] or 400
        it("answers " .. status .. " and closes, forwarding nothing: " .. name, function()
            local c = assert(client.connect(gw.port))
            c:settimeout(3)
            assert.is_true(c:send(raw .. SMUGGLED))
            local res, err = c:read_response({ head = raw:match("^HEAD") ~= nil })
            assert.is_truthy(res, "no response: " .. tostring(err))
            assert.equal(status, res.status)
            assert.equal("close", res.headers.connection)
            -- exactly one response: the smuggled request got none
            local rest, how = c:read_raw(2)
            assert.equal("", rest)
            assert.equal("closed", how)
            assert.equal("", backend_received())
        end)
    end

    it("answers nothing for a request smuggled in a rejected body, on any connection", function()
        -- CL.TE: a backend reading Content-Length would take "0\r\n\r\n" as
        -- the body and the GET as a second request; one reading chunked,
        -- the other way round. The gateway must do neither.
        local c = assert(client.connect(gw.port))
        assert.is_true(c:send("POST /a HTTP/1.1\r\n" .. H .. "Content-Length: 44\r\n"
            .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n" .. H .. "\r\n"))
        local res = assert(c:read_response())
        assert.equal(400, res.status)
        assert.is_true(c:closed(2))
        local seen = backend_received()
        assert.equal("", seen)
        assert.is_nil(seen:find("/admin", 1, true))
    end)

    it("cuts the upstream request when a bad chunk arrives after the head was forwarded", function()
        local c = assert(client.connect(gw.port))
        assert.is_true(c:send("POST /late HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n"
            .. "5\r\nhello\r\n"))
        backend:settimeout(3)
        local peer = assert(backend:accept())
        peer:settimeout(2)
        assert.matches("^POST /late HTTP/1.1", assert(peer:receive("*l")))
        assert.is_true(c:send("zz\r\n" .. SMUGGLED))
        local res = assert(c:read_response())
        assert.equal(400, res.status)
        assert.is_true(c:closed(2))
        -- the backend got an unfinished chunked body, then a close: it
        -- can never complete that request, nor see the smuggled one
        local rest, err, partial = peer:receive("*a")
        rest = rest or partial
        assert.is_nil(err)
        assert.is_nil(rest:find("0\r\n\r\n", 1, true))
        assert.is_nil(rest:find("smuggled", 1, true))
        peer:close()
    end)

    it("keeps serving well-formed requests after all that", function()
        local c = assert(client.connect(gw.port))
        assert.is_true(c:request({ path = "/after" }))
        backend:settimeout(3)
        local peer = assert(backend:accept())
        peer:settimeout(2)
        assert.matches("^GET /after HTTP/1.1", assert(peer:receive("*l")))
        repeat
            local line = assert(peer:receive("*l"))
        until line == ""
        peer:send("HTTP/1.1 204 No Content\r\n\r\n")
        local res = assert(c:read_response())
        assert.equal(204, res.status)
        peer:close()
    end)
end)
