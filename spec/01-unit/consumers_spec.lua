local consumers = require("moongate.consumers")

describe("consumers", function()
  local list = {
    { id = "alice", tenant = "acme", credentials = { ["key-auth"] = { key = "a-secret" } } },
    { id = "bob", credentials = { ["key-auth"] = { key = { "b1", "b2" } } } },
    { id = "carol" },
  }
  local c = consumers.new(list)

  it("finds a consumer by id", function()
    assert.equal("acme", c:get("alice").tenant)
    assert.is_nil(c:get("nobody"))
  end)

  it("finds a consumer by a credential, including one of several values", function()
    assert.equal("alice", c:find("key-auth", "key", "a-secret").id)
    assert.equal("bob", c:find("key-auth", "key", "b2").id)
    assert.is_nil(c:find("key-auth", "key", "nope"))
    assert.is_nil(c:find("jwt", "key", "a-secret"))
  end)
end)
