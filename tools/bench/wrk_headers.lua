-- Each request carries one header whose value is the next line of a file, for
-- tools/bench/compare.py (distinct users' Basic credentials, Negotiate tokens):
--
--   wrk -t2 -c16 -d10s -s tools/bench/wrk_headers.lua URL -- HEADER FILE MODE THREADS
--
-- MODE "cycle": each thread walks the whole file round and round, starting at its own offset
--   (1,000 users cycling, or one user's repeated credentials).
-- MODE "once": the lines are single-use (Kerberos tokens: a replay cache refuses a repeat), so
--   thread k of THREADS takes lines k+1, k+1+THREADS, ...; when its share runs out it starts over
--   and counts every reused line in "exhausted" (reported by done(); the answers are then
--   replays, refused, and not counted as successes by the caller).
-- The report (setup/done, one JSON line) comes from wrk_report.lua next to this file.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")

local header, lines, position, step, single_use, formatted
local wrapped = false
exhausted = 0

function init(args)
   header = args[1]
   local mode, count = args[3], tonumber(args[4])
   lines = {}
   for line in io.lines(args[2]) do
      if #line > 0 then lines[#lines + 1] = line end
   end
   assert(#lines > 0, "no values in " .. args[2])
   single_use = mode == "once"
   if single_use then
      position, step = id + 1, count
   else
      assert(mode == "cycle", "MODE is cycle or once")
      position, step = (id * math.floor(#lines / count)) % #lines + 1, 1
      -- few and reused: format each request once
      formatted = {}
      for i, value in ipairs(lines) do formatted[i] = wrk.format(nil, nil, { [header] = value }) end
   end
end

function request()
   if position > #lines then
      position = (position - 1) % #lines + 1
      wrapped = single_use
   end
   if wrapped then exhausted = exhausted + 1 end
   local i = position
   position = position + step
   if formatted then return formatted[i] end
   return wrk.format(nil, nil, { [header] = lines[i] })
end
