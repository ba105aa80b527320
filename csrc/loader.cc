// Batch processing behind loader.h: each worker thread takes a contiguous slice of the batch and runs
// parse -> schema -> render -> (encode -> label) on it, so results need no reordering.
#include "loader.h"

#include <algorithm>
#include <thread>

namespace fastchat::loader {

uint8_t label_tokens(const int32_t* ids, const uint32_t* starts, const uint32_t* ends, size_t n,
                     const std::vector<chat::Span>& spans, int32_t* labels) {
  uint8_t flags = 0;
  size_t j = 0;
  bool any = false;
  for (size_t i = 0; i < n; ++i) {
    labels[i] = -100;
    uint32_t s = starts[i], e = ends[i];
    if (e <= s) continue;
    while (j < spans.size() && spans[j].end <= s) ++j;
    // Spans are sorted and disjoint; a token may overlap span j and, rarely, the next one too.
    bool overlap = false, contained = false;
    for (size_t k = j; k < spans.size() && spans[k].begin < e; ++k) {
      if (spans[k].end > s) {
        overlap = true;
        if (spans[k].begin <= s && e <= spans[k].end) contained = true;
      }
    }
    if (overlap) {
      labels[i] = ids[i];
      any = true;
      if (!contained) flags |= kInexact;
    }
  }
  if (!any) flags |= kNoTrainable;
  return flags;
}

void turn_token_ends(const uint32_t* ends, size_t n, const std::vector<uint32_t>& turn_ends, std::vector<uint32_t>& out) {
  out.clear();
  size_t i = 0;
  for (uint32_t t : turn_ends) {
    while (i < n && ends[i] <= t) ++i;
    out.push_back(static_cast<uint32_t>(i));
  }
}

uint8_t encode_and_label(const Tokenizer& tok, const chat::Rendered& r, bool allow_special_in_content,
                         EncodeScratch& scratch, std::vector<int32_t>& ids, std::vector<int32_t>& labels,
                         std::vector<uint32_t>& turn_ends_out) {
  scratch.controls.clear();
  for (const auto& c : r.control)
    if (tok.token_to_id(std::string_view(r.text).substr(c.first, c.second - c.first)) >= 0)
      scratch.controls.push_back(c);
  EncodeOptions eo;
  eo.allow_special = allow_special_in_content;
  eo.offsets = true;
  eo.control_spans = &scratch.controls;
  Encoding& enc = scratch.enc;
  enc.clear();
  tok.encode(r.text, eo, enc);
  size_t n = enc.ids.size();
  ids.assign(enc.ids.begin(), enc.ids.end());
  labels.resize(n);
  uint8_t flags = label_tokens(enc.ids.data(), enc.starts.data(), enc.ends.data(), n, r.train, labels.data());
  turn_token_ends(enc.ends.data(), n, r.turn_ends, turn_ends_out);
  return flags;
}

size_t truncation_cut(const int32_t* labels, size_t n, const uint32_t* turn_token_ends, size_t turns,
                      size_t max_seq_len) {
  std::vector<uint32_t> fits;
  for (size_t k = 0; k < turns; ++k)
    if (turn_token_ends[k] > 0 && turn_token_ends[k] <= max_seq_len && turn_token_ends[k] <= n)
      fits.push_back(turn_token_ends[k]);
  std::sort(fits.begin(), fits.end());
  fits.erase(std::unique(fits.begin(), fits.end()), fits.end());
  for (size_t k = fits.size(); k-- > 0;) {
    for (size_t i = k ? fits[k - 1] : 0; i < fits[k]; ++i)
      if (labels[i] != -100) return fits[k];
  }
  return 0;
}

namespace {

// Cuts an over-long rendering at the last turn end within max_text_bytes; false when truncation is off or
// no turn fits.
bool shrink(Result& res, const Options& opt) {
  if (!opt.truncate_overlong) return false;
  chat::Rendered& r = res.rendered;
  uint32_t cut = 0;
  for (uint32_t t : r.turn_ends)
    if (t <= opt.max_text_bytes) cut = t;
  if (cut == 0) return false;
  r.text.resize(cut);
  while (!r.turn_ends.empty() && r.turn_ends.back() > cut) r.turn_ends.pop_back();
  while (!r.control.empty() && r.control.back().second > cut) r.control.pop_back();
  while (!r.train.empty() && r.train.back().begin >= cut) r.train.pop_back();
  if (!r.train.empty() && r.train.back().end > cut) r.train.back().end = cut;
  return true;
}

void process_one(jsonl::RawRecord& rec, const Options& opt, chat::Conversation& conv, EncodeScratch& scratch,
                 Result& res) {
  res = Result();
  res.line = rec.line;
  try {
    json::Value value = rec.parsed ? std::move(rec.value) : json::parse(rec.text, rec.line);
    chat::read_record(std::move(value), conv);
    if (opt.keep_raw) {
      if (rec.parsed) chat::dump_json(conv.record, res.raw);
      else res.raw = rec.text;
      return;  // the caller renders it itself
    }
    chat::render(conv, opt.render, res.rendered);
  } catch (const json::ParseError& e) {
    res.status = kError;
    res.err_line = e.line;
    res.err_column = e.column;
    res.reason = "invalid JSON: " + e.reason;
    res.fix = "fix the JSON syntax of this line (each line of a .jsonl file is one complete JSON object)";
  } catch (const chat::RecordError& e) {
    res.status = kError;
    res.err_line = e.line;
    res.err_column = e.column;
    res.field = e.field;
    res.reason = e.reason;
    res.fix = e.fix;
  }
  if (res.status == kError) {
    res.raw = std::move(rec.text);
    return;
  }
  if (opt.max_text_bytes && res.rendered.text.size() > opt.max_text_bytes && !shrink(res, opt)) {
    res.flags = kOverlong;
    res.rendered.clear();  // nothing of it will be used; do not hand 100 MB back to Python
    return;
  }
  if (!opt.tokenizer) return;
  res.flags = encode_and_label(*opt.tokenizer, res.rendered, opt.allow_special_in_content, scratch, res.ids,
                               res.labels, res.turn_token_ends);
}

}  // namespace

void process(std::vector<jsonl::RawRecord>& records, const Options& options, std::vector<Result>& results) {
  size_t n = records.size();
  results.resize(n);
  int threads = options.threads > 0 ? options.threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min<int>(threads, static_cast<int>(n / 8 + 1)));  // tiny batches: fewer threads
  auto work = [&](size_t begin, size_t end) {
    chat::Conversation conv;
    EncodeScratch scratch;
    for (size_t i = begin; i < end; ++i) {
      try {
        process_one(records[i], options, conv, scratch, results[i]);
      } catch (const std::exception& e) {
        // Never let a worker thread take the process down: report the record instead.
        results[i].status = kError;
        results[i].err_line = records[i].line;
        results[i].err_column = 1;
        results[i].reason = std::string("could not process the record: ") + e.what();
        results[i].fix = "report this record to the fastchat-ft maintainers";
      }
    }
  };
  if (threads == 1) {
    work(0, n);
    return;
  }
  std::vector<std::thread> pool;
  size_t per = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    size_t b = std::min(n, per * t), e = std::min(n, per * (t + 1));
    if (b < e) pool.emplace_back(work, b, e);
  }
  work(0, std::min(n, per));
  for (auto& th : pool) th.join();
}

}  // namespace fastchat::loader
