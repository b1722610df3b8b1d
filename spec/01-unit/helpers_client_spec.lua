-- Specs of spec/helpers/client.lua (and sha256.lua), against real servers:
-- python3's http.server for plain GETs, and spec/helpers/script_server.lua
-- for chunked, close-delimited, interim, malformed and slow responses.
local client = require("helpers.client")
local ports = require("helpers.ports")
local proc = require("helpers.proc")
local cjson = require("cjson")

local concat = table.concat

local function start_server(argv, port)
    local dir = proc.tmpdir()
    local log = dir .. "/server.log"
    local pid = proc.spawn(argv, { log = log, cwd = argv.cwd })
    if not proc.wait_port("127.0.0.1", port, 10) then
        proc.kill(pid, "KILL")
        error("server did not start: " .. (proc.read_file(log) or ""))
    end
    return pid
end

local function stop_server(pid)
    if pid and proc.alive(pid) then
        proc.kill(pid, "KILL")
        proc.wait_exit(pid, 5)
    end
end

describe("helpers.client against python3 http.server", function()
    local port, pid, docroot
    local content = ("line of static text\n"):rep(500)

    setup(function()
        docroot = proc.tmpdir()
        proc.write_file(docroot .. "/file.txt", content)
        port = ports.free()
        pid = start_server({ "python3", "-m", "http.server", "--bind", "127.0.0.1",
            tostring(port), cwd = docroot }, port)
    end)

    teardown(function()
        stop_server(pid)
        proc.cleanup()
    end)

    after_each(function()
        client.close_all()
    end)

    it("reads a Content-Length response", function()
        local conn = assert(client.connect(port))
        assert.is_true(conn:request{ path = "/file.txt" })
        local res = assert(conn:read_response())
        assert.equal(200, res.status)
        assert.equal("OK", res.reason)
        assert.equal("HTTP/1.0", res.version)
        assert.equal(content, res.body)
        assert.equal(#content, res.body_length)
        assert.equal(tostring(#content), res.headers["content-length"])
        assert.equal(tostring(#content), res.headers["Content-Length"])
        assert.equal("text/plain", res.headers["CONTENT-TYPE"])
        assert.is_false(res.chunked)
        assert.is_false(res.close_delimited)
        assert.matches("^HTTP/1.0 200 OK\r\n", res.raw_head)
        -- header_list holds every header as received, in order
        local lines = { "HTTP/1.0 200 OK" }
        for _, pair in ipairs(res.header_list) do
            lines[#lines + 1] = pair[1] .. ": " .. pair[2]
        end
        assert.equal(res.raw_head, concat(lines, "\r\n"))
        assert.is_true(#res.header_list >= 4)
    end)

    it("get() and request() open and close a connection per call", function()
        local res = assert(client.get(port, "/missing.txt"))
        assert.equal(404, res.status)
        res = assert(client.request(port, { method = "HEAD", path = "/file.txt" }))
        assert.equal(200, res.status)
        assert.equal("", res.body)
        assert.equal(tostring(#content), res.headers["content-length"])
    end)

    it("streams a body to a sink instead of keeping it", function()
        local pieces = {}
        local res = assert(client.request(port, {
            path = "/file.txt", sink = function(p) pieces[#pieces + 1] = p end,
        }))
        assert.is_nil(res.body)
        assert.equal(#content, res.body_length)
        assert.equal(content, concat(pieces))
    end)

    it("returns nil and an error when nothing listens", function()
        local res, err = client.get(ports.free(), "/")
        assert.is_nil(res)
        assert.matches("connect 127.0.0.1:%d+: connection refused", err)
    end)
end)

describe("helpers.client against a scripted server", function()
    local port, pid

    setup(function()
        port = ports.free()
        pid = start_server({ "luajit", "spec/helpers/script_server.lua", tostring(port), "300" },
            port)
    end)

    teardown(function()
        stop_server(pid)
        proc.cleanup()
    end)

    local extra_pids = {}

    -- busted keeps only the last finally() of a test: clean up here instead
    after_each(function()
        client.close_all()
        for _, p in ipairs(extra_pids) do
            stop_server(p)
        end
        extra_pids = {}
    end)

    local function connect()
        return assert(client.connect(port))
    end

    -- The raw bytes the server received for one request written by opts.
    local function wire(opts)
        local conn = connect()
        opts.path = "/raw"
        assert.is_true(conn:request(opts))
        local res = assert(conn:read_response())
        assert.equal(200, res.status)
        return res.body
    end

    describe("writing requests", function()
        it("adds Host and Content-Length", function()
            assert.equal("POST /raw HTTP/1.1\r\nHost: 127.0.0.1:" .. port .. "\r\n"
                .. "X-A: 1\r\nContent-Length: 5\r\n\r\nhello",
                wire{ method = "POST", headers = { { "X-A", "1" } }, body = "hello" })
        end)

        it("keeps the caller's Host and Content-Length, and can omit Host", function()
            assert.equal("GET /raw HTTP/1.1\r\nhost: example.com\r\n\r\n",
                wire{ headers = { { "host", "example.com" } } })
            assert.equal("PUT /raw HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                wire{ method = "PUT", host = false, headers = { ["Content-Length"] = "3" },
                      body = "abc" })
            assert.equal("GET /raw HTTP/1.0\r\nHost: h\r\n\r\n",
                wire{ host = "h", version = "HTTP/1.0", headers = { Connection = nil } })
        end)

        it("takes headers as a map (sorted) or a list (in order, repeats kept)", function()
            assert.equal("GET /raw HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: x\r\nB: y\r\nC: 3\r\n\r\n",
                wire{ host = "h", headers = { C = 3, A = "1", B = { "x", "y" } } })
            assert.equal("GET /raw HTTP/1.1\r\nHost: h\r\nZ: 1\r\nA: 2\r\nZ: 3\r\n\r\n",
                wire{ host = "h", headers = { { "Z", "1" }, { "A", "2" }, { "Z", "3" } } })
        end)

        it("writes chunked bodies, with trailers", function()
            assert.equal("POST /raw HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. "b\r\nhello world\r\n0\r\n\r\n",
                wire{ method = "POST", host = "h", chunked = true, body = "hello world" })
            assert.equal("POST /raw HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. "1\r\na\r\n10\r\n" .. ("b"):rep(16) .. "\r\n0\r\nX-T: 1\r\n\r\n",
                wire{ method = "POST", host = "h", chunked = { "a", "", ("b"):rep(16) },
                      trailers = { { "X-T", "1" } } })
        end)

        it("sends raw bytes untouched", function()
            local conn = connect()
            assert.is_true(conn:send("GARBAGE\r\n\r\n"))
            local res = assert(conn:read_response())
            assert.equal(400, res.status)
            assert.equal("bad request", res.body)
            assert.is_true(conn:closed(2))
        end)
    end)

    describe("reading responses", function()
        it("de-chunks, with chunk extensions and trailers", function()
            local conn = connect()
            conn:request{ path = "/chunked" }
            local res = assert(conn:read_response())
            assert.is_true(res.chunked)
            assert.equal("hello world", res.body)
            assert.equal(11, res.body_length)
            assert.equal("yes", res.trailers["x-trailer"])
            assert.same({ { "X-Trailer", "yes" } }, res.trailer_list)
        end)

        it("reads close-delimited bodies to the end", function()
            local conn = connect()
            conn:request{ path = "/close" }
            local res = assert(conn:read_response())
            assert.is_true(res.close_delimited)
            assert.equal("close-delimited body", res.body)
            assert.is_true(conn:closed(1))
        end)

        it("returns interim 1xx responses one by one", function()
            local conn = connect()
            conn:request{ method = "POST", path = "/continue",
                          headers = { { "Content-Length", "4" }, { "Expect", "100-continue" } } }
            local interim = assert(conn:read_response())
            assert.equal(100, interim.status)
            assert.equal("", interim.body)
            assert.is_true(conn:send("data"))
            local res = assert(conn:read_response())
            assert.equal(200, res.status)
            assert.equal("got:data", res.body)
        end)

        it("joins repeated headers but keeps Set-Cookie a list", function()
            local res = assert(client.get(port, "/headers"))
            assert.equal("Fine Thanks", res.reason)
            assert.equal("one, two", res.headers["x-multi"])
            assert.equal("one, two", res.headers["X-MULTI"])
            assert.same({ "a=1; Path=/", "b=2" }, res.headers["set-cookie"])
            assert.equal("text/plain", res.headers["content-type"])
            assert.equal("padded", res.headers["x-spaces"])
            assert.same({ "CONTENT-TYPE", "text/plain" }, res.header_list[3])
            assert.equal(7, #res.header_list)
            assert.is_nil(res.headers["x-absent"])
        end)

        it("keeps a connection alive across requests, pipelined or not", function()
            local conn = connect()
            conn:request{ path = "/one" }
            assert.equal("GET /one ", assert(conn:read_response()).body)
            conn:request{ method = "POST", path = "/two", body = "b2" }
            assert.equal("POST /two b2", assert(conn:read_response()).body)
            -- three requests in one write, three responses in order
            conn:send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                .. "GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n"
                .. "GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
            assert.equal("GET /a ", assert(conn:read_response()).body)
            local none = assert(conn:read_response())
            assert.equal(204, none.status)
            assert.equal("", none.body)
            assert.equal("GET /c ", assert(conn:read_response()).body)
            assert.is_false(conn:closed(0.2))
        end)

        it("reads no body after 304 or HEAD despite Content-Length", function()
            local conn = connect()
            conn:request{ path = "/notmodified" }
            local res = assert(conn:read_response())
            assert.equal(304, res.status)
            assert.equal("", res.body)
            conn:request{ method = "HEAD", path = "/head" }
            res = assert(conn:read_response())
            assert.equal("11", res.headers["content-length"])
            assert.equal("", res.body)
            conn:request{ path = "/head" }
            assert.equal("hello world", assert(conn:read_response()).body)
            -- pipelined: each response matched with its request's method
            conn:request{ method = "HEAD", path = "/head" }
            conn:request{ path = "/head" }
            conn:request{ method = "HEAD", path = "/head" }
            assert.equal("", assert(conn:read_response()).body)
            assert.equal("hello world", assert(conn:read_response()).body)
            assert.equal("", assert(conn:read_response()).body)
            -- raw bytes are not tracked: say head = true
            conn:send("HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n")
            res = assert(conn:read_response{ head = true })
            assert.equal("", res.body)
            conn:request{ path = "/x" }
            assert.equal("GET /x ", assert(conn:read_response()).body)
        end)

        it("parses a response that arrives byte by byte", function()
            local res = assert(client.get(port, "/trickle"))
            assert.equal(200, res.status)
            assert.equal("yes", res.headers["x-trickle"])
            assert.equal("trickled body", res.body)
        end)

        it("de-chunks large and tiny chunks at every boundary", function()
            local n = 1000000
            local res = assert(client.get(port, "/bigchunked?n=" .. n))
            assert.is_true(res.chunked)
            assert.equal(n, #res.body)
            assert.is_true(res.body == client.pattern(0, n))
            res = assert(client.get(port, "/tinychunks?n=20000"))
            assert.is_true(res.body == client.pattern(0, 20000))
        end)

        it("streams a large body to a sink", function()
            local n = 5 * 1024 * 1024 + 7
            local h, calls = client.sha256(), 0
            local res = assert(client.request(port, {
                path = "/big?n=" .. n,
                sink = function(piece)
                    calls = calls + 1
                    h:update(piece)
                end,
            }))
            assert.is_nil(res.body)
            assert.equal(n, res.body_length)
            assert.is_true(calls > 1)
            assert.equal(client.pattern_sha256(n), h:hex())
        end)
    end)

    describe("failures", function()
        it("times out when no response comes", function()
            local conn = connect()
            conn:request{ path = "/silent" }
            local t0 = proc.now()
            local res, err = conn:read_response{ timeout = 0.3 }
            assert.is_nil(res)
            assert.equal("timeout", err)
            local dt = proc.now() - t0
            assert.is_true(dt >= 0.29 and dt < 2, "waited " .. dt)
        end)

        it("times out when a body stops halfway", function()
            local conn = connect()
            conn:settimeout(0.3)
            conn:request{ path = "/slow" }
            local res, err, partial = conn:read_response()
            assert.is_nil(res)
            assert.equal("timeout", err)
            assert.equal(200, partial.status)
            assert.equal("abc", partial.body)
        end)

        it("says closed when the peer closes before a full response", function()
            local conn = connect()
            conn:request{ path = "/hangup" }
            local res, err = conn:read_response()
            assert.is_nil(res)
            assert.equal("closed", err)

            conn = connect()
            conn:request{ path = "/partial" }
            local partial
            res, err, partial = conn:read_response()
            assert.is_nil(res)
            assert.equal("closed", err)
            assert.equal("0123456789", partial.body)
        end)

        it("reports a malformed status line", function()
            local res, err = client.get(port, "/badstatus")
            assert.is_nil(res)
            assert.matches("malformed status line: HTTX/1.1 200 OK", err, 1, true)
        end)

        it("read_raw returns the bytes as sent, then why it stopped", function()
            local conn = connect()
            conn:request{ path = "/close" }
            local raw, why = conn:read_raw(2)
            assert.equal("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                .. "close-delimited body", raw)
            assert.equal("closed", why)

            conn = connect()
            conn:request{ path = "/silent" }
            raw, why = conn:read_raw(0.2)
            assert.equal("", raw)
            assert.equal("timeout", why)
        end)

        it("close_all() closes every connection still open", function()
            local a, b = connect(), connect()
            b:close()
            assert.equal(1, client.close_all())
            assert.is_true(a.is_closed)
            assert.equal(0, client.close_all())
        end)

        it("closed() tells an open connection from a closed one", function()
            local conn = connect()
            assert.is_false(conn:closed(0.2))
            conn:request{ path = "/hangup" }
            assert.is_true(conn:closed(2))
        end)
    end)

    describe("streaming request bodies", function()
        it("sends a Content-Length body in pieces", function()
            local n = 3 * 1024 * 1024 + 1
            local conn = connect()
            local ok, sent = conn:request_stream{ path = "/sha", length = n }
            assert.is_true(ok)
            assert.equal(n, sent)
            local res = assert(conn:read_response())
            local got = cjson.decode(res.body)
            assert.equal(n, got.length)
            assert.equal(client.pattern_sha256(n), got.sha256)
        end)

        it("sends a chunked body from a producer", function()
            local conn = connect()
            local pieces = { "first ", "", "second ", ("x"):rep(100000) }
            local ok, sent = conn:request_stream{
                path = "/sha", chunked = true,
                producer = function(i) return pieces[i] end,
            }
            assert.is_true(ok)
            assert.equal(#concat(pieces), sent)
            local got = cjson.decode(assert(conn:read_response()).body)
            assert.equal(client.sha256_hex(concat(pieces)), got.sha256)
            assert.equal(#concat(pieces), got.length)
        end)

        it("does not deadlock when the server answers while the body goes up", function()
            -- small kernel buffers on both ends: without reading while it
            -- sends, the client would stall after ~300 KiB of the 4 MiB
            local small_port = ports.free()
            extra_pids[#extra_pids + 1] = start_server({ "luajit",
                "spec/helpers/script_server.lua", tostring(small_port), "60", "small" }, small_port)
            local n = 4 * 1024 * 1024
            local conn = assert(client.connect(small_port))
            assert(conn.sock:setoption("recv-buffer-size", 65536))
            assert(conn.sock:setoption("send-buffer-size", 65536))
            local ok, sent = conn:request_stream{ path = "/echo", length = n, chunk_size = 100000 }
            assert.is_true(ok)
            assert.equal(n, sent)
            assert.is_true(conn.bytes_read_while_sending > 1024 * 1024)
            local h = client.sha256()
            local res = assert(conn:read_response{ sink = function(p) h:update(p) end })
            assert.equal(n, res.body_length)
            assert.equal(client.pattern_sha256(n), h:hex())
        end)

        it("can send less than the declared length", function()
            local conn = connect()
            conn:settimeout(0.3)
            local ok, sent = conn:request_stream{ path = "/sha", length = 100, total = 40 }
            assert.is_true(ok)
            assert.equal(40, sent)
            local res, err = conn:read_response()
            assert.is_nil(res)
            assert.equal("timeout", err)
        end)
    end)
end)

describe("helpers.client body pattern and sha256", function()
    it("pattern is deterministic and position-addressed", function()
        assert.equal("000000000000000\n000000000000001\n", client.pattern(0, 32))
        assert.equal("0000\n0000", client.pattern(11, 9))
        assert.equal("0001\n0000", client.pattern(27, 9))
        local whole = client.pattern(0, 1000)
        assert.equal(whole, client.pattern(0, 337) .. client.pattern(337, 663))
        assert.equal("", client.pattern(5, 0))
    end)

    it("sha256 matches the standard vectors and sha256sum", function()
        assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            client.sha256_hex(""))
        assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            client.sha256_hex("abc"))
        assert.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            client.sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))
        local dir = proc.tmpdir()
        finally(function() proc.cleanup(dir) end)
        for _, n in ipairs({ 55, 56, 63, 64, 65, 1000, 100003 }) do
            local data = client.pattern(3, n)
            proc.write_file(dir .. "/d", data)
            local _, out = proc.run({ "sha256sum", dir .. "/d" })
            assert.equal(out:match("^(%x+)"), client.sha256_hex(data))
            local h = client.sha256()
            for i = 1, n, 13 do
                h:update(data:sub(i, i + 12))
            end
            assert.equal(out:match("^(%x+)"), h:hex())
        end
    end)

    it("sha256 hashes a few MB in well under a second", function()
        local data = client.pattern(0, 4 * 1024 * 1024)
        local t0 = proc.now()
        client.sha256_hex(data)
        local dt = proc.now() - t0
        assert.is_true(dt < 1, "took " .. dt .. " s")
    end)
end)
