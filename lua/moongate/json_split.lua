-- Splits the text of a JSON object into the texts of its members and of
-- the elements of chosen array members, without decoding anything:
--
--   local doc = json_split.split(text, { routes = true, upstreams = true })
--   doc.members.global_policies   -- a member's value, as text (not split)
--   doc.elements.routes[3]        -- the 3rd element of "routes", as text
--   doc.skeleton                  -- text with each split array as "[]"
--   doc = json_split.split(new_text, arrays, doc)   -- the next version
--
-- The reload decodes and validates only the elements whose text changed
-- (config_version.lua): at 5,000 routes, decoding the whole file costs more
-- than all the rest of a one-route change.
--
-- Validity: the glue between split elements (brackets, commas, white space)
-- is checked here; everything else is left to the JSON decoder: the
-- skeleton and each element's text are valid JSON exactly when the whole
-- text is (a value in a valid context can be swapped for another value).
-- An element is found by counting brackets outside strings, so a text that
-- is not JSON may give spans that do not decode; the caller then decodes
-- the whole text for the decoder's own error message.
--
-- split returns nil, reason when the text does not have the expected shape
-- (not an object, a split member that is not an array of objects, a member
-- name with an escape, a split member given twice): the caller decodes the
-- whole text instead.
--
-- Cost: one pass over the bytes (~4 ns a byte once compiled) and one string
-- per element. Given the previous doc, only the bytes between the longest
-- common prefix and suffix of the two texts are looked at, when they lie
-- inside one split array (one route added, changed or removed): the other
-- elements keep their strings. Between those, an old element found again
-- byte for byte is compared (memcmp), not scanned (scan_region): two
-- changes far apart cost ~0.1 ms of comparisons at 786 KiB, not a 3 ms
-- scan. O(elements) table stores remain.

local ffi = require("ffi")

local sub = string.sub
local pairs = pairs
local ipairs = ipairs
local floor = math.floor
local concat = table.concat
local ffi_cast = ffi.cast

local byte_ptr = ffi.typeof("const uint8_t *")
local word_ptr = ffi.typeof("const uint64_t *")
pcall(ffi.cdef, "int memcmp(const void *s1, const void *s2, size_t n);") -- libc's
local C = ffi.C

local QUOTE, BACKSLASH = 34, 92
local LBRACE, RBRACE, LBRACK, RBRACK = 123, 125, 91, 93
local COMMA, COLON = 44, 58

local _M = {}

local function is_space(c)
  return c == 32 or c == 10 or c == 13 or c == 9
end

local function skip_space(p, i, n)
  while i < n and is_space(p[i]) do
    i = i + 1
  end
  return i
end

-- p[i] is the opening quote; returns the index of the closing quote, or nil
local function string_end(p, i, n)
  i = i + 1
  while i < n do
    local c = p[i]
    if c == QUOTE then
      return i
    end
    if c == BACKSLASH then
      i = i + 1
    end
    i = i + 1
  end
  return nil
end

-- p[i] opens an object or array; returns the index of the bracket closing
-- it (brackets of either kind counted alike: a mismatch is the decoder's
-- to report), or nil
local function container_end(p, i, n)
  local depth = 0
  while i < n do
    local c = p[i]
    if c == QUOTE then
      i = string_end(p, i, n)
      if not i then
        return nil
      end
    elseif c == LBRACE or c == LBRACK then
      depth = depth + 1
    elseif c == RBRACE or c == RBRACK then
      depth = depth - 1
      if depth == 0 then
        return i
      end
    end
    i = i + 1
  end
  return nil
end

-- any value at p[i]; returns the index of its last byte, or nil
local function value_end(p, i, n)
  local c = p[i]
  if c == LBRACE or c == LBRACK then
    return container_end(p, i, n)
  end
  if c == QUOTE then
    return string_end(p, i, n)
  end
  -- a number or a literal: up to the next delimiter
  local j = i
  while j < n do
    c = p[j]
    if c == COMMA or c == RBRACE or c == RBRACK or is_space(c) then
      break
    end
    j = j + 1
  end
  if j == i then
    return nil
  end
  return j - 1
end

