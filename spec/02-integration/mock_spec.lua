-- The mock backend (`moongate mock --listen ADDR`), talked to directly: the
-- echo it answers with and each query parameter that steers it. Other specs
-- trust these answers, so each one is pinned down here.
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local gateway = require("helpers.gateway")

local gettime = socket.gettime

-- The mock's body for bytes=N: this 64-byte pattern, repeated.
local PATTERN = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"

local function pattern(n)
    return (PATTERN:rep(math.ceil(n / 64))):sub(1, n)
end

describe("mock backend", function()
    local mock

    setup(function()
        mock = gateway.mock()
    end)

    teardown(function()
        gateway.stop_all()
    end)

    after_each(function()
        client.close_all()
    end)

    local function get(path, headers)
        local res, err = client.get(mock.port, path, headers)
        assert(res, err)
        return res
    end

    describe("/__mock/hits", function()
        it("counts the requests received before it, whatever their path or fate", function()
            local function hits()
                return cjson.decode(get("/__mock/hits").body).hits
            end
            local before = hits()
            assert.equal(before, hits()) -- asking does not count
            get("/a")
            get("/b?status=503")
            local res = get("/__mock/hits")
            assert.equal(200, res.status)
            assert.matches("^application/json", res.headers["content-type"])
            assert.equal(before + 2, cjson.decode(res.body).hits)
        end)
    end)

    describe("echo", function()
        it("answers a GET with the request as JSON", function()
            local res = get("/some/path?a=1&b=two", { ["X-Thing"] = "yes" })
            assert.equal(200, res.status)
            assert.equal("application/json", res.headers["content-type"])
            local echo = cjson.decode(res.body)
            assert.equal("GET", echo.method)
            assert.equal("/some/path", echo.path)
            assert.equal("a=1&b=two", echo.query)
            assert.equal("yes", echo.headers["x-thing"])
            assert.equal("127.0.0.1:" .. mock.port, echo.headers.host)
            assert.equal("1.1", echo.http_version)
            assert.equal("127.0.0.1", echo.remote_addr)
            assert.equal(0, echo.body_length)
            -- sha256 of the empty body
            assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                echo.body_sha256)
        end)

        it("keeps header order and repeats in header_list, repeats as a list in headers", function()
            local res = get("/", { { "X-Rep", "one" }, { "X-Other", "o" }, { "X-Rep", "two" } })
            local echo = cjson.decode(res.body)
            assert.same({ "one", "two" }, echo.headers["x-rep"])
            local seen = {}
            for _, pair in ipairs(echo.header_list) do
                if pair[1]:match("^x%-") then
                    seen[#seen + 1] = pair[1] .. "=" .. pair[2]
                end
            end
            assert.same({ "x-rep=one", "x-other=o", "x-rep=two" }, seen)
        end)

        it("gives the length and sha256 of a Content-Length body", function()
            local body = ("post body "):rep(1000)
            local res = assert(client.request(mock.port,
                { method = "POST", path = "/up", body = body }))
            local echo = cjson.decode(res.body)
            assert.equal("POST", echo.method)
            assert.equal(#body, echo.body_length)
            assert.equal(client.sha256_hex(body), echo.body_sha256)
        end)

        it("gives the length and sha256 of a chunked body", function()
            local chunks = { "first,", ("x"):rep(70000), "last" }
            local res = assert(client.request(mock.port,
                { method = "PUT", path = "/up", chunked = chunks }))
            local echo = cjson.decode(res.body)
            local whole = table.concat(chunks)
            assert.equal("chunked", echo.headers["transfer-encoding"])
            assert.equal(#whole, echo.body_length)
            assert.equal(client.sha256_hex(whole), echo.body_sha256)
        end)

        it("hashes a large streamed body without holding it", function()
            local total = 8 * 1024 * 1024
            local c = assert(client.connect(mock.port))
            assert(c:request_stream({ path = "/big", length = total }))
            local res = assert(c:read_response())
            local echo = cjson.decode(res.body)
            assert.equal(total, echo.body_length)
            assert.equal(client.pattern_sha256(total), echo.body_sha256)
        end)

        it("serves several requests on one keep-alive connection", function()
            local c = assert(client.connect(mock.port))
            for i = 1, 3 do
                assert(c:request({ path = "/k" .. i }))
                local res = assert(c:read_response())
                assert.equal(200, res.status)
                assert.equal("/k" .. i, cjson.decode(res.body).path)
            end
            assert.is_false(c:closed(0.1))
        end)

        it("answers a pipelined batch in order", function()
            local c = assert(client.connect(mock.port))
            assert(c:send("GET /p1 HTTP/1.1\r\nHost: m\r\n\r\n"
                .. "GET /p2?bytes=5 HTTP/1.1\r\nHost: m\r\n\r\n"
                .. "GET /p3 HTTP/1.1\r\nHost: m\r\n\r\n"))
            assert.equal("/p1", cjson.decode(assert(c:read_response()).body).path)
            assert.equal("01234", assert(c:read_response()).body)
            assert.equal("/p3", cjson.decode(assert(c:read_response()).body).path)
        end)
    end)

    describe("status=", function()
        it("answers with that status and still echoes", function()
            local res = get("/s?status=418")
            assert.equal(418, res.status)
            assert.equal("/s", cjson.decode(res.body).path)
            res = get("/s?status=503")
            assert.equal(503, res.status)
        end)

        it("sends no body with 204 and the connection stays usable", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ path = "/?status=204" }))
            local res = assert(c:read_response())
            assert.equal(204, res.status)
            assert.equal("", res.body)
            assert.is_nil(res.headers["content-length"])
            assert.is_nil(res.headers["transfer-encoding"])
            assert(c:request({ path = "/after" }))
            res = assert(c:read_response())
            assert.equal("/after", cjson.decode(res.body).path)
        end)
    end)

    describe("delay_ms=", function()
        it("waits before answering", function()
            local t0 = gettime()
            local res = get("/?delay_ms=300")
            local took = gettime() - t0
            assert.equal(200, res.status)
            assert.is_true(took >= 0.29, "took " .. took .. " s")
            assert.is_true(took < 2, "took " .. took .. " s")
        end)

        it("delays one request without holding up others", function()
            local slow = assert(client.connect(mock.port))
            assert(slow:request({ path = "/?delay_ms=1000" }))
            local t0 = gettime()
            local res = get("/fast")
            assert.equal(200, res.status)
            assert.is_true(gettime() - t0 < 0.5, "a fast request waited for a slow one")
            res = assert(slow:read_response())
            assert.equal(200, res.status)
        end)
    end)

    describe("bytes=", function()
        for _, n in ipairs({ 0, 1, 63, 64, 65, 65536, 65537, 1000000 }) do
            it("sends exactly " .. n .. " bytes with Content-Length", function()
                local res = get("/?bytes=" .. n)
                assert.equal(200, res.status)
                assert.equal(tostring(n), res.headers["content-length"])
                assert.equal("application/octet-stream", res.headers["content-type"])
                assert.equal(n, #res.body)
                assert.equal(pattern(n), res.body)
            end)
        end
    end)

    describe("chunked=1", function()
        it("frames the body in chunks, same bytes", function()
            local res = get("/?bytes=200000&chunked=1")
            assert.is_true(res.chunked)
            assert.is_nil(res.headers["content-length"])
            assert.equal(200000, #res.body)
            assert.equal(pattern(200000), res.body)
        end)

        it("frames the JSON echo in chunks too", function()
            local res = get("/echoed?chunked=1")
            assert.is_true(res.chunked)
            assert.equal("/echoed", cjson.decode(res.body).path)
        end)

        it("with bytes=0 sends just the last chunk and keeps the connection", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ path = "/?bytes=0&chunked=1" }))
            local res = assert(c:read_response())
            assert.is_true(res.chunked)
            assert.equal("", res.body)
            assert(c:request({ path = "/again" }))
            assert.equal(200, assert(c:read_response()).status)
        end)
    end)

    describe("close=1", function()
        it("sends a close-delimited body, then closes", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ path = "/?bytes=100000&close=1" }))
            local res = assert(c:read_response())
            assert.is_true(res.close_delimited)
            assert.is_nil(res.headers["content-length"])
            assert.is_nil(res.headers["transfer-encoding"])
            assert.equal(100000, #res.body)
            assert.equal(pattern(100000), res.body)
            assert.is_true(c:closed(1))
        end)
    end)

    describe("drip_ms=", function()
        it("sends the body in pieces over time", function()
            -- 4 pieces of 1024 bytes (the default chunk=), 150 ms apart
            local times, got = {}, 0
            local t0 = gettime()
            local res = assert(client.request(mock.port, {
                path = "/?bytes=4096&drip_ms=150",
                sink = function(piece)
                    got = got + #piece
                    times[#times + 1] = { gettime() - t0, got }
                end,
            }))
            assert.equal(200, res.status)
            assert.equal("4096", res.headers["content-length"])
            assert.equal(4096, got)
            local first, last = times[1], times[#times]
            -- the first piece came long before the whole body
            assert.is_true(first[2] < 4096, "the body came in one piece")
            assert.is_true(first[1] < 0.2, "first piece after " .. first[1] .. " s")
            assert.is_true(last[1] >= 0.4, "whole body after " .. last[1] .. " s")
        end)

        it("takes chunk= as the piece size", function()
            local t0 = gettime()
            local res = get("/?bytes=300&drip_ms=50&chunk=100&chunked=1")
            local took = gettime() - t0
            assert.equal(pattern(300), res.body)
            assert.is_true(took >= 0.09, "took " .. took .. " s")
        end)
    end)

    describe("chunk=", function()
        it("larger than the mock's pattern buffer still sends only the pattern", function()
            -- once read past its 64 KiB buffer and sent process memory
            local res = get("/?bytes=200000&drip_ms=1&chunk=150000")
            assert.equal(200000, #res.body)
            assert.equal(pattern(200000), res.body)
        end)

        it("of 0 or garbage still ends the body", function()
            local res = assert(client.request(mock.port,
                { path = "/?bytes=5&drip_ms=1&chunk=0", timeout = 2 }))
            assert.equal(pattern(5), res.body)
            res = assert(client.request(mock.port,
                { path = "/?bytes=5&drip_ms=1&chunk=x", timeout = 2 }))
            assert.equal(pattern(5), res.body)
        end)
    end)

    describe("header=", function()
        it("adds a response header, repeatable", function()
            local res = get("/?header=X-One:1&header=X-Two:%20two&header=Set-Cookie:a=1"
                .. "&header=Set-Cookie:b=2")
            assert.equal("1", res.headers["x-one"])
            assert.equal("two", res.headers["x-two"])
            assert.matches("\r\nX%-Two: two\r\n", "\r\n" .. res.raw_head .. "\r\n")
            assert.same({ "a=1", "b=2" }, res.headers["set-cookie"])
        end)
    end)

    describe("interim=103", function()
        it("sends a 103 with a Link header before the final response", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ path = "/?interim=103&bytes=10" }))
            local early = assert(c:read_response())
            assert.equal(103, early.status)
            assert.matches("rel=preload", early.headers["link"])
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            assert.equal(pattern(10), res.body)
        end)
    end)

    describe("HEAD", function()
        it("sends the head of the GET answer and no body", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ method = "HEAD", path = "/?bytes=1234" }))
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            assert.equal("1234", res.headers["content-length"])
            assert.equal("", res.body)
            -- no body bytes follow: the next answer on the connection is clean
            assert(c:request({ path = "/next?bytes=3" }))
            res = assert(c:read_response())
            assert.equal(pattern(3), res.body)
        end)

        it("answers a huge bodiless answer at once (HEAD, 204) instead of spinning", function()
            local c = assert(client.connect(mock.port))
            local t0 = socket.gettime()
            assert(c:request({ method = "HEAD", path = "/?bytes=100000000000000" }))
            local res = assert(c:read_response({ timeout = 2 }))
            assert.equal(200, res.status)
            assert(c:request({ path = "/?status=204&bytes=100000000000000" }))
            res = assert(c:read_response({ timeout = 2 }))
            assert.equal(204, res.status)
            -- the worker is free for the next request right away
            assert(c:request({ path = "/next?bytes=3" }))
            res = assert(c:read_response({ timeout = 2 }))
            assert.equal(pattern(3), res.body)
            assert.is_true(socket.gettime() - t0 < 2)
        end)

        it("echoes HEAD as the method", function()
            local c = assert(client.connect(mock.port))
            assert(c:request({ method = "HEAD", path = "/h" }))
            local res = assert(c:read_response())
            assert.equal(200, res.status)
            assert.is_truthy(tonumber(res.headers["content-length"]))
            assert(c:request({ path = "/h2" }))
            assert.equal("/h2", cjson.decode(assert(c:read_response()).body).path)
        end)
    end)
end)
