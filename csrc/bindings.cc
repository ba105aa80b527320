// The pybind11 file of the data path: converts between Python and the C++ core, releases the GIL around native
// work, and hands results back as numpy arrays. Nothing below this file knows about Python. The CPU compute
// kernels' bindings live in bindings_kernels.cc; both register into the one _native module.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "json.h"
#include "pack.h"
#include "loader.h"
#include "tokenizer.h"
#include "validate.h"

namespace py = pybind11;

// Each part of the native core registers its bindings in its own function below, so that the
// tokenizer and the loader can grow without touching each other's lines.
static void bind_tokenizer(py::module_& m);
static void bind_loader(py::module_& m);
static void bind_tools(py::module_& m);
void bind_cpu_kernels(py::module_& m);  // bindings_kernels.cc

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastchat-ft native core: tokenizer, chat templates, labels, packing; CPU attention, SwiGLU, RMSNorm";
  m.attr("__version__") = FASTCHAT_VERSION;
  bind_tokenizer(m);
  bind_loader(m);
  bind_tools(m);
  bind_cpu_kernels(m);
}

// ---------------------------------------------------------------- tokenizer (csrc/tokenizer.*)
static void bind_tokenizer(py::module_& m) {
  using fastchat::Encoding;
  using fastchat::EncodeOptions;
  using fastchat::Tokenizer;
  static py::exception<fastchat::TokenizerError> tokenizer_error(m, "TokenizerError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fastchat::TokenizerError& e) {
      py::set_error(tokenizer_error, e.what());  // "component: reason"
    }
  });
  // Text arguments: a str (encoded to UTF-8 once, no copy) or bytes (any bytes; invalid UTF-8 is allowed).
  struct TextArg {
    py::object keep;
    std::string_view view;
    explicit TextArg(const py::handle& h) {
      if (PyUnicode_Check(h.ptr())) {
        Py_ssize_t n;
        const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
        if (!s) throw py::error_already_set();
        view = std::string_view(s, (size_t)n);
      } else if (PyBytes_Check(h.ptr())) {
        view = std::string_view(PyBytes_AS_STRING(h.ptr()), (size_t)PyBytes_GET_SIZE(h.ptr()));
      } else {
        throw py::type_error("text must be str or bytes");
      }
      keep = py::reinterpret_borrow<py::object>(h);
    }
  };
  auto to_array = [](std::vector<int32_t>&& v) {
    auto* heap = new std::vector<int32_t>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int32_t>*>(p); });
    return py::array_t<int32_t>({(py::ssize_t)heap->size()}, {(py::ssize_t)sizeof(int32_t)}, heap->data(), owner);
  };
  auto to_u32 = [](std::vector<uint32_t>&& v) {
    auto* heap = new std::vector<uint32_t>(std::move(v));
    py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<uint32_t>*>(p); });
    return py::array_t<uint32_t>({(py::ssize_t)heap->size()}, {(py::ssize_t)sizeof(uint32_t)}, heap->data(), owner);
  };

  py::class_<Tokenizer, std::shared_ptr<Tokenizer>>(m, "Tokenizer",
      "HF tokenizer.json loaded natively; ids identical to HF `tokenizers`.")
      .def_static("from_file", [](const std::string& path) {
        try {
          return Tokenizer::from_file(path);
        } catch (const fastchat::json::ParseError& e) {
          throw py::value_error(path + ":" + e.what());
        }
      }, py::arg("path"))
      .def_static("from_json", [](const std::string& text) {
        try {
          return Tokenizer::from_json(text);
        } catch (const fastchat::json::ParseError& e) {
          throw py::value_error(std::string("tokenizer.json:") + e.what());
        }
      }, py::arg("json_text"))
      .def("encode", [to_array](const Tokenizer& t, py::handle text, bool allow_special, bool add_special_tokens) {
        TextArg arg(text);
        EncodeOptions opt;
        opt.allow_special = allow_special;
        opt.add_special_tokens = add_special_tokens;
        Encoding enc;
        {
          py::gil_scoped_release nogil;
          t.encode(arg.view, opt, enc);
        }
        return to_array(std::move(enc.ids));
      }, py::arg("text"), py::arg("allow_special") = false, py::arg("add_special_tokens") = false,
      "Token ids (int32 numpy array).")
      .def("encode_with_offsets", [to_array, to_u32](const Tokenizer& t, py::handle text, bool allow_special,
                                                     bool add_special_tokens,
                                                     std::vector<std::pair<uint32_t, uint32_t>> control_spans) {
        TextArg arg(text);
        EncodeOptions opt;
        opt.allow_special = allow_special;
        opt.add_special_tokens = add_special_tokens;
        opt.offsets = true;
        opt.control_spans = &control_spans;
        Encoding enc;
        {
          py::gil_scoped_release nogil;
          t.encode(arg.view, opt, enc);
        }
        return py::make_tuple(to_array(std::move(enc.ids)), to_u32(std::move(enc.starts)), to_u32(std::move(enc.ends)));
      }, py::arg("text"), py::arg("allow_special") = false, py::arg("add_special_tokens") = false,
      py::arg("control_spans") = std::vector<std::pair<uint32_t, uint32_t>>{},
      "(ids, starts, ends): byte offsets into the UTF-8 text; control_spans are byte ranges matched as added tokens.")
      .def("encode_batch", [to_array](const Tokenizer& t, py::sequence texts, bool allow_special,
                                      bool add_special_tokens, int threads) {
        std::vector<TextArg> args;
        args.reserve(py::len(texts));
        for (py::handle h : texts) args.emplace_back(h);
        std::vector<std::string_view> views;
        views.reserve(args.size());
        for (const auto& a : args) views.push_back(a.view);
        EncodeOptions opt;
        opt.allow_special = allow_special;
        opt.add_special_tokens = add_special_tokens;
        std::vector<std::vector<int32_t>> out;
        {
          py::gil_scoped_release nogil;
          out = t.encode_batch(views, opt, threads);
        }
        py::list result(out.size());
        for (size_t i = 0; i < out.size(); ++i) result[i] = to_array(std::move(out[i]));
        return result;
      }, py::arg("texts"), py::arg("allow_special") = false, py::arg("add_special_tokens") = false,
      py::arg("threads") = 0, "List of int32 arrays; threads <= 0 uses all cores.")
      .def("decode", [](const Tokenizer& t, py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids,
                        bool skip_special_tokens) {
        std::string s;
        {
          py::gil_scoped_release nogil;
          s = t.decode(ids.data(), (size_t)ids.size(), skip_special_tokens);
        }
        return py::str(s.data(), s.size());
      }, py::arg("ids"), py::arg("skip_special_tokens") = false)
      .def("token_to_id", [](const Tokenizer& t, const std::string& token) -> py::object {
        int32_t id = t.token_to_id(token);
        if (id < 0) return py::none();
        return py::int_(id);
      }, py::arg("token"))
      .def("id_to_token", [](const Tokenizer& t, int32_t id) -> py::object {
        std::string s = t.id_to_token(id);
        if (s.empty()) return py::none();
        return py::str(s.data(), s.size());
      }, py::arg("id"))
      .def("is_special", &Tokenizer::is_special, py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size);
}

