-- luacheck configuration (make lint)
std = "luajit"
max_line_length = 120
files["spec/**/*_spec.lua"] = { std = "+busted" }
files["spec/fixtures/**"] = { std = "+busted" }
exclude_files = { "build/**", "build-asan/**", "fuzz/build/**" }
