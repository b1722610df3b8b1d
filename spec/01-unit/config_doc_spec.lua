-- config_doc: the sandboxed policies of an etcd source travel with the
-- document (snapshot, delta, last-known-good copy).
local config_doc = require("moongate.config_doc")

local function doc(version, policies, routes)
  return { version = version, node = '{"listen":[{"address":"127.0.0.1:1"}]}',
           skeleton = '{"global_policies":[]}',
           elements = { upstreams = {}, routes = routes or {}, consumers = {} },
           policies = policies }
end

local function tmpname()
  local p = os.tmpname()
  os.remove(p)
  return p
end

describe("config_doc policies", function()
  it("are in a snapshot and come back from it", function()
    local d = doc(7, { hello = "return {}" })
    local frame = config_doc.decode(config_doc.encode(config_doc.snapshot(d)))
    local out = assert(config_doc.apply(nil, frame))
    assert.same({ hello = "return {}" }, out.policies)
    assert.equal(7, out.version)
  end)

  it("make a delta when one changes, appears or goes; the set is carried whole", function()
    local a = doc(1, { x = "return 1", y = "return 2" })
    local _, changed = config_doc.diff(a, doc(2, { x = "return 1", y = "return 2" }))
    assert.is_false(changed)
    for _, p in ipairs({ { x = "return 1", y = "return 3" }, { x = "return 1" },
                         { x = "return 1", y = "return 2", z = "return 4" } }) do
      local b = doc(2, p)
      local frame, ch = config_doc.diff(a, b)
      assert.is_true(ch)
      assert.same(p, frame.policies)
      local out = assert(config_doc.apply(a, config_doc.decode(config_doc.encode(frame))))
      assert.same(p, out.policies)
      assert.matches("policies", config_doc.summary(frame))
    end
    -- all gone: an empty set, not "unchanged"
    local frame, ch = config_doc.diff(a, doc(2, nil))
    assert.is_true(ch)
    local out = assert(config_doc.apply(a, config_doc.decode(config_doc.encode(frame))))
    assert.is_nil(next(out.policies or {}))
  end)

  it("stay as they were through a delta that does not name them", function()
    local a = doc(1, { x = "return 1" })
    local b = doc(2, { x = "return 1" }, { '{"id":"r","paths":["/r"],"upstream":"u"}' })
    local frame = config_doc.diff(a, b)
    assert.is_nil(frame.policies)
    local out = assert(config_doc.apply(a, config_doc.decode(config_doc.encode(frame))))
    assert.same({ x = "return 1" }, out.policies)
    assert.equal(1, #out.elements.routes)
  end)

  it("are kept in the last-known-good copy", function()
    local path = tmpname()
    assert(config_doc.lkg_write(path, doc(42, { hello = "return { name = 'hello' }\n" })))
    local back = assert(config_doc.lkg_read(path))
    assert.equal(42, back.version)
    assert.same({ hello = "return { name = 'hello' }\n" }, back.policies)
    assert(config_doc.lkg_write(path, doc(43, nil)))
    back = assert(config_doc.lkg_read(path))
    assert.is_nil(back.policies)
    os.remove(path)
  end)
end)

describe("config_doc delta", function()
  it("records what it changed, linked back to the doc it came from, at most 16 deep", function()
    local d = doc(1, nil, { "a", "b", "c" })
    local docs = { d }
    for v = 2, 20 do
      local routes = { unpack(d.elements.routes) }
      routes[2] = "r" .. v
      local frame = config_doc.diff(d, doc(v, nil, routes))
      d = assert(config_doc.apply(d, config_doc.decode(config_doc.encode(frame))))
      docs[v] = d
      assert.same({ routes = { at = 2, del = 1, ins = { "r" .. v } } }, d.delta.splice)
      assert.equal(docs[v - 1], d.delta.base)
    end
    -- the chain back from the last doc: cut once it grew past 16 links
    local n, link = 0, d.delta
    while link do
      n = n + 1
      link = link.prior
    end
    assert.is_true(n >= 1 and n <= 16, "links: " .. n)
    assert.equal(d.delta.depth, n)
    -- a snapshot starts anew
    local s = assert(config_doc.apply(d, config_doc.snapshot(d)))
    assert.is_nil(s.delta)
  end)
end)

local function routes_doc(version, routes)
    return { version = version, node = "{}", skeleton = "{}",
             elements = { upstreams = {}, routes = routes, consumers = {} } }
end

-- new doc after old's delta, as a worker gets it: through JSON
local function over_the_wire(old, new)
    local frame, changed = config_doc.diff(old, new)
    local text = config_doc.encode(frame)
    local got, err = config_doc.apply(old, assert(config_doc.decode(text)))
    return got, err, #text, changed
end

local function route_texts(n, tag)
    local t = {}
    for i = 1, n do
        t[i] = ('{"id":"r%d","paths":["/r%d/*"]%s}'):format(i, i, tag or "")
    end
    return t
end

local function copy_list(t)
    local c = {}
    for i = 1, #t do
        c[i] = t[i]
    end
    return c
end

describe("config_doc delta", function()
    it("two changes far apart make a frame of those two routes, not the 5,000 between", function()
        local a = route_texts(5000)
        local b = copy_list(a)
        b[7] = '{"id":"r7","paths":["/r7/*"],"edited":1}'
        b[#b + 1] = '{"id":"r5001","paths":["/r5001/*"]}'
        local got, err, size, changed = over_the_wire(routes_doc(1, a), routes_doc(2, b))
        assert.is_nil(err)
        assert.is_true(changed)
        assert.same(b, got.elements.routes)
        assert.is_true(size < 400, "frame of " .. size .. " bytes")
        assert.equal("routes +1 ~1 -0", config_doc.summary(config_doc.diff(routes_doc(1, a), routes_doc(2, b))))
        -- and the worker's record is those two hunks (what it builds from:
        -- config_version.lua), not one splice of the 4,995 routes between
        assert.same({ { at = 7, del = 1, ins = { b[7] } }, { at = 5001, del = 0, ins = { b[5001] } } },
                    got.delta.hunks.routes)
    end)

    it("merges adjacent hunks in the worker's record", function()
        local base = routes_doc(1, route_texts(10))
        local got = assert(config_doc.apply(base, { version = 2, base = 1, splice = { routes = {
            { at = 3, del = 1, ins = { "x" } }, { at = 4, del = 2, ins = { "y", "z" } },
            { at = 8, del = 0, ins = { "w" } } } } }))
        assert.same({ { at = 3, del = 3, ins = { "x", "y", "z" } }, { at = 8, del = 0, ins = { "w" } } },
                    got.delta.hunks.routes)
        assert.same({ "r1", "r2", "x", "y", "z", "r6", "r7", "w", "r8", "r9", "r10" },
                    (function()
                        local out = {}
                        for i, t in ipairs(got.elements.routes) do
                            out[i] = t:match('"id":"(%w+)"') or t
                        end
                        return out
                    end)())
    end)

    it("gives the new lists exactly for random edits, insertions, deletions and moves", function()
        math.randomseed(7)
        local pool = route_texts(40)
        for _ = 1, 300 do -- bounded: 300 cases of up to 30 entities
            local a, b = {}, {}
            for i = 1, math.random(0, 30) do
                a[i] = pool[math.random(1, #pool)]
            end
            for i = 1, #a do
                b[i] = a[i]
            end
            for _ = 1, math.random(1, 6) do
                local op = math.random(1, 4)
                if op == 1 or #b == 0 then
                    table.insert(b, math.random(1, #b + 1), pool[math.random(1, #pool)])
                elseif op == 2 then
                    table.remove(b, math.random(1, #b))
                elseif op == 3 then
                    b[math.random(1, #b)] = pool[math.random(1, #pool)]
                else
                    table.insert(b, math.random(1, #b), table.remove(b, math.random(1, #b)))
                end
            end
            local got, err = over_the_wire(routes_doc(1, a), routes_doc(2, b))
            assert.is_nil(err)
            assert.same(b, got.elements.routes)
            -- the worker's record: hunks apart (a kept element between
            -- two), which give b from a too
            local hunks = got.delta.hunks.routes or {}
            local out, from = {}, 1
            for k, h in ipairs(hunks) do
                assert.is_true(k == 1 or h.at > hunks[k - 1].at + hunks[k - 1].del)
                for i = from, h.at - 1 do
                    out[#out + 1] = a[i]
                end
                for _, t in ipairs(h.ins) do
                    out[#out + 1] = t
                end
                from = h.at + h.del
            end
            for i = from, #a do
                out[#out + 1] = a[i]
            end
            assert.same(b, out)
        end
    end)

    it("refuses hunks out of order or out of range", function()
        local base = routes_doc(1, route_texts(10))
        local frame = { version = 2, base = 1, splice = { routes = {
            { at = 5, del = 1, ins = { "x" } }, { at = 3, del = 1, ins = { "y" } } } } }
        local got, err = config_doc.apply(base, frame)
        assert.is_nil(got)
        assert.matches("out of range or order for routes", err)
        frame.splice.routes = { { at = 9, del = 3, ins = {} } }
        got, err = config_doc.apply(base, frame)
        assert.is_nil(got)
        assert.matches("out of range or order for routes", err)
    end)
end)

describe("config_doc: a last-known-good copy is unchecked", function()
  local function through(d, frame)
    return assert(config_doc.apply(d, config_doc.decode(config_doc.encode(frame))))
  end

  it("read from disk, it is marked so, through its snapshot and every delta after", function()
    local path = tmpname()
    assert(config_doc.lkg_write(path, doc(3, nil, { '{"id":"a","paths":["/a"]}' })))
    local copy = assert(config_doc.lkg_read(path))
    os.remove(path)
    assert.is_true(copy.unchecked)
    local w = through(nil, config_doc.snapshot(copy))
    assert.is_true(w.unchecked)
    -- a checked version after it: the worker's doc keeps the mark (its
    -- base came from the copy) until the next snapshot
    local fresh = doc(4, nil, { '{"id":"a","paths":["/a"]}', '{"id":"b","paths":["/b"]}' })
    local frame = config_doc.diff(copy, fresh)
    assert.is_nil(frame.unchecked)
    local w2 = through(w, frame)
    assert.is_true(w2.unchecked)
    local w3 = through(w2, config_doc.snapshot(doc(5)))
    assert.is_nil(w3.unchecked)
  end)

  it("a source's docs are not", function()
    local w = through(nil, config_doc.snapshot(doc(1)))
    assert.is_nil(w.unchecked)
    assert.is_nil(through(w, (config_doc.diff(w, doc(2, { p = "return {}" })))).unchecked)
  end)
end)
