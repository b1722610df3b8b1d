-- The etcd config source over TLS (issue 5 item 2): real etcd servers
-- (spec/helpers/etcd.lua) serving https:// with certificates made at test
-- time (spec/helpers/tls.lua: a CA, a server certificate for 127.0.0.1 and
-- localhost, a client certificate, an unrelated CA), and real gateways.
-- Writes go through etcdctl (a separate client) or the Admin API (the
-- gateway's own client, over TLS too).
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local etcd_helper = require("helpers.etcd")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")
local tls_helper = require("helpers.tls")

local PREFIX = "/moongate"
local NWORKERS = 2

local function key(kind, id)
  return PREFIX .. "/" .. kind .. "/" .. id
end

local function route_json(id)
  return cjson.encode({ id = id, paths = { "/" .. id .. "/*" }, upstream = "m" })
end

local function seed(e, mock)
  e:put(key("upstreams", "m"), cjson.encode(gateway.upstream("m", mock)))
  return e:put(key("routes", "base"), route_json("base"))
end

-- true once GET /<id>/x reached the mock (every worker: the check repeats
-- on new connections, and the mock echoes the path)
local function served(gw, id)
  local ok = 0
  return proc.eventually(function()
    local res = client.get(gw.port, "/" .. id .. "/x", nil, { timeout = 2 })
    local ok_json, body = pcall(cjson.decode, res and res.body or "")
    if res and res.status == 200 and ok_json and body.path == "/" .. id .. "/x" then
      ok = ok + 1
    else
      ok = 0
    end
    return ok >= 2 * NWORKERS
  end, 5, 0.01)
end

local function etcd_node(endpoints, extra)
  local src = { type = "etcd", path = gateway.DELETE, endpoints = endpoints, prefix = PREFIX }
  for k, v in pairs(extra or {}) do
    src[k] = v
  end
  return { config_source = src }
end

-- `moongate start` with node (no last-known-good copy): it must fail;
-- returns its output
local function start_fails(node)
  local dir = proc.tmpdir()
  node.config_source.cache = dir .. "/none.json"
  -- the start deadline: long enough for a handshake under ASan on a loaded machine
  node.config_source.timeout_ms = node.config_source.timeout_ms or 3000
  node.config_source.path = nil
  local out, conf = gateway.start_refused(node, dir)
  assert.matches("refusing to start", out)
  return out, conf
end

-- the pids of gw's processes holding an established connection to port
local function connections(gw, port)
  local mine = { [gw.pid] = true }
  for _, p in ipairs(proc.descendants(gw.pid)) do
    mine[p] = true
  end
  local rc, out = proc.run({ "ss", "-tnpH", "state", "established",
                             "dst", "127.0.0.1:" .. port })
  assert.equal(0, rc, out)
  local pids = {}
  for pid in out:gmatch("pid=(%d+)") do
    if mine[tonumber(pid)] then
      pids[#pids + 1] = tonumber(pid)
    end
  end
  return pids
end

describe("etcd config source over TLS", function()
  local pki, mock
  local servers = {}

  local function etcd(opts)
    opts = opts or {}
    local e = etcd_helper.start(opts)
    servers[#servers + 1] = e
    return e
  end

  setup(function()
    pki = tls_helper.pki()
  end)

  before_each(function()
    mock = gateway.mock()
  end)

  after_each(function()
    client.close_all()
    gateway.stop_all()
    for _, e in ipairs(servers) do
      e:stop()
      proc.cleanup(e.dir) -- etcd preallocates its WAL: ~64 MB a server
    end
    servers = {}
  end)

  teardown(function()
    proc.cleanup(pki.dir)
  end)

  it("serves routes from an https:// etcd, follows its watch and writes through the Admin API "
     .. "over one TLS connection per node", function()
    local e = etcd({ tls = pki })
    seed(e, mock)
    local node = etcd_node({ e.url }, { tls = { ca = pki.ca } })
    node.admin = { api_key = "spec-key" }
    local gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.matches("config source: etcd https://127%.0%.0%.1:%d+ prefix /moongate over TLS",
                   gw:log())

    -- a change through etcdctl: the watch stream carries it
    e:put(key("routes", "r1"), route_json("r1"))
    assert.is_truthy(served(gw, "r1"), gw:log_tail())

    -- a write through the Admin API: the control process's mg.http.request
    -- over TLS, with the same settings
    local res = assert(client.request(gw.admin_port, {
      method = "PUT", path = "/routes/r2", body = route_json("r2"),
      headers = { ["X-API-Key"] = "spec-key", ["Content-Type"] = "application/json" },
    }))
    assert.equal(201, res.status, res.body)
    assert.equal(route_json("r2"), e:get(key("routes", "r2")))
    assert.is_truthy(served(gw, "r2"), gw:log_tail())

    -- the config stream: one connection to etcd, the control process's
    -- (the Admin API's pooled one may be there too, from the same process)
    local pids = connections(gw, e.client_port)
    assert.is_true(#pids >= 1 and #pids <= 2, #pids .. " connections")
    for _, pid in ipairs(pids) do
      assert.equal(gw:control(), pid)
    end
    -- a DNS name the certificate lists works as well (localhost)
    gw:stop()
    local node2 = etcd_node({ "https://localhost:" .. e.client_port }, { tls = { ca = pki.ca } })
    local gw2 = gateway.start({ workers = NWORKERS, node = node2 })
    assert.is_truthy(served(gw2, "r2"), gw2:log_tail())
    assert.same({ gw2:control() }, connections(gw2, e.client_port))
  end)

  it("mTLS: a client certificate opens an etcd that demands one; without it the start is "
     .. "refused, saying why", function()
    local e = etcd({ tls = pki, client_cert_auth = true })
    seed(e, mock)
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }, {
      tls = { ca = pki.ca, cert = pki.client_cert, key = pki.client_key } }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.matches("over TLS with a client certificate", gw:log())
    e:put(key("routes", "m1"), route_json("m1"))
    assert.is_truthy(served(gw, "m1"), gw:log_tail())
    gw:stop()

    local out = start_fails(etcd_node({ e.url }, { tls = { ca = pki.ca } }))
    assert.matches("etcd: unreachable at start %(https://127%.0%.0%.1:%d+ [a-z]+: TLS [a-z]+ "
                   .. "failed: [^\n]*certificate[^\n]*set tls%.cert and tls%.key%)", out)
  end)

  it("refuses to start against an unknown CA or a certificate naming another host, saying so",
     function()
    local e = etcd({ tls = pki })
    seed(e, mock)
    -- no ca: the system store does not know the spec's CA
    local out = start_fails(etcd_node({ e.url }))
    assert.matches("https://127%.0%.0%.1:%d+ range: TLS handshake failed: certificate verify "
                   .. "failed: unable to get local issuer certificate %(unknown CA: set tls%.ca",
                   out)
    -- another CA
    out = start_fails(etcd_node({ e.url }, { tls = { ca = pki.other_ca } }))
    assert.matches("certificate verify failed: unable to get local issuer certificate", out)
    -- the right CA, a name the certificate does not list
    out = start_fails(etcd_node({ e.url }, { tls = { ca = pki.ca,
                                                     server_name = "etcd.example" } }))
    assert.matches("certificate verify failed: hostname mismatch", out)
    -- verify off: an explicit, logged opt-out
    local gw = gateway.start({ workers = NWORKERS, node = etcd_node({ e.url }, {
      tls = { verify = false } }) })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.matches("%[warn%][^\n]*config_source%.tls%.verify is false", gw:log())
    gw:stop()
    -- a CA file that is not there: named by check and by start
    local missing = pki.dir .. "/missing-ca.pem"
    local _, conf = start_fails(etcd_node({ e.url }, { tls = { ca = pki.ca,
                                                               server_name = "x.example" } }))
    local raw = cjson.decode(proc.read_file(conf))
    raw.config_source.tls = { ca = missing }
    proc.write_file(conf, gateway.json_encode(raw))
    local rc, cout = proc.run({ gateway.bin(), "check", "-c", conf }, { stderr = true })
    assert.equal(1, rc, cout)
    assert.matches("config_source%.tls%.ca: cannot read " .. missing:gsub("%p", "%%%0")
                   .. ": No such file or directory", cout)
  end)

  it("an https:// endpoint served in plain text is named as such", function()
    local e = etcd()
    seed(e, mock)
    local out = start_fails(etcd_node({ "https://127.0.0.1:" .. e.client_port },
                                      { tls = { ca = pki.ca } }))
    -- etcd's port multiplexer hangs up on a ClientHello: a FIN, or (seen
    -- under ASan) a reset
    local fin = out:find("range: TLS handshake failed: the server closed the connection without "
                         .. "answering (not a TLS server", 1, true)
    local rst = out:find("range: TLS handshake failed: read failed: connection reset by peer", 1,
                         true)
    assert.is_truthy(fin or rst, out)
    -- either way the message says what is likely wrong
    assert.is_truthy(out:find("(not a TLS server, or it refused our certificate?)", 1, true), out)
    assert.matches("etcd: unreachable at start %(https://127%.0%.0%.1:%d+ range: TLS handshake "
                   .. "failed", out)
  end)

  it("TLS and user/password together", function()
    local e = etcd({ tls = pki })
    seed(e, mock)
    e:enable_auth("moon", "s3cret")
    local node = etcd_node({ e.url }, { user = "moon", password = "s3cret",
                                        tls = { ca = pki.ca } })
    node.admin = { api_key = "spec-key" }
    local gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    assert.matches("prefix /moongate as moon over TLS", gw:log())
    e:put(key("routes", "a1"), route_json("a1"))
    assert.is_truthy(served(gw, "a1"), gw:log_tail())
    local res = assert(client.request(gw.admin_port, {
      method = "PUT", path = "/routes/a2", body = route_json("a2"),
      headers = { ["X-API-Key"] = "spec-key", ["Content-Type"] = "application/json" },
    }))
    assert.equal(201, res.status, res.body)
    assert.is_truthy(served(gw, "a2"), gw:log_tail())
    gw:stop()
    -- a wrong password over TLS: refused, saying so
    local out = start_fails(etcd_node({ e.url }, { user = "moon", password = "wrong",
                                                   tls = { ca = pki.ca } }))
    assert.matches("https://127%.0%.0%.1:%d+ auth: HTTP 400 [^\n]*authentication failed", out)
  end)

  it("fails over past endpoints that break TLS (plain HTTP, dead, silent) and keeps "
     .. "following etcd across its restart", function()
    local e = etcd({ tls = pki })
    seed(e, mock)
    -- accepts TCP (the kernel's backlog) and never answers: a handshake
    -- that cannot end
    local silent = assert(socket.bind("127.0.0.1", 0))
    local _, silent_port = silent:getsockname()
    local plain = mock.url(""):gsub("^http:", "https:"):gsub("/$", "")
    -- at start: the plain one, a dead port, etcd; once etcd is lost, the
    -- silent one's handshake timeout is paid in every round
    local node = etcd_node({ plain, "https://127.0.0.1:" .. ports.free(), e.url,
                             "https://127.0.0.1:" .. silent_port },
                           { tls = { ca = pki.ca }, timeout_ms = 500 })
    local gw = gateway.start({ workers = NWORKERS, node = node })
    assert.is_truthy(served(gw, "base"), gw:log_tail())
    e:put(key("routes", "f1"), route_json("f1"))
    assert.is_truthy(served(gw, "f1"), gw:log_tail())

    -- etcd restarts: the driver goes round the broken endpoints (with
    -- backoff) and comes back to it
    e:restart()
    e:put(key("routes", "f2"), route_json("f2"))
    assert.is_truthy(proc.eventually(function()
      return served(gw, "f2")
    end, 15, 0.1), gw:log_tail())
    local log = gw:log()
    assert.matches("etcd: connection lost", log)
    assert.matches("etcd: connected again to https://127%.0%.0%.1:" .. e.client_port, log)
    assert.same({ gw:control() }, connections(gw, e.client_port))
    silent:close()
  end)
end)
