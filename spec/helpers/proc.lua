-- Background processes, signals and temporary directories for specs.
--
-- Processes are started through `sh` with `exec`, so the pid handed back is
-- the program's own pid (not a wrapper shell's), and the program is
-- re-parented to init at once: specs never leave zombies behind in busted.
-- Before any fork the helpers mark every inherited descriptor above 2
-- close-on-exec, so a child never keeps a spec's client socket open (a
-- `conn:close()` in the spec really closes the connection).
local ffi = require("ffi")
local socket = require("socket")

local C = ffi.C
local assert = assert
local concat = table.concat
local error = error
local io_open = io.open
local io_popen = io.popen
local ipairs = ipairs
local os_execute = os.execute
local os_rename = os.rename
local pairs = pairs
local remove = table.remove
local sort = table.sort
local tonumber = tonumber
local tostring = tostring
local type = type
local gettime = socket.gettime
local sleep = socket.sleep

-- Another helper may have declared the same libc functions: a second
-- identical cdef raises "attempt to redefine", which is harmless here.
pcall(ffi.cdef, "int kill(int pid, int sig);")
pcall(ffi.cdef, "int fcntl(int fd, int cmd, ...);")

local F_GETFD = 1
local F_SETFD = 2
local FD_CLOEXEC = 1
local MAX_FD_SCAN = 1024 -- specs never hold more descriptors than this

-- Linux signal numbers (x86_64 and arm64 agree on these).
local SIGNALS = {
    HUP = 1, INT = 2, QUIT = 3, KILL = 9, USR1 = 10, USR2 = 12,
    TERM = 15, CONT = 18, STOP = 19,
}

local _M = { signals = SIGNALS }

-- Quotes one word for sh.
local function quote(s)
    s = tostring(s)
    if s:match("^[%w@%%+=:,./_-]+$") then
        return s
    end
    return "'" .. s:gsub("'", "'\\''") .. "'"
end
_M.quote = quote

-- argv table -> quoted command line; a string is taken as it is.
local function command_line(cmd)
    if type(cmd) == "string" then
        return cmd
    end
    if type(cmd) ~= "table" or #cmd == 0 then
        error("expected a command string or a non-empty argv table", 3)
    end
    local words = {}
    for i, w in ipairs(cmd) do
        words[i] = quote(w)
    end
    return concat(words, " ")
end
_M.command_line = command_line

-- Sets FD_CLOEXEC on every open descriptor above stderr, so forked children
-- (io.popen, os.execute) inherit none of the spec's sockets or files.
local function cloexec_all()
    for fd = 3, MAX_FD_SCAN do
        local flags = C.fcntl(fd, F_GETFD)
        if flags >= 0 and flags % 2 == 0 then
            C.fcntl(fd, F_SETFD, ffi.new("int", flags + FD_CLOEXEC))
        end
    end
end
_M.cloexec_all = cloexec_all

