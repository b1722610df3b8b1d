-- One check for one entity (moongate.config_check: entity, policy_source):
-- the same bad value is refused identically
--   * through the Admin API: 400 with its error and path;
--   * through a direct etcd write (etcdctl, not the gateway): a log line
--     naming the key with the same "path: error", and the previous value
--     stays (the Admin API still reads it);
--   * in a routes.json file: `moongate check` exits 1 with the same error
--     (at the file's path: routes[0]... for routes.<id>...).
-- Table-driven over bad values of every kind. Before, the two online
-- paths drifted: the etcd source took a global policy under any key whatever
-- its name, took a sandboxed policy shadowed by a policy file, and worded
-- and placed its errors its own way.
local cjson = require("cjson")
local client = require("helpers.client")
local etcd_helper = require("helpers.etcd")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local PREFIX = "/moongate"
local KEY = { ["X-API-Key"] = "k3y" }

local UP = '{"targets": [{"host": "127.0.0.1", "port": 9}]}'
local HELLO = 'return { name = "hello", access = function() end }'

-- prev: a valid value first at that key (nil: none can be); file: how the
-- value is placed in routes.json for `moongate check` (nil: no file form,
-- e.g. an id that differs from its key: a file has no keys)
local CASES = {
  { "routes", "r-paths", '{"paths": ["no-slash"], "upstream": "u"}',
    "routes.r-paths.paths[0]", 'must start with "/"', file = "routes" },
  { "routes", "r-up", '{"paths": ["/x"], "upstream": "nope"}',
    "routes.r-up.upstream", 'unknown upstream "nope"', file = "routes" },
  { "routes", "r-pol", '{"paths": ["/x"], "upstream": "u", '
                        .. '"policies": [{"name": "cors", "conf": {"bogus": 1}}]}',
    "routes.r-pol.policies[0].conf.bogus", "", file = "routes" },
  { "routes", "r-nopol", '{"paths": ["/x"], "policies": [{"name": "no-such"}]}',
    "routes.r-nopol.policies[0].name", 'unknown policy "no-such"', file = "routes" },
  { "routes", "r-id", '{"id": "other", "paths": ["/x"]}',
    "routes.r-id.id", 'id "other" differs from "r-id"' },
  { "routes", "r-json", '{"paths": [', "routes.r-json", "invalid JSON: " },
  { "routes", "r-array", '["/x"]', "routes.r-array", "expected a JSON object" },
  { "upstreams", "u-bal", '{"targets": [{"host": "127.0.0.1", "port": 9}], '
                          .. '"balancer": "least_conn"}',
    "upstreams.u-bal.balancer", "only round_robin is supported by this build yet",
    file = "upstreams" },
  { "upstreams", "u-port", '{"targets": [{"host": "127.0.0.1", "port": 70000}]}',
    "upstreams.u-port.targets[0].port", "", file = "upstreams" },
  { "upstreams", "u-none", '{"targets": []}', "upstreams.u-none.targets", "",
    file = "upstreams" },
  { "consumers", "c-cred", '{"credentials": 5}', "consumers.c-cred.credentials", "",
    file = "consumers" },
  { "consumers", "c-field", '{"bogus": true}', "consumers.c-field.bogus", "",
    file = "consumers" },
  { "global_policies", "cors", '{"conf": {"bogus": 1}}', "global_policies.cors.conf.bogus", "",
    file = "global_policies" },
  { "global_policies", "cors", '{"name": "key-auth"}', "global_policies.cors.name",
    'name "key-auth" differs from "cors"' },
  { "global_policies", "no-such", "{}", "global_policies.no-such.name",
    'unknown policy "no-such"', file = "global_policies", prev = false },
  { "policies", "hello", "return {", "policies.hello", "policies/hello", file = "policies" },
  { "policies", "hello", "return { name = 'hello', access = 42 }", "policies.hello",
    "access that is not a function", file = "policies" },
  { "policies", "cors", HELLO, "policies.cors", 'a policy file named "cors" exists',
    prev = false },
}

-- a valid value for the key of a case
local function good_value(kind, id)
  if kind == "routes" then
    return '{"paths": ["/prev-' .. id .. '/*"], "upstream": "u"}'
  elseif kind == "upstreams" then
    return UP
  elseif kind == "consumers" then
    return '{"credentials": {"key-auth": {"key": "k-' .. id .. '"}}}'
  elseif kind == "global_policies" then
    return '{"conf": {"origins": ["*"]}}'
  end
  return HELLO
end

-- `moongate check` on a file config holding the bad value; rc, output
local function check_file(dir, case)
  local kind, id, bad = case[1], case[2], case[3]
  local routes = { upstreams = {}, routes = {}, consumers = {}, global_policies = {} }
  local node = { listen = { { address = "127.0.0.1:1" } },
                 config_source = { type = "file", path = "routes.json" } }
  local up = cjson.decode(UP)
  up.id = "u"
  if kind == "policies" then
    -- a sandboxed policy from the node's policies_dir, named by a route
    proc.write_file(dir .. "/sandboxed/" .. id .. ".lua", bad)
    node.sandbox = { policies_dir = dir .. "/sandboxed" }
    routes.routes[1] = { id = "r", paths = { "/r" }, policies = { { name = id } } }
  else
    local v = cjson.decode(bad)
    v[kind == "global_policies" and "name" or "id"] = id
    routes[kind][1] = v -- first: index 0
  end
  routes.upstreams[#routes.upstreams + 1] = up
  proc.write_file(dir .. "/routes.json", gateway.json_encode(routes))
  proc.write_file(dir .. "/moongate.json", gateway.json_encode(node))
  return proc.run({ gateway.bin(), "check", "-c", dir .. "/moongate.json" }, { stderr = true })
end

describe("one entity check for the Admin API, the etcd source and moongate check", function()
  local e, gw, dir

  setup(function()
    e = etcd_helper.start()
    local mock = gateway.mock()
    e:put(PREFIX .. "/upstreams/u", cjson.encode(gateway.upstream("u", mock)))
    gw = gateway.start({ workers = 1, node = {
      admin = { api_key = "k3y" },
      config_source = { type = "etcd", path = gateway.DELETE, endpoints = { e.url },
                        prefix = PREFIX },
    } })
    dir = proc.tmpdir()
    assert(proc.run({ "mkdir", "-p", dir .. "/sandboxed" }) == 0)
  end)

  teardown(function()
    client.close_all()
    gateway.stop_all()
    proc.cleanup(dir)
    if e then
      e:stop()
    end
  end)

  local function api(method, path, body)
    local res = assert(client.request(gw.admin_port, { method = method, path = path, body = body,
                                                       headers = KEY }))
    local ctype = res.headers["content-type"] or ""
    return res.status, ctype:find("json") and res.body ~= "" and cjson.decode(res.body)
      or res.body
  end

  for n, case in ipairs(CASES) do
    local kind, id, bad, path, msg = case[1], case[2], case[3], case[4], case[5]
    it(("#%d %s/%s: %s"):format(n, kind, id, path), function()
      local key = PREFIX .. "/" .. kind .. "/" .. id
      local before
      if case.prev ~= false then
        -- a valid value first, taken by the gateway
        e:put(key, good_value(kind, id))
        before = proc.eventually(function()
          local s, b = api("GET", "/" .. kind .. "/" .. id)
          return s == 200 and b
        end, 5)
        assert.is_truthy(before, gw:log_tail())
      end

      -- the Admin API: 400, its error at its path; nothing written
      local rev = e:revision()
      local s, b = api("PUT", "/" .. kind .. "/" .. id, bad)
      assert.equal(400, s, cjson.encode(b))
      assert.equal(path, b.path)
      assert.is_truthy(b.error:find(msg, 1, true), b.error)
      assert.equal(rev, e:revision())

      -- etcd, written directly: the same path and error, by key
      local line = "etcd: " .. key .. ": refused: " .. path .. ": " .. b.error
      local from = #gw:log()
      e:put(key, bad)
      local logged = proc.eventually(function()
        local tail = gw:log():sub(from + 1)
        local at = tail:find(line, 1, true)
        return at and tail:match("[^\n]*", at)
      end, 5)
      assert.is_truthy(logged, "no line " .. line .. "\n" .. gw:log_tail())
      if before then
        assert.matches("; the previous value stays$", logged)
        local s2, b2 = api("GET", "/" .. kind .. "/" .. id)
        assert.equal(200, s2)
        assert.same(before, b2)
      else
        assert.matches("; the key is ignored until it is valid$", logged)
        assert.equal(404, (api("GET", "/" .. kind .. "/" .. id)))
      end

      -- a file: moongate check exits 1 with the same error
      if case.file then
        local rc, out = check_file(dir, case)
        assert.equal(1, rc, out)
        assert.is_truthy(out:find(b.error, 1, true), out)
        if kind ~= "policies" then
          local at = kind .. "[0]" .. path:sub(#kind + #id + 2)
          assert.is_truthy(out:find(at .. ": " .. b.error, 1, true), at .. "\n" .. out)
        end
      end
      e:delete(key) -- the next case starts from nothing at that key
    end)
  end
end)
