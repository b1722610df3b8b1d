-- The Admin API as an operator meets it: bin/moongate refusing an open
-- admin listener, and (once the control process serves it) the API itself.
local cjson = require("cjson")
local socket = require("socket")
local gateway = require("helpers.gateway")
local ports = require("helpers.ports")
local proc = require("helpers.proc")

local function moongate(...)
    return proc.run({ "timeout", "-s", "KILL", "15", gateway.bin(), ... }, { stderr = true })
end

describe("admin listener", function()
    local dir

    setup(function()
        dir = proc.tmpdir()
        proc.write_file(dir .. "/routes.json", "{}")
    end)

    it("a non-loopback admin address without api_key: start and check refuse, exit 1", function()
        local conf = dir .. "/open.json"
        local port = ports.free()
        proc.write_file(conf, cjson.encode({
            listen = { { address = "127.0.0.1:" .. ports.free() } },
            admin = { listen = "0.0.0.0:" .. port },
        }))
        for _, cmd in ipairs({ "start", "check" }) do
            local rc, out = moongate(cmd, "-c", conf)
            assert.equal(1, rc, out)
            assert.matches("admin.api_key: required when admin.listen is not a loopback address",
                           out, 1, true)
        end
        -- nothing listens there
        assert.is_nil((socket.connect("127.0.0.1", port)))
        -- with a key it is accepted
        proc.write_file(conf, cjson.encode({
            listen = { { address = "127.0.0.1:" .. ports.free() } },
            admin = { listen = "0.0.0.0:" .. port, api_key = "k" },
        }))
        local crc, out = moongate("check", "-c", conf)
        assert.equal(0, crc, out)
    end)
end)

describe("Admin API (file mode), served by the control process", function()
    local client = require("helpers.client")
    local gw
    local KEY = { ["X-API-Key"] = "k3y" }
    local ROUTES = [[{
      "upstreams": [{"id": "u1", "targets": [{"host": "127.0.0.1", "port": 9}]}],
      "routes": [{"id": "r2", "paths": ["/r2"], "upstream": "u1", "policies": []},
                 {"id": "r1", "paths": ["/r1/*"], "upstream": "u1"}],
      "consumers": [],
      "global_policies": [{"name": "cors", "conf": {"origins": ["*"]}}]
    }]]

    setup(function()
        gw = gateway.start({ routes = ROUTES, node = { admin = { api_key = "k3y" } } })
    end)

    teardown(function()
        gateway.stop_all()
    end)

    local function api(method, path, body, headers)
        local res = assert(client.request(gw.admin_port, {
            method = method, path = path, body = body, headers = headers or KEY,
        }))
        local ctype = res.headers["content-type"] or ""
        return res.status, ctype:find("json") and res.body ~= "" and cjson.decode(res.body)
            or res.body, res
    end

    it("401 without the key or with a wrong one", function()
        local s, b = api("GET", "/routes", nil, {})
        assert.equal(401, s)
        assert.equal("X-API-Key required", b.error)
        s, b = api("GET", "/routes", nil, { ["X-API-Key"] = "k3y2" })
        assert.equal(401, s)
        assert.equal("invalid X-API-Key", b.error)
    end)

    it("GET lists and reads the version in force, in its order, as written", function()
        local s, b, res = api("GET", "/routes")
        assert.equal(200, s)
        assert.equal(2, b.total)
        assert.same({ "r2", "r1" }, { b.items[1].id, b.items[2].id })
        assert.truthy(tonumber(res.headers["x-moongate-version"]) >= 1)
        local raw
        s, b, raw = api("GET", "/routes/r2")
        assert.equal(200, s)
        assert.same({}, b.policies)
        assert.equal('{"id": "r2", "paths": ["/r2"], "upstream": "u1", "policies": []}', raw.body)
        s, b = api("GET", "/global_policies/cors")
        assert.equal(200, s)
        assert.same({ "*" }, b.conf.origins)
        s, b = api("GET", "/routes?limit=1&offset=1")
        assert.equal(200, s)
        assert.equal(1, #b.items)
        assert.equal("r1", b.items[1].id)
        s, b = api("GET", "/")
        assert.equal(200, s)
        assert.equal("file", b.mode)
    end)

    it("404 for unknown ids and paths, 405 for writes (file-backed) and wrong methods", function()
        local s, b = api("GET", "/routes/nope")
        assert.equal(404, s)
        assert.equal("routes.nope", b.path)
        s = api("GET", "/nothing")
        assert.equal(404, s)
        local res
        s, b, res = api("PUT", "/routes/r1", '{"paths": ["/x"]}')
        assert.equal(405, s)
        assert.equal("GET", res.headers["allow"])
        assert.matches("file-backed", b.error, 1, true)
        assert.matches(gw.routes_path, b.error, 1, true)
        s = api("DELETE", "/upstreams/u1")
        assert.equal(405, s)
        s, b, res = api("POST", "/routes", "{}")
        assert.equal(405, s)
        assert.equal("GET", res.headers["allow"])
        assert.equal("method not allowed", b.error)
    end)

    it("a reload shows in the next GET", function()
        gw:write_routes(ROUTES:gsub('"consumers": %[%]', '"consumers": [{"id": "bob"}]'))
        assert.equal(0, (gw:reload()))
        local deadline = proc.now() + 10
        local s, b = api("GET", "/consumers/bob")
        while s ~= 200 and proc.now() < deadline do
            socket.sleep(0.05)
            s, b = api("GET", "/consumers/bob")
        end
        assert.equal(200, s)
        assert.equal("bob", b.id)
    end)

    it("moongate config dump prints the routes in force", function()
        local rc, out = proc.run({ gateway.bin(), "config", "dump", "-c", gw.conf_path })
        assert.equal(0, rc, out)
        local v = cjson.decode(out)
        assert.equal(2, #v.routes)
        assert.equal("r2", v.routes[1].id) -- in the order of the file
        local f = gw.dir .. "/dumped.json"
        proc.write_file(f, out)
        -- a valid routes.json
        local crc, cout = proc.run({ gateway.bin(), "check", "-c", gw.conf_path })
        assert.equal(0, crc, cout)
        -- push in file mode: every write is a 405
        rc, out = proc.run({ gateway.bin(), "config", "push", f, "-c", gw.conf_path }, { stderr = true })
        assert.equal(1, rc)
        assert.matches("405", out, 1, true)
    end)
end)
