-- A stand-in for bin/moongate, for the specs of gateway.lua only: it reads
-- the same files and speaks the same CLI, so the helper is proven before the
-- real binary exists. Run it as `luajit spec/helpers/fake_moongate.lua ARGS`
-- from the repository root (helpers_gateway_spec wraps it in a script).
--
--   start -c CONF   writes pid_file, starts conf.workers "workers"
--                   (`sleep 300`) and one control process (a `luajit` whose
--                   command line says "control"), then answers every HTTP
--                   request on listen[1] with the bytes of routes.json.
--                   Env FAKE_MOONGATE_FAIL=1: prints an error, exits 1.
--                   Env FAKE_MOONGATE_NOLISTEN=1: runs but never listens.
--   stop -c CONF    SIGTERMs the children, then the master; with
--                   "fake_orphans": true in CONF, the master only.
--   reload -c CONF  prints "reload signalled <pid>"; exit 1 when not running.
--   mock --listen 127.0.0.1:PORT   answers "mock <path>" to every request.
package.path = "./spec/?.lua;" .. package.path

local cjson = require("cjson")
local ffi = require("ffi")
local socket = require("socket")

local arg = arg
local assert = assert
local getenv = os.getenv
local io_open = io.open
local io_popen = io.popen
local ipairs = ipairs
local os_execute = os.execute
local os_exit = os.exit
local print = print
local tonumber = tonumber

pcall(ffi.cdef, "int getpid(void);")

local function read(path)
    local f = io_open(path, "rb")
    if not f then
        return nil
    end
    local s = f:read("*a")
    f:close()
    return s
end

local function write(path, data)
    local f = assert(io_open(path, "wb"))
    f:write(data)
    f:close()
end

local function opt(name)
    for i, a in ipairs(arg) do
        if a == name then
            return arg[i + 1]
        end
    end
end

-- Answers one request per connection with body_fn(path), until lifetime.
local function serve(port, body_fn)
    local server = assert(socket.bind("127.0.0.1", port))
    server:settimeout(0.2)
    local stop_at = socket.gettime() + 300
    while socket.gettime() < stop_at do
        local c = server:accept()
        if c then
            c:settimeout(2)
            local line = c:receive("*l") or ""
            repeat
                local h = c:receive("*l")
            until not h or h == ""
            local path = line:match("^%u+ (%S+)") or "?"
            local body = body_fn(path)
            c:send("HTTP/1.1 200 OK\r\nContent-Length: " .. #body
                .. "\r\nConnection: close\r\n\r\n" .. body)
            c:close()
        end
    end
end

local cmd = arg[1]
local conf_path = opt("-c")
local conf = conf_path and cjson.decode(assert(read(conf_path)))
local dir = conf_path and conf_path:match("^(.*)/[^/]*$")

if cmd == "start" then
    if getenv("FAKE_MOONGATE_FAIL") then
        io.stderr:write("fake moongate: config error at routes[0].paths\n")
        os_exit(1)
    end
    local pid = ffi.C.getpid()
    write(conf.pid_file, pid .. "\n")
    local keep, kids = {}, {}
    for i = 1, conf.workers or 1 do
        keep[i] = io_popen("exec sleep 300", "r")
    end
    keep[#keep + 1] = io_popen("exec luajit -e 'require(\"socket\").sleep(300)' control", "r")
    -- the children of this process, for `stop`
    socket.sleep(0.1)
    local p = io_popen("ls /proc", "r")
    for name in p:lines() do
        local stat = tonumber(name) and read("/proc/" .. name .. "/stat")
        if stat and tonumber(stat:match(".*%) %S (%d+)")) == pid then
            kids[#kids + 1] = name
        end
    end
    p:close()
    write(dir .. "/fake-children", table.concat(kids, " "))
    print("fake moongate started, pid " .. pid)
    io.stdout:flush()
    if getenv("FAKE_MOONGATE_NOLISTEN") then
        socket.sleep(300)
        os_exit(0)
    end
    local port = tonumber(conf.listen[1].address:match(":(%d+)$"))
    local routes_path = dir .. "/" .. conf.config_source.path
    serve(port, function()
        return read(routes_path) or ""
    end)
    os_exit(0)
elseif cmd == "stop" then
    local pid = tonumber(read(conf.pid_file) or "")
    if not pid then
        print("stop: no pid file")
        os_exit(1)
    end
    if not conf.fake_orphans then
        os_execute("kill -TERM " .. (read(dir .. "/fake-children") or "") .. " 2>/dev/null")
    end
    os_execute("kill -TERM " .. pid)
    print("stop signalled " .. pid)
    os_exit(0)
elseif cmd == "reload" then
    local pid = tonumber(read(conf.pid_file) or "")
    if not pid or os_execute("kill -0 " .. pid .. " 2>/dev/null") ~= 0 then
        print("reload: not running")
        os_exit(1)
    end
    print("reload signalled " .. pid)
    os_exit(0)
elseif cmd == "mock" then
    local port = tonumber((opt("--listen") or ""):match(":(%d+)$"))
    serve(port, function(path)
        return "mock " .. path
    end)
    os_exit(0)
end
print("usage: fake_moongate.lua start|stop|reload -c CONF | mock --listen ADDR")
os_exit(2)
