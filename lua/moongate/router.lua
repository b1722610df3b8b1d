-- Route matching: the routes of a config version compiled into segment
-- tries held in FFI arrays.
--
--   local rt = router.new(routes)            -- once per config version
--   local route, entry = router.match(rt, v, host_fn, r)
--   local params = router.params(entry, v)   -- before the next match
--   local caps = router.capture(entry, caps) -- or kept for later:
--   local params = router.params(entry, v, caps)
--
-- v is the request's mg_req_view_t; host_fn(r) gives its Host (lower-cased,
-- port stripped) or nil, and is called only when some route names hosts.
-- entry.kind is "exact", "prefix" or "param"; for "prefix", entry.len is
-- the length of the matched prefix (what strip_prefix drops); entry.path is
-- the pattern; entry.names, the names of its parameters (nil without any).
-- A match makes no Lua value (no garbage per lookup): the parameters'
-- values stay where they are in the path until asked for. params makes
-- the table of them (name -> value) from the last match; capture saves
-- where they are (two numbers a value, into a table reused from request to
-- request) so that params can make them after other matches, while v's
-- path lasts (the request's).
--
-- Precedence (README "Routing"). Each (route, path, host) is an entry with
-- one rank, ordered by
--   priority (higher first), host (exact > wildcard > none),
--   path (exact > more segments > more literal segments > without "/*"),
--   listing order (the route listed first, then its first path and host);
-- a request goes to the matching entry of lowest rank whose predicates
-- (methods, headers, query) pass. Predicates have no side effects, so
-- checking them in rank order, or only on candidates that could still win,
-- gives the same answer.
--
-- Layout. One trie per host bucket (each exact host, each wildcard host,
-- and one for the routes without hosts); a trie level is a path segment
-- (the bytes between two "/"). A node has literal children, found by
-- the hash of their segment: a single child in the node itself, more in a
-- children's table of the node's own (FFI, open addressing, at most half
-- full); and at most one parameter child, which takes any non-empty
-- segment. A node holds the entries whose pattern ends there, `exact` (the
-- path ends here) and `prefix` (the path ends here or goes on), chained
-- best first, and the lowest rank under it, so a walk skips what cannot
-- win. The nodes are one int32 array, 64 bytes a node with the segment's
-- bytes inline when they fit (16), made in listing order: the nodes of a
-- route's own part of the path are neighbours. A lookup in a large router
-- thus misses the caches about twice where the routes part (the slot of a
-- wide node's table, then the child) and once per cache line of the
-- route's own nodes and of its entry (ents: route, entry, predicates,
-- parameters side by side), whatever the number of routes; the nodes and
-- tables of a large router are in huge pages when the kernel gives them
-- (big_int32), so those misses are not TLB misses as well. The GC sees a
-- handful of objects instead of several per route. The segment is
-- compared byte for byte after the hash lookup (a request's segment may
-- collide with a route's); two segments of one node never share a hash
-- (new tries other multipliers until they do not).
--
-- The lookup is C's (runtime/src/route.c, through the FFI): it reads the
-- path once (segment boundaries, a multiply-add per byte), then per trie
-- its records (below) or else a walk: one probe (rarely more) and one
-- memcmp per segment, a branch per parameter child met: independent of
-- the number of routes. A walk in Lua was a loop nested in the request's
-- code, which LuaJIT made the root trace the rest of a lookup hung from:
-- lookups ran up to 2x slower from one process to the next, depending on
-- which requests came first. An entry with predicates stops the C walk
-- and is checked here (check_walk), then the walk goes on. A lookup
-- allocates nothing unless the winner has parameters (their values and
-- the params table), a query predicate is checked (the decoded query,
-- once) or a header predicate is (the header's value). The Host's
-- buckets are looked up in C too (hosts_sync): the exact host, then a
-- wildcard's suffix or prefix at each dot whose length some wildcard has,
-- by hashes of one pass over the Host each way: no string is made.
-- Build: O(total pattern length) and no sort of the entries, unless there
-- are so many priorities and path shapes that ranks pass 2^29.

local bit = require("bit")
local slice_check = require("moongate.slice").check
local ffi = require("ffi")
local binding = require("moongate.ffi")
local request = require("moongate.request")
local new_tab = require("table.new")

local C = binding.C
local ffi_cast = ffi.cast
local ffi_copy = ffi.copy
local ffi_string = ffi.string
local tobit = bit.tobit
local band = bit.band
local bor = bit.bor
local bxor = bit.bxor
local lshift = bit.lshift
local rshift = bit.rshift
local ipairs = ipairs
local pairs = pairs
local next = next
local type = type
local tonumber = tonumber
local error = error
local setmetatable = setmetatable
local sort = table.sort
local concat = table.concat
local sub = string.sub
local byte = string.byte
local lower = string.lower
local find = string.find
local match = string.match
local huge = math.huge
local floor = math.floor
local max = math.max
local header_of = request.header_of
local decode_args = request.decode_args

local _M = {}

local SLASH = byte("/")

-- A node: NODE int32 slots (64 bytes) of the nodes array, node k at k * NODE
-- (node 0 is "none"). runtime/src/route.c reads nodes and records by the
-- same numbers (written there again, but for MG_RT_*): change both.
local NODE = C.MG_RT_NODE -- 16
local N_MIN = 0        -- the lowest rank code (see ranks_of) in this subtree
local N_PARAM = 1      -- the parameter child, or 0
local N_EXACT = 2      -- the best entry whose pattern ends here, or 0
local N_PREFIX = 3     -- likewise for the "/*" patterns ending here
local N_LEN = 4        -- the length of the segment leading here (0: roots, parameters)
local N_OFF = 5        -- where that segment is in the labels array, when not inline
local N_EXACT_RANK = 6 -- the rank code of N_EXACT: a candidate is judged
local N_PREFIX_RANK = 7 -- without reading the entry arrays
-- the literal children: at most one is held in the node itself (most
-- nodes of a large router have one child, and then the walk reads no
-- other memory to find it); more are in a table of their own in the kid
-- array (open addressing, linear probing, at most half full): slot s is
-- karr[N_KOFF + 2s] (hash) and [+ 1] (child, 0: empty), and
-- karr[N_KOFF - 1] is the number of children
local N_KHASH = 8      -- the only child's segment hash (N_KMASK < 0)
local N_KID = 9        -- the only child, or 0
local N_KOFF = 10      -- the children's table (N_KMASK >= 0)
local N_KMASK = 11     -- its slot count - 1, or -1: at most one child, in the node
-- a root node has no segment: two of its inline slots tell route.c of its
-- records (see x_slot)
local N_XDEPTH = C.MG_RT_N_XDEPTH   -- the bnd index of its deepest prefix record's body
local N_XSHAPED = C.MG_RT_N_XSHAPED -- 1: it has parameter records (x_shapes_sync)
local INLINE_AT = 48   -- the byte offset of the inline segment in a node
local INLINE_MAX = 16  -- the longest inline segment
-- a record (see "records")
local XREC = C.MG_RT_XREC -- 16 int32 slots of a record
local X_KEY = 0        -- the mixed hash of (tag, path): xmix
local X_TAG = 1        -- root * 4 + kind (X_EXACT, X_PREFIX, X_PARAM); 0: the slot is empty
local X_HEAD = 2       -- the node's chain head (N_EXACT or N_PREFIX), or 0
local X_RANK = 3       -- its rank code
local X_LEN = 4        -- the path's length
local X_OFF = 5        -- where the path is in labels, when not inline
local X_BEAT = 6       -- 1: the head is not decisive
local X_FAR = 7        -- 1: a record whose home is this slot lies past the next
local X_NODE = 8       -- the trie node of the path (a parameter record's: x_pnode)
local X_INLINE_AT = 36 -- byte offset of the inline path in a record
local X_INLINE_MAX = 28
-- A parameter record (X_PARAM; see "parameter records") has X_LEN the
-- length of its literal runs, and
local X_P_PACK = 5     -- shape + l0 * 256 + l1 * 2^20: shape p1 + p2 * 16 (its
                       -- parameters' segment numbers; p2 0: one), l0 and l1 the
                       -- lengths of its first two runs
local X_P_OFF = 8      -- where its runs are in labels, in a router of long runs
local X_P_INLINE_AT = 32 -- else they are inline, from this byte offset
local X_P_INLINE_MAX = 32 -- (a router's runs are all inline or all in labels:
                          -- rt.xp_inline, route.c's xp_inline)
local X_P_SEGS_MAX = 255 -- segments of a pattern with a parameter record (a shape's key)
local X_P_RUN_MAX = 4095 -- the longest run
local X_SHAPES_MAX = 4 -- shapes looked at per trie and segment count; more have no records
local X_EXACT, X_PREFIX, X_PARAM = 0, 1, 2
local X_SPARE_MIN = 64 -- records kept for updates; an update needing more rebuilds
-- A router of fewer nodes has no records (router.new's opts.records):
-- its nodes (64 bytes each: 512 KiB, a core's L2 cache here) stay in the
-- CPU's caches, a walk misses little, and looking records up first costs
-- more instructions than it saves misses (bench/router.lua: 100 and 1,000
-- routes were ~20% slower with them, 10,000 ~15% faster, with the walk in
-- Lua; in C, 1,000 routes 249-419 ns with records, 358-418 without, in
-- two runs each: no clear gain for twice the memory)
local RECORDS_MIN_NODES = 8192
local X_BITS_PER = 16

local ID_STEP = 2 ^ 32 -- a child's key while building: parent * ID_STEP + segment hash
-- room kept for updates (plan/apply) past what a build used; an update
-- that needs more rebuilds
local NODE_SPARE_MIN = 256
local ENTRY_SPARE_MIN = 256
local LABEL_SPARE = 4096
local KID_SPARE_MIN = 4096 -- int32 slots
local RANK_MAX = 2 ^ 29 - 1 -- times 4 in a rank code

local int32_arr = ffi.typeof("int32_t[?]")
local uint8_arr = ffi.typeof("uint8_t[?]")
local uint8_ptr = ffi.typeof("uint8_t *")
local int32_ptr = ffi.typeof("int32_t *")

-- ---- compiling ------------------------------------------------------------

-- A large router's nodes are tens of MB: in 4 KiB pages, nearly every
-- node a lookup meets is a TLB miss as well as a cache miss (and under a
-- hypervisor a TLB miss is a two-level page walk). Arrays of HUGE_MIN bytes
-- or more are mapped on their own, 2 MiB aligned, and offered to the
-- kernel for transparent huge pages (madvise; nothing changes where THP
-- is off). Returns the int32 array (zeroed), what keeps it alive (munmap
-- when collected) and the bytes mapped (the GC does not count them).
local HUGE_PAGE = 2 * 1024 * 1024
local HUGE_MIN = 2 * HUGE_PAGE
local PROT_RW, MAP_PRIVATE_ANON, MADV_HUGEPAGE = 3, 0x22, 14
local MAP_FAILED = ffi_cast("void *", -1)

local function big_int32(n)
  local bytes = n * 4
  if bytes >= HUGE_MIN then
    -- one page more than needed, to start on a 2 MiB boundary
    local len = (floor((bytes - 1) / HUGE_PAGE) + 2) * HUGE_PAGE
    local p = C.mmap(nil, len, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
    if p ~= MAP_FAILED then
      local p8 = ffi_cast(uint8_ptr, p)
      local skew = tonumber(ffi_cast("uintptr_t", p) % HUGE_PAGE)
      local start = p8 + (skew == 0 and 0 or HUGE_PAGE - skew)
      C.madvise(start, len - HUGE_PAGE, MADV_HUGEPAGE) -- advice: failure is harmless
      local owner = ffi.gc(p8, function(q)
        C.munmap(q, len)
      end)
      return ffi_cast(int32_ptr, start), owner, len
    end
  end
  local a = int32_arr(n)
  return a, a, 0
end

-- char is signed on x86 and unsigned on ARM: the hash takes bytes as a
-- char of the C view reads them, so the walk needs no conversion
local CHAR_SIGNED = ffi.new("char[1]", { 255 })[0] < 0

-- The hash of a segment: h = (h * mult + byte) mod 2^32 (mult < 2^20 keeps
-- h * mult exact).
local function hash(s, mult)
  local h = 0
  for k = 1, #s do
    local b = byte(s, k)
    if b >= 128 and CHAR_SIGNED then
      b = b - 256
    end
    h = tobit(h * mult + b)
  end
  return h
end
_M.segment_hash = hash -- for specs: to make colliding segments

-- Multipliers tried in turn until no two segments of one node collide.
local MULTS = { 1000003, 999983, 786433, 524287, 393241, 262147, 196613, 131071 }

-- The home slot of a segment hash in a children's table: the high bits
-- folded in (the low bits of h depend on the low bits of the bytes only).
local function home(h, mask)
  return band(bxor(h, rshift(h, 16)), mask)
end

-- the slot count of a children's table for n children (at most half full)
local function kid_slots(n)
  local s = 4
  while s < 2 * n do
    s = s * 2
  end
  return s
end

-- The child of node whose segment hash is h, or 0 (not on the request
-- path: route.c has its own).
local function child_of(nodes, karr, node, h)
  local base = node * NODE
  local km = nodes[base + N_KMASK]
  if km < 0 then
    return nodes[base + N_KHASH] == h and nodes[base + N_KID] or 0
  end
  local off = nodes[base + N_KOFF]
  local s = home(h, km)
  while true do
    local c = karr[off + 2 * s + 1]
    if c == 0 or karr[off + 2 * s] == h then
      return c
    end
    s = band(s + 1, km)
  end
end

-- the number of literal children of node
local function kid_count(nodes, karr, node)
  local base = node * NODE
  if nodes[base + N_KMASK] < 0 then
    return nodes[base + N_KID] ~= 0 and 1 or 0
  end
  return karr[nodes[base + N_KOFF] - 1]
end

-- Writes a children's table of slots slots at karr[at] holding the pairs
-- list[1..2n] (hash, child); returns the int32s used.
local function write_kids(karr, at, list, n, slots)
  ffi.fill(karr + at, (1 + 2 * slots) * 4)
  karr[at] = n
  local off, mask = at + 1, slots - 1
  for k = 1, n do
    local h = list[2 * k - 1]
    local s = home(h, mask)
    while karr[off + 2 * s + 1] ~= 0 do
      s = band(s + 1, mask)
    end
    karr[off + 2 * s], karr[off + 2 * s + 1] = h, list[2 * k]
  end
  return 1 + 2 * slots
end

-- Splits a path pattern into segments (false for a parameter). Returns
-- kind, segments, names, parameter segment numbers, the literal body (when
-- there are no parameters) and the path rank (higher is better).
--   "/users/:id/posts" -> "param", { "users", false, "posts" }, { "id" }, { 2 }
--   "/a/*" -> "prefix", { "a" }, body "/a";  "/*" -> "prefix", {}, body ""
--   "/" -> "exact", { "" };  "/a/" -> "exact", { "a", "" }
local function parse_path(p)
  local star = sub(p, -2) == "/*"
  local body = star and sub(p, 1, -3) or p
  local segs, names, psegs = {}, {}, {}
  if body ~= "" then
    local pos = 2
    while true do
      local slash = find(body, "/", pos, true)
      local seg = sub(body, pos, (slash or #body + 1) - 1)
      local name = match(seg, "^:([%a_][%w_]*)$")
      if name then
        segs[#segs + 1] = false
        names[#names + 1] = name
        psegs[#psegs + 1] = #segs
      else
        segs[#segs + 1] = seg
      end
      if not slash then
        break
      end
      pos = slash + 1
    end
  end
  local n = #segs
  local kind = star and "prefix" or (#names > 0 and "param" or "exact")
  local rank
  if kind == "exact" then
    rank = 2 ^ 50
  else
    -- segment counts fit in 15 bits: a path is shorter than max_uri_bytes
    rank = n * 2 ^ 32 + (n - #names) * 2 ^ 16 + (star and 0 or 1)
  end
  return kind, segs, names, psegs, #names == 0 and body or nil, rank
end

-- Parsed paths are kept across builds: a reload rebuilds the router from
-- all routes, and parsing their paths again was ~40% of that. The results
-- are never modified after parsing, so builds share them. Bounded: the
-- cache starts over past PARSED_MAX paths.
local PARSED_MAX = 200000
local parsed, nparsed = {}, 0

local function parse_path_cached(p)
  local e = parsed[p]
  if not e then
    if nparsed >= PARSED_MAX then
      parsed, nparsed = {}, 0
    end
    e = { parse_path(p) }
    parsed[p] = e
    nparsed = nparsed + 1
  end
  return e[1], e[2], e[3], e[4], e[5], e[6]
end

-- The parameter record of a pattern of kind "param" (segments segs, with
-- false for a parameter): its shape and first two runs' lengths
-- (X_P_PACK) and its literal runs joined (the bytes before the first
-- parameter's "/", between the parameters, after the last; a parameter's
-- own slashes are where the request's segment bounds are). nil for a
-- pattern of more parameters, or one past 15 segments or X_P_RUN_MAX
-- (walked, as without records):
--   "/api/:v/items/:id" -> 2 + 4 * 16 + 4 * 256 + 6 * 2^20, "/api/items"
local param_recs = setmetatable({}, { __mode = "k" }) -- segs -> { pack, runs } or false

local function param_record(segs)
  local pr = param_recs[segs]
  if pr == nil then
    pr = false
    local ps, n = {}, #segs
    for k = 1, n do
      if not segs[k] then
        ps[#ps + 1] = k
      end
    end
    if #ps >= 1 and #ps <= 2 and ps[#ps] <= 15 and n <= X_P_SEGS_MAX then
      local p1, p2 = ps[1], ps[2] or 0
      local run = {}
      for k = 1, n do
        run[k] = segs[k] and "/" .. segs[k] or ""
      end
      local r0 = concat(run, "", 1, p1 - 1)
      local r1 = concat(run, "", p1 + 1, p2 > 0 and p2 - 1 or n)
      local r2 = p2 > 0 and concat(run, "", p2 + 1, n) or ""
      if #r0 <= X_P_RUN_MAX and #r1 <= X_P_RUN_MAX then
        pr = { p1 + p2 * 16 + #r0 * 256 + #r1 * 2 ^ 20, r0 .. r1 .. r2 }
      end
    end
    param_recs[segs] = pr
  end
  if pr then
    return pr[1], pr[2]
  end
end

-- host class (0 exact, 1 wildcard), bucket kind and bucket key
local function host_bucket(h)
  if sub(h, 1, 2) == "*." then
    return 1, "suffix", sub(h, 2) -- "*.example.com" -> ".example.com"
  elseif sub(h, -2) == ".*" then
    return 1, "prefix", sub(h, 1, -2) -- "example.*" -> "example."
  end
  return 0, "exact", h
end

local function by_name(a, b)
  return a.name < b.name
end

-- { name = value or list of values } -> list of { name =, allowed = set }
local function compile_values(t, lower_names)
  if not t or next(t) == nil then
    return nil
  end
  local list = {}
  for name, allowed in pairs(t) do
    local set = {}
    if type(allowed) == "table" then
      for _, a in ipairs(allowed) do
        set[a] = true
      end
    else
      set[allowed] = true
    end
    list[#list + 1] = { name = lower_names and lower(name) or name, allowed = set }
  end
  sort(list, by_name) -- checked in a fixed order
  return list
end

local function greater(a, b)
  return a > b
end

-- distinct values of list[1..n] -> their 0-based position, best first
local function dense(list, n)
  local seen, vals = {}, {}
  for i = 1, n do
    local x = list[i]
    if not seen[x] then
      seen[x] = true
      vals[#vals + 1] = x
    end
  end
  sort(vals, greater)
  local pos = {}
  for i, x in ipairs(vals) do
    pos[x] = i - 1
  end
  return pos, #vals
end

-- Rank codes of the n entries, into the int32 array ranks: the rank
-- (lower is better) times 4, plus 2 when the entry has parameters, plus 1
-- when it has predicates. Codes compare as ranks (they differ by 4 or
-- more) and tell what a candidate needs without reading its entry.
-- The rank is class * W + pos: the class one number from priority, host
-- class and path rank, each made dense (best first); pos = i * G, the
-- listing order spread over [G, W) with gaps of G, so that an update
-- (plan/apply) places a new entry between its listed neighbours without
-- renumbering the others. Returns the meta data that update needs, or nil
-- when the classes times n could pass 2^29: then ranks are ordinals from a
-- sort, and every change rebuilds.
local function ranks_of(ranks, n, prio, hclass, prank, preds, params)
  local ppos, np = dense(prio, n)
  local rpos, nr = dense(prank, n)
  local classes = np * 3 * nr
  if classes * (n + 1) * 2 <= RANK_MAX then
    local W = floor(RANK_MAX / classes)
    local G = floor(W / (n + 1))
    for i = 1, n do
      local rank = ((ppos[prio[i]] * 3 + hclass[i]) * nr + rpos[prank[i]]) * W + i * G
      ranks[i] = rank * 4 + (params[i] and 2 or 0) + (preds[i] and 1 or 0)
    end
    return { ppos = ppos, rpos = rpos, nr = nr, W = W }
  end
  local order = {}
  for i = 1, n do
    order[i] = i
  end
  sort(order, function(a, b)
    if prio[a] ~= prio[b] then
      return prio[a] > prio[b]
    elseif hclass[a] ~= hclass[b] then
      return hclass[a] < hclass[b]
    elseif prank[a] ~= prank[b] then
      return prank[a] > prank[b]
    end
    return a < b
  end)
  for r = 1, n do
    local i = order[r]
    ranks[i] = r * 4 + (params[i] and 2 or 0) + (preds[i] and 1 or 0)
  end
  return nil
end

-- The tries of the entries, or nil when two segments of one node have the
-- same hash under mult. t: what new gathered; returns nodes, labels, the
-- kid array (see N_KHASH), roots (bucket kind -> key -> node) and the
-- entry chains (next_entry). The nodes are made in listing order, so the
-- nodes only one route uses (most of them, in a large router) are next
-- to each other.
-- Chains entry e into node's exact or prefix chain, kept in rank order
-- (the lowest rank first; the node caches its head's rank). O(chain
-- length): routes sharing one path are few.
local function chain_entry(nodes, ranks, next_entry, node, e, rank, is_prefix)
  local slot = node * NODE + (is_prefix and N_PREFIX or N_EXACT)
  local head = nodes[slot]
  if head == 0 or rank < ranks[head] then
    next_entry[e] = head
    nodes[slot] = e
    nodes[node * NODE + (is_prefix and N_PREFIX_RANK or N_EXACT_RANK)] = rank
  else
    local prev = head
    while next_entry[prev] ~= 0 and ranks[next_entry[prev]] < rank do
      prev = next_entry[prev]
    end
    next_entry[e] = next_entry[prev]
    next_entry[prev] = e
  end
end

local function build_tries(t, mult)
  local n, ranks = t.n, t.ranks
  -- one more node's room to start the nodes on a 64-byte line
  local mem = int32_arr((t.max_nodes + 2) * NODE)
  local skew = tonumber(ffi_cast("uintptr_t", mem) % 64)
  local nodes8 = ffi_cast(uint8_ptr, mem) + (skew == 0 and 0 or 64 - skew)
  local nodes = ffi_cast(int32_ptr, nodes8)
  local labels = uint8_arr(t.label_bytes + t.label_spare + 1)
  local next_entry = int32_arr(t.entry_cap + 1)
  -- kids: the children while building; multi: node -> its children's
  -- (hash, child) pairs, for the nodes with more than one
  local kids, label_of, hashes, multi = {}, {}, {}, {}
  local xseen, xlist, pmin = {}, {}, {}
  local count, loff = 0, 0
  local buckets = { exact = {}, suffix = {}, prefix = {}, none = {} }

  local function new_node(seg, rank)
    count = count + 1
    local base = count * NODE
    nodes[base + N_MIN] = rank
    nodes[base + N_KMASK] = -1
    local len = #seg
    nodes[base + N_LEN] = len
    if len <= INLINE_MAX then
      ffi_copy(nodes8 + base * 4 + INLINE_AT, seg, len)
    else
      nodes[base + N_OFF] = loff
      ffi_copy(labels + loff, seg, len)
      loff = loff + len
    end
    label_of[count] = seg
    return count
  end

  local function link(node, h, child)
    local base = node * NODE
    local list = multi[node]
    if list then
      list[#list + 1], list[#list + 2] = h, child
    elseif nodes[base + N_KID] == 0 then
      nodes[base + N_KHASH], nodes[base + N_KID] = h, child
    else
      multi[node] = { nodes[base + N_KHASH], nodes[base + N_KID], h, child }
    end
  end

  for i = 1, n do
    if i % 256 == 0 then
      slice_check()
    end
    local rank = ranks[i]
    local set = buckets[t.bkind[i]]
    local key = t.bkey[i] or ""
    local node = set[key]
    if not node then
      node = new_node("", rank)
      set[key] = node
    elseif rank < nodes[node * NODE + N_MIN] then
      nodes[node * NODE + N_MIN] = rank
    end
    local segs = t.segs[i]
    local pdepth = t.pdepth[i] -- its first parameter segment, or false
    for k = 1, #segs do
      if pdepth and k <= pdepth then
        -- at or above where its parameter child hangs (see pmin)
        local pm = pmin[node]
        if not pm or rank < pm then
          pmin[node] = rank
        end
      end
      local seg = segs[k]
      local child
      if seg then
        local h = hashes[seg]
        if not h then
          h = hash(seg, mult)
          hashes[seg] = h
        end
        local ckey = node * ID_STEP + h
        child = kids[ckey]
        if not child then
          child = new_node(seg, rank)
          kids[ckey] = child
          link(node, h, child)
        elseif label_of[child] ~= seg then
          return nil -- two segments of this node share a hash
        end
      else
        child = nodes[node * NODE + N_PARAM]
        if child == 0 then
          child = new_node("", rank)
          nodes[node * NODE + N_PARAM] = child
        end
      end
      if rank < nodes[child * NODE + N_MIN] then
        nodes[child * NODE + N_MIN] = rank
      end
      node = child
    end
    local kind = t.kinds[i]
    chain_entry(nodes, ranks, next_entry, node, i, rank, kind == "prefix")
    local xk = kind == "exact" and X_EXACT or (kind == "prefix" and not pdepth and X_PREFIX)
               or (kind == "param" and param_record(segs) and X_PARAM)
    if xk and not xseen[4 * node + xk] then
      -- the node's record (see x_build): node, trie, kind, path or body
      -- (or literal runs), segments
      xseen[4 * node + xk] = true
      local n5 = #xlist
      xlist[n5 + 1], xlist[n5 + 2], xlist[n5 + 3] = node, set[key], xk
      local xpath
      if xk == X_EXACT then
        xpath = t.paths[i]
      elseif xk == X_PREFIX then
        xpath = sub(t.paths[i], 1, t.lens[i])
      else
        local _
        _, xpath = param_record(segs)
      end
      xlist[n5 + 4] = xpath
      xlist[n5 + 5] = segs -- a literal prefix's body has the pattern's segments
    end
  end
  -- the children's tables, and room for updates
  local kuse = 0
  for _, list in pairs(multi) do
    kuse = kuse + 1 + 2 * kid_slots(#list / 2)
  end
  local kcap = kuse + max(KID_SPARE_MIN, floor(kuse / 4))
  local karr, karr_mem, kmapped = big_int32(kcap + 1)
  kuse = 1 -- 0 is never a table's offset
  for node, list in pairs(multi) do
    local slots = kid_slots(#list / 2)
    local base = node * NODE
    nodes[base + N_KOFF], nodes[base + N_KMASK] = kuse + 1, slots - 1
    nodes[base + N_KHASH], nodes[base + N_KID] = 0, 0
    kuse = kuse + write_kids(karr, kuse, list, #list / 2, slots)
  end
  -- the bound above counted every segment of every entry; shared ones
  -- were made once: keep what was used, and room for updates
  local cap = count + max(NODE_SPARE_MIN, floor(count / 8))
  local used_p, used, mapped = big_int32((cap + 2) * NODE)
  skew = tonumber(ffi_cast("uintptr_t", used_p) % 64)
  local used8 = ffi_cast(uint8_ptr, used_p) + (skew == 0 and 0 or 64 - skew)
  ffi_copy(used8, nodes8, (count + 1) * NODE * 4)
  return ffi_cast(int32_ptr, used8), labels,
         { karr = karr, karr_mem = karr_mem, kuse = kuse, kcap = kcap + 1, mapped = mapped + kmapped,
           xlist = xlist, pmin = pmin },
         buckets, next_entry, count, used, cap, loff
end

-- ---- records: exact paths, literal prefixes, parameter shapes ------------------

-- In a large router nearly every node a lookup meets is a cache miss: the
-- slot of a wide node's children's table, the node it names, the nodes of
-- the route's own part of the path, then its entry. Records let most
-- lookups skip the walk. A record is kept for each node where exact
-- entries end (keyed by trie root and the whole path) and each node where
-- prefix entries without parameters end (keyed by root and the prefix's
-- body: "/a/*" -> "/a"): 64 bytes, the path inline (up to X_INLINE_MAX
-- bytes, else in labels), holding what the node holds of that chain (head
-- and its rank code, kept equal to N_EXACT / N_PREFIX and their ranks) and
-- whether the head is decisive: nothing else in the trie that could match
-- a path it matches has a better rank (X_BEAT 0, worked out by
-- x_refresh when the record or the trie changes; predicates ignored).
--
-- A lookup hashes the path once (one multiply-add per byte, as a
-- segment's hash), keeping the hash at each "/" (the prefixes' bodies).
-- For each trie, the exact record of the path is looked up, then, when
-- there is none, the prefix records from the longest body to the shortest:
-- a filter bitmap first (X_BITS_PER bits a record: small enough to stay in
-- the CPU's caches, so a body that is no record's rarely costs a miss),
-- then the record's line. A decisive head that passes its predicates (or
-- a decisive record whose rank cannot beat the best so far) decides the
-- trie without a walk; anything else walks it as without records (the
-- walk meets the same nodes; the rank already taken prunes it).
--
-- Why a decisive head wins: an exact head is beaten only by a prefix on
-- the path's way or a parameter pattern (X_BEAT: beaten()). A prefix
-- record P is looked at only once the path has no exact record and no
-- longer prefix record; then what could beat P's head is a prefix of a
-- higher priority on the way to P, or a parameter pattern: one through a
-- parameter child on the way, or one below P's node (pmin[node]: the best
-- rank of an entry with parameters whose parameter child hangs at or
-- below node along literal segments).
--
-- The table is at most half full. A lookup reads the home slot and the
-- next only (no loop in the walk's trace); a record placed further away
-- sets X_FAR in its home slot, and a lookup seeing it walks the trie.
-- Memory: 2-4 slots of 64 bytes and X_BITS_PER / 8 bytes per record.
--
-- Parameter records. A node where patterns of kind "param" with one or
-- two parameters end ("/users/:id/posts") has a record too, keyed by root,
-- shape (the parameters' segment numbers) and the path's key with the
-- parameters' segments left out (route.c param_look: the path's key, read once,
-- less the parameters' terms), holding the pattern's literal runs (the
-- request's bytes outside the parameters' segments must equal them, its
-- segment bounds being where the pattern's are). Per trie and segment
-- count, the shapes of its records (x_shapes, at most X_SHAPES_MAX) are
-- tried in turn when the path has no exact record, before the prefix
-- records. What could beat such a record's head on a path it matches is
-- a prefix on the way or a parameter pattern of the same segment count
-- (beaten walks every branch a matched path may take: at a parameter,
-- every child); not an exact path, which the exact record found first
-- (the walk's own answer is the same). An update marks the parameter
-- records of a trie whose shape a new prefix or parameter entry of a
-- better rank may match (x_psettle), as x_settle does for the others.
-- A request matching a record's head is thus decided from the record's
-- line, its runs and the entry, where a walk of a large router misses
-- the caches at each wide node and along the route's own nodes.

-- (path hash, tag) -> the record key; its low bits (the home slot, the
-- filter bit) depend on every bit of both. Products stay below 2^51,
-- where tobit is exact.
local function xmix(h, tag)
  local k = bxor(h, tobit(tag * 40503))
  k = tobit(bxor(k, rshift(k, 15)) * 113171)
  return bxor(k, rshift(k, 16))
end

-- segment -> hash under p_mult: a build keys and checks its records
-- along the same segments again and again (bounded: starts over past
-- PARSED_MAX)
local p_hashes, p_mult, p_nhashes = {}, 0, 0

local function seg_hash(seg, mult)
  if mult ~= p_mult or p_nhashes >= PARSED_MAX then
    p_hashes, p_mult, p_nhashes = {}, mult, 0
  end
  local h = p_hashes[seg]
  if not h then
    h = hash(seg, mult)
    p_hashes[seg] = h
    p_nhashes = p_nhashes + 1
  end
  return h
end

-- The key of a path (or prefix body) of literal segments segs: one
-- multiply-add per segment over the segments' hashes, so that a lookup
-- gets the key of each body of the path from its segments' (route.c).
-- Products stay below 2^51.
-- A parameter's segment (false) adds 0 (route.c param_look takes its term out
-- of the path's key).
local GMULT = 999331
local function body_key(segs, mult)
  local g = 0
  for k = 1, #segs do
    local seg = segs[k]
    g = tobit(g * GMULT + (seg and seg_hash(seg, mult) + 1 or 0))
  end
  return g
end

-- a * b mod 2^32 for int32 a, b (a split in halves: the products stay
-- below 2^48, where doubles are exact)
local function mulmod(a, b)
  return tobit(tobit(rshift(a, 16) * b) * 65536 + band(a, 0xffff) * b)
end

-- the bytes inline in a record of kind x of rt start at this byte
-- offset, this many at most; where the offset in labels is otherwise
local function x_inline(rt, kind)
  if kind == X_PARAM then
    return X_P_INLINE_AT, rt.xp_inline and X_P_INLINE_MAX or -1, X_P_OFF
  end
  return X_INLINE_AT, X_INLINE_MAX, X_OFF
end

-- the path bytes (the literal runs of a parameter record) of the record at base
local function x_path(rt, base)
  local xr = rt.xrec
  local n = xr[base + X_LEN]
  local at, max_inline, off = x_inline(rt, xr[base + X_TAG] % 4)
  if n <= max_inline then
    return ffi_string(rt.xrec8 + (base * 4 + at), n)
  end
  return ffi_string(rt.labels + xr[base + off], n)
end

-- the trie node of the record at base
local function x_node(rt, base)
  if rt.xrec[base + X_TAG] % 4 == X_PARAM then
    return rt.x_pnode[base]
  end
  return rt.xrec[base + X_NODE]
end

local function x_set_node(rt, base, node)
  if rt.xrec[base + X_TAG] % 4 == X_PARAM then
    rt.x_pnode[base] = node
  else
    rt.xrec[base + X_NODE] = node
  end
end

-- the label of node k
local function label_at(rt, k)
  local base = k * NODE
  local n = rt.nodes[base + N_LEN]
  if n <= INLINE_MAX then
    return ffi_string(rt.nodes8 + (base * 4 + INLINE_AT), n)
  end
  return ffi_string(rt.labels + rt.nodes[base + N_OFF], n)
end

-- The slot (int32 offset) of the record (root, kind, path: its literal
-- segments segs; a parameter record's path is its literal runs), or nil;
-- with make, the record is made when missing (the room was checked:
-- x_build's capacity, plan's count). Not on the request path.
local function x_slot(rt, root, kind, path, segs, make)
  local tag = root * 4 + kind
  local m = xmix(body_key(segs, rt.mult), tag)
  local pack = 0
  if kind == X_PARAM then
    pack = tobit(param_record(segs))
  end
  local xr, mask = rt.xrec, rt.xmask
  local s = band(m, mask)
  local home_base = s * XREC
  local dist = 0
  while true do
    local base = s * XREC
    local t = xr[base + X_TAG]
    if t == 0 then
      if not make then
        return nil
      end
      local n = #path
      xr[base + X_KEY], xr[base + X_TAG], xr[base + X_LEN] = m, tag, n
      local at, max_inline, off = x_inline(rt, kind)
      if kind == X_PARAM then
        local shape = band(pack, 255)
        xr[base + X_P_PACK] = pack
        -- its shape is tried for the paths of its segment count (see
        -- "parameter records"); the trie's records, for x_psettle
        local key = root * 256 + #segs
        local list = rt.x_shapes[key] or {}
        local known = false
        for k = 1, #list do
          known = known or list[k] == shape
        end
        if not known and #list < X_SHAPES_MAX then
          list[#list + 1] = shape
          rt.x_shapes[key] = list
          rt.nodes[root * NODE + N_XSHAPED] = 1
          rt.xshp_dirty = true
        end
        local pl = rt.x_plist[root] or {}
        rt.x_plist[root] = pl
        pl[#pl + 1], pl[#pl + 2] = base, segs
      end
      if n <= max_inline then
        ffi_copy(rt.xrec8 + (base * 4 + at), path, n)
      else
        xr[base + off] = rt.loff
        ffi_copy(rt.labels + rt.loff, path, n)
        rt.loff = rt.loff + n
      end
      if dist > 1 then
        xr[home_base + X_FAR] = 1
      end
      if kind == X_PREFIX and #segs + 1 > rt.nodes[root * NODE + N_XDEPTH] then
        rt.nodes[root * NODE + N_XDEPTH] = #segs + 1
      end
      local b = band(m, rt.xbmask)
      local w = rshift(b, 5)
      rt.xbits[w] = bor(rt.xbits[w], lshift(1, b))
      rt.xn = rt.xn + 1
      return base
    end
    if t == tag and xr[base + X_KEY] == m and x_path(rt, base) == path
       and (kind ~= X_PARAM or xr[base + X_P_PACK] == pack) then
      return base
    end
    s = band(s + 1, mask)
    dist = dist + 1
  end
end

-- Whether the head (rank code R) of the prefix record of node (the body's
-- literal segments segs from root) may be beaten (see above).
local function prefix_beaten(rt, root, segs, node, R)
  local nodes = rt.nodes
  local a = root
  for idx = 1, #segs do
    local base = a * NODE
    if nodes[base + N_PREFIX] ~= 0 and nodes[base + N_PREFIX_RANK] < R then
      return true
    end
    local pc = nodes[base + N_PARAM]
    if pc ~= 0 and nodes[pc * NODE + N_MIN] < R then
      return true
    end
    a = child_of(nodes, rt.karr, a, hash(segs[idx], rt.mult))
  end
  assert(a == node, "router: a prefix record's node is not its body's")
  local pm = rt.pmin[node]
  return pm ~= nil and pm < R
end

-- Whether an entry of rank code below R, other than the chain of node
-- own (the record's), matches some path that the pattern of segments
-- segs (false: a parameter) matches, from segment idx at node a on: a
-- prefix on the way (a prefix ending at a node matches a path that ends
-- there or goes on with "/"), or a pattern ending where the path ends
-- that went through a parameter child (one of literal segments only is
-- an exact path: its record is looked up before). At a parameter, every
-- child is a way. Predicates are ignored (they may pass on another
-- request); N_MIN prunes what cannot beat R. Visits at most P_VISITS
-- nodes (then: beaten, which only costs lookups a walk), so that records
-- cost a build O(records), whatever the trie's shape. Not on the request
-- path. Exact records (segments all literal) and parameter records.
local P_VISITS = 256
local p_visits = 0
-- whether node c's label is seg (no string made)
local function label_is(rt, c, seg)
  local base = c * NODE
  local n = rt.nodes[base + N_LEN]
  return n == #seg and C.memcmp(n <= INLINE_MAX and rt.nodes8 + (base * 4 + INLINE_AT)
                                or rt.labels + rt.nodes[base + N_OFF], seg, n) == 0
end

local function beaten(rt, a, segs, idx, R, own, via_param)
  p_visits = p_visits + 1
  if p_visits > P_VISITS then
    return true
  end
  local nodes = rt.nodes
  local base = a * NODE
  if nodes[base + N_MIN] >= R then
    return false
  end
  if nodes[base + N_PREFIX] ~= 0 and nodes[base + N_PREFIX_RANK] < R then
    return true
  end
  if idx > #segs then
    return via_param and a ~= own and nodes[base + N_EXACT] ~= 0 and nodes[base + N_EXACT_RANK] < R
  end
  local seg = segs[idx]
  local pc = nodes[base + N_PARAM]
  if seg then
    local c = child_of(nodes, rt.karr, a, seg_hash(seg, rt.mult))
    if c ~= 0 and label_is(rt, c, seg) and beaten(rt, c, segs, idx + 1, R, own, via_param) then
      return true
    end
    return seg ~= "" and pc ~= 0 and beaten(rt, pc, segs, idx + 1, R, own, true)
  end
  if pc ~= 0 and beaten(rt, pc, segs, idx + 1, R, own, true) then
    return true
  end
  -- a parameter's segment may be any literal child's
  local km = nodes[base + N_KMASK]
  if km < 0 then
    local c = nodes[base + N_KID]
    return c ~= 0 and beaten(rt, c, segs, idx + 1, R, own, via_param)
  end
  local karr, off = rt.karr, nodes[base + N_KOFF]
  for sl = 0, km do
    local c = karr[off + 2 * sl + 1]
    if c ~= 0 and beaten(rt, c, segs, idx + 1, R, own, via_param) then
      return true
    end
  end
  return false
end

-- Sets the record at base from its node: head, rank and X_BEAT; and the
-- worst head rank of its trie (what an update compares a new entry with).
-- segs: the path's literal segments (true: parsed again)
local function x_refresh(rt, base, segs)
  local xr, nodes = rt.xrec, rt.nodes
  local node, tag = x_node(rt, base), xr[base + X_TAG]
  local root, kind = floor(tag / 4), tag % 4
  local nb = node * NODE
  local pre = kind == X_PREFIX
  local head = nodes[nb + (pre and N_PREFIX or N_EXACT)]
  local rank = head ~= 0 and nodes[nb + (pre and N_PREFIX_RANK or N_EXACT_RANK)] or 0
  xr[base + X_HEAD], xr[base + X_RANK] = head, rank
  if segs == true then
    -- the pattern was parsed when its entry was made: no new cache entry
    local _
    _, segs = parse_path_cached(x_path(rt, base) .. (kind == X_PREFIX and "/*" or ""))
  end
  local beat = false
  if head ~= 0 then
    if kind == X_EXACT or kind == X_PARAM then
      p_visits = 0
      beat = beaten(rt, root, segs, 1, rank, node, false)
    else
      beat = prefix_beaten(rt, root, segs, node, rank)
    end
  end
  xr[base + X_BEAT] = beat and 1 or 0
  if rank > (rt.x_worst[root] or 0) then
    rt.x_worst[root] = rank
  end
end

-- an int32 array of n zeroed slots starting on a 64-byte line; returns
-- it, what keeps it alive and the bytes mapped outside the GC's heap
local function aligned_int32(n)
  local p, owner, mapped = big_int32(n + 16)
  local skew = tonumber(ffi_cast("uintptr_t", p) % 64)
  return p + (skew == 0 and 0 or (64 - skew) / 4), owner, mapped
end

-- route.c's copy of rt.x_shapes: (root, segment count, shapes a byte each,
-- the first lowest) triples in an open-addressing table at most half full,
-- home slot (root * 2654435761 xor count) & mask. Made anew when a shape
-- was added (x_slot): by builds and updates, never by a lookup.
local HOME_MULT = tobit(2654435761)
local function x_shapes_sync(rt)
  local keys = 0
  for _ in pairs(rt.x_shapes) do
    keys = keys + 1
  end
  local slots = 4
  while slots < 2 * keys do
    slots = slots * 2
  end
  local t, mask = int32_arr(3 * slots), slots - 1
  for key, list in pairs(rt.x_shapes) do
    local root, n = floor(key / 256), key % 256
    local packed = 0
    for k = #list, 1, -1 do
      packed = bor(lshift(packed, 8), list[k])
    end
    local s = band(bxor(mulmod(root, HOME_MULT), n), mask)
    while t[3 * s] ~= 0 do
      s = band(s + 1, mask)
    end
    t[3 * s], t[3 * s + 1], t[3 * s + 2] = root, n, packed
  end
  rt.xshp = t -- kept alive by rt
  rt.c.xshp, rt.c.xshp_mask = t, mask
  rt.xshp_dirty = false
end

-- Makes rt's records from xlist (node, root, kind, path, segments: five
-- slots a record), with room for X_SPARE_MIN or an eighth more.
local function x_build(rt, xlist)
  local count = #xlist / 5
  local cap = count + max(X_SPARE_MIN, floor(count / 8))
  local slots = 4
  while slots < 2 * cap do
    slots = slots * 2
  end
  local bits = 32
  while bits < X_BITS_PER * cap do
    bits = bits * 2
  end
  local xr, xr_mem, mapped = aligned_int32(slots * XREC)
  rt.xrec, rt.xrec_mem, rt.xrec8 = xr, xr_mem, ffi_cast(uint8_ptr, xr)
  rt.xmask, rt.xcap, rt.xn = slots - 1, cap, 0
  rt.xbits, rt.xbmask = int32_arr(bits / 32), bits - 1
  -- per root: the worst head rank of its records (the deepest prefix
  -- record's body, which route.c looks at first, is in the root: N_XDEPTH)
  rt.x_worst = {}
  -- root * 256 + segment count -> the shapes of its parameter records;
  -- root -> its parameter records (slot, segments, ...)
  -- slot -> the node of a parameter record
  rt.x_shapes, rt.x_plist, rt.x_pnode = {}, {}, {}
  rt.mapped_bytes = rt.mapped_bytes + mapped
  for k = 1, #xlist, 5 do
    if k % 1280 == 1 then
      slice_check()
    end
    local segs = xlist[k + 4]
    local base = x_slot(rt, xlist[k + 1], xlist[k + 2], xlist[k + 3], segs, true)
    x_set_node(rt, base, xlist[k])
    x_refresh(rt, base, segs)
  end
  local c = rt.c
  c.xrec, c.xbits, c.xmask, c.xbmask = xr, rt.xbits, rt.xmask, rt.xbmask
  c.xp_inline = rt.xp_inline and 1 or 0
  x_shapes_sync(rt)
end

-- route.c's table of the host buckets (its host_roots): (key, length * 4
-- + kind, root, offset of the name in host_bytes) a slot, open addressing
-- at most half full, home slot xmix(hash, kind) & mask; the hash is
-- h * HMULT + byte over the name, from its last byte for a suffix. With
-- the lengths of the wildcards' suffixes and prefixes (bitmaps of
-- 0-255), and the host-less bucket. Made anew by new and by an update
-- that added a bucket, never by a lookup.
local HMULT = 1000003
local HOST_KIND = { exact = 0, suffix = 1, prefix = 2 }

local function name_hash(name, reverse)
  local h, n = 0, #name
  for k = 1, n do
    h = tobit(h * HMULT + byte(name, reverse and n + 1 - k or k))
  end
  return h
end

local function hosts_sync(rt)
  local c, buckets = rt.c, rt.buckets
  local count, bytes = 0, 0
  for kind in pairs(HOST_KIND) do
    for name in pairs(buckets[kind]) do
      count, bytes = count + 1, bytes + #name
    end
  end
  local slots = 4
  while slots < 2 * count do
    slots = slots * 2
  end
  local t, names = int32_arr(4 * slots), uint8_arr(bytes + 1)
  local mask, off = slots - 1, 0
  ffi.fill(c.sfx_lens, 32)
  ffi.fill(c.pfx_lens, 32)
  for kind, code in pairs(HOST_KIND) do
    local lens = kind == "suffix" and c.sfx_lens or kind == "prefix" and c.pfx_lens
    for name, root in pairs(buckets[kind]) do
      local n = #name
      local m = xmix(name_hash(name, kind == "suffix"), code)
      local s = band(m, mask)
      while t[4 * s + 2] ~= 0 do
        s = band(s + 1, mask)
      end
      t[4 * s], t[4 * s + 1], t[4 * s + 2], t[4 * s + 3] = m, n * 4 + code, root, off
      ffi_copy(names + off, name, n)
      off = off + n
      if lens and n <= 255 then
        local w = rshift(n, 5)
        local bits = bor(lens[w], lshift(1, n))
        lens[w] = bits < 0 and bits + 4294967296 or bits
      end
    end
  end
  rt.hosts, rt.host_bytes = t, names -- kept alive by rt
  c.hosts, c.host_bytes = t, names
  c.hosts_mask = count > 0 and mask or -1
  c.wild = (next(buckets.suffix) and 1 or 0) + (next(buckets.prefix) and 2 or 0)
  c.none = rt.none or 0
  rt.hosts_dirty = false
end

local DEFAULT_PATHS = { "/*" }
local NO_HOST = { false }

local function default_header(r, name)
  return header_of(C.mg_req_header, r, name)
end

-- routes: the validated routes list (not changed). opts.header: function(r,
-- name) giving a request header's value (default: the request's, as
-- ctx.req:header gives it). opts.records: true or false to have records
-- (see "records") or not whatever the size (default: from
-- RECORDS_MIN_NODES nodes on).
function _M.new(routes, opts)
  if type(routes) ~= "table" then
    error("routes must be a list", 2)
  end
  opts = opts or {}
  -- The entries, numbered in listing order. What a lookup needs of them is
  -- in arrays; the entry tables match returns are made on an entry's
  -- first match (a table per route would be most of the memory).
  local n = 0
  -- what a match reads of entry e, side by side (one cache line, or two
  -- neighbours, for the winner): ents[4e - 3] its route, [4e - 2] its
  -- entry table once made, [4e - 1] its predicates, [4e] its parameters'
  -- names and segment numbers (false without)
  local ents = {}
  local paths, kinds, lens = {}, {}, {}
  -- what ranks and places the entries (dropped after the build)
  local prio, hclass, prank, segments, bkind, bkey = {}, {}, {}, {}, {}, {}
  local has_preds, has_params, pdepth = {}, {}, {}
  local max_nodes, label_bytes = 0, 0
  local p_long = false -- some parameter record's runs are not inline
  local route_first = {} -- route -> its first entry (its entries follow it)
  local incremental = true
  -- method-only predicates and parameter lists repeat from route to route:
  -- one table for each distinct one
  local shared = {}
  for ri, route in ipairs(routes) do
    if ri % 128 == 0 then
      slice_check() -- a reload runs in slices between requests
    end
    local preds
    local headers = compile_values(route.headers, true)
    local query = compile_values(route.query, false)
    if route.methods and #route.methods > 0 then
      local key = "m " .. concat(route.methods, " ")
      preds = not (headers or query) and shared[key]
      if not preds then
        local methods = {}
        for _, m in ipairs(route.methods) do
          methods[m] = true
        end
        preds = { methods = methods, headers = headers, query = query }
        if not (headers or query) then
          shared[key] = preds
        end
      end
    elseif headers or query then
      preds = { headers = headers, query = query }
    end
    local hosts = route.hosts and #route.hosts > 0 and route.hosts or NO_HOST
    local route_paths = route.paths and #route.paths > 0 and route.paths or DEFAULT_PATHS
    if route_first[route] then
      incremental = false -- one table listed twice: updates go by route
    end
    route_first[route] = n + 1
    for _, p in ipairs(route_paths) do
      local kind, segs, names, psegs, body, path_rank = parse_path_cached(p)
      local info
      if not body then
        local key = "p " .. concat(names, " ") .. " " .. concat(psegs, " ")
        info = shared[key]
        if not info then
          info = { names = names, psegs = psegs }
          shared[key] = info
        end
      end
      for _, h in ipairs(hosts) do
        n = n + 1
        -- route and entry side by side: the winner costs one cache line
        ents[4 * n - 3], ents[4 * n - 2], ents[4 * n - 1], ents[4 * n] =
          route, false, preds or false, info or false
        paths[n], kinds[n] = p, kind
        lens[n] = kind == "prefix" and body and #body or false
        has_preds[n] = preds ~= nil
        has_params[n] = body == nil
        prio[n], prank[n], segments[n] = route.priority or 0, path_rank, segs
        if h then
          hclass[n], bkind[n], bkey[n] = host_bucket(lower(h))
        else
          hclass[n], bkind[n] = 2, "none"
        end
        max_nodes = max_nodes + 1 + #segs
        -- its record's path (exact) or body (prefix), when not inline
        if kind == "exact" and #p > X_INLINE_MAX then
          label_bytes = label_bytes + #p
        elseif kind == "prefix" and body and #body > X_INLINE_MAX then
          label_bytes = label_bytes + #body
        elseif kind == "param" then
          local _, runs = param_record(segs)
          if runs then
            label_bytes = label_bytes + #runs
            p_long = p_long or #runs > X_P_INLINE_MAX
          end
        end
        pdepth[n] = not body and psegs[1]
        for _, seg in ipairs(segs) do
          if seg and #seg > INLINE_MAX then
            label_bytes = label_bytes + #seg
          end
        end
      end
    end
  end
  local entry_cap = n + max(ENTRY_SPARE_MIN, floor(n / 8))
  local ranks = int32_arr(entry_cap + 1)
  local meta = ranks_of(ranks, n, prio, hclass, prank, has_preds, has_params)

  local t = { n = n, ranks = ranks, kinds = kinds, paths = paths, lens = lens, pdepth = pdepth,
              segs = segments, bkind = bkind,
              bkey = bkey, max_nodes = max_nodes, label_bytes = label_bytes,
              entry_cap = entry_cap, label_spare = LABEL_SPARE }
  local nodes, labels, kids, buckets, next_entry, count, mem, mult, node_cap, loff
  for _, m in ipairs(MULTS) do
    nodes, labels, kids, buckets, next_entry, count, mem, node_cap, loff = build_tries(t, m)
    if nodes then
      mult = m
      break
    end
  end
  if not nodes then
    error("router: segment hashes collide under every multiplier")
  end

  local rt = {
    none = buckets.none[""],
    -- the host buckets are looked up by route.c (hosts_sync)
    any_host = next(buckets.exact) ~= nil or next(buckets.suffix) ~= nil
               or next(buckets.prefix) ~= nil,
    nodes = nodes,
    nodes8 = ffi_cast(uint8_ptr, nodes),
    nodes_mem = mem, -- what nodes points into: keeps it alive
    labels = labels,
    karr = kids.karr,
    karr_mem = kids.karr_mem, -- what karr points into
    -- bytes of the arrays mapped outside the GC's heap (see big_int32)
    mapped_bytes = kids.mapped,
    kuse = kids.kuse, -- the kid array's int32s used, and its size
    kcap = kids.kcap,
    mult = mult,
    ents = ents,
    paths = paths,
    kinds = kinds,
    lens = lens,
    ranks = ranks,
    next_entry = next_entry,
    header = opts.header or default_header,
    size = n,
    node_count = count,
    -- what plan/apply need: the buckets by kind, the entry slots used and
    -- their room, the nodes' and labels' room, the rank meta data
    buckets = buckets,
    route_first = route_first,
    n = n,
    entry_cap = entry_cap,
    node_cap = node_cap,
    loff = loff,
    label_cap = t.label_bytes + LABEL_SPARE,
    meta = incremental and meta or nil,
    -- node -> the best rank of an entry with parameters whose parameter
    -- child hangs at or below it along literal segments (see "records")
    pmin = kids.pmin,
  }
  -- what route.c reads (x_build adds the records')
  local c = ffi.new("mg_router_t")
  c.nodes, c.karr, c.labels, c.ranks, c.next_entry = nodes, kids.karr, labels, ranks, next_entry
  c.mult = mult
  rt.c = c
  local records = opts.records
  if records == nil then
    records = count >= RECORDS_MIN_NODES
  end
  rt.xon = records
  hosts_sync(rt)
  rt.xp_inline = not p_long
  if records then
    x_build(rt, kids.xlist)
  end
  return rt
end

-- ---- updating -----------------------------------------------------------------

-- A config change usually adds, changes or removes a few routes of many:
-- plan(rt, old, new) works out, without changing rt, how to turn the
-- router of the route list old into that of new, and apply(rt, plan) does
-- it in place, in O(changed entries) (the walk below finds nothing stale:
-- a removed entry is unlinked from its chain; a node left empty stays,
-- and the lowest ranks kept in nodes may then be lower than what remains,
-- which only costs a candidate check). plan returns nil when the change
-- cannot be made in place; the caller builds anew then:
--   - the kept routes are not in the same order, or a route is listed twice;
--   - a new entry's priority or path rank is not among the router's
--     (ranks are dense over those), or its listing neighbours left no rank
--     between them (after ~log2(G) insertions at one place);
--   - the room kept for entries, nodes or label bytes would be passed;
--   - a new segment's hash is a sibling's (two segments of a node never
--     share one);
--   - more than MAX_CHANGED routes changed (a build is as cheap then).
-- plan is O(routes) pointer comparisons (the two lists are merged in
-- order) plus O(changed) work; it may yield (slice.check). apply does not
-- yield, allocate beyond the new entries' tables, or fail: what a request
-- sees is the old router or the new one. Requests never hold the router
-- across a yield (match is one call), so changing it in place is safe
-- once apply runs where the version is swapped.

local MAX_CHANGED = 512

local function route_count(route)
  local np = route.paths and #route.paths or 0
  local nh = route.hosts and #route.hosts or 0
  return (np > 0 and np or 1) * (nh > 0 and nh or 1)
end

-- the listing position of entry e (see ranks_of)
local function pos_of(rt, e)
  return floor(rt.ranks[e] / 4) % rt.meta.W
end

-- the record kind and path (exact) or body (prefix) of the entry d, or
-- nil (a pattern with parameters has none)
local function record_of(rt, d)
  if d.kind == "exact" then
    return X_EXACT, d.path
  elseif d.kind == "prefix" and d.len then
    return X_PREFIX, sub(d.path, 1, d.len)
  elseif d.kind == "param" then
    local pack, runs = param_record(d.segs)
    -- a router of inline runs has no record for longer ones (walked)
    if pack and (#runs <= X_P_INLINE_MAX or not rt.xp_inline) then
      return X_PARAM, runs
    end
  end
end

-- "/" .. segs[1..n] joined by "/", "" for n = 0: where a prefix ends, or
-- the node where a pattern's first parameter child hangs
local function literal_body(segs, n)
  return n == 0 and "" or "/" .. concat(segs, "/", 1, n)
end

-- The entries of route, as new() makes them: a list of descriptors.
local function describe(route)
  local out = {}
  local preds
  local headers = compile_values(route.headers, true)
  local query = compile_values(route.query, false)
  if route.methods and #route.methods > 0 then
    local methods = {}
    for _, m in ipairs(route.methods) do
      methods[m] = true
    end
    preds = { methods = methods, headers = headers, query = query }
  elseif headers or query then
    preds = { headers = headers, query = query }
  end
  local hosts = route.hosts and #route.hosts > 0 and route.hosts or NO_HOST
  local route_paths = route.paths and #route.paths > 0 and route.paths or DEFAULT_PATHS
  for _, p in ipairs(route_paths) do
    local kind, segs, names, psegs, body, path_rank = parse_path_cached(p)
    local info = not body and { names = names, psegs = psegs } or nil
    for _, h in ipairs(hosts) do
      local d = { route = route, path = p, kind = kind, segs = segs, info = info, preds = preds,
                  len = kind == "prefix" and body and #body or false,
                  prio = route.priority or 0, prank = path_rank }
      if h then
        d.hclass, d.bkind, d.bkey = host_bucket(lower(h))
      else
        d.hclass, d.bkind, d.bkey = 2, "none", ""
      end
      out[#out + 1] = d
    end
  end
  return out
end

-- Places the entries of the added routes of run (between listing
-- positions lo and hi) into plan; false when they do not fit.
local function plan_run(rt, plan, run, seen)
  local meta = rt.meta
  local list = {}
  for _, route in ipairs(run.routes) do
    local ds = describe(route)
    for _, d in ipairs(ds) do
      list[#list + 1] = d
    end
    plan.added[#plan.added + 1] = { route = route, count = #ds }
  end
  local step = floor((run.hi - run.lo) / (#list + 1))
  if step < 1 then
    return false
  end
  local nodes, karr, mult = rt.nodes, rt.karr, rt.mult
  local grow = plan.grow
  for k, d in ipairs(list) do
    local pp, rp = meta.ppos[d.prio], meta.rpos[d.prank]
    if not (pp and rp) then
      return false
    end
    local rank = ((pp * 3 + d.hclass) * meta.nr + rp) * meta.W + run.lo + k * step
    d.code = rank * 4 + (d.info and 2 or 0) + (d.preds and 1 or 0)
    plan.nodes = plan.nodes + 1 + #d.segs
    -- its segments against their siblings: the existing ones (while the
    -- path runs through existing nodes) and the other new ones
    local node = rt.buckets[d.bkind][d.bkey]
    local key = d.bkind .. " " .. d.bkey .. " "
    for _, seg in ipairs(d.segs) do
      if seg then
        if #seg > INLINE_MAX then
          plan.label_bytes = plan.label_bytes + #seg
        end
        local h = hash(seg, mult)
        local sib = key .. h
        if (seen[sib] or seg) ~= seg then
          return false
        end
        local child = node and child_of(nodes, karr, node, h) or 0
        if child ~= 0 and label_at(rt, child) ~= seg then
          return false
        end
        if child == 0 and not seen[sib] then
          -- a new child of node (or of the new node at key)
          local parent = node or key
          grow[parent] = (grow[parent] or 0) + 1
        end
        seen[sib] = seg
        node = child ~= 0 and child or nil
        key = key .. "/" .. seg
      else
        if node then
          node = nodes[node * NODE + N_PARAM]
          node = node ~= 0 and node or nil
        end
        key = key .. "/:"
      end
      key = key .. " "
    end
    plan.entries[#plan.entries + 1] = d
  end
  return true
end

local finish_plan

function _M.plan(rt, old, new)
  local meta, first = rt.meta, rt.route_first
  if not meta then
    return nil
  end
  local removed, runs = {}, {}
  local i, nold = 1, #old
  local prev -- the last kept route (its entries' positions bound a run)
  local run -- the routes added since that one
  local changed = 0
  for j = 1, #new do
    if j % 1024 == 0 then
      slice_check()
    end
    local route = new[j]
    if first[route] then
      -- kept: the old routes before it were removed. The merge only goes
      -- forward, so kept routes out of their old order run it off the end.
      while old[i] ~= route do
        if i > nold then
          return nil
        end
        removed[#removed + 1] = old[i]
        i = i + 1
      end
      i = i + 1
      if run then
        run.hi = pos_of(rt, first[route])
        runs[#runs + 1] = run
        run = nil
      end
      prev = route
    else
      if not run then
        run = { lo = prev and pos_of(rt, first[prev] + route_count(prev) - 1) or 0, routes = {} }
      end
      run.routes[#run.routes + 1] = route
      changed = changed + 1
      if changed > MAX_CHANGED then
        return nil
      end
    end
  end
  while i <= nold do
    removed[#removed + 1] = old[i]
    i = i + 1
  end
  if run then
    run.hi = meta.W
    runs[#runs + 1] = run
  end
  return finish_plan(rt, removed, runs, changed)
end

-- plan()'s second half: the entries of the runs placed, and the room
-- they take checked. nil when they do not fit.
finish_plan = function(rt, removed, runs, changed)
  if changed + #removed > MAX_CHANGED then
    return nil
  end
  local plan = { removed = removed, added = {}, entries = {}, nodes = 0, label_bytes = 0,
                 grow = {} }
  local seen = {}
  for _, r in ipairs(runs) do
    if not plan_run(rt, plan, r, seen) then
      return nil
    end
  end
  -- the kid array's room: the children's tables that apply will make,
  -- as add_child makes them (a node's second child makes a table of 4
  -- slots; a table more than half full, one of twice its slots)
  local kid_ints = 0
  for parent, added in pairs(plan.grow) do
    local c, slots = 0, 0
    if type(parent) == "number" then
      c = kid_count(rt.nodes, rt.karr, parent)
      slots = rt.nodes[parent * NODE + N_KMASK] + 1
    end
    for _ = 1, added do
      c = c + 1
      if c >= 2 and 2 * c > slots then
        slots = slots == 0 and 4 or 2 * slots
        kid_ints = kid_ints + 1 + 2 * slots
      end
    end
  end
  plan.grow = nil
  -- the records the new entries may make, and their long paths
  local xnew = 0
  for _, d in ipairs(plan.entries) do
    local xk, xpath = record_of(rt, d)
    if xk and rt.xon then
      xnew = xnew + 1
      local _, max_inline = x_inline(rt, xk)
      if #xpath > max_inline then
        plan.label_bytes = plan.label_bytes + #xpath
      end
    end
  end
  if rt.n + #plan.entries > rt.entry_cap or rt.node_count + plan.nodes > rt.node_cap
     or rt.loff + plan.label_bytes > rt.label_cap or rt.kuse + kid_ints > rt.kcap
     or rt.xon and rt.xn + xnew > rt.xcap then
    return nil
  end
  return plan
end

-- plan() for new = old with, for each hunk {at, del, ins} (ascending,
-- apart: a kept route between two), old[at .. at+del-1] replaced by ins
-- (a config delta's hunks: config_version.lua), without walking the
-- routes kept: O(removed + inserted). nil when plan() is needed (a route
-- of ins is in rt already) or the change does not fit (then router.new).
function _M.plan_hunks(rt, old, hunks)
  local meta, first = rt.meta, rt.route_first
  if not meta then
    return nil
  end
  local removed, runs, added = {}, {}, 0
  for _, h in ipairs(hunks) do
    local at, del, ins = h.at, h.del, h.ins
    for i = at, at + del - 1 do
      removed[#removed + 1] = old[i]
    end
    if #ins > 0 then
      for _, route in ipairs(ins) do
        if first[route] then
          return nil
        end
      end
      -- the new routes sit between the kept route before them and the
      -- one after, as plan() places a run
      local prev, nxt = old[at - 1], old[at + del]
      runs[#runs + 1] = { lo = prev and pos_of(rt, first[prev] + route_count(prev) - 1) or 0,
                          hi = nxt and pos_of(rt, first[nxt]) or meta.W, routes = ins }
      added = added + #ins
    end
  end
  return finish_plan(rt, removed, runs, added)
end

-- plan_hunks of one hunk: old[at .. at+del-1] replaced by ins
function _M.plan_splice(rt, old, at, del, ins)
  return _M.plan_hunks(rt, old, { { at = at, del = del, ins = ins } })
end

-- whether the n bytes at p start with the path a, ending at a "/" or at
-- the end (a is p's prefix on segment bounds)
local function starts_with_path(p, n, a)
  local la = #a
  return la <= n and C.memcmp(p, a, la) == 0 and (la == n or p[la] == SLASH)
end

-- The records an update may have made beaten: for each new entry X of
-- x_new (not exact, in a trie where some head ranks below it), the
-- records of that trie with a worse head whose path X could match (X's
-- literal body starts it) or, for a prefix record, whose body starts X's
-- (X is then below it: pmin). O(records) per trie with such entries.
local function x_settle(rt)
  local xr, dirty = rt.xrec, rt.x_dirty
  for root, list in pairs(rt.x_new) do
    for base = 0, rt.xmask * XREC, XREC do
      local tag = xr[base + X_TAG]
      if tag ~= 0 and tag % 4 ~= X_PARAM and floor(tag / 4) == root and xr[base + X_HEAD] ~= 0
         and not dirty[base] then
        local R, n = xr[base + X_RANK], xr[base + X_LEN]
        local p = n <= X_INLINE_MAX and rt.xrec8 + (base * 4 + X_INLINE_AT)
                  or rt.labels + xr[base + X_OFF]
        for k = 1, #list, 2 do
          local a = list[k]
          if list[k + 1] < R and (starts_with_path(p, n, a)
              or tag % 4 == X_PREFIX and starts_with_path(ffi_cast(uint8_ptr, a), #a, ffi_string(p, n))) then
            dirty[base] = true
            break
          end
        end
      end
    end
  end
end

-- Whether a path matched by the pattern of segments a (a prefix's body
-- when pre) may be matched by the pattern of segments b (false: a
-- parameter, which may be any segment here).
local function may_meet(a, pre, b)
  local m, n = #a, #b
  if m > n or (not pre and m ~= n) then
    return false
  end
  for k = 1, m do
    local x, y = a[k], b[k]
    if x and y and x ~= y then
      return false
    end
  end
  return true
end

-- x_settle for the parameter records: for each new prefix or parameter
-- entry of x_pnew (segments, rank code, whether a prefix), the parameter
-- records of its trie with a worse head whose shape it may meet.
-- O(parameter records) per trie with such entries.
local function x_psettle(rt)
  local xr, dirty = rt.xrec, rt.x_dirty
  for root, list in pairs(rt.x_pnew) do
    local pl = rt.x_plist[root] or {}
    for k = 1, #pl, 2 do
      local base = pl[k]
      if xr[base + X_HEAD] ~= 0 and not dirty[base] then
        local R, segs = xr[base + X_RANK], pl[k + 1]
        for j = 1, #list, 3 do
          if list[j + 1] < R and may_meet(list[j], list[j + 2], segs) then
            dirty[base] = segs
            break
          end
        end
      end
    end
  end
end

-- a new node of rt (apply: the room was checked by plan)
local function add_node(rt, seg, rank)
  local count = rt.node_count + 1
  rt.node_count = count
  local nodes, base = rt.nodes, count * NODE
  ffi.fill(nodes + base, NODE * 4)
  nodes[base + N_MIN] = rank
  nodes[base + N_KMASK] = -1
  local len = #seg
  nodes[base + N_LEN] = len
  if len <= INLINE_MAX then
    ffi_copy(rt.nodes8 + base * 4 + INLINE_AT, seg, len)
  else
    nodes[base + N_OFF] = rt.loff
    ffi_copy(rt.labels + rt.loff, seg, len)
    rt.loff = rt.loff + len
  end
  return count
end

-- links child (segment hash h) under node (apply: the room was checked by
-- plan, which counts the tables made here the same way)
local function add_child(rt, node, h, child)
  local nodes, karr = rt.nodes, rt.karr
  local base = node * NODE
  local km = nodes[base + N_KMASK]
  if km < 0 and nodes[base + N_KID] == 0 then
    nodes[base + N_KHASH], nodes[base + N_KID] = h, child
    return
  end
  local list, n, slots
  if km < 0 then
    list, n, slots = { nodes[base + N_KHASH], nodes[base + N_KID], h, child }, 2, 4
  else
    local off = nodes[base + N_KOFF]
    n = karr[off - 1] + 1
    if 2 * n <= km + 1 then
      karr[off - 1] = n
      local s = home(h, km)
      while karr[off + 2 * s + 1] ~= 0 do
        s = band(s + 1, km)
      end
      karr[off + 2 * s], karr[off + 2 * s + 1] = h, child
      return
    end
    list, slots = {}, 2 * (km + 1)
    for s = 0, km do
      if karr[off + 2 * s + 1] ~= 0 then
        list[#list + 1], list[#list + 2] = karr[off + 2 * s], karr[off + 2 * s + 1]
      end
    end
    list[#list + 1], list[#list + 2] = h, child
  end
  -- a new table at the end of the kid array; the old one's room is not
  -- reused (plan rebuilds once the room is gone)
  local at = rt.kuse
  rt.kuse = at + write_kids(karr, at, list, n, slots)
  nodes[base + N_KOFF], nodes[base + N_KMASK] = at + 1, slots - 1
  nodes[base + N_KHASH], nodes[base + N_KID] = 0, 0
end

local function add_root(rt, d, rank)
  local root = add_node(rt, "", rank)
  rt.buckets[d.bkind][d.bkey] = root
  rt.hosts_dirty = true -- hosts_sync at the end of apply
  if d.bkind == "none" then
    rt.none = root
  else
    rt.any_host = true
  end
  return root
end

local function add_entry(rt, d)
  local e = rt.n + 1
  rt.n = e
  local rank = d.code
  local nodes, ranks, next_entry = rt.nodes, rt.ranks, rt.next_entry
  local ents = rt.ents
  ents[4 * e - 3], ents[4 * e - 2], ents[4 * e - 1], ents[4 * e] =
    d.route, false, d.preds or false, d.info or false
  rt.paths[e], rt.kinds[e], rt.lens[e] = d.path, d.kind, d.len
  ranks[e] = rank
  next_entry[e] = 0
  local root = rt.buckets[d.bkind][d.bkey] or add_root(rt, d, rank)
  local node = root
  if rank < nodes[node * NODE + N_MIN] then
    nodes[node * NODE + N_MIN] = rank
  end
  local pdepth = d.info and d.info.psegs[1]
  local pmin = rt.pmin
  for k, seg in ipairs(d.segs) do
    if pdepth and k <= pdepth and (pmin[node] or huge) > rank then
      pmin[node] = rank
    end
    local child
    if seg then
      local h = hash(seg, rt.mult)
      child = child_of(nodes, rt.karr, node, h)
      if child == 0 then
        child = add_node(rt, seg, rank)
        add_child(rt, node, h, child)
      end
    else
      child = nodes[node * NODE + N_PARAM]
      if child == 0 then
        child = add_node(rt, "", rank)
        nodes[node * NODE + N_PARAM] = child
      end
    end
    if rank < nodes[child * NODE + N_MIN] then
      nodes[child * NODE + N_MIN] = rank
    end
    node = child
  end
  chain_entry(nodes, ranks, next_entry, node, e, rank, d.kind == "prefix")
  rt.size = rt.size + 1
  if not rt.xon then
    return
  end
  local xk, xpath = record_of(rt, d)
  if xk then
    local base = x_slot(rt, root, xk, xpath, d.segs, true)
    x_set_node(rt, base, node)
    rt.x_dirty[base] = d.segs
  end
  if d.kind ~= "exact" and rank < (rt.x_worst[root] or 0) then
    -- it may beat the head of some record of its trie: x_settle looks
    -- for those once all is added
    local list = rt.x_new[root] or {}
    rt.x_new[root] = list
    list[#list + 1] = literal_body(d.segs, pdepth and pdepth - 1 or #d.segs)
    list[#list + 1] = rank
  end
  if d.kind ~= "exact" and rt.x_plist[root] then
    -- it may beat the head of a parameter record of its trie (x_psettle)
    local list = rt.x_pnew[root] or {}
    rt.x_pnew[root] = list
    list[#list + 1], list[#list + 2], list[#list + 3] = d.segs, rank, d.kind == "prefix"
  end
end

-- unlinks entry e (the d of route's entry) from its chain
local function remove_entry(rt, e, d)
  local nodes, next_entry = rt.nodes, rt.next_entry
  local node = rt.buckets[d.bkind][d.bkey]
  for _, seg in ipairs(d.segs) do
    if seg then
      node = child_of(nodes, rt.karr, node, hash(seg, rt.mult))
    else
      node = nodes[node * NODE + N_PARAM]
    end
  end
  local is_prefix = d.kind == "prefix"
  local slot = node * NODE + (is_prefix and N_PREFIX or N_EXACT)
  local xk, xpath = record_of(rt, d)
  if xk and rt.xon then
    -- its record's head may change (to a worse one, or none)
    rt.x_dirty[assert(x_slot(rt, rt.buckets[d.bkind][d.bkey], xk, xpath, d.segs, false))] = d.segs
  end
  local head = nodes[slot]
  if head == e then
    local nxt = next_entry[e]
    nodes[slot] = nxt
    nodes[node * NODE + (is_prefix and N_PREFIX_RANK or N_EXACT_RANK)] =
      nxt ~= 0 and rt.ranks[nxt] or 0
  else
    local prev = head
    while next_entry[prev] ~= e do
      prev = next_entry[prev]
    end
    next_entry[prev] = next_entry[e]
  end
  next_entry[e] = 0
  local ents = rt.ents
  ents[4 * e - 3], ents[4 * e - 2], ents[4 * e - 1], ents[4 * e] = false, false, false, false
  rt.paths[e] = false
  rt.size = rt.size - 1
end

function _M.apply(rt, plan)
  local first = rt.route_first
  -- the records to work out again once all is changed, and per trie the
  -- literal bodies and ranks of the new entries that may beat some head
  local dirty = {}
  rt.x_dirty, rt.x_new, rt.x_pnew = dirty, {}, {}
  for _, route in ipairs(plan.removed) do
    local e = first[route]
    for k, d in ipairs(describe(route)) do
      remove_entry(rt, e + k - 1, d)
    end
    first[route] = nil
  end
  local k = 0
  for _, a in ipairs(plan.added) do
    first[a.route] = rt.n + 1
    for _ = 1, a.count do
      k = k + 1
      add_entry(rt, plan.entries[k])
    end
  end
  if rt.xon then
    x_settle(rt)
    x_psettle(rt)
    for base, segs in pairs(dirty) do
      x_refresh(rt, base, segs)
    end
  end
  rt.x_dirty, rt.x_new, rt.x_pnew = nil, nil, nil
  if rt.xshp_dirty then
    x_shapes_sync(rt)
  end
  if rt.hosts_dirty then
    hosts_sync(rt)
  end
end

-- ---- matching ---------------------------------------------------------------

-- The walk is route.c's (mg_route_find): one walk state per worker (a
-- worker matches one request at a time and match never yields), with
-- its arrays: the host buckets to walk (roots), and the path's segment
-- boundaries, hashes and keys and the parameter stack (sized to the
-- longest path met so far).
local W = ffi.new("mg_route_walk_t")
local roots_cap = 0
local walk_cap = 0
-- W holds raw pointers: what they point into is kept here
local W_arrays = {} -- luacheck: ignore 241 (only kept)
-- the request whose predicates are checked (passes), and its router's
-- header getter (not the router: a check that raised would keep an old
-- version's router alive through a reload until the next check)
local req_v, req_r, req_header, req_method, req_args

-- room for n host buckets (at least 64; kept)
local function roots_room(n)
  local cap = max(64, 2 * roots_cap, n)
  local mem = int32_arr(cap)
  roots_cap, W_arrays.roots = cap, mem
  W.roots = mem
end
roots_room(64)

-- room for a path of len bytes (at least 256; kept)
local function walk_room(len)
  local cap = max(256, 2 * walk_cap, len + 2)
  local mem = int32_arr(6 * cap)
  W.bnd_i, W.bnd_g, W.seg_h, W.stk = mem, mem + cap, mem + 2 * cap, mem + 3 * cap
  walk_cap, W_arrays.walk = cap, mem
end
walk_room(0)

local function values_pass(list, get, for_query)
  for k = 1, #list do
    local pred = list[k]
    local val = get(pred.name)
    local allowed = pred.allowed
    if type(val) == "string" then
      if not allowed[val] then
        return false
      end
    elseif for_query and type(val) == "table" then
      -- a repeated parameter: every value must be allowed, so the backend
      -- sees an allowed one whichever it reads
      for j = 1, #val do
        if not allowed[val[j]] then
          return false
        end
      end
    else
      return false
    end
  end
  return true
end

local function get_header(name)
  return req_header(req_r, name)
end

local function get_arg(name)
  local args = req_args
  if not args then
    local v = req_v
    args = decode_args(v.query_len > 0 and ffi_string(v.query, v.query_len) or "")
    req_args = args
  end
  return args[name]
end

local function passes(preds)
  local methods = preds.methods
  if methods then
    local m = req_method
    if not m then
      -- interned: no allocation for a method that some route names
      m = ffi_string(req_v.method, req_v.method_len)
      req_method = m
    end
    if not methods[m] then
      return false
    end
  end
  if preds.headers and not values_pass(preds.headers, get_header, false) then
    return false
  end
  if preds.query and not values_pass(preds.query, get_arg, true) then
    return false
  end
  return true
end

-- Lua's part of a walk that stopped at an entry with predicates: checks
-- them, and each next one the walk stops at, until it is done. Its own
-- function, out of match's straight line (a loop there, entered by few
-- requests, would be a trace of its own for the rest).
local function check_walk(rt, v, r)
  req_v, req_r, req_header, req_method, req_args = v, r, rt.header, nil, nil
  local ents = rt.ents
  repeat
    local ok = passes(ents[4 * W.check - 1]) and 1 or 0
  until C.mg_route_resume(W, ok) == 0
  req_v, req_r, req_header, req_args = nil, nil, nil, nil
end

-- where segment d of the path walked last starts (0-based) and ends
local function seg_start(d)
  return W.bnd_i[d] + 1
end
local function seg_end(d)
  return W.bnd_i[d + 1]
end

-- The entry table of entry number k, made on its first match: route,
-- path, kind, len (plain prefixes), names (parameters).
local function make_entry(rt, k)
  local info = rt.ents[4 * k]
  local e = {
    route = rt.ents[4 * k - 3], path = rt.paths[k], kind = rt.kinds[k],
    len = rt.lens[k] or nil, names = info and info.names or nil, psegs = info and info.psegs or nil,
  }
  if info and e.kind == "prefix" then
    -- "/users/:id/*": the stripped length differs per request, so match
    -- returns a view of the entry with that len
    e.view_mt = { __index = e }
  end
  rt.ents[4 * k - 2] = e
  return e
end

-- Where the values of entry's parameters are in the path of the last
-- match: caps[2i - 1], caps[2i] the start and end offsets of value i.
function _M.capture(entry, caps)
  local psegs = entry.psegs
  for i = 1, #psegs do
    caps[2 * i - 1], caps[2 * i] = seg_start(psegs[i]), seg_end(psegs[i])
  end
  return caps
end

-- The table of entry's parameters (name -> value) in v's path: from caps
-- (capture) or, without, the last match; nil when entry has none.
function _M.params(entry, v, caps)
  local names = entry.names
  if not names then
    return nil
  end
  local psegs, path = entry.psegs, v.path
  local params = new_tab(0, #names)
  for i = 1, #names do
    local s, e
    if caps then
      s, e = caps[2 * i - 1], caps[2 * i]
    else
      s, e = seg_start(psegs[i]), seg_end(psegs[i])
    end
    params[names[i]] = ffi_string(path + s, e - s)
  end
  return params
end

function _M.match(rt, v, host_fn, r)
  local host = rt.any_host and host_fn(r) or nil
  local hlen = host and #host or 0
  if 2 * hlen + 2 > roots_cap then
    roots_room(2 * hlen + 2)
  end
  local len = v.path_len
  if len + 2 > walk_cap then
    walk_room(len)
  end
  W.rt, W.path, W.path_len = rt.c, v.path, len
  if C.mg_route_find(W, host, hlen) ~= 0 then
    check_walk(rt, v, r)
  end
  local best = W.best
  if best == 0 then
    return nil
  end
  local ents = rt.ents
  local route, e = ents[4 * best - 3], ents[4 * best - 2]
  if not e then
    e = make_entry(rt, best)
  end
  -- only an entry with parameters can need a view (its rank code says
  -- so): the others' tables are not read here, a cache line fewer a lookup
  if W.best_rank % 4 >= 2 and e.view_mt then
    e = setmetatable({ len = W.best_end }, e.view_mt)
  end
  return route, e
end

return _M
