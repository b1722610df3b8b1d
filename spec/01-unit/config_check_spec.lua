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
        -- the change is found by comparing the entity lists (the delta
        -- path), not by looking up all 40 routes
        assert.same({ routes = 40, validated = 1, whole = false, modules_loaded = 0, delta = true },
                    config_check.stats())
        assert.is_nil(_G.cc_inits)
    end)

    it("takes two changes far apart (what two writes folded into one reload make) as two", function()
        assert.same({}, check(routes_doc(200)))
        local doc = routes_doc(200, function(r)
            r[3].policies[1].conf.value = "edited"
            r[201] = { id = "r201", paths = { "/r201/*" }, upstream = "u" }
        end)
        assert.same({}, check(doc))
        assert.same({ routes = 201, validated = 2, whole = false, modules_loaded = 0, delta = true },
                    config_check.stats())
        -- and then a removal near the top
        table.remove(doc.routes, 2)
        assert.same({}, check(doc))
        assert.same({ routes = 200, validated = 0, whole = false, modules_loaded = 0, delta = true },
                    config_check.stats())
    end)

    it("answers as moongate check does through random valid and invalid changes", function()
        math.randomseed(7)
        local routes = routes_doc(60).routes
        assert.same({}, check({ upstreams = routes_doc(0).upstreams, routes = routes }))
        local next_id = 61
        local refused, taken = 0, 0
        for step = 1, 60 do
            local r = {}
            for i, v in ipairs(routes) do
                r[i] = v
            end
            for _ = 1, math.random(1, 2) do
                local op, i = math.random(1, 7), math.random(1, #r)
                if op == 1 then -- a policy conf edited
                    r[i] = { id = r[i].id, paths = r[i].paths, upstream = "u",
                             policies = { { name = "p-one", conf = { value = "s" .. step } } } }
                elseif op == 2 then -- a route added
                    table.insert(r, i, { id = "r" .. next_id, paths = { "/n" .. next_id .. "/*" },
                                         upstream = "u" })
                    next_id = next_id + 1
                elseif op == 3 then -- a route removed
                    table.remove(r, i)
                elseif op == 4 then -- a conf the policy's schema refuses
                    r[i] = { id = r[i].id, paths = r[i].paths, upstream = "u",
                             policies = { { name = "p-one", conf = { value = step } } } }
                elseif op == 5 then -- an upstream that does not exist
                    r[i] = { id = r[i].id, paths = r[i].paths, upstream = "nope" }
                elseif op == 6 then -- an id given twice
                    table.insert(r, i, { id = r[math.random(1, #r)].id, paths = { "/d/*" },
                                         upstream = "u" })
                else -- a route moved
                    table.insert(r, math.random(1, #r), table.remove(r, i))
                end
            end
            local errs = check({ upstreams = routes_doc(0).upstreams, routes = r })
            assert.same(config.check(dir .. "/moongate.json"), errs, "step " .. step)
            if #errs == 0 then
                routes = r
                taken = taken + 1
                assert.equal(#r, config_check.stats().routes)
            else
                refused = refused + 1
            end
        end
        assert.is_true(taken > 10 and refused > 10, taken .. " taken, " .. refused .. " refused")
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
