-- Policy modules across reloads (policy_modules.lua): a module is run
-- again when its own source or a helper module it loaded (require()d from
-- the policy directories, or dofile'd) changed, and only then.
local policy_modules = require("moongate.policy_modules")
local config = require("moongate.config")

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function tmpdir()
  local p = assert(io.popen("mktemp -d"))
  local dir = p:read("*l")
  p:close()
  return dir
end

-- a policy whose tag comes from helper modules: tagger -> taglib -> tagbase
local function setup()
  local dir = tmpdir()
  os.execute("mkdir -p " .. dir .. "/taglib")
  write(dir .. "/tagger.lua", [[
local lib = require("taglib")
return { name = "tagger", priority = 1, version = "1", schema = { type = "object" },
         tag = function() return lib.tag end }
]])
  write(dir .. "/taglib/init.lua", [[
local base = require("taglib.base")
return { tag = "lib-" .. base.word }
]])
  write(dir .. "/taglib/base.lua", 'return { word = "one" }')
  write(dir .. "/doer.lua", [[
local h = dofile(debug.getinfo(1, "S").source:match("^@(.*)/") .. "/dohelp.lua")
return { name = "doer", priority = 1, version = "1", schema = { type = "object" }, word = h.word }
]])
  write(dir .. "/dohelp.lua", 'return { word = "a" }')
  return dir
end

describe("policy_modules", function()
  local dir
  before_each(function()
    dir = setup()
  end)
  after_each(function()
    os.execute("rm -rf " .. dir)
    package.loaded["taglib"], package.loaded["taglib.base"] = nil, nil
  end)

  it("runs a policy again when a helper it required (or one that helper required) changed", function()
    local modules = policy_modules.new()
    local m1 = modules:generation({ dir }).loader("tagger")
    assert.equal("lib-one", m1.tag())
    -- nothing changed: the same table, nothing run
    local loads = modules:load_count()
    assert.equal(m1, modules:generation({ dir }).loader("tagger"))
    assert.equal(loads, modules:load_count())
    -- the helper's helper changed: the policy and both helpers run again
    write(dir .. "/taglib/base.lua", 'return { word = "two" }')
    local m2 = modules:generation({ dir }).loader("tagger")
    assert.are_not.equal(m1, m2)
    assert.equal("lib-two", m2.tag())
    assert.equal("lib-one", m1.tag()) -- the old module keeps its own helpers
    -- the direct helper changed
    write(dir .. "/taglib/init.lua", 'return { tag = "flat" }')
    assert.equal("flat", modules:generation({ dir }).loader("tagger").tag())
  end)

  it("runs a policy again when a file it dofile'd changed", function()
    local modules = policy_modules.new()
    assert.equal("a", modules:generation({ dir }).loader("doer").word)
    write(dir .. "/dohelp.lua", 'return { word = "b" }')
    assert.equal("b", modules:generation({ dir }).loader("doer").word)
  end)

  it("a helper that no longer loads makes the policy fail to load, naming the file", function()
    local modules = policy_modules.new()
    assert.is_table(modules:generation({ dir }).loader("tagger"))
    write(dir .. "/taglib/base.lua", "return {")
    local ok, err = pcall(modules:generation({ dir }).loader, "tagger")
    assert.is_false(ok)
    assert.matches("tagger.lua: .*taglib/base.lua", err)
  end)

  it("moongate check's loader finds the same helpers", function()
    local mod = assert(config.policy_loader({ dir })("tagger"))
    assert.equal("lib-one", mod.tag())
  end)

  it("leaves require and dofile as they were", function()
    local req, dof = require, dofile
    policy_modules.new():generation({ dir }).loader("tagger")
    pcall(config.policy_loader({ dir }), "nosuch")
    assert.equal(req, require)
    assert.equal(dof, dofile)
  end)
end)
