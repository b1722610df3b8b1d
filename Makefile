# Moongate build. `make help` lists the targets.
#
# Dependencies are Debian packages (DESIGN.md); each is here for a reason:
#   libluajit2-5.1-dev luajit2   the Lua VM and its FFI (policies, framework)
#   libuv1-dev                   the event loop (sockets, timers, signals)
#   node-llhttp                  HTTP/1.1 parser sources, compiled in
#   libssl-dev                   sha256, base64; TLS of the HTTP client (etcd, mg.http.request)
#   libhiredis-dev               Redis client (cluster rate limits)
#   lua-cjson                    JSON for config and the policy kit
#   lua-busted lua-socket        specs, and their raw-socket HTTP client
#   lua-check cppcheck clang-format   make lint
#   luarocks                     the rockspec (luarocks lint / make)
#   clang libclang-rt-14-dev     make fuzz (libFuzzer), make asan
#   redis-server etcd-server etcd-client   real services for later specs
#   wrk nginx libnginx-mod-http-lua haproxy   bench/ peers
#   curl                         README's first command, and specs
#   prometheus                   promtool check metrics
#   valgrind                     callgrind instruction counts in bench/
#   python3 iproute2 procps util-linux   spec helpers (a plain HTTP server, ss,
#                                setpriv) and bench/ (ss, taskset)
DEB_PACKAGES := build-essential pkg-config libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp \
	libssl-dev libhiredis-dev lua-cjson lua-busted lua-socket lua-check cppcheck clang-format \
	luarocks clang libclang-rt-14-dev redis-server etcd-server etcd-client wrk nginx \
	libnginx-mod-http-lua haproxy curl prometheus valgrind python3 iproute2 procps util-linux

VERSION    ?= 0.1.0-dev
CC         ?= cc
LLHTTP_SRC := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp
LUAJIT_INC := $(shell pkg-config --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1)
LUAJIT_LIB := $(shell pkg-config --libs luajit 2>/dev/null || echo -lluajit-5.1)

BUILD      ?= build
OPT        ?= -O2 -g
SAN        ?=
CFLAGS_ALL := $(OPT) $(SAN) -std=gnu11 -Wall -Wextra -fPIC \
	-Iruntime/include -Iruntime/src -I$(LLHTTP_INC) $(LUAJIT_INC) \
	-DMG_VERSION='"$(VERSION)"' $(if $(MG_LUA_DIR_FLAG),-DMG_LUA_DIR='"$(MG_LUA_DIR_FLAG)"') $(CFLAGS)
include libs.mk
LDLIBS_ALL := $(LUAJIT_LIB) $(RUNTIME_LIBS)