local function env_prefix(env)
    if not env then
        return ""
    end
    local keys = {}
    for k in pairs(env) do
        keys[#keys + 1] = k
    end
    sort(keys)
    local parts = { "env" }
    for _, k in ipairs(keys) do
        if not tostring(k):match("^[%a_][%w_]*$") then
            error("bad environment variable name: " .. tostring(k), 3)
        end
        parts[#parts + 1] = quote(k .. "=" .. tostring(env[k]))
    end
    return concat(parts, " ") .. " "
end

-- Starts cmd in the background and returns its pid (a number).
--   cmd:  argv table {"prog", "arg", ...} (each word quoted for you), or a
--         string holding ONE simple shell command (it is run with `exec`;
--         for pipelines or lists pass {"sh", "-c", "..."}).
--   opts: log = path (stdout and stderr, truncated first; default /dev/null),
--         env = {NAME = value} (added to the inherited environment),
--         cwd = directory to start in.
function _M.spawn(cmd, opts)
    opts = opts or {}
    local line = "exec " .. env_prefix(opts.env) .. command_line(cmd)
        .. " >" .. quote(opts.log or "/dev/null") .. " 2>&1 </dev/null"
    if opts.cwd then
        line = "cd " .. quote(opts.cwd) .. " && " .. line
    end
    cloexec_all()
    local p = assert(io_popen(line .. " & echo $!", "r"))
    local out = p:read("*a")
    p:close()
    local pid = tonumber(out:match("(%d+)"))
    if not pid then
        error("proc.spawn: no pid from shell for: " .. line, 2)
    end
    return pid
end

-- The whole file, or nil when it cannot be read.
local function read_file(path)
    local f = io_open(path, "rb")
    if not f then
        return nil
    end
    local data = f:read("*a")
    f:close()
    return data
end
_M.read_file = read_file

-- Writes data to path atomically (a temporary file renamed over it), so a
-- process watching path never reads half a file.
function _M.write_file(path, data)
    local tmp = path .. ".tmp-spec"
    local f = assert(io_open(tmp, "wb"))
    assert(f:write(data))
    assert(f:close())
    assert(os_rename(tmp, path))
end

-- "R", "S", "Z", ... from /proc/PID/stat, or nil when there is no such pid.
local function proc_state(pid)
    local stat = read_file("/proc/" .. tonumber(pid) .. "/stat")
    if not stat then
        return nil
    end
    -- comm (field 2) may hold spaces and parentheses: skip to the last ")".
    local state, ppid = stat:match(".*%) (%S) (%d+)")
    return state, tonumber(ppid)
end

-- True while the process exists and is not a zombie.
function _M.alive(pid)
    local state = proc_state(pid)
    return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Sends a signal: sig is a name ("TERM", "SIGKILL") or a number; default TERM.
-- Returns true when delivered, false when there is no such process.
function _M.kill(pid, sig)
    local signum = sig or "TERM"
    if type(signum) == "string" then
        signum = SIGNALS[signum:upper():gsub("^SIG", "")]
        if not signum then
            error("unknown signal: " .. sig, 2)
        end
    end
    pid = tonumber(pid)
    if not pid or pid <= 1 then
        error("refusing to signal pid " .. tostring(pid), 2)
    end
    -- a zombie accepts signals: report it as gone (init here may be slow,
    -- or never, to reap the processes re-parented to it)
    if not _M.alive(pid) then
        return false
    end
    return C.kill(pid, signum) == 0
end

-- Waits until the process is gone (or a zombie); true if it went in time.
function _M.wait_exit(pid, timeout_s)
    local deadline = gettime() + (timeout_s or 5)
    while _M.alive(pid) do
        if gettime() >= deadline then
            return false
        end
        sleep(0.02)
    end
    return true
end

-- Polls a TCP connect every 20 ms; true once it succeeds, else nil, "timeout".
function _M.wait_port(host, port, timeout_s)
    local deadline = gettime() + (timeout_s or 5)
    while true do
        local sock = socket.tcp()
        sock:settimeout(0.25)
        local ok = sock:connect(host or "127.0.0.1", port)
        sock:close()
        if ok then
            return true
        end
        if gettime() >= deadline then
            return nil, "timeout"
        end
        sleep(0.02)
    end
end

_M.sleep = sleep
_M.now = gettime

-- Polls fn() every interval_s (default 20 ms) until it returns a truthy
-- value, which it returns, or until timeout_s pass: then nil. fn runs at
-- least once, and once more at the deadline.
function _M.eventually(fn, timeout_s, interval_s)
    local deadline = gettime() + timeout_s
    while true do
        local v = fn()
        if v then
            return v
        end
        if gettime() >= deadline then
            return nil
        end
        sleep(interval_s or 0.02)
    end
end

-- How many times the plain string needle occurs in text (a log line, say).
function _M.count(text, needle)
    local n, at = 0, 1
    while true do
        local _, e = text:find(needle, at, true)
        if not e then
            return n
        end
        n, at = n + 1, e + 1
    end
end

local tmpdirs = {}

-- A new empty directory (absolute path), removed by proc.cleanup().
function _M.tmpdir()
    cloexec_all()
    local p = assert(io_popen('mktemp -d "${TMPDIR:-/tmp}/moongate-spec.XXXXXX"', "r"))
    local dir = p:read("*l")
    p:close()
    if not dir or dir == "" then
        error("proc.tmpdir: mktemp -d failed", 2)
    end
    tmpdirs[#tmpdirs + 1] = dir
    return dir
end

-- Removes one directory made by proc.tmpdir(), or all of them when dir is nil.
function _M.cleanup(dir)
    for i = #tmpdirs, 1, -1 do
        local d = tmpdirs[i]
        if dir == nil or d == dir then
            os_execute("rm -rf " .. quote(d))
            remove(tmpdirs, i)
        end
    end
end

-- Resident set size in KiB, or nil when the process is gone.
function _M.rss_kb(pid)
    local status = read_file("/proc/" .. tonumber(pid) .. "/status")
    return status and tonumber(status:match("VmRSS:%s*(%d+)"))
end

-- {pid = ppid} of every live (non-zombie) process on the machine.
-- O(processes): it reads /proc/N/stat for each of them.
local function parent_map()
    local parents = {}
    local p = assert(io_popen("ls /proc", "r"))
    for name in p:lines() do
        local n = tonumber(name)
        if n then
            local state, ppid = proc_state(n)
            if state and state ~= "Z" and state ~= "X" then
                parents[n] = ppid
            end
        end
    end
    p:close()
    return parents
end

-- Live (non-zombie) pids whose parent is pid, sorted ascending.
function _M.children(pid)
    pid = tonumber(pid)
    local kids = {}
    for n, ppid in pairs(parent_map()) do
        if ppid == pid then
            kids[#kids + 1] = n
        end
    end
    sort(kids)
    return kids
end

-- Live children, grandchildren, ... of pid (not pid itself), sorted.
function _M.descendants(pid)
    local parents = parent_map()
    local found, out = { [tonumber(pid)] = true }, {}
    local grew = true
    while grew do
        grew = false
        for n, ppid in pairs(parents) do
            if found[ppid] and not found[n] then
                found[n] = true
                out[#out + 1] = n
                grew = true
            end
        end
    end
    sort(out)
    return out
end

-- The process's command line as a list of words ({} when gone).
function _M.cmdline(pid)
    local raw = read_file("/proc/" .. tonumber(pid) .. "/cmdline") or ""
    local words = {}
    for w in raw:gmatch("([^%z]*)%z") do
        words[#words + 1] = w
    end
    return words
end

local RC_MARK = "\n__MOONGATE_SPEC_RC="

-- Runs cmd (argv table or shell string) to completion.
-- Returns exit code (number), stdout (string). stderr is not captured unless
-- the command says so (e.g. a string ending in "2>&1"); opts.stderr = true
-- merges it into the output.
function _M.run(cmd, opts)
    local line = command_line(cmd)
    if opts and opts.stderr then
        line = "{ " .. line .. "\n} 2>&1"
    end
    cloexec_all()
    local p = assert(io_popen("{ " .. line .. "\n} </dev/null; printf '"
        .. RC_MARK:gsub("\n", "\\n") .. "%d' $?", "r"))
    local out = p:read("*a")
    p:close()
    local at, _, rc = out:find(RC_MARK .. "(%d+)$", 1)
    if not at then
        return -1, out
    end
    return tonumber(rc), out:sub(1, at - 1)
end

return _M
