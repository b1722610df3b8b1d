-- Reload sees a policy's helper modules: editing only a module that a
-- policy require()s (from its lua_path directory) changes what the policy
-- does after `moongate reload`, in every worker, without a restart.
local client = require("helpers.client")
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local eventually = proc.eventually

describe("reload with a changed policy helper", function()
    local gw, dir

    before_each(function()
        dir = proc.tmpdir()
        os.execute("mkdir -p " .. dir .. "/taglib")
        -- the policy: a response header whose value its helpers give
        proc.write_file(dir .. "/tagger.lua", [[
local lib = require("taglib")
return {
  name = "tagger", priority = 1, version = "1.0.0",
  schema = { type = "object", additionalProperties = false, properties = {} },
  access = function(_, ctx)
    ctx.resp:set_header("X-Tag", lib.tag())
  end,
}
]])
        proc.write_file(dir .. "/taglib/init.lua", [[
local words = require("taglib.words")
return { tag = function() return "lib-" .. words.word end }
]])
        proc.write_file(dir .. "/taglib/words.lua", 'return { word = "one" }')
        gw = gateway.start{
            workers = 2,
            node = { lua_path = { dir } },
            routes = {
                upstreams = { gateway.upstream("backend", gateway.mock()) },
                routes = { { id = "t", paths = { "/t/*" }, upstream = "backend",
                             policies = { { name = "tagger", conf = {} } } } },
            },
        }
    end)

    after_each(function()
        client.close_all()
        gateway.stop_all()
        proc.cleanup(dir)
    end)

    -- every worker answers with tag (new connections spread over workers)
    local function all_answer(tag)
        return eventually(function()
            for _ = 1, 8 do
                local res = client.get(gw.port, "/t/x", { Connection = "close" })
                if not res or res.status ~= 200 or res.headers["x-tag"] ~= tag then
                    return false
                end
            end
            return true
        end, 10)
    end

    it("runs the policy again with the helper's new source, the workers kept", function()
        assert.is_truthy(all_answer("lib-one"), gw:log_tail())
        local workers = gw:workers()
        -- the helper's helper changes: the policy file itself does not
        proc.write_file(dir .. "/taglib/words.lua", 'return { word = "two" }')
        local rc, out = gw:reload()
        assert.equal(0, rc, out)
        assert.is_truthy(all_answer("lib-two"), gw:log_tail())
        -- the direct helper changes
        proc.write_file(dir .. "/taglib/init.lua", 'return { tag = function() return "flat" end }')
        rc, out = gw:reload()
        assert.equal(0, rc, out)
        assert.is_truthy(all_answer("flat"), gw:log_tail())
        assert.same(workers, gw:workers())
    end)

    it("refuses a reload whose helper does not load, and keeps serving the old one", function()
        assert.is_truthy(all_answer("lib-one"), gw:log_tail())
        proc.write_file(dir .. "/taglib/words.lua", "return {")
        local rc, out = gw:reload()
        assert.equal(1, rc)
        assert.matches("taglib/words.lua", out)
        assert.is_truthy(all_answer("lib-one"), gw:log_tail())
    end)
end)
