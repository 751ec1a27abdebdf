// The one Python module moe_engine._C: aligned/pinned buffers, the threaded direct-IO reader, the fused
// dequantize+matmul of quantized expert matrices and the bf16 GEMV on the CPU and, when built with CUDA, host-to-device
// copies and events. Pointers and stream handles cross the boundary as Python ints; only
// moe_engine/_ops.py imports this module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "aligned_buffer.h"
#include "bf16_gemv.h"
#include "common.h"
#include "cuda_ops.h"
#include "decode_ops.h"
#include "direct_reader.h"
#include "qmatmul.h"
#include "thread_pool.h"

namespace py = pybind11;
using moe::AlignedBuffer;
using moe::DirectReader;

namespace {

bool has_cuda() {
#ifdef MOE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void bind_buffer(py::module_& m) {
  py::class_<AlignedBuffer>(m, "AlignedBuffer", py::buffer_protocol(),
                            "nbytes of writable memory at an address that is a multiple of alignment; "
                            "page-locked when pinned. torch.frombuffer(buf, dtype=torch.uint8) wraps it.")
      .def(py::init<size_t, size_t, bool>(), py::arg("nbytes"), py::arg("alignment") = moe::kIoAlignment,
           py::arg("pinned") = false)
      .def_buffer([](AlignedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {static_cast<py::ssize_t>(1)},
                               /*readonly=*/false);
      })
      .def_property_readonly("address", &AlignedBuffer::address)
      .def_property_readonly("nbytes", &AlignedBuffer::nbytes)
      .def_property_readonly("alignment", &AlignedBuffer::alignment)
      .def_property_readonly("pinned", &AlignedBuffer::pinned);
}

void bind_reader(py::module_& m) {
  py::class_<DirectReader>(m, "DirectReader",
                           "Threaded reader of file byte ranges into caller memory (O_DIRECT with aligned "
                           "bounce buffers). The caller keeps destinations alive until wait() returns.")
      .def(py::init<int, bool, size_t>(), py::arg("num_threads") = 4, py::arg("direct") = true,
           py::arg("chunk_bytes") = size_t(4) << 20)
      .def(
          "submit",
          [](DirectReader& r, const std::vector<moe::RangeTuple>& ranges) {
            py::gil_scoped_release release;  // ranges were converted from Python before this point
            return r.submit(ranges);
          },
          py::arg("ranges"),
          "ranges: list of (path, file_offset, nbytes, dest_ptr, dest_nbytes_available). Returns a ticket.")
      .def("wait", &DirectReader::wait, py::arg("ticket"), py::call_guard<py::gil_scoped_release>(),
           "Blocks until the ticket's reads ran; raises ReadError if any failed. A ticket is waited once.")
      .def("done", &DirectReader::done, py::arg("ticket"))
      .def("close", &DirectReader::close, py::call_guard<py::gil_scoped_release>())
      .def("buffered_paths", &DirectReader::buffered_paths)
      .def_property_readonly("bytes_disk_read", &DirectReader::bytes_disk_read)
      .def_property_readonly("bytes_delivered", &DirectReader::bytes_delivered)
      .def_property_readonly("num_threads", &DirectReader::num_threads)
      .def_property_readonly("direct", &DirectReader::direct)
      .def_property_readonly("chunk_bytes", &DirectReader::chunk_bytes);
}

