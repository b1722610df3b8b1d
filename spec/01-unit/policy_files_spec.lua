-- Where a policy is looked for: one list shared by `moongate check`
-- (config.policy_loader) and the workers' reload (policy_modules).
local config = require("moongate.config")

describe("config.policy_files", function()
  it("searches lua_path in order, then the shipped policies/", function()
    assert.same({
      "/a/p.lua", "/a/p/init.lua", "/b/p.lua", "/b/p/init.lua",
      config.policies_dir .. "/p.lua", config.policies_dir .. "/p/init.lua",
    }, config.policy_files({ "/a", "/b" }, "p"))
  end)

  it("refuses names that are not policy names", function()
    assert.is_nil(config.policy_files({ "/a" }, "../etc/x"))
    assert.is_nil(config.policy_files({ "/a" }, "a/b"))
    assert.is_nil(config.policy_files({ "/a" }, 42))
  end)

  it("run_policy names the file when a module fails or returns no table", function()
    local ok, err = pcall(config.run_policy, function() error("boom", 0) end, "p", "/x/p.lua")
    assert.is_false(ok)
    assert.equal("/x/p.lua: boom", err)
    ok, err = pcall(config.run_policy, function() return 1 end, "p", "/x/p.lua")
    assert.is_false(ok)
    assert.equal("/x/p.lua: did not return a table", err)
    assert.same({ name = "p" }, config.run_policy(function(n) return { name = n } end, "p", "f"))
  end)
end)
