-- moongate.etcd_source on what a real etcd sends: range bodies and watch
-- streams fetched with curl (a client apart from the gateway's), values
-- written with etcdctl.
local etcd = require("helpers.etcd")
local proc = require("helpers.proc")
local etcd_source = require("moongate.etcd_source")
local cjson = require("cjson")

local P = "/mg"

local UP = '{"targets":[{"host":"127.0.0.1","port":9001}]}'
local function route(path, upstream, extra)
  return '{"paths":["' .. path .. '"],"upstream":"' .. (upstream or "u1") .. '"' .. (extra or "")
         .. "}"
end

local POLICY = [[
return { name = "hello", priority = 10, version = "1",
         schema = { type = "object", properties = { who = { type = "string" } } },
         access = function(conf, ctx) return 200, "hello " .. (conf.who or "?") end }
]]

describe("etcd_source", function()
  local e
  local logs
  local src

  local function curl(path, body, max_time)
    local rc, out = proc.run({ "curl", "-sN", "--max-time", tostring(max_time or 5), "-X", "POST",
                               e.url .. path, "-d", body })
    assert(rc == 0 or rc == 28, "curl " .. path .. ": " .. tostring(rc)) -- 28: --max-time
    return out
  end

  local function range_body()
    return curl("/v3/kv/range", cjson.encode({ key = src.key_b64, range_end = src.end_b64 }))
  end

  -- the watch stream from revision `from` on, as etcd replays it
  local function watch_body(from)
    return curl("/v3/watch", cjson.encode({ create_request = {
      key = src.key_b64, range_end = src.end_b64, start_revision = tostring(from) } }), 0.5)
  end

  local function new_src()
    logs = {}
    src = etcd_source.new({ prefix = P, log = function(level, msg)
      logs[#logs + 1] = level .. ": " .. msg
    end })
    return src
  end

  local function logged(pattern)
    for _, l in ipairs(logs) do
      if l:find(pattern, 1, true) then
        return l
      end
    end
    return nil
  end

  local function ids(doc, kind)
    local out = {}
    for i, t in ipairs(doc.elements[kind]) do
      out[i] = cjson.decode(t).id
    end
    return out
  end

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
    new_src()
  end)

  it("watches the range [prefix/, prefix0), base64 as etcd takes it", function()
    local s = etcd_source.new({ prefix = "/mg", log = function() end })
    assert.equal("L21nLw==", s.key_b64) -- "/mg/"
    assert.equal("L21nMA==", s.end_b64) -- "/mg0"
    assert.equal("/mg/", etcd_source.b64_decode(s.key_b64))
  end)

  it("decodes base64 through OpenSSL, and refuses what is not base64", function()
    assert.equal("", etcd_source.b64_decode(""))
    assert.equal("a", etcd_source.b64_decode("YQ=="))
    assert.equal("ab", etcd_source.b64_decode("YWI="))
    assert.equal("abc", etcd_source.b64_decode("YWJj"))
    local big = string.rep("0123456789", 20000)
    assert.equal(big, etcd_source.b64_decode(etcd_source.b64_encode(big)))
    assert.is_nil(etcd_source.b64_decode("YWJ"))
    assert.is_nil(etcd_source.b64_decode("Y!Jj"))
    -- '=' only as the last one or two characters (OpenSSL alone decodes these)
    assert.is_nil(etcd_source.b64_decode("===="))
    assert.is_nil(etcd_source.b64_decode("Y==="))
    assert.is_nil(etcd_source.b64_decode("YW=j"))
    assert.is_nil(etcd_source.b64_decode("YQ=A"))
    assert.is_nil(etcd_source.b64_decode("YQ==YWJj"))
  end)

  it("reads etcd's range bodies without cjson, as cjson reads them; other forms through cjson",
     function()
    -- empty, then keys with values, an empty value, a big value
    local bodies = { range_body() }
    e:put(P .. "/routes/a", route("/a"))
    e:put(P .. "/upstreams/u1", UP)
    curl("/v3/kv/put", cjson.encode({ key = etcd_source.b64_encode(P .. "/routes/empty") }))
    e:put(P .. "/policies/big", "return {} --" .. string.rep("x", 70000))
    bodies[2] = range_body()
    local function via_cjson(body)
      local r = cjson.decode(body)
      local keys, values = {}, {}
      for i, kv in ipairs(r.kvs or {}) do
        keys[i] = etcd_source.b64_decode(kv.key)
        values[i] = kv.value and etcd_source.b64_decode(kv.value) or ""
      end
      return r.header.revision, keys, values
    end
    for _, body in ipairs(bodies) do
      local rev, keys, values = etcd_source.scan_range(body)
      assert.is_string(rev, body)
      assert.same({ via_cjson(body) }, { rev, keys, values })
    end
    assert.equal(4, #select(2, etcd_source.scan_range(bodies[2])))
    -- the same JSON written otherwise: not scanned, read the same by range()
    local spaced = bodies[2]:gsub(",", ", ")
    local escaped = bodies[2]:gsub('"key"', '"k\\u0065y"')
    for _, other in ipairs({ spaced, escaped, bodies[2]:gsub("%]", "],\"x\":{}") }) do
      assert.is_nil(etcd_source.scan_range(other))
    end
    local s1, s2 = new_src(), new_src()
    assert.equal(s1:range(bodies[2]), s2:range(spaced))
    assert.same(s1:doc(), s2:doc())
    assert.equal(2, #s1:doc().elements.routes + #s1:doc().elements.upstreams)
  end)

  it("reads a range: entities in key order, ids from the keys, global policies, policies",
     function()
    e:put(P .. "/upstreams/u1", UP)
    e:put(P .. "/routes/b", route("/b"))
    e:put(P .. "/routes/a", route("/a", "u1", ',"id":"a"'))
    e:put(P .. "/consumers/alice", '{"credentials":{"key-auth":{"key":"k"}}}')
    e:put(P .. "/global_policies/request-headers", '{"conf":{}}') -- its name: the key's
    e:put(P .. "/policies/hello", POLICY)
    local rev = e:put("/other/x", "not ours")
    local got, changed = src:range(range_body())
    assert.equal(rev, got)
    assert.is_true(changed)
    local doc = src:doc()
    assert.same({ "u1" }, ids(doc, "upstreams"))
    assert.same({ "a", "b" }, ids(doc, "routes"))
    assert.same({ "alice" }, ids(doc, "consumers"))
    assert.same({ global_policies = { { name = "request-headers", conf = {} } } },
                cjson.decode(doc.skeleton))
    assert.matches('^{"name":"request%-headers",', doc.skeleton:match("%[(.*)%]"))
    assert.equal(POLICY, doc.policies.hello)
    assert.equal(rev, doc.revision)
    assert.same({}, logs)
    -- the same range again: nothing changed
    local _, again = src:range(range_body())
    assert.is_false(again)
  end)

  for _, many in ipairs({ false, true }) do
  it("refuses invalid values with the key named, and keeps the rest"
     .. (many and " (many routes: checked together)" or ""), function()
    e:put(P .. "/upstreams/u1", UP)
    local good = { "good" }
    if many then
      local ops = {}
      for i = 1, 20 do
        ops[i] = ("put %s/routes/m%02d %s"):format(P, i, route("/m" .. i))
        good[#good + 1] = ("m%02d"):format(i)
      end
      e:ctl({ "txn" }, "\n" .. table.concat(ops, "\n") .. "\n\n\n")
    end
    e:put(P .. "/routes/good", route("/good"))
    e:put(P .. "/routes/badjson", "{not json")
    e:put(P .. "/routes/badschema", '{"paths":["no-slash"]}')
    e:put(P .. "/routes/orphan", route("/o", "nope"))
    e:put(P .. "/routes/otherid", '{"id":"x","paths":["/x"]}')
    e:put(P .. "/routes/array", "[1]")
    -- a global policy is stored under its name (as the Admin API keys it)
    e:put(P .. "/global_policies/1", '{"name":"request-headers","conf":{}}')
    e:put(P .. "/secrets/s", "{}")
    e:put(P .. "/certificates/c", "{}")
    src:range(range_body())
    assert.same(good, ids(src:doc(), "routes"))
    assert.truthy(logged("/mg/routes/badjson: refused: routes.badjson: invalid JSON"))
    assert.truthy(logged("/mg/routes/badschema: refused: routes.badschema.paths[0]: "))
    assert.truthy(logged('/mg/routes/orphan: refused: routes.orphan.upstream: unknown upstream '
                         .. '"nope"'))
    assert.truthy(logged('/mg/routes/otherid: refused: routes.otherid.id: id "x" differs from '
                         .. '"otherid", the id it is stored under'))
    assert.truthy(logged("/mg/routes/array: refused: routes.array: expected a JSON object"))
    assert.truthy(logged('/mg/global_policies/1: refused: global_policies.1.name: name '
                         .. '"request-headers" differs from "1"'))
    assert.truthy(logged('/mg/secrets/s: ignored (unknown kind "secrets")'))
    assert.truthy(logged("/mg/certificates/c: ignored (certificates are not supported"))
    assert.equal(8, #logs)
  end)
  end

  it("applies watch events cut anywhere, keeping a refused key's previous value", function()
    local rev0 = e:put(P .. "/upstreams/u1", UP)
    e:put(P .. "/routes/r1", route("/one"))
    assert.equal(rev0 + 1, (src:range(range_body())))
    e:put(P .. "/routes/r2", route("/two"))
    e:put(P .. "/routes/r1", route("/one", "missing")) -- refused: r1 stays on /one
    e:put(P .. "/routes/r3", "{oops")
    e:put(P .. "/upstreams/u2", UP)
    local last = e:delete(P .. "/routes/r2")
    local stream = watch_body(rev0 + 2)
    assert.truthy(stream:find("\n", 1, true))
    -- one byte at a time: the same outcome as whole lines
    local rev
    for i = 1, #stream do
      local r = src:watch(stream:sub(i, i))
      assert.is_not.equal("rerange", r)
      rev = r or rev
    end
    assert.equal(last, rev)
    local doc = src:doc()
    assert.same({ "r1" }, ids(doc, "routes"))
    assert.equal("/one", cjson.decode(doc.elements.routes[1]).paths[1])
    assert.same({ "u1", "u2" }, ids(doc, "upstreams"))
    assert.truthy(logged('/mg/routes/r1: refused: routes.r1.upstream: unknown upstream '
                         .. '"missing"; the previous value stays'))
    assert.truthy(logged("/mg/routes/r3: refused: routes.r3: invalid JSON"))
  end)

  it("refuses an upstream with a setting this build does not have; the previous value stays",
     function()
    local rev0 = e:put(P .. "/upstreams/u1", UP)
    src:range(range_body())
    local ll = cjson.decode(UP)
    ll.balancer = "least_conn"
    e:put(P .. "/upstreams/u1", cjson.encode(ll))
    src:watch(watch_body(rev0 + 1))
    local up = cjson.decode(src:doc().elements.upstreams[1])
    assert.is_nil(up.balancer)
    assert.truthy(logged("/mg/upstreams/u1: refused: upstreams.u1.balancer: only round_robin is "
                         .. "supported"))
  end)

  it("accepts an upstream and the route naming it in one batch, in either order", function()
    local rev0 = e:revision()
    src:range(range_body())
    e:ctl({ "txn" }, table.concat({
      "", -- no compares
      "put " .. P .. "/routes/r " .. route("/r", "late"),
      "put " .. P .. "/upstreams/late " .. UP,
      "", "", "" }, "\n"))
    local rev, changed = src:watch(watch_body(rev0 + 1))
    assert.is_true(changed)
    assert.equal(e:revision(), rev)
    assert.same({ "r" }, ids(src:doc(), "routes"))
    assert.same({}, logs)
  end)

  it("takes a route refused for a missing upstream once that upstream comes", function()
    local rev0 = e:revision()
    src:range(range_body())
    e:put(P .. "/routes/r", route("/r", "later"))
    assert.is_false(select(2, src:watch(watch_body(rev0 + 1))))
    assert.truthy(logged('unknown upstream "later"'))
    e:put(P .. "/upstreams/later", UP)
    local _, changed = src:watch(watch_body(rev0 + 2))
    assert.is_true(changed)
    assert.same({ "r" }, ids(src:doc(), "routes"))
    assert.truthy(logged("/mg/routes/r: accepted now that what it names exists"))
  end)

  it("refuses to delete an upstream or policy a route still names", function()
    e:put(P .. "/upstreams/u1", UP)
    e:put(P .. "/policies/hello", POLICY)
    local rev0 = e:put(P .. "/routes/r", route("/r", "u1",
                                              ',"policies":[{"name":"hello","conf":{"who":"x"}}]'))
    src:range(range_body())
    assert.same({ "r" }, ids(src:doc(), "routes"))
    e:delete(P .. "/upstreams/u1")
    e:delete(P .. "/policies/hello")
    src:watch(watch_body(rev0 + 1))
    assert.same({ "u1" }, ids(src:doc(), "upstreams"))
    assert.truthy(src:doc().policies.hello)
    assert.truthy(logged("/mg/upstreams/u1: delete refused: still used by routes/r"))
    assert.truthy(logged("/mg/policies/hello: delete refused: still used by routes/r"))
    -- once the route goes, so do the upstream and policy gone from etcd
    local rev1 = e:delete(P .. "/routes/r")
    src:watch(watch_body(rev1))
    assert.same({}, ids(src:doc(), "routes"))
    assert.same({}, ids(src:doc(), "upstreams"))
    assert.is_nil(src:doc().policies.hello)
    assert.truthy(logged("/mg/upstreams/u1: deleted now that nothing names it"))
    -- a route and its upstream deleted together (either order): both go
    e:put(P .. "/upstreams/u2", UP)
    src:watch(watch_body(rev1 + 1))
    local rev2 = e:put(P .. "/routes/r2", route("/r2", "u2"))
    src:watch(watch_body(rev2))
    assert.same({ "r2" }, ids(src:doc(), "routes"))
    e:ctl({ "txn" }, "\ndel " .. P .. "/upstreams/u2\ndel " .. P .. "/routes/r2\n\n\n")
    src:watch(watch_body(rev2 + 1))
    assert.same({}, ids(src:doc(), "routes"))
    assert.same({}, ids(src:doc(), "upstreams"))
  end)

  it("loads sandboxed policies; a broken one is logged and the previous text stays", function()
    local rev0 = e:put(P .. "/policies/hello", POLICY)
    src:range(range_body())
    e:put(P .. "/policies/hello", "return {") -- syntax error
    e:put(P .. "/policies/boom", "error('no')")
    e:put(P .. "/policies/bad..name", POLICY)
    src:watch(watch_body(rev0 + 1))
    local doc = src:doc()
    assert.equal(POLICY, doc.policies.hello)
    assert.is_nil(doc.policies.boom)
    assert.truthy(logged("/mg/policies/hello: refused: policies.hello: policies/hello:"))
    assert.truthy(logged("/mg/policies/boom: refused: policies.boom: "))
    assert.truthy(logged('/mg/policies/bad..name: refused: policies.bad..name: invalid policy '
                         .. 'name'))
  end)

  it("says rerange for a watch from a compacted revision; a re-read converges", function()
    e:put(P .. "/upstreams/u1", UP)
    local rev0 = e:put(P .. "/routes/r1", route("/one"))
    src:range(range_body())
    e:put(P .. "/routes/r2", route("/two"))
    e:delete(P .. "/routes/r1")
    e:put(P .. "/routes/r2", route("/two-b"))
    e:compact()
    assert.equal("rerange", src:watch(watch_body(rev0 + 1)))
    local rev, changed = src:range(range_body())
    assert.equal(e:revision(), rev)
    assert.is_true(changed)
    assert.same({ "r2" }, ids(src:doc(), "routes"))
    assert.equal("/two-b", cjson.decode(src:doc().elements.routes[1]).paths[1])
  end)

  it("reads 10,000 routes in well under a second", function()
    local lines = {}
    for i = 1, 10000 do
      lines[#lines + 1] = ("put %s/routes/r%05d %s"):format(P, i, route("/r" .. i))
    end
    e:put(P .. "/upstreams/u1", UP)
    -- etcdctl txn caps a transaction at 128 operations by default: batches
    for b = 0, 9999, 100 do
      e:ctl({ "txn" }, "\n" .. table.concat(lines, "\n", b + 1, b + 100) .. "\n\n\n")
    end
    local body = range_body()
    local t0 = proc.now()
    src:range(body)
    local ms = (proc.now() - t0) * 1000
    assert.equal(10000, #src:doc().elements.routes)
    print(("\n  etcd_source: a range of 10,000 routes (%d KB) read and checked in %.0f ms")
          :format(math.floor(#body / 1024), ms))
    assert.is_true(ms < 2000, ms)
  end)
end)
