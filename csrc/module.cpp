// The nemokernels._C Python module. Importing it registers every op (static initialisers in
// csrc/<family>/<family>_ops.cpp); the functions here only report how the binary was built.
// Written against Python's limited C API (3.10): the one binary (_C.abi3.so) loads under every
// CPython >= 3.10, as the ops' stable-ABI code loads under every torch >= 2.11.
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

#include <cstdint>
#include <exception>
#include <string>

#include "common/op_registry.h"
#include "common/philox.h"
#include "nvfp4/gemm.h"
#include "ssd/ssd_chunk_scan.h"

#ifndef NK_CUDA_ARCHS
#define NK_CUDA_ARCHS ""
#endif

namespace {

// A Python exception from a C++ one (no C++ exception may cross into the interpreter).
PyObject* raise(const std::exception& e) {
  PyErr_SetString(PyExc_RuntimeError, e.what());
  return nullptr;
}

// {op: family}, filed by each family's <family>_ops.cpp as it defines its schemas.
PyObject* op_families(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  try {
    for (const auto& [op, family] : nk::op_families()) {
      PyObject* v = PyUnicode_FromString(family.c_str());
      if (v == nullptr || PyDict_SetItemString(d, op.c_str(), v) != 0) {
        Py_XDECREF(v);
        Py_DECREF(d);
        return nullptr;
      }
      Py_DECREF(v);
    }
  } catch (const std::exception& e) {
    Py_DECREF(d);
    return raise(e);
  }
  return d;
}

// n unsigned 32-bit words from a list or tuple of ints; false (with a Python error) otherwise.
bool words(PyObject* seq, Py_ssize_t n, const char* what, uint32_t* out) {
  const std::string type_error = std::string("philox4x32_10: ") + what + " must be a list of ints";
  PyObject* fast = PySequence_Fast(seq, type_error.c_str());
  if (fast == nullptr) return false;
  bool ok = PySequence_Size(fast) == n;
  if (!ok) PyErr_Format(PyExc_ValueError, "philox4x32_10: %s must have %zd words", what, n);
  for (Py_ssize_t i = 0; ok && i < n; ++i) {
    PyObject* item = PySequence_GetItem(fast, i);  // new reference (the limited API has no borrowed form)
    const unsigned long v = item != nullptr ? PyLong_AsUnsignedLong(item) : 0;
    Py_XDECREF(item);
    ok = item != nullptr && !PyErr_Occurred() && v <= 0xFFFFFFFFul;
    if (item != nullptr && !PyErr_Occurred() && !ok)
      PyErr_Format(PyExc_ValueError, "philox4x32_10: %s words must fit 32 bits", what);
    out[i] = static_cast<uint32_t>(v);
  }
  Py_DECREF(fast);
  return ok;
}

// The Philox4x32-10 the kernels share (csrc/common/philox.h), for known-answer tests.
PyObject* philox4x32_10(PyObject*, PyObject* args) {
  PyObject *ctr_obj, *key_obj;
  if (!PyArg_ParseTuple(args, "OO:philox4x32_10", &ctr_obj, &key_obj)) return nullptr;
  uint32_t ctr[4], key[2];
  if (!words(ctr_obj, 4, "counter", ctr) || !words(key_obj, 2, "key", key)) return nullptr;
  const nk::Philox4 r = nk::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
  return Py_BuildValue("[kkkk]", static_cast<unsigned long>(r.v[0]), static_cast<unsigned long>(r.v[1]),
                       static_cast<unsigned long>(r.v[2]), static_cast<unsigned long>(r.v[3]));
}

// The path nvfp4_gemm takes on a CUDA device for an (M, N, K) problem: the op's own routing
// function (csrc/nvfp4/gemm.h), so tests name the kernel they exercise.
PyObject* nvfp4_gemm_path(PyObject*, PyObject* args) {
  int device_index;
  long long M, N, K;
  if (!PyArg_ParseTuple(args, "iLLL:nvfp4_gemm_path", &device_index, &M, &N, &K)) return nullptr;
#ifdef NK_WITH_CUDA
  try {
    const int path = nk::nvfp4_gemm_cuda_path(device_index, M, N, K);
    return PyUnicode_FromString(path == nk::kNvfp4PathCutlassSm100  ? "cutlass_sm100"
                                : path == nk::kNvfp4PathCutlassSm90 ? "cutlass_sm90"
                                                                    : "portable_cuda");
  } catch (const std::exception& e) {
    return raise(e);
  }
#else
  (void)device_index, (void)M, (void)N, (void)K;
  return PyUnicode_FromString("unavailable");
#endif
}

// The kernel mamba_chunk_scan_combined's forward runs its chunk output (F4) on for contiguous
// (b, L, H, P) inputs of a 16-bit (or float32) dtype on a device: the forward's own predicate.
PyObject* ssd_chunk_scan_path(PyObject*, PyObject* args) {
  int device_index, is16;
  long long H, P, G, N, Q;
  if (!PyArg_ParseTuple(args, "ipLLLLL:ssd_chunk_scan_path", &device_index, &is16, &H, &P, &G, &N, &Q)) return nullptr;
#ifdef NK_WITH_CUDA
  try {
    nk::SsdParams p{};
    p.batch = 1, p.seqlen = Q, p.nheads = H, p.headdim = P, p.ngroups = G, p.dstate = N, p.chunk_size = Q;
    p.nchunks = 1;
    p.dtype = is16 ? nk::DType::BF16 : nk::DType::F32;
    // contiguous activations at 256-byte aligned addresses, as torch allocates them
    static float aligned[64] __attribute__((aligned(256)));
    p.x = p.B = p.C = aligned;
    p.states = p.cs = p.dtp = aligned;
    p.x_sb = Q * H * P, p.x_sl = H * P, p.x_sh = P;
    p.B_sb = p.C_sb = Q * G * N, p.B_sl = p.C_sl = G * N, p.B_sg = p.C_sg = N;
    return PyUnicode_FromString(nk::ssd_fwd_cuda_output_sm90_on(device_index, p) ? "wgmma_sm90" : "portable_cuda");
  } catch (const std::exception& e) {
    return raise(e);
  }
#else
  (void)device_index, (void)is16, (void)H, (void)P, (void)G, (void)N, (void)Q;
  return PyUnicode_FromString("unavailable");
#endif
}

PyMethodDef kMethods[] = {
    {"op_families", op_families, METH_NOARGS,
     "{op: family} for every op this binary defines (csrc/<family>/<family>_ops.cpp)"},
    {"philox4x32_10", philox4x32_10, METH_VARARGS,
     "Philox4x32-10 of a 4-word counter and a 2-word key (csrc/common/philox.h)"},
    {"nvfp4_gemm_path", nvfp4_gemm_path, METH_VARARGS,
     "nvfp4_gemm's CUDA path for an (M, N, K) problem on a device: cutlass_sm100, portable_cuda "
     "(or unavailable in a CPU-only build)"},
    {"ssd_chunk_scan_path", ssd_chunk_scan_path, METH_VARARGS,
     "ssd_chunk_scan_path(device_index, is_16bit, nheads, headdim, ngroups, dstate, chunk_size): the "
     "kernel mamba_chunk_scan_combined's forward computes its output with on that device: wgmma_sm90 "
     "(NEMOKERNELS_SSD_SM90=1, sm_90), portable_cuda (or unavailable in a CPU-only build)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "nemokernels compiled ops (registered under torch.ops.nemokernels)", -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

// Adds an attribute, stealing `value`; false on error.
bool add(PyObject* m, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(m, name, value) != 0) {
    Py_DECREF(value);
    return false;
  }
  return true;
}

PyObject* none() {
  Py_INCREF(Py_None);
  return Py_None;
}

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
#ifdef NK_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
#ifdef NK_CUDA_VERSION
  PyObject* cuda_version = PyUnicode_FromString(NK_CUDA_VERSION);
#else
  PyObject* cuda_version = none();
#endif
  const bool ok = add(m, "__version__", PyUnicode_FromString(NK_VERSION)) &&
                  add(m, "with_cuda", PyBool_FromLong(with_cuda)) &&
                  add(m, "cuda_archs", PyUnicode_FromString(NK_CUDA_ARCHS)) &&
                  add(m, "cuda_version", cuda_version) &&
                  add(m, "torch_target_version",
                      PyLong_FromUnsignedLongLong(static_cast<unsigned long long>(NK_TORCH_TARGET_VERSION))) &&
                  add(m, "built_with_torch", PyUnicode_FromString(TORCH_BUILD_VERSION));
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
