// The only pybind11 file: converts between Python and the C++ core, releases the GIL around native
// work, and hands results back as numpy arrays. Nothing below this file knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "json.h"
#include "tokenizer.h"

namespace py = pybind11;

// Each part of the native core registers its bindings in its own function below, so that the
// tokenizer and the loader can grow without touching each other's lines.
static void bind_tokenizer(py::module_& m);
static void bind_loader(py::module_& m);

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastchat-ft native data path: tokenizer, chat templates, labels, packing";
  m.attr("__version__") = FASTCHAT_VERSION;
  bind_tokenizer(m);
  bind_loader(m);
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
}
