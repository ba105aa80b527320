// The only pybind11 file: converts between Python and the C++ core, releases the GIL around native
// work, and hands results back as numpy arrays. Nothing below this file knows about Python.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

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
static void bind_loader(py::module_& m) { (void)m; }
