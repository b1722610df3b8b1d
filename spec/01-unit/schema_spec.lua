local schema = require("moongate.schema")
local cjson = require("cjson.safe")


-- validates value against def; returns the formatted errors ({} when valid)
local function errors_of(def, value, prefix)
  local ok, errs = schema.compile(def):validate(value, prefix)
  if ok then
    return {}
  end
  return schema.format(errs)
end


describe("schema", function()

  describe("type", function()
    it("accepts each JSON type", function()
      assert.same({}, errors_of({ type = "string" }, "x"))
      assert.same({}, errors_of({ type = "number" }, 1.5))
      assert.same({}, errors_of({ type = "number" }, 2))
      assert.same({}, errors_of({ type = "integer" }, 2))
      assert.same({}, errors_of({ type = "boolean" }, false))
      assert.same({}, errors_of({ type = "array" }, { 1, 2 }))
      assert.same({}, errors_of({ type = "object" }, { a = 1 }))
      assert.same({}, errors_of({ type = "null" }, cjson.null))
    end)

    it("names the expected and the actual type", function()
      assert.same({ "expected integer, got string" },
                  errors_of({ type = "integer" }, "1"))
      assert.same({ "expected integer, got number" },
                  errors_of({ type = "integer" }, 1.5))
      assert.same({ "expected string, got boolean" },
                  errors_of({ type = "string" }, true))
      assert.same({ "expected object, got array" },
                  errors_of({ type = "object" }, { 1, 2 }))
      assert.same({ "expected array, got object" },
                  errors_of({ type = "array" }, { a = 1 }))
    end)

    it("rejects infinities and NaN as integers", function()
      assert.same({ "expected integer, got number" },
                  errors_of({ type = "integer" }, math.huge))
      assert.same({ "expected integer, got number" },
                  errors_of({ type = "integer" }, 0 / 0))
    end)

    it("accepts a list of types", function()
      local def = { type = { "string", "integer" } }
      assert.same({}, errors_of(def, "auto"))
      assert.same({}, errors_of(def, 4))
      assert.same({ "expected string or integer, got boolean" },
                  errors_of(def, true))
    end)

    it("treats an empty table as both an array and an object", function()
      assert.same({}, errors_of({ type = "array" }, cjson.decode("[]")))
      assert.same({}, errors_of({ type = "array" }, cjson.decode("{}")))
      assert.same({}, errors_of({ type = "object" }, cjson.decode("[]")))
      assert.same({}, errors_of({ type = "object" }, cjson.decode("{}")))
      assert.same({ "expected string, got empty array or object" },
                  errors_of({ type = "string" }, {}))
    end)

    it("treats a table with holes or extra keys as an object", function()
      assert.same({ "expected array, got object" },
                  errors_of({ type = "array" }, { [1] = "a", [3] = "c" }))
      assert.same({ "expected array, got object" },
                  errors_of({ type = "array" }, { "a", x = 1 }))
      assert.same({ "expected array, got object" },
                  errors_of({ type = "array" }, cjson.decode('{"1": "a"}')))
    end)

    it("rejects null unless the type allows it", function()
      assert.same({ "expected string, got null" },
                  errors_of({ type = "string" }, cjson.null))
      assert.same({}, errors_of({ type = { "string", "null" } }, cjson.null))
      assert.same({ "must not be null" }, errors_of({}, cjson.null))
    end)

    it("reports a missing value", function()
      assert.same({ "required field missing" },
                  errors_of({ type = "object" }, nil))
    end)
  end)

  describe("objects", function()
    local def = {
      type = "object",
      required = { "id" },
      additionalProperties = false,
      properties = {
        id = { type = "string" },
        port = { type = "integer" },
      },
    }

    it("reports missing required fields at the field's path", function()
      assert.same({ "id: required field missing" }, errors_of(def, { port = 1 }))
    end)

    it("reports required fields that have no properties entry", function()
      local d = { type = "object", required = { "name" } }
      assert.same({ "name: required field missing" }, errors_of(d, { x = 1 }))
      assert.same({}, errors_of(d, { name = 1 }))
    end)

    it("reports unknown fields when additionalProperties is false", function()
      assert.same({ "extra: unknown field", "zeta: unknown field" },
                  errors_of(def, { id = "a", zeta = 1, extra = true }))
    end)

    it("validates extra values against an additionalProperties schema", function()
      local d = { type = "object", additionalProperties = { type = "integer" } }
      assert.same({}, errors_of(d, { a = 1, b = 2 }))
      assert.same({ "b: expected integer, got string" },
                  errors_of(d, { a = 1, b = "2" }))
    end)

    it("allows unknown fields by default", function()
      local d = { type = "object", properties = { a = { type = "string" } } }
      assert.same({}, errors_of(d, { a = "x", b = 1 }))
    end)

    it("validates property values", function()
      assert.same({ "port: expected integer, got string" },
                  errors_of(def, { id = "a", port = "80" }))
    end)

    it("applies object keywords to an empty table", function()
      assert.same({ "id: required field missing" },
                  errors_of(def, cjson.decode("[]")))
    end)
  end)

  describe("defaults", function()
    local def = {
      type = "object",
      properties = {
        name = { type = "string", default = "anon" },
        tags = { type = "array", default = { "a", "b" } },
        timeouts = {
          type = "object",
          default = {},
          properties = {
            connect_ms = { type = "integer", default = 5000 },
            read_ms = { type = "integer", default = 60000 },
          },
        },
      },
    }

    it("fills missing fields in place, recursively", function()
      local v = schema.compile(def)
      local value = { timeouts = { read_ms = 10 } }
      assert.is_true(v:validate(value))
      assert.same({
        name = "anon",
        tags = { "a", "b" },
        timeouts = { connect_ms = 5000, read_ms = 10 },
      }, value)
    end)

    it("fills the defaults inside a default", function()
      local value = {}
      assert.is_true(schema.compile(def):validate(value))
      assert.same({ connect_ms = 5000, read_ms = 60000 }, value.timeouts)
    end)

    it("never shares a default table between values", function()
      local v = schema.compile(def)
      local a, b = {}, {}
      v:validate(a)
      v:validate(b)
      assert.are_not.equal(a.tags, b.tags)
      assert.are_not.equal(def.properties.tags.default, a.tags)
      a.tags[1] = "changed"
      assert.equal("a", b.tags[1])
      assert.equal("a", def.properties.tags.default[1])
    end)

    it("keeps values that are present", function()
      local value = { name = "bob", tags = {} }
      schema.compile(def):validate(value)
      assert.equal("bob", value.name)
      assert.same({}, value.tags)
    end)

    it("satisfies required with a default", function()
      local d = { type = "object", required = { "n" },
                  properties = { n = { type = "integer", default = 1 } } }
      local value = {}
      assert.is_true(schema.compile(d):validate(value))
      assert.equal(1, value.n)
    end)

    it("validates a filled default", function()
      local d = { type = "object",
                  properties = { n = { type = "integer", minimum = 5, default = 1 } } }
      assert.same({ "n: must be >= 5" }, errors_of(d, {}))
    end)
  end)

  describe("enum", function()
    it("accepts listed values only", function()
      local def = { type = "string", enum = { "a", "b" } }
      assert.same({}, errors_of(def, "b"))
      assert.same({ "must be one of: a, b" }, errors_of(def, "c"))
    end)

    it("compares numbers and tables", function()
      assert.same({}, errors_of({ enum = { 1, 2 } }, 2))
      assert.same({ "must be one of: 1, 2" }, errors_of({ enum = { 1, 2 } }, 3))
      local def = { enum = { { 1, 2 }, "x" } }
      assert.same({}, errors_of(def, { 1, 2 }))
      assert.equal(1, #errors_of(def, { 2, 1 }))
    end)
  end)

  describe("numbers", function()
    it("checks minimum and maximum", function()
      local def = { type = "integer", minimum = 1, maximum = 10 }
      assert.same({}, errors_of(def, 1))
      assert.same({}, errors_of(def, 10))
      assert.same({ "must be >= 1" }, errors_of(def, 0))
      assert.same({ "must be <= 10" }, errors_of(def, 11))
    end)

    it("checks exclusiveMinimum and exclusiveMaximum", function()
      local def = { type = "number", exclusiveMinimum = 0, exclusiveMaximum = 1 }
      assert.same({}, errors_of(def, 0.5))
      assert.same({ "must be > 0" }, errors_of(def, 0))
      assert.same({ "must be < 1" }, errors_of(def, 1))
    end)

    it("prints large bounds without an exponent", function()
      assert.same({ "must be <= 10485760" },
                  errors_of({ type = "integer", maximum = 10485760 }, 10485761))
      assert.same({ "must be >= 0.5" },
                  errors_of({ type = "number", minimum = 0.5 }, 0.25))
    end)
  end)

  describe("strings", function()
    it("checks minLength and maxLength", function()
      local def = { type = "string", minLength = 2, maxLength = 3 }
      assert.same({}, errors_of(def, "ab"))
      assert.same({ "length must be >= 2" }, errors_of(def, "a"))
      assert.same({ "length must be <= 3" }, errors_of(def, "abcd"))
    end)

    it("matches pattern as a Lua pattern", function()
      local def = { type = "string", pattern = "^[%w_%-%.]+$" }
      assert.same({}, errors_of(def, "my-id.v2"))
      assert.same({ 'does not match pattern "^[%w_%-%.]+$"' },
                  errors_of(def, "my id"))
    end)

    it("leaves pattern unanchored unless it says otherwise", function()
      assert.same({}, errors_of({ type = "string", pattern = "%d" }, "ab1c"))
      assert.equal(1, #errors_of({ type = "string", pattern = "%d" }, "abc"))
    end)
  end)

  describe("arrays", function()
    it("validates items with 0-based indexes", function()
      local def = { type = "array", items = { type = "integer" } }
      assert.same({}, errors_of(def, { 1, 2 }))
      assert.same({ "[1]: expected integer, got string" },
                  errors_of(def, { 1, "2" }))
    end)

    it("checks minItems and maxItems", function()
      local def = { type = "array", minItems = 1, maxItems = 2 }
      assert.same({ "must have at least 1 item" }, errors_of(def, {}))
      assert.same({ "must have at most 2 items" }, errors_of(def, { 1, 2, 3 }))
      assert.same({}, errors_of(def, { 1, 2 }))
    end)

    it("checks uniqueItems for scalars and tables", function()
      local def = { type = "array", uniqueItems = true }
      assert.same({}, errors_of(def, { "a", "b" }))
      assert.same({ "[2]: duplicate item, same as [0]" },
                  errors_of(def, { "a", "b", "a" }))
      assert.same({ "[1]: duplicate item, same as [0]" },
                  errors_of(def, { { x = 1 }, { x = 1 } }))
      assert.same({}, errors_of(def, { { x = 1 }, { x = 2 } }))
    end)
  end)

  describe("error paths", function()
    local def = {
      type = "object",
      properties = {
        routes = {
          type = "array",
          items = {
            type = "object",
            properties = {
              paths = { type = "array", items = { type = "string", pattern = "^/" } },
              headers = { type = "object",
                          additionalProperties = { type = "string" } },
            },
          },
        },
      },
    }

    it("joins nested arrays and objects", function()
      local value = { routes = { { paths = { "/a" } }, { paths = { "/b", 3 } } } }
      assert.same({ "routes[1].paths[1]: expected string, got number" },
                  errors_of(def, value))
    end)

    it("quotes keys that are not identifiers", function()
      local value = { routes = { { headers = { ["X-Id"] = 1, ['a"b'] = 2 } } } }
      local errs = errors_of(def, value)
      table.sort(errs)
      assert.same({
        'routes[0].headers["X-Id"]: expected string, got number',
        'routes[0].headers["a\\"b"]: expected string, got number',
      }, errs)
    end)

    it("starts every path with the prefix", function()
      assert.same({ "routes[0].policies[1].conf.routes[0].paths[0]: "
                    .. 'does not match pattern "^/"' },
                  errors_of(def, { routes = { { paths = { "x" } } } },
                            "routes[0].policies[1].conf"))
      assert.same({ "conf: expected object, got string" },
                  errors_of(def, "x", "conf"))
    end)

    it("returns the raw error records", function()
      local ok, errs = schema.compile(def):validate({ routes = { 1 } })
      assert.is_false(ok)
      assert.same({ { path = "routes[0]", message = "expected object, got number" } },
                  errs)
    end)

    it("reports every error, not only the first", function()
      local d = { type = "object", properties = {
        a = { type = "integer" }, b = { type = "string" } } }
      assert.same({ "a: expected integer, got string",
                    "b: expected string, got number" },
                  errors_of(d, { a = "1", b = 2 }))
    end)
  end)

  describe("oneOf", function()
    local def = {
      oneOf = {
        { type = "string", enum = { "auto" } },
        { type = "integer", minimum = 1 },
        { type = "object", properties = { n = { type = "integer", default = 1 } },
          additionalProperties = false },
      },
    }

    it("accepts a value matching exactly one branch", function()
      assert.same({}, errors_of(def, "auto"))
      assert.same({}, errors_of(def, 3))
    end)

    it("fills the defaults of the matching branch", function()
      local value = {}
      assert.is_true(schema.compile(def):validate(value))
      assert.same({ n = 1 }, value)
    end)

    it("does not fill defaults of branches that fail", function()
      local d = { type = "object", oneOf = {
        { properties = { a = { type = "integer" }, d = { default = 1 } },
          required = { "a" } },
        { properties = { b = { type = "integer" } }, required = { "b" } },
      } }
      local value = { b = 2 }
      assert.is_true(schema.compile(d):validate(value))
      assert.same({ b = 2 }, value)
    end)

    it("reports the errors of the one branch of the value's type", function()
      assert.same({ "must be >= 1" }, errors_of(def, 0))
      assert.same({ "x: unknown field" }, errors_of(def, { x = 1 }))
    end)

    it("names the allowed types when none fits", function()
      assert.same({ "expected string or integer or object, got boolean" },
                  errors_of(def, true))
    end)

    it("rejects a value matching two branches", function()
      local d = { oneOf = { { type = "integer" }, { type = "number" } } }
      assert.same({ "matches more than one allowed schema" }, errors_of(d, 1))
      assert.same({}, errors_of(d, 1.5))
    end)

    it("says so when several branches of the type fail", function()
      local d = { oneOf = { { type = "integer", minimum = 10 },
                            { type = "integer", maximum = 0 } } }
      assert.same({ "does not match any allowed schema" }, errors_of(d, 5))
    end)
  end)

  describe("anyOf", function()
    local def = { anyOf = { { type = "integer" }, { type = "number" },
                            { type = "string", minLength = 2 } } }

    it("accepts a value matching one or more branches", function()
      assert.same({}, errors_of(def, 1))
      assert.same({}, errors_of(def, 1.5))
      assert.same({}, errors_of(def, "ab"))
    end)

    it("reports like oneOf when nothing matches", function()
      assert.same({ "length must be >= 2" }, errors_of(def, "a"))
      assert.same({ "expected integer or number or string, got boolean" },
                  errors_of(def, false))
    end)
  end)

  describe("check", function()
    it("runs a custom check with the value and the root", function()
      local seen_root
      local def = {
        type = "object",
        properties = {
          port = { type = "integer", check = function(v, root)
            seen_root = root
            if v % 2 == 1 then
              return false, "must be even"
            end
            return true
          end },
        },
      }
      local value = { port = 3 }
      assert.same({ "port: must be even" }, errors_of(def, value))
      assert.equal(value, seen_root)
      assert.same({}, errors_of(def, { port = 4 }))
    end)

    it("runs only after the structural checks pass", function()
      local calls = 0
      local def = { type = "object", required = { "a" },
                    properties = { a = { type = "integer" } },
                    check = function() calls = calls + 1; return false, "no" end }
      assert.same({ "a: expected integer, got string" },
                  errors_of(def, { a = "1" }))
      assert.equal(0, calls)
      assert.same({ "no" }, errors_of(def, { a = 1 }))
      assert.equal(1, calls)
    end)

    it("has a message when the check gives none", function()
      assert.same({ "invalid value" },
                  errors_of({ check = function() return false end }, 1))
    end)
  end)

  describe("compile", function()
    it("raises on unknown keywords, naming where", function()
      assert.has_error(function()
        schema.compile({ type = "object", properties = {
          a = { type = "string", requried = true } } })
      end, 'schema.properties.a: unknown keyword "requried"')
    end)

    it("raises on unknown types", function()
      assert.has_error(function()
        schema.compile({ type = "int" })
      end, 'schema: unknown type "int"')
    end)

    it("raises on malformed Lua patterns", function()
      assert.has_error(function()
        schema.compile({ type = "string", pattern = "[a" })
      end, "schema: pattern must be a valid Lua pattern")
    end)

    it("raises on a bad items or oneOf", function()
      assert.has_error(function()
        schema.compile({ items = { { type = "string" } } })
      end, "schema: items must be a schema (tuples are not supported)")
      assert.has_error(function()
        schema.compile({ oneOf = {} })
      end, "schema: oneOf must be a non-empty list of schemas")
    end)

    it("accepts a compiled validator and shared subschemas", function()
      local v = schema.compile({ type = "integer" })
      assert.equal(v, schema.compile(v))
      local shared = { type = "integer" }
      local nested = schema.compile({ type = "object",
        properties = { a = shared, b = shared, c = v } })
      assert.same({}, errors_of(nested, { a = 1, b = 2, c = 3 }))
      assert.same({ "a: expected integer, got string",
                    "c: expected integer, got string" },
                  errors_of(nested, { a = "x", c = "x" }))
    end)

    it("does not change the definition", function()
      local def = { type = "object", properties = { a = { default = { 1 } } } }
      local v = schema.compile(def)
      v:validate({})
      assert.same({ type = "object", properties = { a = { default = { 1 } } } }, def)
    end)
  end)

  describe("format", function()
    it("formats path and message", function()
      assert.same({ "a.b: bad", "bad too" },
                  schema.format({ { path = "a.b", message = "bad" },
                                  { path = "", message = "bad too" } }))
    end)
  end)
  describe("fill (a value known valid)", function()
    local def = {
      type = "object",
      properties = {
        name = { type = "string" },
        opts = { type = "object", default = {}, properties = {
          level = { type = "integer", default = 3 },
          tags = { type = "array", default = { "a" }, items = { type = "string" } },
        } },
        items = { type = "array", items = { type = "object", properties = {
          weight = { type = "integer", default = 1 },
        } } },
        map = { type = "object", additionalProperties = { type = "object", properties = {
          on = { type = "boolean", default = true },
        } } },
        either = { oneOf = { { type = "string" },
                             { type = "object", properties = { n = { type = "integer", default = 7 } } } } },
        req = { type = "object", required = { "must" }, properties = {
          must = { type = "string" }, d = { type = "string", default = "x" } } },
      },
    }

    it("fills the defaults validate fills, at every depth", function()
      local v = schema.compile(def)
      local text = '{"name":"n","items":[{},{"weight":5}],"map":{"k":{},"j":{"on":false}},'
                   .. '"either":{},"req":{"must":"m"}}'
      local a, b = cjson.decode(text), cjson.decode(text)
      assert.is_true((v:validate(a)))
      assert.is_true(v:fill(b))
      assert.same(a, b)
      assert.same({ level = 3, tags = { "a" } }, b.opts)
      assert.equal(1, b.items[1].weight)
      assert.is_true(b.map.k.on)
      assert.equal(7, b.either.n)
      assert.equal("x", b.req.d)
    end)

    it("runs no check: a value a check refuses is filled all the same", function()
      local v = schema.compile({ type = "object", properties = {
        s = { type = "string", check = function() return false, "no" end },
        d = { type = "integer", default = 2 } } })
      local value = { s = "x" }
      assert.is_true(v:fill(value))
      assert.equal(2, value.d)
      assert.is_false((v:validate({ s = "x" })))
    end)

    it("is false on a type the schema does not accept, or a required member missing", function()
      local v = schema.compile(def)
      assert.is_false(v:fill({ opts = { level = "3" } }))
      assert.is_false(v:fill({ opts = "x" }))
      assert.is_false(v:fill({ req = {} }))
      assert.is_false(v:fill("x"))
      assert.is_false(v:fill({ items = { { weight = cjson.null } } }))
    end)
  end)
end)
