-- config_version: each config version built from the previous one, so a
-- change recompiles only what it touches (issue 3, "a one-route change does
-- not rebuild 5,000 routes' compiled policies").
local cjson = require("cjson")
local config = require("moongate.config")
local config_doc = require("moongate.config_doc")
local config_version = require("moongate.config_version")
local json_split = require("moongate.json_split")
local router = require("moongate.router")
local ffi = require("ffi")
local proc = require("helpers.proc")

local dir, pdir

local function write(path, text)
    proc.write_file(path, text)
end

-- a policy whose init() counts its calls (per policy name) in _G.cv_inits
local function write_policy(name, opts)
    opts = opts or {}
    write(pdir .. "/" .. name .. ".lua", ([[
        return {
          name = %q, priority = %d, tag = %q,
          schema = %s,
          init = function(conf)
            _G.cv_inits[%q] = (_G.cv_inits[%q] or 0) + 1
            return { value = conf.value }
          end,
          %s = function(conf, ctx) end,
        }
    ]]):format(name, opts.priority or 10, opts.tag or "v1",
        opts.schema or "{ type = 'object' }", name, name, opts.phase or "access"))
end

local function route(i, extra)
    local r = { id = "r" .. i, paths = { "/r" .. i .. "/*" }, upstream = "u" .. (i % 2),
                policies = { { name = "p-one", conf = { value = "r" .. i } } } }
    for k, v in pairs(extra or {}) do
        r[k] = v
    end
    return r
end

local function doc(routes, extra)
    local t = {
        upstreams = { { id = "u0", targets = { { host = "127.0.0.1", port = 9001 } } },
                      { id = "u1", targets = { { host = "127.0.0.1", port = 9002 } } } },
        routes = routes,
    }
    for k, v in pairs(extra or {}) do
        t[k] = v
    end
    return t
end

local function many(n)
    local list = {}
    for i = 1, n do
        list[i] = route(i)
    end
    return list
end

local made -- upstream handles made, by id
local function new_builder()
    made = {}
    return config_version.new({
        upstream = function(u)
            made[u.id] = (made[u.id] or 0) + 1
            return { id = u.id, port = u.targets[1].port }
        end,
    })
end

-- How versions reach the builder: "file" (routes.json read by build, as
-- `moongate check` does) or "frames" (a worker's: the control's doc, each
-- version a delta frame from the one before, config_doc.apply, so that a
-- change takes the builder's delta path). Every test runs in both.
local mode
local docs = setmetatable({}, { __mode = "k" }) -- builder -> the doc it was last given

-- routes (a table, or a JSON text) into the builder b: v or nil, err.
-- only_send: (frames) the frame is applied to the doc, not built (frames
-- that a worker takes at once with the next).
local function try_build(b, routes, only_send)
    local text = type(routes) == "string" and routes or cjson.encode(routes)
    write(dir .. "/routes.json", text)
    if mode == "file" then
        if only_send then
            return nil
        end
        return b:build(dir .. "/moongate.json")
    end
    local node = assert(io.open(dir .. "/moongate.json")):read("*a")
    local split = json_split.split(text, config_doc.SPLIT)
    if not split then -- the control sends what it cannot split as a whole file: not here
        docs[b] = nil
        return b:build(dir .. "/moongate.json")
    end
    local old = docs[b]
    local new = config_doc.from_split(node, split)
    new.version = (old and old.version or 0) + 1
    local frame = old and config_doc.diff(old, new) or config_doc.snapshot(new)
    local d = assert(config_doc.apply(old, cjson.decode(cjson.encode(frame))))
    docs[b] = d -- a worker keeps the control's doc, applied or not
    if only_send then
        return nil
    end
    return b:build(dir .. "/moongate.json", node, nil, d)
end

-- builds routes (a table, or a JSON text) and commits; returns the version
local function build(b, routes)
    local v, err = try_build(b, routes)
    assert(v, err)
    b:commit(v)
    return v
end

local function by_id(v)
    local out = {}
    for _, r in ipairs(v.routes) do
        out[r.id] = r
    end
    return out
end

for _, m in ipairs({ "file", "frames" }) do
describe("config_version (" .. m .. ")", function()
    before_each(function()
        mode = m
        dir = proc.tmpdir()
        pdir = dir .. "/policies"
        os.execute("mkdir -p " .. pdir)
        write(dir .. "/moongate.json", cjson.encode({
            lua_path = { pdir }, config_source = { type = "file", path = "routes.json" } }))
        write_policy("p-one")
        write_policy("p-two", { phase = "header_filter", priority = 20 })
        _G.cv_inits = {}
    end)

    after_each(function()
        proc.cleanup(dir)
        _G.cv_inits = nil
    end)

    it("compiles every route once, then only the one that changed", function()
        local b = new_builder()
        local routes = many(50)
        local v1 = build(b, doc(routes))
        v1.stats.router_ms = nil
        assert.same({ routes = 50, validated = 50, compiled = 50, reused = 0, modules_loaded = 1,
                      whole = false, router = "built" }, v1.stats)
        assert.equal(50, _G.cv_inits["p-one"])
        routes[7].policies[1].conf.value = "changed"
        local v2 = build(b, doc(routes))
        v2.stats.router_ms = nil
        -- a worker's delta frame: only its splice is looked at
        assert.same({ routes = 50, validated = 1, compiled = 1, reused = 49, modules_loaded = 0,
                      whole = false, router = "updated", delta = mode == "frames" or nil },
                    v2.stats)
        assert.equal(51, _G.cv_inits["p-one"])
        local a, c = by_id(v1), by_id(v2)
        for id, r in pairs(a) do
            if id == "r7" then
                assert.are_not.equal(r, c[id])
                assert.equal("changed", c[id].phases.access[1].conf.value)
                -- the old version's route is left as it was
                assert.equal("r7", r.phases.access[1].conf.value)
            else
                assert.equal(r, c[id])
            end
        end
        -- the router was updated in place: it routes to the new r7
        assert.equal(v1.router, v2.router)
        local v = ffi.new("mg_req_view_t")
        v.path, v.path_len = "/r7/x", 5
        assert.equal(c.r7, (router.match(v2.router, v, function() end, nil)))
        assert.same({ u0 = 1, u1 = 1 }, made)
        assert.equal(v1.upstreams.u0, v2.upstreams.u0)
    end)

    it("builds, change after change, the versions a build from scratch makes", function()
        -- routes sharing paths (the first listed wins a tie), edited,
        -- added, removed and moved at random places; consumers edited; now
        -- and then an invalid change, refused with the whole file's errors
        math.randomseed(7)
        local b = new_builder()
        local paths = { "/p0/x", "/p1/x", "/p2/x", "/p3/x", "/p4/x", "/p5/x", "/nope" }
        local function shared(i, tag)
            return route(i, { paths = { "/p" .. (i % 6) .. "/*" },
                              policies = { { name = "p-one", conf = { value = tag or "v" } } } })
        end
        local routes, next_id = {}, 0
        for i = 1, 30 do
            routes[i] = shared(i)
            next_id = i
        end
        local cons = { { id = "c1", credentials = { ["p-one"] = { key = "k1" } } },
                       { id = "c2" } }
        local deltas, refused_before = 0, false
        for step = 1, 120 do
            local op = math.random(1, 6)
            local n = #routes
            local at = math.random(1, n)
            local bad
            if op == 1 then
                routes[at] = shared(tonumber(routes[at].id:sub(2)), "s" .. step)
            elseif op == 2 then
                next_id = next_id + 1
                table.insert(routes, math.random(1, n + 1), shared(next_id))
            elseif op == 3 and n > 5 then
                table.remove(routes, at)
            elseif op == 4 then
                local r = table.remove(routes, at)
                table.insert(routes, math.random(1, #routes + 1), r)
            elseif op == 5 then
                cons[2] = { id = "c2", credentials = { ["p-one"] = { key = "k" .. step } } }
            else
                bad = math.random(1, 2) == 1
                      and route(999, { id = routes[at].id }) -- an id listed already
                      or route(998, { upstream = "gone" })
            end
            local list = routes
            if bad then
                list = { unpack(routes) }
                table.insert(list, math.random(1, #list + 1), bad)
            end
            local text = cjson.encode(doc(list, { consumers = cons }))
            if not bad and math.random(1, 4) == 1 then
                -- a frame taken with the next one(s): one build for both
                try_build(b, text, true)
                goto continue
            end
            local v, err = try_build(b, text)
            local ref, ref_err = new_builder():build(dir .. "/moongate.json")
            assert.equal(ref_err, err)
            local after_refused = refused_before
            refused_before = bad and true
            if bad then
                assert.is_nil(v)
            else
                assert(v, err)
                b:commit(v)
                if mode == "frames" and step > 1 and not after_refused then
                    -- the full walk only after a refused version
                    assert.is_true(v.stats.delta, "step " .. step)
                    deltas = deltas + 1
                end
                assert.equal(#ref.routes, #v.routes)
                for i, r in ipairs(ref.routes) do
                    assert.equal(r.id, v.routes[i].id)
                    assert.equal(r.phases.access[1].conf.value, v.routes[i].phases.access[1].conf.value)
                end
                local view = ffi.new("mg_req_view_t")
                for _, path in ipairs(paths) do
                    view.path, view.path_len = path, #path
                    local a = router.match(ref.router, view, function() end, nil)
                    local c = router.match(v.router, view, function() end, nil)
                    assert.equal(a and a.id, c and c.id, path)
                end
                assert.equal(ref.consumers:find("p-one", "key", "k" .. step - 1) and true,
                             v.consumers:find("p-one", "key", "k" .. step - 1) and true)
                assert.same(ref.consumers.list, v.consumers.list)
            end
            ::continue::
        end
        if mode == "frames" then
            assert.is_true(deltas > 40, "delta builds: " .. deltas)
        end
    end)

    it("reuses everything, router included, when nothing changed", function()
        local b = new_builder()
        local v1 = build(b, doc(many(20)))
        local v2 = build(b, doc(many(20)))
        assert.equal(20, v2.stats.reused)
        assert.equal(v1.router, v2.router)
        assert.equal(v1.consumers, v2.consumers)
    end)

    it("adds and removes routes without recompiling the others", function()
        local b = new_builder()
        local routes = many(30)
        local v1 = build(b, doc(routes))
        table.remove(routes, 10)
        routes[#routes + 1] = route(31)
        table.insert(routes, 1, route(0))
        local v2 = build(b, doc(routes))
        assert.equal(2, v2.stats.compiled)
        assert.equal(29, v2.stats.reused)
        assert.is_nil(by_id(v2).r10)
        assert.equal(by_id(v1).r11, by_id(v2).r11)
        assert.same({ "r0", "r1", "r2" }, { v2.routes[1].id, v2.routes[2].id, v2.routes[3].id })
    end)

    it("takes changes far apart in one version as those changes alone", function()
        -- what two file writes folded into one reload make: an edit near
        -- the top and a route added at the end (frames: one delta of two
        -- hunks, built from those two entities, not the 300 between)
        local b = new_builder()
        local routes = many(300)
        build(b, doc(routes))
        routes[3] = route(3, { policies = { { name = "p-one", conf = { value = "edited" } } } })
        routes[301] = route(301)
        local v = build(b, doc(routes))
        assert.equal(2, v.stats.compiled)
        assert.equal(299, v.stats.reused)
        assert.equal(2, v.stats.validated)
        if mode == "frames" then
            assert.is_true(v.stats.delta)
            assert.equal("updated", v.stats.router)
        end
        assert.equal("edited", by_id(v).r3.phases.access[1].conf.value)
        local view = ffi.new("mg_req_view_t")
        for _, path in ipairs({ "/r3/x", "/r301/x", "/r150/x" }) do
            view.path, view.path_len = path, #path
            local r = router.match(v.router, view, function() end, nil)
            assert.equal(path:match("^/(r%d+)/"), r and r.id)
        end
    end)

    it("re-loads a changed policy module and recompiles exactly the routes using it", function()
        local b = new_builder()
        local routes = many(10)
        for i = 1, 3 do
            routes[i].policies[2] = { name = "p-two" }
        end
        local v1 = build(b, doc(routes))
        assert.equal(3, _G.cv_inits["p-two"])
        write_policy("p-two", { phase = "header_filter", priority = 20, tag = "v2" })
        local v2 = build(b, doc(routes))
        assert.equal(3, v2.stats.compiled)
        assert.equal(1, v2.stats.modules_loaded)
        assert.equal(6, _G.cv_inits["p-two"])
        local a, c = by_id(v1), by_id(v2)
        assert.equal("v1", a.r1.phases.header_filter[1].mod.tag)
        assert.equal("v2", c.r1.phases.header_filter[1].mod.tag)
        assert.equal(a.r4, c.r4)
        -- an unchanged source is not run again
        build(b, doc(routes))
        assert.equal(6, _G.cv_inits["p-two"])
    end)

    it("gives a route that comes back the policy module in force, not the one it had", function()
        local b = new_builder()
        local routes = many(4)
        routes[4].policies[2] = { name = "p-two" }
        build(b, doc(routes))
        local gone = table.remove(routes, 4)
        routes[3].policies[2] = { name = "p-two" } -- keeps p-two in use
        build(b, doc(routes))
        write_policy("p-two", { phase = "header_filter", priority = 20, tag = "v2" })
        build(b, doc(routes))
        routes[4] = gone
        local v = build(b, doc(routes))
        assert.equal("v2", by_id(v).r4.phases.header_filter[1].mod.tag)
    end)

    it("recompiles the phase lists for new global policies but keeps the routes' init", function()
        local b = new_builder()
        local v1 = build(b, doc(many(5)))
        local v2 = build(b, doc(many(5), { global_policies = { { name = "p-two" } } }))
        assert.equal(5, v2.stats.compiled)
        assert.equal(5, _G.cv_inits["p-one"])
        assert.equal(1, _G.cv_inits["p-two"])
        assert.equal("p-two", by_id(v2).r1.phases.header_filter[1].name)
        assert.is_nil(by_id(v1).r1.phases.header_filter)
    end)

    it("re-creates only a changed upstream's handle and recompiles the routes naming it", function()
        local b = new_builder()
        local v1 = build(b, doc(many(6)))
        local d = doc(many(6))
        d.upstreams[2].targets[1].port = 9999
        local v2 = build(b, d)
        assert.same({ u0 = 1, u1 = 2 }, made)
        assert.equal(3, v2.stats.compiled)
        assert.equal(9999, by_id(v2).r1.upstream_handle.port)
        assert.equal(9002, by_id(v1).r1.upstream_handle.port)
        assert.equal(by_id(v1).r2, by_id(v2).r2)
    end)

    it("keeps equal priorities in listing order, globals first", function()
        local b = new_builder()
        write_policy("p-three", { priority = 10 })
        local r = route(1)
        r.policies = { { name = "p-three" }, { name = "p-one" } }
        local v = build(b, doc({ r }, { global_policies = { { name = "p-one" } } }))
        local names = {}
        for i, p in ipairs(v.routes[1].phases.access) do
            names[i] = p.name
        end
        assert.same({ "p-one", "p-three", "p-one" }, names)
    end)

    describe("refuses an invalid change with the errors of the whole file", function()
        local function refused(b, routes)
            local v, err = try_build(b, routes)
            assert.is_nil(v)
            local _, errs = config.load_routes(dir .. "/routes.json",
                { policy_loader = config.policy_loader({ pdir }) })
            assert.equal(table.concat(errs, "; "), err)
            return err
        end

        it("a bad new route, named by its index in the file", function()
            local b = new_builder()
            local routes = many(10)
            build(b, doc(routes))
            routes[8].paths = { "nope" }
            assert.matches("routes%[7%]%.paths%[0%]", refused(b, doc(routes)))
        end)

        it("a new route whose id an unchanged route has", function()
            local b = new_builder()
            local routes = many(10)
            build(b, doc(routes))
            routes[11] = route(11, { id = "r3" })
            assert.matches("routes%[10%]%.id: duplicate id", refused(b, doc(routes)))
        end)

        it("an upstream removed while an unchanged route names it", function()
            local b = new_builder()
            build(b, doc(many(4)))
            local d = doc(many(4))
            table.remove(d.upstreams, 2)
            assert.matches("unknown upstream", refused(b, d))
        end)

        it("a policy whose new schema refuses an unchanged route's conf", function()
            local b = new_builder()
            build(b, doc(many(3)))
            write_policy("p-one", { schema = "{ type = 'object', additionalProperties = false }" })
            assert.matches("routes%[0%]%.policies%[0%]%.conf", refused(b, doc(many(3))))
        end)

        it("a policy that no longer loads", function()
            local b = new_builder()
            build(b, doc(many(3)))
            write(pdir .. "/p-one.lua", "return {")
            assert.matches("failed to load", refused(b, doc(many(3))))
        end)

        it("text that is not JSON", function()
            local b = new_builder()
            build(b, doc(many(3)))
            assert.matches("invalid JSON", refused(b, '{"routes": [{"id": "x"},'))
        end)

        it("a route that comes back beside a new one with its id", function()
            local b = new_builder()
            local routes = many(5)
            local x = routes[3]
            build(b, doc(routes))
            routes[3] = route(3, { paths = { "/other/*" } }) -- same id, another text
            build(b, doc(routes))
            routes[3] = x -- the first text again (its entry is still known)
            routes[6] = route(6, { id = "r3" })
            assert.matches("routes%[5%]%.id: duplicate id", refused(b, doc(routes)))
        end)

        it("a duplicate id after a refused change", function()
            local b = new_builder()
            local routes = many(5)
            build(b, doc(routes))
            local bad = many(5)
            bad[6] = route(6, { paths = { "nope" } })
            refused(b, doc(bad))
            routes[6] = route(6, { id = "r2" })
            assert.matches("routes%[5%]%.id: duplicate id", refused(b, doc(routes)))
        end)

        it("the same route twice", function()
            local b = new_builder()
            local routes = many(5)
            build(b, doc(routes))
            routes[6] = routes[2]
            assert.matches("routes%[5%]%.id: duplicate id", refused(b, doc(routes)))
        end)

        it("and then builds the next good change from the version in force", function()
            local b = new_builder()
            local routes = many(10)
            local v1 = build(b, doc(routes))
            routes[2].paths = { "bad" }
            refused(b, doc(routes))
            routes[2] = route(2)
            routes[3].policies[1].conf.value = "x"
            local v3 = build(b, doc(routes))
            assert.equal(1, v3.stats.compiled)
            assert.equal(by_id(v1).r2, by_id(v3).r2)
        end)
    end)

    it("forgets the entries of removed routes (memory stays bounded under churn)", function()
        local b = new_builder()
        local routes = many(20)
        local v1 = build(b, doc(routes))
        local function known()
            local n = 0
            for _ in pairs(b.index.routes.texts) do
                n = n + 1
            end
            return n
        end
        for k = 1, 300 do
            routes[5] = route(5, { paths = { "/churn" .. k .. "/*" } })
            local v = build(b, doc(routes))
            assert.equal(1, v.stats.compiled)
            assert.is_true(known() <= 20 + 20 + 64 + 1, "entries known: " .. known())
        end
        local v = build(b, doc(routes))
        assert.equal(0, v.stats.compiled)
        assert.equal(by_id(v1).r6, by_id(v).r6)
    end)

    it("loads a valid file it cannot split, reusing nothing", function()
        local b = new_builder()
        build(b, doc(many(3)))
        local text = cjson.encode(doc(many(3))):gsub('"routes"', '"rout\\u0065s"')
        local v = build(b, text)
        assert.is_true(v.stats.whole)
        assert.equal(3, v.stats.compiled)
        local v2 = build(b, cjson.encode(doc(many(3))))
        assert.equal(3, v2.stats.compiled)
        local v3 = build(b, cjson.encode(doc(many(3))))
        assert.equal(0, v3.stats.compiled)
    end)

    it("rebuilds everything when the node config changed", function()
        local b = new_builder()
        build(b, doc(many(3)))
        write(dir .. "/moongate.json", cjson.encode({ lua_path = { pdir }, workers = 2 }))
        local v = build(b, doc(many(3)))
        assert.equal(3, v.stats.compiled)
        assert.same({ u0 = 2, u1 = 2 }, made)
    end)

    it("takes the texts it is given (a worker's start from the master's snapshot)", function()
        local b = new_builder()
        local node = cjson.encode({ lua_path = { pdir } })
        local v = assert(b:build(dir .. "/moongate.json", node, cjson.encode(doc(many(2)))))
        assert.equal(2, #v.routes)
    end)
end)
end

-- A worker's doc that the control process validated (doc.checked): new
-- entities get their defaults, not the checks again; what the checks
-- across entities and the guard find is still refused.
describe("config_version: a doc the control process checked", function()
    before_each(function()
        dir = proc.tmpdir()
        pdir = dir .. "/policies"
        os.execute("mkdir -p " .. pdir)
        write(dir .. "/moongate.json", cjson.encode({
            lua_path = { pdir }, config_source = { type = "file", path = "routes.json" } }))
        -- a schema with a default and a check that refuses "bad"
        write_policy("p-one", { schema = [[{ type = "object", properties = {
            value = { type = "string", check = function(v) return v ~= "bad", "no bad" end },
            level = { type = "integer", default = 4 } } }]] })
        _G.cv_inits = {}
    end)

    after_each(function()
        proc.cleanup(dir)
        _G.cv_inits = nil
    end)

    local function build_doc(routes, checked)
        local node = assert(io.open(dir .. "/moongate.json")):read("*a")
        local d = config_doc.from_split(node, json_split.split(cjson.encode(routes),
                                                               config_doc.SPLIT))
        d.version, d.checked = 1, checked
        return new_builder():build(dir .. "/moongate.json", node, nil, d)
    end

    it("fills the defaults without running the checks", function()
        local routes = many(20)
        routes[3].policies[1].conf.value = "bad"
        local v = assert(build_doc(doc(routes), true))
        assert.equal(20, #v.routes)
        assert.equal(4, by_id(v).r3.policies[1].conf.level)
        assert.equal("bad", by_id(v).r3.phases.access[1].conf.value)
        -- unchecked, the same doc is refused by the check
        local none, err = build_doc(doc(routes), nil)
        assert.is_nil(none)
        assert.matches("routes%[2%]%.policies%[0%]%.conf%.value: no bad", err)
    end)

    it("still refuses a wrong type, an unknown upstream, an id given twice", function()
        local bad_type = many(3)
        bad_type[2].policies[1].conf.level = "4"
        local unknown = many(3)
        unknown[1].upstream = "nope"
        local twice = many(3)
        twice[3].id = "r1"
        for name, routes in pairs({ bad_type = bad_type, unknown = unknown, twice = twice }) do
            local v, err = build_doc(doc(routes), true)
            assert.is_nil(v, name)
            assert.is_string(err, name)
        end
        local _, err = build_doc(doc(bad_type), true)
        assert.matches("routes%[1%]%.policies%[0%]%.conf%.level: expected integer", err)
    end)
end)