// ---------------------------------------------------------------- loader (csrc/json.*, chat.*, pack.*)
static void bind_loader(py::module_& m) {
  namespace json = fastchat::json;
  // JSON DOM -> Python objects; used by tests to compare values with Python's json module.
  struct ToPython {
    static py::object convert(const json::Value& v) {
      switch (v.type) {
        case json::Type::Null: return py::none();
        case json::Type::Bool: return py::bool_(v.boolean);
        case json::Type::Number:
          if (v.is_integer) return py::int_(v.integer);
          return py::float_(v.number);
        case json::Type::String: return py::str(v.string);
        case json::Type::Array: {
          py::list out;
          for (const auto& item : v.array) out.append(convert(item));
          return out;
        }
        case json::Type::Object: {
          py::dict out;
          for (const auto& kv : v.object) out[py::str(kv.first)] = convert(kv.second);
          return out;
        }
      }
      return py::none();
    }
  };
  auto as_bytes = [](const py::object& text) {
    if (py::isinstance<py::bytes>(text)) return std::string(text.cast<py::bytes>());
    return text.cast<std::string>();
  };
  m.def("json_check", [as_bytes](const py::object& text, uint32_t first_line, int max_depth) -> py::object {
        std::string buf = as_bytes(text);
        try {
          py::gil_scoped_release nogil;
          json::parse(buf, first_line, max_depth);
        } catch (const json::ParseError& e) {
          return py::make_tuple(e.line, e.column, e.reason);
        }
        return py::none();
      }, py::arg("text"), py::arg("first_line") = 1, py::arg("max_depth") = 512,
      "Parse strict JSON (str or UTF-8 bytes); None when valid, else (line, column, reason).");
  m.def("json_loads", [as_bytes](const py::object& text, int max_depth) -> py::object {
        std::string buf = as_bytes(text);
        json::Value v;
        try {
          py::gil_scoped_release nogil;
          v = json::parse(buf, 1, max_depth);
        } catch (const json::ParseError& e) {
          throw py::value_error(e.what());
        }
        return ToPython::convert(v);
      }, py::arg("text"), py::arg("max_depth") = 512,
      "Parse strict JSON into Python objects (ValueError 'line:column: reason' when invalid).");

  namespace chat = fastchat::chat;
  namespace loader = fastchat::loader;
  auto parse_template = [](const std::string& t) {
    if (t == "chatml") return chat::Template::ChatML;
    if (t == "llama3") return chat::Template::Llama3;
    if (t == "llama2") return chat::Template::Llama2;
    if (t == "mistral") return chat::Template::Mistral;
    if (t == "alpaca") return chat::Template::Alpaca;
    throw py::value_error("unknown template '" + t + "' (built-in: chatml, llama3, llama2, mistral, alpaca)");
  };
  auto parse_train_on = [](const std::string& t) {
    if (t == "assistant") return chat::TrainOn::Assistant;
    if (t == "all") return chat::TrainOn::All;
    if (t == "last_assistant") return chat::TrainOn::LastAssistant;
    throw py::value_error("unknown train_on '" + t + "' (assistant, all, last_assistant)");
  };
  auto parse_think = [](const std::string& t) {
    if (t == "keep") return chat::Think::Keep;
    if (t == "strip_history") return chat::Think::StripHistory;
    throw py::value_error("unknown think policy '" + t + "' (keep, strip_history)");
  };
  auto to_array = [](auto& vec) {
    using T = typename std::decay_t<decltype(vec)>::value_type;
    return py::array_t<T>(static_cast<py::ssize_t>(vec.size()), vec.data());
  };
  // One processed batch as flat numpy arrays plus per-record counts; errors as a list of dicts.
  auto batch_to_python = [to_array](std::vector<loader::Result>& results, bool tokenized) {
    std::vector<uint32_t> lines, control, turn_ends;
    std::vector<int32_t> train, ids, labels;
    std::vector<int64_t> control_n, train_n, turn_n, token_n;
    std::vector<uint32_t> turn_tokens;
    std::vector<uint8_t> ok, flags;
    py::list texts, errors, raws;
    for (size_t i = 0; i < results.size(); ++i) {
      auto& r = results[i];
      lines.push_back(r.line);
      ok.push_back(r.status == loader::kOk);
      flags.push_back(r.flags);
      if (r.status != loader::kOk) {
        py::dict e;
        e["index"] = i;
        e["line"] = r.err_line;
        e["column"] = r.err_column;
        e["field"] = r.field;
        e["reason"] = r.reason;
        e["fix"] = r.fix;
        e["raw"] = py::bytes(r.raw);
        errors.append(e);
        texts.append(py::none());
        raws.append(py::none());
        control_n.push_back(0);
        train_n.push_back(0);
        turn_n.push_back(0);
        token_n.push_back(0);
        continue;
      }
      const auto& rd = r.rendered;
      raws.append(py::bytes(r.raw));
      texts.append(py::str(rd.text));  // also wanted when tokenized: the mask self-check decodes against it
      for (auto& c : rd.control) { control.push_back(c.first); control.push_back(c.second); }
      for (auto& sp : rd.train) { train.push_back((int32_t)sp.begin); train.push_back((int32_t)sp.end); train.push_back(sp.message); }
      turn_ends.insert(turn_ends.end(), rd.turn_ends.begin(), rd.turn_ends.end());
      control_n.push_back((int64_t)rd.control.size());
      train_n.push_back((int64_t)rd.train.size());
      turn_n.push_back((int64_t)rd.turn_ends.size());
      token_n.push_back((int64_t)r.ids.size());
      ids.insert(ids.end(), r.ids.begin(), r.ids.end());
      labels.insert(labels.end(), r.labels.begin(), r.labels.end());
      turn_tokens.insert(turn_tokens.end(), r.turn_token_ends.begin(), r.turn_token_ends.end());
    }
    py::dict out;
    out["lines"] = to_array(lines);
    out["ok"] = to_array(ok).attr("astype")("bool");
    out["texts"] = texts;
    out["records"] = raws;  // valid records' JSON when keep_raw, else empty bytes
    out["errors"] = errors;
    out["control"] = to_array(control).attr("reshape")(-1, 2);
    out["control_counts"] = to_array(control_n);
    out["train"] = to_array(train).attr("reshape")(-1, 3);
    out["train_counts"] = to_array(train_n);
    out["turn_ends"] = to_array(turn_ends);
    out["turn_counts"] = to_array(turn_n);
    out["flags"] = to_array(flags);
    if (tokenized) {
      out["ids"] = to_array(ids);
      out["labels"] = to_array(labels);
      out["token_counts"] = to_array(token_n);
      out["turn_token_ends"] = to_array(turn_tokens);
    }
    return out;
  };

  auto make_options = [parse_template, parse_train_on, parse_think](
      const std::string& tmpl, const std::string& train_on, const std::string& think, const std::string& default_system,
      const std::string& bos, const std::string& eos, int threads, const py::object& tokenizer, bool allow_special,
      size_t max_text_bytes, bool truncate_overlong, bool keep_raw) {
    loader::Options o;
    o.render.tmpl = parse_template(tmpl);
    o.render.train_on = parse_train_on(train_on);
    o.render.think = parse_think(think);
    o.render.default_system = default_system;
    o.render.bos = bos;
    o.render.eos = eos;
    o.threads = threads;
    // Cast only when given: the loader must work (render-only) in a build without the native tokenizer.
    if (!tokenizer.is_none()) o.tokenizer = tokenizer.cast<std::shared_ptr<fastchat::Tokenizer>>();
    o.allow_special_in_content = allow_special;
    o.max_text_bytes = max_text_bytes;
    o.truncate_overlong = truncate_overlong;
    o.keep_raw = keep_raw;
    return o;
  };

  py::class_<loader::ChatReader>(m, "ChatReader",
      "Reads a JSONL / JSON-array chat file batch by batch: parse, validate, render (and tokenize + label "
      "when a native tokenizer is given) on worker threads.")
      .def(py::init([make_options](const std::string& path, const std::string& tmpl, const std::string& train_on,
                                   const std::string& think, const std::string& default_system, const std::string& bos,
                                   const std::string& eos, int threads, size_t batch_records,
                                   const py::object& tokenizer, bool allow_special, size_t max_text_bytes,
                                   bool truncate_overlong, bool keep_raw) {
             auto o = make_options(tmpl, train_on, think, default_system, bos, eos, threads, tokenizer, allow_special,
                                   max_text_bytes, truncate_overlong, keep_raw);
             try {
               return new loader::ChatReader(path, std::move(o), batch_records);
             } catch (const fastchat::jsonl::FileError& e) {
               throw py::value_error(std::to_string(e.line) + ":" + std::to_string(e.column) + ": " + e.what());
             }
           }),
           py::arg("path"), py::arg("template") = "chatml", py::arg("train_on") = "assistant",
           py::arg("think") = "keep", py::arg("default_system") = "", py::arg("bos") = "", py::arg("eos") = "",
           py::arg("threads") = 0, py::arg("batch_records") = 1024, py::arg("tokenizer") = py::none(),
           py::arg("allow_special") = false, py::arg("max_text_bytes") = 0, py::arg("truncate_overlong") = false,
           py::arg("keep_raw") = false)
      .def("next_batch", [batch_to_python](loader::ChatReader& self) -> py::object {
             std::vector<loader::Result> results;
             bool more;
             {
               py::gil_scoped_release nogil;
               more = self.next(results);
             }
             if (!more) return py::none();
             return batch_to_python(results, self.options().tokenizer != nullptr);
           }, "The next batch as a dict of flat arrays, or None at the end of the file.")
      .def_property_readonly("bytes_read", &loader::ChatReader::bytes_read);

  m.def("process_records", [make_options, batch_to_python](
            const py::list& records, const std::string& tmpl, const std::string& train_on,
            const std::string& think, const std::string& default_system, const std::string& bos, const std::string& eos,
            int threads, const py::object& tokenizer, bool allow_special, size_t max_text_bytes, bool truncate_overlong,
            bool keep_raw) {
        auto o = make_options(tmpl, train_on, think, default_system, bos, eos, threads, tokenizer, allow_special,
                              max_text_bytes, truncate_overlong, keep_raw);
        std::vector<fastchat::jsonl::RawRecord> raw(records.size());
        for (size_t i = 0; i < records.size(); ++i) {
          raw[i].line = static_cast<uint32_t>(i + 1);
          py::handle item = records[i];
          // bytes pass through untouched (invalid UTF-8 included: the parser reports it); str as UTF-8.
          raw[i].text = py::isinstance<py::bytes>(item) ? std::string(py::reinterpret_borrow<py::bytes>(item))
                                                        : item.cast<std::string>();
        }
        std::vector<loader::Result> results;
        {
          py::gil_scoped_release nogil;
          loader::process(raw, o, results);
        }
        return batch_to_python(results, o.tokenizer != nullptr);
      }, py::arg("records"), py::arg("template") = "chatml", py::arg("train_on") = "assistant",
      py::arg("think") = "keep", py::arg("default_system") = "", py::arg("bos") = "", py::arg("eos") = "",
      py::arg("threads") = 1, py::arg("tokenizer") = py::none(), py::arg("allow_special") = false,
      py::arg("max_text_bytes") = 0, py::arg("truncate_overlong") = false, py::arg("keep_raw") = false,
      "In-memory JSON records (str or bytes, one per item, 'line' = position) processed like ChatReader batches.");

  m.def("label_tokens", [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids,
                           py::array_t<uint32_t, py::array::c_style | py::array::forcecast> starts,
                           py::array_t<uint32_t, py::array::c_style | py::array::forcecast> ends,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> spans) {
        size_t n = static_cast<size_t>(ids.size());
        if (static_cast<size_t>(starts.size()) != n || static_cast<size_t>(ends.size()) != n)
          throw py::value_error("ids, starts and ends must have the same length");
        if (spans.size() % 3 != 0) throw py::value_error("spans must be (k, 3): begin, end, message");
        std::vector<chat::Span> sp(static_cast<size_t>(spans.size() / 3));
        const int32_t* s = spans.data();
        for (size_t k = 0; k < sp.size(); ++k) sp[k] = chat::Span{(uint32_t)s[3 * k], (uint32_t)s[3 * k + 1], s[3 * k + 2]};
        py::array_t<int32_t> labels(static_cast<py::ssize_t>(n));
        uint8_t flags = loader::label_tokens(ids.data(), starts.data(), ends.data(), n, sp, labels.mutable_data());
        return py::make_tuple(labels, flags);
      }, py::arg("ids"), py::arg("starts"), py::arg("ends"), py::arg("spans"),
      "Labels from token byte offsets and trainable spans: (labels with -100, flags: 1 inexact, 2 nothing trainable).");
  m.def("turn_token_ends", [to_array](py::array_t<uint32_t, py::array::c_style | py::array::forcecast> ends,
                                      py::array_t<uint32_t, py::array::c_style | py::array::forcecast> turn_ends) {
        std::vector<uint32_t> te(turn_ends.data(), turn_ends.data() + turn_ends.size()), out;
        loader::turn_token_ends(ends.data(), static_cast<size_t>(ends.size()), te, out);
        return to_array(out);
      }, py::arg("ends"), py::arg("turn_ends"), "Number of tokens that end at or before each turn's byte end.");
  m.def("truncation_cut", [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> labels,
                             py::array_t<uint32_t, py::array::c_style | py::array::forcecast> turn_token_ends,
                             size_t max_seq_len) {
        return loader::truncation_cut(labels.data(), static_cast<size_t>(labels.size()), turn_token_ends.data(),
                                      static_cast<size_t>(turn_token_ends.size()), max_seq_len);
      }, py::arg("labels"), py::arg("turn_token_ends"), py::arg("max_seq_len"),
      "overlong='truncate': tokens to keep (end of the last whole turn within max_seq_len that trains), 0 = drop.");
  m.def("pack_bfd", [](py::array_t<uint32_t, py::array::c_style | py::array::forcecast> lengths, uint32_t capacity,
                       uint64_t seed) {
        std::vector<uint32_t> lens(lengths.data(), lengths.data() + lengths.size());
        std::vector<std::vector<uint32_t>> bins;
        {
          py::gil_scoped_release nogil;
          try {
            bins = fastchat::pack::best_fit_decreasing(lens, capacity, seed);
          } catch (const std::invalid_argument& e) {
            py::gil_scoped_acquire gil;
            throw py::value_error(e.what());
          }
        }
        // Flat (members, bin offsets) arrays: cheap to hand to numpy.
        std::vector<uint32_t> members;
        std::vector<int64_t> offsets{0};
        for (auto& b : bins) {
          members.insert(members.end(), b.begin(), b.end());
          offsets.push_back(static_cast<int64_t>(members.size()));
        }
        return py::make_tuple(py::array_t<uint32_t>(static_cast<py::ssize_t>(members.size()), members.data()),
                              py::array_t<int64_t>(static_cast<py::ssize_t>(offsets.size()), offsets.data()));
      }, py::arg("lengths"), py::arg("capacity"), py::arg("seed") = 0,
      "Best-fit-decreasing packing: (members, offsets); bin b holds members[offsets[b]:offsets[b+1]].");
}

