-- A real etcd server (Debian's etcd-server) for specs, on free loopback
-- ports, with its data in a spec temporary directory.
--
--   local etcd = require("helpers.etcd")
--   local e = etcd.start()            -- waits until it answers
--   e:put("/moongate/routes/a", json) -- through etcdctl (v3 API)
--   e:get("/moongate/routes/a")       -- value or nil
--   e:stop() / e:kill() / e:restart() -- restart keeps its ports and data;
--                                     -- stop removes the data dir it made
--
-- TLS: etcd.start{tls = pki} (helpers/tls.lua's certificates) serves
-- https:// with pki.server_cert; client_cert_auth = true also wants a
-- client certificate signed by pki.ca (mTLS). e.url is then https://...
-- e:enable_auth(user, password) turns etcd's authentication on (a root
-- user); etcdctl then logs in as that user.
--
-- Keys and values go through etcdctl, a separate client, so a spec never
-- checks the gateway's etcd client with itself.
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local error = error
local setmetatable = setmetatable
local tostring = tostring

local ETCD = "etcd"
local ETCDCTL = "etcdctl"

local Etcd = {}
Etcd.__index = Etcd

-- etcdctl's connection flags: the endpoint, TLS files, the user
local function ctl_argv(self, dial)
    local argv = { ETCDCTL, "--endpoints", self.url, "--dial-timeout", dial }
    local pki = self.tls
    if pki then
        argv[#argv + 1] = "--cacert=" .. pki.ca
        argv[#argv + 1] = "--cert=" .. pki.client_cert
        argv[#argv + 1] = "--key=" .. pki.client_key
    end
    if self.user then
        argv[#argv + 1] = "--user=" .. self.user .. ":" .. self.password
    end
    return argv
end

local function launch(self)
    local peer = "http://127.0.0.1:" .. self.peer_port
    local argv = {
        ETCD, "--name", "spec", "--data-dir", self.dir .. "/data",
        "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", "spec=" .. peer,
        "--initial-cluster-state", self.started_once and "existing" or "new",
        "--log-level", "warn",
    }
    local pki = self.tls
    if pki then
        argv[#argv + 1] = "--cert-file=" .. pki.server_cert
        argv[#argv + 1] = "--key-file=" .. pki.server_key
        if self.client_cert_auth then
            -- etcd 3.4 asks every client for a certificate once it has a
            -- trusted CA file: only with client_cert_auth
            argv[#argv + 1] = "--trusted-ca-file=" .. pki.ca
            argv[#argv + 1] = "--client-cert-auth"
        end
    end
    self.pid = proc.spawn(argv, { log = self.dir .. "/etcd.log" })
    self.started_once = true
    local deadline = proc.now() + 15
    while proc.now() < deadline do
        if not proc.alive(self.pid) then
            break
        end
        local health = ctl_argv(self, "1s")
        health[#health + 1] = "endpoint"
        health[#health + 1] = "health"
        local rc = proc.run(health, { stderr = true })
        if rc == 0 then
            return self
        end
        proc.sleep(0.05)
    end
    local log = proc.read_file(self.dir .. "/etcd.log") or ""
    error("etcd did not start on " .. self.url .. ":\n" .. log, 3)
end

-- Starts a one-member etcd cluster. opts.dir: a directory to keep its data
-- in (default: a new proc.tmpdir()); opts.tls, opts.client_cert_auth: see
-- the top.
local function start(opts)
    opts = opts or {}
    local self = setmetatable({
        dir = opts.dir or proc.tmpdir(),
        own_dir = opts.dir == nil, -- removed by stop(): etcd preallocates ~60 MB of WAL
        client_port = ports.free(),
        peer_port = ports.free(),
        tls = opts.tls,
        client_cert_auth = opts.client_cert_auth,
    }, Etcd)
    self.url = (opts.tls and "https" or "http") .. "://127.0.0.1:" .. self.client_port
    self.endpoint = "127.0.0.1:" .. self.client_port
    return launch(self)
end

-- Runs etcdctl against this server; returns exit code and output.
function Etcd:ctl(args, input)
    local argv = ctl_argv(self, "2s")
    argv[#argv + 1] = "--command-timeout"
    argv[#argv + 1] = "5s"
    for i = 1, #args do
        argv[#argv + 1] = args[i]
    end
    local line = proc.command_line(argv)
    if input then
        -- etcdctl put KEY reads the value from stdin when none is given
        local f = self.dir .. "/etcdctl-value"
        proc.write_file(f, input)
        line = line .. " < " .. proc.quote(f)
        return proc.run({ "sh", "-c", line }, { stderr = true })
    end
    return proc.run(line, { stderr = true })
end

local function must(self, args, input)
    local rc, out = self:ctl(args, input)
    if rc ~= 0 then
        error("etcdctl " .. table.concat(args, " ") .. ": " .. tostring(out), 3)
    end
    return out
end

-- Writes value under key; returns the new revision (a number).
function Etcd:put(key, value)
    must(self, { "put", key }, value)
    return self:revision()
end

-- The value under key, or nil.
function Etcd:get(key)
    local out = must(self, { "get", "--print-value-only", key })
    if out == "" then
        return nil
    end
    return (out:gsub("\n$", ""))
end

function Etcd:delete(key)
    must(self, { "del", key })
    return self:revision()
end

function Etcd:delete_prefix(prefix)
    must(self, { "del", "--prefix", prefix })
    return self:revision()
end

-- Turns authentication on, with user as root (etcd's v3 auth: the root
-- user must exist first); etcdctl uses it from now on.
function Etcd:enable_auth(user, password)
    must(self, { "user", "add", user .. ":" .. password })
    if user ~= "root" then
        must(self, { "user", "add", "root:" .. password })
        must(self, { "user", "grant-role", user, "root" })
    end
    must(self, { "user", "grant-role", "root", "root" })
    must(self, { "auth", "enable" })
    self.user, self.password = user, password
end

-- The store's current revision.
function Etcd:revision()
    local out = must(self, { "endpoint", "status", "-w", "json" })
    local rev = out:match('"revision":(%d+)')
    return rev and tonumber(rev)
end

-- Compacts the history up to rev (default: the current revision).
function Etcd:compact(rev)
    must(self, { "compact", tostring(rev or self:revision()), "--physical" })
end

-- SIGKILL, no cleanup (the data stays for restart()).
function Etcd:kill()
    if self.pid and proc.alive(self.pid) then
        proc.kill(self.pid, "KILL")
        proc.wait_exit(self.pid, 10)
    end
    self.pid = nil
end

-- Starts it again on the same ports with the same data.
function Etcd:restart()
    self:kill()
    return launch(self)
end

function Etcd:stop()
    if self.pid and proc.alive(self.pid) then
        proc.kill(self.pid, "TERM")
        if not proc.wait_exit(self.pid, 10) then
            proc.kill(self.pid, "KILL")
            proc.wait_exit(self.pid, 5)
        end
    end
    self.pid = nil
    if self.own_dir then
        proc.cleanup(self.dir)
    end
end

return { start = start }
