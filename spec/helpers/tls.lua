-- Certificates for TLS specs, made at test time with the openssl CLI into
-- a temporary directory (nothing is checked in: no key ever expires in
-- the tree).
--
--   local tls = require("helpers.tls")
--   local pki = tls.pki()      -- pki.ca, pki.server_cert, pki.server_key,
--                              -- pki.client_cert, pki.client_key (paths),
--                              -- pki.other_ca (a CA that signed nothing here)
--   local s = tls.s_server(pki, { verify_client = true }) -- openssl s_server -www
--   s.port ... s:stop()
--
-- The server certificate names IP:127.0.0.1 and DNS:localhost (its SAN);
-- the client certificate is for CN=moongate-spec, signed by the same CA.
-- EC P-256 keys: each costs a few milliseconds to make.
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local error = error
local setmetatable = setmetatable

local _M = {}

local function openssl(dir, args)
    local argv = { "openssl" }
    for i = 1, #args do
        argv[#argv + 1] = args[i]
    end
    local rc, out = proc.run({ "sh", "-c", "cd " .. proc.quote(dir) .. " && "
                               .. proc.command_line(argv) }, { stderr = true })
    if rc ~= 0 then
        error("openssl " .. table.concat(args, " ") .. ": " .. tostring(out), 3)
    end
end

local function ca(dir, name)
    openssl(dir, { "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-nodes", "-keyout", name .. "-key.pem", "-out", name .. ".pem",
                   "-days", "2", "-subj", "/CN=" .. name })
end

-- a leaf signed by ca-name with the extensions in ext (a file's contents)
local function leaf(dir, name, cn, ext)
    proc.write_file(dir .. "/" .. name .. ".ext", ext)
    openssl(dir, { "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                   "-keyout", name .. "-key.pem", "-out", name .. ".csr", "-subj", "/CN=" .. cn })
    openssl(dir, { "x509", "-req", "-in", name .. ".csr", "-CA", "ca.pem", "-CAkey",
                   "ca-key.pem", "-CAcreateserial", "-out", name .. ".pem", "-days", "2",
                   "-extfile", name .. ".ext" })
end

-- A CA, a server certificate for 127.0.0.1/localhost, a client
-- certificate, and an unrelated CA. dir: where (default: a new tmpdir).
function _M.pki(dir)
    dir = dir or proc.tmpdir()
    ca(dir, "ca")
    ca(dir, "other-ca")
    leaf(dir, "server", "localhost",
         -- clientAuth too: etcd's JSON gateway dials etcd's own gRPC port
         -- with the server certificate when client certificates are required
         "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    leaf(dir, "client", "moongate-spec", "extendedKeyUsage=clientAuth\n")
    return {
        dir = dir,
        ca = dir .. "/ca.pem",
        other_ca = dir .. "/other-ca.pem",
        server_cert = dir .. "/server.pem",
        server_key = dir .. "/server-key.pem",
        client_cert = dir .. "/client.pem",
        client_key = dir .. "/client-key.pem",
    }
end

local Server = {}
Server.__index = Server

-- `openssl s_server -www` on a free loopback port: answers every request
-- with an HTTP/1.0 status page, then closes. opts.verify_client: the
-- client must show a certificate from pki.ca (mTLS).
function _M.s_server(pki, opts)
    opts = opts or {}
    local port = ports.free()
    local argv = { "openssl", "s_server", "-www", "-quiet", "-accept", "127.0.0.1:" .. port,
                   "-cert", pki.server_cert, "-key", pki.server_key }
    if opts.verify_client then
        argv[#argv + 1] = "-Verify"
        argv[#argv + 1] = "1"
        argv[#argv + 1] = "-CAfile"
        argv[#argv + 1] = pki.ca
    end
    local log = proc.tmpdir() .. "/s_server.log"
    local self = setmetatable({ port = port, log = log }, Server)
    self.pid = proc.spawn(argv, { log = log })
    if not proc.wait_port("127.0.0.1", port, 10) then
        error("openssl s_server did not start: " .. tostring(proc.read_file(log)), 2)
    end
    self.url = "https://127.0.0.1:" .. port
    return self
end

function Server:stop()
    if self.pid and proc.alive(self.pid) then
        proc.kill(self.pid, "KILL")
        proc.wait_exit(self.pid, 5)
    end
    self.pid = nil
end

return _M