RUNTIME_SRC := $(filter-out runtime/src/main.c,$(wildcard runtime/src/*.c))
RUNTIME_OBJ := $(RUNTIME_SRC:runtime/src/%.c=$(BUILD)/obj/%.o)
LLHTTP_OBJ  := $(BUILD)/obj/llhttp_llhttp.o $(BUILD)/obj/llhttp_api.o $(BUILD)/obj/llhttp_http.o
LIB         := $(BUILD)/libmoongate.so
BIN         ?= bin/moongate
CTESTS      := $(patsubst runtime/test/%.c,$(BUILD)/test/%,$(wildcard runtime/test/test_*.c))

BUSTED      := busted --lua=luajit --lpath='./spec/?.lua' --lpath='./lua/?.lua' --lpath='./lua/?/init.lua'

comma := ,

# Install layout (luarocks make passes its tree's directories).
INSTALL_LUADIR ?= /usr/local/share/lua/5.1
INSTALL_LIBDIR ?=
INSTALL_BINDIR ?= /usr/local/bin

.PHONY: run install all deps build test test-c test-lua asan lint fuzz bench help clean rock

### all: build libmoongate and bin/moongate (default)
all: build

build: $(BIN)

$(BUILD)/obj/%.o: runtime/src/%.c runtime/src/*.h runtime/include/moongate.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

# llhttp's generated C warns under -Wextra; it is not ours to fix.
$(BUILD)/obj/llhttp_%.o: $(LLHTTP_SRC)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(OPT) $(SAN) -fPIC -w -I$(LLHTTP_INC) -c $< -o $@

$(LIB): $(RUNTIME_OBJ) $(LLHTTP_OBJ)
	$(CC) -shared $(SAN) -o $@ $^ $(LDLIBS_ALL)

# The executable links the library with an rpath relative to itself and
# exports its symbols so the FFI finds the mg_* API through ffi.C.
$(BIN): runtime/src/main.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ runtime/src/main.c -L$(BUILD) -lmoongate \
		-Wl,-rpath,'$$ORIGIN/../$(BUILD)' -Wl,-rpath,'$$ORIGIN/../lib/lua/5.1' \
		-Wl,-rpath,'$$ORIGIN/../lib' $(if $(INSTALL_LIBDIR),-Wl$(comma)-rpath$(comma)$(INSTALL_LIBDIR)) \
		-Wl,--no-as-needed $(LDLIBS_ALL)

$(BUILD)/test/%: runtime/test/%.c runtime/test/*.h $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< -L$(BUILD) -lmoongate -Wl,-rpath,'$$ORIGIN/..' $(LDLIBS_ALL)

### run: install deps, build, then run the mock backend on :9001 and the gateway on :8080 (foreground; Ctrl-C stops both)
run: deps build
	@bin/moongate mock --listen 127.0.0.1:9001 & mock=$$!; \
	trap 'kill $$mock 2>/dev/null' EXIT INT TERM; \
	bin/moongate start -c conf/moongate.json

### deps: install the Debian packages the build, tests and bench need (idempotent)
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

### test: build, run the C unit tests and the busted specs; ends with "N passed, N failed"
test: build $(CTESTS)
	@bash spec/run-all $(CTESTS) fuzz/replay-seeds

### test-lua: only the busted specs (SPEC=path to pick some)
test-lua: build
	$(BUSTED) $(or $(SPEC),spec)

### asan: build with AddressSanitizer + UBSan into build-asan/ and run every test on it
asan:
	$(MAKE) BUILD=build-asan OPT='-O1 -g -fno-omit-frame-pointer' \
		SAN='-fsanitize=address,undefined' build-asan/libmoongate.so
	@mkdir -p build-asan/bin
	$(CC) -O1 -g -fsanitize=address,undefined -std=gnu11 -Iruntime/include -Iruntime/src \
		-I$(LLHTTP_INC) $(LUAJIT_INC) -DMG_VERSION='"$(VERSION)"' \
		-o build-asan/bin/moongate runtime/src/main.c -Lbuild-asan -lmoongate \
		-Wl,-rpath,'$$ORIGIN/..' -Wl,--no-as-needed $(LDLIBS_ALL)
	$(MAKE) BUILD=build-asan SAN='-fsanitize=address,undefined' build-asan-tests
	MOONGATE_BIN=$(CURDIR)/build-asan/bin/moongate MOONGATE_LUA_DIR=$(CURDIR)/lua \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		bash spec/run-all $(patsubst $(BUILD)/test/%,build-asan/test/%,$(CTESTS))

build-asan-tests: $(CTESTS)

### lint: luacheck, cppcheck and a clang-format check
lint:
	luacheck --codes lua spec policies
	cppcheck --quiet --error-exitcode=1 --enable=warning,style,performance,portability \
		--inline-suppr --suppress=missingIncludeSystem -Iruntime/include -Iruntime/src \
		runtime/src runtime/test
	clang-format --dry-run --Werror runtime/src/*.c runtime/src/*.h runtime/include/*.h runtime/test/*.c

### fuzz: build the libFuzzer target and run it (FUZZ_SECONDS, default 60)
FUZZ_SECONDS ?= 60
fuzz:
	$(MAKE) -C fuzz run SECONDS=$(FUZZ_SECONDS)

### bench: proxy throughput against nginx and HAProxy (see bench/README.md)
bench: build
	bench/run

### bench-ir: user instructions per proxied request in one worker under callgrind (bench/ir-per-request; ROW=moongate|moongate-ratelimit, SECONDS=5)
bench-ir: build
	bench/ir-per-request --row $(or $(ROW),moongate-ratelimit) --seconds $(or $(SECONDS),5)

### bench-reload: change speed at 5,000 routes: one-route reload per worker, p99 during 20 changes/s vs steady (PASS/FAIL)
### bench-churn: CPU per config change at 5,000 routes, no load: the control's read, check, diff and copy; a worker's sliced build (PASS/FAIL)
### bench-sandbox: cost of a sandboxed phase call vs a trusted one, and time to stop a runaway policy at the budget
### bench-admin: the Admin API handler at 5,000 routes: index a version, a page, one by id, PUT/DELETE against a real etcd
### bench-etcd: 10,000 routes in a real etcd: start to the last route served (< 1 s), one change applied per worker (< 5 ms) (PASS/FAIL)
### bench-router: router lookup, build time and memory at 100/1k/10k/100k routes (PASS/FAIL vs the 10k targets)
### bench-prims: ns per call of mg.limit takes (one key, 10k keys), take_all and breaker acquire+report from Lua (PASS/FAIL vs 100 ns)
### bench-redis: mg.redis round trip: µs per INCR through the gateway vs without Redis vs direct, and wrk on both routes
# Each runs `luajit bench/<name>.lua $(BENCH_<NAME>_ARGS)` after a build.
BENCH_LUA := reload churn sandbox admin etcd router prims redis
.PHONY: $(BENCH_LUA:%=bench-%) bench-ir
$(BENCH_LUA:%=bench-%): bench-%: build
	luajit bench/$*.lua $(BENCH_$(shell echo $* | tr a-z A-Z)_ARGS)

### rock: luarocks lint, then build and install into a local tree (build/rock)
rock:
	luarocks lint moongate-scm-1.rockspec
	luarocks make --tree=$(CURDIR)/build/rock moongate-scm-1.rockspec

### install: install bin/moongate, libmoongate and the Lua modules and policies
install: build
	install -d $(INSTALL_BINDIR) $(or $(INSTALL_LIBDIR),/usr/local/lib) \
		$(INSTALL_LUADIR)/moongate/policies
	install -m 0755 $(LIB) $(or $(INSTALL_LIBDIR),/usr/local/lib)/
	install -m 0755 $(BIN) $(INSTALL_BINDIR)/
	install -m 0644 lua/moongate/*.lua $(INSTALL_LUADIR)/moongate/
	cp -R policies/. $(INSTALL_LUADIR)/moongate/policies/
	touch $(INSTALL_LUADIR)/moongate/policies/.moongate-policies

### clean: remove build outputs
clean:
	rm -rf build build-asan bin

### help: list the targets
help:
	@grep -E '^### ' Makefile | sed 's/^### /  make /; s/: /\t/'
