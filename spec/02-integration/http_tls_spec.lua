-- mg.http.request to https:// servers: `openssl s_server -www` (real TLS,
-- answers an HTTP/1.0 page and closes), an https:// etcd (keep-alive), a
-- plain HTTP server and a socket that never answers, with certificates
-- made at test time (spec/helpers/tls.lua). The policy is
-- spec/fixtures/policies-http/it-http.lua: the call's tls table comes from
-- the query (tls_ca, tls_cert, tls_key, tls_server_name, tls_verify).
local cjson = require("cjson")
local socket = require("socket")
local client = require("helpers.client")
local etcd_helper = require("helpers.etcd")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")
local tls_helper = require("helpers.tls")

local gettime = socket.gettime

local POLICY_DIR = gateway.root .. "/spec/fixtures/policies-http"

local function esc(s)
  return (s:gsub("[^%w%-%._~]", function(ch) return string.format("%%%02X", ch:byte()) end))
end

describe("mg.http.request over TLS", function()
  local gw, mock, pki, srv, msrv

  local function call(params)
    local q = {}
    for k, v in pairs(params) do
      q[#q + 1] = k .. "=" .. esc(tostring(v))
    end
    table.sort(q)
    local res = assert(client.get(gw.port, "/h?" .. table.concat(q, "&"), nil, { timeout = 10 }))
    local ok, out = pcall(cjson.decode, res.body)
    assert(ok, "not JSON: " .. tostring(res.body))
    return res.status, out
  end

  -- the worker answers a plain call: nothing above broke it
  local function still_serving()
    local status, out = call({ url = mock.url("/alive") })
    assert.equal(200, status)
    assert.equal(200, out.status)
  end

  setup(function()
    pki = tls_helper.pki()
    srv = tls_helper.s_server(pki)
    msrv = tls_helper.s_server(pki, { verify_client = true })
    mock = gateway.mock()
    gw = gateway.start({
      workers = 1,
      node = { lua_path = { POLICY_DIR } },
      routes = {
        upstreams = { gateway.upstream("mock", mock) },
        routes = { { id = "h", paths = { "/h" }, policies = { { name = "it-http", conf = {} } } } },
        consumers = gateway.array(), global_policies = gateway.array(),
      },
    })
  end)

  teardown(function()
    client.close_all()
    gateway.stop_all()
    srv:stop()
    msrv:stop()
    proc.cleanup(pki.dir)
  end)

  it("talks to an https:// server whose certificate chains to tls.ca and names the host",
     function()
    local status, out = call({ url = srv.url .. "/", tls_ca = pki.ca })
    assert.equal(200, status, cjson.encode(out))
    assert.equal(200, out.status)
    assert.matches("s_server %-www", out.body) -- the page is the server's own
    assert.matches("Protocol%s*: TLSv1%.[23]", out.body)
    -- a DNS name the certificate lists, with SNI
    status, out = call({ url = "https://localhost:" .. srv.port .. "/", tls_ca = pki.ca })
    assert.equal(200, status, cjson.encode(out))
    still_serving()
  end)

  it("resumes the server's TLS session on the next connection with the same settings",
     function()
    -- s_server -www closes after each answer: every call is a new
    -- connection, and its page says whether the session was resumed
    local status, out = call({ url = srv.url .. "/", tls_ca = pki.ca, tls_server_name = "localhost" })
    assert.equal(200, status, cjson.encode(out))
    status, out = call({ url = srv.url .. "/", tls_ca = pki.ca, tls_server_name = "localhost" })
    assert.equal(200, status, cjson.encode(out))
    assert.matches("\nReused, TLSv1%.[23]", out.body)
    -- other settings (here: no verification) never get that session
    status, out = call({ url = srv.url .. "/", tls_verify = "false", tls_server_name = "localhost" })
    assert.equal(200, status, cjson.encode(out))
    assert.matches("\nNew, TLSv1%.[23]", out.body)
  end)

  it("refuses an unknown CA and a certificate naming another host, saying which", function()
    -- no tls: the system store, which does not know the spec's CA
    local status, out = call({ url = srv.url .. "/" })
    assert.equal(502, status)
    assert.equal("TLS handshake failed: certificate verify failed: unable to get local issuer "
                 .. "certificate (unknown CA: set tls.ca to the CA that signed the server's "
                 .. "certificate)", out.error)
    status, out = call({ url = srv.url .. "/", tls_ca = pki.other_ca })
    assert.equal(502, status)
    assert.matches("^TLS handshake failed: certificate verify failed: unable to get local issuer",
                   out.error)
    status, out = call({ url = srv.url .. "/", tls_ca = pki.ca, tls_server_name = "api.example" })
    assert.equal(502, status)
    assert.matches("^TLS handshake failed: certificate verify failed: hostname mismatch %(the "
                   .. "certificate does not name this host", out.error)
    -- verify=false: an explicit opt-out, logged once as a warning
    status, out = call({ url = srv.url .. "/", tls_verify = "false" })
    assert.equal(200, status, cjson.encode(out))
    status = call({ url = srv.url .. "/", tls_verify = "false" })
    assert.equal(200, status)
    -- the context is built once per worker: one warning for both calls
    assert.equal(1, proc.count(gw:log(), "TLS: verify is false"))
    still_serving()
  end)

  it("mTLS: a server that wants a client certificate gets tls.cert/tls.key; without them "
     .. "the error says so", function()
    local status, out = call({ url = msrv.url .. "/", tls_ca = pki.ca, tls_cert = pki.client_cert,
                               tls_key = pki.client_key })
    assert.equal(200, status, cjson.encode(out))
    assert.matches("CN ?= ?moongate%-spec", out.body) -- s_server shows the peer certificate
    status, out = call({ url = msrv.url .. "/", tls_ca = pki.ca })
    assert.equal(502, status)
    assert.matches("^TLS [a-z]+ failed: [^\n]*certificate[^\n]*%(the server wants a client "
                   .. "certificate it trusts: set tls%.cert and tls%.key%)$", out.error)
    still_serving()
  end)

  it("names a plain HTTP server on an https:// URL, and a handshake that never ends", function()
    local status, out = call({ url = mock.url("/x"):gsub("^http:", "https:"), tls_ca = pki.ca })
    assert.equal(502, status)
    assert.equal("TLS handshake failed: the server answered in plain HTTP (an http:// endpoint "
                 .. "given as https://?)", out.error)
    -- accepts TCP (the kernel's backlog) and never answers
    local silent = assert(socket.bind("127.0.0.1", 0))
    local _, port = silent:getsockname()
    local t0 = gettime()
    status, out = call({ url = "https://127.0.0.1:" .. port .. "/", tls_ca = pki.ca,
                         timeout_ms = 400 })
    local took = gettime() - t0
    silent:close()
    assert.equal(502, status)
    assert.matches("^TLS handshake timeout", out.error)
    assert.is_true(took >= 0.35 and took < 3, "took " .. took)
    still_serving()
  end)

  it("names a TLS file that cannot be used; a caller's mistake in tls raises", function()
    local status, out = call({ url = srv.url .. "/", tls_ca = pki.dir .. "/nope.pem" })
    assert.equal(502, status)
    assert.equal("tls.ca: cannot read " .. pki.dir .. "/nope.pem: No such file or directory",
                 out.error)
    status, out = call({ url = srv.url .. "/", tls_ca = pki.ca, tls_cert = pki.client_cert,
                         tls_key = pki.server_key })
    assert.equal(502, status)
    assert.matches("^tls%.key: [^ ]+server%-key%.pem does not match the certificate", out.error)
    for mistake, want in pairs({
      tls_key = "tls.cafile is not a TLS setting",
      tls_pair = "tls.cert and tls.key go together",
      tls_type = "tls must be a table",
    }) do
      status, out = call({ mistake = mistake })
      assert.equal(200, status)
      assert.is_true(out.raised, mistake)
      assert.matches(want, out.error, 1, true)
    end
    still_serving()
  end)

  it("keeps an https:// connection alive across calls (one TLS handshake for several)",
     function()
    local e = etcd_helper.start({ tls = pki })
    local ok, err = pcall(function()
      local status, out = call({ url = e.url .. "/version", tls_ca = pki.ca, n = 5 })
      assert.equal(200, status, cjson.encode(out))
      assert.equal(200, out.status)
      assert.matches('"etcdserver"', out.body)
      -- the worker holds one connection to etcd: the five calls shared it
      local rc, ss = proc.run({ "ss", "-tnpH", "state", "established",
                                "dst", "127.0.0.1:" .. e.client_port })
      assert.equal(0, rc, ss)
      local mine = { [gw.pid] = true }
      for _, p in ipairs(proc.descendants(gw.pid)) do
        mine[p] = true
      end
      local n = 0
      for pid in ss:gmatch("pid=(%d+)") do
        if mine[tonumber(pid)] then
          n = n + 1
        end
      end
      assert.equal(1, n, ss)
    end)
    e:stop()
    proc.cleanup(e.dir)
    assert(ok, err)
    still_serving()
  end)
end)
