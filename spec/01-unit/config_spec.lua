local config = require("moongate.config")
local schema = require("moongate.schema")
local cjson = require("cjson.safe")


local function shell_line(cmd)
  local p = assert(io.popen(cmd))
  local line = p:read("*l")
  p:close()
  return line
end

-- specs run from the repository root
local ROOT = shell_line("pwd")
local FIXTURES = ROOT .. "/spec/fixtures/config"
local POLICIES = ROOT .. "/spec/fixtures/policies"


local function node_errors(raw)
  local node, errs = config.validate_node(raw, "/etc/moongate/moongate.json")
  if node then
    return {}
  end
  return errs
end


local function node_of(raw)
  local node, errs = config.validate_node(raw, "/etc/moongate/moongate.json")
  assert(node, errs and table.concat(errs, "\n"))
  return node
end


-- a loader that knows the policies in spec/fixtures/policies and
-- spec/fixtures/config/lua (and, through policy_loader, policies/)
local function fixture_loader()
  return config.policy_loader({ POLICIES, FIXTURES .. "/lua" })
end


local function routes_errors(tbl, loader)
  local routes, errs = config.validate_routes(tbl, {
    policy_loader = loader or fixture_loader(),
  })
  if routes then
    return {}
  end
  return errs
end


describe("config", function()

  describe("load_node", function()
    it("normalizes the minimal node config, every default filled", function()
      local node, errs = config.load_node(FIXTURES .. "/minimal.json")
      assert.is_nil(errs)
      assert.same({
        conf_path = FIXTURES .. "/minimal.json",
        prefix = FIXTURES,
        workers = 0,
        listen = { { address = "127.0.0.1:8080", host = "127.0.0.1", port = 8080 } },
        admin = { listen = "127.0.0.1:9180", host = "127.0.0.1", port = 9180 },
        status = { listen = "127.0.0.1:9091", host = "127.0.0.1", port = 9091 },
        config_source = { type = "file", path = FIXTURES .. "/routes.json",
                          watch = false, cache = FIXTURES .. "/moongate.lkg.json" },
        redis = { host = "127.0.0.1", port = 6379, timeout_ms = 1000, db = 0 },
        limits = {
          max_header_bytes = 16384,
          max_uri_bytes = 8192,
          max_body_bytes = 10485760,
          client_header_timeout_ms = 10000,
          client_body_timeout_ms = 30000,
          keepalive_timeout_ms = 60000,
          send_timeout_ms = 30000,
          max_keepalive_requests = 10000,
        },
        shm = {},
        log = { level = "info", access = "off" },
        lua_path = {},
        pid_file = FIXTURES .. "/moongate.pid",
        shutdown_timeout_ms = 10000,
        sandbox = { max_instructions = 10000000 },
      }, node)
    end)

    it("normalizes a full config and resolves relative paths", function()
      local node = assert(config.load_node(FIXTURES .. "/full.json"))
      assert.equal(4, node.workers)
      assert.same({
        { address = "0.0.0.0:8080", host = "0.0.0.0", port = 8080 },
        { address = "[::1]:8443", host = "::1", port = 8443,
          tls = { cert = FIXTURES .. "/certs/server.crt",
                  key = "/etc/moongate/server.key" } },
        { address = "127.0.0.1:9443", host = "127.0.0.1", port = 9443, tls = {} },
      }, node.listen)
      assert.equal("secret", node.admin.api_key)
      assert.same({ type = "file", path = FIXTURES .. "/routes.json", watch = true,
                    cache = FIXTURES .. "/moongate.lkg.json" },
                  node.config_source)
      assert.same({ host = "127.0.0.1", port = 6380, timeout_ms = 500, db = 2 },
                  node.redis)
      assert.equal(32768, node.limits.max_header_bytes)
      assert.equal(1048576, node.limits.max_body_bytes)
      assert.equal(8192, node.limits.max_uri_bytes)
      assert.equal(1000, node.limits.send_timeout_ms)
      assert.same({ ratelimit = 10485760, breaker = 65536, cache = 1073741824 },
                  node.shm)
      assert.same({ level = "debug", access = FIXTURES .. "/logs/access.log" },
                  node.log)
      assert.same({ FIXTURES .. "/lua", ROOT .. "/spec/fixtures/policies" },
                  node.lua_path)
      assert.equal(FIXTURES .. "/moongate.pid", node.pid_file)
      assert.equal(2000, node.shutdown_timeout_ms)
    end)

    it("makes a relative conf path absolute", function()
      local node = assert(config.load_node("spec/fixtures/config/./minimal.json"))
      assert.equal(FIXTURES .. "/minimal.json", node.conf_path)
      assert.equal(FIXTURES, node.prefix)
    end)

    it("reports a missing file as one error naming it", function()
      local node, errs = config.load_node(FIXTURES .. "/nope.json")
      assert.is_nil(node)
      assert.same({ FIXTURES .. "/nope.json: cannot open: No such file or directory" },
                  errs)
    end)

    it("reports invalid JSON as one error naming the file", function()
      local node, errs = config.load_node(FIXTURES .. "/invalid.json")
      assert.is_nil(node)
      assert.equal(1, #errs)
      assert.matches(FIXTURES .. "/invalid.json: invalid JSON: ", errs[1], 1, true)
    end)

    it("reports a file that is not a JSON object", function()
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write("[1, 2]")
      f:close()
      local node, errs = config.load_node(path)
      os.remove(path)
      assert.is_nil(node)
      assert.same({ path .. ": must contain a JSON object" }, errs)
    end)

    it("reports every error of a bad config with its path", function()
      local node, errs = config.load_node(FIXTURES .. "/bad-node.json")
      assert.is_nil(node)
      assert.same({
        'listen[0].address: invalid address "x"',
        "workers: must be one of: auto",
        "bogus: unknown field",
      }, errs)
    end)
  end)

  describe("validate_node", function()
    it("accepts {} with every default", function()
      local node = node_of({})
      assert.same({ { address = "0.0.0.0:8080", host = "0.0.0.0", port = 8080 } },
                  node.listen)
      assert.equal("/etc/moongate", node.prefix)
      assert.equal("/etc/moongate/routes.json", node.config_source.path)
    end)

    it("does not share the default listen table between configs", function()
      local a, b = node_of({}), node_of({})
      assert.are_not.equal(a.listen, b.listen)
      assert.are_not.equal(a.listen[1], b.listen[1])
    end)

    it("maps workers", function()
      assert.equal(0, node_of({ workers = "auto" }).workers)
      assert.equal(8, node_of({ workers = 8 }).workers)
      assert.same({ "workers: must be >= 1" }, node_errors({ workers = 0 }))
      assert.same({ "workers: must be <= 256" }, node_errors({ workers = 257 }))
      assert.same({ "workers: expected string or integer, got number" },
                  node_errors({ workers = 1.5 }))
    end)

    describe("addresses", function()
      local valid = {
        ["127.0.0.1:8080"] = { "127.0.0.1", 8080, "127.0.0.1:8080" },
        [":8080"] = { "0.0.0.0", 8080, "0.0.0.0:8080" },
        ["8080"] = { "0.0.0.0", 8080, "0.0.0.0:8080" },
        ["*:80"] = { "0.0.0.0", 80, "0.0.0.0:80" },
        ["localhost:81"] = { "127.0.0.1", 81, "127.0.0.1:81" },
        ["[::1]:8080"] = { "::1", 8080, "[::1]:8080" },
        ["[::]:1"] = { "::", 1, "[::]:1" },
        ["[2001:db8::7]:65535"] = { "2001:db8::7", 65535, "[2001:db8::7]:65535" },
        ["[::ffff:10.0.0.1]:80"] = { "::ffff:10.0.0.1", 80, "[::ffff:10.0.0.1]:80" },
      }
      for address, want in pairs(valid) do
        it("parses " .. address, function()
          local l = node_of({ listen = { { address = address } } }).listen[1]
          assert.same({ address = want[3], host = want[1], port = want[2] }, l)
        end)
      end

      local invalid = {
        "x", "1.2.3.4", "1.2.3.4:", "256.1.1.1:80", "example.com:80",
        "[::1:80", "[zz::1]:80", "[1:2:3]:80", "[1::2::3]:80", "1.2.3.4:80:1",
        "",
      }
      for _, address in ipairs(invalid) do
        it("rejects " .. cjson.encode(address), function()
          assert.same({ "listen[0].address: invalid address "
                        .. cjson.encode(address) },
                      node_errors({ listen = { { address = address } } }))
        end)
      end

      it("rejects ports out of range", function()
        assert.same({ 'listen[1].address: invalid address "1.2.3.4:0" '
                      .. "(port must be 1..65535)" },
                    node_errors({ listen = { { address = ":80" },
                                             { address = "1.2.3.4:0" } } }))
        assert.same({ 'admin.listen: invalid address "[::1]:65536" '
                      .. "(port must be 1..65535)" },
                    node_errors({ admin = { listen = "[::1]:65536" } }))
      end)

      it("rejects listeners that bind the same socket", function()
        assert.same({ 'listen[1].address: address "127.0.0.1:8080" '
                      .. "conflicts with listen[0].address" },
                    node_errors({ listen = { { address = ":8080" },
                                             { address = "127.0.0.1:8080" } } }))
        assert.same({ 'status.listen: address "127.0.0.1:9180" '
                      .. "conflicts with admin.listen" },
                    node_errors({ status = { listen = "127.0.0.1:9180" } }))
        assert.same({}, node_errors({ listen = { { address = "127.0.0.1:8080" },
                                                 { address = "127.0.0.2:8080" },
                                                 { address = "[::]:8080" } } }))
      end)

      it("requires a listener", function()
        assert.same({ "listen: must have at least 1 item" },
                    node_errors({ listen = {} }))
        assert.same({ "listen[0].address: required field missing" },
                    node_errors({ listen = { {} } }))
      end)
    end)

    it("validates tls", function()
      assert.same({ "listen[0].tls.key: required field missing" },
                  node_errors({ listen = { { address = ":443",
                                             tls = { cert = "a.crt" } } } }))
      assert.same({ "listen[0].tls: expected boolean or object, got string" },
                  node_errors({ listen = { { address = ":443", tls = "yes" } } }))
      assert.is_nil(node_of({ listen = { { address = ":80", tls = false } } })
                    .listen[1].tls)
    end)

    it("requires an admin api_key off loopback", function()
      assert.same({ "admin.api_key: required when admin.listen is not a "
                    .. "loopback address" },
                  node_errors({ admin = { listen = "0.0.0.0:9180" } }))
      assert.equal("k", node_of({ admin = { listen = "0.0.0.0:9180",
                                            api_key = "k" } }).admin.api_key)
      assert.same({ "admin.api_key: length must be >= 1" },
                  node_errors({ admin = { api_key = "" } }))
    end)

    describe("config_source", function()
      it("resolves a file source against the conf directory", function()
        assert.same({ type = "file", path = "/etc/moongate/conf.d/r.json",
                      watch = false, cache = "/etc/moongate/moongate.lkg.json" },
                    node_of({ config_source = { path = "conf.d/r.json" } })
                      .config_source)
        assert.same({ type = "file", path = "/srv/r.json", watch = false,
                      cache = "/var/cache/mg.json" },
                    node_of({ config_source = { type = "file",
                                                path = "/srv/./r.json",
                                                cache = "/var/cache/mg.json" } })
                      .config_source)
      end)

      it("fills etcd defaults", function()
        assert.same({ type = "etcd", endpoints = { "http://127.0.0.1:2379" },
                      prefix = "/moongate", timeout_ms = 5000,
                      cache = "/etc/moongate/moongate.lkg.json" },
                    node_of({ config_source = { type = "etcd" } }).config_source)
      end)

      it("reads an etcd source", function()
        local node = assert(config.load_node(FIXTURES .. "/etcd.json"))
        assert.same({ type = "etcd",
                      endpoints = { "http://127.0.0.1:2379", "http://127.0.0.1:22379" },
                      prefix = "/gw", user = "root", password = "pw",
                      timeout_ms = 5000, cache = FIXTURES .. "/moongate.lkg.json" },
                    node.config_source)
      end)

      it("validates the fields of each source type", function()
        assert.same({ "config_source.type: must be one of: file, etcd" },
                    node_errors({ config_source = { type = "consul" } }))
        assert.same({ "config_source.endpoints: unknown field" },
                    node_errors({ config_source = { endpoints = { "http://x" } } }))
        assert.same({ "config_source.path: unknown field" },
                    node_errors({ config_source = { type = "etcd", path = "x" } }))
        assert.same({ 'config_source.endpoints[0]: invalid URL "127.0.0.1:2379" '
                      .. "(http:// or https://)" },
                    node_errors({ config_source = { type = "etcd",
                                                    endpoints = { "127.0.0.1:2379" } } }))
        assert.same({ 'config_source.prefix: must start with "/"' },
                    node_errors({ config_source = { type = "etcd", prefix = "gw" } }))
        assert.same({ "config_source: user and password go together" },
                    node_errors({ config_source = { type = "etcd", user = "u" } }))
      end)

      it("reads etcd's TLS settings: paths resolve beside the node config, verify defaults to "
         .. "true, files must be readable", function()
        local etcd_json = FIXTURES .. "/etcd.json" -- any readable file stands for a PEM here
        local node = assert(config.validate_node({ config_source = { type = "etcd",
          endpoints = { "https://127.0.0.1:2379" },
          tls = { ca = "etcd.json", cert = etcd_json, key = "./etcd.json",
                  server_name = "etcd.internal" } } }, FIXTURES .. "/moongate.json"))
        assert.same({ ca = etcd_json, cert = etcd_json, key = etcd_json,
                      server_name = "etcd.internal", verify = true }, node.config_source.tls)
        assert.is_nil(node_of({ config_source = { type = "etcd" } }).config_source.tls)
        assert.same({ "config_source.tls.ca: cannot read /etc/moongate/no-ca.pem: No such file "
                      .. "or directory" },
                    node_errors({ config_source = { type = "etcd", tls = { ca = "no-ca.pem" } } }))
        assert.same({ "config_source: tls.cert and tls.key go together (the client certificate "
                      .. "for mTLS)" },
                    node_errors({ config_source = { type = "etcd", tls = { cert = etcd_json } } }))
        assert.same({ "config_source.tls.cafile: unknown field" },
                    node_errors({ config_source = { type = "etcd", tls = { cafile = "x" } } }))
        assert.same({ "config_source.tls.verify: expected boolean, got string" },
                    node_errors({ config_source = { type = "etcd", tls = { verify = "no" } } }))
      end)
    end)

    it("validates redis", function()
      assert.same({ "redis.port: must be <= 65535" },
                  node_errors({ redis = { port = 70000 } }))
      assert.same({ "redis.db: expected integer, got string" },
                  node_errors({ redis = { db = "0" } }))
    end)

    it("takes sizes in bytes or with a unit", function()
      local node = node_of({ limits = { max_header_bytes = "8K",
                                        max_uri_bytes = 4096,
                                        max_body_bytes = 0 },
                             shm = { a = "512k", b = "2m", c = 4096 } })
      assert.equal(8192, node.limits.max_header_bytes)
      assert.equal(4096, node.limits.max_uri_bytes)
      assert.equal(0, node.limits.max_body_bytes)
      assert.same({ a = 524288, b = 2097152, c = 4096 }, node.shm)
    end)

    it("rejects bad sizes and zone names", function()
      assert.same({ 'limits.max_body_bytes: invalid size "10x" '
                    .. "(bytes, or a number followed by k, m or g)" },
                  node_errors({ limits = { max_body_bytes = "10x" } }))
      assert.same({ "limits.max_header_bytes: must be >= 1024 bytes" },
                  node_errors({ limits = { max_header_bytes = 100 } }))
      assert.same({ "shm.tiny: must be >= 4096 bytes" },
                  node_errors({ shm = { tiny = "1k" } }))
      assert.same({ "shm.big: expected integer or string, got number" },
                  node_errors({ shm = { big = 1.5 } }))
      assert.same({ "shm: invalid zone name \"a b\" (letters, digits, '_' and '-')" },
                  node_errors({ shm = { ["a b"] = "1m" } }))
      local long = ("z"):rep(32)
      assert.same({ "shm: zone name \"" .. long .. "\" is longer than 31 characters" },
                  node_errors({ shm = { [long] = "1m" } }))
      local many = { limits = "1m", breakers = "1m" }
      for i = 1, 15 do
        many["z" .. i] = 4096
      end
      assert.same({ "shm: at most 14 zones besides limits and breakers" },
                  node_errors({ shm = many }))
      assert.same({ "limits.max_headers: unknown field" },
                  node_errors({ limits = { max_headers = 1 } }))
    end)

    it("resolves the access log unless it is off or stdout", function()
      assert.equal("off", node_of({}).log.access)
      assert.equal("stdout", node_of({ log = { access = "stdout" } }).log.access)
      assert.equal("/etc/moongate/logs/a.log",
                   node_of({ log = { access = "logs/a.log" } }).log.access)
      assert.equal("/var/log/a.log",
                   node_of({ log = { access = "/var/log/a.log" } }).log.access)
      assert.same({ "log.level: must be one of: debug, info, warn, error" },
                  node_errors({ log = { level = "verbose" } }))
    end)

    it("accepts lua_path as a string or a list, resolved", function()
      assert.same({ "/etc/moongate/policies" },
                  node_of({ lua_path = "policies" }).lua_path)
      assert.same({ "/opt/p", "/etc/p" },
                  node_of({ lua_path = { "/opt/p", "../p" } }).lua_path)
      assert.same({ "lua_path[1]: expected string, got number" },
                  node_errors({ lua_path = { "a", 1 } }))
    end)

    it("takes sandbox.max_instructions and a sandbox.policies_dir, resolved", function()
      assert.same({ max_instructions = 10000000 }, node_of({}).sandbox)
      assert.same({ max_instructions = 5000, policies_dir = "/etc/moongate/sandboxed" },
                  node_of({ sandbox = { max_instructions = 5000,
                                        policies_dir = "sandboxed" } }).sandbox)
      assert.same({ "sandbox.max_instructions: must be >= 1000" },
                  node_errors({ sandbox = { max_instructions = 10 } }))
      assert.same({ "sandbox.budget: unknown field" },
                  node_errors({ sandbox = { budget = 1 } }))
    end)

    it("puts the pid file next to the conf file by default", function()
      assert.equal("/etc/moongate/moongate.pid", node_of({}).pid_file)
      assert.equal("/run/gw.pid", node_of({ pid_file = "/run/gw.pid" }).pid_file)
    end)

    it("validates shutdown_timeout_ms", function()
      assert.equal(0, node_of({ shutdown_timeout_ms = 0 }).shutdown_timeout_ms)
      assert.same({ "shutdown_timeout_ms: must be >= 0" },
                  node_errors({ shutdown_timeout_ms = -1 }))
    end)

    it("treats a null member as absent", function()
      local node = node_of(cjson.decode('{"workers": null, "admin": {"api_key": null},'
                                        .. '"redis": {"password": null}}'))
      assert.equal(0, node.workers)
      assert.is_nil(node.admin.api_key)
      assert.is_nil(node.redis.password)
      assert.same({ "listen[0]: expected object, got null" },
                  node_errors(cjson.decode('{"listen": [null]}')))
    end)

    it("rejects unknown fields at any depth", function()
      assert.same({ "admin.key: unknown field", "listn: unknown field" },
                  node_errors({ listn = {}, admin = { key = "x" } }))
    end)
  end)

  describe("validate_routes", function()
    local function stub_loader(mods)
      return function(name)
        local mod = mods[name]
        if not mod then
          return nil, "not found"
        end
        return mod
      end
    end

    local design_example = [[{
      "upstreams": [{"id": "demo",
                     "targets": [{"host": "127.0.0.1", "port": 9001, "weight": 1}],
                     "balancer": "round_robin",
                     "timeouts": {"connect_ms": 1000, "send_ms": 5000, "read_ms": 5000}}],
      "routes": [{"id": "demo", "hosts": ["api.example.com"], "paths": ["/demo/*"],
                  "methods": ["GET", "POST"], "upstream": "demo", "strip_prefix": true,
                  "policies": [{"name": "key-auth", "conf": {}},
                               {"name": "rate-limit", "conf": {"rate": 100, "burst": 20, "key": "consumer"}}]}],
      "consumers": [{"id": "alice", "tenant": "acme",
                     "credentials": {"key-auth": {"key": "alice-secret"}}}],
      "global_policies": []
    }]]

    it("accepts the DESIGN.md example and fills defaults", function()
      local loader = stub_loader({
        ["key-auth"] = { schema = { type = "object",
                                    properties = { header = { type = "string",
                                                              default = "X-API-Key" } } } },
        ["rate-limit"] = { schema = { type = "object" } },
      })
      local routes, errs = config.validate_routes(cjson.decode(design_example),
                                                  { policy_loader = loader })
      assert.is_nil(errs)
      assert.same({ connect_ms = 1000, send_ms = 5000, read_ms = 5000 },
                  routes.upstreams[1].timeouts)
      assert.same({ size = 64, idle_timeout_ms = 60000, requests = 1000 },
                  routes.upstreams[1].keepalive)
      local route = routes.routes[1]
      assert.equal(0, route.priority)
      assert.is_true(route.strip_prefix)
      assert.same({ name = "key-auth", enabled = true, conf = { header = "X-API-Key" } },
                  route.policies[1])
      assert.same({}, routes.global_policies)
      assert.same({ key = "alice-secret" }, routes.consumers[1].credentials["key-auth"])
    end)

    it("fills defaults of a sparse document", function()
      local routes = assert(config.validate_routes({
        upstreams = { { id = "u", targets = { { host = "backend.local", port = 80 } } } },
        routes = { { id = "r", paths = { "/" }, upstream = "u" } },
      }, { policy_loader = stub_loader({}) }))
      assert.same({
        upstreams = { {
          id = "u",
          targets = { { host = "backend.local", port = 80, weight = 1 } },
          balancer = "round_robin",
          timeouts = { connect_ms = 5000, send_ms = 60000, read_ms = 60000 },
          keepalive = { size = 64, idle_timeout_ms = 60000, requests = 1000 },
        } },
        routes = { { id = "r", paths = { "/" }, upstream = "u",
                     strip_prefix = false, priority = 0, policies = {} } },
        consumers = {},
        global_policies = {},
      }, routes)
    end)

    it("names routes[2].paths[0] for a path without a slash", function()
      assert.same({ 'routes[2].paths[0]: must start with "/"' }, routes_errors({
        routes = { { id = "a", paths = { "/a" } }, { id = "b", paths = { "/b" } },
                   { id = "c", paths = { "c", "/c" } } },
      }))
    end)

    it("validates path syntax", function()
      assert.same({
        'routes[0].paths[0]: "*" is only allowed as the last segment ("/a/*")',
        'routes[0].paths[1]: "*" is only allowed as the last segment ("/a/*")',
        'routes[0].paths[2]: invalid parameter ":1d"',
        "routes[0].paths[3]: must not contain a query, a fragment or spaces",
        "routes[0].paths[5]: duplicate item, same as [4]",
      }, routes_errors({ routes = { { id = "a", paths = {
        "/a/*/b", "/a*", "/users/:1d", "/a?b=1", "/users/:id/*", "/users/:id/*" } } } }))
    end)

    it("reports an unknown upstream", function()
      assert.same({ 'routes[0].upstream: unknown upstream "nope"' }, routes_errors({
        upstreams = { { id = "u", targets = { { host = "h", port = 1 } } } },
        routes = { { id = "r", upstream = "nope" } },
      }))
    end)

    it("accepts a route without an upstream", function()
      assert.same({}, routes_errors({ routes = { { id = "r", paths = { "/" } } } }))
    end)

    it("reports duplicate ids", function()
      assert.same({
        'upstreams[1].id: duplicate id "u" (see upstreams[0])',
        'routes[2].id: duplicate id "r" (see routes[0])',
        'consumers[1].id: duplicate id "c" (see consumers[0])',
      }, routes_errors({
        upstreams = { { id = "u", targets = { { host = "h", port = 1 } } },
                      { id = "u", targets = { { host = "h", port = 2 } } } },
        routes = { { id = "r" }, { id = "s" }, { id = "r" } },
        consumers = { { id = "c" }, { id = "c" } },
      }))
    end)

    it("validates ids", function()
      assert.same({ "routes[0].id: invalid id \"a b\" (letters, digits, '_', '-' and '.')",
                    "routes[1].id: required field missing",
                    "upstreams[0].id: expected string, got number" },
                  routes_errors({
                    upstreams = { { id = 1, targets = { { host = "h", port = 1 } } } },
                    routes = { { id = "a b" }, { paths = { "/" } } },
                  }))
    end)

    it("validates upstreams", function()
      assert.same({
        "upstreams[0].balancer: must be one of: round_robin, least_conn, hash",
        "upstreams[0].keepalive.size: must be >= 0",
        "upstreams[0].targets[0].port: required field missing",
        'upstreams[0].targets[1].host: invalid host "a b"',
        "upstreams[0].timeouts.connect_ms: must be >= 1",
        "upstreams[1].targets: must have at least 1 item",
        "upstreams[2].targets: at least one target must have a weight > 0",
      }, routes_errors({ upstreams = {
        { id = "a", balancer = "random", keepalive = { size = -1 },
          timeouts = { connect_ms = 0 },
          targets = { { host = "h" }, { host = "a b", port = 80 } } },
        { id = "b", targets = {} },
        { id = "c", targets = { { host = "::1", port = 80, weight = 0 } } },
      } }))
    end)

    it("validates methods and hosts, lower-casing hosts", function()
      local long = string.rep("a", 64) .. ".com"
      assert.same({
        'routes[0].hosts[1]: invalid host "a..b"',
        'routes[0].hosts[2]: invalid host ".x.com"',
        'routes[0].hosts[3]: invalid host "' .. long .. '"',
        'routes[0].hosts[4]: invalid host "*"',
        'routes[0].methods[0]: invalid method "get" (upper case, like "GET")',
      }, routes_errors({ routes = { { id = "r",
                                      hosts = { "x.com", "a..b", ".x.com", long, "*" },
                                      methods = { "get" } } } }))
      local routes = assert(config.validate_routes({ routes = { {
        id = "r", hosts = { "API.Example.com", "*.example.com", "example.*" },
        methods = { "GET", "M-SEARCH" } } } }, { policy_loader = stub_loader({}) }))
      assert.same({ "api.example.com", "*.example.com", "example.*" },
                  routes.routes[1].hosts)
    end)

    it("accepts rewrite, priority and predicates, nothing else", function()
      assert.same({}, routes_errors({ routes = { { id = "r", rewrite = "/v2",
                                                   priority = -5 } } }))
      assert.same({ 'routes[0].rewrite: must start with "/"',
                    "routes[1].vars: unknown field" },
                  routes_errors({ routes = { { id = "r", rewrite = "v2" },
                                             { id = "s", vars = {} } } }))
      assert.same({ "certificates: unknown field" },
                  routes_errors({ certificates = {} }))
    end)

    it("validates consumers", function()
      assert.same({ 'consumers[0].credentials["key-auth"]: expected object, got string',
                    "consumers[0].tenant: length must be >= 1" },
                  routes_errors({ consumers = { { id = "a", tenant = "",
                                                  credentials = { ["key-auth"] = "k" } } } }))
    end)

    describe("policies", function()
      it("reports an unknown policy", function()
        assert.same({ 'routes[0].policies[0].name: unknown policy "x"' },
                    routes_errors({ routes = { { id = "r", policies = { { name = "x" } } } } },
                                  stub_loader({})))
      end)

      it("does not ask the loader for names that are not policy names", function()
        local asked = {}
        local loader = function(name)
          asked[#asked + 1] = name
          return nil, "not found"
        end
        assert.same({ "routes[0].policies[0].name: invalid policy name "
                      .. "\"../x\" (letters, digits, '_' and '-')" },
                    routes_errors({ routes = { { id = "r",
                                                 policies = { { name = "../x" } } } } },
                                  loader))
        assert.same({}, asked)
      end)

      it("validates conf against the policy schema, nested under the entry", function()
        assert.same({
          "routes[0].policies[0].conf.rate: must be >= 1",
          "routes[1].policies[0].conf.key: must be one of: ip, consumer",
          "routes[1].policies[0].conf.rate: required field missing",
          "routes[1].policies[0].conf.extra: unknown field",
        }, routes_errors({ routes = {
          { id = "a", policies = { { name = "fixture-quota", conf = { rate = 0 } } } },
          { id = "b", policies = { { name = "fixture-quota",
                                     conf = { key = "host", extra = 1 } } } },
        } }))
      end)

      it("validates global policies", function()
        assert.same({ "global_policies[0].conf.rate: required field missing",
                      'global_policies[1].name: unknown policy "nope"' },
                    routes_errors({ global_policies = {
                      { name = "fixture-quota" }, { name = "nope" } } }))
      end)

      it("fills conf defaults from the policy schema", function()
        local routes = assert(config.validate_routes({ routes = { { id = "r",
          policies = { { name = "fixture-quota", conf = { rate = 5 } } } } } },
          { policy_loader = fixture_loader() }))
        assert.same({ name = "fixture-quota", enabled = true,
                      conf = { rate = 5, burst = 0, key = "ip" } },
                    routes.routes[1].policies[1])
      end)

      it("validates disabled policies too", function()
        assert.same({ "routes[0].policies[0].conf.rate: required field missing" },
                    routes_errors({ routes = { { id = "r", policies = {
                      { name = "fixture-quota", enabled = false } } } } }))
      end)

      it("rejects the same policy twice on a route", function()
        assert.same({ 'routes[0].policies[1].name: duplicate policy "fixture-quota"' },
                    routes_errors({ routes = { { id = "r", policies = {
                      { name = "fixture-quota", conf = { rate = 1 } },
                      { name = "fixture-quota", conf = { rate = 2 } } } } } }))
      end)

      it("validates the policy entry itself", function()
        assert.same({ "routes[0].policies[0].conf: expected object, got string",
                      "routes[0].policies[0].enabled: expected boolean, got string",
                      "routes[0].policies[1].name: required field missing" },
                    routes_errors({ routes = { { id = "r", policies = {
                      { name = "fixture-folder", conf = "x", enabled = "yes" },
                      { conf = {} } } } } }))
      end)

      it("reports policies that fail to load or have a bad schema", function()
        local errs = routes_errors({ routes = { { id = "r", policies = {
          { name = "fixture-broken" }, { name = "fixture-badschema" } } } } })
        assert.equal(2, #errs)
        assert.matches('routes[0].policies[0].name: policy "fixture-broken" '
                       .. "failed to load: ", errs[1], 1, true)
        assert.matches("fixture-broken: failed on purpose", errs[1], 1, true)
        assert.equal('routes[0].policies[1].name: policy "fixture-badschema" '
                     .. 'has an invalid schema: schema.properties.rate: unknown type "int"',
                     errs[2])
      end)

      it("compiles a policy schema once per module", function()
        local mod = { schema = { type = "object",
                                 properties = { n = { type = "integer" } } } }
        local loader = stub_loader({ counted = mod })
        local compile = spy.on(schema, "compile")
        local doc = function()
          return { routes = { { id = "a", policies = { { name = "counted" } } },
                              { id = "b", policies = { { name = "counted" } } } } }
        end
        assert.same({}, routes_errors(doc(), loader))
        assert.same({}, routes_errors(doc(), loader))
        schema.compile:revert()
        assert.spy(compile).was.called(1)
      end)

      it("accepts a policy without a schema", function()
        assert.same({}, routes_errors({ routes = { { id = "r", policies = {
          { name = "fixture-folder", conf = { anything = true } } } } } }))
      end)
    end)

    it("rejects a document that is not an object", function()
      local routes, errs = config.validate_routes({ 1, 2 }, {})
      assert.is_nil(routes)
      assert.same({ "expected object, got array" }, errs)
    end)
  end)

  describe("normalize_routes (routes the control process checked)", function()
    -- every shipped policy, with and without its defaults given
    local TEXT = [[{
      "upstreams": [{"id": "u", "targets": [{"host": "127.0.0.1", "port": 9001}]}],
      "routes": [
        {"id": "a", "hosts": ["API.Example.com"], "paths": ["/a/*"], "upstream": "u",
         "policies": [
           {"name": "rate-limit", "conf": {"rate": 10, "burst": 5, "key": ["consumer", "ip"]}},
           {"name": "key-auth"},
           {"name": "cors", "conf": {"origins": ["https://x.example"]}},
           {"name": "request-headers", "conf": {"set": {"X-A": "$route"}}},
           {"name": "response-headers", "conf": {"add": {"X-B": ["1", "2"]}, "remove": ["Server"]}}]},
        {"id": "b", "paths": ["/b"], "upstream": "u", "strip_prefix": true, "priority": 3,
         "policies": [
           {"name": "ip-restriction", "conf": {"allow": ["10.0.0.0/8"]}},
           {"name": "request-size-limit", "conf": {"max_bytes": 100}},
           {"name": "circuit-breaker", "conf": {"failure_rate": 0.5}, "enabled": false}]},
        {"id": "c", "paths": ["/c"], "policies": [{"name": "static-response",
         "conf": {"status": 200, "body": {"ok": true}, "headers": {"X-C": "c"}}}]},
        {"id": "d", "paths": ["/d"], "upstream": null,
         "policies": [{"name": "redirect", "conf": {"to": "https://example.com/"}}]}],
      "consumers": [{"id": "alice", "credentials": {"key-auth": {"key": "k"}}}],
      "global_policies": [{"name": "response-headers", "conf": {"set": {"X-G": "g"}}}]
    }]]

    it("makes what validate_routes makes of them", function()
      local validated = assert(config.validate_routes(cjson.decode(TEXT), { lua_path = {} }))
      local normalized = assert(config.normalize_routes(cjson.decode(TEXT), { lua_path = {} }))
      assert.same(validated, normalized)
      assert.same({ "api.example.com" }, normalized.routes[1].hosts)
      assert.is_nil(normalized.routes[4].upstream)
    end)

    it("skips the checks, not the guard: a wrong type or an unknown policy is nil", function()
      -- a header the gateway sets: refused by the policy's check only
      local checked_only = cjson.decode([[{"routes": [{"id": "x", "paths": ["/x"], "policies":
        [{"name": "response-headers", "conf": {"set": {"Content-Length": "5"}}}]}]}]])
      assert.is_nil(config.validate_routes(cjson.decode(cjson.encode(checked_only)), {}))
      assert.is_table(config.normalize_routes(checked_only, {}))
      for _, bad in ipairs({
        [[{"routes": [{"id": "x", "paths": "/x"}]}]],
        [[{"routes": [{"id": "x", "policies": [{"name": "no-such-policy"}]}]}]],
        [[{"routes": [{"id": "x", "policies": [{"name": "rate-limit", "conf": {"rate": "10"}}]}]}]],
        [[{"upstreams": [{"id": "u"}]}]],
      }) do
        assert.is_nil(config.normalize_routes(cjson.decode(bad), {}), bad)
      end
    end)
  end)

  describe("load_routes", function()
    it("loads and normalizes a routes file", function()
      local routes, errs = config.load_routes(FIXTURES .. "/routes.json",
                                              { policy_loader = fixture_loader() })
      assert.is_nil(errs)
      assert.same({ "api.example.com" }, routes.routes[1].hosts)
      assert.same({ rate = 100, burst = 0, key = "ip" }, routes.routes[1].policies[1].conf)
    end)

    it("finds policies through opts.lua_path without a loader", function()
      local routes = config.load_routes(FIXTURES .. "/routes.json",
                                        { lua_path = { POLICIES, FIXTURES .. "/lua" } })
      assert.is_table(routes)
    end)

    it("reports every error of a bad routes file", function()
      local routes, errs = config.load_routes(FIXTURES .. "/bad-routes.json",
                                              { policy_loader = fixture_loader() })
      assert.is_nil(routes)
      assert.same({
        'routes[2].paths[0]: must start with "/"',
        'routes[1].upstream: unknown upstream "missing"',
        "routes[2].policies[0].conf.rate: must be >= 1",
      }, errs)
    end)

    it("reports a missing file and invalid JSON", function()
      assert.same({ FIXTURES .. "/none.json: cannot open: No such file or directory" },
                  select(2, config.load_routes(FIXTURES .. "/none.json")))
      local errs = select(2, config.load_routes(FIXTURES .. "/invalid.json"))
      assert.equal(1, #errs)
      assert.matches(FIXTURES .. "/invalid.json: invalid JSON: ", errs[1], 1, true)
    end)
  end)

  describe("policy_loader", function()
    local loader = config.policy_loader({ POLICIES, FIXTURES .. "/lua" })

    it("finds <dir>/<name>.lua and <dir>/<name>/init.lua", function()
      assert.equal(900, loader("fixture-quota").priority)
      assert.equal("fixture-folder", loader("fixture-folder").name)
    end)

    it("returns the same module table each time", function()
      assert.equal(loader("fixture-quota"), loader("fixture-quota"))
    end)

    it("returns nil for a policy it cannot find", function()
      local mod, err = loader("no-such-policy")
      assert.is_nil(mod)
      assert.equal("not found", err)
    end)

    it("raises for a policy that fails to load", function()
      assert.has_error(function() loader("fixture-broken") end)
    end)

    it("searches the repository's policies/ directory last", function()
      assert.equal(ROOT .. "/policies", config.policies_dir)
    end)
  end)

  describe("check", function()
    it("returns no errors for a valid node and routes", function()
      assert.same({}, config.check(ROOT .. "/conf/moongate.json"))
    end)

    it("refuses, by path, what the schema accepts but this build does not do yet", function()
      local file = FIXTURES .. "/full.json"
      assert.same({
        file .. ": listen[1].tls: TLS is not supported by this build yet",
        file .. ": listen[2].tls: TLS is not supported by this build yet",
      }, config.check(file))
    end)

    it("does not read routes for an etcd source", function()
      local file = FIXTURES .. "/etcd.json"
      assert.same({}, config.check(file))
    end)

    it("prefixes routes errors with the routes file", function()
      local file = FIXTURES .. "/bad-routes.json"
      assert.same({
        file .. ': routes[2].paths[0]: must start with "/"',
        file .. ': routes[1].upstream: unknown upstream "missing"',
        file .. ": routes[2].policies[0].conf.rate: must be >= 1",
      }, config.check("spec/fixtures/config/bad-routes-node.json"))
    end)

    it("prefixes node errors with the node file", function()
      local file = FIXTURES .. "/bad-node.json"
      assert.same({
        file .. ': listen[0].address: invalid address "x"',
        file .. ": workers: must be one of: auto",
        file .. ": bogus: unknown field",
      }, config.check(file))
    end)

    it("reports a missing routes file", function()
      assert.same({ FIXTURES .. "/no-routes.json: cannot open: "
                    .. "No such file or directory" },
                  config.check(FIXTURES .. "/missing-routes-node.json"))
    end)

    it("reports a missing node file once", function()
      assert.same({ FIXTURES .. "/nope.json: cannot open: No such file or directory" },
                  config.check(FIXTURES .. "/nope.json"))
    end)
  end)
end)
