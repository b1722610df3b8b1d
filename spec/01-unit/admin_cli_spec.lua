-- `moongate config dump|push` (bin/moongate, lua/moongate/admin_cli.lua)
-- against the Admin API handler (moongate.admin, writing to a real etcd),
-- served here over a plain loopback socket while the CLI runs in its own
-- process. spec/02-integration/admin_spec.lua runs the same round trip
-- against the control process.
local admin = require("moongate.admin")
local json_split = require("moongate.json_split")
local cjson = require("cjson")
local socket = require("socket")
local http = require("socket.http")
local ltn12 = require("ltn12")
local etcd = require("helpers.etcd")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local function request(t)
  local out = {}
  local headers = { ["content-type"] = "application/json",
                    ["content-length"] = t.body and #t.body or nil }
  local ok, code = http.request({
    url = t.url, method = t.method, headers = headers,
    source = t.body and ltn12.source.string(t.body) or nil,
    sink = ltn12.sink.table(out),
  })
  if not ok then
    return nil, tostring(code)
  end
  return { status = code, body = table.concat(out) }
end

-- Serves api on server (one request a connection) until pid exits;
-- returns the requests seen ("METHOD path").
local function serve_until(server, api, pid)
  local seen = {}
  server:settimeout(0.05)
  local deadline = proc.now() + 30
  while proc.alive(pid) and proc.now() < deadline do
    local c = server:accept()
    if c then
      c:settimeout(5)
      local line = c:receive("*l")
      local method, target = line:match("^(%u+) (%S+)")
      local headers = {}
      while true do
        local h = c:receive("*l")
        if not h or h == "" then
          break
        end
        local k, v = h:match("^([^:]+):%s*(.*)$")
        headers[k:lower()] = v
      end
      local body = headers["content-length"] and c:receive(tonumber(headers["content-length"]))
      local path, query = target:match("^([^?]*)%??(.*)$")
      seen[#seen + 1] = method .. " " .. path
      local status, rbody, rh = api:handle({
        method = method, path = path, query = query,
        header = function(name) return headers[name:lower()] end,
        body = function() return body end,
      })
      local out = { "HTTP/1.1 " .. status .. " X", "Connection: close",
                    "Content-Length: " .. #rbody }
      for k, v in pairs(rh) do
        out[#out + 1] = k .. ": " .. v
      end
      c:send(table.concat(out, "\r\n") .. "\r\n\r\n" .. rbody)
      c:close()
    end
  end
  return seen
end

local ROUTES = [[{
  "upstreams": [{"id": "u1", "targets": [{"host": "127.0.0.1", "port": 9001}]}],
  "routes": [{"id": "r1", "paths": ["/r1"], "upstream": "u1", "policies": []},
             {"id": "r2", "paths": ["/r2/*"], "upstream": "u1",
              "policies": [{"name": "sb-tag", "conf": {"tag": "x"}}]}],
  "consumers": [{"id": "alice", "credentials": {"key-auth": {"key": "k1"}}}],
  "global_policies": [{"name": "cors", "conf": {"origins": ["*"]}}]
}]]

describe("moongate config dump|push", function()
  local e, dir, port, server, api, doc, conf

  setup(function()
    e = etcd.start()
    dir = proc.tmpdir()
    port = ports.free()
    server = assert(socket.bind("127.0.0.1", port))
    conf = dir .. "/moongate.json"
    proc.write_file(conf, cjson.encode({
      listen = { { address = "127.0.0.1:" .. ports.free() } },
      admin = { listen = "127.0.0.1:" .. port, api_key = "k" },
    }))
    doc = { version = 1, revision = 0, entities = {}, policies = {} }
    api = admin.new({ mode = "etcd", view = function() return doc end, api_key = "k",
                      etcd = { endpoints = { e.url }, prefix = "/cli" }, request = request })
  end)

  teardown(function()
    if server then
      server:close()
    end
    if e then
      e:stop()
    end
  end)

  -- runs bin/moongate config ARGS while serving the Admin API; returns
  -- its exit code, stdout, stderr and the requests it made
  local function cli_rc(...)
    local rcfile = dir .. "/cli.rc"
    local args = { ... }
    local words = {}
    for i, a in ipairs(args) do
      words[i] = proc.quote(a)
    end
    local line = "bin/moongate config " .. table.concat(words, " ") .. " >" .. proc.quote(dir .. "/cli.out")
                 .. " 2>" .. proc.quote(dir .. "/cli.err") .. "; echo $? >" .. proc.quote(rcfile)
    os.remove(rcfile)
    local pid = proc.spawn({ "sh", "-c", line })
    local seen = serve_until(server, api, pid)
    proc.wait_exit(pid, 10)
    return tonumber(proc.read_file(rcfile)), proc.read_file(dir .. "/cli.out") or "",
           proc.read_file(dir .. "/cli.err") or "", seen
  end

  it("push validates first: an invalid file writes nothing, errors name file and path", function()
    local bad = dir .. "/bad.json"
    proc.write_file(bad, '{"routes": [{"id": "x", "paths": ["nope"], "upstream": "zz"}]}')
    local rc, _, err, seen = cli_rc("push", bad, "-c", conf)
    assert.equal(1, rc)
    assert.matches(bad .. ": routes[0].paths[0]:", err, 1, true)
    assert.matches(bad .. ': routes[0].upstream: unknown upstream "zz"', err, 1, true)
    for _, s in ipairs(seen) do
      assert.is_nil(s:match("^PUT"), s)
    end
    assert.is_nil(e:get("/cli/routes/x"))
  end)

  it("push writes upstreams before routes, each as written; dump prints them back", function()
    -- a sandboxed policy the routes use, known to the Admin API only
    local src = 'return { schema = { type = "object", properties = { tag = { type = "string" } } } }'
    assert.equal(201, (api:handle({ method = "PUT", path = "/policies/sb-tag",
                                    header = function() return "k" end,
                                    body = function() return src end })))
    local file = dir .. "/routes.json"
    proc.write_file(file, ROUTES)
    local rc, out, err, seen = cli_rc("push", file, "-c", conf)
    assert.equal(0, rc, err)
    assert.equal("pushed 1 upstreams, 2 routes, 1 consumers, 1 global_policies\n", out)
    local puts = {}
    for _, s in ipairs(seen) do
      if s:match("^PUT") then
        puts[#puts + 1] = s
      end
    end
    assert.same({ "PUT /upstreams/u1", "PUT /routes/r1", "PUT /routes/r2", "PUT /consumers/alice",
                  "PUT /global_policies/cors" }, puts)
    assert.equal('{"id": "r1", "paths": ["/r1"], "upstream": "u1", "policies": []}',
                 e:get("/cli/routes/r1"))
    assert.equal('{"name": "cors", "conf": {"origins": ["*"]}}', e:get("/cli/global_policies/cors"))

    -- the control process's view catches up with etcd
    local split = json_split.split(ROUTES, { upstreams = true, routes = true, consumers = true,
                                             global_policies = true })
    doc = { version = 2, revision = e:revision(), entities = {}, policies = { ["sb-tag"] = src } }
    for kind, texts in pairs(split.elements) do
      doc.entities[kind] = {}
      for _, t in ipairs(texts) do
        local v = cjson.decode(t)
        doc.entities[kind][v.id or v.name] = t
      end
    end
    local drc, dumped, derr = cli_rc("dump", "-c", conf)
    assert.equal(0, drc, derr)
    assert.matches("not in routes.json: 1 policies", derr, 1, true)
    -- valid routes.json, same entities, texts kept ([] stays [])
    local a, b = cjson.decode(dumped), cjson.decode(ROUTES)
    assert.same(b, a)
    assert.matches('"policies": []', dumped, 1, true)
    -- and it pushes back unchanged
    local dfile = dir .. "/dumped.json"
    proc.write_file(dfile, dumped)
    rc, out = cli_rc("push", dfile, "-c", conf)
    assert.equal(0, rc)
    assert.equal("pushed 1 upstreams, 2 routes, 1 consumers, 1 global_policies\n", out)
  end)

  it("reports each refused write and exits 1; the wrong key is a 401", function()
    local wrong = dir .. "/wrong-key.json"
    proc.write_file(wrong, cjson.encode({
      listen = { { address = "127.0.0.1:" .. ports.free() } },
      admin = { listen = "127.0.0.1:" .. port, api_key = "nope" },
    }))
    local rc, _, err = cli_rc("dump", "-c", wrong)
    assert.equal(1, rc)
    assert.matches("401 invalid X-API-Key", err, 1, true)
  end)

  it("an Admin API that is not there: exit 1 with the address", function()
    local gone = dir .. "/gone.json"
    local p = ports.free()
    proc.write_file(gone, cjson.encode({ listen = { { address = "127.0.0.1:" .. ports.free() } },
                                         admin = { listen = "127.0.0.1:" .. p } }))
    local rc, out = proc.run({ "bin/moongate", "config", "dump", "-c", gone }, { stderr = true })
    assert.equal(1, rc)
    assert.matches("127.0.0.1:" .. p .. "/upstreams", out, 1, true)
    assert.matches("connection refused", out, 1, true)
    rc, out = proc.run({ "bin/moongate", "config", "push", "-c", gone }, { stderr = true })
    assert.equal(1, rc)
    assert.matches("expects a routes file", out, 1, true)
    rc, out = proc.run({ "bin/moongate", "config", "load" }, { stderr = true })
    assert.equal(1, rc)
    assert.matches("expects dump or push", out, 1, true)
  end)
end)
