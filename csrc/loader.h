// One batch of raw records -> parsed, validated, rendered and (with a native tokenizer) tokenized and
// labelled conversations, spread over worker threads; results keep input order. Also the one labelling
// function and the one truncation rule that validate/analyze share. Python drives batches, packing, caching.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "chat.h"
#include "jsonl.h"
#include "tokenizer.h"

namespace fastchat::loader {

enum Status : uint8_t { kOk = 0, kError = 1 };

// Label bits per conversation.
enum Flags : uint8_t { kInexact = 1, kNoTrainable = 2, kOverlong = 4 };

struct Result {
  uint32_t line = 0;
  Status status = kOk;
  // kError: where and why (record-level: JSON syntax or schema).
  uint32_t err_line = 0, err_column = 0;
  std::string field, reason, fix, raw;
  // kOk: the rendering...
  chat::Rendered rendered;
  // ...and, when a tokenizer was given, tokens with labels (-100 = not trained) and per-turn token ends.
  std::vector<int32_t> ids, labels;
  std::vector<uint32_t> turn_token_ends;
  uint8_t flags = 0;
};

struct Options {
  chat::RenderOptions render;
  int threads = 0;                 // <= 0: all cores
  std::shared_ptr<const Tokenizer> tokenizer;  // null: render only (the Python side tokenizes)
  bool allow_special_in_content = false;  // HF behaviour: special-token text in content becomes control tokens
  // Text longer than this many bytes certainly exceeds max_seq_len tokens (max_seq_len x the longest token):
  // it is cut at the last turn end that fits (truncate_overlong) or flagged kOverlong, before tokenizing.
  size_t max_text_bytes = 0;  // 0: no limit
  bool truncate_overlong = false;
  bool keep_raw = false;  // hand each valid record's JSON back too (the Jinja path renders it in Python)
};

// Processes `records` in parallel into `results` (same order, resized to match).
void process(std::vector<jsonl::RawRecord>& records, const Options& options, std::vector<Result>& results);

// Token i is trainable when its byte range overlaps a trainable span; one that also reaches outside the span
// makes the conversation inexact. Empty ranges (post-processor tokens) are never trained.
// Writes labels (ids[i] or -100) and returns the Flags bits.
uint8_t label_tokens(const int32_t* ids, const uint32_t* starts, const uint32_t* ends, size_t n,
                     const std::vector<chat::Span>& spans, int32_t* labels);

// Token count before each turn end: tokens whose end <= the turn's byte end.
void turn_token_ends(const uint32_t* ends, size_t n, const std::vector<uint32_t>& turn_ends, std::vector<uint32_t>& out);

// Per-thread scratch for encode_and_label, reused across conversations.
struct EncodeScratch {
  Encoding enc;
  std::vector<std::pair<uint32_t, uint32_t>> controls;
};

// The one tokenize-and-label path (ChatDataset, encode_chat, validate, analyze): a rendered conversation ->
// ids, labels (-100 = not trained), token count at each turn end, and the Flags bits. Template control
// candidates that are not tokens of `tok` stay text, as in HF.
uint8_t encode_and_label(const Tokenizer& tok, const chat::Rendered& r, bool allow_special_in_content,
                         EncodeScratch& scratch, std::vector<int32_t>& ids, std::vector<int32_t>& labels,
                         std::vector<uint32_t>& turn_token_ends);

// The overlong="truncate" rule, the only copy of it: tokens to keep = the end of the last whole turn within
// max_seq_len whose own tokens train something; 0 when there is none (the conversation is dropped). Trailing
// untrained turns (a question whose answer was cut off) are not worth their tokens.
size_t truncation_cut(const int32_t* labels, size_t n, const uint32_t* turn_token_ends, size_t turns,
                      size_t max_seq_len);

// A file read batch by batch: each call to next() reads up to `batch_records` records and processes them.
class ChatReader {
 public:
  ChatReader(const std::string& path, Options options, size_t batch_records = 1024, size_t batch_bytes = 8 << 20)
      : reader_(path), options_(std::move(options)), batch_records_(batch_records), batch_bytes_(batch_bytes) {}
  // False when the file is exhausted. `results` is replaced by the new batch.
  bool next(std::vector<Result>& results) {
    raw_.clear();
    if (!reader_.next(raw_, batch_records_, batch_bytes_)) return false;
    process(raw_, options_, results);
    return true;
  }
  Options& options() { return options_; }
  uint64_t bytes_read() const { return reader_.bytes_read(); }

 private:
  jsonl::Reader reader_;
  Options options_;
  size_t batch_records_, batch_bytes_;
  std::vector<jsonl::RawRecord> raw_;
};

}  // namespace fastchat::loader
