-- A real redis-server for specs, on a free loopback port.
--
--   local srv = redis.start{ password = "s3cret" }   -- waits until PING answers
--   srv:command("SET", "k", "v")                     -- a raw RESP client: reply or nil, err
--   srv:pause(2000)                                  -- CLIENT PAUSE 2000 ALL: a slow server
--   srv:kill()                                       -- SIGKILL: a crash (the port is freed)
--   srv:restart()                                    -- again on the same port, empty
--   srv:stop()                                       -- or redis.stop_all() in after_each
--
-- The server keeps nothing on disk (--save '' --appendonly no) and listens
-- on 127.0.0.1 only. Its log is <dir>/redis.log.
local socket = require("socket")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local concat = table.concat
local error = error
local ipairs = ipairs
local remove = table.remove
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring

local START_TIMEOUT = 10

local _M = {}

local running = {}

---------------------------------------------------------------------------
-- A minimal RESP2 client (luasocket), one connection per call: enough for
-- setting up and inspecting the server, independent of the gateway.
---------------------------------------------------------------------------

local function encode(args)
    local parts = { "*" .. #args .. "\r\n" }
    for i = 1, #args do
        local s = tostring(args[i])
        parts[#parts + 1] = "$" .. #s .. "\r\n" .. s .. "\r\n"
    end
    return concat(parts)
end

local function read_reply(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, err
    end
    local kind, rest = line:sub(1, 1), line:sub(2)
    if kind == "+" then
        return rest
    elseif kind == "-" then
        return nil, rest
    elseif kind == ":" then
        return tonumber(rest)
    elseif kind == "$" then
        local n = tonumber(rest)
        if n < 0 then
            return false -- nil bulk
        end
        local data, rerr = sock:receive(n + 2)
        if not data then
            return nil, rerr
        end
        return data:sub(1, n)
    elseif kind == "*" then
        local n = tonumber(rest)
        if n < 0 then
            return false
        end
        local out = {}
        for i = 1, n do
            local v, verr = read_reply(sock)
            if v == nil then
                return nil, verr
            end
            out[i] = v
        end
        return out
    end
    return nil, "bad reply line: " .. line
end

-- One command on a new connection (AUTH first when the server has a
-- password, SELECT db when db is given). Returns the reply (false for a
-- nil reply), or nil, err.
local function command_db(port, password, db, timeout, ...)
    local sock = socket.tcp()
    sock:settimeout(timeout or 2)
    local ok, err = sock:connect("127.0.0.1", port)
    if not ok then
        sock:close()
        return nil, "connect: " .. tostring(err)
    end
    local pre = {}
    if password then
        pre[#pre + 1] = { "AUTH", password }
    end
    if db then
        pre[#pre + 1] = { "SELECT", db }
    end
    for _, cmd in ipairs(pre) do
        sock:send(encode(cmd))
        local _, perr = read_reply(sock)
        if perr then
            sock:close()
            return nil, cmd[1] .. ": " .. perr
        end
    end
    sock:send(encode({ ... }))
    local v, rerr = read_reply(sock)
    sock:close()
    return v, rerr
end

local function command(port, password, timeout, ...)
    return command_db(port, password, nil, timeout, ...)
end

---------------------------------------------------------------------------
-- The server.
---------------------------------------------------------------------------

local srv_mt = {}
srv_mt.__index = srv_mt

function srv_mt:command(...)
    return command(self.port, self.password, 2, ...)
end

-- The same in database db.
function srv_mt:command_db(db, ...)
    return command_db(self.port, self.password, db, 2, ...)
end

-- INFO commandstats as {command = calls}, e.g. stats.evalsha.
function srv_mt:command_calls()
    local info = assert(self:command("INFO", "commandstats"))
    local out = {}
    for name, calls in info:gmatch("cmdstat_([%w|_]+):calls=(%d+)") do
        out[name] = tonumber(calls)
    end
    return out
end

function srv_mt:log()
    return proc.read_file(self.log_path) or ""
end

local function spawn(self)
    local argv = { "redis-server", "--port", tostring(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", self.dir,
                   "--protected-mode", "no" }
    if self.password then
        argv[#argv + 1] = "--requirepass"
        argv[#argv + 1] = self.password
    end
    self.pid = proc.spawn(argv, { log = self.log_path })
    local deadline = proc.now() + START_TIMEOUT
    while true do
        local pong = command(self.port, self.password, 0.5, "PING")
        if pong == "PONG" then
            return self
        end
        if not proc.alive(self.pid) or proc.now() >= deadline then
            proc.kill(self.pid, "KILL")
            error("redis.start: redis-server on port " .. self.port .. " did not answer PING\n"
                  .. (proc.read_file(self.log_path) or ""), 3)
        end
        proc.sleep(0.02)
    end
end

-- Starts a server: opts.password (--requirepass), opts.port (default a
-- free one). Returns it once it answers PING.
function _M.start(opts)
    opts = opts or {}
    local dir = proc.tmpdir()
    local self = setmetatable({
        port = opts.port or ports.free(), password = opts.password, dir = dir,
        log_path = dir .. "/redis.log",
    }, srv_mt)
    spawn(self)
    running[#running + 1] = self
    return self
end

-- CLIENT PAUSE ms ALL: every client's commands wait (new connections are
-- accepted, but even PING gets no answer) until the pause ends.
function srv_mt:pause(ms)
    local ok, err = self:command("CLIENT", "PAUSE", ms, "ALL")
    if ok ~= "OK" then
        error("redis pause: " .. tostring(err), 2)
    end
end

-- SIGSTOP: the server neither reads nor answers (until kill or cont).
function srv_mt:freeze()
    proc.kill(self.pid, "STOP")
end

function srv_mt:cont()
    proc.kill(self.pid, "CONT")
end

-- SIGKILL, as a crash: clients see their connections closed (reset, when
-- the server had unread bytes from them: see freeze).
function srv_mt:kill()
    if self.pid and proc.alive(self.pid) then
        proc.kill(self.pid, "KILL")
        proc.wait_exit(self.pid, 5)
    end
    self.pid = nil
end

-- SIGTERM (then SIGKILL after 5 s).
function srv_mt:stop()
    for i = #running, 1, -1 do
        if running[i] == self then
            remove(running, i)
        end
    end
    if self.pid and proc.alive(self.pid) then
        proc.kill(self.pid, "TERM")
        if not proc.wait_exit(self.pid, 5) then
            proc.kill(self.pid, "KILL")
            proc.wait_exit(self.pid, 2)
        end
    end
    self.pid = nil
end

-- A new server process on the same port (and password); empty.
function srv_mt:restart()
    self:kill()
    return spawn(self)
end

-- Stops every server started and not stopped yet.
function _M.stop_all()
    while #running > 0 do
        running[#running]:stop()
    end
end

return _M
