-- moongate.admin: the Admin API's handler, called with plain request tables
-- (the runtime adapter, api:serve, is covered end to end by
-- spec/02-integration/admin_spec.lua). Writes go to a real etcd (its JSON
-- gateway, over luasocket's HTTP client here instead of mg.http.request,
-- which needs a request coroutine); what landed is read back with etcdctl.
local admin = require("moongate.admin")
local etcd_kv = require("moongate.etcd_kv")
local json_split = require("moongate.json_split")
local cjson = require("cjson")
local http = require("socket.http")
local ltn12 = require("ltn12")
local etcd = require("helpers.etcd")

-- mg.http.request's contract over luasocket (blocking)
local function request(t)
  local out = {}
  local headers = {}
  for k, v in pairs(t.headers or {}) do
    headers[k:lower()] = v
  end
  headers["content-length"] = t.body and #t.body or nil
  http.TIMEOUT = (t.timeout_ms or 5000) / 1000
  local ok, code, hdrs = http.request({
    url = t.url, method = t.method, headers = headers,
    source = t.body and ltn12.source.string(t.body) or nil,
    sink = ltn12.sink.table(out),
  })
  if not ok then
    return nil, tostring(code)
  end
  return { status = code, headers = hdrs, body = table.concat(out) }
end

local ROUTES = [[{
  "upstreams": [{"id": "u1", "targets": [{"host": "127.0.0.1", "port": 9001}]},
                {"id": "u2", "targets": [{"host": "127.0.0.1", "port": 9002}]}],
  "routes": [{"id": "b", "paths": ["/b/*"], "upstream": "u1"},
             {"id": "a", "paths": ["/a"], "upstream": "u2",
              "policies": [{"name": "request-headers", "conf": {"set": {"x-a": "1"}}}]},
             {"id": "c", "paths": ["/c"], "upstream": "u1"}],
  "consumers": [{"id": "alice", "credentials": {"key-auth": {"key": "k1"}}}],
  "global_policies": [{"name": "cors", "conf": {}}]
}]]

-- a config_doc-shaped doc, as the control process hands it out
local function doc_of(text, version, revision)
  local split = assert(json_split.split(text, { upstreams = true, routes = true, consumers = true }))
  return { version = version or 1, revision = revision, skeleton = split.skeleton,
           elements = split.elements }
end

local function req(method, path, opts)
  opts = opts or {}
  local path_only, query = path:match("^([^?]*)%??(.*)$")
  return {
    method = method, path = path_only, query = query,
    header = function(name)
      local h = opts.headers or { ["x-api-key"] = "secret" }
      return h[name:lower()]
    end,
    body = function()
      return opts.body
    end,
  }
end

local function call(api, method, path, opts)
  local status, body, headers = api:handle(req(method, path, opts))
  local ctype = headers["Content-Type"] or ""
  local decoded = ctype:find("json") and body ~= "" and cjson.decode(body) or body
  return status, decoded, headers, body
end

