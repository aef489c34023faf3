// The library's exported entry points (everything else is hidden: build.py compiles with -fvisibility=hidden):
// RegisterCustomOps, which ONNX Runtime calls when a session loads the library, and lora_edge_kernel_version, which
// lora-edge reads (ctypes) to compare with the version a package was exported for.
#include <mutex>

#include "common.h"
#include "contract.h"

namespace {

std::once_flag domain_once;
OrtCustomOpDomain* the_domain = nullptr;

}  // namespace

extern "C" {

#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // an ORT older than these headers: nothing registered, the session says so
  Ort::InitApi(api);
  OrtStatus* status = nullptr;
  std::call_once(domain_once, [&] {
    status = api->CreateCustomOpDomain(lora_edge::contract::kDomain, &the_domain);
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, lora_edge::lora_delta_op());
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, lora_edge::lora_delta_q8_op());
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, lora_edge::block_offset_op());
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, lora_edge::matmul_q4_op());
    if (status == nullptr) status = api->CustomOpDomain_Add(the_domain, lora_edge::matmul_q8_op());
  });
  if (status != nullptr) return status;
  return api->AddCustomOpDomain(options, the_domain);
}

// The kernel's ABI version; the runtime compares it with what a package was exported for.
#if defined(_WIN32)
__declspec(dllexport)
#else
__attribute__((visibility("default")))
#endif
int lora_edge_kernel_version() { return lora_edge::contract::kKernelVersion; }

}  // extern "C"
