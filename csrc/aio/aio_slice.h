// aio_slice: the contiguous part of one request that one worker thread moves.
#pragma once

#include <cstdint>

struct aio_slice {
    char* _buffer;            // first byte of this thread's part of the (CPU) tensor
    int64_t _file_offset;     // file position of _buffer[0]
    int64_t _num_bytes;       // bytes in this part (may be 0)
    int64_t _request_offset;  // file offset of the whole request, for error messages
    int64_t _request_bytes;   // bytes of the whole request, for error messages
};
