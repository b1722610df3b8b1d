-- README's "Writing a policy" shows the custom policy and its spec: they
-- must be these files as they are, so the example always runs and passes.
local gateway = require("helpers.gateway")
local proc = require("helpers.proc")

local function lua_blocks(text)
  local blocks = {}
  for body in text:gmatch("\n```lua\n(.-)\n```\n") do
    blocks[body] = true
  end
  return blocks
end

describe("README's custom policy example", function()
  local blocks = lua_blocks(assert(proc.read_file(gateway.root .. "/README.md")))

  for _, path in ipairs({ "spec/fixtures/policies-custom/api-version.lua",
                          "spec/03-policies/custom/api-version_spec.lua" }) do
    it("shows " .. path .. " as it is", function()
      local text = assert(proc.read_file(gateway.root .. "/" .. path)):gsub("\n+$", "")
      assert.is_true(blocks[text] == true, "README has no ```lua block equal to " .. path)
    end)
  end
end)