describe("admin: file mode", function()
  local doc = doc_of(ROUTES, 7)
  local api = admin.new({ mode = "file", view = function() return doc end, api_key = "secret",
                          routes_path = "/etc/moongate/routes.json" })

  it("asks for X-API-Key: 401 without or with a wrong one, compared in full", function()
    local s, b = call(api, "GET", "/routes", { headers = {} })
    assert.equal(401, s)
    assert.equal("X-API-Key required", b.error)
    s, b = call(api, "GET", "/routes", { headers = { ["x-api-key"] = "secreT" } })
    assert.equal(401, s)
    assert.equal("invalid X-API-Key", b.error)
    assert.equal(401, (call(api, "GET", "/routes", { headers = { ["x-api-key"] = "secret2" } })))
    assert.equal(401, (call(api, "GET", "/routes", { headers = { ["x-api-key"] = "" } })))
    -- before anything else: an unknown path does not tell a stranger it is unknown
    assert.equal(401, (call(api, "GET", "/nope", { headers = {} })))
    assert.is_true(admin.same_key("abc", "abc"))
    assert.is_false(admin.same_key("abd", "abc"))
    assert.is_false(admin.same_key("ab", "abc"))
    assert.is_false(admin.same_key("abcd", "abc"))
  end)

  it("lists each kind in the version's order, with total, limit and offset", function()
    local s, b, h = call(api, "GET", "/routes")
    assert.equal(200, s)
    assert.equal("7", h["X-Moongate-Version"])
    -- the file's order: it decides ties between routes
    assert.same({ "b", "a", "c" }, { b.items[1].id, b.items[2].id, b.items[3].id })
    assert.equal(3, b.total)
    assert.equal(100, b.limit)
    assert.equal(0, b.offset)
    -- the entity as written, policies and all
    assert.equal("request-headers", b.items[2].policies[1].name)
    s, b = call(api, "GET", "/upstreams")
    assert.equal(200, s)
    assert.same({ "u1", "u2" }, { b.items[1].id, b.items[2].id })
    s, b = call(api, "GET", "/consumers")
    assert.equal(200, s)
    assert.equal("alice", b.items[1].id)
    s, b = call(api, "GET", "/global_policies")
    assert.equal(200, s)
    assert.equal(1, b.total)
    assert.equal("cors", b.items[1].name)
    s, b = call(api, "GET", "/certificates")
    assert.equal(200, s)
    assert.same({ items = {}, total = 0, limit = 100, offset = 0 }, b)
    s, b = call(api, "GET", "/policies")
    assert.equal(200, s)
    assert.equal(0, b.total)
  end)

  it("pages with ?limit=&offset= and refuses bad numbers with the query path", function()
    local s, b = call(api, "GET", "/routes?limit=2")
    assert.equal(200, s)
    assert.equal(2, #b.items)
    assert.equal(3, b.total)
    assert.equal("a", b.items[2].id)
    s, b = call(api, "GET", "/routes?limit=2&offset=2")
    assert.equal(200, s)
    assert.equal(1, #b.items)
    assert.equal("c", b.items[1].id)
    s, b = call(api, "GET", "/routes?offset=9")
    assert.equal(200, s)
    assert.equal(0, #b.items)
    assert.equal(3, b.total)
    s, b = call(api, "GET", "/routes?limit=0")
    assert.equal(200, s)
    assert.equal(0, #b.items)
    for _, q in ipairs({ "limit=-1", "limit=x", "limit=1.5", "limit=1001", "offset=-2" }) do
      s, b = call(api, "GET", "/routes?" .. q)
      assert.equal(400, s, q)
      assert.equal("query." .. q:match("^(%a+)"), b.path, q)
    end
    s, b = call(api, "GET", "/routes?limit=1000")
    assert.equal(200, s)
    assert.equal(1000, b.limit)
  end)

  it("reads one entity as written; 404 with a JSON body for unknown ids and paths", function()
    local s, b, h, raw = call(api, "GET", "/routes/a")
    assert.equal(200, s)
    assert.equal("7", h["X-Moongate-Version"])
    assert.equal("a", b.id)
    assert.matches('"policies": %[', raw)
    s, b = call(api, "GET", "/global_policies/cors")
    assert.equal(200, s)
    assert.same({}, b.conf)
    s, b = call(api, "GET", "/routes/zz")
    assert.equal(404, s)
    assert.equal("routes.zz", b.path)
    assert.equal('no routes "zz"', b.error)
    for _, p in ipairs({ "/nope", "/routes/a/b", "/routes/a%2Fb", "/policies/a.b", "/x/y" }) do
      s, b = call(api, "GET", p)
      assert.equal(404, s, p)
      assert.matches("not found", b.error, 1, true)
    end
  end)

  it("answers writes with 405 saying the config is file-backed", function()
    local s, b, h = call(api, "PUT", "/routes/a", { body = '{"paths": ["/x"]}' })
    assert.equal(405, s)
    assert.equal("GET", h.Allow)
    assert.matches("file-backed", b.error, 1, true)
    assert.matches("/etc/moongate/routes.json", b.error, 1, true)
    s = call(api, "DELETE", "/upstreams/u1")
    assert.equal(405, s)
    s = call(api, "PUT", "/policies/p", { body = "return {}" })
    assert.equal(405, s)
  end)

  it("405 with Allow for a method a path does not take", function()
    local s, _, h = call(api, "POST", "/routes")
    assert.equal(405, s)
    assert.equal("GET", h.Allow)
    s, _, h = call(api, "PATCH", "/routes/a")
    assert.equal(405, s)
    assert.equal("GET, PUT, DELETE", h.Allow)
  end)

  it("GET / names the mode and the version in force", function()
    local s, b = call(api, "GET", "/")
    assert.equal(200, s)
    assert.equal("file", b.mode)
    assert.equal(7, b.version)
  end)

  it("from_node: the node's mode, key and routes file", function()
    local config = require("moongate.config")
    local node = assert(config.validate_node({ admin = { api_key = "nk" },
                                               config_source = { path = "r.json" } },
                                             "/etc/mg/moongate.json"))
    local a = admin.from_node(node, function() return doc end)
    assert.equal("file", a.mode)
    assert.equal(401, (call(a, "GET", "/routes")))
    local s, b = call(a, "PUT", "/routes/a", { headers = { ["x-api-key"] = "nk" }, body = "{}" })
    assert.equal(405, s)
    assert.matches("/etc/mg/r.json", b.error, 1, true)
  end)

  it("asks for no key when none is configured (a loopback listener)", function()
    local open = admin.new({ mode = "file", view = function() return doc end })
    assert.equal(200, (call(open, "GET", "/routes", { headers = {} })))
  end)
end)

describe("admin: etcd mode", function()
  local e, api, doc
  local P = "/mg-spec"

  setup(function()
    e = etcd.start()
  end)

  teardown(function()
    if e then
      e:stop()
    end
  end)

  before_each(function()
    e:delete_prefix(P .. "/")
    -- etcd holds what the view shows (the control process's view comes
    -- from it); seeded through our client, checked with etcdctl
    local kv = etcd_kv.new({ endpoints = { e.url }, request = request })
    local v = cjson.decode(ROUTES)
    local rev
    for _, kind in ipairs({ "upstreams", "routes", "consumers" }) do
      for _, x in ipairs(v[kind]) do
        rev = assert(kv:put(P .. "/" .. kind .. "/" .. x.id, cjson.encode(x)))
      end
    end
    doc = doc_of(ROUTES, 3, rev)
    api = admin.new({ mode = "etcd", view = function() return doc end, api_key = "secret",
                      etcd = { endpoints = { e.url }, prefix = P }, request = request,
                      lua_path = {} })
  end)

  local ROUTE = '{"paths": ["/new/*"], "upstream": "u2", "methods": ["GET"], "policies": []}'

  it("PUT writes the entity to <prefix>/<kind>/<id> with its id, then GET sees it", function()
    local s, b, h = call(api, "PUT", "/routes/new", { body = ROUTE })
    assert.equal(201, s)
    assert.equal("new", b.id)
    local rev = tonumber(h["X-Moongate-Revision"])
    assert.truthy(rev and rev > doc.revision)
    local stored = e:get(P .. "/routes/new")
    assert.equal('{"id":"new","paths": ["/new/*"], "upstream": "u2", "methods": ["GET"], '
                 .. '"policies": []}', stored)
    -- read your writes, before the view has it
    s, b = call(api, "GET", "/routes/new")
    assert.equal(200, s)
    assert.same({}, b.policies)
    s, b = call(api, "GET", "/routes")
    assert.equal(200, s)
    assert.equal(4, b.total)
    -- after the version's own, those written since
    assert.same({ "b", "a", "c", "new" }, { b.items[1].id, b.items[2].id, b.items[3].id,
                                           b.items[4].id })
    -- again: it exists now, 200
    s = call(api, "PUT", "/routes/new", { body = '{"id": "new", "paths": ["/n2"]}' })
    assert.equal(200, s)
    assert.equal('{"id": "new", "paths": ["/n2"]}', e:get(P .. "/routes/new"))
  end)

  it("a doc keyed by id lists by id", function()
    doc = { version = 5, revision = 0, entities = { routes = {
      z = '{"id": "z"}', m = '{"id": "m"}', a = '{"id": "a"}' } } }
    local _, b = call(api, "GET", "/routes")
    assert.same({ "a", "m", "z" }, { b.items[1].id, b.items[2].id, b.items[3].id })
  end)

  it("the view catching up replaces what the write remembered", function()
    local _, _, h = call(api, "PUT", "/routes/new", { body = ROUTE })
    local rev = tonumber(h["X-Moongate-Revision"])
    -- another writer changed it after us; the control process's view shows theirs
    local text = ROUTES:gsub('"routes": %[', '"routes": [{"id": "new", "paths": ["/theirs"]},')
    doc = doc_of(text, 4, rev + 1)
    local s, b = call(api, "GET", "/routes/new")
    assert.equal(200, s)
    assert.same({ "/theirs" }, b.paths)
    assert.equal(0, next(api.pending.routes) and 1 or 0)
  end)

  it("DELETE removes the key; 404 for an unknown id; GET no longer shows it", function()
    local s, _, h = call(api, "DELETE", "/consumers/alice")
    assert.equal(204, s)
    assert.truthy(tonumber(h["X-Moongate-Revision"]))
    assert.is_nil(e:get(P .. "/consumers/alice"))
    assert.equal(404, (call(api, "GET", "/consumers/alice")))
    local _, b = call(api, "GET", "/consumers")
    assert.equal(0, b.total)
    s, b = call(api, "DELETE", "/consumers/bob")
    assert.equal(404, s)
    assert.equal("consumers.bob", b.path)
  end)

  it("400 with the JSON path for an invalid entity; nothing written", function()
    local s, b = call(api, "PUT", "/routes/bad", { body = '{"paths": ["nope"]}' })
    assert.equal(400, s)
    assert.equal("routes.bad.paths[0]", b.path)
    assert.truthy(b.error:find("/", 1, true))
    assert.is_nil(e:get(P .. "/routes/bad"))
    -- every error is listed
    s, b = call(api, "PUT", "/routes/bad", { body = '{"paths": ["x"], "methods": ["get"], "z": 1}' })
    assert.equal(400, s)
    assert.is_true(#b.errors >= 3)
    s, b = call(api, "PUT", "/upstreams/u9", { body = '{"targets": []}' })
    assert.equal(400, s)
    assert.equal("upstreams.u9.targets", b.path)
    s, b = call(api, "PUT", "/upstreams/u9",
                { body = '{"targets": [{"host": "h", "port": 1}], "balancer": "hash"}' })
    assert.equal(400, s)
    assert.equal("upstreams.u9.balancer", b.path)
    s, b = call(api, "PUT", "/consumers/c9", { body = '{"credentials": 5}' })
    assert.equal(400, s)
    assert.equal("consumers.c9.credentials", b.path)
    s, b = call(api, "PUT", "/routes/a", { body = '{"paths": ["/a"], "policies": '
                                                   .. '[{"name": "cors", "conf": {"bogus": 1}}]}' })
    assert.equal(400, s)
    assert.equal("routes.a.policies[0].conf.bogus", b.path)
    s, b = call(api, "PUT", "/routes/a", { body = '{"policies": [{"name": "no-such"}]}' })
    assert.equal(400, s)
    assert.equal("routes.a.policies[0].name", b.path)
    s, b = call(api, "PUT", "/global_policies/cors", { body = '{"conf": {"bogus": 1}}' })
    assert.equal(400, s)
    assert.equal("global_policies.cors.conf.bogus", b.path)
    s, b = call(api, "PUT", "/global_policies/cors", { body = '{"name": "key-auth"}' })
    assert.equal(400, s)
    assert.equal("global_policies.cors.name", b.path)
  end)

  it("400 for a body that is not JSON or not an object, or an id that differs", function()
    local s, b = call(api, "PUT", "/routes/x", { body = '{"paths": [' })
    assert.equal(400, s)
    assert.equal("routes.x", b.path) -- as the etcd source logs it (config_check.entity)
    assert.matches("invalid JSON: ", b.error, 1, true)
    s, b = call(api, "PUT", "/routes/x", { body = '["/x"]' })
    assert.equal(400, s)
    assert.equal("routes.x", b.path)
    s, b = call(api, "PUT", "/routes/x", { body = '{"id": "y"}' })
    assert.equal(400, s)
    assert.equal("routes.x.id", b.path)
    s, b = call(api, "PUT", "/routes/x", { body = "" })
    assert.equal(400, s)
    assert.equal("a body is required", b.error)
    s, b = call(api, "PUT", "/routes/x", { body = string.rep(" ", 1024 * 1024 + 1) })
    assert.equal(413, s)
    assert.matches("larger than", b.error, 1, true)
    assert.is_nil(e:get(P .. "/routes/x"))
  end)

  it("a route naming an unknown upstream: 400 at routes.<id>.upstream", function()
    local s, b = call(api, "PUT", "/routes/r9", { body = '{"paths": ["/r9"], "upstream": "nope"}' })
    assert.equal(400, s)
    assert.equal("routes.r9.upstream", b.path)
    assert.equal('unknown upstream "nope"', b.error)
    -- an upstream written just before (not yet in the view) counts
    assert.equal(201, (call(api, "PUT", "/upstreams/nope",
                            { body = '{"targets": [{"host": "127.0.0.1", "port": 1}]}' })))
    assert.equal(201, (call(api, "PUT", "/routes/r9", { body = '{"paths": ["/r9"], "upstream": "nope"}' })))
  end)

  it("a route whose upstream is deleted while it is written: 409, not a dangling reference", function()
    -- the view says u1 exists; etcd no longer has it (another writer)
    e:delete(P .. "/upstreams/u1")
    local s, b = call(api, "PUT", "/routes/r1", { body = '{"paths": ["/r1"], "upstream": "u1"}' })
    assert.equal(409, s)
    assert.matches("deleted meanwhile", b.error, 1, true)
    assert.is_nil(e:get(P .. "/routes/r1"))
  end)

  it("deleting an upstream a route uses: 409 naming the routes", function()
    local s, b = call(api, "DELETE", "/upstreams/u1")
    assert.equal(409, s)
    assert.same({ "routes.b", "routes.c" }, b.used_by)
    assert.equal("upstreams.u1", b.path)
    assert.truthy(e:get(P .. "/upstreams/u1"))
    -- once no route uses it, it goes
    assert.equal(200, (call(api, "PUT", "/routes/b", { body = '{"paths": ["/b"], "upstream": "u2"}' })))
    assert.equal(200, (call(api, "PUT", "/routes/c", { body = '{"paths": ["/c"]}' })))
    s = call(api, "DELETE", "/upstreams/u1")
    assert.equal(204, s)
    assert.is_nil(e:get(P .. "/upstreams/u1"))
  end)

  it("deleting an upstream while another writer adds a route: 409 (etcd txn)", function()
    e:put(P .. "/upstreams/u9", '{"id":"u9","targets":[{"host":"127.0.0.1","port":9001}]}')
    doc = doc_of(ROUTES:gsub('"upstreams": %[', '"upstreams": [{"id": "u9", "targets": '
                             .. '[{"host": "127.0.0.1", "port": 9001}]},'), 4, e:revision())
    -- a route naming u9 lands in etcd after the view's revision
    e:put(P .. "/routes/late", '{"id":"late","paths":["/late"],"upstream":"u9"}')
    local s, b = call(api, "DELETE", "/upstreams/u9")
    assert.equal(409, s)
    assert.matches("routes changed", b.error, 1, true)
    assert.truthy(e:get(P .. "/upstreams/u9"))
  end)

  it("policies: Lua source in and out; syntax errors and failing loads are 400", function()
    local src = 'return { name = "sb-x", priority = 5, schema = { type = "object" },\n'
                .. '  access = function(conf, ctx) end }\n'
    local s, b, h = call(api, "PUT", "/policies/sb-x", { body = src })
    assert.equal(201, s)
    assert.equal(src, b)
    assert.matches("text/plain", h["Content-Type"], 1, true)
    assert.equal(src, e:get(P .. "/policies/sb-x"):gsub("$", "\n"):sub(1, #src))
    s, b = call(api, "GET", "/policies/sb-x")
    assert.equal(200, s)
    assert.equal(src, b)
    s, b = call(api, "GET", "/policies")
    assert.equal(200, s)
    assert.equal(1, b.total)
    assert.same({ name = "sb-x", source = src }, b.items[1])

    s, b = call(api, "PUT", "/policies/sb-y", { body = "return {" })
    assert.equal(400, s)
    assert.equal("policies.sb-y", b.path)
    assert.matches("policies/sb-y:1:", b.error, 1, true)
    s, b = call(api, "PUT", "/policies/sb-y", { body = 'error("boom")' })
    assert.equal(400, s)
    assert.matches("boom", b.error, 1, true)
    s, b = call(api, "PUT", "/policies/sb-y", { body = 'return { access = 5 }' })
    assert.equal(400, s)
    assert.matches("not a function", b.error, 1, true)
    s, b = call(api, "PUT", "/policies/sb-y", { body = 'while true do end' })
    assert.equal(400, s)
    assert.matches("instruction", b.error, 1, true)
    s, b = call(api, "PUT", "/policies/cors", { body = 'return {}' })
    assert.equal(400, s)
    assert.matches("a policy file named", b.error, 1, true)
    assert.is_nil(e:get(P .. "/policies/sb-y"))
    assert.is_nil(e:get(P .. "/policies/cors"))
  end)

  it("a route may use a sandboxed policy written before it; the policy then cannot go", function()
    local src = 'return { schema = { type = "object", additionalProperties = false,\n'
                .. '  properties = { n = { type = "integer" } } } }'
    assert.equal(201, (call(api, "PUT", "/policies/sb-n", { body = src })))
    local s, b = call(api, "PUT", "/routes/p", { body = '{"paths": ["/p"], "policies": '
                                                        .. '[{"name": "sb-n", "conf": {"n": "x"}}]}' })
    assert.equal(400, s)
    assert.equal("routes.p.policies[0].conf.n", b.path)
    assert.equal(201, (call(api, "PUT", "/routes/p", { body = '{"paths": ["/p"], "policies": '
                                                             .. '[{"name": "sb-n", "conf": {"n": 1}}]}' })))
    -- a new version whose schema the route no longer meets
    s, b = call(api, "PUT", "/policies/sb-n", { body = 'return { schema = { type = "object", '
                                                       .. 'additionalProperties = false } }' })
    assert.equal(400, s)
    assert.equal("routes.p.policies[0].conf.n", b.path)
    s, b = call(api, "DELETE", "/policies/sb-n")
    assert.equal(409, s)
    assert.same({ "routes.p" }, b.used_by)
  end)

  it("certificates: shape only (PEM strings), stored as given", function()
    local cert = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n"
    local key = "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\\n"
    local s, b = call(api, "PUT", "/certificates/c1",
                      { body = '{"cert": "' .. cert .. '", "key": "' .. key .. '", "snis": ["a.example"]}' })
    assert.equal(201, s, cjson.encode(b))
    assert.equal("c1", b.id)
    s, b = call(api, "PUT", "/certificates/c2", { body = '{"cert": "x", "key": "' .. key .. '"}' })
    assert.equal(400, s)
    assert.equal("certificates.c2.cert", b.path)
    s, b = call(api, "PUT", "/certificates/c2", { body = '{"cert": "' .. cert .. '"}' })
    assert.equal(400, s)
    assert.equal("certificates.c2.key", b.path)
  end)

  it("503 with the reason when etcd cannot be reached; nothing remembered", function()
    local down = admin.new({ mode = "etcd", view = function() return doc end,
                             etcd = { endpoints = { "127.0.0.1:1" }, prefix = P },
                             request = request })
    local s, b = call(down, "PUT", "/consumers/z", { body = "{}" })
    assert.equal(503, s)
    assert.matches("etcd", b.error, 1, true)
    assert.equal(404, (call(down, "GET", "/consumers/z")))
  end)
end)

describe("admin: etcd with auth", function()
  local e

  setup(function()
    e = etcd.start()
    assert(e:ctl({ "user", "add", "root:pw", "--interactive=false" }) == 0)
    assert(e:ctl({ "auth", "enable" }) == 0)
  end)

  teardown(function()
    if e then
      e:stop()
    end
  end)

  local function stored(key)
    local rc, out = e:ctl({ "--user", "root:pw", "get", "--print-value-only", key })
    assert.equal(0, rc, out)
    return (out:gsub("\n$", ""))
  end

  it("writes with a token for user/password, and gets a new one when etcd drops it", function()
    local doc = { version = 1, revision = 0, entities = {} }
    local api = admin.new({ mode = "etcd", view = function() return doc end,
                            etcd = { endpoints = { e.url }, prefix = "/auth", user = "root",
                                     password = "pw" }, request = request })
    assert.equal(201, (call(api, "PUT", "/consumers/a", { body = "{}" })))
    assert.equal('{"id":"a"}', stored("/auth/consumers/a"))
    local token = api.kv.token
    assert.truthy(token)
    -- turning auth off and on drops every token (as a restart does)
    assert(e:ctl({ "--user", "root:pw", "auth", "disable" }) == 0)
    assert(e:ctl({ "auth", "enable" }) == 0)
    assert.equal(201, (call(api, "PUT", "/consumers/b", { body = "{}" })))
    assert.equal('{"id":"b"}', stored("/auth/consumers/b"))
    assert.are_not.equal(token, api.kv.token)
  end)

  it("without credentials or with a wrong password: 502 with etcd's reason, nothing written", function()
    local doc = { version = 1, revision = 0, entities = {} }
    for _, cred in ipairs({ {}, { user = "root", password = "nope" } }) do
      local api = admin.new({ mode = "etcd", view = function() return doc end,
                              etcd = { endpoints = { e.url }, prefix = "/auth", user = cred.user,
                                       password = cred.password }, request = request })
      local s, b = call(api, "PUT", "/consumers/c", { body = "{}" })
      assert.equal(502, s)
      assert.matches("etcd: ", b.error, 1, true)
    end
    assert.equal("", stored("/auth/consumers/c"))
  end)
end)

describe("etcd_kv", function()
  it("base64 as etcd's gateway takes it", function()
    assert.equal("", etcd_kv.b64(""))
    assert.equal("Zg==", etcd_kv.b64("f"))
    assert.equal("Zm8=", etcd_kv.b64("fo"))
    assert.equal("Zm9v", etcd_kv.b64("foo"))
    assert.equal("/w==", etcd_kv.b64("\255"))
    assert.equal("L21vb25nYXRlL3JvdXRlcy9h", etcd_kv.b64("/moongate/routes/a"))
  end)

  it("prefix_end: the key after every key with the prefix", function()
    assert.equal("/a0", etcd_kv.prefix_end("/a/"))
    assert.equal("b", etcd_kv.prefix_end("a\255"))
  end)
end)
