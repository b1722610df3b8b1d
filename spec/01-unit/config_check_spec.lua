-- config_check: the master's reload check, kept across reloads so that a
-- one-route change validates one route (issue 3: the master's per-change
-- cost), with the errors of `moongate check` word for word.
local cjson = require("cjson")
local config = require("moongate.config")
local config_check = require("moongate.config_check")
local proc = require("helpers.proc")

local dir, pdir

-- a policy whose init() would count its calls: the check must run none
local POLICY = [[
return {
  name = "p-one", priority = 10,
  schema = { type = "object", additionalProperties = false,
             properties = { value = { type = "string" } } },
  init = function(conf) _G.cc_inits = (_G.cc_inits or 0) + 1; return conf end,
  access = function() end,
}
]]

local function routes_doc(n, edit)
    local routes = {}
    for i = 1, n do
        routes[i] = { id = "r" .. i, paths = { "/r" .. i .. "/*" }, upstream = "u",
                      policies = { { name = "p-one", conf = { value = "v" .. i } } } }
    end
    if edit then
        edit(routes)
    end
    return { upstreams = { { id = "u", targets = { { host = "127.0.0.1", port = 9001 } } } },
             routes = routes }
end

local function check(doc)
    proc.write_file(dir .. "/routes.json", cjson.encode(doc))
    return config_check.check(dir .. "/moongate.json")
end

describe("config_check", function()
    before_each(function()
        dir = proc.tmpdir()
        pdir = dir .. "/policies"
        os.execute("mkdir -p " .. pdir)
        proc.write_file(pdir .. "/p-one.lua", POLICY)
        proc.write_file(dir .. "/moongate.json", cjson.encode({
            lua_path = { pdir }, config_source = { type = "file", path = "routes.json" } }))
        _G.cc_inits = nil
    end)

    after_each(function()
        proc.cleanup(dir)
    end)

    it("validates everything once, then only what changed; runs no init()", function()
        assert.same({}, check(routes_doc(40)))
        assert.same({ routes = 40, validated = 40, whole = false, modules_loaded = 1 },
                    config_check.stats())
        assert.same({}, check(routes_doc(40, function(r) r[9].policies[1].conf.value = "x" end)))
        assert.same({ routes = 40, validated = 1, whole = false, modules_loaded = 0 },
                    config_check.stats())
        assert.is_nil(_G.cc_inits)
    end)

    it("refuses a bad change with moongate check's errors, then takes the fix", function()
        assert.same({}, check(routes_doc(30)))
        local bad = routes_doc(30, function(r)
            r[3].upstream = "nope"
            r[5].policies[1].conf.value = 7
        end)
        local errs = check(bad)
        assert.same(config.check(dir .. "/moongate.json"), errs)
        assert.equal(2, #errs)
        assert.matches("routes%[2%]%.upstream: unknown upstream \"nope\"", errs[1] .. errs[2])
        -- a duplicate id in otherwise known texts: caught across entities
        local dup = routes_doc(30, function(r) r[30].id = "r1" end)
        errs = check(dup)
        assert.same(config.check(dir .. "/moongate.json"), errs)
        assert.is_true(#errs >= 1)
        assert.same({}, check(routes_doc(30, function(r) r[5].policies[1].conf.value = "ok" end)))
        assert.equal(1, config_check.stats().validated)
    end)

    it("sees a policy module's schema change in routes whose text did not change", function()
        assert.same({}, check(routes_doc(10)))
        proc.write_file(pdir .. "/p-one.lua", (POLICY:gsub('value = { type = "string" }',
                                                           'value = { type = "number" }')))
        local errs = check(routes_doc(10))
        assert.equal(10, #errs)
        assert.same(config.check(dir .. "/moongate.json"), errs)
    end)
end)
