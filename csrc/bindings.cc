// The only pybind11 file: converts between Python and the C++ core, releases the GIL around native
// work, and hands results back as numpy arrays. Nothing below this file knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "json.h"

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
static void bind_tokenizer(py::module_& m) { (void)m; }

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
