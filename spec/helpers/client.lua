-- An HTTP/1.1 client on luasocket for specs: well-formed requests, raw
-- (deliberately malformed) bytes, and streamed bodies of any size.
--
-- Every read waits at most `timeout` seconds (default 5) for the next bytes,
-- and a whole response at most `total_timeout` (default 60): a spec never
-- hangs on a silent server. Errors come back as nil, "closed" (the peer
-- closed first), nil, "timeout", or nil, "<what was malformed>".
--
-- Sending never deadlocks against a server that answers while the body is
-- still going up (an echo, an early 413): while the socket is not writable,
-- whatever arrives is read into the connection's buffer for read_response.
local socket = require("socket")
local sha256 = require("helpers.sha256")

local concat = table.concat
local error = error
local floor = math.floor
local format = string.format
local gettime = socket.gettime
local ipairs = ipairs
local max = math.max
local insert = table.insert
local min = math.min
local next = next
local pairs = pairs
local rawget = rawget
local remove = table.remove
local rawset = rawset
local select_sockets = socket.select
local setmetatable = setmetatable
local sort = table.sort
local tonumber = tonumber
local tostring = tostring
local type = type

local DEFAULT_TIMEOUT = 5
local DEFAULT_TOTAL_TIMEOUT = 60
local READ_SIZE = 65536
local MAX_HEAD_BYTES = 1024 * 1024 -- a response head past this is an error

local _M = {}

---------------------------------------------------------------------------
-- Header tables: lowercase keys, case-insensitive lookup.
---------------------------------------------------------------------------

local headers_mt = {
    __index = function(t, k)
        if type(k) == "string" then
            return rawget(t, k:lower())
        end
    end,
    __newindex = function(t, k, v)
        rawset(t, type(k) == "string" and k:lower() or k, v)
    end,
}

