-- wrk: a random page of 20 of the catalog (50 pages), optionally through
-- search (WRK_QUERY, e.g. "walnut").
local query = os.getenv("WRK_QUERY")
local pages = tonumber(os.getenv("WRK_PAGES") or "50")
math.randomseed(os.time())
request = function()
  local path = "/api/v1/products?per_page=20&page=" .. math.random(1, pages)
  if query and query ~= "" then path = path .. "&q=" .. query end
  return wrk.format("GET", path)
end