// ---------------------------------------------------------------- dataset tools (csrc/validate.*, dedup.*)
static void bind_tools(py::module_& m) {
  namespace tools = fastchat::tools;
  namespace chat = fastchat::chat;
  // The scanner keeps the tokenizer alive for as long as it may use it.
  struct PyScanner {
    std::shared_ptr<fastchat::Tokenizer> tokenizer;
    std::unique_ptr<tools::Scanner> scanner;
  };
  auto file_error = [](const std::string& path, const fastchat::jsonl::FileError& e) {
    return py::value_error(path + ":" + std::to_string(e.line) + ":" + std::to_string(e.column) + ": " + e.what());
  };
  py::class_<PyScanner>(m, "DatasetScanner",
      "Checks a JSONL / JSON-array chat file batch by batch for validate / analyze / split: every problem with its "
      "line, plus per-record counts (roles, tokens, trainable tokens) and duplicate links.")
      .def(py::init([file_error](const std::string& path, const std::string& tmpl, const std::string& train_on,
                                 const std::string& think, const std::string& default_system, const std::string& bos,
                                 const std::string& eos, py::object tokenizer,
                                 uint32_t max_seq_len, std::vector<std::string> special_strings, bool duplicates,
                                 bool near_duplicates, double near_threshold, int shingle_words, bool count_bigrams,
                                 bool allow_special_in_content, int threads, size_t batch_records) {
             tools::Options o;
             if (tmpl == "chatml") o.render.tmpl = chat::Template::ChatML;
             else if (tmpl == "llama3") o.render.tmpl = chat::Template::Llama3;
             else if (tmpl == "llama2") o.render.tmpl = chat::Template::Llama2;
             else if (tmpl == "mistral") o.render.tmpl = chat::Template::Mistral;
             else if (tmpl == "alpaca") o.render.tmpl = chat::Template::Alpaca;
             else throw py::value_error("unknown template '" + tmpl + "' (built-in: chatml, llama3, llama2, mistral, alpaca)");
             if (train_on == "assistant") o.render.train_on = chat::TrainOn::Assistant;
             else if (train_on == "all") o.render.train_on = chat::TrainOn::All;
             else if (train_on == "last_assistant") o.render.train_on = chat::TrainOn::LastAssistant;
             else throw py::value_error("unknown train_on '" + train_on + "' (assistant, all, last_assistant)");
             o.render.think = think == "strip_history" ? chat::Think::StripHistory : chat::Think::Keep;
             o.render.default_system = default_system;
             o.render.bos = bos;
             o.render.eos = eos;
             auto self = std::make_unique<PyScanner>();
             if (!tokenizer.is_none()) self->tokenizer = tokenizer.cast<std::shared_ptr<fastchat::Tokenizer>>();
             o.tokenizer = self->tokenizer.get();
             o.max_seq_len = max_seq_len;
             o.special_strings = std::move(special_strings);
             o.duplicates = duplicates;
             o.near_duplicates = near_duplicates;
             o.near_threshold = near_threshold;
             o.shingle_words = std::max(1, shingle_words);
             o.count_bigrams = count_bigrams;
             o.allow_special_in_content = allow_special_in_content;
             o.threads = threads;
             try {
               self->scanner = std::make_unique<tools::Scanner>(path, std::move(o), batch_records);
             } catch (const fastchat::jsonl::FileError& e) {
               throw file_error(path, e);
             }
             return self.release();
           }),
           py::arg("path"), py::arg("template") = "chatml", py::arg("train_on") = "assistant", py::arg("think") = "keep",
           py::arg("default_system") = "", py::arg("bos") = "", py::arg("eos") = "", py::arg("tokenizer") = py::none(), py::arg("max_seq_len") = 0,
           py::arg("special_strings") = std::vector<std::string>{}, py::arg("duplicates") = true,
           py::arg("near_duplicates") = true, py::arg("near_threshold") = 0.8, py::arg("shingle_words") = 3,
           py::arg("count_bigrams") = false, py::arg("allow_special_in_content") = false, py::arg("threads") = 0,
           py::arg("batch_records") = 4096)
      .def("next_batch", [](PyScanner& self) -> py::object {
             std::vector<tools::RecordInfo> out;
             bool more;
             {
               py::gil_scoped_release nogil;
               more = self.scanner->next(out);
             }
             if (!more) return py::none();
             size_t n = out.size();
             py::array_t<uint32_t> lines(n), messages(n), bytes(n), tokens(n), trainable(n), kept(n), dup(n), near(n),
                 truncated(n);
             py::array_t<uint32_t> roles({(py::ssize_t)n, (py::ssize_t)4});
             py::array_t<float> sim(n);
             py::array_t<bool> usable(n), error(n);
             py::list issues;
             for (size_t i = 0; i < n; ++i) {
               const tools::RecordInfo& r = out[i];
               lines.mutable_at(i) = r.line;
               messages.mutable_at(i) = r.messages;
               bytes.mutable_at(i) = r.content_bytes;
               tokens.mutable_at(i) = r.tokens;
               trainable.mutable_at(i) = r.trainable;
               kept.mutable_at(i) = r.trainable_kept;
               truncated.mutable_at(i) = r.truncated_tokens;
               dup.mutable_at(i) = r.duplicate_of;
               near.mutable_at(i) = r.near_duplicate_of;
               sim.mutable_at(i) = r.near_similarity;
               usable.mutable_at(i) = r.usable;
               error.mutable_at(i) = r.has_error;
               for (int k = 0; k < 4; ++k) roles.mutable_at(i, k) = r.roles[k];
               for (const auto& is : r.issues)
                 issues.append(py::make_tuple(i, is.line, is.column, (int)is.severity, is.code, is.field, is.message));
             }
             py::dict d;
             d["lines"] = lines; d["messages"] = messages; d["roles"] = roles; d["content_bytes"] = bytes;
             d["tokens"] = tokens; d["trainable"] = trainable; d["trainable_kept"] = kept; d["truncated_tokens"] = truncated;
             d["duplicate_of"] = dup; d["near_duplicate_of"] = near; d["near_similarity"] = sim;
             d["usable"] = usable; d["has_error"] = error; d["issues"] = issues;
             return d;
           }, "The next batch as a dict of per-record arrays plus `issues` (index, line, column, severity, code, "
              "field, message), or None at the end of the file.")
      .def("groups", [](PyScanner& self) {
             std::vector<uint32_t> g = self.scanner->groups();
             return py::array_t<uint32_t>((py::ssize_t)g.size(), g.data());
           }, "Per record (file order): ordinal of the first record of its duplicate / near-duplicate group.")
      .def_property_readonly("bytes_read", [](const PyScanner& s) { return s.scanner->bytes_read(); })
      .def_property_readonly("records", [](const PyScanner& s) { return s.scanner->records(); })
      .def_property_readonly("distinct_bigrams", [](const PyScanner& s) { return s.scanner->distinct_bigrams(); })
      .def_property_readonly("total_bigrams", [](const PyScanner& s) { return s.scanner->total_bigrams(); })
      .def_property_readonly("index_memory_bytes", [](const PyScanner& s) { return s.scanner->index_memory_bytes(); });
  m.def("minhash_similarity", [](const std::string& a, const std::string& b, int shingle_words) {
        std::string na, nb;
        fastchat::dedup::normalize(a, na);
        fastchat::dedup::normalize(b, nb);
        fastchat::dedup::Signature sa, sb;
        fastchat::dedup::minhash(na, shingle_words, sa);
        fastchat::dedup::minhash(nb, shingle_words, sb);
        int same = 0;
        for (int i = 0; i < fastchat::dedup::kNumPerm; ++i) same += sa.v[i] == sb.v[i];
        return static_cast<double>(same) / fastchat::dedup::kNumPerm;
      }, py::arg("a"), py::arg("b"), py::arg("shingle_words") = 3,
      "MinHash estimate of the Jaccard similarity of two texts' word-shingle sets (as the near-duplicate check sees them).");
  m.def("normalize_for_dedup", [](const std::string& text) {
        std::string out;
        fastchat::dedup::normalize(text, out);
        return out;
      }, py::arg("text"), "Text as the near-duplicate check sees it (lower-cased, punctuation runs -> one space).");
}