void bind_quant(py::module_& m) {
  m.def(
      "qlinear_f32",
      [](uintptr_t x, int64_t n, const std::vector<uintptr_t>& planes, uintptr_t scales, uintptr_t zeros, int64_t rows,
         int64_t cols, int bits, int group, uintptr_t y, int num_threads, const std::string& isa, bool int8_acts) {
        MOE_CHECK(planes.size() == 1 || planes.size() == 2,
                  "qlinear_f32: plane_ptrs holds 1 or 2 bit-plane pointers, got " << planes.size());
        moe::QMatrixView w;
        for (size_t i = 0; i < planes.size(); ++i) w.planes[i] = reinterpret_cast<const uint8_t*>(planes[i]);
        w.scales = reinterpret_cast<const uint16_t*>(scales);
        w.zeros = reinterpret_cast<const uint16_t*>(zeros);
        w.rows = rows, w.cols = cols, w.bits = bits, w.group = group;
        py::gil_scoped_release release;
        moe::qlinear_f32(reinterpret_cast<const float*>(x), n, w, reinterpret_cast<float*>(y), num_threads, isa,
                         int8_acts);
      },
      py::arg("x_ptr"), py::arg("n"), py::arg("plane_ptrs"), py::arg("scales_ptr"), py::arg("zeros_ptr"),
      py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("group"), py::arg("y_ptr"),
      py::arg("num_threads") = 1, py::arg("isa") = "auto", py::arg("int8_acts") = false,
      "y [n, rows] = x [n, cols] @ W^T for float32 x and y and a quantized W (fp16 scales/zeros [rows, cols/group], "
      "bit planes low bits first); int8_acts: 4/8-bit codes on the integer path (x as int8 per block of 32). "
      "Raises ValueError on bad arguments; the caller keeps every buffer alive.");
  m.def("qlinear_isas", &moe::qlinear_isas, "The CPU paths qlinear_f32 can take here, fastest first.");
  m.def(
      "moe_experts_quant",
      [](uintptr_t x, uintptr_t ids, uintptr_t weights, int64_t n, int64_t k, int64_t d, int64_t inter,
         std::vector<int64_t> experts, const std::vector<py::tuple>& mats, uintptr_t acc, uintptr_t out,
         int num_threads, const std::string& isa) {
        moe::MoeQuantArgs a;
        a.x = reinterpret_cast<const uint16_t*>(x), a.ids = reinterpret_cast<const int64_t*>(ids);
        a.weights = reinterpret_cast<const float*>(weights);
        a.n = n, a.k = k, a.d = d, a.inter = inter, a.experts = std::move(experts), a.isa = isa;
        a.acc = reinterpret_cast<float*>(acc), a.out = reinterpret_cast<uint16_t*>(out);
        for (const py::tuple& t : mats) {  // (bits, group, rows, cols, plane0, plane1, scales, zeros) per matrix
          MOE_CHECK(t.size() == 8, "moe_experts_quant: each matrix is (bits, group, rows, cols, plane0, plane1, "
                                   "scales, zeros), got a tuple of " << t.size());
          moe::QMatrixView w;
          w.bits = t[0].cast<int>(), w.group = t[1].cast<int>(), w.rows = t[2].cast<int64_t>();
          w.cols = t[3].cast<int64_t>();
          w.planes[0] = reinterpret_cast<const uint8_t*>(t[4].cast<uintptr_t>());
          w.planes[1] = reinterpret_cast<const uint8_t*>(t[5].cast<uintptr_t>());
          w.scales = reinterpret_cast<const uint16_t*>(t[6].cast<uintptr_t>());
          w.zeros = reinterpret_cast<const uint16_t*>(t[7].cast<uintptr_t>());
          (a.w1.size() == a.w2.size() ? a.w1 : a.w2).push_back(w);
        }
        py::gil_scoped_release release;
        moe::moe_experts_quant(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("ids_ptr"), py::arg("weights_ptr"), py::arg("n"), py::arg("k"), py::arg("d"),
      py::arg("inter"), py::arg("experts"), py::arg("mats"), py::arg("acc_ptr"), py::arg("out_ptr"),
      py::arg("num_threads") = 1, py::arg("isa") = "auto",
      "Routed SwiGLU experts over quantized buffers for n bf16 tokens: mats holds W1 then W2 of each expert in "
      "`experts` order, each (bits, group, rows, cols, plane0_ptr, plane1_ptr or 0, scales_ptr, zeros_ptr); "
      "sums added into acc [n, d] float32 (0: its own) and, unless out_ptr is 0, rounded to out [n, d] bf16.");
}

void bind_bf16(py::module_& m) {
  m.def(
      "bf16_linear",
      [](uintptr_t x, bool x_f32, int64_t n, uintptr_t w, uintptr_t bias, int64_t rows, int64_t cols, uintptr_t y,
         int num_threads, const std::string& isa) {
        moe::Bf16LinearArgs a;
        a.x = reinterpret_cast<const void*>(x), a.x_f32 = x_f32, a.n = n;
        a.w = reinterpret_cast<const uint16_t*>(w), a.bias = reinterpret_cast<const uint16_t*>(bias);
        a.rows = rows, a.cols = cols, a.y = reinterpret_cast<void*>(y);
        py::gil_scoped_release release;
        moe::bf16_linear(a, num_threads, isa);
      },
      py::arg("x_ptr"), py::arg("x_f32"), py::arg("n"), py::arg("w_ptr"), py::arg("bias_ptr"), py::arg("rows"),
      py::arg("cols"), py::arg("y_ptr"), py::arg("num_threads") = 1, py::arg("isa") = "auto",
      "y [n, rows] = x [n, cols] @ W^T (+ bias) for bf16 W [rows, cols] and bias [rows] (bias_ptr 0: none), x and y "
      "bf16 (x_f32 False) or float32 (True), all contiguous. Raises ValueError on bad arguments; the caller keeps "
      "every buffer alive.");
  m.def("bf16_linear_isas", &moe::bf16_linear_isas, "The CPU paths bf16_linear can take here, fastest first.");
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void bind_decode(py::module_& m) {
  m.def(
      "rms_norm_bf16",
      [](uintptr_t x, uintptr_t delta, uintptr_t w, int64_t n, int64_t d, float eps, uintptr_t sum, uintptr_t y) {
        py::gil_scoped_release release;
        moe::rms_norm_bf16(ptr<const uint16_t>(x), ptr<const uint16_t>(delta), ptr<const uint16_t>(w), n, d, eps,
                           ptr<uint16_t>(sum), ptr<uint16_t>(y));
      },
      py::arg("x_ptr"), py::arg("delta_ptr"), py::arg("w_ptr"), py::arg("n"), py::arg("d"), py::arg("eps"),
      py::arg("sum_ptr"), py::arg("y_ptr"),
      "y [n, d] = w * s / sqrt(mean(s^2) + eps) for s = x (delta_ptr 0) or s = x + delta (written to sum_ptr), bf16 "
      "in and out, contiguous.");
  m.def(
      "route_softmax_topk",
      [](uintptr_t logits, int64_t n, int64_t e, int64_t k, bool normalize, uintptr_t weights, uintptr_t ids) {
        moe::route_softmax_topk(ptr<const uint16_t>(logits), n, e, k, normalize, ptr<float>(weights),
                                ptr<int64_t>(ids));
      },
      py::arg("logits_ptr"), py::arg("n"), py::arg("e"), py::arg("k"), py::arg("normalize"), py::arg("weights_ptr"),
      py::arg("ids_ptr"),
      "bf16 router logits [n, e] -> float32 softmax top-k weights [n, k] (renormalized if asked), int64 ids [n, k].");
  m.def(
      "rope_qkv_bf16",
      [](uintptr_t qkv, uintptr_t cos, uintptr_t sin, int64_t b, int64_t h, int64_t hkv, int64_t dh, int64_t rot,
         uintptr_t q, uintptr_t k, std::vector<int64_t> k_strides, uintptr_t v, std::vector<int64_t> v_strides) {
        MOE_CHECK(k_strides.size() == 2 && v_strides.size() == 2,
                  "rope_qkv_bf16: k_strides and v_strides are (batch, head) element strides");
        py::gil_scoped_release release;
        moe::rope_qkv_bf16(ptr<const uint16_t>(qkv), ptr<const uint16_t>(cos), ptr<const uint16_t>(sin), b, h, hkv,
                           dh, rot, ptr<uint16_t>(q), ptr<uint16_t>(k), k_strides[0], k_strides[1], ptr<uint16_t>(v),
                           v_strides[0], v_strides[1]);
      },
      py::arg("qkv_ptr"), py::arg("cos_ptr"), py::arg("sin_ptr"), py::arg("b"), py::arg("h"), py::arg("hkv"),
      py::arg("dh"), py::arg("rot"), py::arg("q_ptr"), py::arg("k_ptr"), py::arg("k_strides"), py::arg("v_ptr"),
      py::arg("v_strides"),
      "qkv [b, (h + 2 hkv) dh] bf16 -> rotary q [b, h, dh] (contiguous), rotary k and v [b, hkv, dh] at the given "
      "(batch, head) element strides (cos, sin [b, rot]).");
  m.def(
      "attend_rows_bf16",
      [](uintptr_t q, std::vector<std::tuple<uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t>> rows,
         int64_t k_ss, int64_t v_ss, uintptr_t sinks, int64_t h, int64_t hkv, int64_t dh, float scale, uintptr_t out,
         int num_threads) {
        moe::AttendArgs a;
        for (const auto& [k, k_sh, v, v_sh, mask, s] : rows) {
          moe::AttendRow r;
          r.k = ptr<const uint16_t>(k), r.k_sh = k_sh, r.v = ptr<const uint16_t>(v), r.v_sh = v_sh;
          r.mask = ptr<const bool>(mask), r.s = s;
          a.rows.push_back(r);
        }
        a.q = ptr<const uint16_t>(q), a.k_ss = k_ss, a.v_ss = v_ss, a.sinks = ptr<const float>(sinks);
        a.h = h, a.hkv = hkv, a.dh = dh, a.scale = scale, a.out = ptr<uint16_t>(out);
        py::gil_scoped_release release;
        moe::attend_decode_bf16(a, num_threads);
      },
      py::arg("q_ptr"), py::arg("rows"), py::arg("k_ss"), py::arg("v_ss"), py::arg("sinks_ptr"), py::arg("h"),
      py::arg("hkv"), py::arg("dh"), py::arg("scale"), py::arg("out_ptr"), py::arg("num_threads") = 1,
      "One bf16 query per row and head against that row's s cached keys/values (GQA, bool mask [s], float32 sinks "
      "[h] or 0) -> out [b, h * dh]; rows = [(k_ptr, k_head_stride, v_ptr, v_head_stride, mask_ptr, s)], each in a "
      "buffer of its own, slot strides k_ss and v_ss shared.");
  m.def(
      "moe_experts_bf16",
      [](uintptr_t x, uintptr_t ids, uintptr_t weights, int64_t n, int64_t k, int64_t d, int64_t inter,
         std::vector<int64_t> experts, std::vector<uintptr_t> packed, uintptr_t acc, uintptr_t out, int num_threads) {
        moe::MoeArgs a;
        a.acc = ptr<float>(acc);
        a.x = ptr<const uint16_t>(x), a.ids = ptr<const int64_t>(ids), a.weights = ptr<const float>(weights);
        a.n = n, a.k = k, a.d = d, a.inter = inter, a.experts = std::move(experts), a.out = ptr<uint16_t>(out);
        for (uintptr_t p : packed) a.packed.push_back(ptr<const uint16_t>(p));
        py::gil_scoped_release release;
        moe::moe_experts_bf16(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("ids_ptr"), py::arg("weights_ptr"), py::arg("n"), py::arg("k"), py::arg("d"),
      py::arg("inter"), py::arg("experts"), py::arg("packed_ptrs"), py::arg("acc_ptr"), py::arg("out_ptr"),
      py::arg("num_threads") = 1,
      "Routed SwiGLU experts for n bf16 tokens (ids int64 / weights float32 [n, k]; packed bf16 experts "
      "gate|up|down, in `experts` order): weighted sums added into acc [n, d] float32 (acc_ptr 0: a zeroed one of "
      "its own) and, unless out_ptr is 0, rounded to out [n, d] bf16.");
}

#ifdef MOE_WITH_CUDA
void bind_cuda(py::module_& m) {
  m.def("cuda_device_count", &moe::cuda_device_count);
  m.def("register_pinned", &moe::register_pinned, py::arg("ptr"), py::arg("nbytes"));
  m.def("unregister_pinned", &moe::unregister_pinned, py::arg("ptr"));
  m.def("copy_h2d_async", &moe::copy_h2d_async, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("nbytes"),
        py::arg("stream_handle"), py::call_guard<py::gil_scoped_release>());
  py::class_<moe::CudaEvent>(m, "CudaEvent", "A CUDA event without timing, created on the current device.")
      .def(py::init<>())
      .def("record", &moe::CudaEvent::record, py::arg("stream_handle"))
      .def("query", &moe::CudaEvent::query)
      .def("synchronize", &moe::CudaEvent::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("wait_on", &moe::CudaEvent::wait_on, py::arg("stream_handle"))
      .def_property_readonly("handle", &moe::CudaEvent::handle);
}
#endif

}  // namespace

void bind_pool(py::module_& m) {
  using moe::StragglerGuard;
  py::class_<StragglerGuard>(m, "StragglerGuard",
                             "The thread pool's straggler guard (thread_pool.h); a fresh one for tests, the pool's "
                             "own through pool_counters().")
      .def(py::init<>())
      .def("team_for",
           [](StragglerGuard& g, int n, int64_t now_ns) {
             bool probing = false;
             const int team = g.team_for(n, now_ns, &probing);
             return py::make_tuple(team, probing);
           },
           py::arg("n"), py::arg("now_ns"), "(team, probing) for a run asking for n threads at now_ns.")
      .def("judge", &StragglerGuard::judge, py::arg("team"), py::arg("waited_ns"), py::arg("probing"),
           py::arg("now_ns"), "Record a run: the caller waited waited_ns for the team at the end.")
      .def_property_readonly("cap", [](const StragglerGuard& g) { return g.cap.load(); })
      .def_property_readonly_static("LATE_NS", [](py::object) { return StragglerGuard::kLateNs; })
      .def_property_readonly_static("STRIKES", [](py::object) { return StragglerGuard::kStrikes; })
      .def_property_readonly_static("PROBE_NS", [](py::object) { return StragglerGuard::kProbeNs; });
  m.def("pool_counters", [] {
    const StragglerGuard& g = moe::straggler_guard();
    py::dict d;
    d["cap"] = g.cap.load(), d["capped_runs"] = g.capped_runs.load(), d["probes"] = g.probes.load();
    return d;
  }, "The pool's straggler guard: its current cap (0: none), runs made capped, full-team probes.");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe-engine IO extension: aligned/pinned buffers, threaded direct-IO reads, async H2D copies, "
            "quantized and bf16 matmuls on the CPU";
  py::register_exception<moe::ReadError>(m, "ReadError", PyExc_OSError);
  m.def("has_cuda", &has_cuda, "True when built with CUDA (a device may still be absent at run time).");
  m.attr("IO_ALIGNMENT") = moe::kIoAlignment;
  bind_buffer(m);
  bind_reader(m);
  bind_quant(m);
  bind_bf16(m);
  bind_decode(m);
  bind_pool(m);
#ifdef MOE_WITH_CUDA
  bind_cuda(m);
#endif
}