-- Elements from p[i] up to p[stop] (exclusive), or (close) up to the "]"
-- ending the array. `after` says an element precedes i (so a "," comes
-- first), `before` that one follows at stop (so the run ends with ",").
-- Appends each element's text and 0-based first and last byte to out.
-- Returns where it stopped, or nil and a reason. limit: return right
-- after that many elements (the end's checks are then the caller's).
local function scan_elements(text, p, i, stop, after, before, out, close, limit)
  local texts, starts, ends = out.texts, out.starts, out.ends
  local count = 0
  local need_sep, after_sep = after, false
  while true do
    i = skip_space(p, i, stop)
    if i >= stop then
      if close then
        return nil, "unterminated array"
      end
      break
    end
    local c = p[i]
    if close and c == RBRACK then
      break
    end
    if need_sep then
      if c ~= COMMA then
        return nil, "expected , between elements"
      end
      i = i + 1
      need_sep, after_sep = false, true
    else
      if c ~= LBRACE then
        return nil, "an element is not an object"
      end
      local e = container_end(p, i, stop)
      if not e then
        return nil, "unterminated element"
      end
      local k = #texts + 1
      texts[k], starts[k], ends[k] = sub(text, i + 1, e + 1), i, e
      i = e + 1
      need_sep, after_sep = true, false
      count = count + 1
      if count == limit then
        return i
      end
    end
  end
  if before then
    -- the next element must come after a "," (or first in the array)
    if need_sep then
      return nil, "expected , between elements"
    end
  elseif after_sep then
    return nil, "a , before ]"
  end
  return i
end

local function new_span()
  return { texts = {}, starts = {}, ends = {} }
end

-- scan_elements (after, before as there) for text's bytes [i, stop) that
-- replace the elements jlo..jhi of span, split from otext: an old element
-- that comes next unchanged, with the separator before it, byte for byte
-- (memcmp), is taken as it was (its string kept, its bytes not scanned);
-- else one element is scanned and the next RESYNC old ones tried again.
-- Two changes far apart (an edit near the top, a route added at the end:
-- what a reload folding two writes sees) then cost a comparison of the
-- bytes between (~0.1 ms at 786 KiB) instead of a scan (~3 ms). Identical
-- bytes at an element boundary are the same element, so the result is
-- scan_elements' whichever old element matched.
local RESYNC = 8
local function scan_region(text, p, i, stop, after, before, out, otext, span, jlo, jhi)
  local texts, starts, ends = out.texts, out.starts, out.ends
  local op = ffi_cast(byte_ptr, otext)
  local ostarts, oends, otexts = span.starts, span.ends, span.texts
  local j, need_sep = jlo, after
  while j <= jhi do
    local hit, from, len
    local last = j + RESYNC < jhi and j + RESYNC or jhi
    for jj = j, last do
      -- element 1's piece is "[ws]{...}": only right after the "["; any
      -- other's is "ws,ws{...}": only right after an element
      if (jj > 1) == need_sep then
        from = jj == 1 and span.open + 1 or oends[jj - 1] + 1
        len = oends[jj] - from + 1
        if i + len <= stop and C.memcmp(p + i, op + from, len) == 0 then
          hit = jj
          break
        end
      end
    end
    if hit then
      -- the rest of the old run too, in one comparison (the usual case:
      -- the elements between two changes, all shifted alike)
      local upto = hit
      local all = oends[jhi] - from + 1
      if jhi > hit and i + all <= stop and C.memcmp(p + i, op + from, all) == 0 then
        upto, len = jhi, all
      end
      local k, shift = #texts, i - from
      for jj = hit, upto do
        k = k + 1
        texts[k], starts[k], ends[k] = otexts[jj], ostarts[jj] + shift, oends[jj] + shift
      end
      i, need_sep, j = i + len, true, upto + 1
    else
      -- one element scanned, unless only the separator is left
      local e = skip_space(p, i, stop)
      if need_sep and e < stop and p[e] == COMMA then
        e = skip_space(p, e + 1, stop)
      end
      if e >= stop then
        break
      end
      local ni, err = scan_elements(text, p, i, stop, need_sep, false, out, false, 1)
      if not ni then
        return nil, err
      end
      i, need_sep = ni, true
    end
  end
  return scan_elements(text, p, i, stop, need_sep, before, out)
end

