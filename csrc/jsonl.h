// Streaming reader of dataset files: JSONL (one record per line, read in bounded chunks, so memory follows
// the window and the longest line, not the file) and JSON array files (parsed whole). Hands out raw records
// with their line numbers; parsing happens in the loader's worker threads.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.h"

namespace fastchat::jsonl {

// A file-level problem (unreadable file, broken JSON array): the whole file cannot be read.
struct FileError : std::runtime_error {
  uint32_t line, column;
  FileError(uint32_t line_, uint32_t column_, const std::string& reason);
};

struct RawRecord {
  uint32_t line = 0;
  std::string text;         // JSONL: the line's bytes (without the newline)
  bool parsed = false;      // JSON array files: `value` already holds the record
  json::Value value;
};

class Reader {
 public:
  // `chunk_bytes` is the read size; a line longer than that is assembled across chunks.
  explicit Reader(const std::string& path, size_t chunk_bytes = 4 << 20);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  // Appends up to `max_records` records or about `max_bytes` of text; returns false when nothing is left.
  bool next(std::vector<RawRecord>& out, size_t max_records, size_t max_bytes);
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
  size_t chunk_bytes_;
  std::string buf_;       // unread bytes of the current chunk(s)
  size_t pos_ = 0;        // next unread byte in buf_
  bool eof_ = false;
  uint32_t line_ = 0;     // number of the last line handed out or skipped
  uint64_t bytes_read_ = 0;
  bool array_mode_ = false;
  std::vector<json::Value> array_;  // JSON array file: all records
  size_t array_next_ = 0;

  bool fill();  // reads another chunk into buf_; false at EOF
};

}  // namespace fastchat::jsonl
