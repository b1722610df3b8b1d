local slice = require("moongate.slice")

describe("slice", function()
  after_each(function()
    slice.finish()
  end)

  it("never yields outside the coroutine being sliced", function()
    slice.begin(0)            -- begun on the main coroutine: nothing to yield
    slice.check()
    local co = coroutine.create(function()
      slice.check()           -- another coroutine: not the sliced one
      return "done"
    end)
    assert.same({ true, "done" }, { coroutine.resume(co) })
  end)

  it("yields once the slice used its budget, and runs on when resumed", function()
    local steps = 0
    local co = coroutine.create(function()
      slice.begin(0)          -- a zero budget: every check yields
      for _ = 1, 3 do
        steps = steps + 1
        slice.check()
      end
      slice.finish()
      slice.check()           -- finished: no yield any more
      return "built"
    end)
    local yields = 0
    while true do
      local ok, res = coroutine.resume(co)
      assert.is_true(ok)
      if coroutine.status(co) == "dead" then
        assert.equal("built", res)
        break
      end
      yields = yields + 1
    end
    assert.equal(3, steps)
    assert.equal(3, yields)
  end)

  it("does not yield before the budget is used", function()
    local co = coroutine.create(function()
      slice.begin(10000)
      for _ = 1, 1000 do
        slice.check()
      end
      slice.finish()
      return "fast"
    end)
    local ok, res = coroutine.resume(co)
    assert.is_true(ok)
    assert.equal("fast", res)
    assert.equal("dead", coroutine.status(co))
  end)
end)
