// Drives csrc/aio's plain C++ engine with no torch and no Python: built by tests/csrc/test_aio_engine.py with
// `c++ -std=c++17 -pthread ... -laio` from the engine sources alone, which proves they need neither.
// Usage: aio_engine_check DIR. Prints "ok" and exits 0, or prints what failed and exits 1.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "aio_engine.h"
#include "aio_error.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what)
{
    if (!ok) {
        std::printf("FAILED: %s\n", what.c_str());
        ++failures;
    }
}

// Round trip of `num_bytes` at `file_offset`, from a buffer that starts `misalign` bytes into its allocation.
void round_trip(aio_engine& engine, const std::string& path, int64_t num_bytes, int64_t file_offset, int misalign)
{
    std::vector<char> out(num_bytes + misalign), in(num_bytes + misalign, 0);
    for (int64_t i = 0; i < num_bytes; ++i) { out[misalign + i] = static_cast<char>((i * 131 + file_offset) % 251); }
    engine.submit(aio_request{false, out.data() + misalign, num_bytes, path, file_offset, true, nullptr, {}},
                  /*then_wait=*/true, {});
    bool hook_ran = false;
    engine.submit(aio_request{true, in.data() + misalign, num_bytes, path, file_offset, false, nullptr,
                              [&hook_ran]() { hook_ran = true; }},
                  /*then_wait=*/false, {});
    const aio_wait_result result = engine.wait();
    check(result._completed == 1, "wait() counts the one async read");
    check(hook_ran, "the completion hook ran");
    check(std::memcmp(out.data() + misalign, in.data() + misalign, num_bytes) == 0,
          "bytes read back equal bytes written (" + std::to_string(num_bytes) + " at " + std::to_string(file_offset) +
              ", misalign " + std::to_string(misalign) + ")");
}

}  // namespace

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::printf("usage: aio_engine_check DIR\n");
        return 1;
    }
    const std::string dir = argv[1];
    aio_engine engine(aio_config{16384, 8, false, true, 2});
    round_trip(engine, dir + "/a.bin", 1 << 20, 0, 0);
    round_trip(engine, dir + "/b.bin", 300000, 4096 * 3 + 17, 5);
    round_trip(engine, dir + "/c.bin", 1, 0, 0);

    try {  // a read of a missing file: os_error with ENOENT and the path
        std::vector<char> buf(4096);
        engine.submit(aio_request{true, buf.data(), 4096, dir + "/missing.bin", 0, false, nullptr, {}}, true, {});
        check(false, "reading a missing file throws");
    } catch (const aio_error& e) {
        check(e._kind == aio_error_kind::os_error && e._errno == ENOENT, "missing file: os_error ENOENT");
        check(std::string(e.what()).find("missing.bin") != std::string::npos, "the message names the file");
    }
    try {  // a read past the end: eof_error
        std::vector<char> buf(8192);
        engine.submit(aio_request{true, buf.data(), 8192, dir + "/c.bin", 0, false, nullptr, {}}, true, {});
        check(false, "reading past the end throws");
    } catch (const aio_error& e) {
        check(e._kind == aio_error_kind::eof_error, "short file: eof_error");
    }
    try {  // a bad setting
        aio_engine bad(aio_config{0, 8, false, false, 1});
        check(false, "block_size 0 throws");
    } catch (const aio_error& e) {
        check(e._kind == aio_error_kind::value_error, "block_size 0: value_error");
    }
    if (failures == 0) { std::printf("ok\n"); }
    return failures == 0 ? 0 : 1;
}
