-- The router alone: lookups through fake mg_req_view_t cdata (what the
-- worker hands it), checked against README's precedence rules, and against
-- a plain linear-scan reference on random route tables.
local ffi = require("ffi")
require("moongate.ffi")
local router = require("moongate.router")
local deepcompare = require("luassert.util").deepcompare

local anchors = {} -- the strings the views point into stay alive

local function view(path, method, query)
  local v = ffi.new("mg_req_view_t")
  method = method or "GET"
  anchors[#anchors + 1] = path
  anchors[#anchors + 1] = method
  v.path, v.path_len = path, #path
  v.method, v.method_len = method, #method
  if query then
    anchors[#anchors + 1] = query
    v.query, v.query_len = query, #query
  end
  return v
end

-- the request "r" of these specs is a table: { host =, headers = {lower-cased name = value} }
local function header_of(r, name)
  return r.headers and r.headers[name]
end

local host_calls = 0
local function host_of(r)
  host_calls = host_calls + 1
  return r.host
end

local function build(routes)
  for i, r in ipairs(routes) do
    r.id = r.id or ("r" .. i)
  end
  -- records (exact paths and prefixes looked up before a walk) are made
  -- for large routers only; these small ones have them too, so that every
  -- spec checks them
  return router.new(routes, { header = header_of, records = true })
end

-- req: { path, method =, query =, host =, headers = }; returns the route
-- id (or nil), the entry and params
local function lookup(rt, req)
  if type(req) == "string" then
    req = { req }
  end
  local v = view(req[1], req.method, req.query)
  local route, entry = router.match(rt, v, host_of, req)
  return route and route.id, entry, entry and router.params(entry, v)
end

-- Two different 6-byte segments with one hash under mult (math.randomseed
-- fixed: 1 in 2^32 per pair, a collision within ~100k random strings; an
-- LCG's strings are as linear as the hash and never collide).
local function colliding_segments(mult)
  local seen = {}
  math.randomseed(7)
  for _ = 1, 1e6 do
    local b = {}
    for k = 1, 6 do
      b[k] = string.char(math.random(97, 122))
    end
    local s = table.concat(b)
    local h = router.segment_hash(s, mult)
    if seen[h] and seen[h] ~= s then
      return seen[h], s
    end
    seen[h] = s
  end
end

local function id_of(routes, req)
  return (lookup(build(routes), req))
end

describe("router", function()
  describe("paths", function()
    it("matches an exact path byte for byte", function()
      local rt = build({ { id = "ab", paths = { "/a/b" } } })
      assert.equal("ab", lookup(rt, "/a/b"))
      for _, p in ipairs({ "/a/b/", "/a/bc", "/a", "/a/b/c", "/A/b", "//a/b", "/a//b", "a/b", "" }) do
        assert.is_nil(lookup(rt, p), p)
      end
      local _, entry = lookup(rt, "/a/b")
      assert.equal("exact", entry.kind)
      assert.equal("/a/b", entry.path)
      -- paths longer than what a record holds inline (32 bytes), one added in place
      local long = "/" .. string.rep("x", 40) .. "/y"
      local routes = { { id = "long", paths = { long } }, { id = "long2", paths = { long .. "z" } } }
      rt = build(routes)
      assert.equal("long", lookup(rt, long))
      assert.equal("long2", lookup(rt, long .. "z"))
      assert.is_nil(lookup(rt, long:sub(1, -2) .. "z"))
      local new = { routes[1], routes[2], { id = "long3", paths = { long .. "/w" } } }
      router.apply(rt, assert(router.plan(rt, routes, new)))
      assert.equal("long3", lookup(rt, long .. "/w"))
      assert.is_nil(lookup(rt, long .. "/v"))
    end)

    it("keeps the trailing slash significant", function()
      local rt = build({ { id = "slash", paths = { "/a/b/" } }, { id = "bare", paths = { "/a/b" } },
                         { id = "root", paths = { "/" } } })
      assert.equal("slash", lookup(rt, "/a/b/"))
      assert.equal("bare", lookup(rt, "/a/b"))
      assert.equal("root", lookup(rt, "/"))
      assert.is_nil(lookup(rt, "/a/b//"))
      assert.is_nil(lookup(rt, "/a"))
    end)

    it("takes /a/* as /a and everything under /a/, never /ab", function()
      local rt = build({ { id = "a", paths = { "/a/*" } } })
      for _, p in ipairs({ "/a", "/a/", "/a/b", "/a/b/c/", "/a//x" }) do
        assert.equal("a", lookup(rt, p), p)
      end
      for _, p in ipairs({ "/ab", "/ab/c", "/", "/b/a", "/A" }) do
        assert.is_nil(lookup(rt, p), p)
      end
      local _, entry, params = lookup(rt, "/a/b")
      assert.equal("prefix", entry.kind)
      assert.equal(2, entry.len)
      assert.is_nil(params)
    end)

    it("takes /* as every path", function()
      local rt = build({ { id = "all", paths = { "/*" } } })
      for _, p in ipairs({ "/", "/x", "/x/y/", "", "*" }) do
        assert.equal("all", lookup(rt, p), p)
      end
      local _, entry = lookup(rt, "/x")
      assert.equal(0, entry.len)
    end)

    it("gives a route without paths every path", function()
      assert.equal("any", id_of({ { id = "any" } }, "/what/ever"))
    end)

    it("matches raw bytes: percent-encodings are not decoded, other bytes pass as they are", function()
      local rt = build({ { id = "enc", paths = { "/caf%C3%A9" } },
                         { id = "utf8", paths = { "/caf\xC3\xA9/*" } },
                         { id = "ab", paths = { "/a/b" } },
                         { id = "user", paths = { "/u/:name" } } })
      assert.equal("enc", lookup(rt, "/caf%C3%A9"))
      assert.is_nil(lookup(rt, "/caf%c3%a9"))
      assert.equal("utf8", lookup(rt, "/caf\xC3\xA9/menu"))
      assert.is_nil(lookup(rt, "/caf\xC3\xA8/menu"))
      assert.is_nil(lookup(rt, "/a%2Fb"))
      assert.is_nil(lookup(rt, "/a%2fb"))
      local _, _, params = lookup(rt, "/u/a%2Fb")
      assert.same({ name = "a%2Fb" }, params)
      _, _, params = lookup(rt, "/u/\xFF\x80")
      assert.same({ name = "\xFF\x80" }, params)
    end)
  end)

  describe("parameters", function()
    it("take one non-empty segment each", function()
      local rt = build({ { id = "u", paths = { "/users/:id" } },
                         { id = "l", paths = { "/orders/:order/lines/:line" } } })
      local id, entry, params = lookup(rt, "/users/42")
      assert.equal("u", id)
      assert.equal("param", entry.kind)
      assert.same({ id = "42" }, params)
      assert.same({ order = "o-1", line = "3" }, select(3, lookup(rt, "/orders/o-1/lines/3")))
      for _, p in ipairs({ "/users", "/users/", "/users/42/", "/users/42/x", "/users//",
                           "/orders/1/lines/", "/orders//lines/2", "/orders/1/line/2" }) do
        assert.is_nil(lookup(rt, p), p)
      end
    end)

    it("work before a /* prefix, and strip_prefix's length follows the value", function()
      local rt = build({ { id = "t", paths = { "/t/:tenant/*" } } })
      local id, entry, params = lookup(rt, "/t/acme/orders/1")
      assert.equal("t", id)
      assert.equal("prefix", entry.kind)
      assert.equal(#"/t/acme", entry.len)
      assert.same({ tenant = "acme" }, params)
      local _, entry2, params2 = lookup(rt, "/t/initech")
      assert.equal(#"/t/initech", entry2.len)
      assert.same({ tenant = "initech" }, params2)
      -- the first view is not changed by the second lookup
      assert.equal(#"/t/acme", entry.len)
      assert.is_nil(lookup(rt, "/t/"))
    end)

    it("of two routes sharing a parameter node keep their own names", function()
      local rt = build({ { id = "a", paths = { "/u/:id" } }, { id = "b", paths = { "/u/:uid/posts/:pid" } } })
      assert.same({ id = "7" }, select(3, lookup(rt, "/u/7")))
      assert.same({ uid = "7", pid = "9" }, select(3, lookup(rt, "/u/7/posts/9")))
    end)

    it("are tried when the literal branch dead-ends", function()
      local rt = build({ { id = "lit", paths = { "/a/b/c" } }, { id = "par", paths = { "/a/:x/d" } } })
      assert.equal("lit", lookup(rt, "/a/b/c"))
      local id, _, params = lookup(rt, "/a/b/d")
      assert.equal("par", id)
      assert.same({ x = "b" }, params)
    end)

    it("are kept by capture through later matches, and a match makes no garbage", function()
      local rt = build({ { id = "l", paths = { "/orders/:order/lines/:line" } },
                         { id = "t", paths = { "/t/:tenant/*" } },
                         { id = "x", paths = { "/x" } } })
      local v1, v2 = view("/orders/o-1/lines/3"), view("/t/acme/a/b")
      local _, e1 = router.match(rt, v1, host_of, {})
      local caps1 = router.capture(e1, {})
      local _, e2 = router.match(rt, v2, host_of, {})
      local caps2 = router.capture(e2, {})
      -- a third match, of other segments, then each request's own values
      local _, e3 = router.match(rt, view("/orders/zz/lines/999999"), host_of, {})
      assert.same({ order = "zz", line = "999999" }, router.params(e3, view("/orders/zz/lines/999999")))
      assert.same({ order = "o-1", line = "3" }, router.params(e1, v1, caps1))
      assert.same({ tenant = "acme" }, router.params(e2, v2, caps2))
      -- a capture table is reused: the next request's values overwrite it
      router.match(rt, v2, host_of, {})
      assert.equal(caps2, router.capture(e2, caps2))
      assert.same({ tenant = "acme" }, router.params(e2, v2, caps2))
      local vx = view("/x")
      local _, ex = router.match(rt, vx, host_of, {})
      assert.is_nil(ex.names)
      assert.is_nil(router.params(ex, vx))
      -- matching a route with parameters allocates nothing (the values are
      -- made only when asked for): compiled, as a worker runs it (the
      -- interpreter boxes the FFI pointers it reads)
      local r0 = {}
      local function loop(n)
        local e
        for _ = 1, n do
          _, e = router.match(rt, v1, host_of, r0)
        end
        return e
      end
      loop(2000)
      collectgarbage("collect")
      collectgarbage("stop")
      local before = collectgarbage("count")
      local e = loop(20000)
      local grown = collectgarbage("count") - before
      collectgarbage("restart")
      assert.equal("param", e.kind)
      -- (the eager tables were ~120 bytes a match: 2,300 KB here)
      assert.is_true(grown < 20, "KB made by 20,000 matches: " .. grown)
    end)
  end)

  -- Parameter records (router.lua "parameter records"): a pattern of one
  -- or two parameters is found from one record when nothing may beat it.
  -- These routers have records too (build: records = true).
  describe("parameter records", function()
    it("find patterns of one and two parameters, their values, and nothing else", function()
      local rt = build({ { id = "u", paths = { "/users/:id" } },
                         { id = "l", paths = { "/api/v2/:svc/items/:id/lines" } },
                         { id = "t", paths = { "/:tenant/a/b" } } })
      -- white box: the shapes looked up for paths of 2 and 6 segments
      assert.same({ 2 }, rt.x_shapes[rt.none * 256 + 2])
      assert.same({ 3 + 5 * 16 }, rt.x_shapes[rt.none * 256 + 6])
      assert.same({ id = "42" }, select(3, lookup(rt, "/users/42")))
      assert.same({ svc = "s", id = "9" }, select(3, lookup(rt, "/api/v2/s/items/9/lines")))
      assert.same({ tenant = "acme" }, select(3, lookup(rt, "/acme/a/b")))
      for _, p in ipairs({ "/users/", "/users//", "/api/v2//items/9/lines", "/api/v2/s/items//lines",
                           "/api/v2/s/items/9/line", "/api/v2/s/item/9/lines", "/api/v3/s/items/9/lines",
                           "/api/v2/s/items/9/lines/", "/api/v2/s/xitems/9/lines", "//a/b",
                           "/acme/a/bb", "/acme/a", "/acme/ab" }) do
        assert.is_nil(lookup(rt, p), p)
      end
    end)

    it("give way to what may beat them: an exact path, a prefix of a higher priority, another shape", function()
      local rt = build({ { id = "param", paths = { "/users/:id" } },
                         { id = "me", paths = { "/users/me" } },
                         { id = "vip", paths = { "/users/vip/*" }, priority = 1 },
                         { id = "org", paths = { "/:org/settings" }, priority = 2 },
                         { id = "deep", paths = { "/users/:id/posts" } } })
      assert.equal("param", lookup(rt, "/users/42"))
      assert.equal("me", lookup(rt, "/users/me"))
      assert.equal("vip", lookup(rt, "/users/vip"))
      assert.equal("org", lookup(rt, "/users/settings"))
      assert.equal("org", lookup(rt, "/acme/settings"))
      assert.same({ id = "7" }, select(3, lookup(rt, "/users/7/posts")))
    end)

    it("check the predicates of each request along the record's chain", function()
      local rt = build({ { id = "post", paths = { "/u/:id" }, methods = { "POST" } },
                         { id = "get", paths = { "/u/:uid" }, methods = { "GET" } },
                         { id = "lower", paths = { "/u/*" } } })
      assert.equal("post", lookup(rt, { "/u/1", method = "POST" }))
      local id, _, params = lookup(rt, { "/u/1", method = "GET" })
      assert.equal("get", id)
      assert.same({ uid = "1" }, params)
      assert.equal("lower", lookup(rt, { "/u/1", method = "PUT" }))
    end)

    it("of more shapes than are looked up per segment count, and of three parameters, are walked", function()
      local rt = build({ { id = "s1", paths = { "/:a/b/c" } }, { id = "s2", paths = { "/a/:b/c" } },
                         { id = "s3", paths = { "/a/b/:c" } }, { id = "s4", paths = { "/:a/:b/c" } },
                         { id = "s5", paths = { "/:a/b/:c" } }, { id = "s6", paths = { "/a/:b/:c" } },
                         { id = "s7", paths = { "/:a/:b/:c" } } })
      for path, want in pairs({ ["/a/b/c"] = "s1", ["/x/b/c"] = "s1", ["/a/x/c"] = "s2",
                                ["/a/b/x"] = "s3", ["/x/y/c"] = "s4", ["/x/b/y"] = "s5",
                                ["/a/x/y"] = "s6", ["/x/y/z"] = "s7" }) do
        assert.equal(want, lookup(rt, path), path)
      end
      assert.same({ a = "x", b = "y" }, select(3, lookup(rt, "/x/y/c")))
      assert.same({ a = "x", b = "y", c = "z" }, select(3, lookup(rt, "/x/y/z")))
    end)

    it("hold long literal runs elsewhere, and in place a router of short ones walks a long one", function()
      local long = "/organizations/:org/projects/:project/issue-comments" -- 38 bytes of runs
      local rt = build({ { id = "long", paths = { long } }, { id = "short", paths = { "/u/:id" } } })
      assert.is_false(rt.xp_inline) -- white box: the runs are in labels
      assert.same({ org = "o", project = "p" }, select(3, lookup(rt, "/organizations/o/projects/p/issue-comments")))
      assert.same({ id = "1" }, select(3, lookup(rt, "/u/1")))
      assert.is_nil(lookup(rt, "/organizations/o/projects/p/issue-comment"))
      -- (one of its path rank, for an update in place)
      local routes = { { id = "short", paths = { "/u/:id" } }, { id = "x", paths = { "/a/:b/c/:d/e" } } }
      rt = build(routes)
      assert.is_true(rt.xp_inline)
      local new = { routes[1], routes[2], { id = "long", paths = { long } } }
      local plan = router.plan(rt, routes, new)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.same({ org = "o", project = "p" }, select(3, lookup(rt, "/organizations/o/projects/p/issue-comments")))
      assert.same({ b = "1", d = "2" }, select(3, lookup(rt, "/a/1/c/2/e")))
    end)

    it("are kept up to date in place: a new route that beats one, a removed head", function()
      local p1 = { id = "p1", paths = { "/a/:x/c" }, methods = { "GET" } }
      local routes = { { id = "pad", paths = { "/pad" }, priority = 1 }, { id = "k", paths = { "/k/l/*" } },
                       p1, { id = "p2", paths = { "/a/:y/c" } } }
      local rt = build(routes)
      assert.equal("p1", lookup(rt, "/a/b/c"))
      -- a prefix of a higher priority on the record's way
      local new = { routes[1], routes[2], p1, routes[4], { id = "hi", paths = { "/a/b/*" }, priority = 1 } }
      local plan = router.plan(rt, routes, new)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal("hi", lookup(rt, "/a/b/c"))
      assert.equal("p1", lookup(rt, "/a/z/c"))
      -- another shape of a higher priority
      local new2 = { new[1], new[2], p1, new[4], new[5], { id = "hp", paths = { "/:w/z/c" }, priority = 1 } }
      plan = router.plan(rt, new, new2)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal("hp", lookup(rt, "/a/z/c"))
      assert.equal("p1", lookup(rt, "/a/y/c"))
      -- the record's head removed: the next of its chain
      local new3 = { new2[1], new2[2], new2[4], new2[5], new2[6] }
      plan = router.plan(rt, new2, new3)
      assert.is_table(plan)
      router.apply(rt, plan)
      local id, _, params = lookup(rt, "/a/y/c")
      assert.equal("p2", id)
      assert.same({ y = "y" }, params)
      -- a new parameter route at the record's own node, listed before p2
      local new4 = { new3[1], new3[2], { id = "p0", paths = { "/a/:z/c" } }, new3[3], new3[4], new3[5] }
      plan = router.plan(rt, new3, new4)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal("p0", lookup(rt, "/a/y/c"))
      -- a shape in a trie that had none (a new host's): route.c's copy of
      -- the shapes (white box: what it reads) has it after the update
      local function c_shapes(root, n)
        local c = rt.c
        for sl = 0, c.xshp_mask do
          if c.xshp[3 * sl] == root and c.xshp[3 * sl + 1] == n then
            return c.xshp[3 * sl + 2]
          end
        end
      end
      local new5 = { new4[1], new4[2], new4[3], new4[4], new4[5], new4[6],
                     { id = "q", hosts = { "h.test" }, paths = { "/q/:a/r" } } }
      plan = router.plan(rt, new4, new5)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal(2, c_shapes(rt.buckets.exact["h.test"], 3)) -- its parameter is segment 2
      local idq, _, paramsq = lookup(rt, { "/q/1/r", host = "h.test" })
      assert.equal("q", idq)
      assert.same({ a = "1" }, paramsq)
    end)
  end)

  describe("precedence", function()
    it("exact path over parameter over prefix", function()
      local routes = { { id = "prefix", paths = { "/users/*" } },
                       { id = "param", paths = { "/users/:id" } },
                       { id = "exact", paths = { "/users/me" } } }
      local rt = build(routes)
      assert.equal("exact", lookup(rt, "/users/me"))
      assert.equal("param", lookup(rt, "/users/42"))
      assert.equal("prefix", lookup(rt, "/users/42/x"))
      assert.equal("prefix", lookup(rt, "/users"))
    end)

    it("the longer prefix over the shorter", function()
      local rt = build({ { id = "short", paths = { "/a/*" } }, { id = "long", paths = { "/a/b/*" } },
                         { id = "root", paths = { "/*" } } })
      assert.equal("long", lookup(rt, "/a/b/c"))
      assert.equal("long", lookup(rt, "/a/b"))
      assert.equal("short", lookup(rt, "/a/bc"))
      assert.equal("short", lookup(rt, "/a"))
      assert.equal("root", lookup(rt, "/b"))
    end)

    it("more segments first, then more literal segments, then without /*", function()
      -- /a/:x/c has 3 segments: it beats /a/b/* (2) on /a/b/c
      assert.equal("params3", id_of({ { id = "lit2", paths = { "/a/b/*" } },
                                     { id = "params3", paths = { "/a/:x/c" } } }, "/a/b/c"))
      -- two segments each: the one with more literal segments wins
      assert.equal("me", id_of({ { id = "param", paths = { "/users/:id" } },
                                { id = "me", paths = { "/users/me/*" } } }, "/users/me"))
      -- same segments, same literals: without "/*" wins
      assert.equal("full", id_of({ { id = "star", paths = { "/u/:id/*" } },
                                  { id = "full", paths = { "/u/:id" } } }, "/u/1"))
    end)

    it("priority first, over host and path", function()
      local routes = { { id = "exact", paths = { "/a" }, hosts = { "api.example.com" } },
                       { id = "catchall", paths = { "/*" }, priority = 5 } }
      assert.equal("catchall", id_of(routes, { "/a", host = "api.example.com" }))
      routes[1].priority = 6
      assert.equal("exact", id_of(routes, { "/a", host = "api.example.com" }))
      assert.equal("neg", id_of({ { id = "neg", paths = { "/a" }, priority = -1 },
                                  { id = "zero", paths = { "/b" } } }, "/a"))
      assert.equal("zero", id_of({ { id = "neg", paths = { "/*" }, priority = -1 },
                                   { id = "zero", paths = { "/*" } } }, "/a"))
    end)

    it("exact host over wildcard over none, before the path", function()
      local routes = { { id = "none", paths = { "/a/b" } },
                       { id = "wild", paths = { "/a/*" }, hosts = { "*.example.com" } },
                       { id = "exact", paths = { "/*" }, hosts = { "api.example.com" } } }
      local rt = build(routes)
      assert.equal("exact", lookup(rt, { "/a/b", host = "api.example.com" }))
      assert.equal("wild", lookup(rt, { "/a/b", host = "www.example.com" }))
      assert.equal("none", lookup(rt, { "/a/b", host = "example.org" }))
      assert.equal("none", lookup(rt, { "/a/b" }))
    end)

    it("the route listed first among ties, then its first path", function()
      local routes = { { id = "first", paths = { "/x/*" } }, { id = "second", paths = { "/x/*" } } }
      assert.equal("first", id_of(routes, "/x/1"))
      assert.equal("a", id_of({ { id = "a", paths = { "/a/:x" } }, { id = "b", paths = { "/a/:y" } } }, "/a/1"))
      -- one route, two paths that tie: the first path's parameter names
      local rt2 = build({ { id = "two", paths = { "/b/:first", "/b/:second" } } })
      assert.same({ first = "1" }, select(3, lookup(rt2, "/b/1")))
      -- wildcard hosts tie with each other: the path decides, then the order
      local rt = build({ { id = "w1", paths = { "/*" }, hosts = { "*.example.com" } },
                         { id = "w2", paths = { "/p/*" }, hosts = { "*.b.example.com" } },
                         { id = "w3", paths = { "/*" }, hosts = { "a.*" } } })
      assert.equal("w2", lookup(rt, { "/p/1", host = "a.b.example.com" }))
      assert.equal("w1", lookup(rt, { "/q", host = "a.b.example.com" }))
      assert.equal("w3", lookup(rt, { "/q", host = "a.example.org" }))
    end)
  end)

  describe("hosts", function()
    it("matches *.example.com on any depth below it, and example.* on any ending", function()
      local rt = build({ { id = "sfx", hosts = { "*.example.com" } }, { id = "pfx", hosts = { "example.*" } } })
      assert.equal("sfx", lookup(rt, { "/", host = "a.example.com" }))
      assert.equal("sfx", lookup(rt, { "/", host = "a.b.example.com" }))
      assert.equal("pfx", lookup(rt, { "/", host = "example.com.evil.org" })) -- "example." + anything
      assert.is_nil(lookup(rt, { "/", host = "aexample.com" }))
      assert.equal("pfx", lookup(rt, { "/", host = "example.org" }))
      assert.equal("pfx", lookup(rt, { "/", host = "example.co.uk" }))
      assert.is_nil(lookup(rt, { "/", host = "www.example.org" }))
      assert.is_nil(lookup(rt, { "/", host = "example" }))
      assert.is_nil(lookup(rt, { "/", host = "example." }))
      assert.is_nil(lookup(rt, { "/" }))
      -- "example.com" is both "example.*" and not "*.example.com"
      assert.equal("pfx", lookup(rt, { "/", host = "example.com" }))
    end)

    it("compares hosts lower-cased, and lets host-less routes take any host", function()
      local rt = build({ { id = "api", hosts = { "API.Example.com" }, paths = { "/x" } },
                         { id = "any", paths = { "/y" } } })
      assert.equal("api", lookup(rt, { "/x", host = "api.example.com" }))
      assert.is_nil(lookup(rt, { "/x", host = "other.example.com" }))
      assert.equal("any", lookup(rt, { "/y", host = "whatever.org" }))
    end)

    it("asks for the Host only when some route names hosts", function()
      local rt = build({ { id = "a", paths = { "/a" } } })
      host_calls = 0
      assert.equal("a", lookup(rt, { "/a", host = "x" }))
      assert.equal(0, host_calls)
      rt = build({ { id = "a", paths = { "/a" }, hosts = { "x" } } })
      assert.equal("a", lookup(rt, { "/a", host = "x" }))
      assert.equal(1, host_calls)
    end)
  end)

  describe("predicates", function()
    it("methods: GET-only and POST-only routes on one prefix coexist", function()
      local rt = build({ { id = "get", paths = { "/a/*" }, methods = { "GET", "HEAD" } },
                         { id = "post", paths = { "/a/*" }, methods = { "POST" } } })
      assert.equal("get", lookup(rt, { "/a/1", method = "GET" }))
      assert.equal("get", lookup(rt, { "/a/1", method = "HEAD" }))
      assert.equal("post", lookup(rt, { "/a/1", method = "POST" }))
      assert.is_nil(lookup(rt, { "/a/1", method = "PUT" }))
    end)

    it("a failing candidate falls through to the next: shorter prefix, wildcard host, lower priority", function()
      local rt = build({
        { id = "long-post", paths = { "/a/b/*" }, methods = { "POST" } },
        { id = "short", paths = { "/a/*" } },
        { id = "exact-host-put", paths = { "/h" }, hosts = { "h.example.com" }, methods = { "PUT" } },
        { id = "wild-host", paths = { "/h" }, hosts = { "*.example.com" } },
        { id = "top-delete", paths = { "/*" }, methods = { "DELETE" }, priority = 9 },
        { id = "exact-get", paths = { "/p/q" }, methods = { "GET" } },
        { id = "param", paths = { "/p/:x" } },
      })
      assert.equal("long-post", lookup(rt, { "/a/b/c", method = "POST" }))
      assert.equal("short", lookup(rt, { "/a/b/c", method = "GET" }))
      assert.equal("exact-host-put", lookup(rt, { "/h", method = "PUT", host = "h.example.com" }))
      assert.equal("wild-host", lookup(rt, { "/h", method = "GET", host = "h.example.com" }))
      assert.equal("top-delete", lookup(rt, { "/a", method = "DELETE" }))
      assert.equal("short", lookup(rt, { "/a", method = "GET" }))
      assert.equal("exact-get", lookup(rt, { "/p/q", method = "GET" }))
      local id, _, params = lookup(rt, { "/p/q", method = "POST" })
      assert.equal("param", id)
      assert.same({ x = "q" }, params)
    end)

    it("headers: one value or a list, names in any case, a missing header fails", function()
      local rt = build({ { id = "canary", paths = { "/*" }, headers = { ["X-Canary"] = { "1", "true" } } },
                         { id = "beta", paths = { "/*" }, headers = { ["x-beta"] = "yes", ["x-tier"] = "gold" } },
                         { id = "stable", paths = { "/*" } } })
      assert.equal("canary", lookup(rt, { "/", headers = { ["x-canary"] = "1" } }))
      assert.equal("canary", lookup(rt, { "/", headers = { ["x-canary"] = "true" } }))
      assert.equal("stable", lookup(rt, { "/", headers = { ["x-canary"] = "TRUE" } }))
      assert.equal("stable", lookup(rt, { "/", headers = { ["x-canary"] = "1, 1" } }))
      assert.equal("beta", lookup(rt, { "/", headers = { ["x-beta"] = "yes", ["x-tier"] = "gold" } }))
      assert.equal("stable", lookup(rt, { "/", headers = { ["x-beta"] = "yes" } }))
      assert.equal("stable", lookup(rt, { "/" }))
    end)

    it("query: decoded values, one or a list; a repeated parameter needs every value allowed", function()
      local rt = build({ { id = "v2", paths = { "/api/*" }, query = { v = "2" } },
                         { id = "v34", paths = { "/api/*" }, query = { v = { "3", "4" }, beta = "" } },
                         { id = "api", paths = { "/api/*" } } })
      assert.equal("v2", lookup(rt, { "/api/x", query = "v=2" }))
      assert.equal("v2", lookup(rt, { "/api/x", query = "a=1&v=2&b" }))
      assert.equal("v2", lookup(rt, { "/api/x", query = "v=%32" }))
      assert.equal("v2", lookup(rt, { "/api/x", query = "v=2&v=2" }))
      assert.equal("api", lookup(rt, { "/api/x", query = "v=2&v=3" }))
      assert.equal("api", lookup(rt, { "/api/x", query = "v" }))
      assert.equal("api", lookup(rt, { "/api/x", query = "v=20" }))
      assert.equal("api", lookup(rt, { "/api/x" }))
      assert.equal("v34", lookup(rt, { "/api/x", query = "v=4&beta=" }))
      assert.equal("api", lookup(rt, { "/api/x", query = "v=4" }))
    end)
  end)

  describe("edge cases", function()
    it("no routes, and no match, give nil", function()
      assert.is_nil(id_of({}, "/"))
      assert.is_nil(id_of({ { paths = { "/a" } } }, "/b"))
      assert.is_nil(id_of({ { paths = { "/a" }, hosts = { "x.com" } } }, { "/a", host = "y.com" }))
    end)

    it("refuses a routes value that is not a list", function()
      assert.has_error(function() router.new(nil) end, "routes must be a list")
    end)

    it("never takes a segment whose hash collides with a route's for that route", function()
      local rt = build({ { id = "probe", paths = { "/x" } } })
      local mult = rt.mult
      local s1, s2 = colliding_segments(mult)
      assert.is_string(s1, "no colliding segments found")
      rt = build({ { id = "one", paths = { "/" .. s1 } }, { id = "pre", paths = { "/p/" .. s1 .. "/*" } },
                   { id = "par", paths = { "/q/:x/" .. s1 } } })
      -- s2 is in no route: the build keeps the first multiplier (the
      -- assertions below would otherwise test nothing)
      assert.equal(mult, rt.mult)
      assert.equal("one", lookup(rt, "/" .. s1))
      assert.is_nil(lookup(rt, "/" .. s2))
      assert.equal("pre", lookup(rt, "/p/" .. s1 .. "/z"))
      assert.is_nil(lookup(rt, "/p/" .. s2 .. "/z"))
      assert.equal("par", lookup(rt, "/q/1/" .. s1))
      assert.is_nil(lookup(rt, "/q/1/" .. s2))
      -- both as siblings: the build picks another multiplier, both match
      rt = build({ { id = "one", paths = { "/" .. s1 } }, { id = "two", paths = { "/" .. s2 } } })
      assert.are_not.equal(mult, rt.mult)
      assert.equal("one", lookup(rt, "/" .. s1))
      assert.equal("two", lookup(rt, "/" .. s2))
    end)

    it("does not keep state from one lookup to the next", function()
      local rt = build({ { id = "p", paths = { "/u/:id" } }, { id = "m", paths = { "/m" }, methods = { "POST" } },
                         { id = "q", paths = { "/q" }, query = { a = "1" } } })
      assert.equal("m", lookup(rt, { "/m", method = "POST" }))
      assert.is_nil(lookup(rt, { "/m", method = "GET" }))
      assert.equal("q", lookup(rt, { "/q", query = "a=1" }))
      assert.is_nil(lookup(rt, { "/q", query = "a=2" }))
      assert.same({ id = "1" }, select(3, lookup(rt, "/u/1")))
      assert.is_nil(select(3, lookup(rt, "/m")))
    end)
    it("starts each lookup anew after a predicate check raised in the one before", function()
      local boom = true
      local function header(r, name)
        if boom then
          error("header failed")
        end
        return r.headers and r.headers[name]
      end
      for _, records in ipairs({ true, false }) do
        boom = true
        local rt = router.new({ { id = "h", paths = { "/a/*" }, headers = { ["x-t"] = "1" } },
                                { id = "a", paths = { "/a/*" } }, { id = "b", paths = { "/b" } } },
                              { header = header, records = records })
        assert.has_error(function() router.match(rt, view("/a/x"), host_of, {}) end, "header failed")
        boom = false
        -- the walk stopped at "h"'s check is not gone on with for "/b"
        assert.equal("b", router.match(rt, view("/b"), host_of, {}).id)
        assert.equal("h", router.match(rt, view("/a/x"), host_of, { headers = { ["x-t"] = "1" } }).id)
        assert.equal("a", router.match(rt, view("/a/x"), host_of, {}).id)
      end
    end)

    it("keeps no router alive after its predicate check raised (a reload's old one is freed)", function()
      local weak = setmetatable({}, { __mode = "v" })
      do
        local rt = router.new({ { id = "h", paths = { "/a" }, headers = { ["x-t"] = "1" } } },
                              { header = function() error("header failed") end })
        weak[1] = rt
        assert.has_error(function() router.match(rt, view("/a"), host_of, {}) end, "header failed")
      end
      collectgarbage()
      collectgarbage()
      assert.is_nil(weak[1])
    end)

    it("looks up hosts and wildcards longer than 255 bytes", function()
      local long = string.rep("a", 300)
      local rt = build({ { id = "exact", hosts = { long .. ".com" }, paths = { "/" } },
                         { id = "sfx", hosts = { "*." .. long .. ".net" }, paths = { "/" } },
                         { id = "pfx", hosts = { long .. ".*" }, paths = { "/" } } })
      assert.equal("exact", lookup(rt, { "/", host = long .. ".com" }))
      assert.equal("sfx", lookup(rt, { "/", host = "x." .. long .. ".net" }))
      assert.equal("pfx", lookup(rt, { "/", host = long .. ".org" }))
      assert.is_nil(lookup(rt, { "/", host = long .. "b.org" }))
      assert.equal("pfx", lookup(rt, { "/", host = long .. ".net" })) -- "aaa.*" takes any ending
      assert.is_nil(lookup(rt, { "/", host = "b" .. long .. ".net" }))
    end)

    -- the walk's arrays (route.c's) are sized to the longest path and the
    -- most host buckets met so far: both grow past their first size
    it("walks paths of thousands of segments, and hosts of more wildcard buckets than the first room", function()
      local pat = {}
      for k = 1, 40 do
        pat[k] = ":p" .. k
      end
      for _, records in ipairs({ true, false }) do
        local rt = router.new({ { id = "deep", paths = { "/" .. table.concat(pat, "/") } },
                                { id = "a", paths = { "/a/*" } }, { id = "ab", paths = { "/a/b" } },
                                { id = "pb", paths = { "/:x/b/*" } } },
                              { header = header_of, records = records })
        local function id(path)
          local v = view(path)
          local route, entry = router.match(rt, v, host_of, {})
          return route and route.id, entry and router.params(entry, v)
        end
        local long = "/a" .. string.rep("/x", 5000)
        assert.equal("a", id(long))
        assert.equal("ab", id("/a/b"))
        assert.equal("pb", id("/z" .. "/b" .. string.rep("/y", 3000)))
        local vals = {}
        for k = 1, 40 do
          vals[k] = "v" .. k
        end
        local got, params = id("/" .. table.concat(vals, "/"))
        assert.equal("deep", got)
        assert.equal("v1", params.p1)
        assert.equal("v40", params.p40)
        assert.is_nil(id("/" .. table.concat(vals, "/") .. "/more"))
        assert.equal("a", id("/a")) -- short again after the long ones
      end
      -- 100 wildcard hosts *.a, *.a.a, ...: a Host of 100 dots has 100 buckets
      local routes = {}
      for k = 100, 1, -1 do
        routes[#routes + 1] = { id = "w" .. k, hosts = { "*" .. string.rep(".a", k) }, paths = { "/" } }
      end
      routes[#routes + 1] = { id = "none", paths = { "/" } }
      local rt = build(routes)
      local host = "x" .. string.rep(".a", 100)
      -- every wildcard matches; the one listed first wins
      assert.equal("w100", lookup(rt, { "/", host = host }))
      assert.equal("w3", lookup(rt, { "/", host = "x.a.a.a" }))
      assert.equal("none", lookup(rt, { "/", host = "x.b" }))
      assert.equal("w100", lookup(rt, { "/", host = host }))
    end)
  end)

  describe("route predicates in the config schema", function()
    local config = require("moongate.config")
    local function errors(route)
      local ok, errs = config.validate_routes({ routes = { route } },
                                              { policy_loader = function() return {} end })
      return ok and {} or errs
    end

    it("accepts headers and query as one value or a list of values", function()
      assert.same({}, errors({ id = "r", headers = { ["X-Canary"] = "1", ["x-tier"] = { "a", "b" } },
                               query = { v = "2", w = { "x", "" } } }))
      assert.same({}, errors({ id = "r", headers = {}, query = {} }))
    end)

    it("refuses other values and bad header names, naming the JSON path", function()
      assert.same({ 'routes[0].headers: invalid header name "bad name"' },
                  errors({ id = "r", headers = { ["bad name"] = "1" } }))
      assert.same({ "routes[0].headers.x: expected string or array, got number" },
                  errors({ id = "r", headers = { x = 1 } }))
      assert.same({ "routes[0].headers.x: must have at least 1 item" },
                  errors({ id = "r", headers = { x = {} } }))
      assert.same({ "routes[0].query.v[0]: expected string, got boolean" },
                  errors({ id = "r", query = { v = { true } } }))
      assert.same({ "routes[0].query.v[1]: duplicate item, same as [0]" },
                  errors({ id = "r", query = { v = { "1", "1" } } }))
    end)
  end)

  describe("updates in place (plan/apply)", function()
    -- routes, changed by edit(list) into a new list; returns the router
    -- of the first list updated to the second (and the plan)
    local function update(routes, edit)
      local rt = build(routes)
      local new = {}
      for i, r in ipairs(routes) do
        new[i] = r
      end
      edit(new)
      for i, r in ipairs(new) do
        r.id = r.id or ("n" .. i)
      end
      local plan = router.plan(rt, routes, new)
      if plan then
        router.apply(rt, plan)
      end
      return rt, plan
    end

    it("adds, removes and replaces routes, keeping precedence and listing order", function()
      local rt, plan = update({ { id = "a", paths = { "/x/*" } }, { id = "b", paths = { "/x/*" } },
                                { id = "c", paths = { "/y" } }, { id = "d", paths = { "/u/:id" } } },
        function(list)
          -- a replaced by a2 at its place: it still comes before b
          list[1] = { id = "a2", paths = { "/x/*" }, methods = { "POST" } }
          table.remove(list, 3) -- c gone
          table.insert(list, 1, { id = "z", paths = { "/z/*" }, hosts = { "*.example.com" } })
          list[#list + 1] = { id = "e", paths = { "/x/*" } }
        end)
      assert.is_table(plan)
      assert.equal("a2", (lookup(rt, { "/x/1", method = "POST" })))
      assert.equal("b", (lookup(rt, { "/x/1", method = "GET" })))
      assert.is_nil((lookup(rt, "/y")))
      local _, _, params = lookup(rt, "/u/42")
      assert.same({ id = "42" }, params)
      assert.equal("z", (lookup(rt, { "/z/q", host = "a.example.com" })))
      assert.is_nil((lookup(rt, { "/z/q", host = "example.org" })))
      assert.equal(5, rt.size)
    end)

    it("finds the buckets of a Host looked up before the change (the last Host's are kept)", function()
      local routes = { { id = "a", paths = { "/*" }, hosts = { "a.x.com" } }, { id = "none", paths = { "/p" } } }
      local rt = build(routes)
      assert.equal("a", lookup(rt, { "/q", host = "a.x.com" }))
      assert.is_nil(lookup(rt, { "/q", host = "b.x.com" }))
      assert.is_nil(lookup(rt, { "/q", host = "b.x.com" })) -- the kept buckets: none
      local new = { routes[1], routes[2], { id = "w", paths = { "/*" }, hosts = { "*.x.com" } },
                    { id = "b", paths = { "/*" }, hosts = { "b.x.com" } } }
      local plan = router.plan(rt, routes, new)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal("b", lookup(rt, { "/q", host = "b.x.com" }))
      assert.equal("w", lookup(rt, { "/q", host = "c.x.com" }))
      assert.equal("a", lookup(rt, { "/q", host = "a.x.com" }))
      assert.equal("a", lookup(rt, { "/q", host = "a.x.com" }))
      assert.equal("b", lookup(rt, { "/q", host = "b.x.com" }))
    end)

    it("lets a later listed route win among ties only when it is alone", function()
      local routes = { { id = "a", paths = { "/p" } }, { id = "b", paths = { "/p" } } }
      local rt = update(routes, function(list)
        table.remove(list, 1)
        list[#list + 1] = { id = "c", paths = { "/p" } }
      end)
      assert.equal("b", (lookup(rt, "/p")))
    end)

    it("gives an exact path to a new higher-priority prefix or parameter route that covers it", function()
      -- the exact path is found without a walk until something may beat it
      local function routes()
        return { { id = "e", paths = { "/a/b" } }, { id = "hi", paths = { "/zzz/*" }, priority = 10 },
                 { id = "k", paths = { "/k/:y" } } }
      end
      local rt, plan = update(routes(), function(list)
        list[#list + 1] = { id = "new", paths = { "/a/*" }, priority = 10 }
      end)
      assert.is_table(plan)
      assert.equal("new", (lookup(rt, "/a/b")))
      rt, plan = update(routes(), function(list)
        list[#list + 1] = { id = "newp", paths = { "/a/:x" }, priority = 10 }
      end)
      assert.is_table(plan)
      assert.equal("newp", (lookup(rt, "/a/b")))
      -- at the same priority the exact path keeps it
      rt, plan = update(routes(), function(list)
        list[#list + 1] = { id = "low", paths = { "/a/*" } }
      end)
      assert.is_table(plan)
      assert.equal("e", (lookup(rt, "/a/b")))
      assert.equal("low", (lookup(rt, "/a/c")))
    end)

    it("declines what it cannot do in place: reordered routes, a new priority or path shape", function()
      local a, b = { id = "a", paths = { "/a" } }, { id = "b", paths = { "/b" } }
      local _, plan = update({ a, b }, function(list) list[1], list[2] = list[2], list[1] end)
      assert.is_nil(plan)
      _, plan = update({ { id = "a", paths = { "/a" } } }, function(list)
        list[2] = { id = "p", paths = { "/p" }, priority = 5 }
      end)
      assert.is_nil(plan)
      _, plan = update({ { id = "a", paths = { "/a" } } }, function(list)
        list[2] = { id = "p", paths = { "/p/:x/y/*" } }
      end)
      assert.is_nil(plan)
    end)

    it("declines a new segment whose hash is a sibling's", function()
      local rt = build({ { id = "probe", paths = { "/x" } } })
      local mult = rt.mult
      local s1, s2 = colliding_segments(mult)
      assert.is_string(s1, "no colliding segments found")
      local routes = { { id = "probe", paths = { "/x" } }, { id = "one", paths = { "/" .. s1 } } }
      rt = build(routes)
      -- s2 is in no route yet: the build keeps the first multiplier (the
      -- plans below would otherwise test nothing)
      assert.equal(mult, rt.mult)
      local plan = router.plan(rt, routes, { routes[1], routes[2], { id = "two", paths = { "/" .. s2 } } })
      assert.is_nil(plan)
      -- and two new siblings that collide with each other
      plan = router.plan(rt, routes, { routes[1], routes[2], { id = "t1", paths = { "/q/" .. s1 } },
                                       { id = "t2", paths = { "/q/" .. s2 } } })
      assert.is_nil(plan)
    end)

    it("fills the room left between two listed routes, then declines", function()
      local routes = {}
      for i = 1, 3 do
        routes[i] = { id = "r" .. i, paths = { "/r" } }
      end
      local rt = build(routes)
      local list, applied = routes, 0
      for k = 1, 64 do
        -- insert right after the first route, each time
        local new = { list[1], { id = "i" .. k, paths = { "/r" } } }
        for i = 2, #list do
          new[#new + 1] = list[i]
        end
        local plan = router.plan(rt, list, new)
        if not plan then
          break
        end
        router.apply(rt, plan)
        applied = applied + 1
        list = new
        assert.equal("r1", (lookup(rt, "/r")))
      end
      assert.is_true(applied >= 8, "applied " .. applied)
      assert.is_true(applied < 64, "never ran out of room")
    end)

    it("adds siblings one at a time: in the node, then a table, then larger tables", function()
      -- /s/<x> for 1, 2 (a node's second child makes a table), 3, 5, 9,
      -- 17 children (each table more than half full is replaced); 24
      -- appends stay within the listing room at one place (~log2 of it)
      local list = { { id = "s1", paths = { "/s/c1" } } }
      local rt = build(list)
      for k = 2, 24 do
        local new = {}
        for i, r in ipairs(list) do
          new[i] = r
        end
        new[k] = { id = "s" .. k, paths = { "/s/c" .. k } }
        local plan = router.plan(rt, list, new)
        assert.is_table(plan, "update " .. k)
        router.apply(rt, plan)
        list = new
        for i = 1, k do
          assert.equal("s" .. i, (lookup(rt, "/s/c" .. i)))
        end
        assert.is_nil((lookup(rt, "/s/c" .. (k + 1))))
        assert.is_nil((lookup(rt, "/s/c0")))
      end
      -- and removed ones are gone while their siblings stay
      local new = {}
      for i = 1, 24, 2 do
        new[#new + 1] = list[i]
      end
      local plan = router.plan(rt, list, new)
      assert.is_table(plan)
      router.apply(rt, plan)
      for i = 1, 24 do
        assert.equal(i % 2 == 1 and "s" .. i or nil, (lookup(rt, "/s/c" .. i)), i)
      end
    end)
  end)

  describe("a large router", function()
    it("finds every route among 40,000 (its nodes then mapped on their own, for huge pages)", function()
      local routes = {}
      for k = 1, 40000 do
        routes[k] = { id = "r" .. k, paths = { "/svc-" .. k .. "/items" } }
      end
      routes[#routes + 1] = { id = "pre", paths = { "/svc-7/*" } }
      local rt = build(routes)
      assert.is_true(rt.mapped_bytes > 0) -- 80,000 nodes of 64 bytes: above the 4 MiB bound
      for k = 1, 40000, 97 do
        assert.equal("r" .. k, (lookup(rt, "/svc-" .. k .. "/items")))
        assert.is_nil((lookup(rt, "/svc-" .. k .. "/item")))
      end
      assert.equal("pre", (lookup(rt, "/svc-7/other")))
      assert.is_nil((lookup(rt, "/svc-40001/items")))
      -- updates land in the mapped arrays too
      local new = { { id = "first", paths = { "/svc-1/items" } } }
      for k, r in ipairs(routes) do
        new[k + 1] = r
      end
      local plan = router.plan(rt, routes, new)
      assert.is_table(plan)
      router.apply(rt, plan)
      assert.equal("first", (lookup(rt, "/svc-1/items")))
      assert.equal("r2", (lookup(rt, "/svc-2/items")))
    end)
  end)

  -- A plain reference: every (route, path, host) in precedence order, the
  -- first that matches wins. The router must agree on random tables.
  describe("agrees with a linear scan", function()
    local function seg_count(p)
      local n = 0
      for _ in p:gmatch("/") do
        n = n + 1
      end
      return n
    end

    local function ref_rank(path)
      local star = path:sub(-2) == "/*"
      local body = star and path:sub(1, -3) or path
      local params = 0
      for _ in body:gmatch("/:[%a_][%w_]*") do
        params = params + 1
      end
      if not star and params == 0 then
        return { 1, 0, 0, 0 }
      end
      local segs = seg_count(body)
      return { 0, segs, segs - params, star and 0 or 1 }
    end

    local function ref_path_match(pattern, path)
      local star = pattern:sub(-2) == "/*"
      local body = star and pattern:sub(1, -3) or pattern
      -- compare segment by segment
      local psegs, rsegs = {}, {}
      if body ~= "" then
        for s in (body:sub(2) .. "/"):gmatch("([^/]*)/") do
          psegs[#psegs + 1] = s
        end
      end
      if path:sub(1, 1) ~= "/" then
        return star and body == ""
      end
      for s in (path:sub(2) .. "/"):gmatch("([^/]*)/") do
        rsegs[#rsegs + 1] = s
      end
      if star then
        if #rsegs < #psegs then
          return false
        end
      elseif #rsegs ~= #psegs then
        return false
      end
      local params = {}
      for i, ps in ipairs(psegs) do
        local name = ps:match("^:([%a_][%w_]*)$")
        if name then
          if rsegs[i] == "" then
            return false
          end
          params[name] = rsegs[i]
        elseif ps ~= rsegs[i] then
          return false
        end
      end
      return true, params
    end

    local function ref_host_match(pattern, host)
      if not pattern then
        return true
      end
      if not host then
        return false
      end
      if pattern:sub(1, 2) == "*." then
        local sfx = pattern:sub(2)
        return #host > #sfx and host:sub(-#sfx) == sfx
      elseif pattern:sub(-2) == ".*" then
        local pfx = pattern:sub(1, -2)
        return #host > #pfx and host:sub(1, #pfx) == pfx
      end
      return pattern == host
    end

    local function ref_new(routes)
      local list = {}
      for ri, r in ipairs(routes) do
        for pi, p in ipairs(r.paths or { "/*" }) do
          for hi, h in ipairs(r.hosts or { false }) do
            local hr = not h and 0 or ((h:sub(1, 2) == "*." or h:sub(-2) == ".*") and 1 or 2)
            list[#list + 1] = { route = r, path = p, host = h or nil, prio = r.priority or 0, hr = hr,
                                pr = ref_rank(p), idx = { ri, pi, hi } }
          end
        end
      end
      table.sort(list, function(a, b)
        if a.prio ~= b.prio then return a.prio > b.prio end
        if a.hr ~= b.hr then return a.hr > b.hr end
        for k = 1, 4 do
          if a.pr[k] ~= b.pr[k] then return a.pr[k] > b.pr[k] end
        end
        for k = 1, 3 do
          if a.idx[k] ~= b.idx[k] then return a.idx[k] < b.idx[k] end
        end
        return false
      end)
      return list
    end

    local function ref_match(list, req)
      for _, e in ipairs(list) do
        local ok, params = ref_path_match(e.path, req[1])
        if ok and ref_host_match(e.host, req.host) then
          local m = e.route.methods
          local mok = not m
          for _, x in ipairs(m or {}) do
            if x == (req.method or "GET") then
              mok = true
            end
          end
          if mok then
            return e.route.id, params
          end
        end
      end
    end

    -- the mix of the random tables: segments per pattern (at most), one
    -- in param_one a parameter; the second mix has many parameter
    -- patterns of several shapes (parameter records, more shapes than are
    -- tried per segment count); applied: the changes made in place at
    -- least (the others bring a new priority or path shape)
    local MIXES = { { segs = 3, param_one = 6, name = "", applied = 300 },
                    { segs = 4, param_one = 3, name = ", most with parameters", applied = 200 } }
    for _, mix in ipairs(MIXES) do
    it("on 300 random tables of exact, prefix and parameter paths, hosts, methods and priorities"
       .. mix.name, function()
      local seed = 42
      local function rnd(n)
        seed = (seed * 1103515245 + 12345) % 2147483648
        return math.floor(seed / 65536) % n + 1
      end
      local SEGS = { "a", "b", "ab", "", "c" }
      local HOSTS = { "x.com", "a.x.com", "*.x.com", "x.*", "b.a.x.com" }
      local METHODS = { "GET", "POST" }
      local function rand_pattern()
        local n = rnd(mix.segs + 1) - 1
        local parts = {}
        for k = 1, n do
          local r = rnd(mix.param_one)
          parts[k] = r == mix.param_one and (":p" .. k) or SEGS[rnd(#SEGS)]
        end
        local p = "/" .. table.concat(parts, "/")
        if rnd(3) == 1 then
          p = (p == "/" and "" or p) .. "/*"
        end
        return p
      end
      local function rand_path()
        local n = rnd(mix.segs + 2) - 1
        local parts = {}
        for k = 1, n do
          parts[k] = rnd(5) == 1 and tostring(rnd(3)) or SEGS[rnd(#SEGS)]
        end
        return "/" .. table.concat(parts, "/")
      end
      local mismatches = {}
      for _ = 1, 300 do
        local routes = {}
        for i = 1, rnd(12) do
          local r = { id = "r" .. i, paths = {} }
          for k = 1, rnd(2) do
            local p = rand_pattern()
            local dup = false
            for _, q in ipairs(r.paths) do
              dup = dup or q == p
            end
            if not dup then
              r.paths[k] = p
            end
          end
          if rnd(3) == 1 then
            r.hosts = { HOSTS[rnd(#HOSTS)] }
          end
          if rnd(3) == 1 then
            r.methods = { METHODS[rnd(2)] }
          end
          if rnd(5) == 1 then
            r.priority = rnd(3) - 2
          end
          routes[i] = r
        end
        -- with records (looked up before a walk) and without
        local rts = { router.new(routes, { records = true }), router.new(routes, { records = false }) }
        local list = ref_new(routes)
        for _ = 1, 30 do
          local req = { rand_path(), host = rnd(4) > 1 and HOSTS[rnd(#HOSTS)]:gsub("%*", "q") or nil,
                        method = METHODS[rnd(2)] }
          local want, want_params = ref_match(list, req)
          for r = 1, 2 do
            local got, _, got_params = lookup(rts[r], req)
            local same_params = (next(want_params or {}) == nil and got_params == nil)
                                or (got_params ~= nil and deepcompare(want_params, got_params))
            if want ~= got or (want and not same_params) then
              mismatches[#mismatches + 1] = ("%s %s %s%s: want %s, got %s"):format(req.method,
                tostring(req.host), req[1], r == 1 and "" or " (no records)", tostring(want), tostring(got))
            end
          end
        end
      end
      assert.same({}, mismatches)
    end)
    end

    for _, mix in ipairs(MIXES) do
    it("after random changes applied in place, on 150 random tables" .. mix.name, function()
      local seed = 4242
      local function rnd(n)
        seed = (seed * 1103515245 + 12345) % 2147483648
        return math.floor(seed / 65536) % n + 1
      end
      local SEGS = { "a", "b", "ab", "", "c" }
      local HOSTS = { "x.com", "a.x.com", "*.x.com", "x.*", "b.a.x.com" }
      local METHODS = { "GET", "POST" }
      local serial = 0
      local function rand_route()
        serial = serial + 1
        local r = { id = "r" .. serial, paths = {} }
        for k = 1, rnd(2) do
          local n = rnd(mix.segs + 1) - 1
          local parts = {}
          for j = 1, n do
            parts[j] = rnd(mix.param_one) == mix.param_one and (":p" .. j) or SEGS[rnd(#SEGS)]
          end
          local p = "/" .. table.concat(parts, "/")
          if rnd(3) == 1 then
            p = (p == "/" and "" or p) .. "/*"
          end
          local dup = false
          for _, q in ipairs(r.paths) do
            dup = dup or q == p
          end
          if not dup then
            r.paths[k] = p
          end
        end
        if rnd(3) == 1 then
          r.hosts = { HOSTS[rnd(#HOSTS)] }
        end
        if rnd(3) == 1 then
          r.methods = { METHODS[rnd(2)] }
        end
        if rnd(8) == 1 then
          r.priority = rnd(2) - 1
        end
        return r
      end
      local function rand_path()
        local parts = {}
        for k = 1, rnd(mix.segs + 2) - 1 do
          parts[k] = rnd(5) == 1 and tostring(rnd(3)) or SEGS[rnd(#SEGS)]
        end
        return "/" .. table.concat(parts, "/")
      end
      local mismatches, applied, declined = {}, 0, 0
      for t = 1, 150 do
        local list = {}
        for i = 1, rnd(20) do
          list[i] = rand_route()
        end
        local opts = { records = t % 3 ~= 0 } -- mostly with records, kept up to date in place
        local rt = router.new(list, opts)
        for _ = 1, 8 do
          local new = {}
          for _, r in ipairs(list) do
            local c = rnd(8)
            if c == 1 then
              new[#new + 1] = rand_route() -- replaced
            elseif c == 2 then
              new[#new + 1] = rand_route() -- added before it
              new[#new + 1] = r
            elseif c ~= 3 then -- 3: removed
              new[#new + 1] = r
            end
          end
          if rnd(2) == 1 then
            new[#new + 1] = rand_route()
          end
          local plan = router.plan(rt, list, new)
          if plan then
            router.apply(rt, plan)
            applied = applied + 1
          else
            rt = router.new(new, opts)
            declined = declined + 1
          end
          list = new
          local ref = ref_new(list)
          for _ = 1, 20 do
            local req = { rand_path(), host = rnd(4) > 1 and HOSTS[rnd(#HOSTS)]:gsub("%*", "q") or nil,
                          method = METHODS[rnd(2)] }
            local want, want_params = ref_match(ref, req)
            local got, entry, got_params = lookup(rt, req)
            local same_params = (next(want_params or {}) == nil and got_params == nil)
                                or (got_params ~= nil and deepcompare(want_params, got_params))
            if want ~= got or (want and not same_params) or (got and entry.route.id ~= got) then
              mismatches[#mismatches + 1] = ("%s %s %s: want %s, got %s"):format(req.method,
                tostring(req.host), req[1], tostring(want), tostring(got))
            end
          end
        end
      end
      assert.same({}, mismatches)
      -- many made in place (the others bring a new priority or path shape
      -- to these small tables, and are built anew)
      assert.is_true(applied >= mix.applied, ("applied %d, declined %d"):format(applied, declined))
    end)
    end
  end)
end)
