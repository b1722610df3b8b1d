-- A scripted HTTP/1.1 server for the specs of the helpers themselves: it
-- answers each path with one exact byte sequence (chunked, close-delimited,
-- interim 1xx, malformed, slow, ...) so client.lua is proven before the
-- gateway exists. Its parser is written apart from client.lua on purpose.
--
-- Run as a program from the repository root:
--   luajit spec/helpers/script_server.lua PORT [LIFETIME_S] [small]
-- It serves many connections at once (one coroutine each) and exits by
-- itself after LIFETIME_S seconds (default 300), so it can never outlive a
-- spec run for long. With "small", its sockets get 64 KiB kernel buffers, so
-- a client that does not read while it sends would deadlock within ~300 KiB.
package.path = "./spec/?.lua;" .. package.path

local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local sha256 = require("helpers.sha256")

local arg = arg
local assert = assert
local co_create = coroutine.create
local co_resume = coroutine.resume
local co_status = coroutine.status
local co_yield = coroutine.yield
local concat = table.concat
local format = string.format
local gettime = socket.gettime
local io_stderr = io.stderr
local ipairs = ipairs
local max = math.max
local min = math.min
local os_exit = os.exit
local pairs = pairs
local tonumber = tonumber
local tostring = tostring

local port = assert(tonumber(arg[1]), "usage: script_server.lua PORT [LIFETIME_S]")
local lifetime = tonumber(arg[2]) or 300
local small_buffers = arg[3] == "small"

---------------------------------------------------------------------------
-- Non-blocking I/O inside coroutines: yield ("r" | "w", sock) or
-- ("sleep", wake_time) and the loop below resumes when ready.
---------------------------------------------------------------------------

local function fill(c)
    while true do
        local data, err, partial = c.sock:receive(65536)
        local got = data or partial
        if got and #got > 0 then
            c.buf = c.buf .. got
            return true
        end
        if err ~= "timeout" then
            return nil, err
        end
        co_yield("r", c.sock)
    end
end

local function send(c, data)
    local i = 1
    while i <= #data do
        local last, err, partial = c.sock:send(data, i)
        if last then
            return true
        end
        if err ~= "timeout" then
            return nil, err
        end
        i = partial + 1
        co_yield("w", c.sock)
    end
    return true
end

local function sleep(s)
    co_yield("sleep", gettime() + s)
end

-- A CRLF-ended line (without the CRLF); raw(bytes) sees the wire bytes.
local function line(c, raw)
    while true do
        local i = c.buf:find("\r\n", 1, true)
        if i then
            local l = c.buf:sub(1, i - 1)
            c.buf = c.buf:sub(i + 2)
            raw(l .. "\r\n")
            return l
        end
        if #c.buf > 65536 then
            return nil, "line too long"
        end
        local ok, err = fill(c)
        if not ok then
            return nil, err
        end
    end
end

