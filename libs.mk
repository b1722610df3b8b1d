# The system libraries the runtime links against, beside LuaJIT: one list
# for the build (Makefile) and the fuzzer (fuzz/Makefile), so a library the
# runtime starts using cannot leave one of them failing to link.
RUNTIME_LIBS := -luv -lhiredis -lssl -lcrypto -lm -ldl -lpthread
