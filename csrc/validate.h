// Per-record dataset checks for `fastchat-ft validate / analyze / split`: reads a JSONL / JSON-array chat file
// batch by batch (jsonl::Reader), parses and schema-checks each record (chat::read_record), renders it with the
// loader's templates (chat::render), tokenizes and labels it (Tokenizer, loader::label_tokens), and reports
// every problem found plus the per-record numbers the reports need. Policy and reporting live in Python.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "chat.h"
#include "dedup.h"
#include "jsonl.h"
#include "tokenizer.h"

namespace fastchat::tools {

enum Severity : uint8_t { kInfo = 0, kWarning = 1, kError = 2 };

struct Issue {
  uint32_t line = 0, column = 0;
  Severity severity = kError;
  std::string code;     // stable identifier, e.g. "order.first_turn"
  std::string field;    // e.g. messages[2].content ("" for the whole record)
  std::string message;  // what is wrong and why it matters
};

struct Options {
  chat::RenderOptions render;
  const Tokenizer* tokenizer = nullptr;  // nullptr: no token counts, trainability judged on the rendering
  bool allow_special_in_content = false;  // as the loader: special-token text in content is plain text
  uint32_t max_seq_len = 0;               // 0: no length check
  std::vector<std::string> special_strings;  // flagged when found inside message content
  bool duplicates = true;       // exact duplicates
  bool near_duplicates = true;  // MinHash near duplicates (needs `duplicates`)
  int shingle_words = 3;        // word k-grams for MinHash
  double near_threshold = 0.8;  // estimated Jaccard similarity of the shingle sets
  bool count_bigrams = false;   // distinct word bigrams (analyze's diversity)
  int threads = 0;              // <= 0: all cores
};

enum RoleIndex : uint8_t { kSystem = 0, kUser = 1, kAssistant = 2, kTool = 3 };

struct RecordInfo {
  uint32_t line = 0;
  bool usable = false;     // parsed, schema-valid and rendered
  bool has_error = false;  // at least one kError issue
  uint32_t messages = 0;
  uint32_t roles[4] = {0, 0, 0, 0};  // by RoleIndex
  uint32_t content_bytes = 0;
  uint32_t tokens = 0, trainable = 0;  // with a tokenizer
  // Over max_seq_len, the loader's overlong="truncate" result: tokens kept (whole turns; 0 = dropped) and the
  // trainable ones among them. Otherwise tokens and trainable.
  uint32_t truncated_tokens = 0, trainable_kept = 0;
  // Filled by the duplicate pass (0 when none): the line of the earlier copy.
  uint32_t duplicate_of = 0, near_duplicate_of = 0;
  float near_similarity = 0;
  uint32_t bigrams = 0;  // word bigrams counted for distinct-2 (valid records, with count_bigrams)
  std::vector<Issue> issues;
  // Worker -> duplicate pass only.
  uint64_t exact_hash = 0;
  dedup::Signature signature;
};

class Scanner {
 public:
  Scanner(const std::string& path, Options options, size_t batch_records = 4096, size_t batch_bytes = 16 << 20);
  // Processes the next batch into `out` (replaced); false when the file is exhausted.
  bool next(std::vector<RecordInfo>& out);
  uint64_t bytes_read() const { return reader_.bytes_read(); }
  uint64_t records() const { return ordinal_; }
  // Distinct word bigrams of valid records / bigrams of valid records that duplicate no earlier one.
  double distinct_bigrams() const { return bigrams_.estimate(); }
  uint64_t total_bigrams() const { return total_bigrams_; }
  // Duplicate group of every record so far (record ordinal of the group's first member), in file order.
  std::vector<uint32_t> groups();
  size_t index_memory_bytes() const { return index_.memory_bytes() + lines_.capacity() * 4; }

 private:
  jsonl::Reader reader_;
  Options options_;
  size_t batch_records_, batch_bytes_;
  std::vector<jsonl::RawRecord> raw_;
  dedup::DupIndex index_;
  std::vector<uint32_t> lines_;  // line of each record ordinal (to name the earlier copy)
  uint64_t ordinal_ = 0;
  dedup::DistinctCounter bigrams_;
  uint64_t total_bigrams_ = 0;
};

// Byte offset of the first invalid UTF-8 sequence in `s`, or std::string::npos when it is all valid.
size_t first_invalid_utf8(std::string_view s);

}  // namespace fastchat::tools