-- A table with case-insensitive lookup built from a list of {name, value}.
-- Repeated names are joined with ", ", except Set-Cookie: a list.
local function headers_table(list)
    local t = setmetatable({}, headers_mt)
    for _, pair in ipairs(list) do
        local key = pair[1]:lower()
        local old = rawget(t, key)
        if key == "set-cookie" then
            if old then
                old[#old + 1] = pair[2]
            else
                rawset(t, key, { pair[2] })
            end
        elseif old then
            rawset(t, key, old .. ", " .. pair[2])
        else
            rawset(t, key, pair[2])
        end
    end
    return t
end
_M.headers_table = headers_table

---------------------------------------------------------------------------
-- The deterministic body pattern: 16-byte records "%015x\n" of the record
-- index, so any dropped, repeated or reordered byte range changes the bytes.
---------------------------------------------------------------------------

-- n bytes of the pattern starting at byte offset `offset` (0-based).
local function pattern(offset, n)
    if n <= 0 then
        return ""
    end
    local first = floor(offset / 16)
    local last = floor((offset + n - 1) / 16)
    local recs = {}
    for r = first, last do
        recs[#recs + 1] = format("%015x\n", r)
    end
    local s = concat(recs)
    local skip = offset - first * 16
    return s:sub(skip + 1, skip + n)
end
_M.pattern = pattern

-- sha256 of the first `total` bytes of the pattern (what a default
-- request_stream of `total` bytes sends), hashed piece by piece.
function _M.pattern_sha256(total)
    local h = sha256.new()
    local off = 0
    while off < total do
        local n = min(READ_SIZE, total - off)
        h:update(pattern(off, n))
        off = off + n
    end
    return h:hex()
end

_M.sha256_hex = sha256.hex
_M.sha256 = sha256.new

---------------------------------------------------------------------------
-- The connection: a socket plus a buffer (buf, pos) of unread bytes.
---------------------------------------------------------------------------

local conn = {}
conn.__index = conn

-- Every connection opened and not closed yet (weak: garbage ones go).
local open_conns = setmetatable({}, { __mode = "k" })

-- Connects to host:port (host default 127.0.0.1). Returns conn or nil, err.
function _M.connect(port, host, timeout)
    host = host or "127.0.0.1"
    timeout = timeout or DEFAULT_TIMEOUT
    local sock = socket.tcp()
    sock:settimeout(timeout)
    local ok, err = sock:connect(host, port)
    if not ok then
        sock:close()
        return nil, "connect " .. host .. ":" .. tostring(port) .. ": " .. tostring(err)
    end
    sock:setoption("tcp-nodelay", true)
    sock:settimeout(0)
    local c = setmetatable({
        sock = sock, host = host, port = port, timeout = timeout,
        buf = "", pos = 1,
        queued = nil,   -- pieces read while sending, not yet in buf
        bytes_read_while_sending = 0, -- a statistic, for specs of the client
        sent_methods = {},
        eof = false,    -- the peer closed (or reset) its side
        close_reason = nil,
        is_closed = false,
    }, conn)
    open_conns[c] = true
    return c
end

-- Default wait for reads and sends on this connection, in seconds.
function conn:settimeout(s)
    self.timeout = s
end

local function is_closed_error(err)
    return err == "closed" or err == "connection reset by peer"
        or err == "broken pipe" or err == "Connection reset by peer"
        or err == "Broken pipe"
end

-- One read from the socket, waiting at most `wait` seconds for bytes.
-- Returns a non-empty string, or nil, "closed" | "timeout".
local function sock_read(self, wait)
    if self.eof then
        return nil, "closed"
    end
    if self.is_closed then
        error("read on a connection closed by the spec", 3)
    end
    local deadline = gettime() + wait
    local sock = self.sock
    while true do
        local data, err, partial = sock:receive(READ_SIZE)
        local got = data or partial
        if err and err ~= "timeout" then
            self.eof = true
            self.close_reason = err
        end
        if got and #got > 0 then
            return got
        end
        if self.eof then
            return nil, "closed"
        end
        local remaining = deadline - gettime()
        if remaining <= 0 then
            return nil, "timeout"
        end
        select_sockets({ sock }, nil, min(remaining, 1))
    end
end

-- Moves pieces read during a send into buf.
local function unqueue(self)
    local q = self.queued
    if q then
        self.queued = nil
        local rest = self.buf:sub(self.pos)
        self.buf = rest .. concat(q)
        self.pos = 1
    end
end

-- Appends more bytes to buf; true, or nil, err.
local function more(self, wait)
    if self.queued then
        unqueue(self)
        return true
    end
    local data, err = sock_read(self, wait)
    if not data then
        return nil, err
    end
    if self.pos > #self.buf then
        self.buf = data
    else
        self.buf = self.buf:sub(self.pos) .. data
    end
    self.pos = 1
    return true
end

-- The next unread piece of any size (the buffered bytes first).
local function next_piece(self, wait)
    unqueue(self)
    if self.pos > #self.buf then
        local data, err = sock_read(self, wait)
        return data, err
    end
    local piece = self.pos == 1 and self.buf or self.buf:sub(self.pos)
    self.buf, self.pos = "", 1
    return piece
end

-- Puts bytes back in front of the unread ones (they came from next_piece,
-- so buf is empty here).
local function unread(self, piece, from)
    self.buf, self.pos = piece, from
end

-- Writes all of data. Returns true, or nil, "closed" | "timeout" | err.
local function send_all(self, data)
    if self.is_closed then
        error("send on a connection closed by the spec", 3)
    end
    local sock = self.sock
    local i, n = 1, #data
    local deadline = gettime() + self.timeout
    while i <= n do
        local last, err, partial = sock:send(data, i)
        if last then
            return true
        end
        if err ~= "timeout" then
            if is_closed_error(err) then
                return nil, "closed"
            end
            return nil, err
        end
        if partial >= i then
            deadline = gettime() + self.timeout -- progress: restart the clock
        end
        i = partial + 1
        local remaining = deadline - gettime()
        if remaining <= 0 then
            return nil, "timeout"
        end
        local readable = select_sockets(self.eof and {} or { sock }, { sock },
            min(remaining, 1))
        if not self.eof and readable and readable[1] then
            local got, rerr, part = sock:receive(READ_SIZE)
            got = got or part
            if got and #got > 0 then
                self.bytes_read_while_sending = self.bytes_read_while_sending + #got
                local q = self.queued or {}
                q[#q + 1] = got
                self.queued = q
            end
            if rerr and rerr ~= "timeout" then
                self.eof = true
                self.close_reason = rerr
            end
        end
    end
    return true
end

-- Sends raw bytes as they are. Returns true, or nil, err.
function conn:send(raw)
    return send_all(self, raw)
end

-- Header list from {{"Name", "value"}, ...} or {Name = "value" | {"v1", "v2"}}.
local function header_list(headers)
    local list = {}
    if not headers then
        return list
    end
    if #headers > 0 or next(headers) == nil then
        for _, pair in ipairs(headers) do
            list[#list + 1] = { pair[1], tostring(pair[2]) }
        end
        return list
    end
    local names = {}
    for name in pairs(headers) do
        names[#names + 1] = name
    end
    sort(names)
    for _, name in ipairs(names) do
        local v = headers[name]
        if type(v) == "table" then
            for _, one in ipairs(v) do
                list[#list + 1] = { name, tostring(one) }
            end
        else
            list[#list + 1] = { name, tostring(v) }
        end
    end
    return list
end

local function has_header(list, lname)
    for _, pair in ipairs(list) do
        if pair[1]:lower() == lname then
            return true
        end
    end
    return false
end

-- The request head (request line, headers, blank line).
-- Adds Host (unless given, or opts.host == false) and the framing header
-- `framing` ({"Content-Length", n} or {"Transfer-Encoding", "chunked"})
-- unless the caller gave Content-Length or Transfer-Encoding.
local function request_head(self, opts, framing)
    local list = header_list(opts.headers)
    if opts.host ~= false and not has_header(list, "host") then
        local host = opts.host or (self.host .. ":" .. tostring(self.port))
        insert(list, 1, { "Host", host })
    end
    if framing and not has_header(list, "content-length")
        and not has_header(list, "transfer-encoding") then
        list[#list + 1] = framing
    end
    local lines = {
        (opts.method or "GET") .. " " .. (opts.path or "/") .. " "
            .. (opts.version or "HTTP/1.1"),
    }
    for _, pair in ipairs(list) do
        lines[#lines + 1] = pair[1] .. ": " .. pair[2]
    end
    lines[#lines + 1] = ""
    lines[#lines + 1] = ""
    return concat(lines, "\r\n")
end

-- Methods of the requests written by request/request_stream and not yet
-- answered, oldest first: read_response knows a HEAD's response has no body.
local function push_method(self, method)
    local q = self.sent_methods
    q[#q + 1] = (method or "GET"):upper()
end

local function chunk(data)
    return format("%x\r\n", #data) .. data .. "\r\n"
end

local function last_chunk(trailers)
    local parts = { "0\r\n" }
    for _, pair in ipairs(header_list(trailers)) do
        parts[#parts + 1] = pair[1] .. ": " .. pair[2] .. "\r\n"
    end
    parts[#parts + 1] = "\r\n"
    return concat(parts)
end

-- Writes one well-formed request.
--   method (default "GET"), path (default "/"), version (default "HTTP/1.1"),
--   headers = {{"Name", "value"}, ...} or {Name = "value"},
--   host = "Host header value" (default "<host>:<port>"; false: no Host),
--   body = string or nil,
--   chunked = true (body sent as one chunk) or a list of chunk strings
--             (empty strings are skipped: the last chunk ends the body),
--   trailers = headers sent after the last chunk.
-- Content-Length (or Transfer-Encoding: chunked) is added unless the caller
-- gave either header. Returns true, or nil, err.
function conn:request(opts)
    opts = opts or {}
    local body = opts.body
    if body ~= nil and type(body) ~= "string" then
        error("request: body must be a string", 2)
    end
    local chunked = opts.chunked
    if chunked then
        local chunks = type(chunked) == "table" and chunked or { body }
        local parts = {}
        for _, c in ipairs(chunks) do
            if #c > 0 then
                parts[#parts + 1] = chunk(c)
            end
        end
        parts[#parts + 1] = last_chunk(opts.trailers)
        local head = request_head(self, opts, { "Transfer-Encoding", "chunked" })
        push_method(self, opts.method)
        return send_all(self, head .. concat(parts))
    end
    local framing = body and { "Content-Length", tostring(#body) } or nil
    push_method(self, opts.method)
    return send_all(self, request_head(self, opts, framing) .. (body or ""))
end

-- Writes a request whose body is produced piece by piece, never whole.
--   method (default "POST"), path, headers, host, version: as in request;
--   length = N: sends Content-Length: N (unless a header says otherwise);
--   chunked = true: each piece becomes one chunk, then the last chunk
--             (no_last_chunk = true leaves the body unterminated);
--   total = bytes to send with the default producer (default: length);
--   chunk_size = piece size of the default producer (default 65536);
--   producer = function(i) -> the i-th piece (i from 1), nil when done.
--     Default: client.pattern, `total` bytes in chunk_size pieces.
-- Returns true, bytes_sent; or nil, err, bytes_sent.
function conn:request_stream(opts)
    local length, chunked = opts.length, opts.chunked
    if not length and not chunked then
        error("request_stream: give length = N or chunked = true", 2)
    end
    local total = opts.total or length
    local producer = opts.producer
    if not producer then
        if not total then
            error("request_stream: give total = N (or a producer)", 2)
        end
        local size = opts.chunk_size or READ_SIZE
        producer = function(i)
            local off = (i - 1) * size
            if off >= total then
                return nil
            end
            return pattern(off, min(size, total - off))
        end
    end
    local head_opts = {
        method = opts.method or "POST", path = opts.path, headers = opts.headers,
        host = opts.host, version = opts.version,
    }
    local framing = chunked and { "Transfer-Encoding", "chunked" }
        or { "Content-Length", tostring(length) }
    push_method(self, head_opts.method)
    local ok, err = send_all(self, request_head(self, head_opts, framing))
    if not ok then
        return nil, err, 0
    end
    local sent, i = 0, 1
    while true do
        local piece = producer(i)
        if piece == nil then
            break
        end
        if #piece > 0 then
            ok, err = send_all(self, chunked and chunk(piece) or piece)
            if not ok then
                return nil, err, sent
            end
            sent = sent + #piece
        end
        i = i + 1
    end
    if chunked and not opts.no_last_chunk then
        ok, err = send_all(self, last_chunk(opts.trailers))
        if not ok then
            return nil, err, sent
        end
    end
    return true, sent
end

---------------------------------------------------------------------------
-- Reading responses.
---------------------------------------------------------------------------

-- Parses header lines into list; returns list, or nil, err.
local function parse_header_lines(lines, first, list)
    for i = first, #lines do
        local line = lines[i]
        if line:match("^[ \t]") and #list > 0 then
            -- obsolete line folding: continue the previous value
            local prev = list[#list]
            prev[2] = prev[2] .. " " .. line:match("^%s*(.-)%s*$")
        else
            local name, value = line:match("^([^:%s]+):[ \t]*(.-)[ \t]*$")
            if not name then
                return nil, "malformed header line: " .. line
            end
            list[#list + 1] = { name, value }
        end
    end
    return list
end

local function split_lines(s)
    local lines = {}
    for line in (s .. "\n"):gmatch("(.-)\r?\n") do
        lines[#lines + 1] = line
    end
    return lines
end

-- Reads one line (CRLF or LF ended) from the buffer, without the ending.
local function read_line(self, wait_fn)
    while true do
        local i = self.buf:find("\n", self.pos, true)
        if i then
            local line = self.buf:sub(self.pos, i - 1)
            self.pos = i + 1
            if line:sub(-1) == "\r" then
                line = line:sub(1, -2)
            end
            return line
        end
        if #self.buf - self.pos > MAX_HEAD_BYTES then
            return nil, "line too long"
        end
        local ok, err = more(self, wait_fn())
        if not ok then
            return nil, err
        end
    end
end

-- Reads exactly n bytes, handing each piece to emit.
local function read_exact(self, n, emit, wait_fn)
    while n > 0 do
        local piece, err = next_piece(self, wait_fn())
        if not piece then
            return nil, err
        end
        if #piece > n then
            unread(self, piece, n + 1)
            piece = piece:sub(1, n)
        end
        emit(piece)
        n = n - #piece
    end
    return true
end

local function read_chunked(self, res, emit, wait_fn)
    while true do
        local line, err = read_line(self, wait_fn)
        if not line then
            return nil, err
        end
        local hex = line:match("^[ \t]*(%x+)")
        if not hex then
            return nil, "malformed chunk size line: " .. line
        end
        local size = tonumber(hex, 16)
        if size == 0 then
            break
        end
        local ok
        ok, err = read_exact(self, size, emit, wait_fn)
        if not ok then
            return nil, err
        end
        line, err = read_line(self, wait_fn)
        if not line then
            return nil, err
        end
        if line ~= "" then
            return nil, "chunk data not followed by CRLF"
        end
    end
    local trailers = {}
    while true do
        local line, err = read_line(self, wait_fn)
        if not line then
            return nil, err
        end
        if line == "" then
            break
        end
        local ok, perr = parse_header_lines({ line }, 1, trailers)
        if not ok then
            return nil, perr
        end
    end
    res.trailer_list = trailers
    res.trailers = headers_table(trailers)
    return true
end

local function read_until_close(self, emit, wait_fn)
    while true do
        local piece, err = next_piece(self, wait_fn())
        if not piece then
            if err == "closed" then
                return true
            end
            return nil, err
        end
        emit(piece)
    end
end

-- Reads one response (an interim 1xx is a response of its own).
--   head = true: the request was HEAD, so no body follows (default: true
--          when the oldest unanswered request written by conn:request or
--          conn:request_stream was a HEAD; raw conn:send bytes are not
--          tracked, so pass head = true after sending a raw HEAD);
--   timeout = seconds to wait for each read (default: the conn's, 5);
--   total_timeout = seconds for the whole response (default 60);
--   sink = function(piece): body pieces go there instead of res.body.
-- Returns res: status (number), reason, version ("HTTP/1.1"), headers
-- (case-insensitive; repeats joined with ", "; set-cookie a list),
-- header_list ({name, value} as received), raw_head, body (string; nil with
-- a sink), body_length, chunked (bool), close_delimited (bool), trailers and
-- trailer_list (chunked only).
-- Or nil, err[, partial res]: err "closed", "timeout" or what was malformed.
function conn:read_response(opts)
    opts = opts or {}
    local idle = opts.timeout or self.timeout
    local total_deadline = gettime() + (opts.total_timeout or max(DEFAULT_TOTAL_TIMEOUT, idle))
    local function wait_fn()
        return max(0, min(idle, total_deadline - gettime()))
    end

    -- the head
    local s, e
    while true do
        unqueue(self)
        s, e = self.buf:find("\r?\n\r?\n", self.pos)
        if s then
            break
        end
        if #self.buf - self.pos > MAX_HEAD_BYTES then
            return nil, "response head over " .. MAX_HEAD_BYTES .. " bytes"
        end
        local ok, err = more(self, wait_fn())
        if not ok then
            return nil, err
        end
    end
    local raw_head = self.buf:sub(self.pos, s - 1)
    self.pos = e + 1
    local lines = split_lines(raw_head)
    local version, status, reason = lines[1]:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
    if not version then
        return nil, "malformed status line: " .. lines[1]
    end
    local list, err = parse_header_lines(lines, 2, {})
    if not list then
        return nil, err
    end
    local res = {
        status = tonumber(status), reason = reason, version = version,
        header_list = list, headers = headers_table(list), raw_head = raw_head,
        chunked = false, close_delimited = false, body_length = 0,
    }

    -- the body
    local sink = opts.sink
    local pieces = {}
    local function emit(piece)
        res.body_length = res.body_length + #piece
        if sink then
            sink(piece)
        else
            pieces[#pieces + 1] = piece
        end
    end
    local code = res.status
    local head = opts.head
    if code >= 200 then
        -- a final response answers the oldest request written by request()
        local method = remove(self.sent_methods, 1)
        if head == nil then
            head = method == "HEAD"
        end
    end
    local te = res.headers["transfer-encoding"]
    local cl = res.headers["content-length"]
    local ok
    if head or code < 200 or code == 204 or code == 304 then
        ok = true
    elseif te and te:lower():match("chunked%s*$") then
        res.chunked = true
        ok, err = read_chunked(self, res, emit, wait_fn)
    elseif te then
        res.close_delimited = true
        ok, err = read_until_close(self, emit, wait_fn)
    elseif cl then
        if not cl:match("^%d+$") then
            return nil, "bad content-length: " .. cl
        end
        ok, err = read_exact(self, tonumber(cl), emit, wait_fn)
    else
        res.close_delimited = true
        ok, err = read_until_close(self, emit, wait_fn)
    end
    if not sink then
        res.body = concat(pieces)
    end
    if not ok then
        return nil, err, res
    end
    return res
end

-- Reads whatever arrives until the peer closes or `timeout` seconds
-- (default: the conn's) pass. Returns the bytes (maybe ""), and
-- "closed" or "timeout".
function conn:read_raw(timeout)
    local deadline = gettime() + (timeout or self.timeout)
    local pieces = {}
    while true do
        local piece, err = next_piece(self, max(0, deadline - gettime()))
        if not piece then
            return concat(pieces), err
        end
        pieces[#pieces + 1] = piece
    end
end

-- True when the peer has closed the connection (now or within `timeout`
-- seconds, default: the conn's). Bytes that arrive meanwhile stay buffered
-- for read_response/read_raw.
function conn:closed(timeout)
    local deadline = gettime() + (timeout or self.timeout)
    while true do
        unqueue(self)
        if self.eof then
            return true
        end
        local ok, err = more(self, max(0, deadline - gettime()))
        if not ok then
            return err == "closed"
        end
    end
end

-- Closes our side. Safe to call twice.
function conn:close()
    if not self.is_closed then
        self.is_closed = true
        open_conns[self] = nil
        self.sock:close()
    end
end

-- Closes every connection still open (for after_each: busted keeps only
-- the LAST function given to finally() in a test).
function _M.close_all()
    local list = {}
    for c in pairs(open_conns) do
        list[#list + 1] = c
    end
    for _, c in ipairs(list) do
        c:close()
    end
    return #list
end

---------------------------------------------------------------------------
-- One-shot helpers: a new connection per request, closed after.
---------------------------------------------------------------------------

-- opts: the fields of conn:request, plus addr (default "127.0.0.1"),
-- timeout, and sink (passed to read_response). HEAD requests read no body.
-- Returns res, or nil, err.
function _M.request(port, opts)
    opts = opts or {}
    local c, err = _M.connect(port, opts.addr, opts.timeout)
    if not c then
        return nil, err
    end
    local ok
    ok, err = c:request(opts)
    if not ok then
        c:close()
        return nil, "send: " .. tostring(err)
    end
    local res, rerr = c:read_response({
        head = (opts.method or "GET"):upper() == "HEAD",
        timeout = opts.timeout, sink = opts.sink,
    })
    c:close()
    return res, rerr
end

function _M.get(port, path, headers, opts)
    opts = opts or {}
    return _M.request(port, {
        method = "GET", path = path, headers = headers,
        addr = opts.addr, timeout = opts.timeout, host = opts.host,
    })
end

return _M