-- text: a JSON document; arrays: set of member names whose elements are
-- wanted. Returns {members = {name = text} (the members not split),
-- elements = {name = {texts}}, skeleton = text, ...}, or nil and a reason.
local function split_whole(text, arrays)
  local n = #text
  local p = ffi_cast(byte_ptr, text)
  local members, elements, spans = {}, {}, {}
  local pieces, from = {}, 1 -- the skeleton: the text less the split arrays
  local i = skip_space(p, 0, n)
  if i >= n or p[i] ~= LBRACE then
    return nil, "not an object"
  end
  i = skip_space(p, i + 1, n)
  if i < n and p[i] == RBRACE then
    i = i + 1
  else
    while true do
      if i >= n or p[i] ~= QUOTE then
        return nil, "expected a member name"
      end
      local ke = string_end(p, i, n)
      if not ke then
        return nil, "unterminated member name"
      end
      local name = sub(text, i + 2, ke)
      for k = i + 1, ke - 1 do
        if p[k] == BACKSLASH then
          return nil, "a member name has an escape"
        end
      end
      i = skip_space(p, ke + 1, n)
      if i >= n or p[i] ~= COLON then
        return nil, "expected :"
      end
      i = skip_space(p, i + 1, n)
      if i >= n then
        return nil, "expected a value"
      end
      local ve
      if arrays[name] then
        if spans[name] then
          return nil, "member " .. name .. " is given twice"
        end
        local span = new_span()
        span.open = i
        local j, err
        if p[i] == LBRACE and p[skip_space(p, i + 1, n)] == RBRACE then
          -- {}: what JSON encoders that cannot tell an empty table from an
          -- empty array (lua-cjson) write; the decoder reads it as an empty
          -- list too. An edit inside it is split again from scratch.
          j = skip_space(p, i + 1, n)
          span.empty_object = true
        elseif p[i] ~= LBRACK then
          return nil, "member " .. name .. " is not an array"
        else
          j, err = scan_elements(text, p, i + 1, n, false, false, span, true)
          if not j then
            return nil, "member " .. name .. ": " .. err
          end
        end
        ve = j
        span.close = j
        spans[name] = span
        elements[name] = span.texts
        pieces[#pieces + 1] = sub(text, from, i) .. "[]"
        from = ve + 2
      else
        ve = value_end(p, i, n)
        if not ve then
          return nil, "unterminated value"
        end
        members[name] = sub(text, i + 1, ve + 1)
      end
      i = skip_space(p, ve + 1, n)
      if i >= n then
        return nil, "unterminated object"
      end
      local c = p[i]
      if c == RBRACE then
        i = i + 1
        break
      end
      if c ~= COMMA then
        return nil, "expected , or } after a member"
      end
      i = skip_space(p, i + 1, n)
    end
  end
  if skip_space(p, i, n) ~= n then
    return nil, "text after the object"
  end
  pieces[#pieces + 1] = sub(text, from)
  return { text = text, members = members, elements = elements, spans = spans,
           skeleton = concat(pieces) }
end

-- the length of the common prefix of a and b (at most n bytes)
local function common_prefix(a, b, n)
  local wa, wb = ffi_cast(word_ptr, a), ffi_cast(word_ptr, b)
  local w = 0
  while (w + 1) * 8 <= n and wa[w] == wb[w] do
    w = w + 1
  end
  local pa, pb = ffi_cast(byte_ptr, a), ffi_cast(byte_ptr, b)
  local i = w * 8
  while i < n and pa[i] == pb[i] do
    i = i + 1
  end
  return i
end

-- the length of the common suffix of a and b (at most n bytes)
local function common_suffix(a, b, n)
  local pa, pb = ffi_cast(byte_ptr, a), ffi_cast(byte_ptr, b)
  local la, lb = #a, #b
  local i = 0
  -- 8 bytes at a time (unaligned loads: fine on x86-64 and arm64)
  while i + 8 <= n and ffi_cast(word_ptr, pa + la - i - 8)[0]
                       == ffi_cast(word_ptr, pb + lb - i - 8)[0] do
    i = i + 8
  end
  while i < n and pa[la - i - 1] == pb[lb - i - 1] do
    i = i + 1
  end
  return i
end

-- the last index whose value is < x in the ascending list t (0 if none)
local function last_below(t, x)
  local lo, hi = 0, #t
  while lo < hi do
    local mid = floor((lo + hi + 1) / 2)
    if t[mid] < x then
      lo = mid
    else
      hi = mid - 1
    end
  end
  return lo
end

-- The next doc from the previous one, when text differs from old.text only
-- inside one split array; else nil.
local function split_changed(text, old)
  local otext = old.text
  local nlen, olen = #text, #otext
  local m = nlen < olen and nlen or olen
  local pre = common_prefix(text, otext, m)
  if pre == nlen and nlen == olen then
    return old
  end
  local suf = common_suffix(text, otext, m - pre)
  local lo, hi = pre, olen - suf -- the old bytes [lo, hi) changed
  local name, span
  for k, s in pairs(old.spans) do
    if s.open < lo and s.close >= hi then
      name, span = k, s
    end
  end
  if not span or span.empty_object then
    return nil
  end
  local delta = nlen - olen
  -- elements wholly before the change, and wholly after it
  local a = last_below(span.ends, lo)
  local b = last_below(span.starts, hi) + 1
  local n = #span.texts
  local x = a > 0 and span.ends[a] + 1 or span.open + 1
  local y = (b <= n and span.starts[b] or span.close) + delta
  local out = new_span()
  for k = 1, a do
    out.texts[k], out.starts[k], out.ends[k] = span.texts[k], span.starts[k], span.ends[k]
  end
  local p = ffi_cast(byte_ptr, text)
  if not scan_region(text, p, x, y, a > 0, b <= n, out, otext, span, a + 1, b - 1) then
    return nil
  end
  local k = #out.texts
  for j = b, n do
    k = k + 1
    out.texts[k], out.starts[k], out.ends[k] = span.texts[j], span.starts[j] + delta,
                                               span.ends[j] + delta
  end
  out.open, out.close = span.open, span.close + delta
  local spans, elements = {}, {}
  for key, s in pairs(old.spans) do
    if key == name then
      s = out
    elseif s.open > span.close and delta ~= 0 then
      -- after the changed array: same texts, offsets moved
      local moved = { texts = s.texts, starts = {}, ends = {}, open = s.open + delta,
                      close = s.close + delta }
      for j = 1, #s.texts do
        moved.starts[j], moved.ends[j] = s.starts[j] + delta, s.ends[j] + delta
      end
      s = moved
    end
    spans[key], elements[key] = s, s.texts
  end
  return { text = text, members = old.members, elements = elements, spans = spans,
           skeleton = old.skeleton }
end

-- The inverse of split: the text of a document from its skeleton and the
-- texts of its split arrays' elements (elements = {name = {texts}}); an
-- array the skeleton lacks is added as a member. Not byte for byte the
-- text that was split (the white space inside split arrays is gone), but
-- the same JSON. Returns the text, or nil and a reason. O(bytes).
function _M.join(skeleton, elements)
  local arrays = {}
  for name in pairs(elements) do
    arrays[name] = true
  end
  local doc, err = split_whole(skeleton, arrays)
  if not doc then
    return nil, err
  end
  local cuts = {} -- {open, close, name}: the skeleton's arrays, in order
  local extra = {}
  for name, texts in pairs(elements) do
    local span = doc.spans[name]
    if span then
      cuts[#cuts + 1] = { span.open, span.close, name }
    elseif #texts > 0 then
      extra[#extra + 1] = name
    end
  end
  table.sort(cuts, function(a, b) return a[1] < b[1] end)
  table.sort(extra)
  local pieces, from = {}, 1
  for _, c in ipairs(cuts) do
    pieces[#pieces + 1] = sub(skeleton, from, c[1] + 1) -- up to and with "["
    pieces[#pieces + 1] = concat(elements[c[3]], ",")
    from = c[2] + 1 -- from "]" on
  end
  local rest = sub(skeleton, from)
  if #extra > 0 then
    -- before the closing brace, after a comma unless the object is empty
    local body, close = rest:match("^(.-)%s*(}%s*)$")
    local empty = #cuts == 0 and skeleton:match("^%s*{%s*}%s*$")
    local members = {}
    for i, name in ipairs(extra) do
      members[i] = '"' .. name .. '":[' .. concat(elements[name], ",") .. "]"
    end
    rest = body .. (empty and "" or ",") .. concat(members, ",") .. close
  end
  pieces[#pieces + 1] = rest
  return concat(pieces)
end

-- text: a JSON document; arrays: set of member names whose elements are
-- wanted; old (optional): the doc of the previous text, split with the same
-- arrays. Returns the doc, or nil and a reason.
function _M.split(text, arrays, old)
  if old then
    local doc = split_changed(text, old)
    if doc then
      return doc
    end
  end
  return split_whole(text, arrays)
end

return _M
