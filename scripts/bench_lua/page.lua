-- Benchmark case "page": a 20-row HTML table built from a Lua table with
-- string.format and table.concat, about 10 KB of HTML (page.php does the same).
-- The data lives at the top level, loaded once per state; each request formats it.

local format, concat = string.format, table.concat

local CUSTOMERS = {
  {id = 1, name = "Ada Lovelace", email = "ada.lovelace@example.com", city = "London", country = "United Kingdom", joined = "2010-01-01", orders = 3, balance = 12.50, status = "active"},
  {id = 2, name = "Alan Turing", email = "alan.turing@example.com", city = "Manchester", country = "United Kingdom", joined = "2011-06-08", orders = 40, balance = 91.69, status = "active"},
  {id = 3, name = "Grace Hopper", email = "grace.hopper@example.com", city = "Arlington", country = "United States", joined = "2012-11-15", orders = 77, balance = 170.88, status = "overdue"},
  {id = 4, name = "Edsger Dijkstra", email = "edsger.dijkstra@example.com", city = "Austin", country = "United States", joined = "2013-04-22", orders = 114, balance = 250.07, status = "active"},
  {id = 5, name = "Barbara Liskov", email = "barbara.liskov@example.com", city = "Boston", country = "United States", joined = "2014-09-01", orders = 151, balance = 329.26, status = "suspended"},
  {id = 6, name = "Donald Knuth", email = "donald.knuth@example.com", city = "Stanford", country = "United States", joined = "2015-02-08", orders = 37, balance = 408.45, status = "active"},
  {id = 7, name = "Ken Thompson", email = "ken.thompson@example.com", city = "Berkeley", country = "United States", joined = "2016-07-15", orders = 74, balance = 487.64, status = "active"},
  {id = 8, name = "Dennis Ritchie", email = "dennis.ritchie@example.com", city = "Murray Hill", country = "United States", joined = "2017-12-22", orders = 111, balance = 566.83, status = "overdue"},
  {id = 9, name = "Niklaus Wirth", email = "niklaus.wirth@example.com", city = "Zurich", country = "Switzerland", joined = "2018-05-01", orders = 148, balance = 646.02, status = "active"},
  {id = 10, name = "John McCarthy", email = "john.mccarthy@example.com", city = "Stanford", country = "United States", joined = "2019-10-08", orders = 34, balance = 725.21, status = "suspended"},
  {id = 11, name = "Frances Allen", email = "frances.allen@example.com", city = "Armonk", country = "United States", joined = "2020-03-15", orders = 71, balance = 804.40, status = "active"},
  {id = 12, name = "Leslie Lamport", email = "leslie.lamport@example.com", city = "Mountain View", country = "United States", joined = "2021-08-22", orders = 108, balance = 883.59, status = "active"},
  {id = 13, name = "Tony Hoare", email = "tony.hoare@example.com", city = "Oxford", country = "United Kingdom", joined = "2022-01-01", orders = 145, balance = 962.78, status = "overdue"},
  {id = 14, name = "Margaret Hamilton", email = "margaret.hamilton@example.com", city = "Cambridge", country = "United States", joined = "2023-06-08", orders = 31, balance = 41.97, status = "active"},
  {id = 15, name = "Bjarne Stroustrup", email = "bjarne.stroustrup@example.com", city = "College Station", country = "United States", joined = "2010-11-15", orders = 68, balance = 121.16, status = "suspended"},
  {id = 16, name = "Guido van Rossum", email = "guido.vanrossum@example.com", city = "Amsterdam", country = "Netherlands", joined = "2011-04-22", orders = 105, balance = 200.35, status = "active"},
  {id = 17, name = "Roberto Ierusalimschy", email = "roberto.ierusalimschy@example.com", city = "Rio de Janeiro", country = "Brazil", joined = "2012-09-01", orders = 142, balance = 279.54, status = "active"},
  {id = 18, name = "Linus Torvalds", email = "linus.torvalds@example.com", city = "Portland", country = "United States", joined = "2013-02-08", orders = 28, balance = 358.73, status = "overdue"},
  {id = 19, name = "Radia Perlman", email = "radia.perlman@example.com", city = "Boston", country = "United States", joined = "2014-07-15", orders = 65, balance = 437.92, status = "active"},
  {id = 20, name = "Butler Lampson", email = "butler.lampson@example.com", city = "Cambridge", country = "United States", joined = "2015-12-22", orders = 102, balance = 517.11, status = "suspended"},
}

local HEAD = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
  .. "<title>Customers</title>\n<link rel=\"stylesheet\" href=\"/static/site.css\">\n</head>\n"
  .. "<body>\n<h1>Customers</h1>\n<table class=\"customers\">\n<thead>\n<tr><th>#</th>"
  .. "<th>Name</th><th>E-mail</th><th>City</th><th>Joined</th><th>Orders</th>"
  .. "<th>Balance</th><th>Status</th><th></th></tr>\n</thead>\n<tbody>\n"

local ROW = "<tr class=\"%s\" data-id=\"%d\">\n"
  .. "  <td class=\"id\">%d</td>\n"
  .. "  <td class=\"name\"><a href=\"/customers/%d\">%s</a></td>\n"
  .. "  <td class=\"email\"><a href=\"mailto:%s\">%s</a></td>\n"
  .. "  <td class=\"city\">%s, %s</td>\n"
  .. "  <td class=\"date\">%s</td>\n"
  .. "  <td class=\"num\">%d</td>\n"
  .. "  <td class=\"num\">%.2f</td>\n"
  .. "  <td class=\"status\"><span class=\"badge badge-%s\">%s</span></td>\n"
  .. "  <td class=\"actions\"><a href=\"/customers/%d/edit\">edit</a></td>\n</tr>\n"

local FOOT = "</tbody>\n</table>\n<p class=\"count\">%d customers</p>\n</body>\n</html>\n"

function main(env, con)
  local out = {HEAD}
  for i = 1, #CUSTOMERS do
    local c = CUSTOMERS[i]
    out[i + 1] = format(ROW, i % 2 == 0 and "even" or "odd", c.id, c.id, c.id, c.name,
      c.email, c.email, c.city, c.country, c.joined, c.orders, c.balance, c.status, c.status,
      c.id)
  end
  out[#out + 1] = format(FOOT, #CUSTOMERS)
  con:puts(concat(out))
end
