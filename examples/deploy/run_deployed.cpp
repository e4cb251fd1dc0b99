// Runs an AOTInductor package that calls torch.ops.amnets.* from C++, no Python anywhere:
//
//   run_deployed LIBAMNETS PACKAGE.pt2 INPUT.bin EXPECTED.bin SHAPE [--stream LAYERS,HIDDEN]
//
// loads our native library (which registers the ops with the dispatcher), loads the package, runs it on
// the raw float32 input of shape SHAPE (comma-separated), and compares the first output with EXPECTED.bin
// (Python eager). --stream: the package is one streamed frame, (frame (1, D), h, c (LAYERS, 1, HIDDEN)) ->
// (out (1, HIDDEN), h, c, ...); the input is (T, D) frames, run one call per frame with the state carried
// from zeros, and the expected output is (T, HIDDEN). Exit status 0 when every element is within 1e-4
// (absolute) of the expected one, 1 when not or when the package fails, 2 on bad arguments (a SHAPE whose
// element count is not INPUT.bin's float count, a file that is not whole float32 values). The package checks
// its inputs against the exported shapes (AOTI_RUNTIME_CHECK_INPUTS=1, set here unless already set).
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

// A usage error (bad arguments or files): main prints it on one line and exits 2.
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::vector<float> read_floats(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw BadInput("cannot read " + path);
  const auto bytes = static_cast<size_t>(file.tellg());
  // A truncated or foreign file: a trailing partial float would be dropped silently.
  if (bytes % sizeof(float) != 0)
    throw BadInput(path + " has " + std::to_string(bytes) + " bytes, not a whole number of float32 values");
  std::vector<float> data(bytes / sizeof(float));
  file.seekg(0);
  file.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!file) throw BadInput("cannot read " + path);
  return data;
}

// "5,50,80" -> {5, 50, 80}: positive integers only, and their product (the element count) in an int64.
std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream in(text);
  int64_t count = 1;
  for (std::string dim; std::getline(in, dim, ',');) {
    size_t used = 0;
    int64_t n = 0;
    try {
      n = std::stoll(dim, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != dim.size() || n < 1) throw BadInput("bad shape '" + text + "': dims must be integers >= 1");
    if (count > std::numeric_limits<int64_t>::max() / n) throw BadInput("bad shape '" + text + "': too many elements");
    count *= n;
    shape.push_back(n);
  }
  if (shape.empty()) throw BadInput("bad shape '" + text + "': no dims");
  return shape;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // parse_shape checked that it fits
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  const bool stream = argc == 8 && std::string(argv[6]) == "--stream";
  if (argc != 6 && !stream) {
    std::cerr << "usage: run_deployed LIBAMNETS PACKAGE.pt2 INPUT.bin EXPECTED.bin SHAPE [--stream LAYERS,HIDDEN]\n";
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {  // registers torch.ops.amnets.*
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 2;
  }
  // The packages check their inputs' shapes and dtypes only when this is set when they are loaded: without it a
  // SHAPE other than the exported one runs the compiled kernels out of bounds. The user's own setting stays.
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
  std::vector<float> input, expected;
  std::vector<int64_t> shape, state_shape;
  try {
    input = read_floats(argv[3]);
    expected = read_floats(argv[4]);
    shape = parse_shape(argv[5]);
    // from_blob reads numel(SHAPE) floats of the input: exactly as many as the file holds.
    if (numel(shape) != static_cast<int64_t>(input.size()))
      throw BadInput(std::string("SHAPE ") + argv[5] + " has " + std::to_string(numel(shape)) + " elements but " +
                     argv[3] + " holds " + std::to_string(input.size()) + " float32 values");
    if (stream) {
      state_shape = parse_shape(argv[7]);  // (LAYERS, HIDDEN)
      if (state_shape.size() != 2 || shape.size() != 2)
        throw BadInput("--stream needs SHAPE T,D and LAYERS,HIDDEN");
    }
  } catch (const std::exception& error) {
    std::cerr << "run_deployed: " << error.what() << "\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    at::Tensor x = at::from_blob(input.data(), shape, at::kFloat).clone();
    at::Tensor y;
    if (stream) {
      at::Tensor h = at::zeros({state_shape.at(0), 1, state_shape.at(1)}), c = h.clone();
      std::vector<at::Tensor> frames;
      for (int64_t t = 0; t < x.size(0); ++t) {
        std::vector<at::Tensor> out = loader.run({x.narrow(0, t, 1).contiguous(), h, c});
        frames.push_back(out.at(0));
        h = out.at(1);
        c = out.at(2);
      }
      y = at::cat(frames, 0);
    } else {
      y = loader.run({x}).at(0).contiguous();
    }
    if (y.numel() != static_cast<int64_t>(expected.size())) {
      std::cerr << "output has " << y.numel() << " elements, expected " << expected.size() << "\n";
      return 1;
    }
    at::Tensor want = at::from_blob(expected.data(), y.sizes(), at::kFloat);
    const double diff = (y - want).abs().max().item<double>();
    std::printf("run_deployed: output %s, max |C++ - Python eager| = %.3g\n", c10::str(y.sizes()).c_str(), diff);
    return diff <= 1e-4 ? 0 : 1;
  } catch (const c10::Error& error) {  // one line: the message, not the C++ backtrace
    std::string message = error.what_without_backtrace();
    while (!message.empty() && std::isspace(static_cast<unsigned char>(message.back()))) message.pop_back();
    std::cerr << "run_deployed: " << message << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "run_deployed: " << error.what() << "\n";
    return 1;
  }
}
