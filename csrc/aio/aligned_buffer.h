// aligned_buffer: an owned, page-aligned host allocation, optionally mlock'ed (page-locked).
#pragma once

#include <cstddef>

struct aligned_buffer {
    static constexpr size_t k_alignment = 4096;

    // Allocates round_up(num_bytes, 4096) bytes (at least one page); throws std::bad_alloc on failure.
    // With lock=true, mlock()s the pages (which also faults them in); _locked says whether that worked.
    aligned_buffer(size_t num_bytes, bool lock);
    aligned_buffer(const aligned_buffer&) = delete;
    aligned_buffer& operator=(const aligned_buffer&) = delete;
    ~aligned_buffer();  // munlock (when locked) and free

    char* data() const { return static_cast<char*>(_ptr); }

    void* _ptr = nullptr;
    size_t _num_bytes = 0;  // allocated bytes (rounded up to whole pages)
    bool _locked = false;
};
