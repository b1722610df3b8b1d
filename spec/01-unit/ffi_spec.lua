-- lua/moongate/ffi.lua's cdef must declare exactly what runtime/include/
-- moongate.h declares between its MG_CDEF markers: a drift would make Lua
-- call C with the wrong layout.
local binding = require("moongate.ffi")

local function normalize(s)
  s = s:gsub("/%*.-%*/", " ")        -- block comments
  s = s:gsub("//[^\n]*", " ")
  s = s:gsub("%s+", " ")
  s = s:gsub(" ?([%(%)%[%]{},;*=]) ?", "%1")
  return (s:gsub("^ ", ""):gsub(" $", ""))
end

describe("ffi binding", function()
  it("mirrors moongate.h between the MG_CDEF markers", function()
    local f = assert(io.open("runtime/include/moongate.h", "rb"))
    local header = f:read("*a")
    f:close()
    local body = header:match("/%* MG_CDEF_BEGIN %*/(.-)/%* MG_CDEF_END %*/")
    assert.is_truthy(body)
    assert.equal(normalize(body), normalize(binding.cdef))
  end)

  it("reaches the library's functions", function()
    assert.is_true(binding.C.mg_time_now() > 1.7e9)
    assert.equal(-2, binding.C.MG_AGAIN)
  end)
end)
