// JSONL / JSON-array file reading behind jsonl.h. JSONL is split on '\n' only (a '\r' before it is JSON
// whitespace, so CRLF files need no special case); lines holding only whitespace are skipped.
#include "jsonl.h"

#include <cerrno>
#include <cstring>

namespace fastchat::jsonl {

FileError::FileError(uint32_t line_, uint32_t column_, const std::string& reason)
    : std::runtime_error(reason), line(line_), column(column_) {}

namespace {
bool blank(const char* b, const char* e) {
  for (; b < e; ++b)
    if (*b != ' ' && *b != '\t' && *b != '\r' && *b != '\n') return false;
  return true;
}
}  // namespace

Reader::Reader(const std::string& path, size_t chunk_bytes) : path_(path), chunk_bytes_(chunk_bytes) {
  file_ = std::fopen(path.c_str(), "rb");
  if (!file_) throw FileError(0, 0, std::string("cannot open the file: ") + std::strerror(errno));
  // Peek at the first non-space byte: '[' means a JSON array file, anything else is read as JSONL.
  while (fill()) {
    size_t i = pos_;
    // A UTF-8 BOM is skipped for the peek only; the JSON parser accepts it on line 1.
    if (buf_.size() >= 3 && buf_.compare(0, 3, "\xEF\xBB\xBF") == 0) i = 3;
    while (i < buf_.size() && (buf_[i] == ' ' || buf_[i] == '\t' || buf_[i] == '\r' || buf_[i] == '\n')) ++i;
    if (i < buf_.size()) {
      array_mode_ = buf_[i] == '[';
      break;
    }
  }
  if (array_mode_) {
    while (fill()) {}
    json::Value doc;
    try {
      doc = json::parse(buf_, 1);
    } catch (const json::ParseError& e) {
      throw FileError(e.line, e.column, e.reason);
    }
    array_ = std::move(doc.array);
    buf_.clear();
    buf_.shrink_to_fit();
  }
}

Reader::~Reader() {
  if (file_) std::fclose(file_);
}

bool Reader::fill() {
  if (eof_) return false;
  if (pos_ > 0) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  size_t old = buf_.size();
  buf_.resize(old + chunk_bytes_);
  size_t got = std::fread(&buf_[old], 1, chunk_bytes_, file_);
  buf_.resize(old + got);
  bytes_read_ += got;
  if (got == 0) {
    if (std::ferror(file_)) throw FileError(line_, 0, std::string("read error: ") + std::strerror(errno));
    eof_ = true;
    return false;
  }
  return true;
}

bool Reader::next(std::vector<RawRecord>& out, size_t max_records, size_t max_bytes) {
  size_t added = 0, bytes = 0;
  if (array_mode_) {
    while (array_next_ < array_.size() && added < max_records) {
      RawRecord r;
      r.line = array_[array_next_].line;
      r.parsed = true;
      r.value = std::move(array_[array_next_++]);
      out.push_back(std::move(r));
      ++added;
    }
    return added > 0;
  }
  while (added < max_records && bytes < max_bytes) {
    const char* data = buf_.data();
    const void* nl = std::memchr(data + pos_, '\n', buf_.size() - pos_);
    size_t end;
    if (nl) {
      end = static_cast<size_t>(static_cast<const char*>(nl) - data);
    } else if (!eof_) {
      fill();  // the line continues in the next chunk (or the file ends)
      continue;
    } else {
      end = buf_.size();
      if (pos_ == end) break;
    }
    ++line_;
    if (!blank(buf_.data() + pos_, buf_.data() + end)) {
      RawRecord r;
      r.line = line_;
      r.text.assign(buf_.data() + pos_, end - pos_);
      bytes += r.text.size();
      out.push_back(std::move(r));
      ++added;
    }
    pos_ = nl ? end + 1 : end;
  }
  return added > 0;
}

}  // namespace fastchat::jsonl
