-- Starting and stopping real gateways (and mock backends) for specs.
--
--   local gw = gateway.start{ routes = {...}, node = {...}, workers = 1 }
--   ... client.get(gw.port, "/x") ...
--   gw:stop()                      -- or gateway.stop_all() in teardown
--
-- Each gateway gets its own temporary directory holding moongate.json,
-- routes.json, the pid file and gateway.log (the master's stdout+stderr),
-- and its own free loopback ports for the proxy, admin and status listeners.
-- The binary is <repo>/bin/moongate, or $MOONGATE_BIN when set (make asan).
-- Set MOONGATE_KEEP_TMP=1 to keep the directories after stop_all().
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local concat = table.concat
local error = error
local getenv = os.getenv
local getmetatable = getmetatable
local io_popen = io.popen
local ipairs = ipairs
local next = next
local pairs = pairs
local remove = table.remove
local setmetatable = setmetatable
local tonumber = tonumber
local tostring = tostring
local type = type

local START_TIMEOUT = 10
local STOP_TIMEOUT = 10
local CHILD_GRACE = 2 -- s a stopped gateway's children may outlive its master
local LOG_TAIL_LINES = 60

local _M = {}

---------------------------------------------------------------------------
-- Paths.
---------------------------------------------------------------------------

-- The repository root: two levels above this file (spec/helpers/), made
-- absolute once at load.
local function find_root()
    local src = debug.getinfo(1, "S").source:gsub("^@", "")
    local dir = src:match("^(.*)/[^/]*$") or "."
    local p = io_popen("cd " .. proc.quote(dir .. "/../..") .. " && pwd", "r")
    local root = p and p:read("*l")
    if p then
        p:close()
    end
    return root or "."
end

local ROOT = find_root()
_M.root = ROOT

local bin_override

-- Makes gateway.start and gateway.mock run `path` instead (nil: back to
-- the default). For specs of the helpers themselves.
function _M.use_bin(path)
    bin_override = path
end

-- The moongate executable: gateway.use_bin's, else $MOONGATE_BIN, else
-- <root>/bin/moongate.
function _M.bin()
    if bin_override then
        return bin_override
    end
    local bin = getenv("MOONGATE_BIN")
    if bin and bin ~= "" then
        return bin
    end
    return ROOT .. "/bin/moongate"
end

---------------------------------------------------------------------------
-- JSON: lua-cjson 2.1 writes an empty table as {}; gateway.array marks the
-- ones that must be [].
---------------------------------------------------------------------------

local array_mt = { __name = "moongate.spec.array" }
local EMPTY_ARRAY = "@@moongate_spec_empty_array@@" -- no pattern magic

-- Marks t (default a new table) as a JSON array, so that empty it encodes
-- as [] rather than {}. Returns t.
function _M.array(t)
    return setmetatable(t or {}, array_mt)
end

-- In gateway.start's `node`, a key set to gateway.DELETE removes that
-- default key from the node config.
_M.DELETE = setmetatable({}, { __name = "moongate.spec.delete" })

local function prepare(v)
    if type(v) ~= "table" or v == cjson.null then
        return v
    end
    if getmetatable(v) == array_mt and next(v) == nil then
        return EMPTY_ARRAY
    end
    local copy = {}
    for k, x in pairs(v) do
        copy[k] = prepare(x)
    end
    return copy
end

-- cjson.encode with gateway.array honoured.
function _M.json_encode(v)
    local s = cjson.encode(prepare(v))
    return (s:gsub('"' .. EMPTY_ARRAY .. '"', "[]"))
end

local function is_array(t)
    return getmetatable(t) == array_mt or (type(t) == "table" and #t > 0)
end

-- Merges src into dst: nested objects merge, anything else (arrays
-- included) replaces, gateway.DELETE removes.
local function merge(dst, src)
    for k, v in pairs(src or {}) do
        if v == _M.DELETE then
            dst[k] = nil
        elseif type(v) == "table" and type(dst[k]) == "table"
            and not is_array(v) and not is_array(dst[k]) then
            merge(dst[k], v)
        else
            dst[k] = v
        end
    end
    return dst
end
_M.merge = merge

---------------------------------------------------------------------------
-- Processes.
---------------------------------------------------------------------------

local running = {} -- gateways and mocks not stopped yet, in start order
local dirs = {}    -- directories of every gateway and mock started

local function forget(obj)
    for i = #running, 1, -1 do
        if running[i] == obj then
            remove(running, i)
        end
    end
end

local function log_tail(path, n)
    local text = proc.read_file(path) or "(no log file)"
    local lines = {}
    for line in (text .. "\n"):gmatch("(.-)\n") do
        lines[#lines + 1] = line
    end
    local first = #lines - n
    if first < 1 then
        first = 1
    end
    return concat(lines, "\n", first, #lines)
end
_M.log_tail = log_tail

-- SIGKILLs pid and the given pids that are still alive; waits for them.
local function kill_all(pids)
    local killed = {}
    for _, p in ipairs(pids) do
        if proc.alive(p) then
            proc.kill(p, "KILL")
            killed[#killed + 1] = p
        end
    end
    for _, p in ipairs(killed) do
        proc.wait_exit(p, 2)
    end
    return killed
end

-- Waits until host:port accepts connections while pid lives.
-- Returns true, or nil, why.
local function wait_listening(pid, port, timeout)
    local deadline = proc.now() + timeout
    while true do
        if not proc.alive(pid) then
            -- it may have bound and exited at once; that is still a failure
            return nil, "the process (pid " .. pid .. ") exited"
        end
        if proc.wait_port("127.0.0.1", port, 0) then
            return true
        end
        if proc.now() >= deadline then
            return nil, "nothing listened on 127.0.0.1:" .. port .. " within "
                .. timeout .. " s"
        end
        proc.sleep(0.02)
    end
end

-- Waits until GET /status/ready on 127.0.0.1:port answers 200 (every
-- worker has the config version in force) while pid lives.
local function wait_ready(pid, port, timeout)
    local deadline = proc.now() + timeout
    local last = "no answer"
    while true do
        if not proc.alive(pid) then
            return nil, "the process (pid " .. pid .. ") exited"
        end
        local sock = socket.tcp()
        sock:settimeout(1)
        if sock:connect("127.0.0.1", port) then
            sock:send("GET /status/ready HTTP/1.0\r\nHost: x\r\n\r\n")
            local line = sock:receive("*l")
            if line and line:match("^HTTP/1%.%d 200") then
                sock:close()
                return true
            end
            last = line or last
        end
        sock:close()
        if proc.now() >= deadline then
            return nil, "not ready within " .. timeout .. " s (/status/ready: " .. last .. ")"
        end
        proc.sleep(0.02)
    end
end

---------------------------------------------------------------------------
-- A gateway.
---------------------------------------------------------------------------

local gw_mt = {}
gw_mt.__index = gw_mt

-- "http://127.0.0.1:<port><path>"
function gw_mt:url(path)
    return "http://127.0.0.1:" .. self.port .. (path or "/")
end

-- The whole gateway log (stdout and stderr of the master and workers).
function gw_mt:log()
    return proc.read_file(self.log_path) or ""
end

-- The last n lines of the log (default 60).
function gw_mt:log_tail(n)
    return log_tail(self.log_path, n or LOG_TAIL_LINES)
end

-- Live child pids of the master, sorted (all of them, see workers()).
function gw_mt:children()
    return proc.children(self.pid)
end

-- The control process names itself "moongate-ctl" (/proc/PID/comm) and
-- "moongate: control process" (its command line); a stand-in for specs of
-- the helpers has a word "control" in its command line.
local function is_control(pid)
    local comm = proc.read_file("/proc/" .. pid .. "/comm") or ""
    if comm:find("moongate-ctl", 1, true) then
        return true
    end
    local words = proc.cmdline(pid)
    if (words[1] or ""):find("^moongate: control") then
        return true
    end
    for _, w in ipairs(words) do
        if w == "control" then
            return true
        end
    end
    return false
end

-- Live worker pids: the master's children less the control process.
function gw_mt:workers()
    local out = {}
    for _, p in ipairs(proc.children(self.pid)) do
        if not is_control(p) then
            out[#out + 1] = p
        end
    end
    return out
end

-- The control process's pid, or nil while there is none.
function gw_mt:control()
    for _, p in ipairs(proc.children(self.pid)) do
        if is_control(p) then
            return p
        end
    end
    return nil
end

-- The config version each worker has in force, from the status
-- listener's /metrics (gateway_config_version{worker="N"} V):
-- {[worker id] = version}, and the metrics text. When /metrics does not
-- answer 200: {}, nil and why (pollers just try again).
function gw_mt:config_versions()
    local res, err = client.get(self.status_port, "/metrics")
    if not res or res.status ~= 200 then
        return {}, nil, res and ("/metrics answered " .. tostring(res.status)) or tostring(err)
    end
    local out = {}
    for w, v in res.body:gmatch('gateway_config_version{worker="(%d+)"} (%d+)') do
        out[tonumber(w)] = tonumber(v)
    end
    return out, res.body
end

-- true when every worker (node.workers of them: a number) has version in
-- force, per /metrics; one look, no waiting (wrap it in proc.eventually).
function gw_mt:config_all_at(version)
    local v = self:config_versions()
    for w = 0, self.node.workers - 1 do
        if v[w] ~= version then
            return false
        end
    end
    return true
end

-- Replaces routes.json (atomically); tbl is a table (encoded with
-- gateway.json_encode) or a JSON string written as it is.
function gw_mt:write_routes(tbl)
    local data = type(tbl) == "string" and tbl or _M.json_encode(tbl)
    proc.write_file(self.routes_path, data)
end

-- Runs `moongate reload -c <conf>`; returns exit code, output (stdout+stderr).
function gw_mt:reload()
    return proc.run({ _M.bin(), "reload", "-c", self.conf_path }, { stderr = true })
end

-- Stops the gateway: `moongate stop -c <conf>` (SIGTERM to the master if
-- that command fails), waits up to `timeout` s (default 10) for the master
-- to exit, then SIGKILLs whatever is left of it and its descendants
-- (its children get CHILD_GRACE s more to exit on their own).
-- Returns clean, info: clean is true when the master exited in time and no
-- process needed SIGKILL; info = {rc =, output =, master_exited =,
-- killed = {pids}}. A second call returns true, the first call's info.
function gw_mt:stop(timeout)
    if self.stopped then
        return true, self.stop_info
    end
    self.stopped = true
    forget(self)
    local before = proc.descendants(self.pid)
    local rc, output = proc.run({ _M.bin(), "stop", "-c", self.conf_path },
        { stderr = true })
    if rc ~= 0 then
        proc.kill(self.pid, "TERM")
    end
    local exited = proc.wait_exit(self.pid, timeout or STOP_TIMEOUT)
    local left = {}
    if not exited then
        left[1] = self.pid
        for _, p in ipairs(proc.descendants(self.pid)) do
            left[#left + 1] = p
        end
    end
    -- children told to stop exit on their own, a moment after the master
    -- at worst (a SIGTERM lands asynchronously): only those still there
    -- after a grace period were left behind
    local grace_end = proc.now() + CHILD_GRACE
    for _, p in ipairs(before) do
        left[#left + 1] = p
        proc.wait_exit(p, math.max(0, grace_end - proc.now()))
    end
    local killed = kill_all(left)
    self.stop_info = { rc = rc, output = output, master_exited = exited, killed = killed }
    return exited and #killed == 0, self.stop_info
end

-- Starts a gateway and waits until its proxy port accepts connections.
--   routes  = routes.json as a table (default: all four lists empty) or a
--             JSON string;
--   node    = merged into the node config (see merge; gateway.DELETE drops
--             a key);
--   workers = number (default 1);
--   env     = extra environment {NAME = value};
--   timeout = seconds to wait for the proxy port (default 10).
-- Raises an error holding the tail of the log when the gateway does not
-- come up (its processes are killed first).
function _M.start(opts)
    opts = opts or {}
    local dir = proc.tmpdir()
    local port, admin_port, status_port = ports.free(), ports.free(), ports.free()
    local node = merge({
        workers = opts.workers or 1,
        listen = { { address = "127.0.0.1:" .. port } },
        admin = { listen = "127.0.0.1:" .. admin_port },
        status = { listen = "127.0.0.1:" .. status_port },
        pid_file = dir .. "/moongate.pid",
        log = { level = "info", access = "off" },
        config_source = { type = "file", path = "routes.json" },
    }, opts.node)
    local routes = opts.routes or {
        upstreams = _M.array(), routes = _M.array(),
        consumers = _M.array(), global_policies = _M.array(),
    }
    local gw = setmetatable({
        port = port, admin_port = admin_port, status_port = status_port,
        dir = dir, conf_path = dir .. "/moongate.json",
        routes_path = dir .. "/routes.json", log_path = dir .. "/gateway.log",
        node = node,
    }, gw_mt)
    proc.write_file(gw.conf_path, _M.json_encode(node))
    gw:write_routes(routes)
    gw.pid = proc.spawn({ _M.bin(), "start", "-c", gw.conf_path },
        { log = gw.log_path, env = opts.env, cwd = ROOT })
    running[#running + 1] = gw
    dirs[#dirs + 1] = dir
    local timeout = opts.timeout or START_TIMEOUT
    local ok, why = wait_listening(gw.pid, port, timeout)
    -- the proxy port accepts as soon as the master listens; the workers
    -- serve once they have their config from the control process
    local ready_port = type(node.status) == "table"
        and tonumber(tostring(node.status.listen or ""):match(":(%d+)$"))
    if ok and ready_port and not bin_override and opts.wait_ready ~= false then
        ok, why = wait_ready(gw.pid, ready_port, timeout)
    end
    if not ok then
        gw:stop(1)
        error("gateway.start: " .. _M.bin() .. " start -c " .. gw.conf_path
            .. " (master pid " .. gw.pid .. "): " .. why
            .. "\n--- last lines of " .. gw.log_path .. " ---\n"
            .. gw:log_tail(LOG_TAIL_LINES), 2)
    end
    return gw
end

---------------------------------------------------------------------------
-- The mock backend.
---------------------------------------------------------------------------

-- `moongate start` of node (a node config table: its listeners, pid file
-- and workers are set here, in dir), expected to refuse: asserts that it
-- exits non-zero within 10 s (not by the 20 s `timeout` around it) and
-- returns its output and the config's path, for the caller's own checks.
function _M.start_refused(node, dir, workers)
    merge(node, { listen = { { address = "127.0.0.1:" .. ports.free() } },
                  status = { listen = "127.0.0.1:" .. ports.free() },
                  admin = { listen = "127.0.0.1:" .. ports.free() },
                  pid_file = dir .. "/moongate.pid", workers = workers or 1 })
    local conf = dir .. "/moongate.json"
    proc.write_file(conf, _M.json_encode(node))
    local t0 = proc.now()
    local rc, out = proc.run({ "timeout", "20", _M.bin(), "start", "-c", conf }, { stderr = true })
    assert(rc ~= 0 and rc ~= 124, "exit code " .. rc .. ": " .. out)
    assert(proc.now() - t0 < 10, "took " .. (proc.now() - t0) .. " s: " .. out)
    return out, conf
end

-- Starts `moongate mock --listen 127.0.0.1:<free port>` and waits for it.
--   opts.args = extra arguments; opts.env; opts.timeout (default 10).
-- Returns {port =, pid =, dir =, log_path =, stop = fn, url = fn(path),
-- log = fn}; stop, url and log work called with . or with :.
function _M.mock(opts)
    opts = opts or {}
    local port = ports.free()
    local dir = proc.tmpdir()
    local m = { port = port, dir = dir, log_path = dir .. "/mock.log" }
    local argv = { _M.bin(), "mock", "--listen", "127.0.0.1:" .. port }
    for _, a in ipairs(opts.args or {}) do
        argv[#argv + 1] = a
    end
    m.pid = proc.spawn(argv, { log = m.log_path, env = opts.env, cwd = ROOT })

    function m.url(a, b)
        local path = type(a) == "table" and b or a
        return "http://127.0.0.1:" .. port .. (path or "/")
    end
    function m.log()
        return proc.read_file(m.log_path) or ""
    end
    -- SIGTERM, up to 5 s to exit, then SIGKILL (it and its descendants).
    -- Returns true when it exited on SIGTERM.
    function m.stop()
        if m.stopped then
            return true
        end
        m.stopped = true
        forget(m)
        local before = proc.descendants(m.pid)
        proc.kill(m.pid, "TERM")
        local exited = proc.wait_exit(m.pid, 5)
        before[#before + 1] = m.pid
        local killed = kill_all(before)
        return exited and #killed == 0
    end

    running[#running + 1] = m
    dirs[#dirs + 1] = dir
    local ok, why = wait_listening(m.pid, port, opts.timeout or START_TIMEOUT)
    if not ok then
        m.stop()
        error("gateway.mock: " .. concat(argv, " ") .. " (pid " .. m.pid .. "): " .. why
            .. "\n--- last lines of " .. m.log_path .. " ---\n"
            .. log_tail(m.log_path, LOG_TAIL_LINES), 2)
    end
    return m
end

-- An upstream entity for routes.json pointing at a mock (or a port number).
function _M.upstream(name, mock)
    local port = type(mock) == "table" and mock.port or mock
    return {
        id = name,
        targets = { { host = "127.0.0.1", port = port, weight = 1 } },
    }
end

-- routes.json with upstream "m" (the mock) and route "demo" (/demo/*),
-- then the routes in extra: what specs of the config's life change.
function _M.demo_routes(mock, extra)
    local routes = { { id = "demo", paths = { "/demo/*" }, upstream = "m" } }
    for _, r in ipairs(extra or {}) do
        routes[#routes + 1] = r
    end
    return { upstreams = { _M.upstream("m", mock) }, routes = routes }
end

-- A route "<id>" on /<id>/* to upstream "m" (demo_routes), with policies.
function _M.demo_route(id, policies)
    return { id = id, paths = { "/" .. id .. "/*" }, upstream = "m", policies = policies }
end

-- Stops every gateway and mock started and not stopped yet (newest first),
-- then removes the directories of all those started so far (unless
-- MOONGATE_KEEP_TMP is set).
function _M.stop_all()
    while #running > 0 do
        local obj = running[#running]
        if getmetatable(obj) == gw_mt then
            obj:stop()
        else
            obj.stop()
        end
        forget(obj)
    end
    local keep = getenv("MOONGATE_KEEP_TMP")
    if not keep or keep == "" or keep == "0" then
        for i = #dirs, 1, -1 do
            proc.cleanup(dirs[i])
            dirs[i] = nil
        end
    end
end

-- The number of gateways and mocks started and not stopped (for specs of
-- the helpers themselves).
function _M.running_count()
    return #running
end

return _M