local function exact(c, n, emit, raw)
    while n > 0 do
        if #c.buf == 0 then
            local ok, err = fill(c)
            if not ok then
                return nil, err
            end
        end
        local piece = c.buf:sub(1, n)
        c.buf = c.buf:sub(#piece + 1)
        raw(piece)
        emit(piece)
        n = n - #piece
    end
    return true
end

local function nop() end

-- The request head: {method, path, query, version, headers (lowercase
-- names; repeats joined by ","), raw}, or nil, err.
local function read_head(c, raw)
    local l, err = line(c, raw)
    if not l then
        return nil, err
    end
    local method, target, version = l:match("^(%u+) (%S+) (HTTP/1%.[01])$")
    if not method then
        return nil, "bad request line"
    end
    local req = { method = method, version = version, headers = {} }
    req.path, req.query = target:match("^([^?]*)%??(.*)$")
    while true do
        l, err = line(c, raw)
        if not l then
            return nil, err
        end
        if l == "" then
            break
        end
        local name, value = l:match("^([^:]+):%s*(.-)%s*$")
        if not name then
            return nil, "bad header line"
        end
        name = name:lower()
        req.headers[name] = req.headers[name] and (req.headers[name] .. "," .. value) or value
    end
    return req
end

-- Reads the request body, handing decoded pieces to emit.
local function read_body(c, req, emit, raw)
    local te = req.headers["transfer-encoding"]
    if te and te:lower() == "chunked" then
        while true do
            local l, err = line(c, raw)
            if not l then
                return nil, err
            end
            local size = tonumber(l:match("^(%x+)"), 16)
            if not size then
                return nil, "bad chunk size"
            end
            if size == 0 then
                break
            end
            local ok, e = exact(c, size, emit, raw)
            if not ok then
                return nil, e
            end
            l, err = line(c, raw)
            if l ~= "" then
                return nil, err or "bad chunk end"
            end
        end
        repeat -- trailers
            local l, err = line(c, raw)
            if not l then
                return nil, err
            end
        until l == ""
        return true
    end
    local cl = tonumber(req.headers["content-length"] or "0")
    return exact(c, cl, emit, raw)
end

local function response(status, headers, body)
    local out = { "HTTP/1.1 " .. status .. "\r\n" }
    for _, h in ipairs(headers) do
        out[#out + 1] = h .. "\r\n"
    end
    if body then
        out[#out + 1] = "Content-Length: " .. #body .. "\r\n"
    end
    out[#out + 1] = "\r\n"
    out[#out + 1] = body or ""
    return concat(out)
end

local function query_n(req)
    return tonumber(req.query:match("n=(%d+)")) or 0
end

---------------------------------------------------------------------------
-- Handlers: return "close" to close the connection after them.
---------------------------------------------------------------------------

local handlers = {}

handlers["/raw"] = function(c, req, raw_head)
    local raw = { raw_head }
    local ok, err = read_body(c, req, nop, function(b) raw[#raw + 1] = b end)
    if not ok then
        return "close", err
    end
    send(c, response("200 OK", { "Content-Type: application/octet-stream" }, concat(raw)))
end

handlers["/chunked"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "5\r\nhello\r\n" .. "6;ext=1\r\n world\r\n" .. "0\r\nX-Trailer: yes\r\n\r\n")
end

handlers["/close"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        .. "close-delimited body")
    return "close"
end

handlers["/continue"] = function(c, req)
    send(c, "HTTP/1.1 100 Continue\r\n\r\n")
    local body = {}
    read_body(c, req, function(b) body[#body + 1] = b end, nop)
    send(c, response("200 OK", {}, "got:" .. concat(body)))
end

handlers["/headers"] = function(c)
    send(c, "HTTP/1.1 200 Fine Thanks\r\nSet-Cookie: a=1; Path=/\r\nX-Multi: one\r\n"
        .. "CONTENT-TYPE: text/plain\r\nSet-Cookie: b=2\r\nX-Multi: two\r\n"
        .. "X-Spaces:   padded  \r\nContent-Length: 2\r\n\r\nok")
end

handlers["/big"] = function(c, req)
    local n = query_n(req)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: " .. n .. "\r\n\r\n")
    local off = 0
    while off < n do
        local size = min(65536, n - off)
        if not send(c, client.pattern(off, size)) then
            return "close"
        end
        off = off + size
    end
end

-- Chunk sizes cycle through `sizes` so chunk boundaries fall everywhere.
local function send_chunked_pattern(c, n, sizes)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    local off, i = 0, 0
    local parts = {}
    while off < n do
        i = i + 1
        local size = min(sizes[(i - 1) % #sizes + 1], n - off)
        parts[#parts + 1] = format("%x\r\n", size) .. client.pattern(off, size) .. "\r\n"
        off = off + size
        if #parts >= 64 then
            if not send(c, concat(parts)) then
                return "close"
            end
            parts = {}
        end
    end
    parts[#parts + 1] = "0\r\n\r\n"
    send(c, concat(parts))
end

handlers["/bigchunked"] = function(c, req)
    return send_chunked_pattern(c, query_n(req), { 1000, 70000, 65536, 4093, 1 })
end

handlers["/tinychunks"] = function(c, req)
    return send_chunked_pattern(c, query_n(req), { 1, 2, 3, 5, 8, 13, 17 })
end

handlers["/sha"] = function(c, req)
    local h, n = sha256.new(), 0
    local ok, err = read_body(c, req, function(b)
        h:update(b)
        n = n + #b
    end, nop)
    if not ok then
        return "close", err
    end
    send(c, response("200 OK", { "Content-Type: application/json" },
        cjson.encode({ sha256 = h:hex(), length = n })))
end

-- Echoes the body back as it arrives (chunked), without waiting for its end.
handlers["/echo"] = function(c, req)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    local ok = read_body(c, req, function(b)
        send(c, format("%x\r\n", #b) .. b .. "\r\n")
    end, nop)
    if not ok then
        return "close"
    end
    send(c, "0\r\n\r\n")
end

handlers["/slow"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    sleep(30)
    return "close"
end

handlers["/silent"] = function()
    sleep(30)
    return "close"
end

handlers["/hangup"] = function()
    return "close"
end

handlers["/partial"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    return "close"
end

handlers["/badstatus"] = function(c)
    send(c, "HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    return "close"
end

handlers["/nocontent"] = function(c)
    send(c, "HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n")
end

handlers["/notmodified"] = function(c)
    -- the Content-Length describes the representation, no body follows
    send(c, "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
end

handlers["/head"] = function(c, req)
    if req.method == "HEAD" then
        send(c, "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    else
        send(c, response("200 OK", {}, "hello world"))
    end
end

handlers["/trickle"] = function(c)
    local bytes = response("200 OK", { "X-Trickle: yes" }, "trickled body")
    for i = 1, #bytes do
        send(c, bytes:sub(i, i))
        sleep(0.002)
    end
end

handlers["/clte"] = function(c)
    -- both framings: a smuggling-shaped response
    send(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    return "close"
end

handlers["/badchunk"] = function(c)
    send(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n")
    return "close"
end

-- Which connection this is (numbered from 1 in accept order) and how many
-- requests it carried: keep-alive reuse shows as one number.
handlers["/conn"] = function(c)
    c.requests = (c.requests or 0) + 1
    send(c, response("200 OK", { "Content-Type: text/plain" }, c.id .. ":" .. c.requests))
end

local function default_handler(c, req)
    local body = {}
    read_body(c, req, function(b) body[#body + 1] = b end, nop)
    send(c, response("200 OK", { "Content-Type: text/plain" },
        req.method .. " " .. req.path .. " " .. concat(body)))
end

local nconns = 0

local function serve(sock)
    nconns = nconns + 1
    local c = { sock = sock, buf = "", id = nconns }
    while true do
        local raw = {}
        local req, err = read_head(c, function(b) raw[#raw + 1] = b end)
        if not req then
            if err == "bad request line" or err == "bad header line" then
                send(c, response("400 Bad Request", { "Connection: close" }, "bad request"))
            end
            break
        end
        local handler = handlers[req.path] or default_handler
        local after = handler(c, req, concat(raw))
        if after == "close" or (req.headers.connection or ""):lower() == "close" then
            break
        end
    end
    sock:close()
end

---------------------------------------------------------------------------
-- The loop.
---------------------------------------------------------------------------

local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0)
if small_buffers then
    -- accepted sockets inherit these from the listener
    assert(server:setoption("recv-buffer-size", 65536))
    assert(server:setoption("send-buffer-size", 65536))
end
local waiting = {} -- coroutine -> {kind, arg}

local function step(co, ...)
    local ok, kind, a = co_resume(co, ...)
    if not ok then
        io_stderr:write("handler error: ", tostring(kind), "\n")
        waiting[co] = nil
        return
    end
    if co_status(co) == "dead" then
        waiting[co] = nil
    else
        waiting[co] = { kind, a }
    end
end

local stop_at = gettime() + lifetime
while gettime() < stop_at do
    local rd, wr = { server }, {}
    local timeout = 0.05
    for _, w in pairs(waiting) do
        if w[1] == "r" then
            rd[#rd + 1] = w[2]
        elseif w[1] == "w" then
            wr[#wr + 1] = w[2]
        else
            timeout = min(timeout, max(0, w[2] - gettime()))
        end
    end
    local readable, writable = socket.select(rd, wr, timeout)
    if readable[server] then
        local s = server:accept()
        if s then
            s:settimeout(0)
            s:setoption("tcp-nodelay", true)
            step(co_create(serve), s)
        end
    end
    local now = gettime()
    local ready = {}
    for co, w in pairs(waiting) do
        if (w[1] == "r" and readable[w[2]]) or (w[1] == "w" and writable[w[2]])
            or (w[1] == "sleep" and now >= w[2]) then
            ready[#ready + 1] = co
        end
    end
    for _, co in ipairs(ready) do
        step(co)
    end
end
os_exit(0)
