-- json_split: the texts of a routes.json's entities, and the next text's
-- from the previous split (what a reload reuses).
local cjson = require("cjson.safe")
local json_split = require("moongate.json_split")

local ARRAYS = { routes = true, upstreams = true, consumers = true }

-- the document as the decoder sees it, from the split: the skeleton with
-- each split array filled with its decoded elements; nil when a piece does
-- not decode
local function reassemble(doc)
    local top = cjson.decode(doc.skeleton)
    if type(top) ~= "table" then
        return nil
    end
    for name, texts in pairs(doc.elements) do
        local list = {}
        for i, t in ipairs(texts) do
            list[i] = cjson.decode(t)
            if list[i] == nil then
                return nil
            end
        end
        top[name] = list
    end
    return top
end

-- what the next split must equal, field by field
local function same_doc(a, b)
    assert.equal(a.text, b.text)
    assert.equal(a.skeleton, b.skeleton)
    assert.same(a.members, b.members)
    assert.same(a.elements, b.elements)
    assert.same(a.spans, b.spans)
end

describe("json_split", function()
    it("cuts the elements of the named arrays and leaves the rest to the decoder", function()
        local text = ' { "upstreams" : [ {"id":"u"} ] ,"routes":[{"id":"a","x":"}]\\"{["},'
            .. '\n {"id":"b","n":[1,[2]]}],"global_policies":[{"name":"p"}],"other":5 } '
        local doc = assert(json_split.split(text, ARRAYS))
        assert.same({ '{"id":"a","x":"}]\\"{["}', '{"id":"b","n":[1,[2]]}' }, doc.elements.routes)
        assert.same({ '{"id":"u"}' }, doc.elements.upstreams)
        assert.is_nil(doc.elements.consumers)
        assert.equal('[{"name":"p"}]', doc.members.global_policies)
        assert.equal("5", doc.members.other)
        assert.same(cjson.decode(text), reassemble(doc))
        assert.same({ upstreams = {}, routes = {}, global_policies = { { name = "p" } }, other = 5 },
            cjson.decode(doc.skeleton))
    end)

    it("refuses shapes it does not split, so the caller decodes the whole text", function()
        for _, text in ipairs({
            "[]", '"x"', "", "{", '{"routes": {"a": 1}}', '{"routes": [1]}', '{"routes": [{}, null]}',
            '{"routes": [{}] "x": 1}', '{"routes": [{},]}', '{"routes": [,{}]}',
            '{"routes": [{} {}]}', '{"routes": [{}], "routes": []}', '{"rout\\u0065s": []}',
            '{"routes": [{"a": "}]}', '{"routes": [{}]} x', '{"a" 1}', '{"a": }',
        }) do
            assert.is_nil(json_split.split(text, ARRAYS), text)
        end
    end)

    it("takes {} for an empty list (lua-cjson writes empty arrays so), split anew when edited",
        function()
            local doc = assert(json_split.split('{"routes": { }, "consumers": [{"id": "c"}]}',
                                                ARRAYS))
            assert.same({}, doc.elements.routes)
            assert.same({ '{"id": "c"}' }, doc.elements.consumers)
            assert.same({ routes = {}, consumers = {} }, cjson.decode(doc.skeleton))
            -- an edit inside it is no list: the whole text is split (and refused)
            assert.is_nil(json_split.split('{"routes": {{"id": "r"}}, "consumers": [{"id": "c"}]}',
                                           ARRAYS, doc))
            local next_doc = assert(json_split.split('{"routes": [{"id": "r"}], "consumers": '
                                                     .. '[{"id": "c"}]}', ARRAYS, doc))
            assert.same({ '{"id": "r"}' }, next_doc.elements.routes)
        end)

    it("takes an empty object and empty arrays", function()
        assert.same({}, assert(json_split.split(" {} ", ARRAYS)).elements)
        local doc = assert(json_split.split('{"routes":[ ],"consumers":[]}', ARRAYS))
        assert.same({ routes = {}, consumers = {} }, doc.elements)
    end)

    -- random documents and random edits: the split of the next text from
    -- the previous split equals the split of the next text alone
    local rand = math.random
    local function pick(t)
        return t[rand(#t)]
    end
    local function ws()
        return pick({ "", "", " ", "\n  ", "\t" })
    end
    local STRINGS = { "a", "}", "]", "{[", '\\"', "\\\\", "\\u005d", ",", "x y", "" }
    local function value(depth)
        local k = rand(depth > 2 and 3 or 5)
        if k == 1 then
            return tostring(rand(1000))
        elseif k == 2 then
            return '"' .. pick(STRINGS) .. pick(STRINGS) .. '"'
        elseif k == 3 then
            return pick({ "true", "false", "null" })
        elseif k == 4 then
            local parts = {}
            for i = 1, rand(0, 3) do
                parts[i] = ws() .. value(depth + 1) .. ws()
            end
            return "[" .. table.concat(parts, ",") .. "]"
        end
        local parts = {}
        for i = 1, rand(0, 3) do
            parts[i] = ws() .. '"k' .. i .. pick(STRINGS) .. '"' .. ws() .. ":" .. ws() .. value(depth + 1)
        end
        return "{" .. table.concat(parts, ",") .. "}"
    end
    local function element()
        return '{"id":"e' .. rand(1e6) .. '","v":' .. value(1) .. "}"
    end
    local function array(n)
        local parts = {}
        for i = 1, n do
            parts[i] = ws() .. element() .. ws()
        end
        return "[" .. table.concat(parts, ",") .. "]"
    end
    local function document()
        local members = {
            '"routes"' .. ws() .. ":" .. ws() .. array(rand(0, 12)),
            '"upstreams":' .. array(rand(0, 3)),
            '"consumers":' .. array(rand(0, 3)),
            '"global_policies":' .. value(1),
        }
        for i = #members, 2, -1 do
            local j = rand(i)
            members[i], members[j] = members[j], members[i]
        end
        return ws() .. "{" .. table.concat(members, "," .. ws()) .. "}" .. ws()
    end
    local function edit(text, doc)
        local k = rand(6)
        local spans = {}
        for _, s in pairs(doc and doc.spans or {}) do
            spans[#spans + 1] = s
        end
        if k <= 3 and #spans > 0 then
            local s = pick(spans)
            local n = #s.texts
            if k == 1 and n > 0 then -- replace an element
                local i = rand(n)
                return text:sub(1, s.starts[i]) .. element() .. text:sub(s.ends[i] + 2)
            elseif k == 2 then -- insert one
                local i = rand(0, n)
                local at = i == 0 and s.open + 1 or s.ends[i] + 1
                local piece = n == 0 and element() or (i == 0 and element() .. "," or "," .. element())
                return text:sub(1, at) .. piece .. text:sub(at + 1)
            elseif n > 0 then -- delete one (with a comma)
                local i = rand(n)
                local from, to = s.starts[i], s.ends[i]
                if i < n then
                    to = s.starts[i + 1] - 1
                elseif i > 1 then
                    from = s.ends[i - 1] + 1
                end
                return text:sub(1, from) .. text:sub(to + 2)
            end
        end
        -- a few random bytes anywhere (often not JSON any more)
        local at = rand(0, #text)
        local len = rand(0, 3)
        local bytes = {}
        for i = 1, rand(0, 3) do
            bytes[i] = pick({ "{", "}", "[", "]", ",", '"', "\\", " ", "a", "1", ":" })
        end
        return text:sub(1, at) .. table.concat(bytes) .. text:sub(at + len + 1)
    end

    it("splits the next text from the previous split as it splits it alone", function()
        math.randomseed(20261128)
        local checked, incremental = 0, 0
        for _ = 1, 300 do
            local text = document()
            local doc = json_split.split(text, ARRAYS)
            assert.is_table(doc, text)
            for _ = 1, 15 do
                local next_text = edit(text, doc)
                if rand(2) == 1 then
                    -- a second edit, anywhere: two changes far apart, as
                    -- a reload that folded two writes sees them
                    local mid = json_split.split(next_text, ARRAYS)
                    if mid then
                        next_text = edit(next_text, mid)
                    end
                end
                local alone = json_split.split(next_text, ARRAYS)
                local from_prev = json_split.split(next_text, ARRAYS, doc)
                if alone then
                    assert.is_table(from_prev, next_text)
                    same_doc(alone, from_prev)
                    -- and the pieces decode to what the whole text decodes to
                    local whole = cjson.decode(next_text)
                    local pieces = reassemble(alone)
                    if whole ~= nil then
                        assert.same(whole, pieces)
                    else
                        assert.is_nil(pieces, next_text)
                    end
                    checked = checked + 1
                    if alone.skeleton == doc.skeleton then
                        incremental = incremental + 1
                    end
                else
                    -- not JSON, or a shape it leaves to the decoder
                    assert.is_nil(from_prev, next_text)
                end
                if alone then
                    text, doc = next_text, alone
                end
            end
        end
        assert.is_true(checked > 1000)
        assert.is_true(incremental > 500)
    end)

    it("keeps the strings of the elements a change did not touch", function()
        local parts = {}
        for i = 1, 50 do
            parts[i] = '{"id":"r' .. i .. '"}'
        end
        local text = '{"routes":[' .. table.concat(parts, ",") .. '],"consumers":[{"id":"c"}]}'
        local doc = assert(json_split.split(text, ARRAYS))
        parts[20] = '{"id":"r20","x":1}'
        local text2 = '{"routes":[' .. table.concat(parts, ",") .. '],"consumers":[{"id":"c"}]}'
        local doc2 = assert(json_split.split(text2, ARRAYS, doc))
        assert.equal(doc.skeleton, doc2.skeleton)
        assert.equal('{"id":"r20","x":1}', doc2.elements.routes[20])
        assert.same(json_split.split(text2, ARRAYS), doc2)
        assert.equal(doc, json_split.split(text, ARRAYS, doc))
    end)
end)
